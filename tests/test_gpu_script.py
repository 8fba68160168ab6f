"""benchmarks/gpu.sh runs its CPU-side parts anywhere, says clearly when there is no CUDA device, and appends runs
to benchmarks/RESULTS.md without touching other sections."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(*args):
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})


def test_dry_run_runs_the_cpu_side_and_writes_nothing():
    before = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    r = _run("--dry-run", "--no-tests")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| maml | loop | off |" in r.stdout and "| sigma_maml | loop | bf16 |" in r.stdout
    assert "dry run" in r.stdout and "error" not in r.stdout.split("| algorithm |")[1]
    assert (ROOT / "benchmarks" / "RESULTS.md").read_text() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the script would benchmark it")
def test_without_cuda_it_says_so_and_exits_2():
    r = _run("--no-tests")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no CUDA device" in r.stdout and "nothing is benchmarked or written" in r.stdout


def test_append_keeps_earlier_runs_and_other_sections(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks.gpu import SECTION, append
    p = tmp_path / "RESULTS.md"
    p.write_text("# Benchmark results\n\n## A\n\ntext a\n")
    append("### run 1\n\nrow 1\n", p)
    p.write_text(p.read_text() + "\n## B\n\ntext b\n")  # a later section after the GPU one
    append("### run 2\n\nrow 2\n", p)
    t = p.read_text()
    assert t.count(SECTION) == 1
    assert t.index("## A") < t.index(SECTION) < t.index("### run 1") < t.index("### run 2") < t.index("## B")
    assert "text a" in t and "text b" in t
