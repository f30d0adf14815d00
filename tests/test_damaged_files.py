"""Files damaged in ways a fuzzer found (flipped bytes, odd shapes, odd entries, special files): each is refused
with the project's own error naming the file, or skipped with a warning, or rebuilt; none escapes as a raw
TokenError, IndexError, TypeError or RecursionError, none hangs, none is written out empty."""
import dataclasses
import io
import os
import pickle
import re
import signal
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from test_cache_integrity import write_val
from test_train import tiny_cfg

CPU = torch.device("cpu")


def val_root(tmp_path, n=2):
    data = np.arange(n * 12288, dtype=np.int64).reshape(n, 12288).astype(np.uint8)
    write_val(tmp_path / "root", data, list(range(1, n + 1)))
    return tmp_path / "root"


def damage(path, old, new):
    """The first `old` in the file's first 256 bytes replaced by `new`, as long: one byte flipped, say."""
    data = path.read_bytes()
    assert len(old) == len(new) and old in data[:256]
    path.write_bytes(data.replace(old, new, 1))


def test_a_npy_header_that_numpy_cannot_tokenise_is_a_damaged_file(nb, tmp_path):
    """One flipped bracket made numpy's header parser raise tokenize.TokenError, which no reader caught: a cache
    whose labels.npy had it was never rebuilt (every later run stopped), saved features named no file."""
    root = val_root(tmp_path)
    dataset = nb.ImageNet64(root, "val", tmp_path / "cache")
    damage(Path(f"{dataset.prefix}.labels.npy"), b"(2,)", b"(2,(")
    with pytest.warns(UserWarning, match="rejected and rebuilt"):
        rebuilt = nb.ImageNet64(root, "val", tmp_path / "cache")
    assert rebuilt.labels.tolist() == [0, 1]
    nb.save_features(tmp_path / "run", "val", np.zeros((2, 4), np.float32), np.arange(2))
    features = nb.feature_paths(tmp_path / "run", "val")[0]
    damage(features, b"(2, 4)", b"(2, 4(")
    with pytest.raises(nb.DataError, match=rf"{features}: not a readable .npy header \(TokenError"):
        nb.load_features(tmp_path / "run", "val")
    nb.save_features(tmp_path / "run", "val", np.zeros((2, 4), np.float32), np.arange(2))
    data = features.read_bytes()
    end = data.index(b"\n")   # a bytes key (one padding space less): TypeError in numpy's check of the keys
    features.write_bytes(data[:end - 1].replace(b"{'descr'", b"{b'descr'", 1) + data[end:])
    with pytest.raises(nb.DataError, match=rf"{features}: not a readable .npy header \(TypeError"):
        nb.load_features(tmp_path / "run", "val")


@pytest.mark.parametrize("line", ['{"kind": ["step"], "step": 2}', '{"kind": {}, "step": 2}',
                                  "[" * 100_000 + "]" * 100_000], ids=["kind a list", "kind a dict", "nested"])
def test_a_log_line_of_an_odd_kind_or_nested_deep_is_skipped_not_fatal(nb, tmp_path, line):
    """Such a line raised TypeError (an unhashable kind) or RecursionError out of read_log, and so out of every
    resume, until the log was edited by hand."""
    good = '{"kind": "epoch_end", "step": 1, "epoch": 1}'
    log = tmp_path / "log.jsonl"
    log.write_text(f"{good}\n{line}\n")
    with pytest.warns(UserWarning, match=r"log.jsonl, line 2: damaged log line skipped"):
        assert nb.read_log(log) == [{"kind": "epoch_end", "step": 1, "epoch": 1}]
    with pytest.warns(UserWarning):
        assert nb.RunLog(log, resume_step=4).rows == [{"kind": "epoch_end", "step": 1, "epoch": 1}]
    assert (tmp_path / "log-damaged-lines.txt").read_text() == line + "\n"   # kept, not lost


def test_a_checkpoint_pickle_of_millions_of_instructions_is_refused_at_once(nb, tmp_path):
    """The safety pass over a checkpoint's pickle had no bound on its instructions: 15 MiB of one-byte DUP
    instructions took 19 s and 100 MiB before it was refused (a batch file's pass had the bound)."""
    path = tmp_path / "model.pth"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:   # torch.save's layout
        archive.writestr("model/data.pkl", b"\x80\x02]" + b"2" * 4_000_000 + b".")
        archive.writestr("model/byteorder", b"little")
        archive.writestr("model/version", b"3\n")
    with pytest.raises(nb.CheckpointError, match=r"model/data.pkl has more than 100,300 pickle instructions"):
        nb.read_state_dict(str(path))   # refused after 100,300 of its 4 million instructions
    with pytest.raises(nb.ConfigError, match="not a readable checkpoint .*PickleTooLong"):
        nb.make_config("demo", evaluate_file=str(path))


def test_real_checkpoints_stay_well_within_the_instruction_bound(nb, tmp_path):
    trainer = nb.DINOTrainer(tiny_cfg(nb, tmp_path), 16, CPU)
    nb.save_checkpoint(trainer, tmp_path / "last.pth")
    with zipfile.ZipFile(tmp_path / "last.pth") as archive, archive.open(next(
            m for m in archive.namelist() if m.endswith("/data.pkl"))) as f:
        instructions = sum(1 for _ in nb._pickle_ops(f))
        entries = len(archive.namelist())
    assert instructions < nb.CHECKPOINT_OPS_PER_ENTRY * entries / 2, (instructions, entries)
    assert nb.read_state_dict(str(tmp_path / "last.pth"))[1]   # and it loads


@pytest.mark.parametrize("change,said", [
    (lambda s: s.update(register_tokens=torch.zeros(4)), r"register_tokens \(4,\) is not \(\.\.\., width 192\)"),
    (lambda s: s.update({"blocks.0.mlp.fc1.weight": torch.zeros(())}), r"blocks.0.mlp.fc1.weight \(\) is not"),
    (lambda s: s.update({"patch_embed.proj.weight": torch.zeros(192, 3, 0, 0)}), r"patch_embed.proj.weight "
     r"\(192, 3, 0, 0\) is not \(width 192, channels, p, p\)"),
], ids=["registers 1-d", "mlp 0-d", "patch 0 pixels"])
def test_backbone_files_with_shapes_of_odd_dimensions_are_refused_by_name(nb, tmp_path, change, said):
    """These escaped as IndexError or ZeroDivisionError, naming no file."""
    state = nb.build_backbone(nb.make_config("demo", patch_size=16)).state_dict()
    change(state)
    path = tmp_path / "model.pth"
    torch.save(state, path)
    with pytest.raises(nb.CheckpointError, match=rf"checkpoint {path} is no ViT backbone this notebook can build: "
                                                 rf".*{said}"):
        nb.backbone_from_checkpoint(path)


@pytest.mark.parametrize("pos_embed", [torch.zeros(()), torch.zeros(1, 0, 192)], ids=["0-d", "no positions"])
def test_a_pos_embed_of_odd_shape_is_a_mismatch_said_not_a_crash_of_its_hint(nb, tmp_path, pos_embed):
    cfg = nb.make_config("demo", patch_size=16)
    path = tmp_path / "model.pth"
    torch.save({**nb.build_backbone(cfg).state_dict(), "pos_embed": pos_embed}, path)
    with pytest.raises(nb.CheckpointError, match=rf"checkpoint {path} does not fit the VisionTransformer:\n"
                                                 r"mis-shaped keys \(1\): pos_embed"):
        nb.load_dino_checkpoint(nb.build_backbone(cfg), path)


def test_a_key_that_is_no_name_is_refused_when_the_file_is_read(nb, tmp_path):
    """make_config's look at the file's shapes sorted its keys: TypeError for an integer one."""
    path = tmp_path / "model.pth"
    torch.save({**nb.build_backbone(nb.make_config("demo", patch_size=16)).state_dict(), 7: torch.zeros(1)}, path)
    cfg = nb.make_config("demo", patch_size=16, evaluate_file=str(path))
    with pytest.raises(nb.CheckpointError, match=rf"checkpoint {path}: keys must be names"):
        nb.backbone_from_checkpoint(cfg.evaluate_file)


def test_an_init_from_file_that_does_not_fit_is_named(nb, tmp_path):
    """The weights went on as a dict, so the error said 'checkpoint <state dict> does not fit', no file."""
    cfg = nb.make_config("demo", patch_size=16)
    path = tmp_path / "without_final_norm.pth"
    torch.save({k: v for k, v in nb.build_backbone(cfg).state_dict().items() if not k.startswith("norm.")}, path)
    with pytest.raises(nb.CheckpointError, match=rf"checkpoint {path} does not fit the VisionTransformer:\n"
                                                 r"missing keys \(2\): norm.weight, norm.bias"):
        nb.build_models(nb.make_config("demo", patch_size=16, init_from=str(path)), CPU)


@pytest.mark.parametrize("entry, value, problem", [
    ("config", {}, r"its config entry lacks \['arch'"),
    ("data_images", "sixteen", "data_images 'sixteen' is not a number of images"),
    ("data_images", 0, "data_images 0 is not a number of images"),
    ("data_images", None, "data_images None is not a number of images")],
    ids=["config-without-fields", "pool-text", "pool-zero", "pool-none"])
def test_a_damaged_last_checkpoint_falls_back_to_an_intact_one(nb, tmp_path, entry, value, problem):
    """`config: {}` was taken for another architecture (a plain ValueError), and a `data_images` that is no
    count of images for a run on other data (with advice to restore the data): either stopped the resume,
    instead of taking the intact checkpoint beside it, as it did for a config entry removed altogether."""
    cfg = tiny_cfg(nb, tmp_path, epochs=1)
    run = tmp_path / "ck" / cfg.run_name
    run.mkdir(parents=True)
    trainer = nb.DINOTrainer(cfg, 16, CPU)
    nb.save_checkpoint(trainer, run / "epoch_0001.pth")
    torch.save({**nb.trainer_state(trainer), entry: value}, run / "last.pth")
    said = []
    path, _ = nb.resume(nb.DINOTrainer(cfg, 16, CPU), run, said.append)
    assert path.name == "epoch_0001.pth" and len(said) == 1 and "resuming from the newest intact one" in said[0]
    assert re.search(rf"last.pth: {problem}", said[0])


def test_a_checkpoint_claims_its_own_blur_which_fits_crops_the_default_blur_does_not(nb):
    """Its crops are checked against its own blur: against the default one, a run of small local crops
    found its own checkpoints invalid."""
    cfg = nb.make_config("demo", img_size=448, patch_size=8, global_crop_size=448, local_crop_size=8,
                         blur_sigma_224=(0.1, 0.5))
    claimed = nb.claimed_config({"config": dataclasses.asdict(cfg)}, "last.pth")
    assert (claimed.local_crop_size, claimed.blur_sigma_224) == (8, (0.1, 0.5))


@pytest.mark.parametrize("text, problem", [('{"arch": "vit_t', "unreadable run settings"),
                                           ("[" * 100_000 + "]" * 100_000, "unreadable run settings"),
                                           ("[1, 2]", "run settings must be a JSON object, found list")],
                         ids=["cut", "nested", "list"])
def test_damaged_run_settings_are_a_config_error_naming_the_file(nb, tmp_path, text, problem):
    cfg = nb.make_config("demo", checkpoint_dir=str(tmp_path / "ck"))
    (tmp_path / "ck" / "demo").mkdir(parents=True)
    (tmp_path / "ck" / "demo" / "settings.json").write_text(text)
    with pytest.raises(nb.ConfigError, match=rf"demo/settings.json: {problem}"):
        nb.run_directory(cfg)


def test_an_export_folder_whose_listing_nests_too_deep_is_refused_not_a_crash(nb, tmp_path):
    (tmp_path / "features.npy").write_bytes(b"x")
    (tmp_path / "files.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(nb.DataError, match="which no earlier export wrote"):
        nb.check_export_folder(tmp_path)


def test_a_zip_whose_directory_zipfile_cannot_read_is_named(nb, tmp_path):
    """A flipped 'version needed to extract' byte: NotImplementedError out of ImageNet64."""
    root = tmp_path / "root"
    root.mkdir()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("Imagenet64_val/val_data", pickle.dumps({"data": np.zeros((1, 12288), np.uint8),
                                                                   "labels": [1]}))
    blob = bytearray(buffer.getvalue())
    blob[blob.rfind(b"PK\x01\x02") + 6] = 249
    (root / "Imagenet64_val.zip").write_bytes(blob)
    with pytest.raises(nb.DataError, match=r"Imagenet64_val.zip: not a readable zip archive \(NotImplementedError"):
        nb.ImageNet64(root, "val", tmp_path / "cache")


def test_an_export_of_a_teacher_entry_without_a_backbone_writes_nothing(nb, tmp_path):
    """A teacher entry spelt as DistributedDataParallel spells it (`module.`) became a teacher.pth of no tensors,
    and the run was then taken for finished."""
    trainer = nb.DINOTrainer(tiny_cfg(nb, tmp_path, epochs=1), 16, CPU)
    state = nb.trainer_state(trainer)
    teacher = state["teacher"]
    for damaged in ({"module." + k: v for k, v in teacher.items()},                       # both keys gone
                    {k: v for k, v in teacher.items() if k != "backbone.patch_embed.proj.weight"},   # one
                    {k: v for k, v in teacher.items() if k != "backbone.pos_embed"}):                # the other
        torch.save({**state, "teacher": damaged}, tmp_path / "last.pth")
        with pytest.raises(nb.CheckpointError, match=r"last.pth: its teacher entry holds no backbone"):
            nb.export_teacher_backbone(tmp_path / "last.pth", tmp_path / "teacher.pth")
        assert not (tmp_path / "teacher.pth").exists()


def test_a_fifo_at_a_cache_files_name_is_refused_not_waited_on(nb, tmp_path):
    """Opening it waited for a writer for ever."""
    root = val_root(tmp_path)
    metadata = Path(f"{nb.ImageNet64(root, 'val', tmp_path / 'cache').prefix}.json")
    metadata.unlink()
    os.mkfifo(metadata)

    def still_blocked(*_):
        raise TimeoutError("still waiting in open() after 20 s")
    previous = signal.signal(signal.SIGALRM, still_blocked)
    signal.alarm(20)
    try:
        with pytest.warns(UserWarning, match=r"\.json: unreadable metadata .*not a regular file"):
            rebuilt = nb.ImageNet64(root, "val", tmp_path / "cache")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert rebuilt.labels.tolist() == [0, 1] and metadata.is_file()
