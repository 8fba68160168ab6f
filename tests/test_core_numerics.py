"""Numerical checks of the core against closed forms, finite differences and dense-Hessian solves (float64)."""
import math

import pytest
import torch
from torch.func import functional_call, grad, hessian, jacrev

from core.cg import conjugate_gradient
from core.modules import per_param, prior_penalty, sigma2
from core.optim import adam, proximal_adam, proximal_gd
from tests.core_helpers import add, fd, flat, make, random_like, tree_dot, unflat

ALL = ["maml", "fomaml", "sigma_maml", "imaml", "sigma_imaml", "reptile", "sigma_reptile"]


def alg_cfg(name, **kw):
    base = {"maml": {"first_order": False}, "fomaml": {}, "sigma_maml": {"first_order": False},
            "imaml": {"lam": 2.0, "damping": 0.0, "cg_steps": 5},
            "sigma_imaml": {"damping": 0.0, "cg_steps": 5},
            "reptile": {}, "sigma_reptile": {"damping": 0.5, "cg_steps": 2}}[name]
    if name.startswith("sigma"):
        base = {**base, "init_sigma2": 1.0, "ig_beta": 0.0}
    return {"name": name, **base, **kw}


# ---------------------------------------------------------------------------------- inner optimizers
def test_proximal_gd_step_is_the_closed_form_prox():
    g = torch.Generator().manual_seed(0)
    theta, grad_, phi = (torch.randn(7, generator=g, dtype=torch.float64) for _ in range(3))
    lam, a = torch.tensor(3.7, dtype=torch.float64), 0.05
    new, _ = proximal_gd(a).update({"w": grad_}, {}, {"w": theta}, {"w": phi}, {"w": lam})
    half = theta - a * grad_
    # argmin_t ||t - half||^2 / (2a) + lam/2 ||t - phi||^2  =  (half + a lam phi) / (1 + a lam)
    assert torch.allclose(new["w"], (half + a * lam * phi) / (1 + a * lam), atol=1e-15)
    # and it is a stationary point of that objective
    t = new["w"].clone().requires_grad_()
    obj = ((t - half) ** 2).sum() / (2 * a) + lam / 2 * ((t - phi) ** 2).sum()
    assert torch.autograd.grad(obj, t)[0].abs().max() < 1e-12


def test_proximal_adam_follows_algorithm_3():
    g = torch.Generator().manual_seed(1)
    theta, phi = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    lam, a, b1, b2, eps = torch.tensor(2.5, dtype=torch.float64), 0.01, 0.9, 0.999, 1e-8
    opt = proximal_adam(a, (b1, b2), eps)
    state, params = opt.init({"w": theta}), {"w": theta}
    m = v = torch.zeros(5, dtype=torch.float64)
    ref = theta.clone()
    for t in range(1, 6):
        gr = torch.randn(5, generator=g, dtype=torch.float64)
        params, state = opt.update({"w": gr}, state, params, {"w": phi}, {"w": lam})
        m, v = b1 * m + (1 - b1) * gr, b2 * v + (1 - b2) * gr ** 2
        mhat, vhat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        half = ref - a * mhat / (vhat.sqrt() + eps)                       # Adam(theta, g, a)
        ref = (half - phi) / (1 + lam * a / torch.sqrt(vhat + eps)) + phi  # Alg. 3 prox step
        assert torch.allclose(params["w"], ref, atol=1e-14)
    # without a prior it is plain Adam
    p1, _ = proximal_adam(a).update({"w": gr}, proximal_adam(a).init({"w": theta}), {"w": theta})
    p2, _ = adam(a).update({"w": gr}, adam(a).init({"w": theta}), {"w": theta})
    assert torch.equal(p1["w"], p2["w"])


def test_conjugate_gradient_solves_spd_system_and_reports():
    g = torch.Generator().manual_seed(2)
    A = torch.randn(6, 6, generator=g, dtype=torch.float64)
    A = A @ A.T + 0.5 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    x, res, iters = conjugate_gradient(lambda v: {"a": A @ v["a"]}, {"a": b}, None, steps=6)
    assert torch.allclose(x["a"], torch.linalg.solve(A, b), atol=1e-9)
    assert res < 1e-8 and int(iters) == 6
    x1, res1, _ = conjugate_gradient(lambda v: {"a": A @ v["a"]}, {"a": b}, None, steps=1)
    assert res1 > 1e-3  # one step is not enough, and it says so
    # a diagonal preconditioner gives the same solution
    xp, _, _ = conjugate_gradient(lambda v: {"a": A @ v["a"]}, {"a": b}, {"a": 1 / torch.diagonal(A)}, steps=12)
    assert torch.allclose(xp["a"], torch.linalg.solve(A, b), atol=1e-9)


# ---------------------------------------------------------------------------------- sigma-MAML
def _query_loss_fn(alg, learner, xs, ys, xq, yq):
    def J(meta):
        lam = learner.lam(meta["log_sigma2"], xs) if alg.uses_prior else None
        theta = learner.adapt(meta["phi"], lam, xs, ys, first_order=False)
        return learner.data_loss(theta, xq, yq)
    return J


@pytest.mark.parametrize("arch", ["mlp", "conv4"])
@pytest.mark.parametrize("inner", ["proximal_gd", "sgd", "proximal_adam"])
def test_sigma_maml_meta_gradient_matches_finite_differences(arch, inner):
    alg, learner, meta, batch = make(arch, alg_cfg("sigma_maml"), inner=inner, lr=0.05, steps=3)
    task = batch.task(0)
    delta, _ = alg.task_update(meta, *task)
    J = _query_loss_fn(alg, learner, *task)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        d = random_like(meta, g)
        num = fd(J, meta, d)
        an = tree_dot(delta["phi"], d["phi"]) + (delta["log_sigma2"] * d["log_sigma2"]).sum()
        assert abs(float(num - an)) < 1e-8 * max(1.0, abs(float(num))), (float(num), float(an))
    # log sigma^2 really receives gradient (through the prox step / the prior term)
    assert delta["log_sigma2"].abs().max() > 1e-6


def test_first_order_drops_only_the_second_order_terms():
    alg, learner, meta, batch = make("mlp", alg_cfg("maml"), inner="sgd", lr=0.05, steps=2)
    fo, _, _, _ = make("mlp", alg_cfg("fomaml"), inner="sgd", lr=0.05, steps=2)
    task = batch.task(0)
    d2, _ = alg.task_update(meta, *task)
    d1, _ = fo.task_update(meta, *task)
    theta = learner.adapt(meta["phi"], None, task.xs, task.ys)
    g_q = grad(lambda th: learner.data_loss(th, task.xq, task.yq))(theta)
    assert torch.allclose(flat(d1["phi"]), flat(g_q), atol=1e-12)  # FOMAML = query gradient at theta
    assert not torch.allclose(flat(d2["phi"]), flat(g_q), atol=1e-6)


# ---------------------------------------------------------------------------------- sigma-iMAML
def _converge(learner, meta, xs, ys, theta):
    """Newton iterations on l_train = data loss + prior, to machine precision."""
    lam = learner.lam(meta["log_sigma2"], xs)
    phi = meta["phi"]

    def ltrain(vec):
        th = unflat(vec, phi)
        return learner.data_loss(th, xs, ys) + prior_penalty(th, phi, lam)

    v = flat(theta)
    for _ in range(30):
        v = v - torch.linalg.solve(hessian(ltrain)(v), grad(ltrain)(v))
    return unflat(v, phi), ltrain


def _dense_implicit(learner, meta, task):
    """-g_val H^-1 H_{theta Phi} with a materialised Hessian (test only), Phi = (phi, log sigma^2)."""
    theta, ltrain = _converge(learner, meta, task.xs, task.ys, learner.adapt(meta["phi"], learner.lam(meta["log_sigma2"], task.xs), task.xs, task.ys))
    v = flat(theta)
    H = hessian(ltrain)(v)
    assert torch.linalg.eigvalsh(H).min() > 0  # a strict local minimum: the implicit function theorem applies
    gval = grad(lambda vec: learner.data_loss(unflat(vec, meta["phi"]), task.xq, task.yq))(v)

    def grad_theta(phi_vec, ls):
        m = {"phi": unflat(phi_vec, meta["phi"]), "log_sigma2": ls}
        lam = learner.lam(ls, task.xs)
        return grad(lambda vec: learner.data_loss(unflat(vec, m["phi"]), task.xs, task.ys)
                    + prior_penalty(unflat(vec, m["phi"]), m["phi"], lam))(v)

    Hphi, Hls = jacrev(grad_theta, argnums=(0, 1))(flat(meta["phi"]), meta["log_sigma2"])
    u = torch.linalg.solve(H, gval)
    return -(u @ Hphi), -(u @ Hls), theta


def test_sigma_imaml_matches_dense_hessian_solve_and_finite_differences():
    cfg = alg_cfg("sigma_imaml", cg_steps=80)
    alg, learner, meta, batch = make("mlp", cfg, inner="sgd", lr=0.2, steps=3000)
    task = batch.task(1)
    delta, metrics = alg.task_update(meta, *task)
    d_phi, d_ls, theta_hat = _dense_implicit(learner, meta, task)
    assert torch.allclose(flat(delta["phi"]), d_phi, atol=1e-7, rtol=1e-6)
    assert torch.allclose(delta["log_sigma2"], d_ls, atol=1e-7, rtol=1e-6)
    assert float(metrics["cg_residual"]) < 1e-8

    # finite differences of the validation loss at the converged inner solution
    def V(m):
        th, _ = _converge(learner, m, task.xs, task.ys, theta_hat)
        return learner.data_loss(th, task.xq, task.yq)

    g = torch.Generator().manual_seed(4)
    for _ in range(2):
        d = random_like(meta, g)
        num = fd(V, meta, d)
        an = (d_phi * flat(d["phi"])).sum() + (d_ls * d["log_sigma2"]).sum()
        assert abs(float(num - an)) < 1e-7 * max(1.0, abs(float(num))), (float(num), float(an))


def test_appendix_b2_constant_sigma2_gives_imaml_meta_gradient():
    lam, d = 2.0, 0.3
    _, learner, _, batch = make("mlp", alg_cfg("imaml", lam=lam), inner="proximal_gd", lr=0.1, steps=60)
    task = batch.task(2)
    # the effective precision on the family's mean loss: lambda * w, w = 1 / n_support (Eq. 4's balance)
    lam_eff = lam * learner.family.prior_weight(task.xs.shape[0])
    assert lam_eff == lam / task.xs.shape[0]
    # d-tilde = d * lambda (App. D.2), both on Eq. 4's scale: the algorithm scales d-tilde by w as it does Sigma^-1
    cfg = alg_cfg("sigma_imaml", cg_steps=80, damping=d * lam)
    alg, learner, meta, batch = make("mlp", cfg, inner="proximal_gd", lr=0.1, steps=60)
    meta["log_sigma2"] = torch.full_like(meta["log_sigma2"], -math.log(lam))
    imaml, _, _, _ = make("mlp", alg_cfg("imaml", lam=lam, damping=d, cg_steps=80), inner="proximal_gd", lr=0.1, steps=60)
    d_sigma, _ = alg.task_update(meta, *task)
    d_imaml, _ = imaml.task_update(meta, *task)
    # Eq. 47 with a dense Hessian of the data loss at the same adapted theta
    theta = learner.adapt(meta["phi"], learner.lam(meta["log_sigma2"], task.xs), task.xs, task.ys)
    v = flat(theta)
    H = hessian(lambda vec: learner.data_loss(unflat(vec, meta["phi"]), task.xs, task.ys))(v)
    gval = grad(lambda vec: learner.data_loss(unflat(vec, meta["phi"]), task.xq, task.yq))(v)
    ref = torch.linalg.solve((1 + d) * torch.eye(len(v), dtype=v.dtype) + H / lam_eff, gval)
    assert torch.allclose(flat(d_sigma["phi"]), ref, atol=1e-6, rtol=0)
    assert torch.allclose(flat(d_imaml["phi"]), ref, atol=1e-6, rtol=0)
    assert torch.all(d_imaml["log_sigma2"] == 0)  # iMAML's lambda is fixed


# ---------------------------------------------------------------------------------- limits
def test_large_sigma2_sigma_maml_becomes_maml():
    sm, _, meta, batch = make("mlp", alg_cfg("sigma_maml"), inner="proximal_gd", lr=0.05, steps=3)
    maml, _, _, _ = make("mlp", alg_cfg("maml"), inner="sgd", lr=0.05, steps=3)
    meta["log_sigma2"] = torch.full_like(meta["log_sigma2"], math.log(1e5))
    task = batch.task(0)
    a, _ = sm.task_update(meta, *task)
    b, _ = maml.task_update(meta, *task)
    rel = (flat(a["phi"]) - flat(b["phi"])).norm() / flat(b["phi"]).norm()
    assert rel < 1e-5


def test_large_sigma2_sigma_reptile_takes_reptile_direction():
    sr, _, meta, batch = make("mlp", alg_cfg("sigma_reptile"), inner="proximal_gd", lr=0.05, steps=5)
    rep, _, _, _ = make("mlp", alg_cfg("reptile"), inner="sgd", lr=0.05, steps=5)
    meta["log_sigma2"] = torch.full_like(meta["log_sigma2"], math.log(1e5))
    task = batch.task(0)
    # both fit phi's update on the task's whole dataset (support + query)
    a, _ = sr.task_update(meta, *task)
    b, _ = rep.task_update(meta, *task)
    # sigma-Reptile's phi update divided by lambda = w / sigma^2 (a learning rate proportional to sigma^2) is
    # Reptile's phi - theta
    n_all = task.xs.shape[0] + task.xq.shape[0]
    scaled = flat(a["phi"]) * 1e5 / sr.learner.family.prior_weight(n_all)
    assert torch.nn.functional.cosine_similarity(scaled, flat(b["phi"]), dim=0) > 1 - 1e-9
    assert (scaled - flat(b["phi"])).norm() / flat(b["phi"]).norm() < 1e-5


# ---------------------------------------------------------------------------------- vmap == loop
@pytest.mark.parametrize("arch", ["mlp", "conv4"])
@pytest.mark.parametrize("name", ALL)
def test_vmap_equals_loop_float64(arch, name):
    from torch.func import vmap
    inner = "sgd" if name in ("maml", "fomaml", "reptile") else "proximal_gd"
    alg, _, meta, batch = make(arch, alg_cfg(name), inner=inner, lr=0.05, steps=2)
    vm_delta, vm_metrics = vmap(alg.task_update, in_dims=(None, 0, 0, 0, 0))(meta, *batch)
    for i in range(batch.xs.shape[0]):
        d, m = alg.task_update(meta, *batch.task(i))
        assert torch.allclose(flat(d["phi"]), flat({k: v[i] for k, v in vm_delta["phi"].items()}), atol=1e-10, rtol=1e-9)
        assert torch.allclose(d["log_sigma2"], vm_delta["log_sigma2"][i], atol=1e-10, rtol=1e-9)
        for k in m:
            assert torch.allclose(m[k], vm_metrics[k][i], atol=1e-10, rtol=1e-9)


def test_vmap_of_grad_is_exact_with_batch_norm():
    """The batch-norm pitfall: the mean of per-task vmap(grad) equals the loop, and FD agrees."""
    alg, learner, meta, batch = make("conv4", alg_cfg("sigma_maml"), inner="proximal_gd", lr=0.05, steps=2)
    from torch.func import vmap
    deltas, _ = vmap(alg.task_update, in_dims=(None, 0, 0, 0, 0))(meta, *batch)
    mean_phi = {k: v.mean(0) for k, v in deltas["phi"].items()}

    def J(m):
        total = 0
        for i in range(batch.xs.shape[0]):
            total = total + _query_loss_fn(alg, learner, *batch.task(i))(m)
        return total / batch.xs.shape[0]

    d = random_like(meta, torch.Generator().manual_seed(5))
    d["log_sigma2"] = torch.zeros_like(d["log_sigma2"])
    num = fd(J, meta, d)
    assert abs(float(num - tree_dot(mean_phi, d["phi"]))) < 1e-8 * max(1, abs(float(num)))


def test_reverse_and_forward_hessian_vector_products_agree():
    alg, _, meta, batch = make("mlp", alg_cfg("sigma_imaml", cg_steps=10), inner="proximal_gd", lr=0.05, steps=3)
    task = batch.task(0)
    fwd, _ = alg.task_update(meta, *task)
    alg.hvp = "reverse"
    rev, _ = alg.task_update(meta, *task)
    assert torch.allclose(flat(fwd["phi"]), flat(rev["phi"]), atol=1e-12)
    assert torch.allclose(fwd["log_sigma2"], rev["log_sigma2"], atol=1e-12)


# ---------------------------------------------------------------------------------- eager autograd == torch.func
@pytest.mark.parametrize("arch", ["mlp", "conv4"])
@pytest.mark.parametrize("name,inner", [("maml", "sgd"), ("maml", "adam"), ("fomaml", "sgd"),
                                        ("sigma_maml", "sgd"), ("sigma_maml", "proximal_gd"),
                                        ("sigma_maml", "proximal_adam")])
def test_eager_task_update_equals_the_torch_func_one_float64(arch, name, inner):
    """The trainer's per-task loop runs ``eager_task_update`` (plain autograd, create_graph) and vmap runs
    ``task_update`` (torch.func): one function, so the meta-gradients must agree to rounding."""
    alg, _, meta, batch = make(arch, alg_cfg(name), inner=inner, lr=0.05, steps=3)
    for i in range(batch.xs.shape[0]):
        d, m = alg.eager_task_update(meta, *batch.task(i))
        ref, mref = alg.task_update(meta, *batch.task(i))
        scale = max(1.0, float(flat(ref["phi"]).abs().max()))
        assert float((flat(d["phi"]) - flat(ref["phi"])).abs().max()) < 1e-12 * scale
        assert float((d["log_sigma2"] - ref["log_sigma2"]).abs().max()) < 1e-12 * scale
        assert float((m["query_loss"] - mref["query_loss"]).abs()) < 1e-12
        assert not d["phi"]["fc0.weight" if arch == "mlp" else "conv0.weight"].requires_grad
    if name == "sigma_maml" and inner != "proximal_gd":
        # the prior is a term of the inner objective: log sigma^2 gets a real meta-gradient to compare
        assert float(ref["log_sigma2"].abs().max()) > 1e-8


@pytest.mark.parametrize("variant", ["strided", "maxpool"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv4_one_channel_first_layer_is_the_convolution(variant, channels_last):
    """Conv4's first layer on grey images is an im2col matrix product (core.models._conv_one_channel): the same
    function, values and gradients, as F.conv2d, looped and under vmap."""
    from torch.func import grad, vmap
    from core.models import Conv4
    import torch.nn.functional as F
    torch.manual_seed(0)
    model = Conv4((1, 28, 28), 5, channels=8, variant=variant, channels_last=channels_last).double()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    x = torch.rand(3, 6, 1, 28, 28, dtype=torch.float64)

    def reference(p, x):
        stride = 2 if variant == "strided" else 1
        for i in range(4):
            x = F.conv2d(x, p[f"conv{i}.weight"], p[f"conv{i}.bias"], stride, 1)
            x = F.relu(F.batch_norm(x, None, None, p[f"bn{i}.weight"], p[f"bn{i}.bias"], True, 0.0, 1e-5))
            if variant == "maxpool" and x.shape[-1] >= 2:
                x = F.max_pool2d(x, 2)
        return F.linear(x.flatten(1), p["head.weight"], p["head.bias"])

    def loss(f):
        return lambda p, x: (f(p, x) ** 2).sum()

    for i in range(3):
        assert torch.allclose(model.functional(params, x[i]), reference(params, x[i]), atol=1e-12, rtol=0)
    g = vmap(grad(loss(model.functional)), in_dims=(None, 0))(params, x)
    g_ref = vmap(grad(loss(reference)), in_dims=(None, 0))(params, x)
    for k in params:
        assert torch.allclose(g[k], g_ref[k], atol=1e-11, rtol=0), k
