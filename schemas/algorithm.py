"""The ``algorithm`` section: the shrinkage family, its special cases and the comparison algorithms,
a union discriminated on ``name``."""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BeforeValidator, Field

from .types import FiniteFloat, Int, PositiveFloat, Strict, _json_integer

SIGMA_ALGORITHMS = ("sigma_maml", "sigma_imaml", "sigma_reptile")
class _Shrinkage(Strict):
    init_sigma2: PositiveFloat = Field(
        1.0, description="initial sigma^2 of every module (clipped to [1e-5, 1e5]), on Eq. 4's scale: the prior's "
        "precision on a loss averaged over n examples is 1 / (n sigma^2) (Family.prior_weight). With 1.0 a proximal "
        "step at the default inner learning rates keeps 1 / (1 + lr / (n sigma^2)) of the move (0.999 on sinusoid, "
        "0.93 on 5-way 1-shot Omniglot at lr 0.4, 0.96 at the implicit family's 0.2), so a sigma variant starts in its special case's regime and learns how much "
        "to shrink; measured in docs/results/sinusoid.md and docs/results/omniglot_5way.md")
    ig_beta: float = Field(
        1e-5, ge=0, allow_inf_nan=False,
        description="scale beta of the inverse-Gamma(1, beta) regulariser on sigma^2 (App. D.2, Eq. 49); 0 disables it",
    )


SecondOrder = Literal["unroll", "hvp"]
_SECOND_ORDER = Field(
    "unroll", description="unroll: autograd through the whole inner loop; hvp: keep only the parameter "
                          "trajectory and accumulate the meta-gradient backwards with Hessian-vector products "
                          "(same value, memory of one inner step's graph; inner optimizer sgd or proximal_gd)")


class SigmaMAML(_Shrinkage):
    name: Literal["sigma_maml"]
    first_order: bool = False
    second_order: SecondOrder = _SECOND_ORDER


class MAML(Strict):
    name: Literal["maml"]
    first_order: bool = False
    second_order: SecondOrder = _SECOND_ORDER


class FOMAML(Strict):
    name: Literal["fomaml"]


class _Implicit(Strict):
    cg_steps: Int = Field(5, ge=1, le=100, description="conjugate-gradient iterations (App. D.1: 5)")


_DAMPING_SCALE = ("on Eq. 4's scale: the algorithm multiplies it by the family's prior weight w (1 / n for a loss "
                  "averaged over n support examples), as it does Sigma^-1")


class SigmaIMAML(_Shrinkage, _Implicit):
    name: Literal["sigma_imaml"]
    damping: float = Field(
        1.0, ge=0, allow_inf_nan=False,
        description="d-tilde of Eq. 48, " + _DAMPING_SCALE + ". Default 1.0: with init_sigma2 1 the pair starts "
        "exactly where imaml's defaults are (d-tilde = d * lambda, App. D.2). Without damping, CG on a Hessian "
        "with negative eigenvalues below -lambda returns a meta-gradient larger than the one it solves for "
        "(docs/results/implicit.md)")


class IMAML(_Implicit):
    name: Literal["imaml"]
    lam: PositiveFloat = Field(1.0, description="L2 regularisation scale lambda = 1/sigma^2 (fixed), on Eq. 4's "
                               "scale like sigma^2: the precision on a loss averaged over n examples is lambda / n "
                               "(the paper's best Omniglot value 0.025, App. E.4.3, is on its own loss scale)")
    damping: float = Field(
        1.0, ge=0, allow_inf_nan=False,
        description="d of Eq. 47 ((1 + d) I + H / lambda; Table 8's Omniglot value 1.0). With 0, 5-way 1-shot "
        "Omniglot meta-training collapsed: the Hessian at theta_K had eigenvalues down to -0.23 against lambda / n "
        "= 0.2, CG's residual ended up to 1.3x its right-hand side (docs/results/implicit.md), and test accuracy "
        "peaked near 0.6 (docs/results/omniglot_5way.md)")


class SigmaReptile(_Shrinkage, _Implicit):
    name: Literal["sigma_reptile"]
    cg_steps: Int = Field(1, ge=1, le=100, description="CG iterations for the sigma^2 gradient (Table 7: 1)")
    damping: float = Field(0.5, ge=0, allow_inf_nan=False,
                           description="d-tilde of Eq. 48 (Table 7: 0.5), " + _DAMPING_SCALE)
    phi_data: Literal["task", "support"] = Field(
        "task", description="the data phi's MAP (Eq. 9) is fitted on. 'support': the paper's D^train exactly (App. "
        "A's closed forms hold for it). 'task' (default): support and query together, the data Reptile adapts on; "
        "sigma^2 still gets the implicit gradient of the query loss at theta fitted on the support. With 1-shot "
        "supports 'support' starves phi of data: Omniglot 5-way 1-shot, 2,000 meta-steps, test accuracy after 10 "
        "steps 0.834 ('task') vs 0.406 ('support') vs Reptile 0.841; sinusoid with the defaults, MSE after 100 "
        "steps 0.148 ('task') vs 0.184 ('support') vs Reptile 0.149 (docs/results/omniglot_5way.md and "
        "sinusoid.md; the 'support' figures are those files at commit 5580d4e, same scripts). Its losses: the "
        "20,000-step sinusoid runs, MSE after 100 steps 0.166 +- 0.119 ('task') vs 0.109 +- 0.022 ('support'), and "
        "long adaptation on 5 points 2.07x vs 1.11x the best MSE at 10,000 steps (sinusoid.md then and at 5580d4e; "
        "both with the old 5-step inner loop)")


class Reptile(Strict):
    name: Literal["reptile"]


# The comparison algorithms (core/baselines.py): plain gradient inner steps (inner.optimizer 'sgd'), their
# extra meta-learned tensors use outer.lr_extra; model.arch mlp or conv4.
class MetaSGD(Strict):
    name: Literal["meta_sgd"]
    granularity: Literal["parameter", "module"] = Field(
        "parameter", description="one learned learning rate per parameter entry, or one per module of the partition")
    init_lr: Optional[PositiveFloat] = Field(None, description="initial learning rates; None = inner.lr")


class TNet(Strict):
    name: Literal["tnet"]


class MTNet(Strict):
    name: Literal["mtnet"]
    temperature: PositiveFloat = Field(1.0, description="Gumbel-softmax temperature of the row masks (Eq. 11)")
    init_zeta: FiniteFloat = Field(0.0, description="initial mask logits zeta (0: each row updated with p = 1/2)")


class HyperRepresentation(Strict):
    name: Literal["hyper_representation"]
    init_eta: Optional[PositiveFloat] = Field(None, description="initial ground-model step size eta; None = inner.lr")


class HyperNet(Strict):
    """MH (meta-learning via hypernetworks): hidden-layer weights W_l = sum_k e_{l,k} Template_{l,k}; the inner
    loop adapts the task embeddings e_l (and the head), the outer loop learns the templates (outer.lr_extra)."""
    name: Literal["hypernet"]
    embedding: Union[Literal["compressed", "comparable", "overparametrised"],
                     Annotated[int, Field(ge=1, le=4096), BeforeValidator(_json_integer)]] = Field(
        "comparable", description="task-embedding size K per hidden layer, relative to the layer's width (output "
        "units / channels): 'compressed' width/4, 'comparable' width, 'overparametrised' 2 x width; or an explicit K")
    adapt_head: bool = Field(True, description="the inner loop adapts the output layer as well as the embeddings "
                             "(needed for the frozen-features evaluation, which adapts only the head)")


BASELINE_ALGORITHMS = ("meta_sgd", "tnet", "mtnet", "hyper_representation", "hypernet")

Algorithm = Annotated[
    Union[SigmaMAML, MAML, FOMAML, SigmaIMAML, IMAML, SigmaReptile, Reptile, MetaSGD, TNet, MTNet,
          HyperRepresentation, HyperNet], Field(discriminator="name")
]

IMPLICIT_ALGORITHMS = ("imaml", "sigma_imaml", "sigma_reptile")  # meta-gradient taken at the inner loop's MAP
