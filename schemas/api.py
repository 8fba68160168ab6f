"""Request/response schemas of the HTTP API (the job config itself is schemas.job.JobConfig)."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, WithJsonSchema

from .types import Int, _json_integer  # request integers: JSON Schema's (3.0 is one), validated strictly

# timestamps are stored as naive UTC (SQLite keeps no zone); answered as RFC 3339 with the offset
UtcDatetime = Annotated[datetime, PlainSerializer(
    lambda d: (d if d.tzinfo else d.replace(tzinfo=timezone.utc)).isoformat(), return_type=str,
    when_used="json"), WithJsonSchema({"type": "string", "format": "date-time"})]

class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(BaseModel):
    message: str


class Progress(BaseModel):
    step: int
    total: int


class JobCreated(_Out):
    id: str
    status: str


class CompileReport(_Out):
    setting: Union[bool, Literal["auto"]] = Field(description="the job's execution.compile")
    decision: Literal["pending", "compiled", "eager"] = Field(
        description="the path the meta-steps take: pending until execution.compile \"auto\" has timed its eager "
        "steps")
    reason: Optional[str] = Field(None, description="why (\"auto\": the measured numbers it decided on)")
    at_step: Optional[int] = Field(None, description="the step at which it compiled or decided")
    compile_s: Optional[float] = Field(None, description="seconds of the first compiled call (compiling, or "
                                       "loading from this host's compile cache, plus one step)")
    cache_hit: Optional[bool] = Field(None, description="the compiled code came from the compile cache (no "
                                      "FX graph or AOTAutograd cache miss)")
    eager_step_s: Optional[float] = None
    compiled_step_s: Optional[float] = None


class JobStartup(_Out):
    """The latest attempt's start, written by the worker that runs it."""
    attempt: int
    host: str = Field(description="the worker's host; compile caches are per host")
    resumed_from_step: Optional[int] = None
    build_s: float = Field(description="seconds to build the trainer (and load the checkpoint)")
    time_to_first_step_s: Optional[float] = Field(None, description="seconds from the claim to the first finished "
                                                  "meta-step")
    first_step_s: Optional[float] = Field(None, description="seconds of the first meta-step")
    compile: CompileReport


class JobOut(_Out):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "canceled"]
    progress: Progress
    metrics: dict[str, Optional[float]] = Field(default_factory=dict)
    error: Optional[ErrorDetail] = None
    model_id: Optional[str] = None
    best_checkpoint_id: Optional[str] = Field(None, description="the checkpoint with the best validation score")
    attempts: int = 0
    cancel_requested: bool = False
    startup: Optional[JobStartup] = Field(None, description="time to the first step and the compile decision of "
                                          "the latest attempt (null until a worker has started it)")
    created_at: UtcDatetime
    updated_at: UtcDatetime
    config: Optional[dict[str, Any]] = None


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: Optional[str] = None


class MetricsOut(BaseModel):
    series: dict[str, list[list[Optional[float]]]] = Field(description="name -> [[step, value], ...]")


class ModuleEntry(BaseModel):
    name: str
    n_params: int
    sigma2: Optional[float]
    selected: bool


class SelectionOut(BaseModel):
    """Why the selected modules were selected (Sec. 4.3): ``gap`` is the largest gap between neighbouring
    natural-log sigma^2; with selection 'gap' a strict subset is selected (``separated``) only when it is at
    least ``min_gap``, otherwise every module is task-specific. ``method`` 'none': no learned sigma^2."""
    method: str
    gap: Optional[float] = None
    min_gap: Optional[float] = None
    separated: bool


class ModulesOut(BaseModel):
    step: int
    modules: list[ModuleEntry]
    selection: SelectionOut
    steps: list[int] = Field(default_factory=list, description="every step with a recorded module map")


class CheckpointOut(BaseModel):
    id: str
    step: int
    sha256: str
    bytes: int
    val_score: Optional[float] = Field(None, description="validation metric at this step (run.validate_every)")
    best: bool = Field(False, description="the checkpoint with the best validation score")


class CheckpointList(BaseModel):
    items: list[CheckpointOut]
    best_checkpoint_id: Optional[str] = None


class ImagePreprocessing(_Out):
    """How an image file becomes this model's input, exactly as its training data did (store/preprocessing.py);
    applied to the image files of multipart adapt and predict requests."""
    kind: Literal["image"] = "image"
    source: str = Field(description="the training data: omniglot or dataset (uploaded)")
    color: Literal["L"] = Field("L", description="decoded with Pillow and converted to 8-bit grayscale")
    channels: int = 1
    decode_size: Optional[int] = Field(description="resized to decode_size^2 right after decoding (Pillow: box "
                                       "filter when shrinking, bilinear when enlarging); null: not at this stage")
    invert: bool = Field(description="then 255 - value (dark strokes on a light background become high values)")
    size: Optional[int] = Field(description="then resized to size^2 (area averaging when shrinking, bilinear when "
                                "enlarging, rounded to 8 bits); null: images must already have the training size")
    scale: float = Field(255.0, description="then divided by scale: float32 in [0, 1]")
    input_shape: list[int]
    recorded: bool = Field(description="true: recorded when the model was published; false: derived from the "
                           "config of a model published before preprocessing was recorded")


class ModelOut(_Out):
    id: str
    job_id: str
    kind: str
    input_shape: list[int]
    output_dim: int
    config: dict[str, Any]
    module_map: list[ModuleEntry]
    selected_modules: list[str]
    selection: SelectionOut
    selected_share: float = Field(description="share of the parameters in the selected task-specific modules")
    sha256: str
    bytes: int
    created_at: UtcDatetime
    preprocessing: Optional[ImagePreprocessing] = Field(
        None, description="image models: the input preprocessing, so that image files can be sent as they are "
        "(multipart adapt and predict); null for other models")


class ModelPage(BaseModel):
    items: list[ModelOut]
    next_cursor: Optional[str] = None


def _rows_schema(depth: int = 4) -> dict:
    """Rows of numbers or nested arrays of numbers (a model's input shape, up to ``depth`` levels below the
    rows); the shape a model takes is checked against the model (api/validation.py)."""
    item: dict = {"type": "number"}
    for _ in range(depth):
        item = {"anyOf": [{"type": "number"}, {"type": "array", "minItems": 1, "items": item}]}
    return {"type": "array", "minItems": 1, "items": item}


# validated by numpy (api/validation.py), not item by item by pydantic: large arrays stay fast
Rows = Annotated[list[Any], WithJsonSchema(_rows_schema())]


class SupportSet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    x: Rows
    y: Rows


class QuerySet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    x: Rows


class AdaptRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    support: SupportSet
    query: QuerySet
    steps: Int = Field(100, ge=0)
    modules: Union[Literal["selected", "all"], list[str]] = Field(
        "selected", description="selected (default): the modules the learned sigma^2 selects (modules.selection): "
        "every module, each under its learned prior, unless sigma^2 separated by modules.min_gap, then the ones "
        "above the gap; all modules for algorithms without sigma^2. all: every module. Or a list of module names")
    save_adapter: bool = Field(False, description="store the adapted task-specific tensors; returns adapter_id")


class AdaptOut(BaseModel):
    predictions: list[list[float]]
    adapted_modules: list[str]
    loss_curve: list[float] = Field(description="support loss before the first step and after each step, up to "
                                                "the last finite one")
    diverged_at_step: Optional[int] = Field(
        None, description="set when the support loss stopped being finite at this step: adaptation stopped there "
                          "and the predictions come from the last parameters with a finite loss")
    adapter_id: Optional[str] = None


class EvaluationRequest(BaseModel):
    """A meta-test evaluation: ``n_tasks`` held-out tasks of the model's own family, adapted along ``steps``."""
    model_config = ConfigDict(extra="forbid")
    n_tasks: Int = Field(600, ge=1, le=100_000)
    steps: list[Annotated[int, Field(ge=0), BeforeValidator(_json_integer)]] = Field(default_factory=lambda: [0, 1, 5, 10, 50],
                                                     min_length=1, max_length=64)
    modules: Union[Literal["selected", "all", "each"], list[str]] = Field(
        "selected", description="selected (default): the modules the learned sigma^2 selects (modules.selection): "
        "every module, each under its learned prior, unless sigma^2 separated by modules.min_gap, then the ones "
        "above the gap; all modules for algorithms without sigma^2. all: every module. each: one module at a time. Or a list of module names")
    split: Literal["train", "val", "test"] = "test"
    seed: Int = Field(0, ge=0, le=2**63 - 1)


class EvaluationResult(_Out):
    step: int
    modules: str
    mean: Optional[float] = Field(description="over the tasks whose adaptation stayed finite; null if none did")
    ci95: Optional[float]
    n: Optional[int] = Field(None, description="tasks in the mean")
    diverged: int = Field(0, description="tasks whose adaptation diverged before this step (not in the mean)")


class EvaluationOut(_Out):
    id: str
    model_id: str
    status: Literal["queued", "running", "succeeded", "failed"]
    metric: Optional[str] = None
    results: Optional[list[EvaluationResult]] = None
    progress: dict
    error: Optional[ErrorDetail] = None
    request: dict[str, Any]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    x: Rows


class PredictOut(BaseModel):
    predictions: list[list[float]]


ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class BatchPredictItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter_id: str = Field(pattern=ID_PATTERN, description="an adapter of the caller's (save_adapter)")
    x: Rows


class BatchPredictRequest(BaseModel):
    """Predictions of many stored adapters in one request (of one model or of several): the worker groups the
    items by model and runs one forward for all the adapters of a model whose queries have the same number of
    rows (vmap over the adapters). Items may name the same adapter more than once."""
    model_config = ConfigDict(extra="forbid")
    items: list[BatchPredictItem] = Field(min_length=1)


class BatchPredictItemOut(BaseModel):
    adapter_id: str
    predictions: list[list[float]]


class BatchPredictOut(BaseModel):
    items: list[BatchPredictItemOut] = Field(description="one per request item, in the request's order")


# --------------------------------------------------------------------------- API keys (admin routes)
TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$"  # a tenant names folders in the artifact store


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenant: str = Field(pattern=TENANT_PATTERN, description="letters, digits and _ . @ - (at most 128)")
    admin: bool = Field(False, description="the key may also manage keys (/v1/admin/keys)")


class KeyOut(BaseModel):
    id: str
    tenant: str
    prefix: str = Field(description="the key's first characters, to recognise it; the key itself is never stored")
    admin: bool
    revoked: bool
    created_at: UtcDatetime
    revoked_at: Optional[UtcDatetime] = None


class KeyCreated(KeyOut):
    key: str = Field(description="the API key, shown this once (only its SHA-256 hash is stored)")


class KeyPage(BaseModel):
    items: list[KeyOut]
    next_cursor: Optional[str] = None


class UsageBytes(BaseModel):
    datasets: int
    checkpoints: int
    models: int
    adapters: int
    total: int


class UsageLimits(BaseModel):
    """The deployment's limits a tenant's requests are admitted against (store/settings.py)."""
    tenant_quota_bytes: Optional[int] = Field(description="METASHRINK_TENANT_QUOTA_BYTES; null: unlimited")
    tenant_max_active_jobs: int
    job_max_memory_bytes: int
    job_max_flops: float
    job_max_checkpoint_bytes: int
    keep_checkpoints: int
    adapt_max_flops: float
    adapt_max_steps: int
    adapt_max_rows: int
    adapt_tenant_concurrency: int


class UsageOut(BaseModel):
    bytes: UsageBytes = Field(description="what the tenant's artifacts store, by kind")
    active_jobs: int = Field(description="the tenant's queued and running jobs")
    limits: UsageLimits
