"""Weighted k-NN, feature extraction and export, and the linear probe."""
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- helpers

def reference_knn(train, train_labels, test, test_labels, k, T, num_classes):
    """The reference eval_knn.py vote, on the full similarity matrix, one query at a time."""
    train, test = F.normalize(train.float(), dim=1), F.normalize(test.float(), dim=1)
    k = min(k, len(train))
    top1 = top5 = 0
    for query, target in zip(test, test_labels):
        sims, idx = (train @ query).topk(k)
        votes = torch.zeros(num_classes)
        for s, i in zip(sims, idx):
            votes[train_labels[i]] += math.exp(s / T)
        ranked = votes.argsort(descending=True)
        voted = votes[target] > 0
        top1 += int(ranked[0] == target and voted)
        top5 += int(target in ranked[:5] and voted)
    return 100.0 * top1 / len(test), 100.0 * top5 / len(test)


def directions(angles_degrees):
    """2-D unit vectors at the given angles: cosine similarities we can compute by hand."""
    a = torch.tensor(angles_degrees, dtype=torch.float32) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], dim=1)


def small_vit(nb, **kw):
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=2)
    return nb.VisionTransformer(**{**args, **kw})


# ---------------------------------------------------------------- k-NN on hand-made features

def test_knn_known_answers_one_and_seven_queries(nb):
    # class 0 around 0 degrees, class 1 around 90, class 2 around 180; classes 3 and 4 far away
    train = directions([0, 5, -5, 90, 95, 85, 180, 175, 270, 300])
    train_labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 4])
    one = nb.knn_classify(train, train_labels, directions([2]), torch.tensor([0]), k=(1, 3))
    assert one == {1: (100.0, 100.0), 3: (100.0, 100.0)}
    wrong = nb.knn_classify(train, train_labels, directions([2]), torch.tensor([1]), k=3)
    assert wrong == {3: (0.0, 0.0)}  # class 1 got no vote among the 3 nearest: not even top-5
    # seven queries; only classes 0, 1, 2 appear in the test set; one query (at 60 degrees, label 0)
    # is nearer to class 1: a top-1 miss, and a top-5 miss too until k reaches class 0 (k = 6)
    queries = directions([1, 88, 178, 92, -3, 183, 60])
    labels = torch.tensor([0, 1, 2, 1, 0, 2, 0])
    result = nb.knn_classify(train, train_labels, queries, labels, k=(1, 3, 6))
    assert result[1] == pytest.approx((600 / 7, 600 / 7))
    assert result[3] == pytest.approx((600 / 7, 600 / 7))
    assert result[6] == pytest.approx((600 / 7, 100.0))
    for k in (1, 3, 6):
        assert result[k] == pytest.approx(reference_knn(train, train_labels, queries, labels, k, 0.07, 5))


def test_knn_vote_is_weighted_by_temperature(nb):
    # one neighbour of class 0 at similarity 1, two of class 1 at similarity cos(60 deg) = 0.5
    train = directions([0, 60, -60])
    train_labels = torch.tensor([0, 1, 1])
    query, label0 = directions([0]), torch.tensor([0])
    # T = 0.07: exp(1/T) >> 2 exp(0.5/T): class 0 wins although outnumbered
    assert nb.knn_classify(train, train_labels, query, label0, k=3, T=0.07)[3][0] == 100.0
    # T = 10: weights almost equal, the majority (class 1) wins
    assert nb.knn_classify(train, train_labels, query, label0, k=3, T=10.0)[3][0] == 0.0


def test_knn_k_larger_than_train_set_and_few_classes(nb):
    train = directions([0, 10, 120, 130])
    train_labels = torch.tensor([0, 0, 1, 1])
    queries, labels = directions([3, 125, 60]), torch.tensor([0, 1, 1])
    with pytest.warns(UserWarning, match="k-NN: the memory bank holds 4 features, fewer than k=200: every one"):
        result = nb.knn_classify(train, train_labels, queries, labels, k=(20, 200))
    # all 4 neighbours vote; 2 classes only, so top-5 is every class with a vote: 100%
    for k in (20, 200):
        assert result[k][1] == 100.0
        assert result[k] == pytest.approx(reference_knn(train, train_labels, queries, labels, k, 0.07, 2))
    assert result[20][0] == pytest.approx(200 / 3)  # the query at 60 degrees is nearer to class 0


def test_a_class_whose_votes_round_to_zero_still_ranks_above_classes_without(nb):
    """exp((s_i - s_1)/T) is 0 in float32 once (s_1 - s_i)/T passes about 103: such a class was counted as
    one without a vote, so the target below (4 of the 20 neighbours, among 5 classes with votes) missed top-5."""
    query = torch.zeros(1, 8)
    query[0, 0] = 1
    far = torch.zeros(19, 8)
    far[:, 0], far[:, 1] = -0.2, 0.96 ** 0.5   # similarity -0.2: 1.2 below the nearest one (the query itself)
    train, train_labels = torch.cat([query, far]), torch.tensor([0] + [1, 2, 3, 4] * 4 + [1, 2, 3])
    for T in (0.1, 0.02, 0.01, 1e-4):
        assert nb.knn_classify(train, train_labels, query, torch.tensor([3]), k=20, T=T)[20] == (0.0, 100.0)
        assert nb.knn_classify(train, train_labels, query, torch.tensor([5]), k=20, T=T, num_classes=6)[20] == (0.0, 0.0)


@pytest.mark.parametrize("labels", [[0, 1, 2, 3, 4, 5, 6], [0, 6, 5, 4, 3, 2, 1]])
def test_classes_whose_weights_round_to_zero_rank_by_similarity_not_by_label(nb, labels):
    """With every other class's weight 0 in float32, the ranking among them fell to the label order: the
    second-nearest neighbour's class made top-5 or not depending on its number."""
    query, bank = torch.zeros(1, 8), [torch.eye(8)[0]]
    query[0, 0] = 1
    for i, c in enumerate([-0.20, -0.21, -0.22, -0.23, -0.24, -0.25]):
        v = torch.zeros(8)
        v[0], v[1 + i] = c, (1 - c * c) ** 0.5
        bank.append(v)
    bank, train_labels = torch.stack(bank), torch.tensor(labels)
    second, sixth = torch.tensor([labels[1]]), torch.tensor([labels[6]])
    for T in (0.07, 0.01, 1e-4):
        assert nb.knn_classify(bank, train_labels, query, second, k=7, T=T)[7] == (0.0, 100.0)
        assert nb.knn_classify(bank, train_labels, query, sixth, k=7, T=T)[7] == (0.0, 0.0)   # the farthest of 7 classes


def test_k_may_be_any_sequence_of_ints(nb):
    """k as a numpy array or a generator was refused ('k ... must be ints') after the k=20.0 check."""
    feats, labels = torch.randn(30, 8, generator=torch.Generator().manual_seed(0)), torch.arange(30) % 3
    expected = nb.knn_classify(feats[:20], labels[:20], feats[20:], labels[20:], k=(1, 5))
    assert nb.knn_classify(feats[:20], labels[:20], feats[20:], labels[20:], k=np.array([1, 5])) == expected
    assert nb.knn_classify(feats[:20], labels[:20], feats[20:], labels[20:], k=(x for x in (1, 5))) == expected


def test_knn_tiny_temperature_does_not_underflow(nb):
    train, train_labels = directions([0, 40, 90]), torch.tensor([0, 1, 1])
    # with T = 1e-3, exp(s/T) overflows float32 and exp(-s/T) underflows; the ranking must survive
    assert nb.knn_classify(train, train_labels, directions([10]), torch.tensor([0]), k=3, T=1e-3)[3] == (100.0, 100.0)


@pytest.mark.parametrize("chunk_size,train_chunk_size", [(1, 7), (13, 50), (64, 1000), (1000, 3)])
def test_knn_chunked_equals_unchunked_and_reference(nb, chunk_size, train_chunk_size):
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(12, 32, generator=gen)
    train_labels = torch.randint(0, 12, (300,), generator=gen)
    test_labels = torch.randint(0, 12, (57,), generator=gen)
    train = centres[train_labels] + 1.5 * torch.randn(300, 32, generator=gen)
    test = centres[test_labels] + 1.5 * torch.randn(57, 32, generator=gen)
    ks = (1, 5, 10, 20)
    whole = nb.knn_classify(train, train_labels, test, test_labels, k=ks, chunk_size=10_000,
                            train_chunk_size=10_000)
    chunked = nb.knn_classify(train, train_labels, test, test_labels, k=ks, chunk_size=chunk_size,
                              train_chunk_size=train_chunk_size)
    assert chunked == whole
    for k in ks:
        assert whole[k] == pytest.approx(reference_knn(train, train_labels, test, test_labels, k, 0.07, 12))
    assert 0 < whole[20][0] < 100 and whole[20][0] <= whole[20][1]


def test_nearest_neighbours_running_topk_matches_full_topk(nb):
    gen = torch.Generator().manual_seed(1)
    train, queries = torch.randn(103, 16, generator=gen), torch.randn(9, 16, generator=gen)
    full_sims, full_idx = (F.normalize(queries, dim=1) @ F.normalize(train, dim=1).T).topk(25, dim=1)
    for chunk in (1, 10, 24, 25, 26, 103, 500):
        sims, idx = nb.nearest_neighbours(train, queries, k=25, train_chunk_size=chunk)
        assert torch.equal(idx, full_idx) and torch.allclose(sims, full_sims, atol=1e-6)
    sims, idx = nb.nearest_neighbours(train[:4], queries, k=25)  # k clamped to the train set
    assert sims.shape == (9, 4) and sorted(idx[0].tolist()) == [0, 1, 2, 3]


def test_knn_accepts_numpy_and_rejects_empty(nb):
    train, labels = np.eye(3, dtype=np.float32), np.array([0, 1, 2])
    assert nb.knn_classify(train, labels, train, labels, k=1) == {1: (100.0, 100.0)}
    with pytest.raises(ValueError):
        nb.knn_classify(train, labels, train[:0], labels[:0], k=1)


MISMATCHES = {   # (train features, train labels, test features, test labels) from 20 + 10 rows, 8 wide
    "more labels": (lambda f, l: (f[:20], torch.cat([l[:20], l[:5]]), f[20:], l[20:]),
                    r"train labels must be one int >= 0 per feature: 20 features, labels of shape \(25,\)"),
    "fewer labels": (lambda f, l: (f[:20], l[:20], f[20:], l[20:25]), r"test labels .* 10 features, .*\(5,\)"),
    "widths": (lambda f, l: (f[:20], l[:20], f[20:, :4], l[20:]), "train features are 8 wide, test features 4"),
    "negative": (lambda f, l: (f[:20], l[:20] - 1, f[20:], l[20:]), "train labels must be one int >= 0"),
    "float labels": (lambda f, l: (f[:20], l[:20].float(), f[20:], l[20:]), r"train labels .* labels of shape \(20,\), float32"),
    "one image": (lambda f, l: (f[0], l[:1], f[20:], l[20:]), r"train features must be \(N, D\) .* shape \(8,\)"),
}


@pytest.mark.parametrize("score", ["knn_classify", "linear_probe"])
@pytest.mark.parametrize("mismatch", MISMATCHES)
def test_features_and_labels_that_do_not_match_are_refused_by_what_differs(nb, score, mismatch):
    """80 labels for 50 features were scored; 30 labels gave an IndexError, two widths a matmul error."""
    gen = torch.Generator().manual_seed(0)
    make, says = MISMATCHES[mismatch]
    args = make(torch.randn(30, 8, generator=gen), torch.arange(30) % 3)
    run = {"knn_classify": lambda: nb.knn_classify(*args, k=5),
           "linear_probe": lambda: nb.linear_probe(*args, epochs=1, batch_size=10)}[score]
    with pytest.raises(ValueError, match=f"{score}: {says}"):
        run()


@pytest.mark.parametrize("call, says", [
    (lambda nb, a: nb.knn_classify(*a, k=0), r"k, chunk_size and train_chunk_size must be ints >= 1 and T > 0, got k=0"),
    (lambda nb, a: nb.knn_classify(*a, k=20.0), r"got k=20.0"),
    (lambda nb, a: nb.knn_classify(*a, k=True), r"got k=True"),
    (lambda nb, a: nb.knn_classify(*a, k=np.array(2.5)), r"got k=array\(2.5\)"),
    (lambda nb, a: nb.knn_classify(*a, chunk_size=0), r"chunk_size=0"),
    (lambda nb, a: nb.knn_classify(*a, train_chunk_size=0), r"train_chunk_size=0"),
    (lambda nb, a: nb.knn_classify(*a, num_classes=2), r"num_classes=2: must be an int above every label \(the largest is 2\)"),
    (lambda nb, a: nb.linear_probe(*a, num_classes=2), r"num_classes=2: must be an int above every label"),
    (lambda nb, a: nb.knn_classify(*a, k=(20, 2.5)), r"got k=\(20, 2.5\)"),
    (lambda nb, a: nb.knn_classify(*a, k=5, T=0), r"T=0"),
    (lambda nb, a: nb.knn_classify(*a, k=5, T=float("nan")), r"T=nan"),
    (lambda nb, a: nb.linear_probe(*a, epochs=0), r"epochs and batch_size must be ints >= 1 and lr > 0, got epochs=0"),
    (lambda nb, a: nb.linear_probe(*a, batch_size=0), r"batch_size=0"),
    (lambda nb, a: nb.linear_probe(*a, epochs=True), r"got epochs=True"),
    (lambda nb, a: nb.linear_probe(*a, num_classes=True), r"num_classes=True: must be an int"),
    (lambda nb, a: nb.linear_probe(*a, lr=float("nan")), r"lr=nan"),
    (lambda nb, a: nb.linear_probe(*a, lr=-0.1), r"lr=-0.1")])
def test_settings_that_score_nothing_are_refused_not_scored(nb, call, says):
    """k=0 and T=0 scored 0%; a probe of 0 epochs or a NaN learning rate scored its untrained classifier;
    k=20.0 raised "'float' object is not iterable", chunk sizes 0 "range() arg 3 must not be zero", and a
    num_classes below a label an index error that did not name it; the probe took epochs=True for one epoch,
    where k-NN refused k=True."""
    feats, labels = torch.randn(30, 8, generator=torch.Generator().manual_seed(0)), torch.arange(30) % 3
    with pytest.raises(ValueError, match=says):
        call(nb, (feats[:20], labels[:20], feats[20:], labels[20:]))
    assert nb.knn_classify(feats[:20], labels[:20], feats[20:], labels[20:], k=np.int64(5))[5][0] >= 0


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.int32, np.int16])
def test_labels_of_any_integer_type_are_scored_as_int64_ones(nb, dtype):
    """uint16 and uint32 labels (a label file of the smallest type) raised torch's 'min_all not implemented'."""
    feats, labels = torch.randn(30, 8, generator=torch.Generator().manual_seed(0)), np.arange(30) % 3
    expected = nb.knn_classify(feats[:20], labels[:20], feats[20:], labels[20:], k=5)
    assert nb.knn_classify(feats[:20], labels[:20].astype(dtype), feats[20:], labels[20:].astype(dtype), k=5) == expected
    probe = lambda lab: nb.linear_probe(feats[:20], lab[:20], feats[20:], lab[20:], epochs=2, batch_size=10)
    assert probe(labels.astype(dtype)) == probe(labels)


@pytest.mark.parametrize("score", ["knn", "probe"])
@pytest.mark.parametrize("which", ["train", "val"])
def test_features_of_a_diverged_network_are_refused_not_scored(nb, score, which):
    """One NaN row among finite ones: k-NN scored it as 0% and the probe as chance, a network that learned
    nothing rather than one that diverged."""
    gen = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(40, 8, generator=gen), torch.arange(40) % 4
    train, val = feats[:20].clone(), feats[20:].clone()
    (train if which == "train" else val)[3, 5] = float("nan")
    run = {"knn": lambda: nb.knn_classify(train, labels[:20], val, labels[20:], k=5),
           "probe": lambda: nb.linear_probe(train, labels[:20], val, labels[20:], epochs=2, batch_size=10)}[score]
    with pytest.raises(ValueError, match=r"1 of 20 features hold NaN or inf: the network that made them has diverged"):
        run()


def test_the_probe_needs_two_training_features_to_standardise_by(nb):
    feats, labels = torch.randn(3, 8), torch.tensor([0, 1, 0])
    with pytest.raises(ValueError, match="at least 2 training features, got 1"):
        nb.linear_probe(feats[:1], labels[:1], feats[1:], labels[1:], epochs=1, batch_size=1)

# ---------------------------------------------------------------- features

def test_extract_features_shapes_batches_and_mode(nb, tmp_path):
    model = small_vit(nb, drop_path_rate=0.5).train()  # drop path: train and eval mode differ
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 3, 32, 32), dtype=np.uint8)
    memmap = np.memmap(tmp_path / "images.u8", dtype=np.uint8, mode="w+", shape=images.shape)
    memmap[:] = images
    memmap.flush()
    memmap = np.memmap(tmp_path / "images.u8", dtype=np.uint8, mode="r", shape=images.shape)
    cls = nb.extract_features(model, memmap, batch_size=3)
    assert cls.dtype == torch.float32 and cls.shape == (7, 48) and cls.device.type == "cpu"
    assert model.training  # mode restored
    with torch.no_grad():
        expected = model.eval()(nb.normalize_uint8(torch.from_numpy(images)))
    assert torch.allclose(cls, expected, atol=1e-5)  # batches of 3 == one batch, eval mode (no drop path)
    assert torch.allclose(nb.extract_features(model, torch.from_numpy(images), batch_size=256), cls, atol=1e-5)
    many = nb.extract_features(model, images, n_last_blocks=2, avgpool=True)
    assert many.shape == (7, 48 * 3)
    with torch.no_grad():
        blocks = model.get_intermediate_layers(nb.normalize_uint8(torch.from_numpy(images)), 2)
    assert torch.allclose(many[:, :48], blocks[0][:, 0], atol=1e-5)
    assert torch.allclose(many[:, 48:96], cls, atol=1e-5)  # last block's normed CLS is the feature
    assert torch.allclose(many[:, 96:], blocks[1][:, 1:].mean(1), atol=1e-5)
    assert nb.extract_features(model, images, n_last_blocks=3).shape == (7, 48 * 3)


def test_save_and_load_features(nb, tmp_path):
    run_dir = tmp_path / "checkpoints" / "run"
    feats, labels = torch.randn(10, 6), torch.arange(10) % 3
    paths = nb.save_features(run_dir, "train", feats, labels)
    nb.save_features(run_dir, "val", feats[:4].double(), labels[:4].numpy().astype(np.int32))
    assert paths == (run_dir / "features" / "train" / "features.npy", run_dir / "features" / "train" / "labels.npy")
    stored = np.load(run_dir / "features" / "val" / "features.npy")
    assert stored.dtype == np.float32 and stored.shape == (4, 6)
    assert np.load(run_dir / "features" / "val" / "labels.npy").dtype == np.int64
    loaded_feats, loaded_labels = nb.load_features(run_dir, "train")
    assert torch.equal(loaded_feats, feats) and torch.equal(loaded_labels, labels)
    assert sorted(p.name for p in (run_dir / "features" / "train").iterdir()) == ["features.npy", "labels.npy"]


def test_knn_accuracy_end_to_end_with_eval_cap(nb):
    """knn_accuracy == extract + knn_classify by hand, on max_eval_images evenly spaced images."""
    model = small_vit(nb)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 10)
    colours = rng.integers(0, 256, (4, 3, 1, 1))
    images = np.clip(colours[labels] + rng.integers(-30, 30, (40, 3, 32, 32)), 0, 255).astype(np.uint8)
    dataset = type("Data", (), {"images": images, "labels": labels, "__len__": lambda self: 40})()
    cfg = nb.make_config("demo", knn_k=5, knn_temperature=0.07, max_eval_images=20)
    images_capped, labels_capped = nb.evenly_spaced(dataset, 20)
    assert len(images_capped) == 20 and set(labels_capped.tolist()) == {0, 1, 2, 3}
    top1, top5 = nb.knn_accuracy(model, dataset, dataset, cfg, torch.device("cpu"))
    feats = nb.extract_features(model, images_capped)
    assert (top1, top5) == nb.knn_classify(feats, labels_capped, feats, labels_capped, k=5)[5]
    one_nn = nb.make_config("demo", knn_k=1, max_eval_images=20)
    assert nb.knn_accuracy(model, dataset, dataset, one_nn, torch.device("cpu")) == (100.0, 100.0)  # itself
    assert nb.evenly_spaced(dataset, 0)[0] is images


# ---------------------------------------------------------------- linear probe

def test_linear_probe_learns_separable_data_and_is_deterministic(nb):
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(6).repeat(50)
    feats = 50 + 20 * (4 * torch.randn(6, 24, generator=gen)[labels] + torch.randn(300, 24, generator=gen))
    args = (feats[:200], labels[:200], feats[200:], labels[200:])
    top1, top5 = nb.linear_probe(*args, epochs=10, lr=0.01, batch_size=50)
    assert top1 > 95 and top5 == 100.0
    assert nb.linear_probe(*args, epochs=10, lr=0.01, batch_size=50) == (top1, top5)
    shuffled = labels[torch.randperm(300, generator=gen)]
    chance_top1, _ = nb.linear_probe(feats[:200], shuffled[:200], feats[200:], shuffled[200:], epochs=10,
                                     lr=0.01, batch_size=50)
    assert chance_top1 < 50


def test_the_probe_scores_val_features_with_the_train_statistics(nb):
    """Validation images of one class only: standardised by their own mean they would sit on the boundary
    between the classes; by the train statistics, every one is where training put its class."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(2).repeat(100)
    feats = torch.randn(200, 8, generator=gen) + 6.0 * (2.0 * labels[:, None] - 1)   # classes at -6 and +6
    ones = labels == 1
    top1, _ = nb.linear_probe(feats, labels, feats[ones][:20] + 0.5, labels[ones][:20], epochs=10, lr=0.01,
                              batch_size=50)
    assert top1 == 100.0


def test_standardize_uses_train_statistics(nb):
    train, val = 3 + 2 * torch.randn(500, 4), torch.full((2, 4), 3.0)
    train_std, val_std = nb.standardize(train, val)
    assert torch.allclose(train_std.mean(0), torch.zeros(4), atol=1e-5)
    assert torch.allclose(train_std.std(0, correction=0), torch.ones(4), atol=1e-4)
    assert torch.allclose(val_std, (val - train.mean(0)) / (train.var(0, correction=0) + 1e-6).sqrt())


def test_a_nearly_constant_dimension_is_scaled_as_batchnorm_scales_it(nb):
    """std + 1e-6 divided a constant training dimension by 1e-6: a val value 1e-3 off became 1,000 and
    outweighed the dimension that holds the labels (top-1 74% instead of 90%)."""
    gen = torch.Generator().manual_seed(0)
    train, val = torch.randn(300, 16, generator=gen), torch.randn(100, 16, generator=gen)
    train_y, val_y = (train[:, 1] > 0).long(), (val[:, 1] > 0).long()
    plain = nb.linear_probe(train, train_y, val, val_y, epochs=20, lr=0.01, batch_size=64)[0]
    train[:, 0], val[:, 0] = 0.5, 0.5 + 1e-3 * torch.randn(100, generator=gen)
    expected = F.batch_norm(val, train.mean(0), train.var(0, correction=0), eps=1e-6)   # the training statistics
    assert torch.allclose(nb.standardize(train, val)[1], expected, atol=1e-5)
    assert nb.linear_probe(train, train_y, val, val_y, epochs=20, lr=0.01, batch_size=64)[0] >= plain - 2


@pytest.mark.parametrize("classes", [2, 5])
def test_a_top5_of_five_classes_or_fewer_is_left_out_not_100(nb, classes):
    """With 5 classes or fewer every class is among the 5 best: the probe reported 100% top-5 for any
    features (random labels included); the reference's eval_linear.py leaves it out below 5 classes."""
    gen = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(200, 8, generator=gen), torch.randint(0, classes, (200,), generator=gen)
    top1, top5 = nb.linear_probe(feats[:150], labels[:150], feats[150:], labels[150:], epochs=2, batch_size=50)
    assert 0 <= top1 <= 100 and math.isnan(top5)
    six = nb.linear_probe(feats[:150], labels[:150], feats[150:], labels[150:], epochs=2, batch_size=50,
                          num_classes=6)
    assert 0 <= six[1] <= 100


@pytest.mark.parametrize("arch,width", [("vit_tiny", 4 * 192), ("vit_small", 4 * 384), ("vit_base", 2 * 768)])
def test_probe_features_follow_the_reference_protocol_per_architecture(nb, arch, width):
    """eval_linear.py: ViT-S the CLS tokens of the last 4 blocks, ViT-B the last CLS + mean patch token."""
    torch.manual_seed(0)
    model = nb.build_backbone(nb.make_config("demo", arch=arch, patch_size=16, img_size=32, global_crop_size=32,
                                              local_crop_size=16))
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    settings = nb.probe_feature_settings(arch)
    assert settings == ({"n_last_blocks": 1, "avgpool": True} if arch == "vit_base"
                        else {"n_last_blocks": 4, "avgpool": False})
    feats = nb.extract_features(model, images, **settings)
    assert feats.shape == (3, width) and width == model.embed_dim * (settings["n_last_blocks"] + settings["avgpool"])
    cls = nb.last_cls_token(feats, model.embed_dim, **settings)
    torch.testing.assert_close(cls, nb.extract_features(model, images), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        blocks = model.eval().get_intermediate_layers(nb.normalize_uint8(torch.from_numpy(images)), 4)
    if settings["avgpool"]:
        torch.testing.assert_close(feats[:, model.embed_dim:], blocks[-1][:, 1:].mean(1), rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(feats, torch.cat([b[:, 0] for b in blocks], 1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="width"):
        nb.last_cls_token(feats[:, :-1], model.embed_dim, **settings)


def test_retrieval_finds_neighbours_by_the_knn_feature_the_last_cls_token(nb):
    """The figure said 'nearest by cosine similarity of the CLS feature' but searched the probe's features (the
    CLS tokens of the last four blocks, concatenated): 17% to 27% of the neighbours shown differed."""
    settings, width = dict(n_last_blocks=4, avgpool=False), 8
    rng = torch.Generator().manual_seed(0)
    splits = {split: (torch.randn(n, 4 * width, generator=rng), None) for split, n in (("train", 40), ("val", 10))}
    queries = torch.arange(10)
    got = nb.retrieval_rows({"teacher": splits}, queries, width, settings, k=5)["teacher"]
    last = {split: feats[:, 3 * width:] for split, (feats, _) in splits.items()}
    assert torch.equal(got, nb.nearest_neighbours(last["train"], last["val"], 5)[1])
    assert not torch.equal(got, nb.nearest_neighbours(splits["train"][0], splits["val"][0], 5)[1])


def test_retrieval_frames_neighbours_by_class_only_where_there_are_labels(nb):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    images = np.zeros((4, 3, 8, 8), np.uint8)
    neighbours = {"random init": torch.tensor([[1, 2], [0, 3]]), "DINO teacher": torch.tensor([[0, 1], [2, 3]])}
    framed = nb.plot_retrieval(images[:2], np.array([0, 1]), images, np.array([0, 0, 1, 1]), neighbours,
                               title="model; data")
    plain = nb.plot_retrieval(images[:2], np.array([0, 0]), images, None, neighbours)   # a flat folder
    colours = [p.get_edgecolor()[:3] for ax in framed.axes for p in ax.patches]
    assert len(colours) == 8 and sum(c[1] > c[0] for c in colours) == 6    # 6 green (same class), 2 red
    assert sum(len(ax.patches) for ax in plain.axes) == 0 and framed._suptitle.get_text() == "model; data"
    plt.close("all")


def test_the_mean_patch_token_leaves_the_registers_out(nb):
    """The probe's average-pooled feature (ViT-B's protocol) is the mean of the patch tokens; a DINOv2 model's
    register tokens sit between the CLS token and the patches and were averaged in with them."""
    model = nb.VisionTransformer(28, 14, embed_dim=48, depth=2, num_heads=3, num_register_tokens=4,
                                 layerscale_init=1.0).eval()
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = model.get_intermediate_layers(x, 1)[0]   # CLS, 4 registers, 16 patches
        features = nb.backbone_features(model, x, 1, avgpool=True)
    assert tokens.shape[1] == 1 + 4 + 16
    assert torch.equal(features[:, :48], tokens[:, 0])
    assert (features[:, 48:] - tokens[:, 5:].mean(dim=1)).abs().max() < 1e-6


@pytest.mark.parametrize("args, says", [
    (dict(n_last_blocks=0), "n_last_blocks=0: needs images, batch_size >= 1 and 1 <= n_last_blocks <= 12 blocks"),
    (dict(n_last_blocks=13), "n_last_blocks=13"),
    (dict(batch_size=0), "batch_size=0"),
    (dict(batch_size=2.0), "batch_size=2.0")])
def test_features_of_blocks_the_network_lacks_are_refused_by_name(nb, args, says):
    """n_last_blocks=0 raised a bare IndexError, 13 of 12 blocks returned 12 CLS tokens, not the 13 asked (a
    probe's width then differed from the one its head was built for), batch_size=0 'range() arg 3 must not be
    zero'."""
    model, images = nb.vit_tiny(patch_size=16), torch.zeros(3, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match=re.escape(says)):
        nb.extract_features(model, images, **args)
    assert nb.extract_features(model, images, n_last_blocks=12, batch_size=2).shape == (3, 12 * 192)
