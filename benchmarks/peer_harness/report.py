"""The peer harness's report: the machine it ran on, and the "Peers" section of benchmarks/RESULTS.md rendered from
the gradient checks and timings (``markdown``) with the fixed notes (``NOTES``)."""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from benchmarks.machine import commit as code_commit, cpu_name

from .workloads import MATCH_TOL, WORKLOADS

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Peers"


def machine_info() -> dict:
    cpu, commit = cpu_name(), code_commit()
    try:  # uncommitted changes to the measured code, named beside the commit
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "core", "schemas", "datasets",
                                "benchmarks/peers.py", "benchmarks/peer_harness"],
                               capture_output=True, text=True,
                               cwd=str(ROOT)).stdout.splitlines()
        dirty = [line[3:] for line in dirty]
    except OSError:
        dirty = []
    versions = {"torch": torch.__version__}
    for mod in ("torchopt", "higher", "learn2learn"):
        try:
            importlib.import_module(mod)
            versions[mod] = importlib.metadata.version(mod)
        except Exception as e:
            versions[mod] = f"not installed ({type(e).__name__})"
    try:
        import torchopt
        versions["torchopt_accelerated_op"] = bool(torchopt.accelerated_op_available())
    except Exception:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "commit": commit, "dirty": dirty, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "nice": os.nice(0), "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "versions": versions}


def _f(v, fmt="{:.1f}"):
    return "-" if v is None else fmt.format(v)


def _cell(t, key, name):
    """A timing cell: empty where the peer was excluded (its meta-gradient differs from ours), '-' if not run."""
    if name in t.get("excluded", []):
        return ""
    return _f(t[key].get(name))


def _e(v):
    return "-" if v is None else f"{v:.1e}"


def _range(t, key):
    xs = t[key]
    return f"{t[key[:-1] + '_median']:.2f} ({min(xs):.2f}-{max(xs):.2f})" if xs else "-"


def markdown(info, checks, timings, command, wall, notes) -> str:
    v = info["versions"]
    L = [SECTION, "",
         f"`{command}` (benchmarks/peers.py; `make peers` builds .venv-peers and runs it). Measured "
         f"{info['date']} at commit {info['commit']}"
         + (f" with uncommitted changes to {', '.join(info['dirty'])}" if info.get("dirty") else "")
         + f"; the run took {wall:.0f} s.", "",
         f"Machine: {info['cpu']}, {info['cores']} cores, **shared** with other sessions (their test suites, with "
         f"Celery workers at nice 0, run on it at times); load average {info['loadavg_start']} at the start and "
         f"{info.get('loadavg_end')} at the end, about 2 of it this harness's own threads; the harness at nice "
         f"{info['nice']}. torch {v['torch']}, "
         f"intra-op threads {info['threads']}, inter-op {info['interop_threads']}; Python {info['python']}; "
         f"torchopt {v.get('torchopt')} (its C++ ops "
         f"{'loaded' if v.get('torchopt_accelerated_op') else 'do not load against this torch, so its pure-Python ops ran'}), "
         f"higher {v.get('higher')}, learn2learn {v.get('learn2learn')}.", "",
         "Same model shapes and initial parameters, the same task tensors (sampled once per repeat with Metashrink's "
         "sampler and given to every contender), the same inner learning rate and steps, second-order MAML, Adam "
         "outer step. All contenders run interleaved in one process, and the order rotates every repeat. Times are "
         "medians over the repeats of one meta-step (wall). ratio = ours / best peer, computed per repeat (time: "
         "< 1 means ours is faster) and given as the median (range). CPU ratio is the same for process CPU time "
         "(all threads). Because the machine was shared, the per-repeat ratios "
         "mean more than the absolute times. A repeat in which another job's burst hit some contenders and not "
         "others shows up as an outlier in the range; the median is robust to a few of them. An empty cell is a peer left out because its meta-gradient differs from ours (gradient table "
         "below).", "",
         "### Meta-step on a given batch (compute only)", "",
         "| workload | algorithm | torchopt (loop) ms | torchopt (loop, channels-last) ms | torchopt (vmap) ms | higher ms | ours ms | ratio ours / best peer | CPU ratio | ours compiled ms | ratio compiled / best peer | compile s | n |",
         "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in timings:
        L.append(f"| {WORKLOADS[t['workload']]['label']} | {t['alg']} | {_cell(t, 'median_ms', 'torchopt')} | "
                 f"{_cell(t, 'median_ms', 'torchopt-cl')} | {_cell(t, 'median_ms', 'torchopt-vmap')} | {_cell(t, 'median_ms', 'higher')} | "
                 f"{_f(t['median_ms']['ours'])} | {_range(t, 'ratios')} | {_range(t, 'cpu_ratios')} | "
                 f"{_f(t['median_ms'].get('ours-compiled'))} | {_range(t, 'compiled_ratios')} | "
                 f"{_f(t.get('compile_s'))} | {t['repeats']} |")
    L += ["", "### End-to-end meta-step including task sampling", "",
          "ours: the unmodified `MetaTrainer.step()` on a second trainer of the same config (it draws its own tasks), "
          "timed in every repeat among the others. A peer: that repeat's sampling time (Metashrink's sampler, the same "
          "call) plus its compute step.", "",
          "| workload | algorithm | sampling ms | torchopt (loop) ms | torchopt (loop, channels-last) ms | torchopt (vmap) ms | higher ms | ours ms | ratio ours / best peer |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for t in timings:
        L.append(f"| {WORKLOADS[t['workload']]['label']} | {t['alg']} | {_f(t['sample_ms'], '{:.2f}')} | "
                 f"{_cell(t, 'e2e_ms', 'torchopt')} | {_cell(t, 'e2e_ms', 'torchopt-cl')} | "
                 f"{_cell(t, 'e2e_ms', 'torchopt-vmap')} | "
                 f"{_cell(t, 'e2e_ms', 'higher')} | {_f(t['e2e_ms']['ours'])} | {_range(t, 'e2e_ratios')} |")
    L += ["", "Per repeat (compute, wall): the ratios, the fastest peer, the best (min) ms of each contender, and "
          "the 1-minute load. Lockstep: every contender got the same batches, so all train the same parameters. "
          "The figure is the largest float32 difference between ours' parameters and each peer's after all timed "
          "steps. Adam moves every coordinate by about lr = 1e-3 whatever the size of its gradient, so coordinates "
          "whose meta-gradient is near 0 follow rounding noise and can drift apart by up to 2 x lr x steps. conv4's "
          "conv biases are such coordinates exactly (they feed batch-norm, so their meta-gradient is 0 up to "
          "rounding) and are listed apart. The test of sameness is the float64 check below.", ""]
    for t in timings:
        mins = ", ".join(f"{n} {v:.1f}" for n, v in t["min_ms"].items())
        drift = ", ".join(f"{n} {d:.1e}" for n, d in t["lockstep_phi_max_diff"].items())
        if t["lockstep_conv_bias_max_diff"]:
            drift += " (conv biases: " + ", ".join(f"{n} {d:.1e}" for n, d in
                                                   t["lockstep_conv_bias_max_diff"].items()) + ")"
        fastest = ", ".join(f"{n} {t['best_peer_per_repeat'].count(n)}/{t['repeats']}"
                            for n in dict.fromkeys(t["best_peer_per_repeat"]))
        L.append(f"- {t['workload']} {t['alg']}: ratios {[round(x, 2) for x in t['ratios']]}; fastest peer {fastest}; "
                 f"best ms: {mins}; load1 {min(t['load1'])}-{max(t['load1'])}; lockstep after {t['steps_each']} "
                 f"steps: {drift}"
                 + (f"; not timed (gradient differs): {', '.join(t['excluded'])}" if t.get("excluded") else ""))
    L += ["", "### Gradient match (float64, one fixed batch)", "",
          "The largest absolute difference from ours, for the meta-gradient (phi; log sigma^2) and for the "
          "parameters after one whole outer step (Adam, inverse-Gamma penalty, clamp). mb is the number of tasks "
          "in the checked batch: the whole meta-batch for sinusoid, 4 tasks for conv4 (float64 conv4 second order "
          "runs at about 1 s per task and step here). `torch` is a hand-written autograd unroll that needs no package; "
          "tests/test_peers_harness.py also checks it in the main venv. scale = max |ours' meta-gradient|. A peer "
          f"whose meta-gradient differs by more than {MATCH_TOL:g} x max(1, scale) is not timed on that workload.", "",
          "| workload | algorithm | mb | scale | peer | grad phi | grad log sigma^2 | step phi | step log sigma^2 |",
          "|---|---|---:|---:|---|---:|---:|---:|---:|"]
    for c in checks:
        for name, d in c["peers"].items():
            L.append(f"| {c['workload']} | {c['alg']} | {c['meta_batch']} | {c['grad_scale']:.1e} | {name} | "
                     f"{_e(d['grad_phi'])} | {_e(d['grad_log_sigma2'])} | {_e(d['step_phi'])} | "
                     f"{_e(d['step_log_sigma2'])} |")
    if notes:
        L += ["", "### Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(L) + "\n"


NOTES = [
    "learn2learn: not in the table. `pip install learn2learn==0.2.0` (the newest release, an sdist only) fails "
    "to build on Python 3.11: its shipped Cython output includes `longintrepr.h`, which Python 3.11 moved "
    "(`fatal error: longintrepr.h: No such file or directory`); `make peers` tries it and goes on without it.",
    "sigma_maml: the peers take gradient steps on support loss + prior (`inner.optimizer: sgd` for ours too); "
    "Metashrink's default for sigma_maml is `proximal_gd` (the prior as a proximal step), which is not timed here. "
    "With 1 inner step theta = phi at the only inner gradient, so the prior contributes nothing and the "
    "log sigma^2 meta-gradient is 0 for every contender (omniglot-1 sigma_maml is MAML's work plus the prior's "
    "bookkeeping).",
    "torchopt (vmap) on conv4: left out of the timing, its meta-gradient differs from ours by 1e-3 to 8e-2 "
    "(float64, table above) while the loop peers agree to 1e-15. Reduced: reverse-mode *outside* torch.func.vmap "
    "of a per-task loss that takes an inner torch.func.grad through F.batch_norm on batch statistics (torchopt's "
    "FuncTorch example: vmap the task losses, then .backward() on their mean) is wrong in torch 2.13.0 (it even "
    "gives conv biases before batch-norm a non-zero meta-gradient); the same function without batch-norm, or with "
    "the outer gradient *inside* the vmap (vmap of grad, what MetaTrainer's vmap mode does: it matches its loop "
    "mode to 6e-16), agrees with the loop to 1e-17. Probably the batch-norm backward batching rule "
    "(pytorch/functorch issue 534, open). Sinusoid (no batch-norm) is unaffected and timed.",
    "What ours does on conv4 (core/trainer.py `_map_tasks`, core/algorithms.py `Backprop.eager_task_update`, "
    "core/models.py): the per-task loop runs its tasks on parallel threads, one per intra-op thread (here 2), "
    "each with one intra-op thread; each task's update is plain autograd (torch.autograd.grad with "
    "create_graph, like the peers; torch.func's grad of grad took 1.22x the loop peers' time in this harness at "
    "fa28324); the convolutions run on "
    "channels-last memory (`model.channels_last`, default true) and the first layer of a one-channel input is "
    "an im2col matrix product (oneDNN's one-channel convolution is slow per FLOP on CPU). Same function and "
    "meta-gradient (table above). The peers run as their examples write them: NCHW, one task at a time on both "
    "intra-op threads.",
    "ours-compiled: a second trainer of ours with `execution.compile: true`, the path the default "
    "(`compile: \"auto\"`) takes for a job long enough to repay the compile (benchmarks/RESULTS.md, \"Compile "
    "cache\"): sinusoid compiles the whole vmapped meta-step, conv4 one task's update (the loop stays in Python "
    "and runs its tasks on the task threads, as eager does; the first task compiles alone at one intra-op thread). Its first step compiled with a cold cache "
    "(compile s, not in the step times; the cache makes later jobs of the shape start in ~3 s). The peers "
    "cannot be compiled the same way (torch.compile does not take autograd.grad(create_graph=True) inside a "
    "compiled region), so they run eager.",
    "ours runs vmap for sinusoid and the per-task loop for conv4 (execution.vectorize; the faster of the two for "
    "each in benchmarks/core_bench.py); torchopt runs both ways (loop: MetaSGD; vmap: functional torchopt.sgd + "
    "torch.func), higher has no vmap form.",
]
