"""The cache proves itself: schema-checked metadata, sizes and labels checked on every open, checksums on demand."""
import hashlib
import json
import pickle
import re

import numpy as np
import pytest

N = 64


@pytest.fixture
def built(nb, tmp_path):
    """A val split of N images converted into a cache; returns (root, cache_dir, prefix, images, labels)."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (N, 12288), dtype=np.uint8)
    labels = rng.integers(1, 1001, N).tolist()
    (tmp_path / "r").mkdir()
    with open(tmp_path / "r" / "val_data", "wb") as f:
        pickle.dump({"data": data, "labels": labels}, f)
    ds = nb.ImageNet64(tmp_path / "r", "val", cache_dir=tmp_path / "c")
    return tmp_path / "r", tmp_path / "c", ds.prefix, data.reshape(N, 3, 64, 64), np.array(labels) - 1


def edit_meta(prefix, **changes):
    path = prefix.with_name(prefix.name + ".json")
    meta = json.loads(path.read_text())
    meta.update(changes)
    for key in [k for k, v in changes.items() if v is KeyError]:
        del meta[key]
    path.write_text(json.dumps(meta))


def write(prefix, suffix, content):
    prefix.with_name(prefix.name + suffix).write_bytes(content)


def save_labels(prefix, labels):
    np.save(prefix.with_name(prefix.name + ".labels.npy"), labels, allow_pickle=True)


def grow(prefix, images, n):
    with open(prefix.with_name(prefix.name + ".u8"), "ab") as f:
        f.write(bytes(n * 12288))


class Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.path}",)


TAMPERS = {
    "truncated data": (lambda p, t: write(p, ".u8", (t / "c" / (p.name + ".u8")).read_bytes()[:-100]), r"\.u8: \d+ bytes"),
    "grown data": (lambda p, t: grow(p, None, 1), r"\.u8: \d+ bytes, but n = 64"),
    "grown data, edited count": (lambda p, t: (grow(p, None, 1), edit_meta(p, n=N + 1)), r"expected 65 integer labels"),
    "80 labels": (lambda p, t: save_labels(p, np.zeros(80, np.int64)), "expected 64 integer labels"),
    "label -7": (lambda p, t: save_labels(p, np.r_[np.zeros(N - 1, np.int64), -7]), r"\[-7, "),
    "label 1e9": (lambda p, t: save_labels(p, np.r_[np.zeros(N - 1, np.int64), 10**9]), "outside"),
    "float labels": (lambda p, t: save_labels(p, np.full(N, 0.5)), "float64"),
    "pickled labels": (lambda p, t: save_labels(p, np.array([Marker(t / "pwned")] * N, dtype=object)), "object"),
    "labels missing": (lambda p, t: p.with_name(p.name + ".labels.npy").unlink(), "labels.npy"),
    "n null": (lambda p, t: edit_meta(p, n=None), "n = None"),
    "n float": (lambda p, t: edit_meta(p, n=20.0), "n = 20.0"),
    "n bool": (lambda p, t: edit_meta(p, n=True), "n = True"),
    "n negative": (lambda p, t: edit_meta(p, n=-1), "n = -1"),
    "bad json": (lambda p, t: write(p, ".json", b'{"n": 64, "shape'), "unreadable metadata"),
    "json list": (lambda p, t: write(p, ".json", b"[64, [3, 64, 64]]"), "JSON list"),
    "missing keys": (lambda p, t: edit_meta(p, shape=KeyError, checksums=KeyError), r"lacks \['checksums', 'shape'\]"),
    "bad shape": (lambda p, t: edit_meta(p, shape=[3, 64, "64"]), "not \\[3, H, W\\]"),
    "other shape": (lambda p, t: edit_meta(p, shape=[3, 32, 32]), "expected \\[3, 64, 64\\]"),
    "old version": (lambda p, t: edit_meta(p, version=1), "version 1"),
    "checksums cut": (lambda p, t: edit_meta(p, checksums=[]), "checksums"),
}


@pytest.mark.parametrize("tamper", TAMPERS)
def test_a_tampered_cache_is_rebuilt_with_one_warning(nb, built, tmp_path, tamper):
    root, cache, prefix, images, labels = built
    change, reason = TAMPERS[tamper]
    change(prefix, tmp_path)
    with pytest.warns(UserWarning, match=f"cache {prefix} rejected") as record:
        ds = nb.ImageNet64(root, "val", cache_dir=cache)
    assert len(record) == 1 and re.search(reason, str(record[0].message)), str(record[0].message)
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels)
    assert not (tmp_path / "pwned").exists()
    assert ds.verify() == 1  # the rebuilt cache is whole


def test_verify_names_the_block_that_differs(nb, built, monkeypatch):
    root, cache, prefix, images, _ = built
    monkeypatch.setattr(nb, "CHECKSUM_IMAGES", 16)
    with pytest.warns(UserWarning, match="not a list of 4 strings"):  # built with blocks of 4096: rebuilt
        ds = nb.ImageNet64(root, "val", cache_dir=cache)
    assert nb.verify_cache(prefix) == N // 16
    raw = prefix.with_name(prefix.name + ".u8")
    with open(raw, "r+b") as f:
        f.seek(37 * 12288 + 5000)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(nb.DataError, match=r"1 of 4 blocks differ.*block 2 \(images 32\.\.47\)"):
        nb.verify_cache(prefix)
    assert len(ds) == N  # an open does not re-hash: the flip is only found on demand


def test_block_hasher_does_not_depend_on_how_the_bytes_arrive(nb):
    data = np.random.default_rng(1).integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    expected = [hashlib.sha256(data[i:i + 3000]).hexdigest() for i in range(0, len(data), 3000)]
    for pieces in ([data], [data[:1], data[1:2999], data[2999:7001], data[7001:]]):
        hasher = nb.BlockHasher(3000)
        for piece in pieces:
            hasher.update(piece)
        assert hasher.finish() == expected


def test_other_image_shapes_and_class_counts(nb, tmp_path):
    images = np.random.default_rng(2).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    prefix = tmp_path / "folder-32"
    nb.write_cache(prefix, [(images[:2], np.array([0, 9])), (images[2:], np.array([3, 3, 1]))], [],
                   image_shape=(3, 32, 32), num_classes=10)
    got, labels = nb.open_cache(prefix, [], image_shape=(3, 32, 32))
    np.testing.assert_array_equal(got, images)
    assert labels.tolist() == [0, 9, 3, 3, 1]
    with pytest.warns(UserWarning, match=r"images of shape \[3, 32, 32\], expected \[3, 64, 64\]"):
        assert nb.open_cache(prefix, []) is None
    with pytest.raises(nb.DataError, match=r"labels in \[0, 10\)"):
        nb.write_cache(tmp_path / "bad", [(images, np.array([0, 1, 2, 3, 10]))], [], (3, 32, 32), 10)
    assert not (tmp_path / "bad.json").exists()


def test_a_stale_cache_in_a_folder_that_cannot_be_written_says_so_and_loses_nothing(nb, built, monkeypatch):
    """A read-only cache folder (a shared data set, a read-only mount) whose cache is out of date: a raw
    OSError naming the .json it failed to remove; now a DataError naming the folder and cache_dir, with the
    old cache's files as they were."""
    import errno
    import os
    import pathlib
    root, cache_dir, prefix, _, _ = built
    with open(root / "val_data", "ab") as f:
        f.write(b"\0")   # the source changed: the cache is stale
    files = {p: p.read_bytes() for p in cache_dir.iterdir()}
    real_unlink = pathlib.Path.unlink

    def read_only(path, missing_ok=False):
        if cache_dir in path.parents:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_unlink(path, missing_ok=missing_ok)
    monkeypatch.setattr(pathlib.Path, "unlink", read_only)
    with pytest.raises(nb.DataError, match=rf"{re.escape(str(cache_dir))} cannot be written \(Read-only file "
                                           rf"system\): set cache_dir to a folder you can write"):
        nb.ImageNet64(root, "val", cache_dir=cache_dir)
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in cache_dir.iterdir()} == files
