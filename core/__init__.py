"""metashrink core: modular meta-learning with shrinkage (Chen, Friesen et al., 2020) in pure PyTorch.

Ten lines, no server::

    from schemas import JobConfig
    from core import MetaTrainer
    cfg = JobConfig.model_validate({"algorithm": {"name": "sigma_reptile"}, "model": {"arch": "mlp"},
                                   "tasks": {"family": "sinusoid"}, "outer": {"steps": 300}}).model_dump()
    trainer = MetaTrainer(cfg)
    trainer.run()
    model = trainer.meta_model()
    print(model.module_map())                       # learned sigma^2 per module, selected ones flagged
    result = model.adapt(x_support, y_support, steps=100)   # only the selected modules move
    y_hat = model.predict(x_query, result.params)
"""
from .adapt import AdaptResult, MetaModel, select_modules, selection
from .algorithms import ALGORITHMS, SIGMA_ALGORITHMS, Learner, build_algorithm
from .cg import conjugate_gradient
from .evaluation import evaluate, mean_ci, paired, validated_selection
from .models import build_model, init_params
from .modules import Partition, PartitionError, build_partition, inverse_gamma_penalty, prior_penalty, sigma2
from .optim import adam, build_optimizer, proximal_adam, proximal_gd, sgd
from .tasks import Family, TaskBatch, build_family, register_source
from .trainer import MetaTrainer, resolve_device

__all__ = [
    "AdaptResult", "MetaModel", "select_modules", "selection", "ALGORITHMS", "SIGMA_ALGORITHMS", "Learner", "build_algorithm",
    "conjugate_gradient", "build_model", "init_params", "Partition", "PartitionError", "build_partition",
    "inverse_gamma_penalty", "prior_penalty", "sigma2", "adam", "build_optimizer", "proximal_adam", "proximal_gd",
    "sgd", "Family", "TaskBatch", "build_family", "register_source", "MetaTrainer", "resolve_device", "evaluate",
    "mean_ci", "paired", "validated_selection",
]
