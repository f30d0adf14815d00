"""Source files are not trusted: the pickle allow-list, size limits checked before inflating, ambiguity."""
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import textwrap
import tracemalloc
import warnings
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


# ---- bombs: small on disk, huge once inflated; loaded in a child process with an address-space limit ----

MiB, GiB = 1 << 20, 1 << 30


def deflate_stream(head, zero_bytes):
    """A raw deflate stream of `head` followed by `zero_bytes` zeros (a multiple of 1 MiB), built in ms."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(bytes(MiB)) + c.flush(zlib.Z_FULL_FLUSH)  # after a full flush, blocks repeat exactly
    return first + block * (zero_bytes // MiB) + c.flush(zlib.Z_FINISH)


def bomb_zip(path, member, head, zero_bytes, declared):
    """A zip whose one member inflates to head + zeros and whose headers declare `declared` bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(member, deflate_stream(head, zero_bytes))
    blob = bytearray(path.read_bytes())
    local, central = blob.index(b"PK\x03\x04"), blob.rindex(b"PK\x01\x02")
    crc = zlib.crc32(head + bytes(zero_bytes)) if zero_bytes < MiB else 0
    for at, method, crc_at, usize in ((local, 8, 14, 22), (central, 10, 16, 24)):
        struct.pack_into("<H", blob, at + method, 8)  # deflated
        struct.pack_into("<I", blob, at + crc_at, crc)
        struct.pack_into("<I", blob, at + usize, declared)
    path.write_bytes(bytes(blob))
    return path


def npy_header(shape, dtype="|u1"):
    header = repr({"descr": dtype, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header


def make_bombs(tmp):
    pickle_head = b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x04data\x94\x8e"
    return {
        # a zip member of zeros that honestly declares 3.9 GB: refused from the central directory
        "zip member 3.9 GB": bomb_zip(tmp / "a" / "Imagenet64_val.zip", "Imagenet64_val/val_data",
                                      pickle_head + struct.pack("<Q", 3_900_000_000), 3_700 * MiB, 3_900_000_000),
        # the same stream (2 GiB) behind a header that lies (1 MiB): the read stops at the bound
        "zip member lying header": bomb_zip(tmp / "b" / "Imagenet64_val.zip", "val_data",
                                            pickle_head + struct.pack("<Q", 1_500_000_000), 2 * GiB, MiB),
        # an npz whose data.npy header declares 1.1 TiB
        "npz header 1.1 TiB": bomb_zip(tmp / "c" / "val_data.npz", "data.npy",
                                       npy_header((98_000_000, 12288)), 0, 128),
        # a 2 MB npz that inflates to 2 GiB, declared honestly, and again behind a lying size
        "npz 2 GiB": bomb_zip(tmp / "d" / "val_data.npz", "data.npy", npy_header((174_763, 12288)), 2 * GiB,
                              2 * GiB + 128),
        "npz 2 GiB lying size": bomb_zip(tmp / "e" / "val_data.npz", "data.npy", npy_header((174_763, 12288)),
                                         2 * GiB, MiB),
        # an npz of 2 GiB zipped once more, as in the _npz zips
        "zipped npz 2 GiB": bomb_zip(tmp / "f" / "Imagenet64_val_npz.zip", "val_data.npz", b"PK\x03\x04", 2 * GiB,
                                     2 * GiB),
        # a 30-byte pickle that declares a 1 TiB bytes object
        "pickle declares 1 TiB": _write(tmp / "g" / "val_data", pickle_head + struct.pack("<Q", 1 << 40)),
        # a sparse 2 GB pickle file: refused from its size, never read
        "pickle file 2 GB": _sparse(tmp / "h" / "val_data", 2_000_000_000),
    }


def _write(path, blob):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    return path


def _sparse(path, size):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


CHILD = textwrap.dedent("""
    import json, resource, sys, time
    sys.path.insert(0, {tests!r})
    from nbloader import load_notebook
    nb = load_notebook()
    vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + {extra}, resource.getrlimit(resource.RLIMIT_AS)[1]))
    results = {{}}
    for name, root in json.loads(sys.argv[1]).items():
        t = time.perf_counter()
        try:
            nb.ImageNet64(root, "val", cache_dir=root + "/cache")
            outcome = "loaded"
        except BaseException as e:
            outcome = f"{{type(e).__name__}}: {{e}}"
        results[name] = [outcome, time.perf_counter() - t]
    print(json.dumps(results))
""")


def test_bombs_are_refused_before_they_inflate(tmp_path):
    bombs = make_bombs(tmp_path)
    assert max(p.stat().st_blocks * 512 for p in bombs.values()) < 5 * MiB  # small on disk
    roots = {name: str(path.parent) for name, path in bombs.items()}
    script = CHILD.format(tests=str(HERE), extra=int(2.5 * GiB))
    out = subprocess.run([sys.executable, "-c", script, json.dumps(roots)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    print({name: f"{seconds:.2f} s: {outcome[-90:]}" for name, (outcome, seconds) in results.items()})
    expected = {
        "zip member 3.9 GB": r"Imagenet64_val.zip:Imagenet64_val/val_data: declares 3,900,000,000 bytes",
        "zip member lying header": r"Imagenet64_val.zip:val_data: not a readable.*(CRC|truncated|MemoryError)",
        "npz header 1.1 TiB": r"val_data.npz:data.npy: header declares uint8 of shape \(98000000, 12288\)",
        "npz 2 GiB": r"val_data.npz:data.npy: declares 2,147,483,776 bytes",
        "npz 2 GiB lying size": r"val_data.npz:data.npy: header declares uint8 of shape \(174763, 12288\)",
        "zipped npz 2 GiB": r"Imagenet64_val_npz.zip:val_data.npz: declares 2,147,483,648 bytes",
        "pickle declares 1 TiB": r"g/val_data: not a readable ImageNet-64 batch \(MemoryError",
        "pickle file 2 GB": r"h/val_data: declares 2,000,000,000 bytes",
    }
    for name, pattern in expected.items():
        outcome, _ = results[name]
        assert outcome.startswith("DataError: ") and re.search(pattern, outcome), (name, outcome)


# ---- ambiguity: a second copy of a batch is an error naming both; a partial train split is said ----

def small_batch(k, n=2):
    data = np.full((n, 12288), k, np.uint8)
    return {"data": data, "labels": [k] * n}


def zip_of(path, members):
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for member, batch in members.items():
            zf.writestr(member, pickle.dumps(batch))


def put(path, batch):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(batch))


@pytest.mark.parametrize("layout, split, names", [
    ("two val_data members in one zip", "val", ["Imagenet64_val.zip:a/val_data", "Imagenet64_val.zip:b/val_data"]),
    ("val_data beside val_data.npz", "val", ["r/val_data", "r/val_data.npz"]),
    ("both val zips", "val", ["Imagenet64_val.zip:val_data", "Imagenet64_val_npz.zip:val_data.npz"]),
    ("a train batch in two folders", "train", ["a/train_data_batch_2", "b/train_data_batch_2"]),
    ("a train batch in two zips", "train", ["part1.zip:train_data_batch_3", "part2.zip:x/train_data_batch_3"]),
])
def test_a_second_copy_is_an_error_naming_both(nb, tmp_path, layout, split, names):
    r = tmp_path / "r"
    if layout == "two val_data members in one zip":
        zip_of(r / "Imagenet64_val.zip", {"a/val_data": small_batch(1), "b/val_data": small_batch(2)})
    elif layout == "val_data beside val_data.npz":
        put(r / "val_data", small_batch(1))
        np.savez(r / "val_data.npz", **small_batch(1))
    elif layout == "both val zips":
        zip_of(r / "Imagenet64_val.zip", {"val_data": small_batch(1)})
        with zipfile.ZipFile(r / "Imagenet64_val_npz.zip", "w") as zf:
            with zf.open("val_data.npz", "w") as f:
                np.savez(f, **small_batch(1))
    elif layout == "a train batch in two folders":
        put(r / "a" / "train_data_batch_2", small_batch(2))
        put(r / "b" / "train_data_batch_2", small_batch(2))
    else:
        zip_of(r / "Imagenet64_train_part1.zip", {"train_data_batch_3": small_batch(3)})
        zip_of(r / "Imagenet64_train_part2.zip", {"x/train_data_batch_3": small_batch(3)})
    with pytest.raises(nb.DataError, match="found 2 times") as info:
        nb.ImageNet64(r, split, cache_dir=tmp_path / "c")
    for name in names:
        assert name.replace("part", "Imagenet64_train_part") in str(info.value) or name in str(info.value)


def test_a_partial_train_split_is_said_once(nb, tmp_path):
    zip_of(tmp_path / "r" / "Imagenet64_train_part1.zip",
           {"train_data_batch_7": small_batch(7, 3), "train_data_batch_3": small_batch(3, 2)})
    with pytest.warns(UserWarning) as record:
        ds = nb.ImageNet64(tmp_path / "r", "train", cache_dir=tmp_path / "c")
    assert len(record) == 1
    assert "found batches [3, 7], missing batches [1, 2, 4, 5, 6, 8, 9, 10]" in str(record[0].message)
    assert ds.labels.tolist() == [2, 2, 6, 6, 6]  # batch order, not the zip's order
    assert ds.images[:, 0, 0, 0].tolist() == [3, 3, 7, 7, 7]
    with warnings.catch_warnings():   # the cells that open the data again (nine in the notebook) say nothing more
        warnings.simplefilter("error")
        assert len(nb.ImageNet64(tmp_path / "r", "train", cache_dir=tmp_path / "c")) == 5


def test_extracted_files_are_preferred_to_their_zip(nb, tmp_path):
    put(tmp_path / "r" / "val_data", small_batch(5))
    (tmp_path / "r" / "Imagenet64_val.zip").write_bytes(b"not even read")
    ds = nb.ImageNet64(tmp_path / "r", "val", cache_dir=tmp_path / "c")
    assert ds.labels.tolist() == [4, 4]


def test_object_arrays_in_pickles_are_refused(nb, tmp_path):
    """An object dtype could make numpy fill a declared shape of billions with None: refused at the dtype."""
    (tmp_path / "r").mkdir()
    batch = {"data": np.array([1, "x"], dtype=object), "labels": [1]}
    (tmp_path / "r" / "val_data").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(nb.DataError, match=r"val_data: not a readable.*object arrays are not allowed"):
        nb.ImageNet64(tmp_path / "r", "val", cache_dir=tmp_path / "c")


def array_call(call, shape, typecode):
    """A batch whose 'data' is one call of a numpy global (REDUCE, or NEWOBJ: `cls.__new__(cls, *args)`)."""
    def item(value):
        return pickle.dumps(value, 2)[2:-1]   # without PROTO and STOP
    if call == "_reconstruct":
        data = b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n" + item(shape) + item(typecode) + b"tR"
    else:
        data = b"cnumpy\nndarray\n(" + item(shape) + item(typecode) + (b"t\x81" if "NEWOBJ" in call else b"tR")
    return b"\x80\x02}(X\x04\x00\x00\x00data" + data + b"X\x06\x00\x00\x00labels]u."


@pytest.mark.parametrize("call, shape, typecode, said", [
    ("numpy.ndarray", (30_000_000,), "O", "object arrays are not allowed"),
    ("numpy.ndarray NEWOBJ", (30_000_000,), "O", "object arrays are not allowed"),
    ("_reconstruct", (30_000_000,), b"O", "object arrays are not allowed"),
    ("numpy.ndarray", (2_000_000_000,), "u1", r"would take 2,000,000,000 bytes, more than the {limit} a source"),
    ("numpy.ndarray NEWOBJ", (200_000, 200_000), "<f8", r"would take 320,000,000,000 bytes"),
])
def test_array_constructors_check_dtype_and_size_before_allocating(nb, tmp_path, call, shape, typecode, said):
    """A 70-byte file could ask numpy.ndarray or _reconstruct for 30 million object slots (or gigabytes of
    pixels) by a typecode, past numpy.dtype's check: refused when the global is called, before allocating."""
    said, path = said.replace("{limit}", f"{nb.MAX_SOURCE_BYTES:,}"), tmp_path / "train_data_batch_1"
    path.write_bytes(array_call(call, shape, typecode))
    assert len(path.read_bytes()) < 150
    tracemalloc.start()
    try:
        with pytest.raises(nb.DataError, match=rf"{path}: not a readable ImageNet-64 batch .*{said}"):
            nb.read_source((path, None))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak:,} bytes allocated"
