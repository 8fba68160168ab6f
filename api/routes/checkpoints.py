"""A job's checkpoints (step, sha256, validation score, which is best) and their files."""

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from sqlalchemy import select

from schemas.api import CheckpointList
from store.models import Checkpoint, Job

from ..deps import Session, Tenant, artifact_file, own_job
from ..errors import ApiError

router = APIRouter(tags=["jobs"])


@router.get("/v1/jobs/{job_id}/checkpoints", response_model=CheckpointList)
def job_checkpoints(job_id: str, s: Session, t: Tenant):
    """Checkpoints in step order; ``val_score`` is the validation metric at that step (run.validate_every)
    and ``best`` marks the checkpoint with the best one (the meta-model a validated job publishes)."""
    j = own_job(s, t, job_id)
    rows = s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)).all()
    return {"items": [{"id": c.id, "step": c.step, "sha256": c.sha256, "bytes": c.bytes, "val_score": c.val_score,
                       "best": c.id == j.best_checkpoint_id} for c in rows],
            "best_checkpoint_id": j.best_checkpoint_id}


@router.get("/v1/checkpoints/{ckpt_id}/file", response_class=FileResponse)
def checkpoint_file(ckpt_id: str, request: Request, s: Session, t: Tenant):
    c = s.get(Checkpoint, ckpt_id)
    if c is None or s.get(Job, c.job_id).tenant != t:
        raise ApiError(404, f"checkpoint {ckpt_id} not found")
    return artifact_file(request, c.uri, f"checkpoint {ckpt_id}", f"{ckpt_id}.safetensors", c.sha256)
