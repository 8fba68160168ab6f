"""Large JSON bodies are decoded and validated in a parser process (api.bodies.off_loop): the result and every
422 come back to the API process as they would from a thread."""
import asyncio
import json
import os

import pytest
from fastapi import FastAPI

from api.bodies import OFF_PROCESS_ABOVE, _parse, off_loop
from api.errors import ApiError
from schemas.api import AdaptRequest
from store.settings import Settings


@pytest.fixture(scope="module")
def app():
    a = FastAPI()
    a.state.settings = Settings(parser_processes=1)
    yield a
    a.state.parser_pool.shutdown()


def run(app, raw, **kw):
    return asyncio.run(off_loop(app, _parse, raw, AdaptRequest, kw))


def test_large_body_parsed_in_a_parser_process(app):
    rows = [[0.25]] * 40_000
    raw = json.dumps({"support": {"x": rows, "y": rows}, "query": {"x": [[1.0]]}}).encode()
    assert len(raw) > OFF_PROCESS_ABOVE
    req = run(app, raw)
    assert isinstance(req, AdaptRequest) and len(req.support.x) == 40_000 and req.query.x == [[1.0]]
    assert getattr(app.state, "parser_pool", None) is not None  # it went to the pool, not a thread
    assert asyncio.run(off_loop(app, _pid, raw)) != os.getpid()


def _pid(_raw):
    return os.getpid()


@pytest.mark.parametrize("raw, msg", [
    (b'{"support": {"x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}}", "nested too deeply"),
    (b'{"support": {"x": [1], "y": [1]}, "query": 7, "pad": "' + b"a" * OFF_PROCESS_ABOVE + b'"}', "query"),
    (b"{" + b" " * OFF_PROCESS_ABOVE, "not valid JSON"),
])
def test_errors_from_the_parser_process_are_422s_naming_the_field(app, raw, msg):
    with pytest.raises(ApiError) as e:
        run(app, raw)
    assert e.value.status == 422 and msg in e.value.detail and e.value.errors, e.value.detail


def test_adapt_body_checked_in_the_parser_process_returns_arrays(app):
    """The adapt route's JSON path: decoded and checked against the model in the parser process; the arrays
    come back as numpy arrays (no million-float lists to unpickle in the API process), the caps as 422s."""
    from types import SimpleNamespace

    import numpy as np

    from api.routes.models import json_adapt_payload
    m = SimpleNamespace(kind="regression", input_shape=[1], output_dim=1, module_map=[{"name": "fc0.weight"}],
                        macs=1761)
    rows = [[0.5]] * 30_000
    raw = json.dumps({"support": {"x": rows, "y": rows}, "query": {"x": [[1.0]]}, "steps": 3}).encode()
    assert len(raw) > OFF_PROCESS_ABOVE
    out = asyncio.run(off_loop(app, json_adapt_payload, raw, m, Settings(adapt_max_rows=30_000)))
    assert isinstance(out["support"]["x"], np.ndarray) and out["support"]["x"].shape == (30_000, 1)
    assert out["steps"] == 3 and out["save_adapter"] is False
    with pytest.raises(ApiError) as e:
        asyncio.run(off_loop(app, json_adapt_payload, raw, m, Settings(adapt_max_rows=10_000)))
    assert e.value.status == 422 and e.value.errors[0]["loc"] == ["support", "x"]


@pytest.mark.parametrize("body,loc", [
    ({"algorithm": {"name": "maml"}, "model": {"arch": "mlp"}, "tasks": {"family": "hierarchical_normal"}},
     ["tasks", "family"]),
    ({"algorithm": {"name": "meta_sgd"}, "model": {"arch": "mlp"}, "tasks": {"family": "sinusoid"},
      "inner": {"optimizer": "adam"}}, ["inner", "optimizer"]),
    ({"algorithm": {"name": "maml", "second_order": "hvp", "first_order": True}, "model": {"arch": "mlp"},
      "tasks": {"family": "sinusoid"}}, ["body"]),
])
def test_cross_field_errors_name_a_field(body, loc):
    from api.bodies import parse_json
    from schemas import JobConfig
    with pytest.raises(ApiError) as e:
        parse_json(json.dumps(body).encode(), JobConfig)
    assert e.value.status == 422 and e.value.errors[0]["loc"] == loc, e.value.errors
