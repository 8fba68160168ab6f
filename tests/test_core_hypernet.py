"""MH (meta-learning via hypernetworks, core.baselines.HyperNet), float64 and tiny."""
import pytest
import torch
from torch.func import vmap

from core import MetaModel, MetaTrainer
from core.baselines import embedding_size
from tests import test_core_baselines as tb
from tests.core_helpers import flat


def test_embedding_sizes_and_storage():
    assert [embedding_size(s, 8) for s in ("compressed", "comparable", "overparametrised", 3)] == [2, 8, 16, 3]
    alg, _, meta, _ = tb.make_baseline({"name": "hypernet", "embedding": 3}, hidden=(5, 4))
    # hidden layers hold their embedding under the weight's name, the head is the model's own layer
    assert meta["phi"]["fc0.weight"].shape == (3,) and meta["phi"]["fc1.weight"].shape == (3,)
    assert meta["phi"]["fc2.weight"].shape == (1, 4)
    assert meta["extra"]["template.fc0"].shape == (3, 5, 2) and meta["extra"]["template.fc1"].shape == (3, 4, 5)
    assert set(meta["extra"]) == {"template.fc0", "template.fc1"}
    w = alg.weight(meta["phi"], meta["extra"], "fc1")
    assert torch.allclose(w, sum(meta["phi"]["fc1.weight"][k] * meta["extra"]["template.fc1"][k] for k in range(3)))
    assert alg.adapted(list(meta["phi"])) == ["fc0.weight", "fc1.weight", "fc2.weight", "fc2.bias"]
    no_head, _, _, _ = tb.make_baseline({"name": "hypernet", "adapt_head": False}, hidden=(5, 4))
    assert no_head.adapted(list(meta["phi"])) == ["fc0.weight", "fc1.weight"]
    # the same job (same initial phi) draws the same templates
    again, _, meta2, _ = tb.make_baseline({"name": "hypernet", "embedding": 3}, hidden=(5, 4))
    assert all(torch.equal(meta["extra"][k], meta2["extra"][k]) for k in meta["extra"])


@pytest.mark.parametrize("arch", ["mlp", "conv4"])
def test_hypernet_meta_gradient_matches_finite_differences(arch):
    alg, _, meta, batch = tb.make_baseline({"name": "hypernet", "embedding": 2}, arch=arch, lr=0.1, steps=3)
    g = torch.Generator().manual_seed(3)
    # embeddings off their symmetric start so that bugs show
    meta["phi"] = {k: v + 0.1 * torch.rand(v.shape, generator=g, dtype=v.dtype) if k in alg.emb else v
                   for k, v in meta["phi"].items()}
    delta = tb.check_fd(alg, meta, batch.task(0), n=2 if arch == "mlp" else 1)
    assert all(float(v.abs().max()) > 1e-8 for v in delta["extra"].values())  # templates
    assert all(float(delta["phi"][k].abs().max()) > 1e-8 for k in alg.emb)  # initial embeddings
    tb.check_fd(alg, meta, batch.task(1), only="extra", n=1)  # the templates alone


@pytest.mark.parametrize("cfg", [{"name": "hypernet"}, {"name": "hypernet", "adapt_head": False}])
@pytest.mark.parametrize("arch", ["mlp", "conv4"])
def test_hypernet_vmap_equals_loop(arch, cfg):
    alg, _, meta, batch = tb.make_baseline(cfg, arch=arch, lr=0.05, steps=2)
    vm, vmm = vmap(alg.task_update, in_dims=(None, 0, 0, 0, 0))(meta, *batch)
    for i in range(3):
        d, m = alg.task_update(meta, *batch.task(i))
        assert torch.allclose(flat(d["phi"]), flat({k: v[i] for k, v in vm["phi"].items()}), atol=1e-10)
        assert torch.allclose(flat(d["extra"]), flat({k: v[i] for k, v in vm["extra"].items()}), atol=1e-10)
        assert torch.allclose(m["query_loss"], vmm["query_loss"][i], atol=1e-12)


def test_hypernet_trains_resumes_and_publishes():
    # 3 meta-steps on sinusoid (vmap == loop), checkpoint resume bit for bit, MetaModel adapt and
    # tensors() / from_tensors round trip
    tb.test_new_algorithm_trains_resumes_and_publishes({"name": "hypernet"})


def test_hypernet_meta_model_adapt_and_frozen_features():
    t = MetaTrainer(tb.sinusoid({"name": "hypernet", "embedding": "compressed"}, steps=2,
                                execution={"vectorize": "vmap", "dtype": "float64"}))
    before = {k: v.clone() for k, v in t.meta["extra"].items()}
    t.run()
    assert all(not torch.equal(v, before[k]) for k, v in t.meta["extra"].items())  # templates are meta-learned
    mm = t.meta_model()
    assert [m["name"] for m in mm.module_map()] == ["fc0", "fc1", "fc2"]
    task = t.family.sample(1, torch.Generator().manual_seed(4)).task(0).to(dtype=torch.float64)
    # MetaModel.adapt runs the training-time rule
    res = mm.adapt(task.xs, task.ys, steps=3)
    ref = t.algorithm.unroll(t.meta["phi"], t.meta["extra"], task.xs, task.ys, None, steps=3)
    for k in ref:
        assert torch.allclose(res.params[k], ref[k], atol=1e-12), k
    # frozen features (App. A.3): templates and embeddings fixed, only the head adapts
    frozen = mm.adapt(task.xs, task.ys, steps=20, modules=["fc2"])
    assert frozen.adapted_modules == ["fc2"]
    for k in ("fc0.weight", "fc0.bias", "fc1.weight", "fc1.bias"):
        assert torch.equal(frozen.params[k], mm.phi[k]), k
    for k in ("fc2.weight", "fc2.bias"):
        assert not torch.equal(frozen.params[k], mm.phi[k]), k
    assert frozen.loss_curve[-1] < frozen.loss_curve[0]
    assert set(frozen.adapter(mm.partition)) == {"fc2.weight", "fc2.bias"}
    back = MetaModel.from_tensors(t.config, mm.tensors())
    again = back.adapt(task.xs, task.ys, steps=20, modules=["fc2"])
    assert torch.equal(back.predict(task.xq, again.params), mm.predict(task.xq, frozen.params))
