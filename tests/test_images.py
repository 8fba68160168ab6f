"""image_classes sampler: shapes, labels, splits (class / group, rotations never cross), augmentation."""
import pytest
import torch

from core.images import ImageClasses, augment, resize, split_classes


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def coded_images(n_classes=20, per_class=10, size=8):
    """Image (c, i) has pixel [0, 0] = c and pixel [0, 1] = i (as uint8): samples are traceable."""
    imgs = torch.zeros(n_classes, per_class, size, size, dtype=torch.uint8)
    imgs[:, :, 0, 0] = torch.arange(n_classes, dtype=torch.uint8).view(-1, 1)
    imgs[:, :, 0, 1] = torch.arange(per_class, dtype=torch.uint8).view(1, -1)
    return imgs


def decode(x):
    v = (x[..., 0, :, :] * 255).round().long()
    return v[..., 0, 0], v[..., 0, 1]  # class, instance


def test_shapes_labels_and_distinct_instances():
    fam = ImageClasses(coded_images(), ways=5, shots=2, query=3, image_size=None, test_fraction=0.25)
    b = fam.sample(16, gen())
    assert b.xs.shape == (16, 10, 1, 8, 8) and b.xq.shape == (16, 15, 1, 8, 8)
    assert b.ys.dtype == torch.int64 and b.ys.min() == 0 and b.ys.max() == 4
    assert b.xs.dtype == torch.float32 and 0 <= b.xs.min() and b.xs.max() <= 1
    cs, is_ = decode(b.xs)
    cq, iq = decode(b.xq)
    train = set(fam.classes("train").tolist())
    for t in range(16):
        for lab in range(5):
            c_s, c_q = cs[t][b.ys[t] == lab], cq[t][b.yq[t] == lab]
            assert len(set(c_s.tolist()) | set(c_q.tolist())) == 1  # one class per label
            assert c_s[0].item() in train
            inst = is_[t][b.ys[t] == lab].tolist() + iq[t][b.yq[t] == lab].tolist()
            assert len(set(inst)) == 5  # support and query instances are distinct
        assert len(set(cs[t].tolist())) == 5  # five different classes
    # labels are shuffled across tasks: the class with label 0 varies
    assert len({cs[t][0].item() for t in range(16)}) > 3


def test_seeds_reproduce_and_split_argument():
    fam = ImageClasses(coded_images(), ways=3, shots=1, query=1, image_size=None, test_fraction=0.3, val_fraction=0.2)
    a, b = fam.sample(8, gen(1)), fam.sample(8, gen(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    for split in ("train", "val", "test"):
        cls = set(decode(fam.sample(50, gen(2), split).xs)[0].flatten().tolist())
        assert cls <= set(fam.classes(split).tolist())
    s = {k: set(v.tolist()) for k, v in fam.splits.items()}
    assert not (s["train"] & s["test"] or s["train"] & s["val"] or s["val"] & s["test"])
    assert len(s["train"] | s["val"] | s["test"]) == 20 and len(s["test"]) == 6 and len(s["val"]) == 4
    # the split depends on the split seed only
    other = ImageClasses(coded_images(), ways=3, shots=1, query=1, image_size=None, test_fraction=0.3, split_seed=1)
    assert set(other.classes("test").tolist()) != set(fam.classes("test").tolist())


def test_split_by_group():
    groups = [i // 4 for i in range(20)]  # 5 groups of 4 classes
    parts = split_classes(groups, "group", test_fraction=0.4, seed=3)
    g_test = {groups[i] for i in parts["test"].tolist()}
    g_train = {groups[i] for i in parts["train"].tolist()}
    assert len(g_test) == 2 and not g_test & g_train and len(parts["test"]) == 8


def test_rotations_are_new_classes_within_split():
    imgs = torch.zeros(6, 4, 8, 8, dtype=torch.uint8)
    imgs[:, :, 0, 0] = 255  # a marker in the top-left corner shows the rotation
    fam = ImageClasses(imgs, ways=4, shots=1, query=1, image_size=None, rotations=True, test_fraction=0.34)
    assert len(fam.classes("test")) == 2
    b = fam.sample(200, gen(), "train")
    corner = torch.stack([b.xs[..., 0, 0, 0], b.xs[..., 0, 0, -1], b.xs[..., 0, -1, -1], b.xs[..., 0, -1, 0]], -1)
    rot = corner.argmax(-1)  # 0: unrotated; rot90 counter-clockwise moves top-left to bottom-left (3)
    assert set(rot.flatten().tolist()) == {0, 1, 2, 3}
    # same label -> same rotation for support and query
    cq = torch.stack([b.xq[..., 0, 0, 0], b.xq[..., 0, 0, -1], b.xq[..., 0, -1, -1], b.xq[..., 0, -1, 0]], -1)
    assert torch.equal(rot, cq.argmax(-1))


def test_rotation_of_test_class_never_in_train():
    imgs = torch.zeros(12, 4, 8, 8, dtype=torch.uint8)
    code = (torch.arange(12, dtype=torch.uint8) + 100).view(-1, 1)
    for i, j in ((0, 0), (0, -1), (-1, 0), (-1, -1)):  # the class code in every corner: rotation-invariant
        imgs[:, :, i, j] = code
    fam = ImageClasses(imgs, ways=3, shots=1, query=1, image_size=None, rotations=True, test_fraction=0.25)
    test = set(fam.classes("test").tolist())
    for split in ("train", "test"):
        b = fam.sample(300, gen(), split)
        seen = set(((b.xs[..., 0, 0, 0] * 255).round().long() - 100).flatten().tolist())
        seen |= set(((b.xq[..., 0, 0, 0] * 255).round().long() - 100).flatten().tolist())
        assert seen <= (test if split == "test" else set(fam.classes("train").tolist()))
        assert (seen <= test) == (split == "test")


def test_per_group_tasks_and_instance_split():
    groups = [i // 6 for i in range(24)]  # 4 groups of 6 classes
    fam = ImageClasses(coded_images(24, 20), groups, ways=5, shots=15, query=5, image_size=None,
                       test_fraction=0.25, split_by="group", task_mode="per_group", instance_split=15)
    assert fam.group_tasks["train"].shape == (3, 5)
    b = fam.sample(10, gen())
    cs, is_ = decode(b.xs)
    cq, iq = decode(b.xq)
    tr, va = set(fam.instance_perm[:15].tolist()), set(fam.instance_perm[15:].tolist())
    assert set(is_.flatten().tolist()) == tr and set(iq.flatten().tolist()) == va
    fixed = {tuple(sorted(r)) for r in fam.group_tasks["train"].tolist()}
    for t in range(10):
        assert tuple(sorted(set(cs[t].tolist()))) in fixed  # one of the fixed per-group tasks
        assert len({groups[c] for c in cs[t].tolist()}) == 1


def test_augment_statistics():
    x = torch.zeros(400, 1, 28, 28)
    x[:, :, 10:18, 10:18] = 1.0
    g = gen()
    y = augment(x, g)
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1.0 + 1e-6
    mass = y.sum((1, 2, 3)) / x.sum((1, 2, 3))
    assert 0.6 < mass.min() and mass.max() < 1.6  # area scales by s^2, s in [0.8, 1.2]
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    cx = (y[:, 0] * xs).sum((1, 2)) / y[:, 0].sum((1, 2))
    shift = (cx - 13.5) / 28
    assert shift.abs().max() <= 0.2 + 0.03 and shift.std() > 0.08  # translation U[-0.2, 0.2] of the width
    assert torch.equal(augment(x[:5], gen(1)), augment(x[:5], gen(1)))
    z = augment(x[:50], gen(2), scale=(1, 1), translate=(0, 0), rotate=(0, 360))
    torch.testing.assert_close(z.sum((1, 2, 3)), x[:50].sum((1, 2, 3)), rtol=0.1, atol=0)


def test_augmented_family_and_resize():
    imgs = torch.zeros(10, 5, 105, 105, dtype=torch.uint8)
    imgs[:, :, 40:65, 40:65] = 255
    r = resize(imgs[:1, :1], 28)
    assert r.shape == (1, 1, 28, 28) and r.dtype == torch.uint8 and r.max() == 255
    fam = ImageClasses(imgs, ways=2, shots=1, query=1, augment={"splits": ["train"]})
    a, b = fam.sample(4, gen(), "train"), fam.sample(4, gen(), "test")
    assert a.xs.shape == (4, 2, 1, 28, 28)
    assert not torch.equal(a.xs[0, 0], a.xs[1, 0]) or not torch.equal(a.xs[0, 0], a.xs[0, 1])
    assert torch.equal(b.xs[0, 0], b.xs[1, 0])  # test split not augmented


def test_errors():
    with pytest.raises(ValueError, match="exceeds"):
        ImageClasses(coded_images(), ways=3, shots=6, query=6, image_size=None)
    with pytest.raises(ValueError, match="fewer than ways"):
        ImageClasses(coded_images(10), ways=5, shots=1, query=1, image_size=None, test_fraction=0.3)
