"""Compile once per job shape through the service (issue 14 item 3): the train worker keeps torch.compile's caches
in its data directory, so a second job of the same shape loads its compiled code, and every job reports its time
to the first step and its compile decision (``startup``). Tiny models; no timing is asserted."""
from __future__ import annotations

import pytest

from .conftest import small_config

pytestmark = pytest.mark.slow


def _tiny(steps, compile, hidden=5, seed=0):
    cfg = small_config(steps=steps, seed=seed)
    cfg["algorithm"] = {"name": "maml"}
    cfg["model"] = {"arch": "mlp", "hidden": [hidden]}
    cfg["inner"] = {"lr": 0.01, "steps": 1}
    cfg["outer"] = {**cfg["outer"], "meta_batch": 2}
    cfg["execution"] = {"vectorize": "loop", "device": "cpu", "compile": compile}
    return cfg


def test_second_job_of_a_shape_loads_its_compiled_code(service):
    c, h = service.client, service.h()
    jobs = [service.wait(service.submit(_tiny(3, True, seed=s)), timeout=600) for s in (0, 1)]
    for j in jobs:
        assert j["status"] == "succeeded", j
        st = j["startup"]
        assert st["attempt"] == 1 and st["resumed_from_step"] is None and st["host"]
        assert st["time_to_first_step_s"] > 0 and st["first_step_s"] > 0 and st["build_s"] >= 0
        assert st["compile"]["setting"] is True and st["compile"]["decision"] == "compiled"
        assert st["compile"]["compile_s"] > 0 and st["compile"]["at_step"] == 0
    first, second = (j["startup"]["compile"] for j in jobs)
    assert first["cache_hit"] is False and first["cache"]["fxgraph_miss"] >= 1
    assert second["cache_hit"] is True and second["cache"]["fxgraph_hit"] >= 1
    assert second["cache"]["fxgraph_miss"] == 0 and second["cache"]["aot_miss"] == 0
    cache = service.settings.compile_cache_path()
    assert cache.parent == service.settings.data_dir.resolve()
    assert (cache / "fxgraph").is_dir() and list((cache / "metashrink-compile-records").glob("*.json"))
    listed = c.get("/v1/jobs", headers=h).json()["items"]
    assert next(x for x in listed if x["id"] == jobs[1]["id"])["startup"] == jobs[1]["startup"]


def test_auto_compile_is_reported_and_a_short_job_stays_eager(service):
    j = service.wait(service.submit(_tiny(8, "auto", seed=2)), timeout=300)
    assert j["status"] == "succeeded", j
    comp = j["startup"]["compile"]
    assert comp["setting"] == "auto" and comp["decision"] == "eager" and "too short" in comp["reason"]
    assert comp["at_step"] == 4 and comp["eager_step_s"] > 0
    assert j["startup"]["time_to_first_step_s"] > 0
