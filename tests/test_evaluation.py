"""Evaluation: CIs on known distributions, equivalence with MetaModel.adapt, module choices, and one small
end-to-end Omniglot 5-way 1-shot meta-training whose held-out accuracy must beat chance (20%) by far."""
import math
import time

import pytest
import torch

from core import MetaModel, MetaTrainer
from core.evaluation import evaluate, mean_ci
from core.tasks import build_family
from schemas.job import JobConfig


def config(**over):
    base = {"algorithm": {"name": "sigma_imaml"}, "model": {"arch": "mlp", "hidden": [8]},
            "tasks": {"family": "sinusoid"}, "inner": {"lr": 0.01, "steps": 5}}
    base.update(over)
    return JobConfig.model_validate(base).model_dump()


def test_mean_ci_formula_and_coverage():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(50, generator=g, dtype=torch.float64)
    r = mean_ci(v)
    assert r["n"] == 50 and r["std"] == pytest.approx(float(v.std(unbiased=True)))
    assert r["ci95"] == pytest.approx(2.009575 * r["std"] / math.sqrt(50), rel=1e-5)  # t_{0.975, 49}
    # coverage of the true mean (0): close to 95% at 50 values and at 3 (where 1.96 would cover ~82%)
    for n in (50, 3):
        samples = torch.randn(4000, n, generator=g, dtype=torch.float64)
        hits = sum(abs(mean_ci(s)["mean"]) <= mean_ci(s)["ci95"] for s in samples)
        assert 0.93 <= hits / 4000 <= 0.97, (n, hits / 4000)


def test_t_quantile_against_known_values():
    from core.evaluation import paired, t975
    for df, q in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (30, 2.0423), (40, 2.0211), (60, 2.0003),
                  (120, 1.9799), (1000, 1.9623)):
        assert t975(df) == pytest.approx(q, abs=2e-4)
    d = paired([1.0, 2.0, 4.0], [0.5, 1.0, 3.0])  # differences 0.5, 1, 1
    assert d["mean"] == pytest.approx(5 / 6) and d["n"] == 3
    with pytest.raises(ValueError):
        paired([1.0], [1.0, 2.0])


def test_evaluate_known_distribution():
    """Univariate hierarchical normal at phi = phi_true, step 0: E[query loss] = Q (sigma^2 + 1) / 2."""
    cfg = config(algorithm={"name": "sigma_reptile"}, model={"arch": "identity"},
                 tasks={"family": "hierarchical_normal", "phi_true": 1.5, "sigma2_true": 3.0, "shots": 10, "query": 4},
                 inner={"lr": 0.05, "steps": 10})
    mm = MetaModel(cfg, {"theta.0": torch.tensor(1.5)}, torch.tensor([math.log(3.0)]))
    r = evaluate(mm, n_tasks=4000, steps=[0, 200], modules="all", split="test", batch_size=500)
    assert r["metric"] == "loss"
    s0, s200 = r["results"]
    expect = 4 * (3.0 + 1) / 2
    assert abs(s0["mean"] - expect) < 3 * s0["ci95"] and s0["ci95"] < 0.05 * expect
    # after adaptation (MAP with the true prior), the expected query loss is Q/2 (1 + posterior variance)
    post = 1 / (1 / 3.0 + 10)
    assert abs(s200["mean"] - 4 * (1 + post) / 2) < 3 * s200["ci95"]


@pytest.mark.parametrize("alg, opt", [("sigma_imaml", "proximal_gd"), ("maml", "sgd"), ("sigma_reptile", "adam")])
def test_evaluate_matches_metamodel_adapt(alg, opt):
    cfg = config(algorithm={"name": alg}, inner={"lr": 0.02, "steps": 5, "optimizer": opt})
    trainer = MetaTrainer(cfg)
    trainer.meta["log_sigma2"] = torch.linspace(-2, 1, len(trainer.partition.names))
    mm = trainer.meta_model()
    fam = build_family(cfg["tasks"])
    for modules in ("selected", "all"):
        r = evaluate(mm, fam, n_tasks=3, steps=[0, 3, 7], modules=modules, generator=torch.Generator().manual_seed(1))
        batch = fam.sample(3, torch.Generator().manual_seed(1), "test")
        for step in (0, 3, 7):
            mse = []
            for i in range(3):
                t = batch.task(i)
                res = mm.adapt(t.xs, t.ys, steps=step, modules=modules)
                mse.append(float(((mm.predict(t.xq, res.params) - t.yq) ** 2).mean()))
            row = next(x for x in r["results"] if x["step"] == step)
            assert row["mean"] == pytest.approx(sum(mse) / 3, rel=1e-4, abs=1e-6)


def test_evaluate_each_module_and_loop_fallback():
    mm = MetaTrainer(config()).meta_model()
    r = evaluate(mm, n_tasks=6, steps=[0, 2], modules="each", batch_size=4)
    assert [x["modules"] for x in r["results"]] == ["fc0", "fc0", "fc1", "fc1"]
    assert all(x["n"] == 6 for x in r["results"])
    # step 0 is phi itself whichever module adapts
    assert r["results"][0]["mean"] == pytest.approx(r["results"][2]["mean"])
    for mode in ("loop", "adapt"):
        r2 = evaluate(mm, n_tasks=6, steps=[0, 2], modules="each", batch_size=4, vectorize=mode)
        assert r2["vectorize"] == mode
        for a, b in zip(r["results"], r2["results"]):
            assert a["mean"] == pytest.approx(b["mean"], rel=1e-5)


def test_end_to_end_omniglot_5way_1shot_beats_chance():
    """Meta-train a tiny conv4 (16 channels) with MAML on Omniglot 5-way 1-shot (rotations, held-out characters)
    for 150 meta-steps, then evaluate on 200 test-split tasks: accuracy must be far above chance (0.2).

    One intra-op thread: on a 2-core machine shared with other processes, PyTorch's default of 2 threads made
    these small convolutions ~10x slower (0.81 vs 0.084 s per meta-step, measured)."""
    import datasets
    from datasets.omniglot import default_directory
    if not list(default_directory().glob("images_*.zip")):
        pytest.skip("no Omniglot zips")
    cfg = JobConfig.model_validate({
        "algorithm": {"name": "maml"}, "model": {"arch": "conv4", "channels": 16},
        "tasks": {"family": "image_classes", "source": "omniglot", "ways": 5, "shots": 1, "query": 5,
                  "rotations": True, "split": {"by": "class", "test_fraction": 0.2, "seed": 0}},
        "inner": {"lr": 0.4, "steps": 1}, "outer": {"steps": 150, "meta_batch": 8, "lr_phi": 3e-3},
        "execution": {"device": "cpu", "vectorize": "vmap"}, "seed": 0}).model_dump()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        trainer = MetaTrainer(cfg)
        trainer.run()
        train_s = time.perf_counter() - t0
        train_chars = set(trainer.family.classes("train").tolist())
        assert not train_chars & set(trainer.family.classes("test").tolist())
        r = evaluate(trainer.meta_model(), n_tasks=200, steps=[0, 1, 3], modules="all", split="test")
    finally:
        torch.set_num_threads(threads)
    acc = {x["step"]: x for x in r["results"]}
    print(f"train {train_s:.1f}s; test accuracy " +
          ", ".join(f"step {s}: {a['mean']:.3f} +- {a['ci95']:.3f}" for s, a in acc.items()))
    assert r["metric"] == "accuracy"
    assert acc[0]["mean"] == pytest.approx(0.2, abs=0.05)  # an untrained head at phi: chance on average
    assert acc[3]["mean"] - acc[3]["ci95"] > 0.5


@pytest.mark.parametrize("vectorize", ["loop", "adapt"])
def test_diverged_tasks_are_counted_not_averaged(vectorize):
    mm = MetaTrainer(config(algorithm={"name": "maml"})).meta_model()
    ev = evaluate(mm, n_tasks=12, steps=[0, 200], modules="all", lr=1e3, vectorize=vectorize)
    first, last = ev["results"]
    assert first["diverged"] == 0 and first["n"] == 12 and math.isfinite(first["mean"])
    assert last["diverged"] > 0 and last["n"] + last["diverged"] == 12
    assert last["n"] == 0 or math.isfinite(last["mean"])


def test_validated_selection_scores_the_prefixes_of_the_sigma2_ranking():
    from core import validated_selection
    cfg = config(algorithm={"name": "sigma_reptile"}, modules={"partition": "per_tensor"},
                 inner={"lr": 0.01, "steps": 3}, outer={"steps": 3})
    t = MetaTrainer(cfg)
    t.run()
    mm = t.meta_model()
    with torch.no_grad():
        mm.log_sigma2.copy_(torch.tensor([2.0, 1.0, -5.0, -6.0], dtype=mm.log_sigma2.dtype))
    r = validated_selection(mm, n_tasks=20, steps=50)
    assert r["ranking"] == ["fc0.weight", "fc0.bias", "fc1.weight", "fc1.bias"] and r["horizon"] == 50
    assert [e["modules"] for e in r["evidence"]] == [r["ranking"][:k] for k in range(1, 5)]
    assert r["evidence"][-1]["diff_vs_all"] == 0 and r["evidence"][-1]["within"]
    first = next(e for e in r["evidence"] if e["within"])  # the smallest prefix within one SE of "all"
    assert r["selected"] == first["modules"] and first["diff_vs_all"] <= first["se"]
    # a prefix that is worse than "all" by more than its standard error is not within
    assert all(e["diff_vs_all"] > e["se"] for e in r["evidence"][:len(first["modules"]) - 1])
