"""The warm adapt path: ``MetaModel.adapt`` moves the adapted tensors as one flat vector (core/adapt.py
``_FlatPlan``). Its result must be the inner optimizer applied tensor by tensor (the loop it replaced, written
out below), to the bit, for every inner optimizer, with and without a prior, for a subset of modules too."""
from __future__ import annotations

import pytest
import torch

from core import MetaTrainer
from core.modules import prior_penalty
from core.optim import build_optimizer
from schemas import JobConfig


def _mm(alg: str, opt: str, arch: dict | None = None):
    cfg = JobConfig.model_validate({
        "algorithm": {"name": alg}, "model": arch or {"arch": "mlp", "hidden": [16, 16]},
        "modules": {"partition": "per_tensor"}, "tasks": {"family": "sinusoid", "shots": 10, "query": 10},
        "inner": {"optimizer": opt, "lr": 0.02, "steps": 3}, "outer": {"meta_batch": 2, "steps": 1},
        "execution": {"vectorize": "loop"}, "seed": 0}).model_dump()
    t = MetaTrainer(cfg)
    t.meta["log_sigma2"] = torch.linspace(-2.0, 1.0, len(t.partition.names))
    return t.meta_model(), t.family


def _reference(mm, xs, ys, steps, modules):
    """The per-tensor loop MetaModel.adapt ran before the flat path."""
    inner = mm.config["inner"]
    opt = build_optimizer(inner["optimizer"], inner["lr"], inner["betas"], inner["eps"])
    names = mm.partition.param_names(mm.resolve_modules(modules))
    lam = mm.lam(names, xs.shape[0])
    frozen = {k: v for k, v in mm.phi.items() if k not in names}
    center = {k: mm.phi[k] for k in names}
    theta, state, curve = dict(center), opt.init(center), []
    for _ in range(steps):
        leaves = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
        loss = mm.loss({**frozen, **leaves}, xs, ys)
        obj = loss + prior_penalty(leaves, center, lam) if (lam and not opt.proximal) else loss
        grads = torch.autograd.grad(obj, list(leaves.values()))
        curve.append(float(loss.detach()))
        with torch.no_grad():
            theta, state = opt.update(dict(zip(leaves, grads)), state, theta, center, lam)
    with torch.no_grad():
        curve.append(float(mm.loss({**frozen, **theta}, xs, ys)))
    return {**frozen, **theta}, curve


@pytest.mark.parametrize("alg, opt", [("sigma_maml", "proximal_gd"), ("sigma_maml", "sgd"), ("sigma_reptile", "adam"),
                                      ("sigma_imaml", "proximal_adam"), ("maml", "sgd"), ("imaml", "proximal_gd")])
@pytest.mark.parametrize("modules", ["all", ["fc0.weight", "fc2.bias"]])
def test_flat_adapt_is_the_per_tensor_loop_to_the_bit(alg, opt, modules):
    mm, fam = _mm(alg, opt)
    task = fam.sample(1, torch.Generator().manual_seed(3), "test").task(0)
    res = mm.adapt(task.xs, task.ys, steps=25, modules=modules)
    ref, curve = _reference(mm, task.xs, task.ys, 25, modules)
    assert set(res.params) == set(mm.phi)
    for k in ref:
        assert torch.equal(res.params[k], ref[k]), k
    assert res.loss_curve == curve
    # the adapted tensors are tensors of their own (an adapter is saved with safetensors, which refuses shared
    # storage), the frozen ones phi's
    from safetensors.torch import save
    save(res.adapter(mm.partition))
    for k, v in res.params.items():
        assert not v.requires_grad
        if k not in mm.partition.param_names(res.adapted_modules):
            assert v is mm.phi[k]


def test_flat_adapt_conv4_to_the_bit():
    """conv4 (batch-norm, per_layer modules): the same equality on an image task."""
    from tests.gpu_helpers import job
    t = MetaTrainer(job("sigma_maml", "conv4", "float32", "loop", steps=1))
    t.meta["log_sigma2"] = torch.linspace(-2.0, 1.0, len(t.partition.names))
    mm = t.meta_model()
    task = t.family.sample(1, torch.Generator().manual_seed(2), "test").task(0)
    res = mm.adapt(task.xs, task.ys, steps=5, modules="all")
    ref, curve = _reference(mm, task.xs, task.ys, 5, "all")
    assert all(torch.equal(res.params[k], ref[k]) for k in ref) and res.loss_curve == curve


def test_interrupt_is_called_before_every_step_and_the_layout_is_kept():
    mm, _ = _mm("maml", "sgd")
    xs, ys = torch.linspace(-3, 3, 10)[:, None], torch.sin(torch.linspace(-3, 3, 10))[:, None]
    seen = []

    def stop(step):
        seen.append(step)
        if step == 4:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        mm.adapt(xs, ys, steps=10, interrupt=stop)
    assert seen == [0, 1, 2, 3, 4]
    # a second request with the same module choice reuses the layout (built once per choice)
    mm.adapt(xs, ys, steps=1)
    assert len(mm._plans) == 1


# --------------------------------------------------------------------------- predict_many (vmap over adapters)
def _adapters(mm, fam, choices, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for modules in choices:
        task = fam.sample(1, g, "test").task(0)
        res = mm.adapt(task.xs, task.ys, steps=5, modules=modules)
        out.append(res.adapter(mm.partition))
    return out


@pytest.mark.parametrize("alg", ["sigma_maml", "meta_sgd"])
def test_predict_many_equals_predict_one_by_one_mlp(alg):
    """Mixed module choices and query sizes (padded to shared forwards for a row-independent MLP); an algorithm
    with its own forward (meta_sgd) goes one by one."""
    mm, fam = _mm(alg, "sgd" if alg == "meta_sgd" else "proximal_gd")
    assert mm.vmaps_forward == (alg == "sigma_maml")
    adapted = _adapters(mm, fam, ["all", ["fc2.weight", "fc2.bias"], ["fc0.weight"], "all", "all"])
    g = torch.Generator().manual_seed(5)
    xs = [torch.rand(n, 1, generator=g) * 10 - 5 for n in (7, 7, 5, 100, 1)]
    many = mm.predict_many(xs, adapted)
    for x, a, y in zip(xs, adapted, many):
        one = mm.predict(x, {**mm.phi, **a})
        assert y.shape == one.shape
        torch.testing.assert_close(y, one, rtol=1e-6, atol=1e-6)


def test_predict_many_conv4_groups_by_rows_batch_norm_per_adapter():
    """conv4's batch-norm normalises with the statistics of each adapter's own queries: groups by row count,
    never pads; chunks of at most max_rows rows."""
    from tests.gpu_helpers import job
    t = MetaTrainer(job("sigma_maml", "conv4", "float32", "loop", steps=1))
    mm = t.meta_model()
    assert not mm.model.row_independent
    adapted = _adapters(mm, t.family, ["all", ["head"], "all", ["bn3", "head"]], seed=1)
    g = torch.Generator().manual_seed(2)
    xs = [torch.rand(n, 1, 14, 14, generator=g) for n in (6, 6, 4, 6)]
    for max_rows in (65_536, 12):
        many = mm.predict_many(xs, adapted, max_rows=max_rows)
        for x, a, y in zip(xs, adapted, many):
            torch.testing.assert_close(y, mm.predict(x, {**mm.phi, **a}), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- the batch body's caps
def test_batch_body_caps_name_the_item():
    import json

    from api.errors import ApiError
    from api.routes.adapters import json_batch_items

    def body(*rows):
        return json.dumps({"items": [{"adapter_id": f"adp_{i}", "x": [[0.5]] * n} for i, n in enumerate(rows)]}).encode()
    items = json_batch_items(body(2, 3), 4, 3, 10)
    assert [a for a, _ in items] == ["adp_0", "adp_1"] and items[1][1].shape == (3, 1)
    for raw, caps, loc in ((body(1, 1, 1), (2, 5, 10), ["items"]), (body(1, 4), (4, 3, 10), ["items", 1, "x"]),
                           (body(3, 3, 3), (4, 3, 8), ["items", 2, "x"])):
        with pytest.raises(ApiError) as e:
            json_batch_items(raw, *caps)
        assert e.value.status == 422 and e.value.errors[0]["loc"] == loc, e.value.detail
    with pytest.raises(ApiError) as e:
        json_batch_items(json.dumps({"items": [{"adapter_id": "a", "x": [[1.0], [1.0, 2.0]]}]}).encode(), 4, 4, 4)
    assert e.value.errors[0]["loc"] == ["items", 0, "x"]


def test_wire_packs_arrays_in_lists():
    import numpy as np

    from worker.wire import pack, unpack
    obj = {"items": [{"x": np.arange(6.0).reshape(3, 2)}, {"x": np.zeros((1, 1), np.float32)}], "n": [1, 2]}
    back = unpack(pack(obj))
    assert back["n"] == [1, 2] and back["items"][1]["x"].dtype == np.float32
    np.testing.assert_array_equal(back["items"][0]["x"], obj["items"][0]["x"])


def test_the_layout_follows_phi_and_log_sigma2_when_they_change():
    """worker/validation.py swaps a meta-model's phi and log sigma^2 between scorings; a tensor may also change in
    place: the kept layout (flat phi, prior precisions) must follow, as the per-tensor loop did."""
    mm, fam = _mm("sigma_maml", "proximal_gd")
    task = fam.sample(1, torch.Generator().manual_seed(4), "test").task(0)
    mm.adapt(task.xs, task.ys, steps=3, modules="all")
    mm.phi = {k: v + 0.1 for k, v in mm.phi.items()}
    mm.log_sigma2 = mm.log_sigma2 + 1.0
    res, (ref, _) = mm.adapt(task.xs, task.ys, steps=3, modules="all"), _reference(mm, task.xs, task.ys, 3, "all")
    assert all(torch.equal(res.params[k], ref[k]) for k in ref)
    with torch.no_grad():
        mm.phi["fc1.weight"].mul_(0.5)
        mm.log_sigma2.add_(-2.0)
    res, (ref, _) = mm.adapt(task.xs, task.ys, steps=3, modules="all"), _reference(mm, task.xs, task.ys, 3, "all")
    assert all(torch.equal(res.params[k], ref[k]) for k in ref)
    assert mm.selected_modules() == mm.selection()["selected"]
