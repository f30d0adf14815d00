"""Source files are not trusted: the pickle allow-list, size limits checked before inflating, ambiguity."""
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent


class Reduce:
    """Pickles as a call of `func(*args)`: what a malicious file would contain."""
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def attacks(marker):
    import builtins
    import os
    import posix
    import subprocess as sp
    return {
        "os.system": Reduce(os.system, f"touch {marker}"),
        "posix.system": Reduce(posix.system, f"touch {marker}"),
        "subprocess.Popen": Reduce(sp.Popen, ["touch", str(marker)]),
        "builtins.eval": Reduce(builtins.eval, f"open({str(marker)!r}, 'w')"),
        "builtins.exec": Reduce(builtins.exec, f"open({str(marker)!r}, 'w')"),
    }


def global_name(blob):
    import pickletools
    ops = list(pickletools.genops(blob))
    names = [arg for op, arg, _ in ops if op.name == "GLOBAL"]
    return names[0].replace(" ", ".")


@pytest.mark.parametrize("kind", ["os.system", "posix.system", "subprocess.Popen", "builtins.eval", "builtins.exec"])
def test_malicious_pickles_are_refused_before_anything_runs(nb, tmp_path, kind):
    marker = tmp_path / "pwned"
    payload = attacks(marker)[kind]
    blob = pickle.dumps({"data": payload, "labels": [1]}, protocol=2)
    refused = global_name(blob)  # the spelling this Python writes, e.g. posix.system for os.system
    assert refused.split(".")[-1] in kind
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "val_data").write_bytes(blob)
    with pytest.raises(nb.DataError, match="refused the pickle global") as info:
        nb.ImageNet64(tmp_path / "r", "val", cache_dir=tmp_path / "c")
    assert refused in str(info.value) and "val_data" in str(info.value)
    # the same inside a zip member, as downloaded
    (tmp_path / "z").mkdir()
    with zipfile.ZipFile(tmp_path / "z" / "Imagenet64_val.zip", "w") as zf:
        zf.writestr("Imagenet64_val/val_data", blob)
    with pytest.raises(nb.DataError, match="refused the pickle global") as info:
        nb.ImageNet64(tmp_path / "z", "val", cache_dir=tmp_path / "c")
    assert refused in str(info.value) and "Imagenet64_val.zip:Imagenet64_val/val_data" in str(info.value)
    assert not marker.exists()
    # the control: unrestricted pickle would have run it
    if kind == "builtins.eval":
        pickle.loads(blob)
        assert marker.exists()


def python2_array_pickle(array):
    """The opcodes Python 2's cPickle writes for a numpy array (protocol 2): str data, numpy.core names."""
    def string(b):
        return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<i", len(b))) + b
    def integer(i):
        return b"J" + struct.pack("<i", i)
    dtype = array.dtype
    order = b"|" if dtype.itemsize == 1 else b"<"
    return b"".join([
        b"cnumpy.core.multiarray\n_reconstruct\n", b"cnumpy\nndarray\n", integer(0), b"\x85", string(b"b"),
        b"\x87R(", integer(1), *map(integer, array.shape), b"\x85" if array.ndim == 1 else b"\x86",
        b"cnumpy\ndtype\n", string(dtype.str[1:].encode()), integer(0), integer(1), b"\x87R(", integer(3),
        string(order), b"NNN", integer(-1), integer(-1), integer(0), b"tb", b"\x89", string(array.tobytes()),
        b"tb"])


def python2_batch_pickle(batch):
    out = [b"\x80\x02}("]
    for key, value in batch.items():
        out.append(b"U" + bytes([len(key)]) + key.encode())
        if isinstance(value, list):
            out.append(b"](" + b"".join(b"J" + struct.pack("<i", v) for v in value) + b"e")
        else:
            out.append(python2_array_pickle(value))
    return b"".join(out) + b"u."


def test_official_python2_latin1_layout_loads(nb, tmp_path):
    """The official files: Python 2 protocol 2, numpy.core names, 'data' as a latin-1 str, a list of labels."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (6, 12288), dtype=np.uint8)
    data[0, :256] = np.arange(256)  # every byte value, through the latin-1 round trip
    batch = {"data": data, "labels": [1, 1000, 3, 4, 5, 6], "mean": data.mean(axis=0)}
    blob = python2_batch_pickle(batch)
    assert b"numpy.core.multiarray" in blob and b"_codecs" not in blob
    check = pickle.loads(blob, encoding="latin1")  # the reference reading
    np.testing.assert_array_equal(check["data"], data)
    np.testing.assert_array_equal(check["mean"], batch["mean"])
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "val_data").write_bytes(blob)
    ds = nb.ImageNet64(tmp_path / "r", "val", cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(ds.images.reshape(6, -1), data)
    assert ds.labels.tolist() == [0, 999, 2, 3, 4, 5]


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_pickles_of_this_python_load(nb, tmp_path, protocol):
    data = np.arange(2 * 12288, dtype=np.uint64).astype(np.uint8).reshape(2, 12288)
    batch = {"data": data, "labels": [np.int64(7), 8], "mean": data.mean(axis=0)}
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "val_data").write_bytes(pickle.dumps(batch, protocol=protocol))
    ds = nb.ImageNet64(tmp_path / "r", "val", cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(ds.images.reshape(2, -1), data)
    assert ds.labels.tolist() == [6, 7]


def test_codecs_encode_only_to_latin1(nb, tmp_path):
    import codecs
    blob = pickle.dumps({"data": Reduce(codecs.encode, "x", "rot13"), "labels": [1]}, protocol=2)
    assert b"_codecs\nencode" in blob
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "val_data").write_bytes(blob)
    with pytest.raises(nb.DataError, match="latin-1"):
        nb.ImageNet64(tmp_path / "r", "val", cache_dir=tmp_path / "c")


def test_npz_object_arrays_and_wrong_headers_are_refused(nb, tmp_path):
    (tmp_path / "r").mkdir()
    np.savez(tmp_path / "r" / "val_data.npz", data=np.array([{"a": 1}], dtype=object), labels=np.array([1]))
    with pytest.raises(nb.DataError, match=r"val_data.npz:data.npy"):
        nb.ImageNet64(tmp_path / "r", "val", cache_dir=tmp_path / "c")
    np.savez(tmp_path / "r" / "val_data.npz", data=np.zeros((2, 12288), np.float32), labels=np.array([1, 2]))
    with pytest.raises(nb.DataError, match=r"data.npy: header declares float32"):
        nb.ImageNet64(tmp_path / "r", "val", cache_dir=tmp_path / "c")
    np.savez(tmp_path / "r" / "val_data.npz", data=np.zeros((2, 12288), np.uint8), labels=np.array([1.0, 2.0]))
    with pytest.raises(nb.DataError, match=r"labels.npy: header declares float64"):
        nb.ImageNet64(tmp_path / "r", "val", cache_dir=tmp_path / "c")
