"""``/docs`` (Swagger UI) and ``/redoc`` render in headless Chromium with no network but the server's: their
JavaScript and CSS come from the ``fastapi-offline`` package's assets (``/static-offline-docs``), every other
host name fails to resolve. The rendered DOM must hold the operations, which only the loaded JavaScript puts
there (the served HTML has none), so the test fails if an asset does not load.

.ci/run installs Debian's ``chromium``; without a Chromium binary the test is skipped, saying so.
"""
from __future__ import annotations

import re
import shutil
import subprocess

import httpx
import pytest

from .live_http import served

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary (chromium, chromium-browser or "
                                                         "google-chrome) on PATH; .ci/run installs Debian's chromium")


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    from api import create_app
    from store.settings import Settings
    # the document and the pages need no database, broker or worker
    app = create_app(Settings(data_dir=tmp_path_factory.mktemp("docs"), reconciler=False))
    with served(app) as u:
        yield u


def rendered(url: str, tmp_path) -> str:
    p = subprocess.run([CHROMIUM, "--headless=new", "--disable-gpu", "--no-sandbox", "--no-first-run",
                        "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium'}",
                        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # offline but for us
                        "--virtual-time-budget=20000", "--dump-dom", url],
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_swagger_ui_renders_the_operations_offline(url, tmp_path):
    html = httpx.get(f"{url}/docs").text
    assert "opblock" not in html and "/static-offline-docs/swagger-ui-bundle.js" in html  # JS renders them
    dom = rendered(f"{url}/docs", tmp_path)
    assert 'class="swagger-ui' in dom, dom[:2000]
    assert len(re.findall(r'class="opblock opblock-', dom)) >= 20, dom[:2000]
    for path in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/models/{model_id}/adapt"):
        assert f'data-path="{path}"' in dom, path


def test_redoc_renders_the_operations_offline(url, tmp_path):
    html = httpx.get(f"{url}/redoc").text
    assert "data-item-id" not in html and "/static-offline-docs/redoc.standalone.js" in html
    dom = rendered(f"{url}/redoc", tmp_path)
    operations = re.findall(r'data-item-id="tag/[^"/]+/operation/([^"]+)"', dom)
    assert len(operations) >= 20, dom[:2000]
    assert any(op.endswith("_v1_jobs_post") for op in operations), operations
