"""The last inputs that used to surprise: each is refused as a DataError or CheckpointError naming the file
and the member, field or keys at fault, and a header that declares more than its file holds allocates nothing."""
import pickle
import struct
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch


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
