"""Shared pieces of the reproduction scripts: CPU-budgeted training, evaluation tables, markdown and plots."""
from __future__ import annotations

import os
import platform
import time

import torch

from core import MetaTrainer, evaluate
from schemas import JobConfig

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs", "results")


def train(body: dict, cpu_seconds: float | None = None, warmup: bool = False):
    """Meta-train a job config until its steps are done or the process has used ``cpu_seconds`` of CPU
    time (an equal CPU budget across methods, independent of what else runs on the machine). ``warmup``:
    run the first meta-step (lazy imports, the first vmap trace) before the clock starts, so that the
    method run first in a process is not charged for it."""
    # each trainer compiles its own meta-step; dynamo's per-function recompile limit (8) counts them all, and past it
    # the step silently runs eager, so every run starts from a clean dynamo state
    torch._dynamo.reset()
    # eager unless the body says otherwise: the recorded results were measured eager, and under a CPU budget
    # execution.compile "auto" (the schema default) would spend part of some methods' budgets compiling
    body = {**body, "execution": {"compile": False, **body.get("execution", {})}}
    trainer = MetaTrainer(JobConfig.model_validate(body).model_dump())
    if warmup:
        trainer.step()
    start = time.process_time()
    while trainer.step_count < trainer.total_steps:
        trainer.step()
        if cpu_seconds is not None and time.process_time() - start > cpu_seconds:
            break
    return trainer, time.process_time() - start


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s)")


def fmt(mean: float, ci: float, digits: int = 3) -> str:
    return f"{mean:.{digits}f} ± {ci:.{digits}f}"


def results_table(rows: list, steps: list, key="modules") -> list:
    """rows: [(label, evaluate() result)] -> markdown lines: one row per label/module choice, one column per step."""
    lines = ["| method | " + " | ".join(f"step {s}" for s in steps) + " |",
             "|---|" + "---|" * len(steps)]
    for label, ev in rows:
        by = {}
        for r in ev["results"]:
            by.setdefault(r[key], {})[r["step"]] = r
        for choice, per_step in by.items():
            name = label if len(by) == 1 else f"{label} ({choice})"
            lines.append(f"| {name} | " + " | ".join(fmt(per_step[s]["mean"], per_step[s]["ci95"]) for s in steps) + " |")
    return lines


def plot_curves(path: str, curves: dict, xlabel: str, ylabel: str, title: str, logy=False, logx=False):
    """curves: {label: (xs, means, ci95s)}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ms, cs) in curves.items():
        xs_plot = [max(x, 0.8) for x in xs] if logx else xs
        ax.plot(xs_plot, ms, marker="o", ms=3, label=label)
        ax.fill_between(xs_plot, [m - c for m, c in zip(ms, cs)], [m + c for m, c in zip(ms, cs)], alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bars(path: str, groups: dict, names: list, ylabel: str, title: str):
    """groups: {label: [value per name]} as grouped bars on a log scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.9), 4))
    width = 0.8 / max(1, len(groups))
    for i, (label, vals) in enumerate(groups.items()):
        ax.bar([j + i * width for j in range(len(names))], vals, width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))])
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curve(ev: dict, choice: str):
    rs = [r for r in ev["results"] if r["modules"] == choice]
    return [r["step"] for r in rs], [r["mean"] for r in rs], [r["ci95"] for r in rs]


def write(name: str, lines: list) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
