"""Alembic migrations are the only schema source: upgrading an empty database gives exactly the models."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from store.db import normalise_url
from store.migrate import upgrade
from store.models import Base

ROOT = Path(__file__).resolve().parents[2]


def test_models_match_migrations(service):
    url = normalise_url(service.settings.database_url)  # upgraded to head on an empty database by the fixture
    engine = create_engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    engine.dispose()
    assert diff == [], diff


def test_upgrade_is_idempotent(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    upgrade(url)
    upgrade(url)


def test_docker_compose_config():
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose binary not installed (.ci/run installs Debian's package)")
    r = subprocess.run([exe, "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "migrate" in r.stdout and "capabilities" in r.stdout
    r = subprocess.run([exe, "-f", str(ROOT / "docker-compose.yml"), "--profile", "cpu", "config", "--services"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "worker-cpu" in r.stdout.split()
