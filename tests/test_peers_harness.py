"""benchmarks/peers.py (the peer harness): its gradient-equality check, so that its timings compare one computation.

The ``torch`` contender (a hand-written autograd unroll of second-order MAML / sigma-MAML with Adam outer step)
needs no peer package: it runs in the main venv and is checked against ``MetaTrainer`` on every run of the suite.
The torchopt and higher contenders are checked where those packages are installed (``make peers`` builds
.venv-peers with them; ``.venv-peers/bin/python -m pytest tests/test_peers_harness.py``) and skipped elsewhere.
"""
import pytest
import torch

from benchmarks import peers

TOL = 1e-12  # float64 meta-gradients; measured differences are ~1e-16 to 2e-14 relative
# after one Adam step: a coordinate whose meta-gradient is ~0 (conv biases before batch-norm) moves by
# lr * g / (|g| + eps), so gradient rounding differences come back multiplied by up to lr / eps = 1e5
STEP_TOL = TOL * peers.OUTER_LR / 1e-8


def _assert_match(check):
    scale = max(1.0, check["grad_scale"])
    for name, d in check["peers"].items():
        for key in ("grad_phi", "grad_log_sigma2"):
            assert d[key] <= TOL * scale, (name, key, d)
        for key in ("step_phi", "step_log_sigma2"):
            assert d[key] <= STEP_TOL * scale, (name, key, d)


@pytest.mark.parametrize("alg", peers.ALGS)
def test_sinusoid_meta_gradient_and_step_match_the_torch_reference(alg):
    c = peers.gradient_check("sinusoid", alg, ["torch"], meta_batch=4, steps=3)
    assert c["meta_batch"] == 4 and c["inner_steps"] == 3
    assert c["grad_scale"] > 1e-3
    if alg == "sigma_maml":
        # with more than one inner step the prior term moves theta, so log sigma^2 gets a real meta-gradient
        assert c["log_sigma2_grad_scale"] > 1e-8
    else:
        assert c["log_sigma2_grad_scale"] == 0.0
    _assert_match(c)


def test_the_check_catches_a_different_computation():
    """Negative control: a reference with another inner learning rate is reported as different."""
    ours = peers.Ours("sinusoid", "maml", "float64", meta_batch=4, steps=3)
    g = torch.Generator().manual_seed(1)
    batch = ours.trainer.family.sample(4, g).to("cpu", torch.float64)
    ref, _ = ours.meta_grad(batch)
    same = peers.TorchRef("sinusoid", "maml", ours.phi0(), ours.log_sigma2_0(), torch.float64,
                          ours.trainer.learner.lr, 3)
    other = peers.TorchRef("sinusoid", "maml", ours.phi0(), ours.log_sigma2_0(), torch.float64,
                           ours.trainer.learner.lr * 1.01, 3)
    assert peers._maxdiff(same.meta_grad(batch)[0], ref) < 1e-14
    assert peers._maxdiff(other.meta_grad(batch)[0], ref) > 1e-6


def test_sigma_prior_is_written_peer_side_as_ours():
    """The peers' prior (module index per layer, lambda = 1 / (n sigma^2), clamp) against core's."""
    from core.modules import per_param, prior_penalty
    ours = peers.Ours("sinusoid", "sigma_maml", "float64", meta_batch=2, steps=1)
    phi = ours.phi0()
    ls2 = torch.tensor([-0.3, 0.7, 20.0], dtype=torch.float64)  # 20 is clamped to log 1e5
    theta = {k: v + 0.1 * torch.randn_like(v) for k, v in phi.items()}
    lam_ours = per_param(ours.trainer.partition, ours.trainer.learner.lam_modules(ls2, torch.zeros(10, 1)))
    lams = peers.prior_lams(ls2, peers.module_index(list(phi)), 10)
    got = peers.prior_term(list(theta.values()), list(phi.values()), lams)
    assert torch.allclose(got, prior_penalty(theta, phi, lam_ours), rtol=1e-14, atol=0)


@pytest.mark.skipif(not peers.omniglot_available(), reason="no Omniglot zips (../shared/data/omniglot)")
def test_conv4_omniglot_sigma_maml_matches_the_torch_reference():
    c = peers.gradient_check("omniglot-5", "sigma_maml", ["torch"], meta_batch=2, steps=2)
    assert c["log_sigma2_grad_scale"] > 1e-8
    _assert_match(c)


@pytest.mark.parametrize("peer", peers.peers_for("sinusoid", peers.PEER_NAMES))
def test_peer_package_matches_ours_on_sinusoid(peer):
    if not peers.available(peer):
        pytest.skip(f"{peers.PEER_MODULE[peer]} is not installed in this venv (make peers builds .venv-peers with it)")
    for alg in peers.ALGS:
        _assert_match(peers.gradient_check("sinusoid", alg, [peer], meta_batch=4, steps=3))


def test_write_section_replaces_only_the_peers_section(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## A\n\na\n\n## Peers\n\nold\n\n## B\n\nb\n")
    peers.write_section("## Peers\n\nnew\n", path)
    assert path.read_text() == "# Benchmark results\n\n## A\n\na\n\n## Peers\n\nnew\n\n## B\n\nb\n"
    peers.write_section("## Peers\n\nnewer\n", path)
    assert "newer" in path.read_text() and "## B\n\nb\n" in path.read_text() and "\nnew\n" not in path.read_text()
    path.write_text("# Benchmark results\n\n## A\n\na\n")
    peers.write_section("## Peers\n\nx\n", path)
    assert path.read_text() == "# Benchmark results\n\n## A\n\na\n\n## Peers\n\nx\n"
