# One image for the API, the workers and the migration job.
#   docker build -t metashrink .                                  # CPU torch (default)
#   docker build --build-arg TORCH_VARIANT=cuda -t metashrink:cuda .    # CUDA torch: PyPI's Linux wheel (bundles CUDA)
FROM python:3.11-slim

ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONPATH=/app \
    METASHRINK_DATA_DIR=/data

WORKDIR /app

# torch first and explicitly: cpu from PyTorch's CPU index; cuda from PyPI, whose Linux x86_64 torch wheel is the
# CUDA build (PyTorch's per-CUDA indexes, e.g. cu124, stop publishing a CUDA version a few releases on)
RUN case "${TORCH_VARIANT}" in \
      cpu) pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu ;; \
      cuda) pip install "torch==${TORCH_VERSION}" ;; \
      *) echo "TORCH_VARIANT must be cpu or cuda, got ${TORCH_VARIANT}" >&2; exit 1 ;; \
    esac

# dependencies before the source, so code edits do not reinstall them
COPY pyproject.toml ./
RUN python - <<'PY'
import subprocess, sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
subprocess.check_call([sys.executable, "-m", "pip", "install", *deps])
PY

COPY . .
RUN pip install --no-deps . \
    && useradd --create-home --uid 1000 metashrink \
    && mkdir -p /data && chown -R metashrink /data

USER metashrink
VOLUME ["/data"]
EXPOSE 8000

CMD ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000"]
