"""Request bodies read by the routes themselves: capped (413 before reading past the cap), decoded and
validated off the event loop, every failure a 422 naming the field."""

import json
from typing import Optional

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from .errors import ApiError, pydantic_errors


async def read_capped(request: Request, cap: int) -> bytes:
    """The request body, refusing (413) one above ``cap`` bytes without reading all of it."""
    cl = request.headers.get("content-length")
    if cl and cl.isdigit() and int(cl) > cap:
        raise ApiError(413, f"request body of {cl} bytes is above the cap of {cap} bytes",
                       [{"loc": ["body"], "msg": f"above the cap of {cap} bytes"}])
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > cap:
            raise ApiError(413, f"request body is above the cap of {cap} bytes",
                           [{"loc": ["body"], "msg": f"above the cap of {cap} bytes"}])
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, cap: int, schema, **kw):
    """A capped JSON body (413 above ``cap`` bytes) decoded and validated off the event loop (``parse_json``),
    so that large bodies never stall other requests."""
    return await run_in_threadpool(parse_json, await read_capped(request, cap), schema, **kw)


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
    try:
        return schema.model_validate(body)
    except RecursionError:
        raise too_deep from None
    except ValidationError as e:
        errs = pydantic_errors(e)
        raise ApiError(422, "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in errs), errs)
