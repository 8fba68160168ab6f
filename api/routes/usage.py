"""``GET /v1/usage``: what a tenant stores and runs, beside the limits its requests are admitted against."""

from fastapi import APIRouter, Request
from sqlalchemy import func, select

from schemas.api import UsageOut
from store.datasets import usage_by_kind
from store.jobs import ACTIVE
from store.models import Job

from ..deps import Session, Tenant

router = APIRouter(prefix="/v1/usage", tags=["usage"])


@router.get("", response_model=UsageOut)
def usage(request: Request, s: Session, t: Tenant):
    st = request.app.state.settings
    active = s.scalar(select(func.count()).select_from(Job).where(Job.tenant == t, Job.status.in_(ACTIVE)))
    limits = {k: getattr(st, k) for k in ("tenant_max_active_jobs", "job_max_memory_bytes", "job_max_flops",
                                          "job_max_checkpoint_bytes", "keep_checkpoints", "adapt_max_flops",
                                          "adapt_max_steps", "adapt_max_rows", "adapt_tenant_concurrency")}
    return {"bytes": usage_by_kind(s, t), "active_jobs": int(active),
            "limits": {**limits, "tenant_quota_bytes": st.tenant_quota_bytes or None}}
