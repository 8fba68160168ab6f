"""One job across ranks (core/distributed.py) on CPU with gloo: world size 2 (and 3) against world size 1.

Each multi-rank run starts fresh processes (torch.multiprocessing.spawn) joined through a TCPStore that the test
hosts; rank 0 writes its results to a file. Tolerance: the ranks see exactly the world-size-1 meta-batch, so
the only difference is the order of float additions in the meta-batch mean (world size 1 sums w_t * delta_t in
float32; the ranks sum the finite tasks' deltas in float64 and divide by the global finite count), amplified by
Adam over the steps. Measured max |difference| of phi / log sigma^2 after 20 float32 steps with diverging tasks
(2 cores, torch 2.13): 5.96e-08 for maml and for sigma_maml (one float32 ulp at the parameters' magnitude,
~0.5); world size 3, float64: 2.8e-17. The test allows TOL = 1e-6 (about 16 ulps) in float32 and 1e-12 in
float64.
"""
from __future__ import annotations

import math

import pytest
import torch

from core import MetaTrainer
from core.distributed import Comm, follow, run_local, shard
from core.trainer import reduce_tasks
from schemas import JobConfig

TOL = 1e-6
STEPS = 20


def config(alg: str, steps: int = STEPS, meta_batch: int = 8, dtype: str = "float32", seed: int = 3) -> dict:
    return JobConfig.model_validate({
        "algorithm": {"name": alg}, "model": {"arch": "mlp", "hidden": [20, 20]},
        "modules": {"partition": "per_tensor"}, "tasks": {"family": "sinusoid", "shots": 5, "query": 5},
        "inner": {"steps": 2}, "outer": {"meta_batch": meta_batch, "steps": steps},
        "execution": {"vectorize": "vmap", "device": "cpu", "dtype": dtype}, "seed": seed,
    }).model_dump(mode="json")


def poison(trainer):
    """Make one task of some meta-batches diverge (targets of 1e30: its inner loss overflows to inf), in rank 0's
    share on odd steps and in rank 1's on every third step, so the finite-task mean has to drop tasks on either
    side and count them."""
    sample = trainer.family.sample

    def poisoned(n, g, split="train"):
        b = sample(n, g, split)
        ys = b.ys.clone()
        if trainer.step_count % 2 == 1:
            ys[1] = ys[1] * 1e30
        if trainer.step_count % 3 == 0:
            ys[n - 2] = ys[n - 2] * 1e30
        return b._replace(ys=ys)

    trainer.family.sample = poisoned


def state(trainer) -> dict:
    return {k: v.clone() for k, v in trainer.state_dict()[0].items()}


def run_single(cfg, poisoned=False, steps=None):
    trainer = MetaTrainer(cfg)
    if poisoned:
        poison(trainer)
    hist = [trainer.step() for _ in range(steps or trainer.total_steps)]
    return state(trainer), hist


def _rank(comm: Comm, cfg, poisoned, out, steps, resume_from):
    """One rank of a multi-rank run: rank 0 drives ``steps`` meta-steps (from ``resume_from``'s state when
    given) and every rank writes its final state."""
    trainer = MetaTrainer(cfg, comm=comm)
    if poisoned:
        poison(trainer)
    if comm.rank == 0:
        if resume_from:
            trainer.load_state_dict(*torch.load(resume_from, weights_only=True))
        comm.sync_state(trainer)
        hist = [trainer.step() for _ in range(steps)]
        comm.stop()
        torch.save({"hist": hist, "checkpoint": trainer.state_dict()}, f"{out}.result")
    else:
        follow(trainer)
    torch.save(state(trainer), f"{out}.rank{comm.rank}")


def run_ranks(tmp_path, cfg, world_size, poisoned=False, steps=None, resume_from=None, name="run"):
    out = str(tmp_path / name)
    run_local(_rank, world_size, cfg, poisoned, out, steps or cfg["outer"]["steps"], resume_from)
    ranks = [torch.load(f"{out}.rank{r}", weights_only=True) for r in range(world_size)]
    for r in range(1, world_size):  # every rank holds the same phi, optimiser state and RNG, bit for bit
        assert ranks[r].keys() == ranks[0].keys()
        for k in ranks[0]:
            assert torch.equal(ranks[r][k], ranks[0][k]), (r, k)
    res = torch.load(f"{out}.result", weights_only=True)
    return ranks[0], res["hist"], res["checkpoint"]


def max_diff(a: dict, b: dict) -> float:
    keys = [k for k in a if k.startswith(("phi.", "log_sigma2", "extra."))]
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in keys)


def test_shard_covers_the_meta_batch_disjointly():
    for n in (1, 2, 7, 8, 25):
        for w in range(1, n + 1):
            idx = [i for r in range(w) for i in range(n)[shard(n, r, w)]]
            assert idx == list(range(n)), (n, w)
            sizes = [len(range(n)[shard(n, r, w)]) for r in range(w)]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_rank_reduction_is_reduce_tasks_on_one_rank():
    """With one rank (no process group needed: the all-reduce of a world of one is the identity) the sums and
    counts give reduce_tasks's finite-task mean, skip count and metric means."""
    class One(Comm):
        def all_reduce_sum(self, t):
            return t

    g = torch.Generator().manual_seed(0)
    deltas = {"phi": {"w": torch.randn(6, 3, 2, generator=g), "b": torch.randn(6, 2, generator=g)},
              "log_sigma2": torch.randn(6, 2, generator=g)}
    deltas["phi"]["w"][2, 1, 0] = float("inf")
    deltas["log_sigma2"][4, 0] = float("nan")
    metrics = {"query_loss": torch.rand(6, generator=g)}
    want_d, want_m = reduce_tasks(deltas, metrics)
    got_d, got_m = One(0, 1).reduce_tasks(deltas, metrics)
    assert float(got_m["skipped_tasks"]) == float(want_m["skipped_tasks"]) == 2
    assert torch.allclose(got_m["query_loss"], want_m["query_loss"], rtol=1e-6)
    for a, b in zip(torch.utils._pytree.tree_leaves(got_d), torch.utils._pytree.tree_leaves(want_d)):
        assert torch.isfinite(a).all() and torch.allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("alg", ["maml", "sigma_maml"])
def test_world_size_2_equals_world_size_1_with_diverging_tasks(tmp_path, alg):
    """Same seed, same tasks: after 20 meta-steps (with a diverging task in many meta-batches, on either
    rank's share) world size 2 holds the world-size-1 meta-parameters within TOL, skipped the same tasks, and
    its RNG is the world-size-1 job's, bit for bit."""
    cfg = config(alg)
    one, hist1 = run_single(cfg, poisoned=True)
    two, hist2, _ = run_ranks(tmp_path, cfg, 2, poisoned=True)
    skipped1 = [m["skipped_tasks"] for m in hist1]
    assert skipped1 == [m["skipped_tasks"] for m in hist2]
    assert sum(skipped1) >= STEPS // 2 and max(skipped1) == 2  # both kinds of poisoned batch occurred
    assert torch.equal(one["rng"], two["rng"])
    d = max_diff(one, two)
    print(f"{alg}: world size 2 vs 1 after {STEPS} steps: max |diff| = {d:.3g}")
    assert d <= TOL, d
    for a, b in zip(hist1, hist2):  # the metric means include the diverged tasks (inf/NaN on both sides)
        qa, qb = a["query_loss"], b["query_loss"]
        assert (not math.isfinite(qa) and not math.isfinite(qb)) or math.isclose(qa, qb, rel_tol=1e-5), (qa, qb)


@pytest.mark.slow
def test_world_size_3_uneven_split_float64(tmp_path):
    """7 tasks over 3 ranks (3 + 2 + 2), float64: the difference is float64 reduction order only."""
    cfg = config("sigma_maml", steps=10, meta_batch=7, dtype="float64")
    one, _ = run_single(cfg)
    three, _, _ = run_ranks(tmp_path, cfg, 3)
    d = max_diff(one, three)
    print(f"sigma_maml float64: world size 3 vs 1 after 10 steps: max |diff| = {d:.3g}")
    assert d <= 1e-12, d


def test_multi_rank_resume_is_bit_exact(tmp_path):
    """A world-size-2 run checkpointed by rank 0 after 5 of 10 steps and resumed in a fresh process group ends
    bit for bit where the uninterrupted world-size-2 run ends."""
    cfg = config("sigma_maml", steps=10)
    full, _, _ = run_ranks(tmp_path, cfg, 2, name="full")
    _, _, ck = run_ranks(tmp_path, cfg, 2, steps=5, name="first")
    torch.save(ck, tmp_path / "ck.pt")
    resumed, _, _ = run_ranks(tmp_path, cfg, 2, steps=5, resume_from=str(tmp_path / "ck.pt"), name="second")
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def test_vectorize_auto_takes_rank_0s_choice(tmp_path):
    """execution.vectorize 'auto' times vmap and the loop on every rank; all ranks then run rank 0's choice (the
    ranks stay bit-identical, which run_ranks checks) and rank 0's checkpoint records it."""
    cfg = config("maml", steps=3)
    cfg["execution"]["vectorize"] = "auto"
    _, _, (_, meta) = run_ranks(tmp_path, cfg, 2)
    assert meta["vectorize"] in ("vmap", "loop") and meta["step"] == 3
