"""Artifact store: tensors as safetensors files (never pickle), with sha256 and size recorded by the caller.

Two backends behind one interface; ``make_store`` picks one from ``Settings.artifacts_url``:

- ``LocalArtifactStore``: a directory (the embedded default, ``<data_dir>/artifacts``); uris ``file:<key>``.
- ``S3ArtifactStore``: ``s3://bucket/prefix`` on any S3-compatible server (AWS S3, MinIO, Ceph RGW, ...) through
  boto3; uris ``s3:<key>``. Uploads and downloads use boto3's managed transfer (multipart above
  ``s3_multipart_threshold``, ranged parallel GETs, retries); each object also carries its sha256 as metadata.

Uris are relative to the store (as ``file:`` ones are to the directory), so a bucket or prefix can move.
Every reader goes through the interface (``get_bytes``, ``open``, ``get_tensors``, ``load_safetensors``) and every
read verifies the sha256 (the caller's, from the database; for S3 without one, the object's own), so the API
and the workers never need a file path of the store; a missing object is ``MissingArtifact`` on both. Only the
local store has ``path`` / ``existing`` (its fast path: safetensors loads the file by mmap).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

from safetensors import safe_open

log = logging.getLogger("metashrink.store")


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


def safetensors_metadata(data: bytes) -> dict:
    """The ``metashrink`` metadata of a safetensors file held in memory (its JSON header's ``__metadata__``)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(bytes(data[8:8 + n]))
    return json.loads((header.get("__metadata__") or {}).get("metashrink", "{}"))


def _mismatch(uri: str) -> ArtifactError:
    return ArtifactError(f"artifact {uri} does not match its recorded sha256")


class _Store:
    """What both backends share: safetensors encoding on top of ``put_bytes`` and ``load_safetensors``."""

    root: object

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
        tensors, meta = self.load_safetensors(uri, sha256, "pt")
        # owned copies: load_file can hand back views into the file buffer at addresses that are not 64-byte
        # aligned, and kernels then round differently from the uninterrupted run (issue 11: a resumed job must
        # continue bit for bit); a fresh allocation is aligned
        return {k: v.clone() for k, v in tensors.items()}, meta

    @staticmethod
    def _load_bytes(data: bytes, framework: str):
        if framework == "pt":
            from safetensors.torch import load
        else:
            from safetensors.numpy import load
        return load(data), safetensors_metadata(data)


class LocalArtifactStore(_Store):
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

    def _missing(self, uri: str) -> MissingArtifact:
        return MissingArtifact(f"artifact {uri[len('file:'):]} is missing from the artifact store")

    def existing(self, uri: str) -> Path:
        """``path(uri)``, or MissingArtifact when its file is gone."""
        p = self.path(uri)
        if not p.is_file():
            raise self._missing(uri)
        return p

    def put_bytes(self, key: str, data: bytes) -> StoredArtifact:
        return self.put_file(key, io.BytesIO(data))

    def put_file(self, key: str, src: BinaryIO) -> StoredArtifact:
        """Copy a binary file (from its start) in 1 MiB chunks, hashing as it goes: one bounded buffer."""
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + f".{uuid.uuid4().hex}.tmp")
        h, n = hashlib.sha256(), 0
        src.seek(0)
        with open(tmp, "wb") as f:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                h.update(chunk)
                n += len(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)  # atomic: a reader never sees half a file
        return StoredArtifact(f"file:{key}", h.hexdigest(), n)

    def open(self, uri: str, sha256: str | None = None) -> BinaryIO:
        """The artifact as a binary file at offset 0, verified against ``sha256`` when given. The open file is
        the one hashed, so a concurrent replace cannot slip other bytes in."""
        try:
            f = open(self.existing(uri), "rb")
        except FileNotFoundError:
            raise self._missing(uri) from None
        if sha256 is not None:
            h = hashlib.sha256()
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            if h.hexdigest() != sha256:
                f.close()
                raise _mismatch(uri)
            f.seek(0)
        return f

    def get_bytes(self, uri: str, sha256: str | None = None) -> bytes:
        with self.open(uri) as f:
            data = f.read()
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise _mismatch(uri)
        return data

    def load_safetensors(self, uri: str, sha256: str | None = None, framework: str = "pt"):
        """(arrays, metadata) of a safetensors artifact; ``framework`` "pt" (torch) or "np" (numpy). The local
        fast path: the file is loaded by mmap, not read into memory first."""
        p = self.existing(uri)
        if sha256 is not None and sha256_file(p) != sha256:
            raise _mismatch(uri)
        if framework == "pt":
            from safetensors.torch import load_file
        else:
            from safetensors.numpy import load_file
        with safe_open(str(p), framework=framework) as f:
            meta = json.loads((f.metadata() or {}).get("metashrink", "{}"))
        return load_file(str(p)), meta

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


class _HashingSink:
    """A write-only (so non-seekable) target for boto3's managed download: s3transfer then writes the parts in
    order, and the sha256 is computed on the way, without a second pass over the bytes."""

    def __init__(self, out):
        self.out, self.sha, self.size = out, hashlib.sha256(), 0

    def write(self, b):
        self.sha.update(b)
        self.size += len(b)
        return self.out.write(b)


class S3ArtifactStore(_Store):
    """Artifacts as objects under ``s3://bucket/prefix`` on an S3-compatible server. An object write is atomic
    on S3 (a reader sees none or the whole object, multipart uploads included), so no temporary names."""

    scheme = "s3"

    def __init__(self, url: str, *, endpoint_url: str | None = None, region: str | None = None,
                 access_key_id: str | None = None, secret_access_key: str | None = None,
                 session_token: str | None = None, addressing_style: str | None = None,
                 multipart_threshold: int = 8 * 1024 ** 2, multipart_chunksize: int = 8 * 1024 ** 2,
                 max_concurrency: int = 4, spool_bytes: int = 16 * 1024 ** 2):
        u = urlparse(url)
        if u.scheme != "s3" or not u.netloc:
            raise ArtifactError(f"not an s3://bucket[/prefix] url: {url!r}")
        self.bucket, self.prefix = u.netloc, u.path.strip("/")
        self.root = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.endpoint_url = endpoint_url
        self._client_args = dict(endpoint_url=endpoint_url, region_name=region, aws_access_key_id=access_key_id,
                                 aws_secret_access_key=secret_access_key, aws_session_token=session_token)
        # path style by default where an endpoint is given: MinIO and most self-hosted servers are not set up
        # for bucket subdomains (http://bucket.minio:9000 does not resolve in docker-compose)
        self.addressing_style = addressing_style or ("path" if endpoint_url else "auto")
        self.multipart_threshold, self.multipart_chunksize = multipart_threshold, multipart_chunksize
        self.max_concurrency, self.spool_bytes = max_concurrency, spool_bytes
        self._client, self._client_pid, self._lock = None, None, threading.Lock()

    @property
    def client(self):
        """One boto3 client per process (thread-safe), made on first use: after a fork (Celery's pool children)
        nothing of the parent's connection pool is shared."""
        if self._client is None or self._client_pid != os.getpid():
            with self._lock:
                if self._client is None or self._client_pid != os.getpid():
                    import boto3
                    from botocore.config import Config

                    cfg = Config(s3={"addressing_style": self.addressing_style},
                                 retries={"mode": "standard", "max_attempts": 5},
                                 max_pool_connections=max(10, self.max_concurrency * 2),
                                 # checksums only where S3 requires them: boto3's default CRC32 trailers are
                                 # refused by some S3-compatible servers; integrity is the sha256 verified here
                                 request_checksum_calculation="when_required",
                                 response_checksum_validation="when_required")
                    self._client = boto3.session.Session().client("s3", config=cfg, **self._client_args)
                    self._client_pid = os.getpid()
        return self._client

    @property
    def transfer_config(self):
        from boto3.s3.transfer import TransferConfig
        return TransferConfig(multipart_threshold=self.multipart_threshold,
                              multipart_chunksize=self.multipart_chunksize, max_concurrency=self.max_concurrency)

    def _object_key(self, key: str) -> str:
        if not key or any(p in ("", ".", "..") for p in key.split("/")):
            raise ArtifactError(f"artifact key {key!r} escapes the store")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _key(self, uri: str) -> str:
        if not uri.startswith("s3:"):
            raise ArtifactError(f"not an artifact uri of this S3 store: {uri!r}")
        return uri[len("s3:"):]

    @staticmethod
    def _is_missing(e) -> bool:
        return str(getattr(e, "response", {}).get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound")

    def put_bytes(self, key: str, data: bytes) -> StoredArtifact:
        return self.put_file(key, io.BytesIO(data))

    def put_file(self, key: str, src: BinaryIO) -> StoredArtifact:
        """Upload a seekable binary file: one pass to hash it (1 MiB chunks), then boto3's multipart transfer
        streams it in parts (``s3_multipart_chunksize``); the file is never held in memory whole."""
        h, n = hashlib.sha256(), 0
        src.seek(0)
        for chunk in iter(lambda: src.read(1 << 20), b""):
            h.update(chunk)
            n += len(chunk)
        src.seek(0)
        sha = h.hexdigest()
        self.client.upload_fileobj(src, self.bucket, self._object_key(key),
                                   ExtraArgs={"Metadata": {"sha256": sha}, "ContentType": "application/octet-stream"},
                                   Config=self.transfer_config)
        return StoredArtifact(f"s3:{key}", sha, n)

    def _download(self, uri: str, out, sha256: str | None) -> int:
        """Write the object to ``out`` and verify it: against ``sha256`` when given, else against the sha256 the
        object was uploaded with (its metadata, when present). Returns its size."""
        from botocore.exceptions import ClientError

        key = self._key(uri)
        okey = self._object_key(key)
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=okey)
            sink = _HashingSink(out)
            self.client.download_fileobj(self.bucket, okey, sink, Config=self.transfer_config)
        except ClientError as e:
            if self._is_missing(e):
                raise MissingArtifact(f"artifact {key} is missing from the artifact store") from None
            raise
        expected = sha256 or (head.get("Metadata") or {}).get("sha256")
        if expected is not None and sink.sha.hexdigest() != expected:
            raise _mismatch(uri)
        return sink.size

    def get_bytes(self, uri: str, sha256: str | None = None) -> bytes:
        buf = io.BytesIO()
        self._download(uri, buf, sha256)
        return buf.getvalue()

    def open(self, uri: str, sha256: str | None = None) -> BinaryIO:
        """The object downloaded and verified, as a binary file at offset 0 (in memory up to ``spool_bytes``,
        then a file of this host's temporary directory, never the data directory): what the API serves has been
        checked before its first byte is sent."""
        f = tempfile.SpooledTemporaryFile(max_size=self.spool_bytes)
        try:
            self._download(uri, f, sha256)
        except BaseException:
            f.close()
            raise
        f.seek(0)
        return f

    def load_safetensors(self, uri: str, sha256: str | None = None, framework: str = "pt"):
        """(arrays, metadata) of a safetensors artifact, decoded from memory."""
        return self._load_bytes(self.get_bytes(uri, sha256), framework)

    def delete(self, uri: str):
        self.client.delete_object(Bucket=self.bucket, Key=self._object_key(self._key(uri)))  # idempotent

    def list_keys(self, key: str = "") -> list[str]:
        """Keys (relative to the store) of the objects under ``key/`` (all of the store's for "")."""
        base = f"{self.prefix}/" if self.prefix else ""
        pfx = self._object_key(key.strip("/")) + "/" if key.strip("/") else base
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=pfx):
            out += [o["Key"][len(base):] for o in page.get("Contents", [])]
        return out

    def delete_prefix(self, key: str):
        """Every object under ``key/`` (a job's checkpoints, orphans of lost attempts included)."""
        from botocore.exceptions import ClientError

        okeys = [self._object_key(k) for k in self.list_keys(key)]
        for i in range(0, len(okeys), 1000):  # DeleteObjects takes 1000 keys a request
            batch = okeys[i:i + 1000]
            try:
                r = self.client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": k} for k in batch], "Quiet": True})
                failed = [e["Key"] for e in r.get("Errors", [])]
            except ClientError as e:  # a server without DeleteObjects (or with other checksum rules)
                log.warning("delete_objects refused (%s); deleting %d objects one by one", e, len(batch))
                failed = batch
            for k in failed:
                self.client.delete_object(Bucket=self.bucket, Key=k)


def make_store(settings) -> LocalArtifactStore | S3ArtifactStore:
    """The store ``settings.artifacts_url`` names: ``s3://bucket[/prefix]`` (with the ``s3_*`` settings;
    credentials default to boto3's chain: AWS_* variables, ~/.aws, an instance role), or a local directory (a
    path or a ``file://`` url); by default the directory ``artifacts_dir``."""
    url = getattr(settings, "artifacts_url", None)
    if url and url.startswith("s3://"):
        def secret(v):
            return v.get_secret_value() if v is not None else None
        return S3ArtifactStore(
            url, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region,
            access_key_id=settings.s3_access_key_id, secret_access_key=secret(settings.s3_secret_access_key),
            session_token=secret(settings.s3_session_token), addressing_style=settings.s3_addressing_style,
            multipart_threshold=settings.s3_multipart_threshold, multipart_chunksize=settings.s3_multipart_chunksize)
    if url:
        return LocalArtifactStore(Path(url[len("file://"):] if url.startswith("file://") else url))
    return LocalArtifactStore(Path(settings.artifacts_dir))


__all__ = ["LocalArtifactStore", "S3ArtifactStore", "StoredArtifact", "ArtifactError", "MissingArtifact",
           "make_store", "public_message", "safetensors_metadata", "sha256_file"]
