"""What Schemathesis found (tests/service/test_schemathesis.py), pinned as plain regression tests."""
from __future__ import annotations

import pytest

from .conftest import small_config


@pytest.fixture
def h(service):
    """A tenant of these tests' own (its jobs are in no other test's lists)."""
    from store.keys import create_key
    with service.app.state.db.session() as s:
        return {"Authorization": f"Bearer {create_key(s, 'contract')}"}


def test_405_allow_lists_every_method_of_the_path(service):
    c = service.client
    r = c.request("OPTIONS", "/v1/jobs", headers=service.h())
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD, POST", r.headers
    assert r.headers["content-type"] == "application/problem+json"
    r = c.request("PUT", "/v1/models/mdl_x/evaluations", headers=service.h())
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD, POST", r.headers


def test_job_bodies_are_validated_as_json_schema_types(service, h):
    """No coercion the document does not admit ("5" or true for an integer, 1 for a boolean); 3.0 is an integer
    in JSON Schema and is one here."""
    c = service.client
    for mutate, loc in ((lambda cfg: cfg.update(seed=True), ["seed"]),
                        (lambda cfg: cfg["outer"].update(steps="5"), ["outer", "steps"]),
                        (lambda cfg: cfg["execution"].update(compile=1), ["execution", "compile"]),
                        (lambda cfg: cfg["inner"].update(lr="0.1"), ["inner", "lr"])):
        cfg = small_config()
        mutate(cfg)
        r = c.post("/v1/jobs", json=cfg, headers=h)
        assert r.status_code == 422 and r.json()["errors"][0]["loc"] == loc, r.text
    cfg = small_config(steps=5)
    cfg["outer"]["steps"], cfg["tasks"]["amplitude"] = 5.0, [0.5, 2]
    r = c.post("/v1/jobs", json=cfg, headers=h)
    assert r.status_code == 202, r.text
    jid = r.json()["id"]
    c.post(f"/v1/jobs/{jid}/cancel", headers=h)
    j = c.get(f"/v1/jobs/{jid}", headers=h).json()
    assert j["progress"]["total"] == 5 and j["config"]["tasks"]["amplitude"] == [0.5, 2.0], j
    # a task family is named, unless dataset_id says it (the document says the same)
    cfg = small_config()
    del cfg["tasks"]["family"]
    assert c.post("/v1/jobs", json=cfg, headers=h).status_code == 422


def test_any_cursor_the_pattern_admits_is_a_position(service, h):
    c = service.client
    assert c.get("/v1/jobs", params={"cursor": "garbage"}, headers=h).status_code == 422
    r = c.get("/v1/jobs", params={"cursor": "0.a"}, headers=h)  # before the epoch's first microsecond: nothing
    assert r.status_code == 200 and r.json()["items"] == [], r.text
    r = c.get("/v1/jobs", params={"cursor": "9999999999999999.z"}, headers=h)
    assert r.status_code == 200, r.text


def test_nul_characters_are_refused_on_both_backends(service, h):
    """PostgreSQL stores no NUL; the API refuses one in a path, a query or a JSON body (422 naming where) on
    either backend, and the document's free-form request strings say so with a pattern."""
    c = service.client
    r = c.get("/v1/jobs/job_%00x", headers=h)
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["path"], r.text
    r = c.get("/v1/jobs/job_x/metrics", params={"name": "a\x00b"}, headers=h)
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["query"], r.text
    cfg = small_config()
    cfg["tasks"] = {"dataset_id": "ds\x00x", "ways": 5}
    r = c.post("/v1/jobs", json=cfg, headers=h)
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["tasks", "dataset_id"], r.text
    doc = c.get("/openapi.json").json()
    [name] = [p for p in doc["paths"]["/v1/jobs/{job_id}/metrics"]["get"]["parameters"] if p["name"] == "name"]
    assert any(s.get("pattern") == "^[^\\u0000]*$" for s in name["schema"]["anyOf"]), name
    assert doc["paths"]["/v1/jobs/{job_id}"]["get"]["parameters"][0]["schema"]["pattern"] == "^[^\\u0000]*$"
