#!/usr/bin/env bash
# One command on a GPU machine: the CUDA tests, then conv4 meta-training throughput on the GPU (maml, sigma_maml;
# loop/vmap; amp off/bf16), appended with the date and the machine to benchmarks/RESULTS.md. See benchmarks/gpu.py.
#   benchmarks/gpu.sh             # needs a CUDA device (without one: tests skip, nothing written, exit code 2)
#   benchmarks/gpu.sh --dry-run   # anywhere: the CPU-side parts, prints what it would append, writes nothing
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exec "$PY" benchmarks/gpu.py "$@"
