"""The small-data augmented-Omniglot regime (App. E.1, after Flennerhag et al.), scaled to this machine: does
each shrinkage variant beat its special case, and does the gap grow as the data per class shrinks (Fig. 4,
Table 2)?

    python -m benchmarks.reproduce.augmented_omniglot folds                       # the alphabet folds used
    python -m benchmarks.reproduce.augmented_omniglot run --shots 1 --seeds 0 1 2  # raw results per run
    python -m benchmarks.reproduce.augmented_omniglot report                      # docs/results/augmented_omniglot.md

Protocol. One fixed 20-class task per alphabet (``task_mode: per_group``: 20 characters drawn once per alphabet
with the split seed; alphabets with fewer than 20 characters hold no task, as in the paper), the first 15
instances of every character (after a seeded shuffle) are task-train instances and the other 5 are held out
(``instance_split: 15``); a task's support is K of the 15 per class, its query the 5 held-out ones. Meta-training
images are re-scaled by U[0.8, 1.2] and translated by U[-0.2, 0.2] per image per step (no rotation: the paper's
small-data regime). The model is the max-pool conv4 variant.

How it differs from the paper, all for CPU scale and the same for every method:
- 8 alphabets (the minimal background splits; 7 hold a task) instead of 46 (the paper meta-trains on up to 20
  alphabets and tests on 10 others). Each training seed uses its own alphabet-level fold: 2 held-out test
  alphabets, disjoint across seeds 0-2 (``folds``), the other alphabets meta-train. So a seed's variation is
  its fold and its initialisation together.
- 14x14 images and 16 channels (paper: 28x28, 64); meta-batch 4 of the 5-6 training tasks (paper: 20);
  25 inner steps at meta-training (paper: 100) at lr 0.1 for every method, on the full support (paper:
  mini-batches of 20 images; at K = 1 the full support *is* 20 images); ``META_STEPS`` meta-steps (paper:
  thousands); 100 adaptation steps at meta-test (paper: 100), and 300 at K = 1 (long adaptation).
- Tuning budget: zero for every method (every other setting at the schema default for the algorithm); the paper
  tunes each method on validation alphabets.
- No transfer baseline (the paper's SEA-Emb / SEA-All): not run in this budget.

Scoring: each seed's models are scored on the same ``N_TASKS`` test tasks (the fold's test alphabets with random
supports and label orders; evaluation seed 7000 + seed), so per seed the methods' accuracies are paired; the verdict
is the mean over seeds of the paired per-seed differences with a Student-t 95% interval over seeds.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

import datasets  # noqa: F401  (registers the Omniglot reader with core.tasks)
from benchmarks.reproduce.common import RESULTS, machine, write
from core import MetaTrainer, evaluate, mean_ci, paired
from core.images import split_classes
from schemas import JobConfig

METHODS = ["reptile", "sigma_reptile", "imaml", "sigma_imaml"]
PAIRS = [("sigma_reptile", "reptile"), ("sigma_imaml", "imaml")]
STEPS = [0, 10, 25, 100, 300]
# evaluation steps per K: long adaptation (300 steps) is K = 1's question; at K = 15 a step costs 15x
EVAL_STEPS = {1: STEPS, 15: [0, 10, 25, 100]}
META_STEPS = {1: 300, 15: 100}  # K = 15 costs ~4x a meta-step (300 support images per inner step)
N_TASKS = 20
RAW = os.path.join(RESULTS, "raw")
TEST_ALPHABETS = 2


def folds(n_folds=3):
    """Split seeds whose 2 test alphabets both hold a task, with test sets disjoint across folds."""
    from datasets.omniglot import load_omniglot
    data = load_omniglot(image_size=14)
    groups, names = list(data["groups"]), data["group_names"]
    counts = torch.bincount(torch.as_tensor(groups))
    chosen, used = [], set()
    for seed in range(1000):
        test = split_classes(groups, "group", TEST_ALPHABETS / counts.numel(), 0.0, seed)["test"]
        alphabets = sorted({groups[int(c)] for c in test})
        if all(counts[a] >= 20 for a in alphabets) and not used & set(alphabets):
            chosen.append({"split_seed": seed, "test_alphabets": [names[a] for a in alphabets]})
            used |= set(alphabets)
            if len(chosen) == n_folds:
                return chosen
    raise RuntimeError("no disjoint folds found")


def body(method, shots, seed, split_seed, meta_steps):
    return {"algorithm": {"name": method}, "model": {"arch": "conv4", "channels": 16, "variant": "maxpool"},
            "tasks": {"family": "image_classes", "source": "omniglot", "ways": 20, "shots": shots, "query": 5,
                      "image_size": 14, "task_mode": "per_group", "instance_split": 15, "augment": {},
                      "split": {"by": "group", "test_fraction": TEST_ALPHABETS / 8, "seed": split_seed}},
            "inner": {"steps": 25, "lr": 0.1}, "outer": {"meta_batch": 4, "steps": meta_steps},
            "execution": {"compile": False}, "seed": seed}


def _path(method, shots, seed):
    return os.path.join(RAW, f"augmented_{method}_k{shots}_s{seed}.json")


def run(method, shots, seed, fold):
    meta_steps = META_STEPS[shots]
    trainer = MetaTrainer(JobConfig.model_validate(body(method, shots, seed, fold["split_seed"], meta_steps))
                          .model_dump())
    start = time.process_time()
    trainer.run(meta_steps)
    cpu = time.process_time() - start
    mm = trainer.meta_model()
    ev = {"selected": evaluate(mm, n_tasks=N_TASKS, steps=EVAL_STEPS[shots], seed=7000 + seed)}
    if mm.learns_sigma and len(ev["selected"]["results"][0]["adapted"]) < len(mm.module_map()):
        ev["all"] = evaluate(mm, n_tasks=N_TASKS, steps=EVAL_STEPS[shots], modules="all", seed=7000 + seed)
    out = {"config": trainer.config, "seed": seed, "fold": fold, "cpu_s": cpu, "eval": ev,
           "module_map": mm.module_map() if mm.learns_sigma else None}
    os.makedirs(RAW, exist_ok=True)
    with open(_path(method, shots, seed), "w") as f:
        json.dump(out, f, indent=1)
    print(method, shots, seed, f"{cpu:.0f}s", {c: [round(r["mean"], 3) for r in e["results"]] for c, e in ev.items()},
          flush=True)


def _curve(r, choice="selected"):
    return {x["step"]: x["mean"] for x in r["eval"][choice]["results"]}


def _load(method, shots):
    out = []
    for s in range(100):
        if os.path.exists(_path(method, shots, s)):
            out.append(json.load(open(_path(method, shots, s))))
    return out


def report():
    lines = ["# Small-data augmented Omniglot (App. E.1): each sigma variant against its special case", "",
             "Regenerate: `python -m benchmarks.reproduce.augmented_omniglot run --shots K --seeds 0 1 2 --methods ...` "
             "for each K and method below, then `python -m benchmarks.reproduce.augmented_omniglot report`. Protocol and "
             "every deviation from the paper: the module docstring of `benchmarks/reproduce/augmented_omniglot.py`.", "",
             f"Machine: {machine()}. 20-way tasks, one per alphabet; 14x14 images, max-pool conv4 with 16 channels, "
             "meta-batch 4, 25 inner steps at lr 0.1 for every method; test on 2 held-out alphabets per seed (the seed's "
             f"fold), {N_TASKS} test tasks per seed shared by the methods of that seed. Accuracy on the 5 held-out "
             "instances per class (chance: 0.05); ± is a Student-t 95% interval over seeds (n = seeds).", ""]
    gaps = {}
    for shots in sorted(META_STEPS):
        runs = {m: _load(m, shots) for m in METHODS}
        runs = {m: rs for m, rs in runs.items() if rs}
        if not runs:
            continue
        first = next(iter(runs.values()))
        lines += [f"## K = {shots} ({first[0]['config']['outer']['steps']} meta-steps; test alphabets: "
                  + "; ".join(f"seed {r['seed']}: {', '.join(r['fold']['test_alphabets'])}" for r in first) + ")", "",
                  "| method (modules) | seeds | CPU s / seed | " + " | ".join(f"step {s}" for s in EVAL_STEPS[shots])
                  + " |", "|---|---|---|" + "---|" * len(EVAL_STEPS[shots])]
        per_seed = []
        for m, rs in runs.items():
            for choice in rs[0]["eval"]:
                if choice == "all" and all(len(r["eval"]["selected"]["results"][0]["adapted"])
                                           == len(r["module_map"]) for r in rs):
                    continue  # every seed's selection is all modules: the same row as "selected"
                if not all(choice in r["eval"] for r in rs):
                    continue
                cells = [mean_ci([_curve(r, choice)[s] for r in rs]) for s in EVAL_STEPS[shots]]
                lines.append(f"| {m} ({choice}) | {len(rs)} | {sum(r['cpu_s'] for r in rs) / len(rs):.0f} | "
                             + " | ".join(f"{c['mean']:.3f} ± {c['ci95']:.3f}" for c in cells) + " |")
                per_seed.append(f"| {m} ({choice}) | " + "; ".join(
                    f"seed {r['seed']}: {_curve(r, choice)[100]:.3f}" for r in rs) + " |")
        lines += ["", "Per seed (step 100):", "", "| method (modules) | per seed |", "|---|---|", *per_seed, "",
                  "Modules the sigma variants adapt by default (sigma^2 ranking, ln-100 gap rule; all = no separation):",
                  ""]
        for m, rs in runs.items():
            for r in rs:
                if r["module_map"]:
                    sel = r["eval"]["selected"]["results"][0]["adapted"]
                    n_all = len(r["module_map"])
                    mods = sorted(r["module_map"], key=lambda x: -x["sigma2"])
                    g = max((math.log(hi["sigma2"] / lo["sigma2"]), hi["name"], lo["name"])
                            for hi, lo in zip(mods, mods[1:]))
                    lines.append(f"- {m}, seed {r['seed']}: " + ("all" if len(sel) == n_all else ", ".join(sel))
                                 + f" (largest sigma^2: {mods[0]['name']} {mods[0]['sigma2']:.3g}, smallest "
                                 f"{mods[-1]['name']} {mods[-1]['sigma2']:.3g}; largest ln-gap {g[0]:.2f}, between "
                                 f"{g[1]} and {g[2]}; ln 100 = 4.61 separates)")
        lines += ["", "Paired differences (same test tasks per seed; t-interval over the seeds both methods ran):", "",
                  "| pair | seeds | step | difference | 95% interval | verdict |", "|---|---|---|---|---|---|"]
        for a, b in PAIRS:
            if a not in runs or b not in runs:
                continue
            seeds = sorted({r["seed"] for r in runs[a]} & {r["seed"] for r in runs[b]})
            if len(seeds) < 2:
                continue
            ra = [r for r in runs[a] if r["seed"] in seeds]
            rb = [r for r in runs[b] if r["seed"] in seeds]
            for step in [s for s in (25, 100, 300) if s in EVAL_STEPS[shots]]:
                d = paired([_curve(r)[step] for r in ra], [_curve(r)[step] for r in rb])
                lo, hi = d["mean"] - d["ci95"], d["mean"] + d["ci95"]
                v = "better" if lo > 0 else "worse" if hi < 0 else "no significant difference"
                if step == 100:
                    gaps[(a, b, shots)] = d["mean"]
                lines.append(f"| {a} - {b} | {len(seeds)} | {step} | {d['mean']:+.3f} | [{lo:+.3f}, {hi:+.3f}] | {v} |")
        lines.append("")
    lines += ["## Does the gap grow as K shrinks? (paper: Fig. 4, Table 2)", ""]
    for a, b in PAIRS:
        at = {k: g for (x, y, k), g in gaps.items() if (x, y) == (a, b)}
        if len(at) >= 2:
            ks = sorted(at)
            grows = at[ks[0]] > at[ks[-1]]
            lines.append(f"- {a} - {b} after 100 steps: " + ", ".join(f"K = {k}: {at[k]:+.3f}" for k in ks)
                         + f". The gap {'is larger' if grows else 'is not larger'} at K = {ks[0]} than at K = {ks[-1]}"
                         + " (point estimates; the intervals above say whether either differs from zero).")
        elif at:
            lines.append(f"- {a} - {b}: only K = {', '.join(map(str, at))} was run; the trend is not measured.")
    sig = [r for k in META_STEPS for m in METHODS for r in _load(m, k) if r["module_map"]]
    if sig:
        moved = max(abs(math.log(x["sigma2"])) for r in sig for x in r["module_map"])
        bound = max(r["config"]["outer"]["lr_log_sigma2"] * r["config"]["outer"]["steps"] for r in sig)
        lines += ["", "## Reading", "",
                  f"No sigma variant separated its modules at this budget: the largest |ln sigma^2| of any module of "
                  f"any run is {moved:.2f}, from an initial ln sigma^2 = 0, while the ln-100 rule needs a gap of 4.61. "
                  f"Adam moves ln sigma^2 by about lr_log_sigma2 per meta-step (its step size), so by the order of "
                  f"{bound:.2f} over these runs "
                  "(lr_log_sigma2 x meta-steps), so the sigma variants here are their special cases under a nearly "
                  "uniform prior, and the comparison above measures that, not module discovery. The paper's claim "
                  "(Fig. 4: shrinkage ahead, more so with fewer instances) is therefore not tested by these runs "
                  "rather than refuted; testing it needs meta-steps (or an lr_log_sigma2, tuned on validation "
                  "alphabets for every method alike) that let sigma^2 move by several units of ln, i.e. a GPU-scale "
                  "budget."]
    return write("augmented_omniglot.md", lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("phase", choices=["folds", "run", "report"])
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--shots", nargs="+", type=int, default=[1], choices=sorted(META_STEPS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--skip-existing", action="store_true", help="keep the runs whose raw file exists")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.phase == "folds":
        print(json.dumps(folds(), indent=1))
    elif a.phase == "run":
        fs = folds(max(a.seeds) + 1)
        for k in a.shots:
            for s in a.seeds:
                for m in a.methods:
                    if a.skip_existing and os.path.exists(_path(m, k, s)):
                        continue
                    run(m, k, s, fs[s])
    else:
        print(report())


if __name__ == "__main__":
    main()
