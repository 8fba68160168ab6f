"""The FastAPI application: ``create_app(settings)`` wires the database, the artifact store, a Celery app (used
only to send job ids and adapt requests) and the routers, one per resource under ``api/routes``. The reconciler
(``api.dispatch.Reconciler``) runs as a background thread in this process (``settings.reconciler``)."""

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from schemas import JobConfig
from schemas.api import AdaptRequest, BatchPredictRequest, EvaluationRequest, KeyCreate, PredictRequest
from store.artifacts import make_store
from store.db import Database
from store.settings import Settings

from . import errors
from .dispatch import Reconciler
from .errors import install_openapi
from .metrics import install as install_metrics
from .routes import adapters, checkpoints, datasets, evaluations, health, jobs, keys, lifecycle, live, models, usage

ROUTERS = (health, jobs, checkpoints, datasets, models, evaluations, adapters, lifecycle, keys, live, usage)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        rec = None
        if settings.reconciler:
            rec = Reconciler(app)
            rec.start()
        yield
        if rec is not None:
            rec.stop.set()
        pool = getattr(app.state, "parser_pool", None)
        if pool is not None:
            pool.shutdown(cancel_futures=True)

    app = FastAPIOffline(title="Metashrink", version="0.1.0", lifespan=lifespan,  # /docs, /redoc without a CDN
                         description="Modular meta-learning with shrinkage: meta-training jobs, sigma^2 module "
                                     "maps, checkpoints and few-shot adaptation.")
    from worker.celery_app import make_celery
    from worker.redis_util import redis_client

    app.state.settings = settings
    app.state.db = Database(settings.database_url)
    app.state.store = make_store(settings)
    app.state.celery = make_celery(settings)
    app.state.redis = redis_client(settings.broker(), retry=False)
    errors.install(app)
    for r in ROUTERS:
        app.include_router(r.router)
    install_metrics(app)
    install_openapi(app, (JobConfig, AdaptRequest, EvaluationRequest, PredictRequest, BatchPredictRequest, KeyCreate),
                    _errors_for)
    _document_caps(app, settings)
    return app


def _document_caps(app: FastAPI, settings: Settings) -> None:
    """This server's caps (its settings) in its document, so that a request the document admits is never refused
    for a number the document does not state: rows of adapt and predict, adapt and evaluation steps, adapters of
    a batch predict (its total rows, a sum over items, JSON Schema cannot state: that 422 is a rule of its own)."""
    build = app.openapi

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        doc = build()
        comps = doc["components"]["schemas"]
        for name, fields in (("SupportSet", ("x", "y")), ("QuerySet", ("x",)), ("PredictRequest", ("x",))):
            for f in fields:
                comps[name]["properties"][f]["maxItems"] = settings.adapt_max_rows
        comps["BatchPredictItem"]["properties"]["x"]["maxItems"] = settings.adapt_max_rows
        comps["BatchPredictRequest"]["properties"]["items"]["maxItems"] = settings.adapt_batch_max_items
        comps["AdaptRequest"]["properties"]["steps"]["maximum"] = settings.adapt_max_steps
        comps["EvaluationRequest"]["properties"]["steps"]["items"]["maximum"] = settings.adapt_max_steps
        return doc

    app.openapi = openapi


BODY_ROUTES = {("/v1/jobs", "post"), ("/v1/models/{model_id}/adapt", "post"), ("/v1/datasets", "post"),
               ("/v1/models/{model_id}/evaluations", "post"), ("/v1/adapters/{adapter_id}/predict", "post"),
               ("/v1/adapters/predict", "post"), ("/v1/admin/keys", "post")}
# deletes that a dependent resource can refuse (409; the rules in store/lifecycle.py)
CONFLICT_DELETES = {"/v1/jobs/{job_id}", "/v1/models/{model_id}", "/v1/checkpoints/{ckpt_id}",
                    "/v1/datasets/{dataset_id}"}
ADAPT_ROUTES = {("/v1/models/{model_id}/adapt", "post"), ("/v1/adapters/{adapter_id}/predict", "post"),
                ("/v1/adapters/predict", "post")}
# routes that name other resources in their body: 404 when one is not the caller's
BODY_REFERENCES = {("/v1/adapters/predict", "post")}


def _errors_for(path: str, method: str, op: dict) -> set:
    """The error statuses an operation can answer (documented as problem+json in the OpenAPI document)."""
    codes = set()
    if path.startswith("/v1/"):
        codes.add(401)
        if "{" in path or (path, method) in BODY_REFERENCES:
            codes.add(404)
        if op.get("parameters") or op.get("requestBody"):
            codes.add(422)
    if (path, method) in BODY_ROUTES:
        codes |= {413, 422}
    if (path, method) == ("/v1/jobs", "post"):
        codes |= {429, 507}  # 429: METASHRINK_TENANT_MAX_ACTIVE_JOBS; 507: METASHRINK_TENANT_QUOTA_BYTES
    if (path, method) == ("/v1/datasets", "post"):
        codes.add(503)  # METASHRINK_UPLOAD_CONCURRENCY uploads in progress at this API process
    if (path, method) == ("/v1/models/{model_id}/adapt", "post"):
        codes.add(507)  # save_adapter over the tenant's quota
    if (path, method) in ADAPT_ROUTES:
        codes |= {410, 429, 503, 504}  # 410: the model's or adapter's file is gone from the artifact store
    if path.endswith("/retry") or (method == "delete" and path in CONFLICT_DELETES):
        codes.add(409)
    if path.startswith("/v1/admin/"):
        codes.add(403)
    if path.endswith("/file"):
        codes.add(410)
    return codes
