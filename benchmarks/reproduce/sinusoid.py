"""Sinusoid regression (Finn protocol, 10-shot; paper App. E.3 and Sec. 5.3's long-adaptation claim).

    python -m benchmarks.reproduce.sinusoid            # CPU size: minutes on 2 cores
    python -m benchmarks.reproduce.sinusoid --full     # paper-sized (Table 7 step counts; GPU machine)

MAML, iMAML, Reptile and their sigma variants on the same 1-40-40-1 MLP with per-tensor modules (the six
modules {w_i, b_i} of App. E.3), each meta-trained from 5 seeds with the same number of meta-steps. Reports
query MSE with 95% CIs over held-out tasks vs adaptation step (to 1,000 steps: long adaptation), the learned
sigma^2 per module, and adapt-one-module curves (Fig. 13). Writes docs/results/sinusoid.md and PNG plots.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from benchmarks.reproduce.common import (RESULTS, curve, fmt, machine, plot_bars, plot_curves, results_table,
                                         train, write)
from core import evaluate

METHODS = ["maml", "imaml", "reptile", "sigma_maml", "sigma_imaml", "sigma_reptile"]
STEPS = [0, 1, 5, 10, 50, 100, 500, 1000]


def body(method: str, seed: int, meta_steps: int) -> dict:
    alg = {"name": method}
    inner = {"lr": 0.01, "steps": 10}
    if method in ("sigma_maml", "sigma_imaml", "sigma_reptile"):
        alg["init_sigma2"] = 1.0
    if method == "sigma_imaml":
        alg.update(cg_steps=2, damping=0.01)
    if method == "sigma_reptile":
        alg.update(cg_steps=2, damping=0.5)
    if method == "imaml":
        alg.update(lam=1.0, cg_steps=5, damping=0.01)
    if method in ("maml", "sigma_maml"):
        inner["steps"] = 5
    return {"algorithm": alg, "model": {"arch": "mlp", "hidden": [40, 40]}, "modules": {"partition": "per_tensor"},
            "tasks": {"family": "sinusoid", "shots": 10, "query": 10}, "inner": inner,
            "outer": {"meta_batch": 10, "steps": meta_steps, "lr_phi": 3e-3, "lr_log_sigma2": 0.01},
            "execution": {"vectorize": "vmap"}, "seed": seed}


def run(seeds=5, meta_steps=300, n_tasks=100):
    out = {}
    for method in METHODS:
        per_seed = []
        for seed in range(seeds):
            trainer, cpu = train(body(method, seed, meta_steps))
            mm = trainer.meta_model()
            ev = evaluate(mm, n_tasks=n_tasks, steps=STEPS, modules="selected", seed=10_000 + seed)
            each = evaluate(mm, n_tasks=n_tasks, steps=[0, 10, 100], modules="each", seed=10_000 + seed) \
                if (seed == 0 and mm.learns_sigma) else None
            per_seed.append({"eval": ev, "each": each, "cpu_s": cpu,
                             "sigma2": [float(s) for s in mm.sigma2()] if mm.learns_sigma else None,
                             "selected": mm.selected_modules(), "modules": list(mm.partition.names)})
        out[method] = per_seed
    return out


def pooled(per_seed, step):
    """Mean over seeds of the per-seed mean MSE, CI from the spread across seeds (n = seeds)."""
    from core import mean_ci
    vals = [next(r["mean"] for r in s["eval"]["results"] if r["step"] == step) for s in per_seed]
    return mean_ci(vals)


def report(out, seeds, meta_steps, n_tasks):
    lines = ["# Sinusoid regression: MSE vs adaptation step (Finn protocol, 10-shot)", "",
             f"Machine: {machine()}. Each method: {seeds} seeds x {meta_steps} meta-steps (meta-batch 10), "
             f"1-40-40-1 ReLU MLP, six per-tensor modules; evaluated on {n_tasks} held-out tasks per seed, "
             "adapting the modules each method selects (all modules for the methods without sigma^2) with its "
             "inner optimizer. CI: 95% over the seeds' mean MSEs (n = seeds).", "",
             "| method | CPU s / seed | " + " | ".join(f"step {s}" for s in STEPS) + " |",
             "|---|---|" + "---|" * len(STEPS)]
    curves = {}
    for method, per_seed in out.items():
        stats = [pooled(per_seed, s) for s in STEPS]
        cpu = sum(s["cpu_s"] for s in per_seed) / len(per_seed)
        lines.append(f"| {method} | {cpu:.0f} | " + " | ".join(fmt(p["mean"], p["ci95"]) for p in stats) + " |")
        curves[method] = (STEPS, [p["mean"] for p in stats], [p["ci95"] for p in stats])
    plot_curves(os.path.join(RESULTS, "sinusoid_mse.png"), curves, "adaptation step", "query MSE",
                "Sinusoid: MSE vs adaptation step", logy=True, logx=True)
    lines += ["", "![MSE vs step](sinusoid_mse.png)", "", "## Learned sigma^2 per module (seed 0)", ""]
    names = out["sigma_reptile"][0]["modules"]
    lines += ["| method | " + " | ".join(names) + " | selected |", "|---|" + "---|" * (len(names) + 1)]
    bars = {}
    for method in ("sigma_maml", "sigma_imaml", "sigma_reptile"):
        s0 = out[method][0]
        bars[method] = s0["sigma2"]
        lines.append(f"| {method} | " + " | ".join(f"{v:.3g}" for v in s0["sigma2"]) + f" | {', '.join(s0['selected'])} |")
    plot_bars(os.path.join(RESULTS, "sinusoid_sigma2.png"), bars, names, "sigma^2", "Sinusoid: learned sigma^2")
    lines += ["", "![sigma^2](sinusoid_sigma2.png)", "", "## Adapting one module at a time (seed 0; App. E.3, Fig. 13)", ""]
    for method in ("sigma_maml", "sigma_imaml", "sigma_reptile"):
        lines += [f"**{method}**", ""] + results_table([(method, out[method][0]["each"])], [0, 10, 100]) + [""]
    best = {m: min(STEPS, key=lambda s: pooled(out[m], s)["mean"]) for m in out}
    lines += ["## Long adaptation", "",
              "Step with the lowest mean MSE per method (pooled over seeds): " +
              ", ".join(f"{m} {best[m]}" for m in out) + ". Whether MSE at step 1000 is above the best step is "
              "read off the table above; see the closing note of issue 4 for the interpretation.", ""]
    return write("sinusoid.md", lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--meta-steps", type=int, default=300)
    p.add_argument("--tasks", type=int, default=100)
    p.add_argument("--full", action="store_true", help="paper size: 100k meta-steps (a GPU machine)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    steps = 100_000 if a.full else a.meta_steps
    out = run(a.seeds, steps, a.tasks)
    print(report(out, a.seeds, steps, a.tasks))
    print(json.dumps({m: [pooled(v, s)["mean"] for s in STEPS] for m, v in out.items()}))


if __name__ == "__main__":
    main()
