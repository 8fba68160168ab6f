"""Peer harness (issue 14 item 1): Metashrink's ``MetaTrainer.step()`` against torchopt and higher on the same work.

    make peers                                                   # builds .venv-peers, runs the full harness
    PYTHONPATH=. .venv-peers/bin/python benchmarks/peers.py            # full run (409 and 679 s measured on 2 shared cores)
    PYTHONPATH=. .venv-peers/bin/python benchmarks/peers.py --quick    # smoke run (32-51 s measured)
    PYTHONPATH=. .venv-peers/bin/python benchmarks/peers.py --no-write # print only, leave RESULTS.md alone

Workloads (identical for every contender: the same model shapes and initial parameters, the same task tensors,
the same inner learning rate and step counts, the same thread settings, second-order MAML with an Adam outer step):

- ``sinusoid``: mlp 1-40-40-1, 10 support / 10 query, 5 inner steps (lr 0.01), meta-batch 25.
- ``omniglot-1`` / ``omniglot-5``: conv4 (strided, 64 channels, batch-norm on batch statistics) 5-way 1-shot,
  15 queries per class, 28x28 real Omniglot (the zips in ../shared/data/omniglot or METASHRINK_OMNIGLOT_DIR),
  meta-batch 32, 1 and 5 inner steps (lr 0.4).

Algorithms: ``maml`` (second order) and ``sigma_maml`` where a peer can express it: the inner objective is the
support loss plus the Gaussian prior sum_m ||theta_m - phi_m||^2 / (2 sigma_m^2) with the prior precision
lambda_m = w / sigma_m^2 (w = 1 / n_support, ``Family.prior_weight``; sigma^2 = exp(clamp(log sigma^2)) clipped to
[1e-5, 1e5]), modules per layer, gradient descent on that objective (``inner.optimizer: sgd``), log sigma^2 learned
by the outer Adam (lr 1e-3) with the inverse-Gamma(1, 1e-5) penalty of ``core.modules.inverse_gamma_penalty`` and the
clamp after the update. sigma_maml's *default* inner optimizer is ``proximal_gd`` (the prior applied as a
proximal step, not as a loss term); the peers express the loss-term form, so that is what is compared here.

Contenders:

- ``ours``: ``core.trainer.MetaTrainer.step()`` itself (vmap for sinusoid, the per-task loop for conv4: the faster
  mode of each in benchmarks/core_bench.py), with its ``sample`` replaced by one returning the shared batch.
- ``torchopt`` (loop): ``torchopt.MetaSGD`` on the nn.Module, per-task inner loop, ``extract_state_dict`` /
  ``recover_state_dict`` between tasks (torchopt's few-shot MAML example), per-task backward.
- ``torchopt-cl`` (conv4 only): the same with the model and its inputs in channels-last memory (ours' default
  layout for conv4), so that the layout is not what separates ours from the peers.
- ``torchopt-vmap``: ``torchopt.sgd`` functional updates, ``torch.func.grad`` inner gradients, ``torch.func.vmap``
  over the tasks and ``functional_call`` (torchopt's FuncTorch MAML example).
- ``higher``: ``higher.innerloop_ctx`` (copy_initial_weights=False) with a ``torch.optim.SGD``, per-task loop and
  per-task backward (higher's MAML example).
- ``torch`` (reference, gradient check only): plain ``torch.autograd.grad(create_graph=True)`` unrolled by hand;
  needs no peer package, so tests/test_peers_harness.py checks ours against it in the main venv.

The outer step of every peer is ``torch.optim.Adam`` (lr 1e-3; log sigma^2 in its own parameter group).

Measurements, all in one process, contenders interleaved (the order rotates every repeat):

1. gradient match: on one fixed batch in float64, every contender's meta-gradient (phi and log sigma^2) against
   ours, and the parameters after one whole outer step (Adam, inverse-Gamma penalty, clamp) against ours' step:
   the max absolute difference. The timings compare the same computation only if these are ~1e-12.
2. compute step: per repeat one batch is sampled with Metashrink's sampler (the workload's ``Family.sample``) and
   handed to every contender; each contender's meta-step on it is timed (float32). Medians over repeats, and the
   per-repeat ratio ours / best peer (time; < 1 means ours is faster).
3. end-to-end step including task sampling: ours is the unmodified ``MetaTrainer.step()`` of a second trainer of the
   same config (it samples with its own generator), timed in every repeat among the others; a peer's is the sampling
   time of that repeat's shared batch plus its compute step (a peer would call the same sampler).

Repeats per workload are time-budgeted (``SCHEDULE``), so a full run stays near or under 15 minutes on 2 shared cores.
``--render RESULT.json`` rewrites the section from a saved JSON result without measuring.

Writes the "Peers" section of benchmarks/RESULTS.md (other sections are kept) and prints one JSON object.

This file is the driver (the command line, the schedule, the run); the parts are in benchmarks/peer_harness/:
``workloads`` (configs, peer models, the prior written peer-side), ``contenders``, ``gradients`` (measurement 1),
``timing`` (2 and 3) and ``report`` (the section's text).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# the parts (benchmarks/peer_harness/), also under the names tests/test_peers_harness.py uses
from benchmarks.machine import write_section  # noqa: E402
from benchmarks.peer_harness.contenders import PEER_MODULE, Ours, TorchRef, available  # noqa: E402,F401
from benchmarks.peer_harness.gradients import gradient_check, maxdiff as _maxdiff  # noqa: E402,F401
from benchmarks.peer_harness.report import NOTES, machine_info, markdown  # noqa: E402
from benchmarks.peer_harness.timing import time_workload  # noqa: E402
from benchmarks.peer_harness.workloads import (ALGS, CONV_ONLY, MATCH_TOL, OUTER_LR, PEER_NAMES,  # noqa: E402,F401
                                               WORKLOADS, module_index, omniglot_available, prior_lams, prior_term)


# per workload: (min repeats, max repeats, seconds of timing per algorithm); the full run stays near 15 minutes
# on 2 shared cores however busy they are (a repeat of omniglot-5 is 4 meta-steps of 2.5-10 s each)
SCHEDULE = {"sinusoid": (15, 40, 25.0), "omniglot-1": (7, 15, 90.0), "omniglot-5": (5, 9, 170.0)}
SCHEDULE_QUICK = {"sinusoid": (3, 3, 0.0), "omniglot-1": (1, 1, 0.0), "omniglot-5": (0, 0, 0.0)}


def peers_for(workload: str, peers: list) -> list:
    return [p for p in peers if WORKLOADS[workload]["family"] != "sinusoid" or p not in CONV_ONLY]


def check_meta_batch(workload: str, quick: bool) -> int:
    """Tasks in the float64 gradient check: the workload's meta-batch for sinusoid; 4 for conv4 (float64 conv4
    second order costs ~1 s per task and step here: the whole 32 would take minutes); fewer with --quick."""
    if WORKLOADS[workload]["family"] == "sinusoid":
        return 4 if quick else WORKLOADS[workload]["meta_batch"]
    return 2 if quick else 4


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run (~2 min): few repeats, small gradient checks")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--repeats", type=str, default=None,
                    help="fixed repeats per workload as sinusoid,omniglot-1,omniglot-5 (default: SCHEDULE, "
                         "time-budgeted; --quick 3,1,0: omniglot-5 is then only gradient-checked, not timed)")
    ap.add_argument("--only", nargs="*", choices=tuple(WORKLOADS), help="run only these workloads")
    ap.add_argument("--algs", nargs="*", choices=ALGS, default=list(ALGS))
    ap.add_argument("--no-write", action="store_true", help="do not touch benchmarks/RESULTS.md")
    ap.add_argument("--no-compiled", action="store_true",
                    help="leave out ours-compiled (execution.compile true; ~25-35 s of compiling per workload)")
    ap.add_argument("--json", type=str, default=None, help="also write the JSON result to this file")
    ap.add_argument("--render", type=str, default=None, metavar="JSON",
                    help="measure nothing: write the Peers section from a saved JSON result of this script (the "
                         "numbers and the command stay those of that run; the wording is this version's)")
    args = ap.parse_args(argv)
    if args.render:
        r = json.loads(Path(args.render).read_text())
        md = markdown(r["machine"], r["checks"], r["timings"], r["command"], r["wall_s"],
                      list(NOTES) + r.get("extra_notes", []))
        print(md)
        if not args.no_write:
            write_section(md)
        return
    torch.set_num_threads(args.threads)
    if not args.no_compiled:  # cold compiles: torch's caches in a fresh directory
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="peers-inductor-")
    schedule = dict(SCHEDULE_QUICK if args.quick else SCHEDULE)
    if args.repeats:
        schedule.update({w: (int(n), int(n), 0.0) for w, n in zip(WORKLOADS, args.repeats.split(","))})
    workloads = list(args.only or WORKLOADS)
    extra_notes = []  # what this run found missing; NOTES are fixed text
    if any(WORKLOADS[w]["family"] == "omniglot" for w in workloads) and not omniglot_available():
        extra_notes.append("Omniglot zips not found: the conv4 workloads were skipped.")
        workloads = [w for w in workloads if WORKLOADS[w]["family"] != "omniglot"]
    peers = [p for p in PEER_NAMES if available(p)]
    for p in PEER_NAMES:
        if p not in peers:
            extra_notes.append(f"{p}: its package is not importable in this interpreter ({sys.executable}); "
                               "column empty.")
    info = machine_info()
    print(json.dumps({"machine": info, "peers": peers}), flush=True)
    command = ("PYTHONPATH=. nice -n 10 .venv-peers/bin/python benchmarks/peers.py"
               + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])))
    t_start = time.perf_counter()
    checks, timings = [], []
    for w in workloads:
        for alg in args.algs:
            t0 = time.perf_counter()
            mb = check_meta_batch(w, args.quick)
            c = gradient_check(w, alg, ["torch"] + peers_for(w, peers), meta_batch=mb)
            print(f"[check {w} {alg} {time.perf_counter() - t0:.1f} s] {json.dumps(c)}", flush=True)
            checks.append(c)
    excluded = {}
    for c in checks:  # a peer that computes a different meta-gradient is not timed on that workload
        tol = MATCH_TOL * max(1.0, c["grad_scale"])
        bad = [n for n, d in c["peers"].items() if n in peers and max(d["grad_phi"], d["grad_log_sigma2"]) > tol]
        if bad:
            excluded[(c["workload"], c["alg"])] = bad
    for w in workloads:
        if schedule[w][1] < 1:
            continue
        for alg in args.algs:
            t0 = time.perf_counter()
            t = time_workload(w, alg, [p for p in peers_for(w, peers) if p not in excluded.get((w, alg), [])],
                              *schedule[w], compiled=not args.no_compiled)
            t["excluded"] = excluded.get((w, alg), [])
            print(f"[time {w} {alg} {time.perf_counter() - t0:.1f} s] {json.dumps(t)}", flush=True)
            timings.append(t)
    wall = time.perf_counter() - t_start
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    notes = list(NOTES) + extra_notes
    md = markdown(info, checks, timings, command, wall, notes)
    print(md)
    if not args.no_write:
        write_section(md)
    result = {"machine": info, "command": command, "wall_s": round(wall, 1), "checks": checks, "timings": timings,
              "notes": notes, "extra_notes": extra_notes}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
