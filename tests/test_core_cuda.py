"""The CUDA path: every algorithm's meta-step on the GPU against the CPU, adaptation on the GPU, and where
tensors live (model, outer-optimizer state, checkpoints written from a GPU trainer and read on a CPU).

Run on a machine with a CUDA device (``benchmarks/gpu.sh`` runs this file and records the result in
benchmarks/RESULTS.md); elsewhere every test is reported as skipped.

Stated tolerances:

- float64, 3 whole meta-steps (sampling, per-task updates, mean, Adam outer update) on each device from the same
  seed: every meta-learned tensor (phi, log sigma^2, the algorithm's extra tensors) and every metric within
  rtol 1e-6 / atol 1e-9 of the CPU's. The only differences are float64 reduction orders (~1e-16 relative), which
  Adam's first steps amplify by at most lr / eps.
- float32, one meta-batch's per-task meta-updates on identical tasks: relative error (global 2-norm over every
  task's update) at most 1e-3 for the MLP (cuBLAS float32, no TF32 by default) and 2e-2 for conv4 (cuDNN
  convolutions use TF32 by default: a 10-bit mantissa, ~5e-4 per product, through 4 layers, the inner steps and
  their derivatives).
"""
import pytest
import torch

from core import MetaModel, MetaTrainer
from core.trainer import resolve_device
from tests.gpu_helpers import ALGORITHMS, AMP_SIZE, cosine_and_rel, job, meta_tensors, rel_err

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="no CUDA device (torch.cuda.is_available() is False): the GPU "
                                "path is checked on a GPU machine with benchmarks/gpu.sh")

F64 = {"rtol": 1e-6, "atol": 1e-9}
F32_REL = {"mlp": 1e-3, "conv4": 2e-2}
ARCHS = ["mlp", "conv4"]


def _vectorize(arch):
    return "vmap" if arch == "mlp" else "loop"


def _tree_leaves(tree):
    return torch.utils._pytree.tree_leaves(tree)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("alg", ALGORITHMS + [{"name": "maml", "second_order": "hvp"}],
                         ids=lambda a: a if isinstance(a, str) else "maml-hvp")
def test_meta_steps_on_gpu_equal_cpu_float64(alg, arch):
    cfg = job(alg, arch, "float64", _vectorize(arch), steps=3)
    cpu, gpu = MetaTrainer(cfg, device="cpu"), MetaTrainer(cfg, device="cuda")
    for _ in range(3):
        m_cpu, m_gpu = cpu.step(), gpu.step()
        assert m_cpu.keys() == m_gpu.keys()
        for k in m_cpu:
            assert m_gpu[k] == pytest.approx(m_cpu[k], rel=F64["rtol"], abs=F64["atol"]), k
    a, b = meta_tensors(gpu), meta_tensors(cpu)
    assert a.keys() == b.keys()
    for k in b:
        torch.testing.assert_close(a[k], b[k], **F64, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("alg", ALGORITHMS)
def test_per_task_updates_on_gpu_match_cpu_float32(alg, arch):
    cfg = job(alg, arch, "float32", _vectorize(arch))
    cpu, gpu = MetaTrainer(cfg, device="cpu"), MetaTrainer(cfg, device="cuda")
    batch = cpu._with_noise(cpu.sample())  # the same tasks and noise on both devices
    d_cpu, _ = cpu.task_updates(batch)
    d_gpu, _ = gpu.task_updates(tuple(t.to("cuda") for t in batch))
    flat = lambda d: {str(i): t for i, t in enumerate(_tree_leaves(d))}  # noqa: E731
    assert all(t.device.type == "cuda" for t in _tree_leaves(d_gpu))
    err = rel_err(flat(d_gpu), flat(d_cpu))
    assert err <= F32_REL[arch], f"{alg} {arch}: relative error {err:.2e} > {F32_REL[arch]:g}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("alg", ["sigma_maml", "sigma_reptile", "meta_sgd", "mtnet"])
def test_adapt_on_gpu_equals_cpu(alg, arch):
    trainer = MetaTrainer(job(alg, arch, "float64", _vectorize(arch)), device="cpu")
    trainer.run()
    tensors = trainer.meta_model().tensors()
    cfg = trainer.config
    batch = trainer.family.sample(1, torch.Generator().manual_seed(9))
    xs, ys, xq = batch.xs[0].numpy(), batch.ys[0].numpy(), batch.xq[0].numpy()
    cpu = MetaModel.from_tensors(cfg, tensors, device="cpu")
    gpu = MetaModel.from_tensors(cfg, tensors, device="cuda")
    assert all(v.device.type == "cuda" for v in gpu.phi.values()) and gpu.log_sigma2.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in gpu.model.parameters())
    r_cpu, r_gpu = cpu.adapt(xs, ys, steps=15, modules="all"), gpu.adapt(xs, ys, steps=15, modules="all")
    assert all(v.device.type == "cuda" for v in r_gpu.params.values())
    assert r_gpu.adapted_modules == r_cpu.adapted_modules and r_gpu.diverged_at_step == r_cpu.diverged_at_step
    assert r_gpu.loss_curve == pytest.approx(r_cpu.loss_curve, rel=F64["rtol"], abs=F64["atol"])
    torch.testing.assert_close(gpu.predict(xq, r_gpu.params).cpu(), cpu.predict(xq, r_cpu.params), **F64)
    # an adapter (only the adapted tensors, stored on CPU) applied on the GPU model
    adapter = {k: v.cpu() for k, v in r_gpu.adapter(gpu.partition).items()}
    params = {**gpu.phi, **{k: v.to(gpu.device) for k, v in adapter.items()}}
    torch.testing.assert_close(gpu.predict(xq, params).cpu(), cpu.predict(xq, r_cpu.params), **F64)


@pytest.mark.parametrize("alg", ["sigma_maml", "meta_sgd"])
def test_device_placement_and_gpu_checkpoint_resumes_on_cpu(alg, tmp_path):
    from safetensors.torch import load_file, save_file

    assert resolve_device("auto").type == "cuda"
    cfg = job(alg, "conv4", "float64", "loop", steps=6)
    gpu = MetaTrainer(cfg, device="cuda")
    assert all(p.device.type == "cuda" for p in gpu.model.parameters())
    gpu.run(steps=3)
    assert all(t.device.type == "cuda" for t in _tree_leaves(gpu.meta))
    assert all(t.device.type == "cuda" for t in _tree_leaves(gpu.outer_state))  # Adam's moments and counts
    tensors, meta = gpu.state_dict()
    assert all(t.device.type == "cpu" for t in tensors.values())
    save_file(tensors, str(tmp_path / "ckpt.safetensors"))
    loaded = load_file(str(tmp_path / "ckpt.safetensors"))  # a file written from a GPU trainer, read on CPU
    cpu = MetaTrainer(cfg, device="cpu")
    cpu.load_state_dict(loaded, meta)
    assert cpu.step_count == 3
    assert all(t.device.type == "cpu" for t in _tree_leaves(cpu.meta) + _tree_leaves(cpu.outer_state))
    cpu.run()
    gpu.run()  # the uninterrupted GPU run and the GPU-to-CPU resumed one agree
    a, b = meta_tensors(gpu), meta_tensors(cpu)
    for k in b:
        torch.testing.assert_close(a[k], b[k], **F64, msg=lambda m, k=k: f"{k}: {m}")
    # the published meta-model: CPU tensors, loadable on either device
    mm = gpu.meta_model()
    stored = mm.tensors()
    assert all(t.device.type == "cpu" for t in stored.values())
    save_file(stored, str(tmp_path / "model.safetensors"))
    back = MetaModel.from_tensors(cfg, load_file(str(tmp_path / "model.safetensors")), device="cpu")
    x = cpu.family.sample(1, torch.Generator().manual_seed(2)).xq[0]
    torch.testing.assert_close(back.predict(x), mm.predict(x.cuda()).cpu(), **F64)


@pytest.mark.parametrize("alg", ["maml", "sigma_maml"])
def test_amp_on_gpu_runs_bf16_convolutions(alg):
    """execution.amp on CUDA: finite meta-steps, float32 parameters, and a meta-update near the float32 one. bf16
    keeps 8 mantissa bits: on CPU's bf16 autocast this comparison measured cosine 0.958-0.963 and relative error
    0.27-0.29 (MAML, sigma-MAML; float32 against float64: 7e-7), mean query loss within 0.6%; asserted: cosine
    >= 0.85, query loss within 3%."""
    t32 = MetaTrainer(job(alg, "conv4", "float32", "loop", **AMP_SIZE), device="cuda")
    tamp = MetaTrainer(job(alg, "conv4", "float32", "loop", execution={"amp": True}, **AMP_SIZE), device="cuda")
    batch = t32._with_noise(t32.sample())
    d32, m32 = t32.task_updates(batch)
    damp, mamp = tamp.task_updates(batch)
    cos, rel = cosine_and_rel(damp, d32)
    assert cos >= 0.85 and rel > 0, (cos, rel)
    assert float(mamp["query_loss"].mean()) == pytest.approx(float(m32["query_loss"].mean()), rel=0.03)
    for m in tamp.run().values():
        assert m == m and abs(m) != float("inf")
    assert all(v.dtype == torch.float32 and v.device.type == "cuda" for v in tamp.meta["phi"].values())
