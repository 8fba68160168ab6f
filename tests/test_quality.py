"""Quality guards (issue 10): with the service's defaults the shrinkage variants learn as well as MAML.

A config that names only the algorithm, the model and the task family is what a new user submits; these tests
train exactly that (sinusoid: 1,000 meta-steps, every other field at its schema default) for the same seed and
compare held-out query MSE after 100 adaptation steps with the default modules. docs/results/sinusoid.md
("Defaults") has the same comparison over 5 seeds.
"""
import pytest
import torch

from core import MetaTrainer, evaluate
from schemas import JobConfig

pytestmark = pytest.mark.slow


def _default_mse(algorithm: str, seed: int = 0) -> float:
    cfg = JobConfig.model_validate({"algorithm": {"name": algorithm}, "model": {"arch": "mlp"},
                                    "tasks": {"family": "sinusoid"}, "seed": seed}).model_dump()
    trainer = MetaTrainer(cfg)
    trainer.run()
    ev = evaluate(trainer.meta_model(), n_tasks=200, steps=[100], seed=10_000 + seed)
    return ev["results"][0]["mean"]


@pytest.fixture(scope="module")
def maml_mse():
    return _default_mse("maml")


@pytest.mark.parametrize("algorithm", ["sigma_maml", "sigma_reptile"])
def test_shrinkage_defaults_match_maml_on_sinusoid(algorithm, maml_mse):
    mse = _default_mse(algorithm)
    assert torch.isfinite(torch.tensor(mse))
    assert mse <= 1.1 * maml_mse, (algorithm, mse, maml_mse)
