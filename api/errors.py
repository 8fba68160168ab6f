"""Errors as JSON (RFC 7807-style): {"type", "title", "status", "detail", "errors": [{"loc", "msg"}]}."""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException


class ApiError(Exception):
    def __init__(self, status: int, detail: str, errors: list | None = None, headers: dict | None = None):
        self.status, self.detail, self.errors, self.headers = status, detail, errors, headers


def unprocessable(field, msg: str) -> ApiError:
    loc = list(field) if isinstance(field, (list, tuple)) else [p for p in str(field).split(".")]
    return ApiError(422, f"{'.'.join(map(str, loc))}: {msg}", [{"loc": loc, "msg": msg}])


def pydantic_errors(exc: ValidationError | RequestValidationError, prefix=()) -> list:
    out = []
    for e in exc.errors():
        loc = list(prefix) + [p for p in e.get("loc", ()) if p not in ("body",)]
        out.append({"loc": loc, "msg": e.get("msg", "invalid"), "type": e.get("type")})
    return out


TITLES = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
          409: "Conflict", 413: "Payload Too Large", 422: "Unprocessable Entity", 500: "Internal Server Error",
          503: "Service Unavailable", 504: "Gateway Timeout"}


def problem(status: int, detail: str, errors: list | None = None, headers=None) -> JSONResponse:
    body = {"type": "about:blank", "title": TITLES.get(status, "Error"), "status": status, "detail": detail}
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, headers=headers, media_type="application/problem+json")


def install(app: FastAPI):
    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError):
        return problem(exc.status, exc.detail, exc.errors, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _rv(_: Request, exc: RequestValidationError):
        errs = pydantic_errors(exc)
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errs) or "invalid request"
        return problem(422, detail, errs)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        return problem(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _any(_: Request, exc: Exception):
        import logging
        logging.getLogger("metashrink.api").exception("unhandled error")
        return problem(500, f"internal error: {type(exc).__name__}")
