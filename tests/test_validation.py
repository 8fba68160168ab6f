"""Early stopping by validation (worker.validation): scores the val split without touching the training stream."""
from __future__ import annotations

import math

import torch

from core import MetaTrainer
from schemas import JobConfig
from worker.validation import Validation


def _cfg(**run):
    return JobConfig.model_validate({
        "algorithm": {"name": "sigma_reptile"}, "model": {"arch": "mlp", "hidden": [16, 16]},
        "modules": {"partition": "per_tensor"}, "tasks": {"family": "sinusoid", "shots": 5, "query": 5},
        "inner": {"steps": 3}, "outer": {"meta_batch": 4, "steps": 6},
        "execution": {"vectorize": "vmap", "device": "cpu"}, "run": run, "seed": 3}).model_dump(mode="json")


def test_validation_leaves_training_stream_untouched():
    cfg = _cfg(validate_every=2, validation_tasks=8)
    a, b = MetaTrainer(cfg), MetaTrainer(cfg)
    val = Validation(b, cfg)
    scores = []
    for _ in range(6):
        a.step()
        b.step()
        if val.due(b.step_count, b.step_count == b.total_steps):
            scores.append(val.score())
    assert val.metric == "mse" and val.series == "val_mse" and len(scores) == 3
    for k in a.meta["phi"]:
        assert torch.equal(a.meta["phi"][k], b.meta["phi"][k])
    assert torch.equal(a.meta["log_sigma2"], b.meta["log_sigma2"])
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    # the same validation tasks every time: scoring twice without training gives the same number
    assert val.score() == scores[-1]


def test_patience_and_restore():
    cfg = _cfg(validate_every=1, patience=2)
    val = Validation(MetaTrainer(cfg), cfg)
    val.metric = "mse"
    assert val.record(1, 1.0, "c1") and not val.exhausted()
    assert not val.record(2, 1.5, "c2") and not val.exhausted()
    assert val.record(3, 0.5, "c3") and val.bad == 0
    assert not val.record(4, float("nan"), "c4")
    assert not val.record(5, 0.7, "c5") and val.exhausted()
    assert val.best_checkpoint_id == "c3"
    other = Validation(MetaTrainer(cfg), cfg)
    other.restore([(5, 0.7, "c5"), (1, 1.0, "c1"), (2, 1.5, "c2"), (3, 0.5, "c3"), (4, None, "c4")], "regression")
    assert (other.best, other.best_checkpoint_id, other.bad) == (0.5, "c3", 2) and other.exhausted()
    acc = Validation(MetaTrainer(cfg), cfg)
    acc.metric = "accuracy"
    assert acc.record(1, 0.5, "a") and acc.record(2, 0.6, "b") and not acc.record(3, 0.55, "c")


def test_validation_sees_current_extra_tensors():
    """Algorithms with their own meta-learned tensors (Meta-SGD's learning rates) are validated as they are now."""
    cfg = JobConfig.model_validate({
        "algorithm": {"name": "meta_sgd"}, "model": {"arch": "mlp", "hidden": [8]},
        "tasks": {"family": "sinusoid", "shots": 5, "query": 5}, "inner": {"steps": 2},
        "outer": {"meta_batch": 4, "steps": 4}, "execution": {"vectorize": "loop", "device": "cpu"},
        "run": {"validate_every": 2, "validation_tasks": 4}, "seed": 1}).model_dump(mode="json")
    t = MetaTrainer(cfg)
    val = Validation(t, cfg)
    t.step()
    first = val.score()
    for _ in range(3):
        t.step()
    fresh = Validation(t, cfg).score()
    # the same validation tasks each time (a fresh Validation scores the model identically), and the score follows
    # the model: three meta-steps later it differs from the first
    assert val.score() == fresh and math.isfinite(first) and first != fresh
