"""Sinusoid regression (Finn protocol, 10-shot; paper App. E.3, Fig. 13, and Sec. 5.3's long adaptation).

    python -m benchmarks.reproduce.sinusoid tune  --methods maml sigma_maml      # the tuning grid, on val
    python -m benchmarks.reproduce.sinusoid final --methods maml sigma_maml      # 5 seeds x 20,000 meta-steps
    python -m benchmarks.reproduce.sinusoid defaults --methods maml sigma_maml   # configs naming only 3 fields
    python -m benchmarks.reproduce.sinusoid report                               # docs/results/sinusoid.md
    python -m benchmarks.reproduce.sinusoid all                                  # all four, in order

Phases write their raw results to ``docs/results/raw/sinusoid_<phase>_<method>.json`` so that several
processes can run methods in parallel; ``report`` reads them.

Protocol (equal for every method):
- model: 1-40-40-1 ReLU MLP, six per-tensor modules {w_i, b_i} (App. E.3); meta-batch 25, Adam outer.
- tuning budget: the same grid for every method, lr_phi in {1e-3, 3e-3} x inner lr in {0.01, 0.03} (5 inner
  steps; the algorithm's other settings at their schema defaults), one seed, ``TUNE_STEPS`` meta-steps each,
  scored on 200 tasks of the ``val`` stream (a generator of its own, never the test tasks) by the mean of the
  query MSE after 10 and after 100 adaptation steps. The best grid point is used for ``final``.
- final: ``FINAL_SEEDS`` seeds x ``FINAL_STEPS`` meta-steps (compiled meta-step), each seed evaluated on 100
  held-out ``test`` tasks (as App. E.3) adapting the default modules (``selected``: all modules under the
  learned prior unless sigma^2 separated by ln 100) with the training inner optimizer and learning rate, to
  1,000 steps. CI: 95% over the 5 seeds' mean MSEs (n = 5, t-free 1.96 * s / sqrt(5), as ``core.mean_ci``).
- defaults: the configs name only the algorithm, ``model.arch: mlp`` and ``tasks.family: sinusoid`` (every
  other field at its schema default: 1,000 meta-steps), 5 seeds: the issue-10 acceptance check.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from benchmarks.reproduce.common import RESULTS, fmt, machine, plot_bars, plot_curves, train, write
from core import build_family, evaluate, mean_ci
from schemas.job import SinusoidTasks

METHODS = ["maml", "sigma_maml", "reptile", "sigma_reptile", "imaml", "sigma_imaml"]
SIGMA = ("sigma_maml", "sigma_imaml", "sigma_reptile")
STEPS = [0, 1, 5, 10, 50, 100, 500, 1000]
GRID = [{"lr_phi": lp, "inner_lr": il} for lp in (1e-3, 3e-3) for il in (0.01, 0.03)]
TUNE_STEPS, TUNE_SEED = 5000, 100
FINAL_STEPS, FINAL_SEEDS = 20_000, 5
RAW = os.path.join(RESULTS, "raw")
# Sec. 5.3's long adaptation on a neural network: the same models adapted on 5 support points (half of
# meta-training's 10) for up to 10,000 steps, where adapting everything can overfit
FEW = build_family(SinusoidTasks(family="sinusoid", shots=5, query=10).model_dump(), 0)
LONG_STEPS = [0, 10, 100, 1000, 3000, 10_000]


def body(method: str, seed: int, meta_steps: int, hp: dict, compile: bool = True) -> dict:
    return {"algorithm": {"name": method}, "model": {"arch": "mlp", "hidden": [40, 40]},
            "modules": {"partition": "per_tensor"}, "tasks": {"family": "sinusoid", "shots": 10, "query": 10},
            "inner": {"lr": hp["inner_lr"], "steps": 5},
            "outer": {"meta_batch": 25, "steps": meta_steps, "lr_phi": hp["lr_phi"]},
            "execution": {"vectorize": "vmap", "compile": compile}, "seed": seed}


def default_body(method: str, seed: int) -> dict:
    return {"algorithm": {"name": method}, "model": {"arch": "mlp"}, "tasks": {"family": "sinusoid"}, "seed": seed}


def _score(ev) -> float:
    return sum(r["mean"] for r in ev["results"] if r["step"] in (10, 100)) / 2


def _path(phase, method):
    return os.path.join(RAW, f"sinusoid_{phase}_{method}.json")


def _save(phase, method, obj):
    os.makedirs(RAW, exist_ok=True)
    with open(_path(phase, method), "w") as f:
        json.dump(obj, f, indent=1)


def _load(phase, method):
    with open(_path(phase, method)) as f:
        return json.load(f)


def _summary(mm, ev, cpu, each=None):
    sel = mm.selection()
    return {"eval": ev, "each": each, "cpu_s": cpu, "modules": list(mm.partition.names),
            "sigma2": [float(s) for s in mm.sigma2()] if mm.learns_sigma else None,
            "selected": sel["selected"], "gap": sel["gap"], "separated": sel["separated"]}


def tune(method):
    rows = []
    for hp in GRID:
        trainer, cpu = train(body(method, TUNE_SEED, TUNE_STEPS, hp))
        ev = evaluate(trainer.meta_model(), n_tasks=200, steps=[10, 100], split="val", seed=TUNE_SEED)
        rows.append({"hp": hp, "score": _score(ev), "cpu_s": cpu, "finite": bool(_score(ev) == _score(ev))})
        print(method, hp, rows[-1]["score"], flush=True)
    ok = [r for r in rows if r["finite"]]
    best = min(ok, key=lambda r: r["score"]) if ok else rows[0]
    _save("tune", method, {"grid": rows, "best": best["hp"], "meta_steps": TUNE_STEPS})


def final(method, seeds=FINAL_SEEDS, meta_steps=FINAL_STEPS):
    hp = _load("tune", method)["best"]
    per_seed = []
    for seed in range(seeds):
        trainer, cpu = train(body(method, seed, meta_steps, hp))
        mm = trainer.meta_model()
        ev = evaluate(mm, n_tasks=100, steps=STEPS, seed=10_000 + seed)
        each = evaluate(mm, n_tasks=100, steps=[0, 10, 100], modules="each", seed=10_000 + seed) \
            if mm.learns_sigma else None
        per_seed.append(_summary(mm, ev, cpu, each))
        per_seed[-1]["long"] = evaluate(mm, family=FEW, n_tasks=100, steps=LONG_STEPS, seed=20_000 + seed)
        print(method, seed, [round(r["mean"], 4) for r in ev["results"]], per_seed[-1]["sigma2"], flush=True)
    _save("final", method, {"hp": hp, "meta_steps": meta_steps, "seeds": per_seed})


def defaults(method, seeds=FINAL_SEEDS):
    per_seed = []
    for seed in range(seeds):
        trainer, cpu = train(default_body(method, seed))
        mm = trainer.meta_model()
        per_seed.append(_summary(mm, evaluate(mm, n_tasks=100, steps=[0, 10, 100], seed=10_000 + seed), cpu))
        print(method, seed, [round(r["mean"], 4) for r in per_seed[-1]["eval"]["results"]], flush=True)
    _save("defaults", method, {"config": default_body(method, 0), "seeds": per_seed})


def _at(ev, step):
    return next(r for r in ev["results"] if r["step"] == step)


def pooled(per_seed, step):
    """Mean over seeds of the per-seed mean MSE, CI from the spread across seeds (n = seeds)."""
    vals = [next(r["mean"] for r in s["eval"]["results"] if r["step"] == step) for s in per_seed]
    return mean_ci(vals)


def _each_table(per_seed, names):
    """Mean over seeds of the one-module-at-a-time MSE (Fig. 13), at steps 10 and 100."""
    lines = ["| module adapted alone | " + " | ".join(f"step {s}" for s in (0, 10, 100)) + " |", "|---|---|---|---|"]
    for n in names:
        cells = []
        for step in (0, 10, 100):
            vals = [next(r["mean"] for r in s["each"]["results"] if r["modules"] == n and r["step"] == step)
                    for s in per_seed]
            c = mean_ci(vals)
            cells.append(fmt(c["mean"], c["ci95"]))
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def report():
    methods = [m for m in METHODS if os.path.exists(_path("final", m))]
    fin = {m: _load("final", m) for m in methods}
    lines = ["# Sinusoid regression: MSE vs adaptation step (Finn protocol, 10-shot; App. E.3)", "",
             "Regenerate: `python -m benchmarks.reproduce.sinusoid all` (or the phases `tune`, `final`, "
             "`defaults`, `report`; see the module docstring for the protocol).", "",
             f"Machine: {machine()}. 1-40-40-1 ReLU MLP, six per-tensor modules, meta-batch 25, Adam outer, 5 inner "
             "steps, compiled meta-step; evaluation on 100 held-out test tasks per seed adapting the default modules "
             "(all under the learned prior unless sigma^2 separated by ln 100) with the training inner optimizer "
             "and learning rate. ± is the 95% CI over seeds (n = seeds) of the per-seed mean MSE.", "",
             "## Tuning (equal budget: the same 4-point grid per method, scored on val)", "",
             "| method | " + " | ".join(f"lr_phi {g['lr_phi']:g}, inner lr {g['inner_lr']:g}" for g in GRID)
             + " | chosen |", "|---|" + "---|" * (len(GRID) + 1)]
    for m in [m for m in METHODS if os.path.exists(_path("tune", m))]:
        t = _load("tune", m)
        lines.append(f"| {m} | " + " | ".join(f"{r['score']:.4f}" for r in t["grid"])
                     + f" | lr_phi {t['best']['lr_phi']:g}, inner lr {t['best']['inner_lr']:g} |")
    lines += ["", f"Score: mean of the val query MSE after 10 and after 100 adaptation steps, 200 val tasks, seed "
              f"{TUNE_SEED}, {TUNE_STEPS} meta-steps per grid point.", "",
              f"## Final runs: {FINAL_SEEDS} seeds x {fin[methods[0]]['meta_steps'] if methods else FINAL_STEPS} "
              "meta-steps each, with each method's chosen grid point", "",
              "Methods with final runs: " + ", ".join(methods) + " (`final --methods " + " ".join(methods) + "`).", "",
              "| method | CPU s / seed | " + " | ".join(f"step {s}" for s in STEPS) + " |",
              "|---|---|" + "---|" * len(STEPS)]
    curves = {}
    for m in methods:
        per_seed = fin[m]["seeds"]
        stats = [pooled(per_seed, s) for s in STEPS]
        cpu = sum(s["cpu_s"] for s in per_seed) / len(per_seed)
        lines.append(f"| {m} | {cpu:.0f} | " + " | ".join(fmt(p["mean"], p["ci95"]) for p in stats) + " |")
        curves[m] = (STEPS, [p["mean"] for p in stats], [p["ci95"] for p in stats])
    if methods:
        plot_curves(os.path.join(RESULTS, "sinusoid_mse.png"), curves, "adaptation step", "query MSE",
                    "Sinusoid: MSE vs adaptation step", logy=True, logx=True)
    lines += ["", "![MSE vs step](sinusoid_mse.png)", "",
              "## Long adaptation (Sec. 5.3): 5 support points, up to 10,000 steps", "",
              "The same models, adapted on 5 support points (meta-training used 10) with the default modules; query "
              "MSE on 10 points, 100 tasks per seed, ± over seeds. Last column: MSE at 10,000 steps over the "
              "method's lowest MSE on this schedule (1.00 = no overfitting).", "",
              "| method | " + " | ".join(f"step {s}" for s in LONG_STEPS) + " | 10,000 / best |",
              "|---|" + "---|" * (len(LONG_STEPS) + 1)]
    for m in methods:
        st = [mean_ci([_at(s["long"], k)["mean"] for s in fin[m]["seeds"]]) for k in LONG_STEPS]
        best = min(p["mean"] for p in st)
        lines.append(f"| {m} | " + " | ".join(fmt(p["mean"], p["ci95"]) for p in st)
                     + f" | {st[-1]['mean'] / best:.2f} |")
    lines += ["", "## Claims", ""]
    lines += _claims(fin)
    sig = [m for m in methods if m in SIGMA]
    if sig:
        names = fin[sig[0]]["seeds"][0]["modules"]
        lines += ["", "## Learned sigma^2 per module (every seed)", "",
                  "| method | seed | " + " | ".join(names) + " | largest gap (ln) | separated | selected |",
                  "|---|---|" + "---|" * (len(names) + 3)]
        bars = {}
        for m in sig:
            for i, s in enumerate(fin[m]["seeds"]):
                lines.append(f"| {m} | {i} | " + " | ".join(f"{v:.3g}" for v in s["sigma2"])
                             + f" | {s['gap']:.2f} | {s['separated']} | {', '.join(s['selected'])} |")
            bars[m] = fin[m]["seeds"][0]["sigma2"]
        plot_bars(os.path.join(RESULTS, "sinusoid_sigma2.png"), bars, names, "sigma^2",
                  "Sinusoid: learned sigma^2 (seed 0)")
        lines += ["", "![sigma^2](sinusoid_sigma2.png)", "",
                  "## Adapting one module at a time (App. E.3, Fig. 13; mean over seeds)", ""]
        for m in sig:
            lines += [f"**{m}**", ""] + _each_table(fin[m]["seeds"], names) + [""]
    dm = [m for m in METHODS if os.path.exists(_path("defaults", m))]
    if dm:
        lines += ["", "## Defaults: configs that name only the algorithm, the model and the task family", "",
                  "`" + json.dumps(default_body("sigma_maml", 0)) + "` (seed 0..4; 1,000 meta-steps, every other "
                  "field at its schema default). Query MSE on 100 test tasks per seed, default modules.", "",
                  "| method | step 0 | step 10 | step 100 | step-100 MSE / maml's |", "|---|---|---|---|---|"]
        d = {m: _load("defaults", m)["seeds"] for m in dm}
        ref = pooled(d["maml"], 100)["mean"] if "maml" in d else None
        for m in dm:
            st = [pooled(d[m], s) for s in (0, 10, 100)]
            ratio = f"{st[2]['mean'] / ref:.2f}" if ref else "-"
            lines.append(f"| {m} | " + " | ".join(fmt(p["mean"], p["ci95"]) for p in st) + f" | {ratio} |")
    return write("sinusoid.md", lines)


def _claims(fin) -> list:
    out = []
    if "maml" in fin:
        for m in ("sigma_maml", "sigma_reptile", "sigma_imaml"):
            if m not in fin:
                continue
            for step in (10, 100):
                a, b = pooled(fin[m]["seeds"], step), pooled(fin["maml"]["seeds"], step)
                verdict = ("better than MAML (CIs do not overlap)" if a["mean"] + a["ci95"] < b["mean"] - b["ci95"]
                           else "within MAML's CI or better" if a["mean"] <= b["mean"] + b["ci95"]
                           else "worse than MAML")
                out.append(f"- {m} after {step} steps: {fmt(a['mean'], a['ci95'])} vs MAML "
                           f"{fmt(b['mean'], b['ci95'])}: **{verdict}**.")
    for m in ("sigma_maml", "sigma_imaml", "sigma_reptile"):
        if m not in fin:
            continue
        seeds = fin[m]["seeds"]
        first = sum(1 for s in seeds if s["modules"][max(range(len(s["sigma2"])), key=s["sigma2"].__getitem__)]
                    .startswith("fc0"))
        out.append(f"- {m}: the first layer (fc0 weight or bias) has the largest sigma^2 in {first}/{len(seeds)} "
                   f"seeds (App. E.3 claims the first layer is the task-specific one).")
    for m, r in fin.items():
        long = [mean_ci([_at(s["long"], k)["mean"] for s in r["seeds"]])["mean"] for k in LONG_STEPS]
        ratio = long[-1] / min(long)
        out.append(f"- {m}, 5 support points: MSE at 10,000 steps is {ratio:.2f}x its best on the schedule ("
                   + ("overfits" if ratio > 1.1 else "no overfitting beyond 10%") + ").")
        best = min(STEPS, key=lambda s: pooled(r["seeds"], s)["mean"])
        last = pooled(r["seeds"], STEPS[-1])["mean"]
        out.append(f"- {m}: lowest mean MSE at step {best}; at step {STEPS[-1]} it is "
                   f"{last / pooled(r['seeds'], best)['mean']:.2f}x that (1.00 = no overfitting to 1,000 steps).")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("phase", choices=["tune", "final", "defaults", "report", "all"])
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--seeds", type=int, default=FINAL_SEEDS)
    p.add_argument("--meta-steps", type=int, default=FINAL_STEPS)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    for phase in (["tune", "final", "defaults"] if a.phase == "all" else [a.phase]):
        for m in (a.methods if phase != "report" else []):
            {"tune": tune, "final": lambda m: final(m, a.seeds, a.meta_steps), "defaults": defaults}[phase](m)
    if a.phase in ("report", "all"):
        print(report())


if __name__ == "__main__":
    main()
