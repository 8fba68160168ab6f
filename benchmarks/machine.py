"""What a benchmark ran on (the CPU's name and the code's commit, written beside every recorded number), and
writing its section of benchmarks/RESULTS.md."""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=str(ROOT)).stdout.strip() or None
    except OSError:
        return None


def write_section(md: str, path: Path = RESULTS) -> None:
    """Replace the ``## ...`` section of ``path`` whose heading is ``md``'s first line (up to the next ``## ``
    heading), or append it; every other section is kept verbatim."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    head = md.split("\n", 1)[0] + "\n"
    start = text.find(head)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + md
    else:
        nxt = text.find("\n## ", start + len(head) - 1)
        rest = text[nxt + 1:] if nxt >= 0 else ""
        text = text[:start] + md + ("\n" + rest if rest else "")
    path.write_text(text)
