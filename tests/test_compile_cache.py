"""torch.compile once per job shape (issue 14 item 3): the on-disk compile cache, execution.compile "auto" and its
decision across resumes. Tiny models (a compile of a few seconds); no timing is asserted: the cache is checked by
Inductor's and AOTAutograd's hit/miss counters, "auto" by its decisions with the measured timings forced where a
test needs one outcome."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import core.trainer as trainer_mod
from core import MetaTrainer
from core.compile_cache import CompileRecords, cache_counters, counters_delta, records_dir, use_cache_dir
from schemas import JobConfig


def tiny(steps=20, alg="maml", hidden=6, vectorize="loop", compile="auto", **over):
    body = {"algorithm": {"name": alg}, "model": {"arch": "mlp", "hidden": [hidden]},
            "modules": {"partition": "per_tensor"}, "tasks": {"family": "sinusoid", "shots": 4, "query": 4},
            "inner": {"lr": 0.01, "steps": 1}, "outer": {"meta_batch": 2, "steps": steps},
            "execution": {"vectorize": vectorize, "compile": compile, "device": "cpu"}, "seed": 2}
    for k, v in over.items():
        body[k] = {**body.get(k, {}), **v} if isinstance(v, dict) else v
    return JobConfig.model_validate(body).model_dump()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh compile cache for this test only, and a clean Dynamo state (new closures per trainer)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cc"))
    use_cache_dir(tmp_path / "cc")
    torch._dynamo.reset()
    yield tmp_path / "cc"
    torch._dynamo.reset()


@pytest.fixture
def cheap_compiles(monkeypatch):
    """"auto" expects a compile of a few milliseconds, so that a 110-step job of a tiny model is long enough."""
    monkeypatch.setattr(trainer_mod, "COLD_COMPILE_S", 1e-4)
    monkeypatch.setattr(trainer_mod, "WARM_COMPILE_S", 1e-4)


class SlowCompiled(MetaTrainer):
    """A trainer whose compiled step always measures slower than its eager one."""

    def _timed(self, fn, *args):
        out, dt = super()._timed(fn, *args)
        return out, dt + (10.0 if args and args[-1] is True else 0.0)


class FastCompiled(MetaTrainer):
    """A trainer whose eager step always measures slower than its compiled one."""

    def _timed(self, fn, *args):
        out, dt = super()._timed(fn, *args)
        return out, dt + (10.0 if args and args[-1] is False else 0.0)


def params(t):
    return {**{f"phi.{k}": v for k, v in t.meta["phi"].items()}, "log_sigma2": t.meta["log_sigma2"]}


def assert_same(a, b):
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k


def test_compile_switch_schema():
    for v in (True, False, "auto"):
        assert JobConfig.model_validate(tiny(compile=v)).execution.compile == v
    assert JobConfig.model_validate({"algorithm": {"name": "maml"}, "model": {"arch": "mlp"},
                                     "tasks": {"family": "sinusoid"}}).execution.compile == "auto"
    for bad in (1, 0, "true", "yes", None):
        with pytest.raises(ValidationError, match="true, false or"):
            JobConfig.model_validate(tiny(compile=bad))


@pytest.mark.parametrize("vectorize", ["loop", "vmap"])
def test_second_trainer_of_a_shape_loads_from_the_cache(cache, vectorize):
    """A second trainer of the same shape (after a Dynamo reset, as a new job or a restarted worker) finds its
    compiled code in the cache; a different shape (a wider hidden layer) compiles afresh."""
    runs = []
    for hidden in (6, 6, 7):
        torch._dynamo.reset()
        t = MetaTrainer(tiny(hidden=hidden, vectorize=vectorize, compile=True))
        before = cache_counters()
        t.run(steps=2)
        runs.append((counters_delta(before, cache_counters()), t.compile_info))
    (cold, c0), (warm, c1), (other, c2) = runs
    assert cold["fxgraph_miss"] >= 1 and cold["aot_miss"] >= 1 and c0["cache_hit"] is False
    assert warm["fxgraph_hit"] >= 1 and warm["fxgraph_miss"] == 0 and warm["aot_miss"] == 0 and c1["cache_hit"]
    assert other["fxgraph_miss"] >= 1 and c2["cache_hit"] is False
    assert (cache / "fxgraph").is_dir() and (cache / "aotautograd").is_dir()
    assert records_dir() == cache / "metashrink-compile-records"
    recs = list(records_dir().glob("*.json"))
    assert len(recs) == 2  # one per shape: the warm compile updated the first shape's record
    key = MetaTrainer(tiny(hidden=6, vectorize=vectorize)).compile_key()
    rec = CompileRecords().get(key)
    assert rec["cold_compile_s"] > 0 and rec["warm_compile_s"] > 0 and rec["torch"] == torch.__version__


def test_compile_key_covers_shape_config_and_threads():
    base = MetaTrainer(tiny()).compile_key()
    assert MetaTrainer(tiny(seed=9, steps=500)).compile_key() == base  # seed and length do not change the graph
    assert MetaTrainer(tiny(hidden=7)).compile_key() != base
    assert MetaTrainer(tiny(execution={"dtype": "float64"})).compile_key() != base
    assert MetaTrainer(tiny(inner={"lr": 0.02})).compile_key() != base
    assert MetaTrainer(tiny(vectorize="vmap")).compile_key() != base
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert MetaTrainer(tiny()).compile_key() != base
    finally:
        torch.set_num_threads(threads)


def test_auto_short_job_stays_eager_and_matches_an_uncompiled_job(cache):
    auto, eager = MetaTrainer(tiny(steps=30)), MetaTrainer(tiny(steps=30, compile=False))
    before = cache_counters()
    auto.run()
    eager.run()
    assert counters_delta(before, cache_counters()) == {k: 0 for k in before}  # nothing compiled
    info = auto.compile_info
    assert info["decision"] == "eager" and "too short" in info["reason"] and info["at_step"] == 4
    assert_same(auto, eager)
    assert auto.state_dict()[1]["compiled"] is False


def test_auto_compiles_a_long_job_and_records_the_measurement(cache, cheap_compiles):
    t = MetaTrainer(tiny(steps=110))
    t.run(steps=6)
    info = t.compile_info
    assert info["at_step"] == 4 and info["decision"] in ("compiled", "eager") and info["compile_s"] > 0
    assert info["cache_hit"] is False and info["record"] is False
    assert t.compiled == (info["decision"] == "compiled")
    rec = CompileRecords().get(t.compile_key())
    assert rec["faster"] == t.compiled and rec["cold_compile_s"] > 0 and rec["eager_step_s"] > 0
    # the next job of this shape reads the record: it expects a warm compile and loads the code from the cache
    torch._dynamo.reset()
    t2 = MetaTrainer(tiny(steps=110))
    t2.run(steps=6)
    assert t2.compile_info["record"] is True
    if rec["faster"]:
        assert t2.compile_info["expected_compile_s"] < 1e-3  # WARM_COMPILE_S (patched): no warm one measured yet
        assert t2.compile_info.get("cache_hit") in (True, None)  # None: the measured saving did not repay it


def test_auto_keeps_eager_when_compiled_is_slower_and_numbers_stay_eager(cache, cheap_compiles, monkeypatch):
    """The compile trial runs on the decision step's batch without touching the trainer: when the compiled
    step loses, the job is bit for bit the uncompiled job, Hessian-vector products included (sigma-iMAML: the
    compiled path switches them to reverse mode)."""
    cfg = tiny(steps=110, alg="sigma_imaml", algorithm={"name": "sigma_imaml", "cg_steps": 2})
    slow, eager = SlowCompiled(cfg), MetaTrainer({**cfg, "execution": {**cfg["execution"], "compile": False}})
    slow.run(steps=7)
    eager.run(steps=7)
    assert slow.compile_info["decision"] == "eager" and "not faster" in slow.compile_info["reason"]
    assert slow.compiled is False and not any(k[0] == "fused" or k[1] is True for k in slow._fns)
    assert slow.algorithm.hvp == eager.algorithm.hvp == "forward"
    assert_same(slow, eager)
    assert CompileRecords().get(slow.compile_key())["faster"] is False
    # a record that says slower: the next job does not compile at all
    torch._dynamo.reset()
    before = cache_counters()
    again = MetaTrainer(cfg)
    again.run(steps=6)
    assert again.compile_info["decision"] == "eager" and "slower" in again.compile_info["reason"]
    assert counters_delta(before, cache_counters()) == {k: 0 for k in before}
    # ... until the verdict is RETRY_SLOWER_AFTER_S old: then a long job measures again (from the cache)
    monkeypatch.setattr(trainer_mod, "RETRY_SLOWER_AFTER_S", 0.0)
    torch._dynamo.reset()
    before = cache_counters()
    retried = SlowCompiled(cfg)
    retried.run(steps=6)
    info = retried.compile_info
    assert "measuring again" in info["reason"] and "not faster" in info["reason"] and info["decision"] == "eager"
    assert counters_delta(before, cache_counters())["fxgraph_hit"] >= 1 and info["cache_hit"] is True


@pytest.mark.parametrize("cls", [FastCompiled, SlowCompiled])
def test_auto_decision_survives_resume_bit_for_bit(cache, cheap_compiles, cls):
    """A job resumed from a checkpoint written after the decision takes the same path (compiled: the same
    compiled code, from the cache) and continues bit for bit; one resumed from before the decision decides
    again."""
    cfg = tiny(steps=110, vectorize="vmap")
    full = cls(cfg)
    full.run(steps=3)
    early = full.state_dict()
    full.run(steps=4)
    decided = full.compiled
    assert decided is (cls is FastCompiled)
    tensors, meta = full.state_dict()
    assert meta["compiled"] is decided and "compiled" not in early[1]
    full.run(steps=3)

    torch._dynamo.reset()
    second = cls(cfg)
    second.load_state_dict({k: v.clone() for k, v in tensors.items()}, meta)
    assert second.compiled is decided and second.compile_info["decision"] == ("compiled" if decided else "eager")
    second.run(steps=3)
    assert_same(full, second)
    if decided:
        assert second.compile_info["cache_hit"] is True

    third = cls(cfg)
    third.load_state_dict({k: v.clone() for k, v in early[0].items()}, early[1])
    assert third.compile_info["decision"] == "pending"


def test_compiled_loop_recompiles_a_new_shape_on_the_calling_thread_only(cache):
    """The compiled per-task loop runs tasks 2..n on the task threads under Dynamo's "fail_on_recompile" stance
    (concurrent compiles are not thread-safe): within a batch nothing recompiles, and a batch of a new shape (a
    guard failure mid-job) is run again with its first task compiling alone; its numbers equal the eager loop's."""
    cfg = tiny(compile=True, outer={"meta_batch": 4}, execution={"dtype": "float64"})
    t, eager = MetaTrainer(cfg, task_threads=2), MetaTrainer({**cfg, "execution": {**cfg["execution"],
                                                                                    "compile": False}})
    flat = torch.utils._pytree.tree_leaves
    g = torch.Generator().manual_seed(5)
    for query in (4, 4, 7):
        batch = t._with_noise(t.family.sample(4, g).to(t.device, t.dtype))
        if query != 4:  # fewer query rows: a new shape for the compiled update's guards
            batch = (*batch[:2], batch[2][:, :3], batch[3][:, :3], *batch[4:])
        compiled = t.task_updates(batch, "loop")
        for a, b in zip(flat(compiled), flat(eager.task_updates(batch, "loop"))):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    assert t.recompiles == 1  # the third batch only
