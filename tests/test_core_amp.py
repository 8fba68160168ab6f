"""execution.amp (bf16 autocast of conv4's convolutions), on CPU: it runs, it is what it says, and off it changes
nothing. The CUDA counterpart is tests/test_core_cuda.py::test_amp_on_gpu_runs_bf16_convolutions."""
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch.utils._python_dispatch import TorchDispatchMode

from core import MetaModel, MetaTrainer
from core.models import Conv4, init_params
from schemas import JobConfig
from tests.gpu_helpers import AMP_SIZE, cosine_and_rel, job, meta_tensors


class ConvDtypes(TorchDispatchMode):
    """Records the dtype of every aten convolution's output."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.convolution, torch.ops.aten.mkldnn_convolution,
                                   torch.ops.aten._convolution):
            self.dtypes.append(out.dtype)
        return out


def _plain_conv4(params, x, stride=2):
    """Conv4's strided forward written out independently: the float32 computation amp=false must equal."""
    for i in range(4):
        x = F.conv2d(x, params[f"conv{i}.weight"], params[f"conv{i}.bias"], stride, 1)
        x = F.relu(F.batch_norm(x, None, None, params[f"bn{i}.weight"], params[f"bn{i}.bias"], True, 0.0, 1e-5))
    return F.linear(x.flatten(1), params["head.weight"], params["head.bias"])


def test_amp_schema():
    base = {"algorithm": {"name": "maml"}, "model": {"arch": "conv4"}, "tasks": {"family": "image_classes"}}
    assert JobConfig.model_validate(base).execution.amp is False
    assert JobConfig.model_validate({**base, "execution": {"amp": True}}).execution.amp is True
    with pytest.raises(ValidationError, match="execution.amp"):
        JobConfig.model_validate({"algorithm": {"name": "maml"}, "model": {"arch": "mlp"},
                                  "tasks": {"family": "sinusoid"}, "execution": {"amp": True}})
    with pytest.raises(ValidationError, match="execution.amp"):
        JobConfig.model_validate({**base, "execution": {"amp": True, "dtype": "float64"}})
    doc = JobConfig.model_json_schema()["$defs"]["Execution"]["properties"]["amp"]
    assert doc["default"] is False and "bfloat16" in doc["description"]


def test_amp_false_changes_nothing():
    model = Conv4((1, 14, 14), 3, channels=8)
    params = init_params(model, torch.Generator().manual_seed(0))
    x = torch.rand(6, 1, 14, 14, generator=torch.Generator().manual_seed(1))
    with ConvDtypes() as seen:
        out = model.functional(params, x)
    # the first layer of a one-channel input is an im2col matrix product (core.models._conv_one_channel): the
    # same function to rounding; the other three are float32 convolutions
    assert torch.allclose(out, _plain_conv4(params, x), atol=1e-5, rtol=0) and seen.dtypes == [torch.float32] * 3
    # meta-training and adaptation: amp false is bit for bit a config stored before the field existed
    cfg = job("sigma_maml", "conv4", "float32", "loop")
    old = {**cfg, "execution": {k: v for k, v in cfg["execution"].items() if k != "amp"}}
    assert cfg["execution"]["amp"] is False
    a, b = MetaTrainer(cfg), MetaTrainer(old)
    assert a.run() == b.run()
    ta, tb = meta_tensors(a), meta_tensors(b)
    assert all(torch.equal(ta[k], tb[k]) for k in tb)
    batch = a.family.sample(1, torch.Generator().manual_seed(3))
    ra = a.meta_model().adapt(batch.xs[0], batch.ys[0], steps=3)
    mm_old = MetaModel({k: v for k, v in old.items() if k != "execution"}, b.meta["phi"], b.meta["log_sigma2"])
    rb = mm_old.adapt(batch.xs[0], batch.ys[0], steps=3)
    assert ra.loss_curve == rb.loss_curve


def test_amp_true_runs_bf16_convolutions_on_cpu():
    model = Conv4((1, 28, 28), 5, channels=32, amp=True)
    params = init_params(model, torch.Generator().manual_seed(0))
    x = torch.rand(10, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with ConvDtypes() as seen:
        out = model.functional(params, x)
    assert seen.dtypes == [torch.bfloat16] * 4  # the convolutions, and only they, in bf16
    assert out.dtype == torch.float32
    ref = _plain_conv4(params, x)
    assert not torch.equal(out, ref) and torch.allclose(out, ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("alg", ["maml", "sigma_maml"])
def test_amp_meta_training_and_adapt_on_cpu(alg):
    t32 = MetaTrainer(job(alg, "conv4", "float32", "loop", **AMP_SIZE))
    tamp = MetaTrainer(job(alg, "conv4", "float32", "loop", execution={"amp": True}, **AMP_SIZE))
    assert tamp.model.amp and not t32.model.amp
    batch = t32._with_noise(t32.sample())
    d32, m32 = t32.task_updates(batch)
    damp, mamp = tamp.task_updates(batch)
    # measured here: cosine 0.958-0.963, relative error 0.27-0.29 (bf16 keeps 8 mantissa bits), loss within 0.6%
    cos, rel = cosine_and_rel(damp, d32)
    assert cos >= 0.85 and rel > 0, (cos, rel)
    assert float(mamp["query_loss"].mean()) == pytest.approx(float(m32["query_loss"].mean()), rel=0.03)
    # vmap of the bf16 convolutions (grouped per task) runs too
    dv, _ = tamp.task_updates(batch, "vmap")
    assert cosine_and_rel(dv, damp)[0] > 0.99
    for m in tamp.run(steps=2).values():
        assert m == m and abs(m) != float("inf")
    assert all(v.dtype == torch.float32 for v in tamp.meta["phi"].values())
    mm = tamp.meta_model()  # the published model adapts with the forward it was trained with
    assert mm.model.amp
    b = tamp.family.sample(1, torch.Generator().manual_seed(4))
    res = mm.adapt(b.xs[0], b.ys[0], steps=3)
    assert len(res.loss_curve) == 4 and all(v == v for v in res.loss_curve)
    assert mm.predict(b.xq[0], res.params).dtype == torch.float32
