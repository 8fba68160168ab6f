"""Request bodies read by the routes themselves: capped (413 before reading past the cap), decoded and
validated off the event loop, every failure a 422 naming the field.

Decoding JSON and validating it hold the GIL for their whole duration (about 40 ms per MB here), so a thread
does not keep the event loop responsive: four clients sending 6 MB bodies pushed ``/healthz`` p95 above a
second. Bodies above ``OFF_PROCESS_ABOVE`` bytes are therefore parsed in a small pool of parser processes
(``off_loop``); smaller ones in a thread."""

import asyncio
import json
import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from .errors import ApiError, pydantic_errors


def refuse_announced(request: Request, cap: int) -> None:
    """413 at once when the request's Content-Length announces more than ``cap`` bytes."""
    cl = request.headers.get("content-length")
    if cl and cl.isascii() and cl.isdigit() and len(cl) < 20 and int(cl) > cap:
        raise ApiError(413, f"request body of {cl} bytes is above the cap of {cap} bytes",
                       [{"loc": ["body"], "msg": f"above the cap of {cap} bytes"}])


async def read_capped(request: Request, cap: int) -> bytes:
    """The request body, refusing (413) one above ``cap`` bytes without reading all of it."""
    refuse_announced(request, cap)
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > cap:
            raise ApiError(413, f"request body is above the cap of {cap} bytes",
                           [{"loc": ["body"], "msg": f"above the cap of {cap} bytes"}])
        chunks.append(chunk)
    return b"".join(chunks)


OFF_PROCESS_ABOVE = 256 * 1024


def die_with_parent() -> None:
    """In a parser process: SIGKILL when the API process that spawned it dies, however it dies (Linux
    PR_SET_PDEATHSIG; elsewhere the pool's own shutdown is all there is). Without it a SIGKILLed API left its
    parser (~120 MB) and, through the parser's pipe, multiprocessing's resource tracker running."""
    import ctypes
    import signal
    import sys
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before the prctl
            os._exit(1)


async def off_loop(app: FastAPI, fn, raw: bytes, *args):
    """``fn(raw, *args)`` off the event loop: in a thread for a small body, in a parser process (spawned once
    per API process, ``settings.parser_processes``) for a large one. ``fn`` is a module-level function whose
    result is small or made of numpy arrays (cheap to pickle); its ApiError reaches the caller."""
    if len(raw) <= OFF_PROCESS_ABOVE:
        return await run_in_threadpool(fn, raw, *args)
    pool = getattr(app.state, "parser_pool", None)
    if pool is None:
        pool = app.state.parser_pool = ProcessPoolExecutor(app.state.settings.parser_processes,
                                                           mp_context=get_context("spawn"),
                                                           initializer=die_with_parent)
    return await asyncio.get_running_loop().run_in_executor(pool, fn, raw, *args)


async def read_json(request: Request, cap: int, schema, **kw):
    """A capped JSON body (413 above ``cap`` bytes) decoded and validated off the event loop (``parse_json``),
    so that large bodies never stall other requests."""
    return await off_loop(request.app, _parse, await read_capped(request, cap), schema, kw)


def _parse(raw: bytes, schema, kw: dict):
    return parse_json(raw, schema, **kw)


def parse_json(raw: bytes, schema, empty: bytes = b"null", object_msg: Optional[str] = None):
    """Decode a JSON body and validate it with a pydantic ``schema``; every failure is a 422 naming the field.
    ``object_msg``: refuse anything but a JSON object with that message."""
    too_deep = ApiError(422, "body is nested too deeply", [{"loc": ["body"], "msg": "nested too deeply"}])
    try:
        body = json.loads(raw or empty)
    except RecursionError:
        raise too_deep from None
    except ValueError as e:
        raise ApiError(422, f"body is not valid JSON: {e}", [{"loc": ["body"], "msg": str(e)}])
    if object_msg and not isinstance(body, dict):
        raise ApiError(422, object_msg, [{"loc": ["body"], "msg": "not an object"}])
    if b"\\u0000" in raw:  # (a NUL can only come as this escape: JSON refuses raw control characters)
        where = _nul_at(body)
        if where is not None:
            raise ApiError(422, f"{'.'.join(map(str, where)) or 'body'}: NUL (0x00) characters are not allowed",
                           [{"loc": where or ["body"], "msg": "NUL (0x00) characters are not allowed"}])
    try:  # strict: a JSON value of the wrong type is refused as the document says (no "3" or true for 3);
        return schema.model_validate(body, strict=True)  # the schemas admit 3.0 for 3 (schemas.job.Int)
    except RecursionError:
        raise too_deep from None
    except ValidationError as e:
        errs = pydantic_errors(e)
        raise ApiError(422, "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in errs), errs)


def _nul_at(value, loc=()):
    """The location of the first string (or object key) holding a NUL character, or None."""
    stack = [(value, list(loc))]
    while stack:
        v, at = stack.pop()
        if isinstance(v, str):
            if "\x00" in v:
                return at
        elif isinstance(v, dict):
            for k, x in v.items():
                if "\x00" in k:
                    return at + [k]
                stack.append((x, at + [k]))
        elif isinstance(v, list):
            stack.extend((x, at + [i]) for i, x in enumerate(v))
    return None
