"""Meta-SGD, T-net, MT-net, hyper-representation and the Hessian-vector-product MAML meta-gradient (float64)."""
import math

import pytest
import torch
from torch.func import vmap

from core import MetaModel, MetaTrainer
from core.algorithms import Learner, build_algorithm
from core.models import MLP, Conv4, init_params
from core.modules import build_partition
from core.optim import build_optimizer
from schemas import JobConfig
from tests.core_helpers import ToyImages, ToyRegression, flat, make, random_like, tree_dot


def make_baseline(cfg, arch="mlp", lr=0.1, steps=2, hidden=(5,), seed=0, partition="per_layer"):
    family = ToyRegression() if arch == "mlp" else ToyImages()
    model = MLP(2, 1, hidden, "tanh") if arch == "mlp" else Conv4((1, 8, 8), 3, channels=3)
    g = torch.Generator().manual_seed(seed)
    phi = init_params(model, g, torch.float64)
    part = build_partition(phi, partition)
    learner = Learner(model, family, part, build_optimizer("sgd", lr), steps, lr=lr)
    alg = build_algorithm(cfg, learner)
    phi = alg.prepare_phi(phi)
    meta = {"phi": phi, "log_sigma2": alg.init_log_sigma2(len(part.names), torch.float64, "cpu"),
            "extra": alg.init_extra(phi)}
    return alg, learner, meta, family.sample(3, g)


def perturb_extra(meta, g, scale=0.1):
    """Move the extra tensors off their symmetric initial values so that bugs show."""
    return {**meta, "extra": {k: v + scale * torch.rand(v.shape, generator=g, dtype=v.dtype) for k, v in meta["extra"].items()}}


def _add(meta, d, eps):
    return {"phi": {k: v + eps * d["phi"][k] for k, v in meta["phi"].items()}, "log_sigma2": meta["log_sigma2"],
            "extra": {k: v + eps * d["extra"][k] for k, v in meta["extra"].items()}}


def fd(J, meta, d, eps=1e-6):
    return (-J(_add(meta, d, 2 * eps)) + 8 * J(_add(meta, d, eps)) - 8 * J(_add(meta, d, -eps))
            + J(_add(meta, d, -2 * eps))) / (12 * eps)


def check_fd(alg, meta, task, noise=(), only=None, tol=1e-8, n=3):
    delta, _ = alg.task_update(meta, *task, *noise)

    def J(m):
        ctx = alg.context(m["extra"], noise[0] if noise else None)
        return alg.loss(alg.unroll(m["phi"], m["extra"], task.xs, task.ys, ctx), m["extra"], task.xq, task.yq)

    g = torch.Generator().manual_seed(11)
    for _ in range(n):
        d = {"phi": {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in meta["phi"].items()},
             "extra": {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in meta["extra"].items()}}
        if only == "extra":
            d["phi"] = {k: torch.zeros_like(v) for k, v in d["phi"].items()}
        num = fd(J, meta, d)
        an = tree_dot(delta["phi"], d["phi"]) + tree_dot(delta["extra"], d["extra"])
        assert abs(float(num - an)) < tol * max(1.0, abs(float(num))), (float(num), float(an))
    return delta


# ---------------------------------------------------------------------------------- Meta-SGD
@pytest.mark.parametrize("granularity", ["parameter", "module"])
def test_meta_sgd_meta_gradient_matches_finite_differences(granularity):
    alg, _, meta, batch = make_baseline({"name": "meta_sgd", "granularity": granularity}, lr=0.1, steps=3)
    meta = perturb_extra(meta, torch.Generator().manual_seed(1), 0.05)
    delta = check_fd(alg, meta, batch.task(0))
    check_fd(alg, meta, batch.task(1), only="extra")  # the learning rates alone
    assert all(float(v.abs().max()) > 1e-8 for v in delta["extra"].values())


def sinusoid(alg, steps=3, vectorize="vmap", **over):
    body = {"algorithm": alg, "model": {"arch": "mlp", "hidden": [16, 16]},
            "tasks": {"family": "sinusoid", "shots": 10, "query": 10},
            "inner": {"lr": 0.01, "steps": 3}, "outer": {"meta_batch": 4, "steps": steps},
            "execution": {"vectorize": vectorize}, "seed": 3}
    body.update(over)
    return JobConfig.model_validate(body).model_dump()


def test_meta_sgd_learning_rates_change_during_meta_training():
    t = MetaTrainer(sinusoid({"name": "meta_sgd"}, steps=5))
    before = {k: v.clone() for k, v in t.meta["extra"].items()}
    t.run()
    for k, v in t.meta["extra"].items():
        assert not torch.equal(v, before[k]), k  # every learning-rate tensor moved
    # and the published model adapts with the learned rates, not inner.lr
    mm = t.meta_model()
    assert torch.equal(mm.extra["alpha.fc0.weight"], t.meta["extra"]["alpha.fc0.weight"])


# ---------------------------------------------------------------------------------- HVP second order
@pytest.mark.parametrize("name,inner", [("maml", "sgd"), ("maml", "proximal_gd"), ("sigma_maml", "sgd"),
                                        ("sigma_maml", "proximal_gd")])
@pytest.mark.parametrize("arch", ["mlp", "conv4"])
def test_hvp_meta_gradient_equals_autograd_unroll(name, inner, arch):
    base = {"name": name, "first_order": False}
    if name == "sigma_maml":
        base.update(init_sigma2=1.0, ig_beta=0.0)
    unroll, _, meta, batch = make(arch, {**base, "second_order": "unroll"}, inner=inner, lr=0.05, steps=4)
    hvp, _, _, _ = make(arch, {**base, "second_order": "hvp"}, inner=inner, lr=0.05, steps=4)
    for i in range(2):
        a, ma = unroll.task_update(meta, *batch.task(i))
        b, mb = hvp.task_update(meta, *batch.task(i))
        assert torch.allclose(flat(a["phi"]), flat(b["phi"]), atol=1e-10, rtol=0)
        assert torch.allclose(a["log_sigma2"], b["log_sigma2"], atol=1e-10, rtol=0)
        assert torch.allclose(ma["query_loss"], mb["query_loss"], atol=1e-12)
    if name == "sigma_maml":
        assert b["log_sigma2"].abs().max() > 1e-6
    # vmap over tasks gives the same
    vm, _ = vmap(hvp.task_update, in_dims=(None, 0, 0, 0, 0))(meta, *batch)
    assert torch.allclose(flat({k: v[1] for k, v in vm["phi"].items()}), flat(b["phi"]), atol=1e-10)


def test_hvp_schema_rules():
    cfg = sinusoid({"name": "sigma_maml", "second_order": "hvp"})
    assert cfg["algorithm"]["second_order"] == "hvp" and cfg["inner"]["optimizer"] == "proximal_gd"
    with pytest.raises(Exception, match="hvp"):
        sinusoid({"name": "maml", "second_order": "hvp"}, inner={"optimizer": "adam"})
    with pytest.raises(Exception, match="hvp"):
        sinusoid({"name": "maml", "second_order": "hvp", "first_order": True})


# ---------------------------------------------------------------------------------- hyper-representation
@pytest.mark.parametrize("arch", ["mlp", "conv4"])
def test_hyper_representation_hypergradient_matches_finite_differences(arch):
    alg, _, meta, batch = make_baseline({"name": "hyper_representation"}, arch=arch, lr=0.3, steps=4)
    head = alg.head
    assert all(torch.all(meta["phi"][k] == 0) for k in head)  # w starts at 0
    delta = check_fd(alg, meta, batch.task(0))
    assert float(delta["extra"]["eta"].abs()) > 1e-8  # eta receives a hypergradient
    assert all(torch.all(delta["phi"][k] == 0) for k in head)  # phi's head is unused (w_0 = 0)
    check_fd(alg, meta, batch.task(1), only="extra")


# ---------------------------------------------------------------------------------- T-net / MT-net
def test_tnet_with_scaled_identity_reproduces_maml():
    """App. A: T = c I with inner lr 1 is MAML with lr c^2 on W' = c W (and b' = c b)."""
    c, steps = 0.3, 3
    tnet, _, meta, batch = make_baseline({"name": "tnet"}, lr=1.0, steps=steps, hidden=(6, 4))
    meta["extra"] = {k: c * v for k, v in meta["extra"].items()}
    maml, mlearner, _, _ = make("mlp", {"name": "maml", "first_order": False}, inner="sgd", lr=c * c, steps=steps,
                                hidden=(6, 4))
    mmeta = {"phi": {k: c * v for k, v in meta["phi"].items()}, "log_sigma2": torch.zeros(3, dtype=torch.float64)}
    task = batch.task(0)
    theta_t = tnet.unroll(meta["phi"], meta["extra"], task.xs, task.ys, None)
    theta_m = mlearner.adapt(mmeta["phi"], None, task.xs, task.ys)
    for k in theta_t:
        assert torch.allclose(c * theta_t[k], theta_m[k], atol=1e-13, rtol=0)
    assert torch.allclose(tnet.forward(theta_t, meta["extra"], task.xq), mlearner.model.functional(theta_m, task.xq),
                          atol=1e-13)
    dt, mt = tnet.task_update(meta, *task)
    dm, mm = maml.task_update(mmeta, *task)
    assert torch.allclose(mt["query_loss"], mm["query_loss"], atol=1e-13)
    for k in dt["phi"]:  # d/dW = c d/dW'
        assert torch.allclose(dt["phi"][k], c * dm["phi"][k], atol=1e-12)


@pytest.mark.parametrize("arch", ["mlp", "conv4"])
def test_tnet_and_mtnet_meta_gradients_match_finite_differences(arch):
    g = torch.Generator().manual_seed(5)
    alg, _, meta, batch = make_baseline({"name": "tnet"}, arch=arch, lr=0.1, steps=2)
    check_fd(alg, perturb_extra(meta, g), batch.task(0), n=2)
    alg, _, meta, batch = make_baseline({"name": "mtnet", "temperature": 0.7}, arch=arch, lr=0.1, steps=2)
    noise = alg.noise(1, g, torch.float64, "cpu")[0][0]
    delta = check_fd(alg, perturb_extra(meta, g), batch.task(0), noise=(noise,), n=2)
    assert all(float(delta["extra"][f"zeta.{n}"].abs().max()) > 0 for n, _ in alg.layers)


@pytest.mark.parametrize("arch", ["mlp", "conv4"])
def test_mtnet_masks_are_row_constant_and_hard_at_meta_test(arch):
    alg, _, meta, batch = make_baseline({"name": "mtnet", "temperature": 0.5}, arch=arch)
    g = torch.Generator().manual_seed(0)
    extra = {k: (torch.randn(v.shape, generator=g, dtype=v.dtype) if k.startswith("zeta") else v)
             for k, v in meta["extra"].items()}
    (noise,) = alg.noise(4, g, torch.float64, "cpu")
    assert noise.shape == (4, 2, alg.rows)  # two Gumbel samples per row and task (Eq. 10-11)
    soft, hard = alg.context(extra, noise[0]), alg.context(extra, None)
    for name, p in meta["phi"].items():
        for masks, binary in ((soft, False), (hard, True)):
            m = alg.mask_for(name, masks, p)
            if m is None:
                assert name.startswith("bn")
                continue
            full = m.expand_as(p).reshape(p.shape[0], -1)
            assert torch.all(full == full[:, :1])  # one value per row
            if binary:
                assert set(full.unique().tolist()) <= {0.0, 1.0}
                assert torch.equal(full[:, 0] == 1, extra[f"zeta.{name.rsplit('.', 1)[0]}"] > 0)
            else:
                assert torch.all((full > 0) & (full < 1))
    # a masked-out row does not move in the meta-test adaptation
    theta = alg.step(meta["phi"], {k: torch.ones_like(v) for k, v in meta["phi"].items()}, extra, hard)
    layer = alg.layers[0][0]
    off = extra[f"zeta.{layer}"] <= 0
    assert torch.equal(theta[f"{layer}.weight"][off], meta["phi"][f"{layer}.weight"][off])
    assert not torch.equal(theta[f"{layer}.weight"][~off], meta["phi"][f"{layer}.weight"][~off])


@pytest.mark.parametrize("name", ["meta_sgd", "tnet", "mtnet", "hyper_representation"])
@pytest.mark.parametrize("arch", ["mlp", "conv4"])
def test_baselines_vmap_equals_loop(name, arch):
    alg, _, meta, batch = make_baseline({"name": name}, arch=arch, lr=0.05, steps=2)
    noise = alg.noise(3, torch.Generator().manual_seed(2), torch.float64, "cpu")
    vm, vmm = vmap(alg.task_update, in_dims=(None, 0, 0, 0, 0, *([0] * len(noise))))(meta, *batch, *noise)
    for i in range(3):
        d, m = alg.task_update(meta, *batch.task(i), *(n[i] for n in noise))
        assert torch.allclose(flat(d["phi"]), flat({k: v[i] for k, v in vm["phi"].items()}), atol=1e-10)
        assert torch.allclose(flat(d["extra"]), flat({k: v[i] for k, v in vm["extra"].items()}), atol=1e-10)
        assert torch.allclose(m["query_loss"], vmm["query_loss"][i], atol=1e-12)


# ---------------------------------------------------------------------------------- end to end
NEW = [{"name": "meta_sgd"}, {"name": "meta_sgd", "granularity": "module"}, {"name": "tnet"},
       {"name": "mtnet", "temperature": 0.5}, {"name": "hyper_representation"},
       {"name": "maml", "second_order": "hvp"}, {"name": "sigma_maml", "second_order": "hvp"}]


@pytest.mark.parametrize("alg", NEW, ids=lambda a: "-".join(str(v) for v in a.values()))
def test_new_algorithm_trains_resumes_and_publishes(alg):
    cfg = sinusoid(alg, steps=3)
    full = MetaTrainer(cfg)
    m = full.run()
    assert math.isfinite(m["query_loss"])
    loop = MetaTrainer(sinusoid(alg, steps=3, vectorize="loop"))
    loop.run()
    for k in full.meta["phi"]:
        assert torch.allclose(full.meta["phi"][k], loop.meta["phi"][k], atol=1e-5)
    for k in full.meta.get("extra", {}):
        assert torch.allclose(full.meta["extra"][k], loop.meta["extra"][k], atol=1e-5)
    # checkpoint after 1 step, resume: bit for bit
    first = MetaTrainer(cfg)
    first.run(steps=1)
    tensors, meta = first.state_dict()
    assert all(f"extra.{k}" in tensors for k in first.meta.get("extra", {}))
    second = MetaTrainer(cfg)
    second.load_state_dict({k: v.clone() for k, v in tensors.items()}, meta)
    second.run()
    for part in ("phi", "extra"):
        for k in full.meta.get(part, {}):
            assert torch.equal(full.meta[part][k], second.meta[part][k]), (part, k)
    assert torch.equal(full.meta["log_sigma2"], second.meta["log_sigma2"])
    # the published model adapts with the algorithm's rule and survives tensors() / from_tensors
    mm = full.meta_model()
    task = full.family.sample(1, torch.Generator().manual_seed(9)).task(0)
    res = mm.adapt(task.xs, task.ys, steps=20)
    assert len(res.loss_curve) == 21 and res.loss_curve[-1] < res.loss_curve[0]
    back = MetaModel.from_tensors(cfg, mm.tensors())
    res2 = back.adapt(task.xs, task.ys, steps=20)
    assert torch.equal(back.predict(task.xq, res2.params), mm.predict(task.xq, res.params))
    assert back.module_map() == mm.module_map()


def test_meta_model_adapt_uses_the_algorithms_rule():
    """MetaModel.adapt for T-net / Meta-SGD equals the training-time unroll (same T, same learned rates)."""
    for alg in ({"name": "tnet"}, {"name": "meta_sgd"}, {"name": "mtnet"}, {"name": "hyper_representation"}):
        t = MetaTrainer(sinusoid(alg, steps=2, execution={"vectorize": "vmap", "dtype": "float64"}))
        t.run()
        mm = t.meta_model()
        task = t.family.sample(1, torch.Generator().manual_seed(4)).task(0).to(dtype=torch.float64)
        res = mm.adapt(task.xs, task.ys, steps=3)
        ctx = t.algorithm.context(t.meta["extra"], None)
        ref = t.algorithm.unroll(t.meta["phi"], t.meta["extra"], task.xs, task.ys, ctx, steps=3)
        for k in ref:
            assert torch.allclose(res.params[k], ref[k], atol=1e-12), (alg, k)
