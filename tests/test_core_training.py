"""Core behaviour: partitions, prior, selection, adaptation, checkpoints, and App. A consistency."""
import math

import pytest
import torch
from pydantic import ValidationError

from core import (MetaModel, MetaTrainer, PartitionError, build_partition, inverse_gamma_penalty, select_modules,
                  selection)
from core.modules import sigma2
from schemas import JobConfig


def sinusoid_cfg(alg="sigma_reptile", steps=20, **over):
    body = {"algorithm": {"name": alg}, "model": {"arch": "mlp", "hidden": [16, 16]},
            "modules": {"partition": "per_tensor"}, "tasks": {"family": "sinusoid", "shots": 10, "query": 10},
            "inner": {"lr": 0.01, "steps": 3}, "outer": {"meta_batch": 4, "steps": steps},
            "execution": {"vectorize": "vmap"}, "seed": 3}
    for k, v in over.items():
        body[k] = {**body.get(k, {}), **v} if isinstance(v, dict) else v
    return JobConfig.model_validate(body).model_dump()


# ---------------------------------------------------------------------------------- partitions
def test_partitions_cover_every_parameter_once():
    params = {"fc0.weight": torch.zeros(3, 2), "fc0.bias": torch.zeros(3), "bn0.weight": torch.zeros(3),
              "bn0.bias": torch.zeros(3), "head.weight": torch.zeros(1, 3)}
    p = build_partition(params, "per_layer")
    assert p.names == ("fc0", "bn0", "head") and p.sizes == (9, 6, 3)
    assert build_partition(params, "per_tensor").names == tuple(params)
    g = build_partition(params, "groups", {"body": ["fc*", "bn*"], "head": ["head.*"]})
    assert g.names == ("body", "head") and g.sizes == (15, 3)
    with pytest.raises(PartitionError, match="matches no module"):
        build_partition(params, "groups", {"body": ["fc*"], "head": ["head.*"]})
    with pytest.raises(PartitionError, match="more than one module"):
        build_partition(params, "groups", {"a": ["fc0.*"], "b": ["fc0.weight", "bn*", "head*"]})


def test_sigma2_is_clipped_and_inverse_gamma_shrinks():
    ls = torch.tensor([-30.0, 0.0, 30.0])
    assert torch.allclose(sigma2(ls), torch.tensor([1e-5, 1.0, 1e5]), rtol=1e-5)
    # the regulariser is a penalty: its gradient pushes log sigma^2 down above the mode beta / 2 ...
    ls = torch.tensor([math.log(1e-3), 0.0, math.log(10.0)], requires_grad=True)
    (g,) = torch.autograd.grad(inverse_gamma_penalty(ls, 1e-5), ls)
    assert torch.all(g > 0)
    # ... and up below it
    ls2 = torch.tensor([math.log(1e-4)], requires_grad=True)
    (g2,) = torch.autograd.grad(inverse_gamma_penalty(ls2, 1e-3), ls2)
    assert g2 < 0


def test_module_selection_rules():
    names = ["a", "b", "c", "d"]
    ls = torch.log(torch.tensor([1e-4, 2.0, 1e-5, 0.5]))
    assert select_modules(names, ls, "gap") == ["b", "d"]
    assert select_modules(names, ls, "threshold", threshold=1.0) == ["b"]
    assert select_modules(names, ls, "topk", k=3) == ["a", "b", "d"]


def test_gap_selection_needs_a_separation():
    names = ["a", "b", "c", "d"]
    # clear separation (four orders of magnitude): only the modules above the gap
    sel = selection(names, torch.log(torch.tensor([1e-4, 2.0, 1e-5, 0.5])))
    assert sel["selected"] == ["b", "d"] and sel["separated"]
    assert sel["gap"] == pytest.approx(math.log(0.5 / 1e-4)) and sel["min_gap"] == pytest.approx(math.log(100))
    # sigma^2 between 0.80 and 1.12 (the quick-start case of issue 10): no separation, every module adapts
    flat = torch.log(torch.tensor([0.80, 1.12, 1.11, 0.95]))
    sel = selection(names, flat)
    assert sel["selected"] == names and not sel["separated"] and sel["gap"] < math.log(100)
    # a 50x gap is below the default two orders of magnitude, above a user's min_gap of ln 10
    ls = torch.log(torch.tensor([1.0, 50.0, 0.9, 1.1]))
    assert select_modules(names, ls, "gap") == names
    assert select_modules(names, ls, "gap", min_gap=math.log(10)) == ["b"]
    # one module: selected, nothing separated
    assert selection(["a"], torch.zeros(1)) == {"method": "gap", "selected": ["a"], "gap": 0.0,
                                                 "min_gap": pytest.approx(math.log(100)), "separated": False}


def test_unseparated_sigma2_adapts_every_module_by_default():
    cfg = JobConfig.model_validate({"algorithm": {"name": "sigma_maml"}, "model": {"arch": "mlp"},
                                    "modules": {"partition": "per_tensor"}, "tasks": {"family": "sinusoid"},
                                    "outer": {"steps": 1}}).model_dump()
    mm = MetaTrainer(cfg).meta_model()
    mm.log_sigma2 = torch.log(torch.tensor([0.8, 1.1, 0.9, 1.0, 1.12, 0.95]))
    assert mm.selected_modules() == list(mm.partition.names)
    assert all(not e["separated"] for e in mm.module_map())
    task = mm.family.sample(1, torch.Generator().manual_seed(0), "test").task(0)
    assert mm.adapt(task.xs, task.ys, steps=2).adapted_modules == list(mm.partition.names)
    mm.log_sigma2 = torch.log(torch.tensor([5.0, 3.0, 1e-4, 1e-4, 1e-5, 1e-4]))
    assert mm.selected_modules() == ["fc0.weight", "fc0.bias"]
    assert all(e["separated"] for e in mm.module_map())


# ---------------------------------------------------------------------------------- schema
def test_schema_defaults_and_errors():
    cfg = JobConfig.model_validate({"algorithm": {"name": "sigma_imaml"}, "model": {"arch": "mlp"},
                                    "tasks": {"family": "sinusoid"}})
    assert cfg.inner.optimizer == "proximal_gd" and cfg.algorithm.cg_steps == 5
    assert JobConfig.model_validate({"algorithm": {"name": "maml"}, "model": {"arch": "mlp"},
                                     "tasks": {"family": "sinusoid"}}).inner.optimizer == "sgd"
    for bad, where in [({"algorithm": {"name": "nope"}}, "algorithm"),
                       ({"outer": {"meta_batch": 0}}, "meta_batch"),
                       ({"inner": {"lr": float("nan")}}, "lr"),
                       ({"bogus": 1}, "bogus"),
                       ({"model": {"arch": "identity"}}, "identity")]:
        body = {"algorithm": {"name": "maml"}, "model": {"arch": "mlp"}, "tasks": {"family": "sinusoid"}, **bad}
        with pytest.raises(ValidationError, match=where):
            JobConfig.model_validate(body)


# ---------------------------------------------------------------------------------- training + checkpoints
def test_resume_from_checkpoint_is_bit_for_bit():
    cfg = sinusoid_cfg("sigma_imaml", steps=12)
    full = MetaTrainer(cfg)
    full.run()
    first = MetaTrainer(cfg)
    first.run(steps=5)
    tensors, meta = first.state_dict()
    second = MetaTrainer(cfg)
    second.load_state_dict({k: v.clone() for k, v in tensors.items()}, meta)
    assert second.step_count == 5
    second.run()
    for k in full.meta["phi"]:
        assert torch.equal(full.meta["phi"][k], second.meta["phi"][k])
    assert torch.equal(full.meta["log_sigma2"], second.meta["log_sigma2"])


def test_auto_vectorisation_is_measured_and_recorded():
    t = MetaTrainer(sinusoid_cfg("maml", steps=2, execution={"vectorize": "auto"}))
    t.step()
    assert t.vectorize in ("vmap", "loop")
    assert t.state_dict()[1]["vectorize"] == t.vectorize


@pytest.mark.parametrize("alg", ["maml", "sigma_maml", "sigma_imaml", "sigma_reptile", "meta_sgd"])
def test_threaded_per_task_loop_is_the_vmapped_batch_in_task_order(alg):
    """vectorize "loop" on CPU runs its tasks on parallel threads (one intra-op thread each, then the caller's
    thread count is restored): the same per-task updates as vmap, in task order, in float64."""
    cfg = sinusoid_cfg(alg, steps=2, outer={"meta_batch": 5}, execution={"vectorize": "loop", "dtype": "float64"})
    trainer = MetaTrainer(cfg)
    batch = trainer._with_noise(trainer.sample())
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        looped = trainer.task_updates(batch, "loop")
        assert torch.get_num_threads() == 2
        # the tasks ran on two threads, except for jvp users (forward-mode AD levels are process-wide)
        assert (trainer._pool is not None and trainer._pool._max_workers == 2) == trainer.algorithm.thread_safe
        assert trainer.algorithm.thread_safe == (alg not in ("sigma_imaml", "sigma_reptile"))
    finally:
        torch.set_num_threads(threads)
    vmapped = trainer.task_updates(batch, "vmap")
    flat = torch.utils._pytree.tree_leaves
    # a worker's setting: task threads independent of the intra-op count; with one intra-op thread the numbers
    # are those of the sequential loop to the bit
    torch.set_num_threads(1)
    try:
        two = MetaTrainer(cfg, task_threads=2)
        threaded = two.task_updates(batch, "loop")
        assert (two._pool is not None) == two.algorithm.thread_safe
        sequential = MetaTrainer(cfg, task_threads=1).task_updates(batch, "loop")
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(flat(threaded), flat(sequential)))
    for a, b in zip(flat(looped), flat(vmapped)):
        assert a.shape == b.shape and a.shape[:1] == (5,)
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-10)
    # tasks differ, so a permuted order could not pass
    assert not torch.allclose(looped[1]["query_loss"][0], looped[1]["query_loss"][1])


@pytest.mark.parametrize("alg", ["maml", "fomaml", "sigma_maml", "imaml", "sigma_imaml", "reptile", "sigma_reptile"])
def test_every_algorithm_trains_and_logs(alg):
    t = MetaTrainer(sinusoid_cfg(alg, steps=3))
    m = t.run()
    assert math.isfinite(m["query_loss"])
    if alg in ("imaml", "sigma_imaml", "sigma_reptile"):
        assert "cg_residual" in m and m["cg_iterations"] >= 1
    if alg.startswith("sigma"):
        assert not torch.equal(t.meta["log_sigma2"], torch.zeros_like(t.meta["log_sigma2"]))  # learned
    mm = t.meta_model()
    assert [e["name"] for e in mm.module_map()] == list(mm.partition.names)


# ---------------------------------------------------------------------------------- adaptation
def test_adapt_moves_only_chosen_modules_and_keeps_no_graph():
    t = MetaTrainer(sinusoid_cfg("sigma_reptile", steps=2))
    mm = t.meta_model()
    batch = t.family.sample(1, torch.Generator().manual_seed(9)).task(0)
    res = mm.adapt(batch.xs, batch.ys, steps=25, modules=["fc0.weight", "fc0.bias"])
    assert res.adapted_modules == ["fc0.weight", "fc0.bias"]
    for k, v in res.params.items():
        assert not v.requires_grad
        if k.startswith("fc0"):
            assert not torch.equal(v, mm.phi[k])
        else:
            assert torch.equal(v, mm.phi[k])
    assert len(res.loss_curve) == 26 and res.loss_curve[-1] < res.loss_curve[0]
    assert set(res.adapter(mm.partition)) == {"fc0.weight", "fc0.bias"}
    zero = mm.adapt(batch.xs, batch.ys, steps=0)
    assert torch.equal(mm.predict(batch.xq, zero.params), mm.predict(batch.xq))
    seen = []
    mm.adapt(batch.xs, batch.ys, steps=3, on_step=lambda s, p: seen.append(s))
    assert seen == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="unknown modules"):
        mm.adapt(batch.xs, batch.ys, steps=1, modules=["nope"])
    with pytest.raises(ValueError, match="steps"):
        mm.adapt(batch.xs, batch.ys, steps=10001)


def test_meta_model_roundtrip_through_tensors():
    t = MetaTrainer(sinusoid_cfg("sigma_maml", steps=2))
    mm = t.meta_model()
    back = MetaModel.from_tensors(t.config, mm.tensors())
    x = torch.linspace(-5, 5, 7).view(-1, 1)
    assert torch.equal(back.predict(x), mm.predict(x))
    assert back.module_map() == mm.module_map()


# ---------------------------------------------------------------------------------- App. A
def test_appendix_a_consistency_with_1000_tasks():
    from benchmarks.reproduce.appendix_a import run
    res = run(tasks=1000)
    for alg in ("sigma_imaml", "sigma_reptile"):
        r = res[alg]
        # the learned values are the closed-form estimators of the same data (Eqs. 17-20, Prop. 2, Eq. 25) ...
        assert abs(r["phi"] - r["phi_closed_form"]) < 1e-3 * abs(r["phi_closed_form"])
        assert abs(r["sigma2"] - r["sigma2_closed_form"]) < 1e-3 * r["sigma2_closed_form"]
        # ... which are within 10% of the truth at T = 1000
        assert abs(r["phi"] - r["phi_true"]) < 0.1 * abs(r["phi_true"])
        assert abs(r["sigma2"] - r["sigma2_true"]) < 0.1 * r["sigma2_true"]


@pytest.mark.parametrize("arch", ["mlp", "conv4", "identity"])
def test_pure_functional_forward_equals_functional_call(arch):
    from torch.func import functional_call

    from core.models import apply, build_model, init_params
    from core.tasks import HierarchicalNormal
    from tests.core_helpers import ToyImages, ToyRegression
    family = {"mlp": ToyRegression(), "conv4": ToyImages(), "identity": HierarchicalNormal("swirl")}[arch]
    cfg = {"mlp": {"arch": "mlp", "hidden": [7, 5], "activation": "tanh"},
           "conv4": {"arch": "conv4", "channels": 4, "variant": "strided", "channels_last": False},
           "identity": {"arch": "identity"}}[arch]
    model = build_model(cfg, family)
    params = init_params(model, torch.Generator().manual_seed(0), torch.float64)
    params = {k: v + 0.1 * torch.randn(v.shape, dtype=v.dtype) for k, v in params.items()}
    x = family.sample(1, torch.Generator().manual_seed(1)).xs[0].double()
    assert torch.allclose(apply(model, params, x), functional_call(model, params, (x,)), atol=1e-12)


@pytest.mark.slow
def test_compiled_meta_step_matches_eager():
    # with a clipping norm small enough to bind, so the fused graph includes the clipping
    outer = {"clip_grad_norm": 0.05, "optimizer": "sgd"}
    eager = MetaTrainer(sinusoid_cfg("maml", steps=3, outer=outer))
    compiled = MetaTrainer(sinusoid_cfg("maml", steps=3, outer=outer, execution={"vectorize": "vmap", "compile": True}))
    m_eager, m_compiled = eager.run(), compiled.run()
    assert m_eager["grad_norm"] > 0.05
    assert abs(m_eager["grad_norm"] - m_compiled["grad_norm"]) < 1e-4 * m_eager["grad_norm"]
    for k in eager.meta["phi"]:
        assert torch.allclose(eager.meta["phi"][k], compiled.meta["phi"][k], atol=1e-5)


def test_meta_gradient_clipping_scales_the_global_norm():
    from core.trainer import clip_delta
    delta = {"phi": {"w": torch.tensor([3.0, 0.0])}, "extra": {"a": torch.tensor([[4.0]])}}  # global norm 5
    out, m = clip_delta(delta, {}, 1.0)
    assert float(m["grad_norm"]) == pytest.approx(5.0)
    assert torch.allclose(out["phi"]["w"], torch.tensor([0.6, 0.0])) and torch.allclose(out["extra"]["a"], torch.tensor([[0.8]]))
    out, m = clip_delta(delta, {}, 10.0)  # below the bound: unchanged
    assert torch.equal(out["phi"]["w"], delta["phi"]["w"]) and torch.equal(out["extra"]["a"], delta["extra"]["a"])
    out, _ = clip_delta(delta, {}, None)
    assert out is delta


def test_clipped_sgd_meta_step_moves_phi_by_lr_times_the_bound():
    # outer SGD: with clipping, phi moves by exactly lr_phi * clip_grad_norm in global norm (log sigma^2 too;
    # the inverse-Gamma penalty's gradient is added after clipping, so it is switched off here)
    cfg = sinusoid_cfg("sigma_maml", steps=1, algorithm={"name": "sigma_maml", "ig_beta": 0.0}, outer={"optimizer": "sgd", "lr_phi": 0.1, "lr_log_sigma2": 0.1,
                                                     "clip_grad_norm": 1e-3},
                       execution={"vectorize": "vmap", "dtype": "float64"})
    t = MetaTrainer(cfg)
    before = {k: v.clone() for k, v in t.meta["phi"].items()}, t.meta["log_sigma2"].clone()
    m = t.step()
    assert m["grad_norm"] > 1e-3
    moved = torch.cat([(t.meta["phi"][k] - before[0][k]).flatten() for k in before[0]]
                      + [t.meta["log_sigma2"] - before[1]])
    assert float(moved.norm()) == pytest.approx(0.1 * 1e-3, rel=1e-9)


def test_diverged_tasks_are_left_out_of_the_meta_update():
    from core.trainer import reduce_tasks
    deltas = {"phi": {"w": torch.tensor([[1.0, 2.0], [float("nan"), 0.0], [3.0, 4.0]])},
              "log_sigma2": torch.tensor([[0.5], [0.1], [float("inf")]])}
    delta, metrics = reduce_tasks(deltas, {"query_loss": torch.tensor([1.0, 2.0, 3.0])})
    # only task 0 is finite everywhere
    assert torch.equal(delta["phi"]["w"], torch.tensor([1.0, 2.0]))
    assert torch.equal(delta["log_sigma2"], torch.tensor([0.5]))
    assert float(metrics["skipped_tasks"]) == 2 and float(metrics["query_loss"]) == 2.0
    all_bad = {"phi": {"w": torch.full((2, 2), float("nan"))}, "log_sigma2": torch.zeros(2, 1)}
    delta, metrics = reduce_tasks(all_bad, {})
    assert torch.equal(delta["phi"]["w"], torch.zeros(2)) and float(metrics["skipped_tasks"]) == 2


# ---------------------------------------------------------------------------------- divergence
def test_adapt_stops_at_divergence_and_keeps_its_best_step():
    from core.adapt import DIVERGE_FACTOR
    mm = MetaTrainer(sinusoid_cfg("maml", steps=2)).meta_model()
    x = torch.linspace(-5, 5, 10).view(-1, 1)
    res = mm.adapt(x, 1e12 * torch.sin(x), steps=200, modules="all", lr=1.0)
    d = res.diverged_at_step
    assert d is not None and 1 <= d <= 200, d
    # the curve holds the losses of theta_0 .. theta_{d-1}, none past DIVERGE_FACTOR x the start; the returned
    # parameters are those of the lowest of them
    assert len(res.loss_curve) == d and all(math.isfinite(v) for v in res.loss_curve)
    assert max(res.loss_curve) <= DIVERGE_FACTOR * res.loss_curve[0]
    assert all(bool(torch.isfinite(v).all()) for v in res.params.values())
    assert float(mm.loss(res.params, x, 1e12 * torch.sin(x))) == pytest.approx(min(res.loss_curve), rel=1e-5)
    # finite but exploding (issue 21: a step size far past stability): stopped at DIVERGE_FACTOR, never served
    # worse than the unadapted model
    y = torch.sin(x)
    res = mm.adapt(x, y, steps=200, modules="all", lr=3.0)
    assert res.diverged_at_step is not None and res.diverged_at_step < 200, res.loss_curve[-3:]
    assert float(mm.loss(res.params, x, y)) <= res.loss_curve[0] + 1e-6
    ok = mm.adapt(x, torch.sin(x), steps=20, modules="all")
    assert ok.diverged_at_step is None and len(ok.loss_curve) == 21
    with pytest.raises(ValueError, match="overflow"):
        mm.adapt(torch.full((3, 1), 1e30), torch.zeros(3, 1), steps=5)
