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

    def __reduce__(self):  # raised in a parser process (api.bodies.off_loop), re-raised in the API process
        return ApiError, (self.status, self.detail, self.errors, self.headers)


def unprocessable(field, msg: str) -> ApiError:
    loc = list(field) if isinstance(field, (list, tuple)) else [p for p in str(field).split(".")]
    return ApiError(422, f"{'.'.join(map(str, loc))}: {msg}", [{"loc": loc, "msg": msg}])


def pydantic_errors(exc: ValidationError | RequestValidationError, prefix=()) -> list:
    out = []
    for e in exc.errors():
        loc = list(prefix) + [p for p in e.get("loc", ()) if p not in ("body",)]
        out.append({"loc": loc, "msg": e.get("msg", "invalid"), "type": e.get("type")})
    return out


TITLES = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
          409: "Conflict", 410: "Gone", 413: "Payload Too Large", 422: "Unprocessable Entity", 429: "Too Many Requests",
          500: "Internal Server Error", 503: "Service Unavailable", 504: "Gateway Timeout"}


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


# --------------------------------------------------------------------------- the OpenAPI document as the contract
PROBLEM_SCHEMA = {
    "type": "object", "title": "Problem", "required": ["type", "title", "status", "detail"],
    "properties": {"type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
                   "detail": {"type": "string"},
                   "errors": {"type": "array", "items": {
                       "type": "object", "required": ["loc", "msg"],
                       "properties": {"loc": {"type": "array", "items": {"anyOf": [{"type": "string"},
                                                                                 {"type": "integer"}]}},
                                      "msg": {"type": "string"}}}}}}


def json_body(model, form: dict | None = None) -> dict:
    """``openapi_extra`` for a route that reads its JSON body itself (capped, parsed off the event loop): the
    model's schema as the documented request body (its definitions go to components, see ``install_openapi``).
    ``form``: the schema of a ``multipart/form-data`` alternative the route also reads (image files)."""
    content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}
    if form is not None:
        content["multipart/form-data"] = {"schema": form}
    return {"requestBody": {"required": True, "content": content}}


def install_openapi(app: FastAPI, body_models, errors_for) -> None:
    """Post-process FastAPI's document: the request-body models (and their definitions) in components, and every
    operation's error responses (``errors_for(path, method, op) -> status codes``) as ``application/problem+json``
    with the Problem schema, replacing FastAPI's default 422 (which this API never sends)."""
    from fastapi.openapi.utils import get_openapi

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        comps = doc.setdefault("components", {}).setdefault("schemas", {})
        for model in body_models:
            js = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, d in js.pop("$defs", {}).items():
                comps.setdefault(name, d)
            comps[model.__name__] = js
        comps["Problem"] = PROBLEM_SCHEMA
        content = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
        for path, item in doc["paths"].items():
            for method, op in item.items():
                responses = op.setdefault("responses", {})
                for code in sorted(set(errors_for(path, method, op)) | ({422} if "422" in responses else set())):
                    headers = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}} \
                        if code in (429, 503) else None
                    # a route's own description of the status stays (FastAPI's default 422 is replaced)
                    desc = (responses.get(str(code)) or {}).get("description")
                    if not desc or desc == "Validation Error":
                        desc = TITLES[code]
                    responses[str(code)] = {"description": desc, "content": content,
                                            **({"headers": headers} if headers else {})}
        for unused in ("HTTPValidationError", "ValidationError"):
            comps.pop(unused, None)
        app.openapi_schema = doc
        return doc

    app.openapi = openapi
