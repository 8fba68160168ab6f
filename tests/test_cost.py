"""schemas/cost.py: the admission estimates count what core builds, and the adapt cap names its limit."""
from types import SimpleNamespace

import pytest

from api.errors import ApiError
from api.validation import check_adapt_cost
from core.models import build_model
from schemas import JobConfig
from schemas.cost import estimate_adapt, estimate_job, model_cost
from store.settings import Settings


@pytest.mark.parametrize("model,shape,out", [
    ({"arch": "conv4", "channels": 64, "variant": "strided", "channels_last": False}, (1, 28, 28), 5),
    ({"arch": "conv4", "channels": 16, "variant": "maxpool", "channels_last": False}, (1, 14, 14), 20),
    ({"arch": "conv4", "channels": 8, "variant": "strided", "channels_last": False}, (3, 84, 84), 10),
    ({"arch": "mlp", "hidden": [40, 40], "activation": "relu"}, (1,), 1),
    ({"arch": "mlp", "hidden": [128, 64, 32], "activation": "tanh"}, (9,), 3),
])
def test_parameter_count_is_what_core_builds(model, shape, out):
    family = SimpleNamespace(input_shape=shape, output_dim=out)
    built = sum(p.numel() for p in build_model(model, family).parameters())
    assert model_cost(model, shape, out)[0] == built


def test_job_estimate_grows_with_the_fields_it_names():
    base = {"algorithm": {"name": "maml"}, "model": {"arch": "mlp"}, "tasks": {"family": "sinusoid"}}
    c0 = estimate_job(JobConfig.model_validate(base).model_dump())
    for path, value in ((("outer", "meta_batch"), 100), (("tasks", "shots"), 100), (("inner", "steps"), 20)):
        cfg = JobConfig.model_validate(base).model_dump()
        cfg[path[0]][path[1]] = value
        c = estimate_job(cfg)
        assert c.memory_bytes > c0.memory_bytes and c.step_flops > c0.step_flops, path
        assert list(path) in [p for p, _ in c.drivers]


def test_adapt_cost_cap_names_the_most_steps_it_allows():
    m = SimpleNamespace(macs=1_000_000)
    settings = Settings(adapt_max_flops=1e11)
    check_adapt_cost(m, 100, 100, settings)  # 6e10: under the cap
    with pytest.raises(ApiError) as e:
        check_adapt_cost(m, 100, 1000, settings)
    assert e.value.status == 422 and e.value.errors[0]["loc"] == ["steps"]
    most = int(e.value.detail.rsplit("at most ", 1)[1].split()[0])
    assert estimate_adapt(m.macs, 100, most) <= 1e11 < estimate_adapt(m.macs, 100, most + 1)
