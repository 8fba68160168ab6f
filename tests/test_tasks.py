"""Task samplers: ranges, shapes, reproducibility, splits, App. C true parameters, config wiring."""
import math

import pytest
import torch

from core.tasks import HierarchicalNormal, Polynomial, RegressionTasks, Sinusoid, build_family, register_source
from schemas.job import JobConfig


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def tasks_cfg(**tasks):
    model = {"arch": "identity"} if tasks["family"] == "hierarchical_normal" else {"arch": "mlp"}
    return JobConfig.model_validate({"algorithm": {"name": "maml"}, "model": model, "tasks": tasks}).model_dump()["tasks"]


def test_sinusoid_ranges_and_frequency():
    fam = build_family(tasks_cfg(family="sinusoid", frequency=(0.8, 1.2)))
    a, b, w = fam.sample_functions(5000, gen())
    assert 0.1 <= a.min() and a.max() <= 5.0 and 0 <= b.min() and b.max() <= math.pi
    assert 0.8 <= w.min() and w.max() <= 1.2 and w.std() > 0.1
    batch = fam.sample(7, gen())
    assert batch.xs.shape == (7, 10, 1) and batch.yq.shape == (7, 10, 1)
    assert batch.xs.abs().max() <= 5.0 and batch.ys.abs().max() <= 5.0
    # y = A sin(w x - b) with the drawn function
    g = gen(3)
    a, b, w = fam.sample_functions(2, g)
    x = torch.empty(0)
    batch = fam.sample(2, gen(3))
    x = batch.xs.double()
    expect = a.view(2, 1, 1) * torch.sin(w.view(2, 1, 1) * x - b.view(2, 1, 1))
    torch.testing.assert_close(batch.ys.double(), expect, atol=1e-5, rtol=1e-5)
    assert Sinusoid().sample_functions(100, gen())[2].eq(1).all()  # no frequency: w = 1


def test_polynomial_coefficients_and_values():
    fam = build_family(tasks_cfg(family="polynomial", order=3, x_range=(-2.0, 2.0)))
    assert isinstance(fam, Polynomial) and fam.order == 3
    c = fam.sample_functions(4000, gen())
    assert c.shape == (4000, 4) and c.min() >= -1 and c.max() <= 1
    assert abs(float(c.mean())) < 0.05 and abs(float(c.var()) - 1 / 3) < 0.02  # U[-1, 1]
    batch = fam.sample(3, gen(1))
    c = fam.sample_functions(3, gen(1))
    x = torch.cat([batch.xs, batch.xq], 1).double().squeeze(-1)
    y = torch.cat([batch.ys, batch.yq], 1).double().squeeze(-1)
    assert x.abs().max() <= 2.0
    expect = sum(c[:, i:i + 1] * x ** i for i in range(4))
    torch.testing.assert_close(y, expect, atol=1e-4, rtol=1e-4)
    # order 0: constant functions
    b0 = Polynomial(order=0).sample(2, gen())
    assert torch.allclose(b0.ys, b0.ys[:, :1].expand_as(b0.ys))


@pytest.mark.parametrize("family", ["sinusoid", "polynomial"])
def test_seeds_reproduce(family):
    fam = build_family(tasks_cfg(family=family))
    a, b, c = fam.sample(4, gen(5)), fam.sample(4, gen(5)), fam.sample(4, gen(6))
    for t, u in zip(a, b):
        assert torch.equal(t, u)
    assert not torch.equal(a.ys, c.ys)


def test_linear_true_parameters():
    fam = build_family(tasks_cfg(family="hierarchical_normal", variant="linear"))
    assert torch.equal(fam.true_sigma2, torch.tensor([64.0] * 4 + [4.0] * 4, dtype=torch.float64))
    assert torch.equal(fam.true_phi, torch.ones(8, dtype=torch.float64))
    assert torch.equal(fam.xi, torch.tensor([8.0] * 4 + [5.0] * 4 + [1.0], dtype=torch.float64))
    assert fam.param_dim == 8 and fam.output_dim == 9
    theta = torch.arange(8.0, dtype=torch.float64)
    torch.testing.assert_close(fam.transform(theta), torch.cat([theta, theta.sum().view(1) / math.sqrt(8)]))
    # the generator: x ~ N(mu(theta), xi^2), theta ~ N(phi, sigma^2). With many observations per task the
    # support mean estimates mu(theta_t) and its first M coordinates are theta_t.
    big = HierarchicalNormal("linear", shots=2000, query=1)
    b = big.sample(3000, gen())
    theta_hat = b.ys.mean(1)[:, :8]  # = theta + noise of variance xi^2 / 2000
    var = theta_hat.var(0) - big.xi[:8] ** 2 / 2000
    assert torch.allclose(theta_hat.mean(0), big.true_phi, atol=0.5)
    assert torch.allclose(var, big.true_sigma2, rtol=0.1)


def test_swirl_true_parameters():
    fam = HierarchicalNormal("swirl")
    assert torch.equal(fam.true_sigma2, torch.tensor([16.0] * 8 + [64.0] * 2, dtype=torch.float64))
    assert torch.equal(fam.true_phi, 2 * torch.ones(10, dtype=torch.float64))
    assert torch.equal(fam.xi, 10 * torch.ones(10, dtype=torch.float64))
    theta = torch.randn(10, generator=gen(), dtype=torch.float64)
    mu = fam.transform(theta)
    pairs, mpairs = theta.view(5, 2), mu.view(5, 2)
    # a rotation of each pair: norms kept, angle advanced by omega * ||pair|| with omega = pi / 5
    torch.testing.assert_close(mpairs.norm(dim=1), pairs.norm(dim=1))
    ang = torch.atan2(mpairs[:, 1], mpairs[:, 0]) - torch.atan2(pairs[:, 1], pairs[:, 0])
    expect = math.pi / 5 * pairs.norm(dim=1)
    torch.testing.assert_close(torch.remainder(ang - expect + math.pi, 2 * math.pi) - math.pi,
                               torch.zeros(5, dtype=torch.float64), atol=1e-9, rtol=0)


def test_univariate_fixed_tasks():
    fam = build_family(tasks_cfg(family="hierarchical_normal", n_tasks=50, phi_true=1.0, sigma2_true=4.0), seed=3)
    full = fam.sample(50, gen())
    assert full.ys.shape == (50, 10, 1)
    again = build_family(tasks_cfg(family="hierarchical_normal", n_tasks=50, phi_true=1.0, sigma2_true=4.0), seed=3)
    assert torch.equal(again.sample(50, gen()).ys, full.ys)


def test_regression_tasks_split_and_sampling():
    data = [(torch.full((30, 1), float(i)), torch.full((30, 1), float(i))) for i in range(10)]
    fam = RegressionTasks(data, shots=5, query=5, test_fraction=0.3, split_seed=1)
    assert len(fam.splits["test"]) == 3 and not set(fam.splits["test"]) & set(fam.splits["train"])
    b = fam.sample(20, gen(), "test")
    assert b.xs.shape == (20, 5, 1) and b.yq.shape == (20, 5, 1)
    assert set(b.xs[:, 0, 0].long().tolist()) <= set(fam.splits["test"])
    assert torch.equal(b.xs, b.ys)
    with pytest.raises(ValueError, match="fewer than"):
        RegressionTasks(data, shots=20, query=20)


def test_prior_weight_keeps_eq4_balance_for_multi_output_regression():
    """A d-output regression loss averages over n * d elements, so its prior weight is 1 / (n d): the minimiser of
    the mean loss plus the weighted prior is the minimiser of the summed loss plus the unweighted prior (Eq. 4's
    balance), whatever d is. With 1 / n it would be a ridge d times too strong."""
    from core.modules import prior_penalty
    g = gen(3)
    x, y = torch.randn(40, 2, generator=g).double(), torch.randn(40, 3, generator=g).double()
    fam = RegressionTasks([(x, y)] * 4, shots=8, query=8, test_fraction=0.25)
    assert fam.output_dim == 3 and fam.prior_weight(8) == pytest.approx(1 / 24)
    xs, ys, sigma2 = x[:8], y[:8], 0.7
    # summed squared error + ||w||^2 / (2 sigma^2): closed form (X^T X + I / (2 sigma^2))^-1 X^T Y
    w_sum = torch.linalg.solve(xs.T @ xs + torch.eye(2, dtype=xs.dtype) / (2 * sigma2), xs.T @ ys)
    # the family's mean loss + prior_penalty at lambda = w / sigma^2: its gradient vanishes at w_sum
    w = w_sum.clone().requires_grad_()
    lam = {"w": torch.tensor(fam.prior_weight(8) / sigma2, dtype=xs.dtype)}
    obj = fam.loss(xs @ w, ys) + prior_penalty({"w": w}, {"w": torch.zeros_like(w)}, lam)
    (g_w,) = torch.autograd.grad(obj, w)
    assert float(g_w.abs().max()) < 1e-12
    # the old weight 1 / n moves the minimiser
    lam_old = {"w": torch.tensor(1 / 8 / sigma2, dtype=xs.dtype)}
    obj = fam.loss(xs @ w, ys) + prior_penalty({"w": w}, {"w": torch.zeros_like(w)}, lam_old)
    assert float(torch.autograd.grad(obj, w)[0].abs().max()) > 1e-3


def test_image_family_via_registry():
    imgs = torch.randint(0, 256, (12, 6, 10, 10), dtype=torch.uint8, generator=gen())
    register_source("_unit", lambda cfg: {"images": imgs, "groups": [i // 3 for i in range(12)]})
    cfg = JobConfig.model_validate({"algorithm": {"name": "maml"}, "model": {"arch": "conv4", "channels": 4},
                                    "tasks": {"family": "image_classes", "source": "dataset", "dataset_id": "x",
                                              "ways": 2, "shots": 2, "query": 2, "image_size": 8}}).model_dump()
    fam = build_family({**cfg["tasks"], "source": "_unit"})
    assert fam.kind == "classification" and fam.input_shape == (1, 8, 8) and fam.output_dim == 2
    with pytest.raises(ValueError, match="no loader registered"):
        build_family({**cfg["tasks"], "source": "nowhere"})


def test_schema_compat():
    base = {"algorithm": {"name": "maml"}}
    with pytest.raises(ValueError, match="image task family"):
        JobConfig.model_validate({**base, "model": {"arch": "conv4"}, "tasks": {"family": "sinusoid"}})
    JobConfig.model_validate({**base, "model": {"arch": "conv4"}, "tasks": {"family": "image_classes"}})
    JobConfig.model_validate({**base, "model": {"arch": "mlp"}, "tasks": {"family": "image_classes"}})
    with pytest.raises(ValueError, match="dataset_id"):
        JobConfig.model_validate({**base, "model": {"arch": "conv4"},
                                  "tasks": {"family": "image_classes", "source": "dataset"}})
    with pytest.raises(ValueError):
        JobConfig.model_validate({**base, "model": {"arch": "mlp"},
                                  "tasks": {"family": "image_classes", "split": {"test_fraction": 0.6, "val_fraction": 0.5}}})
    with pytest.raises(ValueError):
        JobConfig.model_validate({**base, "model": {"arch": "mlp"}, "tasks": {"family": "polynomial", "bogus": 1}})
    cfg = JobConfig.model_validate({**base, "model": {"arch": "mlp"},
                                    "tasks": {"family": "regression_dataset", "dataset_id": ["a", "b"]}})
    assert cfg.tasks.dataset_id == ["a", "b"]


def test_schema_dataset_id_contract_without_family():
    """The issue's upload contract: ``{"dataset_id": ID, "ways": ...}`` is an image job, without ways a regression one."""
    base = {"algorithm": {"name": "maml"}}
    img = JobConfig.model_validate({**base, "model": {"arch": "conv4"}, "tasks": {
        "dataset_id": "ID", "ways": 5, "shots": 1, "query": 15, "image_size": 28, "rotations": True,
        "split": {"by": "class", "test_fraction": 0.2, "seed": 0}}})
    assert img.tasks.family == "image_classes" and img.tasks.source == "dataset"
    reg = JobConfig.model_validate({**base, "model": {"arch": "mlp"}, "tasks": {"dataset_id": "ID", "shots": 10, "query": 10}})
    assert reg.tasks.family == "regression_dataset"
    again = JobConfig.model_validate(reg.model_dump(mode="json"))  # stored verbatim, read back by the worker
    assert again == reg
    with pytest.raises(ValueError, match="tasks.family must be one of"):
        JobConfig.model_validate({**base, "model": {"arch": "mlp"}, "tasks": {"family": "nope"}})
