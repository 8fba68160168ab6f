"""Measurements 2 and 3 of the peer harness: interleaved timing. One shared batch per repeat, every contender's
meta-step on it (the order rotating every repeat), plus ours end-to-end with its own sampling; medians and
per-repeat ratios ours / best peer."""
from __future__ import annotations

import os
import statistics
import time

import torch

from .contenders import Ours, OursCompiled, build_peer
from .gradients import maxdiff


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def _timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def time_workload(workload, alg, peers, min_repeats, max_repeats, budget_s, seed=0, compiled=False) -> dict:
    """Interleaved repeats: one shared batch per repeat, every contender's step on it, plus ours end-to-end.

    Repeats go on while the next one is expected to end within ``budget_s`` (at least ``min_repeats``, at most
    ``max_repeats``). ``ours`` gets the same batches as the peers, so their parameters stay in lockstep (checked
    at the end, float32); the end-to-end step runs on a second trainer of the same config (its own task stream)."""
    ours = Ours(workload, alg)
    ours_e2e = Ours(workload, alg)
    contenders = [ours] + [build_peer(name, workload, alg, ours, torch.float32) for name in peers]
    if compiled:
        contenders.append(OursCompiled(workload, alg))
    fam, mb = ours.trainer.family, ours.trainer.config["outer"]["meta_batch"]
    g = torch.Generator().manual_seed(seed + 99)

    def sample():
        return fam.sample(mb, g).to("cpu", torch.float32)

    warm = sample()
    for c in contenders:  # warm-up: first-call costs (vmap tracing, allocator) are not timed
        c.step(warm)
    ours_e2e.step_e2e()
    names = [c.name for c in contenders]
    rows, begin, last = [], time.perf_counter(), 0.0
    while len(rows) < min_repeats or (len(rows) < max_repeats
                                      and time.perf_counter() - begin + last <= budget_s):
        t_rep = time.perf_counter()
        r = len(rows)
        w0 = time.perf_counter()
        batch = sample()
        t_sample = time.perf_counter() - w0
        entries = [(c.name, (lambda c=c: c.step(batch))) for c in contenders] + [("ours_e2e", ours_e2e.step_e2e)]
        k = r % len(entries)
        wall, cpu = {}, {}
        for name, fn in entries[k:] + entries[:k]:  # the order rotates every repeat
            wall[name], cpu[name] = _timed(fn)
        rows.append({"sample": t_sample, "wall": wall, "cpu": cpu, "load1": load1()})
        last = time.perf_counter() - t_rep
        print(f"  [{workload} {alg} repeat {r + 1}] sample {t_sample * 1e3:.1f} ms, "
              + ", ".join(f"{n} {wall[n] * 1e3:.1f}" for n in names + ["ours_e2e"])
              + f" ms (wall), load1 {rows[-1]['load1']}", flush=True)
    out = summarize(workload, alg, names, rows)
    if compiled:
        out["compile_s"] = round(contenders[-1].compile_s, 1)
    phi, ls = ours.params()
    # conv biases feed batch-norm: their meta-gradient is 0 up to rounding, so Adam moves them by +-lr on noise
    # and they part ways at once; they are reported apart
    noise = [k for k in phi if k.startswith("conv") and k.endswith(".bias")]
    out["lockstep_phi_max_diff"], out["lockstep_conv_bias_max_diff"] = {}, {}
    for c in contenders[1:]:
        pp, pl = c.params()
        pp = {k: v.detach() for k, v in pp.items()}
        d = maxdiff({k: v for k, v in pp.items() if k not in noise}, phi)
        if c.sigma:
            d = max(d, float((pl.detach() - ls).abs().max()))
        out["lockstep_phi_max_diff"][c.name] = d
        if noise:
            out["lockstep_conv_bias_max_diff"][c.name] = maxdiff({k: pp[k] for k in noise}, phi)
    out["steps_each"] = len(rows) + 1
    return out


def summarize(workload, alg, names, rows) -> dict:
    peers = [n for n in names if not n.startswith("ours")]

    def med(key, n):
        return statistics.median(r[key][n] for r in rows)

    def ratios(key, extra=0.0):
        if not peers:
            return []
        return [r[key]["ours" if not extra else "ours_e2e"] / min(r[key][n] + (r["sample"] if extra else 0.0)
                                                                  for n in peers) for r in rows]

    wall_r, cpu_r, e2e_r = ratios("wall"), ratios("cpu"), ratios("wall", extra=1.0)
    comp_r = [r["wall"]["ours-compiled"] / min(r["wall"][n] for n in peers) for r in rows] \
        if "ours-compiled" in names and peers else []
    return {"workload": workload, "alg": alg, "repeats": len(rows),
            "median_ms": {n: round(med("wall", n) * 1e3, 2) for n in names},
            "min_ms": {n: round(min(r["wall"][n] for r in rows) * 1e3, 2) for n in names},
            "cpu_median_ms": {n: round(med("cpu", n) * 1e3, 2) for n in names},
            "ratios": [round(x, 3) for x in wall_r],
            "ratio_median": round(statistics.median(wall_r), 3) if wall_r else None,
            "cpu_ratios": [round(x, 3) for x in cpu_r],
            "cpu_ratio_median": round(statistics.median(cpu_r), 3) if cpu_r else None,
            "best_peer_per_repeat": [min(peers, key=lambda n: r["wall"][n]) for r in rows] if peers else [],
            "sample_ms": round(statistics.median(r["sample"] for r in rows) * 1e3, 2),
            "e2e_ms": {"ours": round(med("wall", "ours_e2e") * 1e3, 2),
                       **{n: round(statistics.median(r["sample"] + r["wall"][n] for r in rows) * 1e3, 2)
                          for n in peers}},
            "e2e_ratios": [round(x, 3) for x in e2e_r],
            "e2e_ratio_median": round(statistics.median(e2e_r), 3) if e2e_r else None,
            "compiled_ratios": [round(x, 3) for x in comp_r],
            "compiled_ratio_median": round(statistics.median(comp_r), 3) if comp_r else None,
            "load1": [r["load1"] for r in rows]}
