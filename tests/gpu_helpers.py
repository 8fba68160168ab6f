"""Job configs shared by the CUDA and amp tests (tests/test_core_cuda.py, tests/test_core_amp.py): small sinusoid
MLP and conv4 image jobs through the real schema, MetaTrainer and MetaModel."""
import torch

from core.tasks import register_source
from schemas import JobConfig

ALGORITHMS = ["maml", "fomaml", "sigma_maml", "imaml", "sigma_imaml", "reptile", "sigma_reptile",
              "meta_sgd", "tnet", "mtnet", "hyper_representation", "hypernet"]
IMAGE_SOURCE = "_gpu_test_images"


def _images(cfg: dict) -> dict:
    """30 classes x 6 instances of 28x28 images: a random stroke template per class plus pixel noise (classes that
    can be learned, so meta-gradients carry signal rather than only the cancellation noise of random labels)."""
    g = torch.Generator().manual_seed(0)
    templates = (torch.rand(30, 1, 28, 28, generator=g) > 0.8).float()
    noisy = (templates + 0.2 * torch.rand(30, 6, 28, 28, generator=g)).clamp(0, 1)
    return {"images": (noisy * 255).round().to(torch.uint8), "groups": list(range(30))}


register_source(IMAGE_SOURCE, _images)


def job(alg="maml", arch="mlp", dtype="float64", vectorize="vmap", steps=3, **over) -> dict:
    """A validated job config (dict): sinusoid for the MLP; for conv4 the images above, 3-way 1-shot at 14x14 with
    8 channels (``over`` updates any section, e.g. ``tasks={"image_size": 28}``)."""
    algorithm = alg if isinstance(alg, dict) else {"name": alg}
    if arch == "mlp":
        body = {"model": {"arch": "mlp", "hidden": [16, 16]}, "modules": {"partition": "per_layer"},
                "tasks": {"family": "sinusoid", "shots": 5, "query": 5}, "inner": {"lr": 0.01, "steps": 2}}
    else:
        body = {"model": {"arch": "conv4", "channels": 8}, "modules": {"partition": "per_layer"},
                "tasks": {"family": "image_classes", "source": "dataset", "dataset_id": "x", "ways": 3,
                          "shots": 1, "query": 2, "image_size": 14},
                "inner": {"lr": 0.1, "steps": 2}}
    body.update({"algorithm": algorithm, "outer": {"meta_batch": 3, "steps": steps},
                 "execution": {"vectorize": vectorize, "dtype": dtype, "device": "cpu"}, "seed": 5})
    for k, v in over.items():
        body[k] = {**body.get(k, {}), **v} if isinstance(v, dict) else v
    cfg = JobConfig.model_validate(body).model_dump()
    if arch != "mlp":
        cfg["tasks"]["source"] = IMAGE_SOURCE
    return cfg


def meta_tensors(trainer) -> dict:
    """phi, log sigma^2 and the algorithm's extra tensors as one flat dict of CPU tensors."""
    out = {f"phi.{k}": v for k, v in trainer.meta["phi"].items()}
    out["log_sigma2"] = trainer.meta["log_sigma2"]
    out.update({f"extra.{k}": v for k, v in trainer.meta.get("extra", {}).items()})
    return {k: v.detach().cpu() for k, v in out.items()}


def rel_err(a: dict, b: dict) -> float:
    """||a - b|| / max(||b||, tiny) over every tensor of two dicts with the same keys."""
    num = sum(float((a[k].double().cpu() - b[k].double().cpu()).pow(2).sum()) for k in b) ** 0.5
    den = sum(float(b[k].double().cpu().pow(2).sum()) for k in b) ** 0.5
    return num / max(den, 1e-300)


# conv4 at the size the amp tests compare on: 32 channels, 28x28, 5-way 1-shot, 5 queries per class, 4 tasks (the
# 14x14 default ends in 1x1 feature maps whose batch statistics over 3 support images are too ill-conditioned for
# a bf16 comparison to mean anything)
AMP_SIZE = dict(model={"channels": 32}, tasks={"image_size": 28, "ways": 5, "query": 5},
                outer={"optimizer": "sgd", "meta_batch": 4})


def cosine_and_rel(a: dict, b: dict):
    """Cosine similarity and relative error of two meta-updates' phi parts, without the conv biases (batch-norm
    cancels them: their exact meta-gradient is 0, so theirs is pure rounding noise)."""
    keep = [k for k in b["phi"] if not (k.startswith("conv") and k.endswith("bias"))]
    va = torch.cat([a["phi"][k].reshape(-1).double().cpu() for k in keep])
    vb = torch.cat([b["phi"][k].reshape(-1).double().cpu() for k in keep])
    return float(torch.nn.functional.cosine_similarity(va, vb, dim=0)), float((va - vb).norm() / vb.norm())
