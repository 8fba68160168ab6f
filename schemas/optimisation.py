"""The ``inner`` and ``outer`` sections: the task-adaptation and the meta-optimisation loops."""
from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import BeforeValidator, Field

from .types import Int, OptInt, PositiveFloat, Strict, _json_array


class Inner(Strict):
    optimizer: Optional[Literal["sgd", "adam", "proximal_gd", "proximal_adam"]] = Field(
        None, description="default: proximal_gd for the sigma algorithms and imaml, sgd otherwise"
    )
    lr: Optional[PositiveFloat] = Field(
        None, description="default by task family: for image_classes 0.4 (Finn et al.'s Omniglot step size; "
        "docs/results/omniglot_5way.md), except 0.2 for imaml and sigma_imaml, whose inner loop must "
        "reach the MAP (Table 8: iMAML 0.23; with 20 steps at 0.2 the stationarity is ~0.02 and the Hessian at "
        "theta_K has no eigenvalue below -lambda / n, unlike 5 steps at 0.4: docs/results/implicit.md); "
        "0.01 otherwise (Finn et al.'s sinusoid step "
        "size; docs/results/sinusoid.md)")
    steps: OptInt = Field(
        None, ge=1, le=10000, description="inner steps during meta-training; default 5, except 1 for the MAML "
        "family (maml, fomaml, sigma_maml) on image_classes (Finn et al.'s 5-way 1-shot Omniglot) and 20 for "
        "imaml, sigma_imaml and (except on image_classes, where one of two seeds collapsed at 20) sigma_reptile: their "
        "meta-gradient (Eq. 7, Eq. 10's sigma^2 part) is the "
        "derivative at the MAP of the inner objective, so the inner loop must reach it (Table 8: iMAML 19 steps). "
        "The job metric 'stationarity' (the gradient norm of the inner objective at theta_K over its norm at phi) "
        "says how close it came; docs/results/implicit.md")
    betas: Annotated[tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]],
                     BeforeValidator(_json_array)] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8


class Outer(Strict):
    optimizer: Literal["adam", "sgd"] = "adam"
    meta_batch: Int = Field(25, ge=1, le=4096, description="tasks per meta-step (Finn et al.'s sinusoid value)")
    steps: Int = Field(1000, ge=1, le=10_000_000)
    lr_phi: Optional[PositiveFloat] = Field(
        None, description="outer learning rate of phi. Default 1e-3 (Finn et al.'s Adam rate for sinusoid and "
        "Omniglot), except 1e-2 for reptile and sigma_reptile: their meta-update is a parameter difference, not a "
        "gradient, and the paper gives that family its own, larger outer rates (Table 7: sigma-Reptile 5.7e-3 vs "
        "sigma-MAML 9.8e-4; Table 8: SGD 1.6-1.8). docs/results/sinusoid.md's tuning grid has both Reptile "
        "variants improving most from 1e-3 to 3e-3 (its largest point); its defaults table and "
        "docs/results/omniglot_5way.md show the results at 1e-2")
    lr_log_sigma2: PositiveFloat = Field(
        1e-3, description="outer learning rate of log sigma^2 (sigma algorithms only); equal to lr_phi's default, "
        "measured with it in docs/results/")
    lr_extra: Optional[PositiveFloat] = Field(
        None, description="outer learning rate of an algorithm's own meta-learned tensors (Meta-SGD's learning "
                          "rates, T-net's T, MT-net's zeta, hyper-representation's eta); None = lr_phi")
    schedule: Literal["constant", "linear"] = Field("constant", description="linear: decay to 0 at the last step")
    clip_grad_norm: Optional[PositiveFloat] = Field(
        None, description="clip the global norm of the meta-gradient (phi, log sigma^2 and the algorithm's own "
                          "tensors together) to this value before the outer optimizer; None = no clipping. "
                          "The norm before clipping is recorded as the grad_norm metric; the inverse-Gamma "
                          "penalty's gradient is added after clipping")
