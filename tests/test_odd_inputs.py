"""The last inputs that used to surprise: each is refused as a DataError or CheckpointError naming the file
and the member, field or keys at fault, and a header that declares more than its file holds allocates nothing."""
import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import textwrap
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from test_train import tiny_cfg


def batch_bytes(labels=(1, 2)):
    return pickle.dumps({"data": np.zeros((len(labels), 12288), np.uint8), "labels": list(labels)})


def directory_entry(name):
    """A zip entry whose name has no trailing '/' but whose Unix mode and DOS attributes mark a folder."""
    info = zipfile.ZipInfo(name)
    info.external_attr = (0o40755 << 16) | 0x10
    return info


def patch_headers(blob, local_offset, central_offset, value, size="<H"):
    """Write `value` at the given offsets of the first local header and the first central directory entry."""
    blob = bytearray(blob)
    struct.pack_into(size, blob, blob.index(b"PK\x03\x04") + local_offset, value)
    struct.pack_into(size, blob, blob.index(b"PK\x01\x02") + central_offset, value)
    return bytes(blob)


def end_record_points_past_the_end(blob):
    blob = bytearray(blob)
    struct.pack_into("<I", blob, blob.rindex(b"PK\x05\x06") + 16, len(blob) + 1000)
    return bytes(blob)


def zip_with(path, entries):
    with zipfile.ZipFile(path, "w") as zf:
        for entry, data in entries:
            zf.writestr(entry, data)


ZIPS = {  # name: (entries, how the archive's bytes are then damaged, member named, what is said)
    "a directory named like the batch": ([("Imagenet64_val/val_data/", b"")], None,
                                         "Imagenet64_val/val_data/", "a directory in the zip archive"),
    "a directory by its attributes": ([(directory_entry("val_data"), b"")], None, "val_data", "a directory"),
    "an unknown compression method": ([("val_data", batch_bytes())], lambda b: patch_headers(b, 8, 10, 99),
                                      "val_data", "compression method 99 cannot be read"),
    "an encrypted member": ([("val_data", batch_bytes())], lambda b: patch_headers(b, 6, 8, 1), "val_data",
                            "encrypted"),
    "a central directory past the end": ([("val_data", batch_bytes())], end_record_points_past_the_end, "val_data",
                                         "outside the archive"),
}


@pytest.mark.parametrize("case", ZIPS)
def test_odd_zip_members_are_refused_by_name(nb, tmp_path, case):
    entries, damage, member, said = ZIPS[case]
    archive = tmp_path / "r" / "Imagenet64_val.zip"
    archive.parent.mkdir()
    zip_with(archive, entries)
    if damage:
        archive.write_bytes(damage(archive.read_bytes()))
    with pytest.raises(nb.DataError) as info:
        nb.ImageNet64(tmp_path / "r", "val", cache_dir=tmp_path / "c")
    assert f"{archive}:{member}: " in str(info.value) and said in str(info.value), str(info.value)
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").glob("*.json"))   # nothing half-built


def test_a_directory_inside_an_npz_is_refused_by_name(nb, tmp_path):
    (tmp_path / "r").mkdir()
    with zipfile.ZipFile(tmp_path / "r" / "val_data.npz", "w") as npz:
        with npz.open("data.npy", "w") as f:
            np.save(f, np.zeros((2, 12288), np.uint8))
        npz.writestr(directory_entry("labels.npy"), b"")
    with pytest.raises(nb.DataError, match=r"val_data.npz:labels.npy: a directory in the zip archive"):
        nb.ImageNet64(tmp_path / "r", "val", cache_dir=tmp_path / "c")


@pytest.mark.parametrize("labels, said", [
    (["a", "b"], r"must be integers in 1\.\.1000, got <U1, e\.g\. \['a', 'b'\]"),
    ([None, None], r"must be integers in 1\.\.1000, got object, e\.g\. \[None, None\]"),
    ([1, "x"], r"must be integers in 1\.\.1000, got <U21"),
    ([1, None], r"must be integers in 1\.\.1000, got object, e\.g\. \[1, None\]"),
    ([1, [2, 3]], r"is not an array \(setting an array element with a sequence"),
])
def test_labels_that_are_not_integers_name_the_file(nb, tmp_path, labels, said):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "val_data").write_bytes(batch_bytes(labels))
    with pytest.raises(nb.DataError, match=rf"r/val_data: 'labels' {said}"):
        nb.ImageNet64(tmp_path / "r", "val", cache_dir=tmp_path / "c")


@pytest.fixture(scope="module")
def backbone_state(nb):
    return nb.vit_tiny(patch_size=16).state_dict()


@pytest.mark.parametrize("layout", ["plain", "teacher"])
@pytest.mark.parametrize("keys, said", [
    ("integers", r"keys must be names \(strings\); 150 are not, e\.g\. 0 \(int\)"),
    ("mixed", r"keys must be names \(strings\); 1 are not, e\.g\. 7 \(int\)"),
    ("colliding", r"keys 'pos_embed' and 'module\.pos_embed' are one entry in our spelling"),
    ("colliding weight norm", r"keys '.*weight_g' and '.*parametrizations\.weight\.original0' are one entry"),
])
def test_checkpoint_keys_that_are_not_names_or_collide_are_refused(nb, tmp_path, backbone_state, layout, keys, said):
    state = dict(backbone_state)
    if keys == "integers":
        state = dict(enumerate(state.values()))
    elif keys == "mixed":
        state[7] = torch.zeros(1)
    elif keys == "colliding":
        state["module.pos_embed"] = state["pos_embed"] + 1   # one of the two would be dropped, silently
    else:
        state = {"head.last_layer.weight_g": torch.ones(4, 1), "head.last_layer.parametrizations.weight.original0":
                 torch.zeros(4, 1)}
    path = tmp_path / "odd.pth"
    torch.save(state if layout == "plain" else {"teacher": state, "student": state}, path)
    for load in (lambda: nb.load_dino_checkpoint(nb.vit_tiny(patch_size=16), path),
                 lambda: nb.backbone_from_checkpoint(path)):
        with pytest.raises(nb.CheckpointError, match=rf"checkpoint {path}: {said}"):
            load()


def test_an_encrypted_checkpoint_member_is_refused(nb, tmp_path, backbone_state):
    path = tmp_path / "locked.pth"
    torch.save(backbone_state, path)
    path.write_bytes(patch_headers(path.read_bytes(), 6, 8, 1))
    with pytest.raises(nb.CheckpointError, match=r"locked.pth: compressed or encrypted members \['locked/data.pkl'\]"):
        nb.load_weights_file(path)


def test_exported_features_are_checked_against_their_labels(nb, tmp_path):
    features_path, labels_path = nb.save_features(tmp_path, "val", torch.zeros(5, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(nb.DataError, match=rf"{labels_path}: 4 labels for the 5 features of {features_path}"):
        nb.load_features(tmp_path, "val")
    np.save(features_path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(nb.DataError, match=rf"{features_path}: holds object of shape \(1,\), expected float32"):
        nb.load_features(tmp_path, "val")
    np.save(features_path, np.zeros((4, 3), np.float32))
    features, labels = nb.load_features(tmp_path, "val")
    assert features.shape == (4, 3) and labels.dtype == torch.int64


def npy_header(shape, descr):
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header


def test_a_header_that_declares_a_gigabyte_allocates_nothing_before_it_is_refused(nb, tmp_path):
    (tmp_path / "r").mkdir()
    with zipfile.ZipFile(tmp_path / "r" / "val_data.npz", "w") as npz:   # within the size limit, but a lie
        npz.writestr("data.npy", npy_header((87_381, 12288), "|u1") + bytes(1000))
        npz.writestr("labels.npy", npy_header((87_381,), "<i8"))
    tracemalloc.start()
    try:
        with pytest.raises(nb.DataError, match=r"val_data.npz:data.npy: truncated \(1,000 of 1,073,737,728 bytes\)"):
            nb.ImageNet64(tmp_path / "r", "val", cache_dir=tmp_path / "c")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak:,} bytes allocated"


DEEP_CHILD = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    from nbloader import load_notebook
    nb = load_notebook()
    found = {{}}
    for case, load in (("val_data", lambda: nb.read_source((sys.argv[1] + "/val_data", None))),
                       ("zip member", lambda: nb.read_source((sys.argv[1] + "/Imagenet64_val.zip", "val_data"))),
                       ("checkpoint", lambda: nb.load_weights_file(sys.argv[1] + "/deep.pth", max_bytes=10**8))):
        try:
            load()
            found[case] = "loaded"
        except Exception as e:
            found[case] = f"{{type(e).__name__}}: {{e}}"
        print(case, "done", flush=True)
    print(json.dumps(found))
""")


def test_deeply_nested_pickles_are_refused_before_they_crash_python(tmp_path):
    """200,000 tuples in tuples as a dict key: hashing it recurses in C past the stack (a segfault, no global
    needed); the opcodes are read first and the file is refused by name. In a child process: the crash it was."""
    deep = b"\x80\x02}" + b")" + b"\x85" * 200_000 + b"K\x01s."
    (tmp_path / "val_data").write_bytes(deep)
    zip_with(tmp_path / "Imagenet64_val.zip", [(zipfile.ZipInfo("val_data"), deep)])
    torch.save({"w": torch.zeros(2)}, tmp_path / "plain.pth")
    with zipfile.ZipFile(tmp_path / "plain.pth") as src, zipfile.ZipFile(tmp_path / "deep.pth", "w") as out:
        for info in src.infolist():   # torch.save's archive with its data.pkl replaced, stored as torch stores it
            out.writestr(info, deep if info.filename.endswith("/data.pkl") else src.read(info))
    script = DEEP_CHILD.format(tests=str(Path(__file__).resolve().parent))
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, f"exit {out.returncode} after {out.stdout.split()[-2:]}: {out.stderr[-2000:]}"
    found = json.loads(out.stdout.strip().splitlines()[-1])
    nested = r"builds containers nested 101 deep, more than the 100 allowed"
    assert re.fullmatch(rf"DataError: {tmp_path}/val_data: {nested}.*", found["val_data"]), found
    assert re.fullmatch(rf"DataError: {tmp_path}/Imagenet64_val.zip:val_data: {nested}.*", found["zip member"]), found
    assert re.fullmatch(rf"CheckpointError: checkpoint {tmp_path}/deep.pth .*plain/data.pkl {nested}.*",
                        found["checkpoint"]), found


def test_real_files_nest_far_below_the_limit(nb, tmp_path):
    """The margin: a batch in every protocol and the official Python 2 layout nest 5 deep, torch.save's
    checkpoints of this notebook 5 (a backbone) and 8 (a training checkpoint, optimizer and config included)."""
    from test_sources import python2_batch_pickle
    batch = {"data": np.zeros((2, 12288), np.uint8), "labels": [1, 2], "mean": np.zeros(12288)}
    blobs = [pickle.dumps(batch, protocol) for protocol in (2, 3, 4, 5)] + [python2_batch_pickle(batch)]
    assert [nb.pickle_depth(io.BytesIO(blob)) for blob in blobs] == [5] * 5
    demo = Path(__file__).resolve().parent.parent / "checkpoints" / "demo_vit_tiny8.pth"
    assert nb.archive_pickle_depth(demo) == 5
    trainer = nb.DINOTrainer(tiny_cfg(nb, tmp_path), 16, torch.device("cpu"))
    for parameter in trainer.student.parameters():   # one AdamW step fills the optimizer's state, as training does
        parameter.grad = torch.zeros_like(parameter)
    trainer.optimizer.step()
    torch.save(nb.trainer_state(trainer), tmp_path / "last.pth")
    assert nb.archive_pickle_depth(tmp_path / "last.pth") == 8
