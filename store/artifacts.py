"""Artifact store: tensors as safetensors files (never pickle), with sha256 and size recorded by the caller.

The interface (put_tensors / get_tensors / open / path) leaves room for an S3-compatible backend; the local
directory implementation is the default.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open


@dataclass
class StoredArtifact:
    uri: str
    sha256: str
    bytes: int


class ArtifactError(Exception):
    pass


class MissingArtifact(ArtifactError):
    """The database names an artifact whose file is gone. The message names the artifact by its key in the store,
    never by a server path: it reaches API answers (a 410) and job, evaluation and adapt errors."""


def public_message(e: BaseException, roots=()) -> str:
    """``"Type: message"`` for an error that reaches API answers (job and evaluation errors, adapt failures)
    without this server's paths: an OSError names its file by its name only, and each of ``roots`` (the data
    directory, the artifact store, the code) is replaced by ``<server>``."""
    if isinstance(e, OSError) and e.filename is not None:
        msg = f"{e.strerror or 'error'}: {Path(os.fsdecode(e.filename)).name}"
    else:
        msg = str(e)
    for root in sorted((str(r) for r in roots if r), key=len, reverse=True):
        msg = msg.replace(root, "<server>")
    return f"{type(e).__name__}: {msg}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class LocalArtifactStore:
    scheme = "file"

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        p = (self.root / key).resolve()
        if self.root not in p.parents:
            raise ArtifactError(f"artifact key {key!r} escapes the store")
        return p

    def path(self, uri: str) -> Path:
        if not uri.startswith("file:"):
            raise ArtifactError(f"not a local artifact uri: {uri!r}")
        return self._path(uri[len("file:"):])

    def existing(self, uri: str) -> Path:
        """``path(uri)``, or MissingArtifact when its file is gone."""
        p = self.path(uri)
        if not p.is_file():
            raise MissingArtifact(f"artifact {uri[len('file:'):]} is missing from the artifact store")
        return p

    def put_bytes(self, key: str, data: bytes) -> StoredArtifact:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + f".{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)  # atomic: a reader never sees half a file
        return StoredArtifact(f"file:{key}", hashlib.sha256(data).hexdigest(), len(data))

    def put_tensors(self, key: str, tensors: dict, metadata: dict | None = None) -> StoredArtifact:
        """Save ``name -> torch.Tensor`` as safetensors; ``metadata`` (JSON-able) goes in the header."""
        import torch
        from safetensors.torch import save

        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        assert all(isinstance(v, torch.Tensor) for v in tensors.values())
        header = {"metashrink": json.dumps(metadata or {})}
        return self.put_bytes(key, save(tensors, metadata=header))

    def get_tensors(self, uri: str, sha256: str | None = None):
        """(tensors, metadata); verifies the sha256 when given."""
        from safetensors.torch import load_file

        p = self.existing(uri)
        if sha256 is not None and sha256_file(p) != sha256:
            raise ArtifactError(f"artifact {uri} does not match its recorded sha256")
        with safe_open(str(p), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("metashrink", "{}"))
        # owned copies: load_file can hand back views into the file buffer at addresses that are not 64-byte
        # aligned, and kernels then round differently from the uninterrupted run (issue 11: a resumed job must
        # continue bit for bit); a fresh allocation is aligned
        return {k: v.clone() for k, v in load_file(str(p)).items()}, meta

    def delete(self, uri: str):
        try:
            self.path(uri).unlink()
        except FileNotFoundError:
            pass

    def delete_prefix(self, key: str):
        """Every artifact under ``key/`` (a job's checkpoints, orphans of lost attempts included)."""
        p = self._path(key.rstrip("/"))
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def make_store(settings) -> LocalArtifactStore:
    return LocalArtifactStore(Path(settings.artifacts_dir))


__all__ = ["LocalArtifactStore", "StoredArtifact", "ArtifactError", "MissingArtifact", "make_store", "public_message",
           "sha256_file"]
