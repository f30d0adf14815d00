"""Disk space is checked before a cache build or a checkpoint write that cannot fit: refused up front with both
sizes said, nothing read or written, the previous files as they were."""
import collections
import errno
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from test_train import tiny_cfg

Usage = collections.namedtuple("Usage", "total used free")


def disk_with(monkeypatch, nb, free):
    monkeypatch.setattr(nb.shutil, "disk_usage", lambda path: Usage(1 << 40, (1 << 40) - free, free))


def leftovers(folder):
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def test_a_cache_that_cannot_fit_is_refused_before_anything_is_read(nb, tmp_path, monkeypatch):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "val_data").write_bytes(pickle.dumps({"data": np.zeros((80, 12288), np.uint8),
                                                            "labels": [1] * 80}))
    disk_with(monkeypatch, nb, free=512 << 10)
    monkeypatch.setattr(nb, "read_source", lambda source: pytest.fail("a source was read"))
    with pytest.raises(OSError, match=r"not writing .*/c/val-\w+\.u8: it needs about 0\.9 MiB, but .*/c has "
                                      r"0\.5 MiB free") as info:
        nb.ImageNet64(tmp_path / "r", "val", cache_dir=tmp_path / "c")
    assert info.value.errno == errno.ENOSPC and leftovers(tmp_path / "c") == []
    monkeypatch.undo()
    assert len(nb.ImageNet64(tmp_path / "r", "val", cache_dir=tmp_path / "c")) == 80   # with room, it builds


def test_a_folder_cache_that_cannot_fit_is_refused(nb, tmp_path, monkeypatch):
    for k in range(6):
        folder = tmp_path / "photos" / f"class{k % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((40, 40, 3), 40 * k, np.uint8)).save(folder / f"{k}.png")
    disk_with(monkeypatch, nb, free=1000)
    with pytest.raises(OSError, match=r"train-\w+-64px\.u8: it needs about 0\.\d MiB, but .* 0\.0 MiB free"):
        nb.ImageFolder(tmp_path / "photos", "train", 64, val_fraction=0.4, cache_dir=tmp_path / "c", workers=1)
    assert leftovers(tmp_path / "c") == []


def test_a_checkpoint_that_cannot_fit_is_refused_and_the_previous_one_kept(nb, tmp_path, monkeypatch):
    trainer = nb.DINOTrainer(tiny_cfg(nb, tmp_path), 16, torch.device("cpu"), 0, 1)
    last = nb.save_checkpoint(trainer, tmp_path / "run" / "last.pth")
    before = last.read_bytes()
    needed = nb.tensor_bytes(nb.trainer_state(trainer))
    assert 0.9 * len(before) < needed < len(before)   # the estimate: the tensors, less torch.save's framing
    trainer.step = 1
    disk_with(monkeypatch, nb, free=needed - 1)
    with pytest.raises(OSError, match=rf"not writing {last}: it needs about {needed / 2**20:,.1f} MiB") as info:
        nb.save_checkpoint(trainer, last)
    assert info.value.errno == errno.ENOSPC
    assert last.read_bytes() == before and leftovers(tmp_path / "run") == ["last.pth"]
    disk_with(monkeypatch, nb, free=1000)
    with pytest.raises(OSError, match=r"not writing .*teacher\.pth: it needs about .* 0\.0 MiB free"):
        nb.export_teacher_backbone(last, tmp_path / "run" / "teacher.pth")
    assert leftovers(tmp_path / "run") == ["last.pth"]


def test_a_folder_that_cannot_be_written_is_said_of_the_file_meant_not_of_a_temp_file(nb, tmp_path, monkeypatch):
    """A read-only figures/ or checkpoints/ gave a bare PermissionError naming `.last.pth.<random>.tmp` and no
    setting; a run's lock, one naming the folder and no setting. (As root, chmod blocks nothing: a file where
    the folder should be, and a temp file refused, stand for it.)"""
    blocker = tmp_path / "figures"
    blocker.write_text("a file where the folder should be")
    meant = blocker / "run" / "a.jpg"
    with pytest.raises(NotADirectoryError, match=rf"could not write {meant}: Not a directory \({blocker / 'run'}\); set "
                                                 r"the folder it goes to \(checkpoint_dir, cache_dir, figure_dir, "
                                                 r"embedded_dir\) to one you can write"):
        nb.atomic_write(meant, lambda f: f.write(b"x"))
    with pytest.raises(NotADirectoryError, match=rf"cannot train in {blocker / 'run'}: Not a directory .*; set "
                                                 r"checkpoint_dir to a folder you can write"):
        with nb.run_lock(blocker / "run"):
            pass

    def read_only(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path.with_name(f".{path.name}.0123.tmp")))
    monkeypatch.setattr(nb, "exclusive_temp_file", read_only)
    (tmp_path / "ro").mkdir()
    with pytest.raises(PermissionError, match=rf"could not write {tmp_path / 'ro' / 'last.pth'}: Permission denied"):
        nb.atomic_write(tmp_path / "ro" / "last.pth", lambda f: f.write(b"x"))
    assert leftovers(tmp_path / "ro") == []
