"""ImageNet-64 loading: official formats written by the tests, the cache, and every bad input."""
import dataclasses
import os
import pickle
import zipfile

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def photo():
    """An asymmetric photograph: any flip, transpose or channel swap changes it."""
    import skimage.data
    return skimage.data.astronaut()[100:164, 180:244].transpose(2, 0, 1).copy()  # (3, 64, 64)


def batch_of(photo, n=5, labels=None):
    images = np.stack([np.roll(photo, 7 * i, axis=2) for i in range(n)])
    labels = list(range(1, n + 1)) if labels is None else labels
    return images, {"data": images.reshape(n, -1), "labels": labels}


def write_pickle(path, batch):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(batch, f)


def test_pickle_round_trip(nb, photo, tmp_path):
    images, batch = batch_of(photo)
    write_pickle(tmp_path / "root" / "val_data", batch)
    ds = nb.ImageNet64(tmp_path / "root", "val", cache_dir=tmp_path / "cache")
    assert isinstance(ds.images, np.memmap) and ds.images.dtype == np.uint8
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, np.arange(5))
    image, label = ds[3]
    np.testing.assert_array_equal(image, images[3])
    assert label == 3
    assert len(ds) == 5


def test_channel_planar_layout(nb, photo, tmp_path):
    """Row = all R, then all G, then all B: the first 4096 bytes are the red plane."""
    _, batch = batch_of(photo, n=1)
    write_pickle(tmp_path / "r" / "val_data", batch)
    ds = nb.ImageNet64(tmp_path / "r", "val", cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(ds.images[0, 0].ravel(), batch["data"][0, :4096])
    np.testing.assert_array_equal(ds.images[0, 2, 0, :5], photo[2, 0, :5])


def test_train_batches_in_order_npz_and_zips(nb, photo, tmp_path):
    parts = [batch_of(photo, n, labels=[k] * n) for k, n in ((1, 3), (2, 2))]
    expected = np.concatenate([im for im, _ in parts])
    # npz files, extracted
    for k, (_, b) in enumerate(parts, start=1):
        (tmp_path / "npz").mkdir(exist_ok=True)
        np.savez(tmp_path / "npz" / f"train_data_batch_{k}.npz", data=b["data"], labels=np.array(b["labels"]))
    with pytest.warns(UserWarning, match=r"found batches \[1, 2\], missing batches \[3, 4, 5, 6, 7, 8, 9, 10\]"):
        ds = nb.ImageNet64(tmp_path / "npz", "train", cache_dir=tmp_path / "c1")
    np.testing.assert_array_equal(ds.images, expected)
    np.testing.assert_array_equal(ds.labels, [0, 0, 0, 1, 1])
    # the pickles inside the zip archive as downloaded, members in a subfolder, listed out of order
    (tmp_path / "z").mkdir()
    with zipfile.ZipFile(tmp_path / "z" / "Imagenet64_train_part1.zip", "w") as zf:
        for k in (2, 1):
            zf.writestr(f"Imagenet64_train_part1/train_data_batch_{k}", pickle.dumps(parts[k - 1][1]))
    with pytest.warns(UserWarning, match="partial train split"):
        ds = nb.ImageNet64(tmp_path / "z", "train", cache_dir=tmp_path / "c2")
    np.testing.assert_array_equal(ds.images, expected)
    # the npz variant zipped
    (tmp_path / "zn").mkdir()
    with zipfile.ZipFile(tmp_path / "zn" / "Imagenet64_train_part1_npz.zip", "w") as zf:
        for k, (_, b) in enumerate(parts, start=1):
            zf.write(tmp_path / "npz" / f"train_data_batch_{k}.npz", f"train_data_batch_{k}.npz")
    with pytest.warns(UserWarning, match="partial train split"):
        ds = nb.ImageNet64(tmp_path / "zn", "train", cache_dir=tmp_path / "c3")
    np.testing.assert_array_equal(ds.images, expected)


def test_cache_is_reused_then_rebuilt_on_change(nb, photo, tmp_path, monkeypatch):
    images, batch = batch_of(photo)
    write_pickle(tmp_path / "r" / "val_data", batch)
    nb.ImageNet64(tmp_path / "r", "val", cache_dir=tmp_path / "c")
    raw = next((tmp_path / "c").glob("*.u8"))
    stamp = raw.stat().st_mtime_ns

    def no_reading(source):
        raise AssertionError("the cache should have been used")
    monkeypatch.setattr(nb, "read_source", no_reading)
    ds = nb.ImageNet64(tmp_path / "r", "val", cache_dir=tmp_path / "c")
    assert raw.stat().st_mtime_ns == stamp and len(ds) == 5
    monkeypatch.undo()

    images2, batch2 = batch_of(photo[:, ::-1].copy(), n=3)
    write_pickle(tmp_path / "r" / "val_data", batch2)
    os.utime(tmp_path / "r" / "val_data", ns=(stamp + 10**9, stamp + 10**9))
    ds = nb.ImageNet64(tmp_path / "r", "val", cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(ds.images, images2)


def test_interrupted_conversion_is_never_used(nb, photo, tmp_path, monkeypatch):
    parts = [batch_of(photo, 2)[1], batch_of(photo, 3)[1]]
    for k, b in enumerate(parts, start=1):
        write_pickle(tmp_path / "r" / f"train_data_batch_{k}", b)
    real_read = nb.read_source

    def dies_on_second(source):
        if source[0].name.endswith("_2"):
            raise KeyboardInterrupt
        return real_read(source)
    monkeypatch.setattr(nb, "read_source", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        nb.ImageNet64(tmp_path / "r", "train", cache_dir=tmp_path / "c", warn_partial=False)
    assert not list((tmp_path / "c").glob("*.json")) and not list((tmp_path / "c").glob(".*tmp*"))
    monkeypatch.setattr(nb, "read_source", real_read)
    ds = nb.ImageNet64(tmp_path / "r", "train", cache_dir=tmp_path / "c", warn_partial=False)
    assert len(ds) == 5


@pytest.mark.parametrize("batch, message", [
    ({"data": np.zeros((2, 12288), np.float32), "labels": [1, 2]}, "uint8"),
    ({"data": np.zeros((2, 3072), np.uint8), "labels": [1, 2]}, "N×12288"),
    ({"data": np.zeros((2, 12288), np.uint8), "labels": [1]}, "'labels' has shape"),
    ({"data": np.zeros((2, 12288), np.uint8), "labels": [0, 1]}, "1..1000"),
    ({"data": np.zeros((2, 12288), np.uint8), "labels": [1, 1001]}, "1..1000"),
    ({"images": np.zeros((2, 12288), np.uint8)}, "'data' and 'labels'"),
])
def test_bad_batches_name_the_file(nb, tmp_path, batch, message):
    write_pickle(tmp_path / "r" / "val_data", batch)
    with pytest.raises(nb.DataError, match=message) as info:
        nb.ImageNet64(tmp_path / "r", "val", cache_dir=tmp_path / "c")
    assert "val_data" in str(info.value)


def test_truncated_and_corrupt_files(nb, photo, tmp_path):
    _, batch = batch_of(photo)
    blob = pickle.dumps(batch)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "val_data").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(nb.DataError, match="val_data: not a readable"):
        nb.ImageNet64(tmp_path / "t", "val", cache_dir=tmp_path / "c")
    (tmp_path / "z").mkdir()
    with zipfile.ZipFile(tmp_path / "z" / "Imagenet64_val.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("val_data", blob)
    data = bytearray((tmp_path / "z" / "Imagenet64_val.zip").read_bytes())
    data[200:400] = b"\0" * 200  # damage the compressed member
    (tmp_path / "z" / "Imagenet64_val.zip").write_bytes(bytes(data))
    with pytest.raises(nb.DataError, match=r"Imagenet64_val.zip"):
        nb.ImageNet64(tmp_path / "z", "val", cache_dir=tmp_path / "c")
    (tmp_path / "n").mkdir()
    (tmp_path / "n" / "Imagenet64_val.zip").write_bytes(b"not a zip at all")
    with pytest.raises(nb.DataError, match="not a readable zip"):
        nb.ImageNet64(tmp_path / "n", "val", cache_dir=tmp_path / "c")


def test_missing_root_and_no_files_say_what_was_looked_for(nb, tmp_path):
    with pytest.raises(nb.DataError, match="does not exist"):
        nb.ImageNet64(tmp_path / "nowhere", "train", cache_dir=tmp_path / "c")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    with pytest.raises(nb.DataError, match=r"train_data_batch_1.*Imagenet64_train_part1"):
        nb.ImageNet64(tmp_path / "empty", "train", cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="split"):
        nb.ImageNet64(tmp_path / "empty", "test", cache_dir=tmp_path / "c")


def test_imagenet64_on_a_folder_of_images_points_to_image_folder(nb, photo, tmp_path):
    (tmp_path / "f" / "zebra").mkdir(parents=True)
    Image.fromarray(photo.transpose(1, 2, 0)).save(tmp_path / "f" / "zebra" / "a.png")
    with pytest.raises(nb.DataError, match="no ImageNet-64 files.*ImageFolder"):
        nb.ImageNet64(tmp_path / "f", "train", cache_dir=tmp_path / "c")


def test_the_embedded_sample_is_the_same_whatever_the_seed_of_the_run_that_built_it(nb, tmp_path):
    """It was built with the first run's seed, and only when missing: one config trained on other images on a fresh
    machine than where the demo had run (98.9% of the pixels differed), and resumed on them without a word."""
    cfg = nb.make_config("demo", seed=1, embedded_dir=str(tmp_path / "emb"), cache_dir=str(tmp_path / "c"))
    built = nb.data_folder(cfg)
    nb.build_embedded_sample(tmp_path / "reference")
    for name in ("train_data_batch_1", "val_data"):
        assert (built / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name


def test_embedded_sample_is_official_format(nb, tmp_path):
    cfg = nb.make_config("demo", embedded_dir=str(tmp_path / "emb"), cache_dir=str(tmp_path / "c"))   # no data_root
    train, val = nb.load_datasets(cfg, verbose=False)
    with open(tmp_path / "emb" / "train_data_batch_1", "rb") as f:
        batch = pickle.load(f)
    assert batch["data"].dtype == np.uint8 and batch["data"].shape[1] == 12288
    assert batch["mean"].dtype == np.float64 and batch["mean"].shape == (12288,)
    assert min(batch["labels"]) == 1 and isinstance(batch["labels"], list)
    n_classes = len(nb.EMBEDDED_PHOTOS)
    assert np.bincount(train.labels).tolist() == [len(train) // n_classes] * n_classes
    assert np.bincount(val.labels).tolist() == [len(val) // n_classes] * n_classes
    assert len(set(map(bytes, train.images[:50])) & set(map(bytes, val.images))) == 0


def test_a_data_root_that_is_not_there_is_an_error_naming_it(nb, tmp_path, monkeypatch):
    with pytest.raises(nb.ConfigError, match=r"data_root='.*none': no such folder"):
        nb.make_config("imagenet64", data_root=str(tmp_path / "none"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(nb.ConfigError, match=f"data_root='{tmp_path}/home/photos/clases': no such folder"):
        nb.make_config("demo", data_root="~/photos/clases")          # a typo is never the embedded sample
    (tmp_path / "home" / "photos" / "classes").mkdir(parents=True)
    assert nb.make_config("demo", data_root="~/photos/classes").data_root == f"{tmp_path}/home/photos/classes"
    # where the config is not made by make_config (a profile's default, a later change), load_datasets says it
    cfg = nb.make_config("demo", cache_dir=str(tmp_path / "c"))
    empty = tmp_path / "home" / "photos" / "classes"
    for root, problem in [(tmp_path / "none", "no such folder"), (empty, "an empty folder")]:
        with pytest.raises(nb.DataError, match=f"data_root='{root}': {problem}"):
            nb.load_datasets(dataclasses.replace(cfg, data_root=str(root)))
    with pytest.raises(nb.DataError, match="no data_root given"):
        nb.load_datasets(nb.make_config("imagenet64", data_root=""))


def test_config_profiles_and_unknown_fields(nb):
    assert nb.make_config("imagenet64") == nb.Config()
    demo = nb.make_config("demo", epochs=5)
    assert demo.profile == "demo" and demo.epochs == 5 and demo.arch == "vit_tiny"
    with pytest.raises(ValueError, match="epoch_count"):
        nb.make_config("demo", epoch_count=3)
    with pytest.raises(ValueError, match="unknown profile"):
        nb.make_config("large")


def test_atomic_write_keeps_the_old_file_on_failure(nb, tmp_path):
    target = tmp_path / "x.bin"
    nb.atomic_write(target, lambda f: f.write(b"old"))

    def fails(f):
        f.write(b"half")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        nb.atomic_write(target, fails)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_conversion_holds_one_source_file_at_a_time(nb, tmp_path):
    """The loop over the files kept the last file's arrays while the next was read: two files in memory at
    the peak, not one (for the official files, ~1.6 GB each). Measured by tracemalloc, which sees numpy's
    buffers."""
    import tracemalloc
    n = 600
    for k in (1, 2, 3):
        images = np.random.default_rng(k).integers(0, 256, (n, 64 * 64 * 3), dtype=np.uint8)
        write_pickle(tmp_path / "r" / f"train_data_batch_{k}", {"data": images, "labels": list(range(1, n + 1))})
    tracemalloc.start()
    try:
        with pytest.warns(UserWarning, match="a partial train split"):
            data = nb.ImageNet64(tmp_path / "r", "train", cache_dir=tmp_path / "c")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(data) == 3 * n
    assert peak < 1.5 * n * 64 * 64 * 3, f"peak {peak / (n * 64 * 64 * 3):.2f} files' images"


def test_a_pickle_of_more_instructions_than_a_batch_needs_is_refused_before_unpickling(nb, tmp_path, monkeypatch):
    """A labels list of one-byte DUPs: each an 8-byte pointer and more once numpy reads it, so a small file
    built lists many times its size before the labels' length was checked."""
    many = nb.MAX_BATCH_PICKLE_OPS + 10
    dup_labels = b"]" + b"(" + b"K\x01" + b"2" * many + b"e"   # EMPTY_LIST MARK BININT1 DUP... APPENDS
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "val_data").write_bytes(b"\x80\x02}(X\x06\x00\x00\x00labels" + dup_labels + b"u.")

    def no_unpickling(*args):
        raise AssertionError("unpickled")
    monkeypatch.setattr(nb.SafeUnpickler, "load", no_unpickling)
    with pytest.raises(nb.DataError, match=r"val_data: has more than [\d,]+ pickle instructions"):
        nb.ImageNet64(tmp_path / "r", "val", cache_dir=tmp_path / "c")


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_the_instruction_budget_holds_the_largest_official_batch(nb, protocol):
    """The labels of MAX_IMAGES_PER_FILE images, pickled as Python 2 (protocol 0 or 2) or 3 wrote them, and
    the arrays beside them, stay well inside the budget."""
    import io
    import pickletools
    batch = {"data": np.zeros((2, 64 * 64 * 3), np.uint8), "mean": np.zeros(64 * 64 * 3),
             "labels": [1 + i % 1000 for i in range(nb.MAX_IMAGES_PER_FILE)]}
    text = pickle.dumps(batch, protocol=protocol)
    ops = sum(1 for _ in pickletools.genops(text))
    assert ops < 0.6 * nb.MAX_BATCH_PICKLE_OPS
    assert nb.pickle_depth(io.BytesIO(text), max_ops=nb.MAX_BATCH_PICKLE_OPS) <= nb.MAX_PICKLE_DEPTH


@pytest.mark.parametrize("spelling", ["relative", "absolute", "trailing slash", "link"])
def test_one_folder_named_another_way_reuses_its_cache(nb, photo, tmp_path, monkeypatch, spelling):
    """The cache's file name came from the resolved folder, its fingerprint from the path as typed: each new
    spelling of the same folder rebuilt the cache (15 GB for the train split)."""
    write_pickle(tmp_path / "r" / "val_data", batch_of(photo)[1])
    (tmp_path / "link").symlink_to(tmp_path / "r")
    monkeypatch.chdir(tmp_path)
    nb.ImageNet64("r", "val", cache_dir=tmp_path / "c")

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")
    monkeypatch.setattr(nb, "write_cache", no_conversion)
    root = {"relative": "./r", "absolute": str(tmp_path / "r"), "trailing slash": f"{tmp_path / 'r'}/",
            "link": "link"}[spelling]
    assert len(nb.ImageNet64(root, "val", cache_dir=tmp_path / "c")) == 5
