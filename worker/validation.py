"""Early stopping by validation (``run.validate_every``), used by the training task.

Every ``validate_every`` meta-steps (and at the last one) the current meta-model is adapted on
``validation_tasks`` tasks of the family's ``val`` split with ``core.evaluation.evaluate``; the mean query
metric is the validation score (``mse``/``loss``: lower is better; ``accuracy``: higher is better). The
validation tasks come from a generator of their own, seeded from the job seed and reset at each validation,
so every validation sees the same tasks (a paired comparison) and the job's training RNG stream is never
touched: a resumed job stays bit for bit the same as an uninterrupted one.

The state (best score, its checkpoint, validations since the last improvement) is rebuilt on resume from
the job's validation series (its metric rows), with the checkpoint of each step that still has one: retention
deletes old checkpoints, but never the best.
"""
from __future__ import annotations

import math

VAL_SEED_OFFSET = 0x5EED_0F_7A1  # the validation generator's seed = job seed + this (mod 2^63)


class Validation:
    def __init__(self, trainer, cfg: dict):
        run = cfg["run"]
        self.trainer = trainer
        self.every = int(run["validate_every"])
        self.n_tasks = int(run.get("validation_tasks") or 100)
        steps = run.get("validation_steps")
        self.steps = int(cfg["inner"]["steps"] if steps is None else steps)
        self.modules = run.get("validation_modules") or "selected"
        self.patience = run.get("patience")
        self.min_delta = float(run.get("min_delta") or 0.0)
        self.seed = (int(cfg.get("seed", 0)) + VAL_SEED_OFFSET) % 2**63
        from core.evaluation import metric_name
        self.metric = metric_name(trainer.family.kind)
        self.best: float | None = None
        self.best_step: int | None = None
        self.best_checkpoint_id: str | None = None
        self.bad = 0  # validations since the last improvement
        self._mm = None

    # ------------------------------------------------------------------ schedule
    def due(self, step: int, last: bool) -> bool:
        return last or step % self.every == 0

    def exhausted(self) -> bool:
        """Patience spent: stop meta-training."""
        return self.patience is not None and self.best is not None and self.bad >= self.patience

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"

    @property
    def series(self) -> str:
        return f"val_{self.metric or 'loss'}"

    # ------------------------------------------------------------------ scoring
    def score(self) -> float:
        """The current meta-model's mean validation metric (NaN when adaptation diverges)."""
        from core.evaluation import evaluate, metric_name

        t = self.trainer
        if self._mm is None or t.meta.get("extra"):
            # built once (it builds the model and the family) and its tensors swapped below; an algorithm with
            # its own meta-learned tensors (Meta-SGD, T-net, ...) gets a fresh MetaModel each time
            self._mm = t.meta_model()
        else:
            self._mm.phi = {k: v.detach().clone() for k, v in t.meta["phi"].items()}
            self._mm.log_sigma2 = t.meta["log_sigma2"].detach().clone()
        self.metric = metric_name(self._mm.kind)
        r = evaluate(self._mm, family=t.family, n_tasks=self.n_tasks, steps=[self.steps], modules=self.modules,
                     split="val", seed=self.seed)
        return float(r["results"][0]["mean"])

    def improves(self, score) -> bool:
        if score is None or not math.isfinite(score):
            return False
        if self.best is None:
            return True
        if self.higher_is_better:
            return score > self.best + self.min_delta
        return score < self.best - self.min_delta

    def record(self, step: int, score, checkpoint_id: str) -> bool:
        """Account one validation (after its checkpoint row is committed); True when it is the new best."""
        if self.improves(score):
            self.best, self.best_step, self.best_checkpoint_id, self.bad = float(score), step, checkpoint_id, 0
            return True
        self.bad += 1
        return False

    def restore(self, rows, kind: str) -> None:
        """Replay the recorded validations ``[(step, val_score, checkpoint id or None)]`` (a resumed job)."""
        from core.evaluation import metric_name

        self.metric = metric_name(kind)
        self.best = self.best_step = self.best_checkpoint_id = None
        self.bad = 0
        for step, score, cid in sorted(rows, key=lambda r: r[0]):
            if step % self.every == 0 or step == self.trainer.total_steps or score is not None:
                self.record(step, score, cid)
