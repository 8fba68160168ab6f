"""Errors as JSON (RFC 7807-style): {"type", "title", "status", "detail", "errors": [{"loc", "msg"}]}."""
from __future__ import annotations

import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException


class ApiError(Exception):
    def __init__(self, status: int, detail: str, errors: list | None = None, headers: dict | None = None):
        self.status, self.detail, self.errors, self.headers = status, detail, errors, headers

    def __reduce__(self):  # raised in a parser process (api.bodies.off_loop), re-raised in the API process
        return ApiError, (self.status, self.detail, self.errors, self.headers)


def unprocessable(field, msg: str) -> ApiError:
    loc = list(field) if isinstance(field, (list, tuple)) else [p for p in str(field).split(".")]
    return ApiError(422, f"{'.'.join(map(str, loc))}: {msg}", [{"loc": loc, "msg": msg}])


FIELD_IN_MESSAGE = re.compile(r"\b([a-z_]+(?:\.[a-z_0-9]+)+)\b")


def pydantic_errors(exc: ValidationError | RequestValidationError, prefix=()) -> list:
    """Pydantic's errors as ``{"loc", "msg", "type"}``. A cross-field check of a whole body has no location of
    its own: its ``loc`` is the first dotted field its message names (``inner.optimizer``), else ``["body"]``."""
    out = []
    for e in exc.errors():
        loc = list(prefix) + [p for p in e.get("loc", ()) if p not in ("body",)]
        msg = e.get("msg", "invalid")
        if not loc:
            named = FIELD_IN_MESSAGE.search(msg)
            loc = named.group(1).split(".") if named else ["body"]
        out.append({"loc": loc, "msg": msg, "type": e.get("type")})
    return out


TITLES = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
          409: "Conflict", 410: "Gone", 413: "Payload Too Large", 422: "Unprocessable Entity", 429: "Too Many Requests",
          500: "Internal Server Error", 503: "Service Unavailable", 504: "Gateway Timeout",
          507: "Insufficient Storage"}


def problem(status: int, detail: str, errors: list | None = None, headers=None) -> JSONResponse:
    body = {"type": "about:blank", "title": TITLES.get(status, "Error"), "status": status, "detail": detail}
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, headers=headers, media_type="application/problem+json")


def allowed_methods(request: Request, starlette_allow: str | None) -> str:
    """The ``Allow`` header of a 405: Starlette's (the methods of the first route matching the path) and those
    of every operation the OpenAPI document has for a path template matching the request's path. A concrete
    path of the document (``/v1/adapters/predict``) is matched before the templates it also fits
    (``/v1/adapters/{adapter_id}``), as OpenAPI matches them: its own methods alone."""
    import re
    methods = {m.strip().upper() for m in (starlette_allow or "").split(",") if m.strip()}
    path = request.scope["path"][len(request.scope.get("root_path", "")):] or "/"
    paths = request.app.openapi().get("paths", {})
    if path in paths:
        methods = {m.upper() for m in paths[path] if m in ("get", "put", "post", "delete", "patch", "options", "head")}
        paths = {}
    for template, item in paths.items():
        pattern = "".join("[^/]+" if part.startswith("{") else re.escape(part)
                          for part in re.split(r"(\{[^}/]+\})", template))
        if re.fullmatch(pattern, path):
            methods |= {m.upper() for m in item if m in ("get", "put", "post", "delete", "patch", "options", "head")}
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods))


NUL_MSG = "NUL (0x00) characters are not allowed"


class RefuseNul:
    """PostgreSQL stores no NUL (0x00) character, so the API takes none (the document says so: every free-form
    string of a parameter or JSON body has the pattern NO_NUL): a path or query with one is a 422 here, before
    routing, on either backend; JSON bodies are checked in ``api.bodies.parse_json``."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            where = "path" if "\x00" in scope.get("path", "") else \
                "query" if b"%00" in scope.get("query_string", b"") else None
            if where:
                await problem(422, f"{where}: {NUL_MSG}", [{"loc": [where], "msg": NUL_MSG}])(scope, receive, send)
                return
        await self.app(scope, receive, send)


def install(app: FastAPI):
    app.add_middleware(RefuseNul)

    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError):
        return problem(exc.status, exc.detail, exc.errors, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _rv(_: Request, exc: RequestValidationError):
        errs = pydantic_errors(exc)
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errs) or "invalid request"
        return problem(422, detail, errs)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # Starlette names only the first route matching the path (POST of POST+GET)
            headers = {**(headers or {}), "Allow": allowed_methods(request, (headers or {}).get("Allow"))}
        return problem(exc.status_code, str(exc.detail), headers=headers)

    @app.exception_handler(DataError)
    async def _data(_: Request, exc: DataError):  # a value the database cannot hold (a NUL in a multipart field)
        msg = str(getattr(exc, "orig", exc)).splitlines()[0]
        return problem(422, f"a value the database cannot store: {msg}", [{"loc": ["body"], "msg": msg}])

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


def json_body(model, form: dict | None = None, required: bool = True) -> dict:
    """``openapi_extra`` for a route that reads its JSON body itself (capped, parsed off the event loop): the
    model's schema as the documented request body (its definitions go to components, see ``install_openapi``).
    ``form``: the schema of a ``multipart/form-data`` alternative the route also reads (image files);
    ``required=False``: no body means every field's default."""
    content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}
    if form is not None:
        content["multipart/form-data"] = {"schema": form}
    return {"requestBody": {"required": required, "content": content}}


NO_NUL = "^[^\\u0000]*$"


def no_nul_in_requests(doc: dict) -> None:
    """Every free-form string of the parameters and JSON request bodies (the components they reference
    included) gets the pattern NO_NUL: what the API accepts (RefuseNul, ``api.bodies.parse_json``). Strings with
    a pattern, enum, const or format of their own and multipart fields are left as they are."""
    comps, seen = doc.get("components", {}).get("schemas", {}), set()

    def walk(node):
        if isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/components/schemas/") and ref not in seen:
                seen.add(ref)
                walk(comps.get(ref.rsplit("/", 1)[1]))
            if node.get("type") == "string" and not {"pattern", "enum", "const", "format"} & node.keys():
                node["pattern"] = NO_NUL
            for v in node.values():
                walk(v)

    for item in doc.get("paths", {}).values():
        for op in item.values():
            walk([p.get("schema") for p in op.get("parameters", [])])
            walk((op.get("requestBody") or {}).get("content", {}).get("application/json"))


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
        no_nul_in_requests(doc)
        app.openapi_schema = doc
        return doc

    app.openapi = openapi
