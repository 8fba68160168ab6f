"""Smoke test of benchmarks/reproduce/mh_frozen.py (MH frozen features, App. A.3) at a tiny size (~10 s CPU)."""
import json
import math

import pytest

from datasets.omniglot import default_directory

needs_omniglot = pytest.mark.skipif(not list(default_directory().glob("images_*.zip")),
                                    reason=f"no Omniglot zips in {default_directory()}")


@needs_omniglot
def test_mh_frozen_tiny_run_reports_both_settings(tmp_path):
    from benchmarks.reproduce.mh_frozen import STEPS, main
    out, path = main(["--cpu-budget", "0.5", "--channels", "4", "--tasks", "3", "--select-tasks", "3",
                      "--out-dir", str(tmp_path)])
    text = open(path).read()
    for needle in ("| MAML | normal |", "| MAML | frozen features |", "| MH | normal |", "| MH | frozen features |",
                   "MH gap - MAML gap", "body only", "mh_frozen.png"):
        assert needle in text, needle
    assert (tmp_path / "mh_frozen.png").is_file()
    raw = json.loads((tmp_path / "mh_frozen.json").read_text())
    for m in ("maml", "hypernet"):
        assert out[m]["meta_steps"] >= 1
        assert all(math.isfinite(v) and v >= 0 for v in out[m]["movement"].values())
        for setting in ("normal", "frozen", "frozen_tuned", "body"):
            acc = raw["methods"][m]["acc"][setting]
            assert len(acc) == 3 and all(len(row) == len(STEPS) for row in acc)
            assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for row in acc for v in row)
        # step 0 is phi itself: both settings score the same predictions
        assert [r[0] for r in raw["methods"][m]["acc"]["normal"]] == [r[0] for r in raw["methods"][m]["acc"]["frozen"]]
    # the report re-renders from the saved per-task accuracies without training
    _, again = main(["--from-json", str(tmp_path / "mh_frozen.json"), "--out-dir", str(tmp_path)])
    assert "| MH | frozen features |" in open(again).read()
