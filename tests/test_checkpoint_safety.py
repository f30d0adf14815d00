"""Checkpoints are read as untrusted files and written so that nothing can redirect or half-finish them:
damaged files are named and the run falls back to its newest intact checkpoint, failed writes keep the
previous file, planted links are never followed, and a resume checks everything it restores."""
import copy
import dataclasses
import io
import json
import os
import pickle
import random
import re
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from test_train import Data, tiny_cfg

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def run(nb, tmp_path_factory):
    """A run of 3 steps with a checkpoint after each: last.pth at step 3, last.prev.pth at step 2."""
    tmp = tmp_path_factory.mktemp("run")
    cfg = tiny_cfg(nb, tmp, checkpoint_every_steps=1)
    nb.train_dino(cfg, Data(), Data(), CPU, max_steps=3, progress=False)
    run_dir = tmp / "ck" / cfg.run_name
    return cfg, run_dir, {p.name: p.read_bytes() for p in run_dir.glob("*.pth")}


def fresh_copy(run, tmp_path, last=None):
    """The run's files in a new folder; `last` replaces last.pth's bytes. Returns (cfg, run_dir)."""
    cfg, _, files = run
    run_dir = tmp_path / "ck" / cfg.run_name
    run_dir.mkdir(parents=True)
    for name, data in files.items():
        (run_dir / name).write_bytes(data)
    if last is not None:
        (run_dir / "last.pth").write_bytes(last)
    return tiny_cfg_like(cfg, tmp_path), run_dir


def tiny_cfg_like(cfg, tmp_path):
    return dataclasses.replace(cfg, checkpoint_dir=str(tmp_path / "ck"))


def edited(run, change):
    """last.pth's state after change(state), as bytes."""
    state = torch.load(io.BytesIO(run[2]["last.pth"]), weights_only=True)
    change(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def test_damaged_last_pth_is_named_and_the_run_resumes_from_the_previous_one(nb, run, tmp_path, capsys):
    assert set(run[2]) == {"last.pth", "last.prev.pth"}
    cfg, run_dir = fresh_copy(run, tmp_path, last=run[2]["last.pth"][: len(run[2]["last.pth"]) // 2])
    t = nb.DINOTrainer(cfg, 16, CPU)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # said once, by `say` (under torchrun rank 0's), not also warned by every rank
        path, _ = nb.resume(t, run_dir, print)
    assert path == run_dir / "last.prev.pth" and t.step == 2
    out = capsys.readouterr().out
    assert out.count(f"{run_dir / 'last.pth'} is damaged") == 1 and "last.prev.pth (step 2)" in out


def test_a_flipped_byte_is_caught_by_the_crc(nb, run, tmp_path):
    data = bytearray(run[2]["last.pth"])
    data[len(data) // 2] ^= 0x10
    cfg, run_dir = fresh_copy(run, tmp_path, last=bytes(data))
    with pytest.raises(nb.CheckpointError, match=r"last.pth is damaged"):
        nb.load_checkpoint(nb.DINOTrainer(cfg, 16, CPU), run_dir / "last.pth")


def test_no_intact_checkpoint_says_how_to_start_fresh(nb, run, tmp_path):
    cfg, run_dir = fresh_copy(run, tmp_path, last=b"garbage")
    (run_dir / "last.prev.pth").write_bytes(b"")
    with pytest.raises(nb.CheckpointError, match=r"(?s)no intact checkpoint.*last.pth.*last.prev.pth.*"
                                                 r"delete or rename .*choose another run_name"):
        nb.train_dino(cfg, Data(), Data(), CPU, progress=False)
    assert (run_dir / "last.pth").read_bytes() == b"garbage"   # nothing was overwritten


BAD_STATES = [
    (lambda s: s.update(step=-3), r"step -3 is outside this run's schedule \(0..8\)"),
    (lambda s: s.update(step=10**12), r"step 1000000000000 is outside"),
    (lambda s: s.update(step=3.0), r"step 3.0 is outside"),
    (lambda s: s.pop("config"), r"has no 'config' entry"),
    (lambda s: s["teacher"].update({"backbone.norm.weight": s["teacher"]["backbone.norm.weight"].to(torch.int8)}),
     r"\(teacher\): backbone.norm.weight has dtype torch.int8, expected torch.float32"),
    (lambda s: s["student"].update({"backbone.cls_token": s["student"]["backbone.cls_token"] > 0}),
     r"\(student\): backbone.cls_token has dtype torch.bool"),
    (lambda s: s["student"]["backbone.pos_embed"].fill_(float("nan")), r"backbone.pos_embed holds non-finite"),
    (lambda s: s["loss"]["center"].fill_(float("inf")), r"\(loss\): center holds non-finite"),
    (lambda s: next(iter(s["optimizer"]["state"].values()))["exp_avg"].fill_(float("nan")), r"optimizer.*non-finite"),
    (lambda s: s["student"].pop("backbone.norm.bias"), r"student entry does not hold this model's keys"),
]


@pytest.fixture(scope="module")
def trainer(nb, run):
    return nb.DINOTrainer(run[0], 16, CPU)


@pytest.mark.parametrize("change,message", BAD_STATES)
def test_resume_refuses_what_does_not_fit(nb, run, tmp_path, trainer, change, message):
    _, run_dir = fresh_copy(run, tmp_path, last=edited(run, change))
    before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    with pytest.raises(nb.CheckpointError, match=message) as error:
        nb.load_checkpoint(trainer, run_dir / "last.pth")
    assert str(run_dir / "last.pth") in str(error.value)
    assert all(torch.equal(v, trainer.student.state_dict()[k]) for k, v in before.items())   # nothing restored


@pytest.mark.parametrize("change,message", [BAD_STATES[1], BAD_STATES[6]])
def test_an_invalid_last_pth_falls_back_to_the_previous_one(nb, run, tmp_path, trainer, change, message):
    _, run_dir = fresh_copy(run, tmp_path, last=edited(run, change))
    said = []
    assert nb.resume(trainer, run_dir, said.append)[0] == run_dir / "last.prev.pth"
    assert trainer.step == 2 and len(said) == 1 and re.search(message, said[0])


def test_another_architecture_is_refused_not_skipped(nb, run, tmp_path):
    """Refused at the newest checkpoint, with no word that it is damaged and no look at the older ones."""
    cfg, run_dir = fresh_copy(run, tmp_path)
    said = []   # a skipped checkpoint is said
    with pytest.raises(nb.ConfigError, match=r"^\S*/last.pth: checkpoint does not match the config \(out_dim: "
                                             r"checkpoint 64 vs config 32\)"):
        nb.resume(nb.DINOTrainer(dataclasses.replace(cfg, out_dim=32), 16, CPU), run_dir, said.append)
    assert said == []


def first_moments(state):
    """AdamW's state of the first parameter that has one (the class token): step, exp_avg, exp_avg_sq."""
    return state["optimizer"]["state"][min(state["optimizer"]["state"])]


def set_moment(key, make):
    return lambda s: first_moments(s).update({key: make(first_moments(s)[key])})


def group(index, **changes):
    return lambda s: s["optimizer"]["param_groups"][index].update(changes)


def whole_state(nb, trainer):
    """Everything a resume may change, copied: the trainer's state (with the global random states) and step."""
    return copy.deepcopy(nb.trainer_state(trainer)), random.getstate(), trainer.step


def unchanged(nb, trainer, before):
    state, python, step = whole_state(nb, trainer)
    return (nb.largest_difference(before[0], state) == 0.0 and before[0]["scaler"] == state["scaler"]
            and python == before[1] and step == before[2])


# What the fused AdamW step would write through or past (a 0-dim or stride-0 moment: heap corruption), or
# would cast (float64) or stumble on (an extra moment), each refused by name with its shape or strides
BAD_MOMENTS = [
    (set_moment("exp_avg", lambda m: torch.zeros(())), r"parameter 0\): exp_avg has shape \(\) \(strides \(\)\), "
                                                       r"its parameter has shape \(1, 1, 192\)"),
    (set_moment("exp_avg_sq", lambda m: torch.zeros(1).expand(m.shape)),
     r"parameter 0\): exp_avg_sq is not contiguous \(shape \(1, 1, 192\), strides \(0, 0, 0\)\)"),
    (set_moment("exp_avg", lambda m: m.double()), r"parameter 0\): exp_avg has dtype torch.float64, expected "
                                                  r"torch.float32"),
    (set_moment("exp_avg", lambda m: m.reshape(192, 1, 1)), r"exp_avg has shape \(192, 1, 1\)"),
    (lambda s: first_moments(s).update(max_exp_avg_sq=torch.zeros(1, 1, 192)),
     r"holds \['exp_avg', 'exp_avg_sq', 'max_exp_avg_sq', 'step'\], AdamW keeps"),
    (set_moment("step", lambda m: torch.tensor(7.0)), r"AdamW's step 7.0 is not a count of 0..3 steps"),
    (set_moment("exp_avg_sq", lambda m: -m - 1), r"exp_avg_sq holds negative values"),
]


def refused_leaving_the_trainer_as_it_was(nb, run, tmp_path, trainer, change, message):
    """last.pth after `change` is refused with `message`, naming the file, and the trainer is unchanged:
    models, optimizer, centre, augmentation, random states, step."""
    _, run_dir = fresh_copy(run, tmp_path, last=edited(run, change))
    before = whole_state(nb, trainer)
    with pytest.raises(nb.CheckpointError, match=message) as error:
        nb.load_checkpoint(trainer, run_dir / "last.pth")
    assert str(run_dir / "last.pth") in str(error.value)
    assert unchanged(nb, trainer, before)


@pytest.mark.parametrize("change,message", BAD_MOMENTS)
def test_a_moment_the_fused_step_cannot_use_is_refused(nb, run, tmp_path, trainer, change, message):
    refused_leaving_the_trainer_as_it_was(nb, run, tmp_path, trainer, change, message)


def test_a_stride_0_moment_falls_back_and_training_goes_on(nb, run, tmp_path):
    cfg, run_dir = fresh_copy(run, tmp_path, last=edited(run, BAD_MOMENTS[1][0]))
    t = nb.DINOTrainer(cfg, 16, CPU)
    said = []
    assert nb.resume(t, run_dir, said.append)[0] == run_dir / "last.prev.pth"
    assert t.step == 2 and len(said) == 1 and re.search(BAD_MOMENTS[1][1], said[0])
    nb.train_step(t, torch.from_numpy(Data().images[:4]))
    assert t.step == 3


def numpy_keys_as_list(s):
    name, keys, *rest = s["rng"]["numpy"]
    s["rng"]["numpy"] = (name, keys.tolist(), *rest)


def swap_in(entry, make):
    """Replace the first tensor of state[entry] by make(it)."""
    return lambda s: s[entry].update({(key := next(iter(s[entry]))): make(s[entry][key])})


# Parts restored after the models: each checked before anything is loaded, refused by name
BAD_PARTS = [
    (numpy_keys_as_list, r"rng: the NumPy state does not fit \(TypeError: its key is not a tensor"),
    (lambda s: s["rng"].update(python=(3, (1, 2), None)), r"rng: the Python state does not fit \(ValueError"),
    (lambda s: s["rng"].update(torch=s["rng"]["torch"][:100]), r"rng: the PyTorch state does not fit a generator"),
    (lambda s: s["rng"].update(cuda=[5]), r"rng: the CUDA \(GPU 0\) state is a int, not a 1-D uint8 tensor"),
    (lambda s: s.update(augment={"generator": 5}), r"augment is a int, not a 1-D uint8 tensor"),
    (lambda s: s.update(augment={"generator": s["augment"]["generator"][:-1]}), r"augment does not fit a generator"),
    (lambda s: s.update(augment={}), r"augment is not a dict of the generator's state"),
    (lambda s: s.update(scaler={"scale": 1.0}), r"scaler is not GradScaler's state"),
    (lambda s: s.pop("rng"), r"has no \['rng'\] entries"),
    (swap_in("student", lambda t: torch.empty(t.shape, device="meta")),
     r"\(student\): backbone.cls_token is a meta tensor, with no data"),
    (swap_in("teacher", lambda t: t.to_sparse()), r"\(teacher\): backbone.cls_token is a torch.sparse_coo tensor"),
]


@pytest.mark.parametrize("change,message", BAD_PARTS)
def test_every_part_is_checked_before_anything_is_restored(nb, run, tmp_path, trainer, change, message):
    refused_leaving_the_trainer_as_it_was(nb, run, tmp_path, trainer, change, message)


@pytest.mark.parametrize("change,message", [BAD_PARTS[0], BAD_PARTS[4], BAD_PARTS[9]])
def test_a_bad_part_falls_back_to_the_previous_checkpoint(nb, run, tmp_path, change, message):
    cfg, run_dir = fresh_copy(run, tmp_path, last=edited(run, change))
    t = nb.DINOTrainer(cfg, 16, CPU)
    said = []
    assert nb.resume(t, run_dir, said.append)[0] == run_dir / "last.prev.pth"
    assert t.step == 2 and len(said) == 1 and re.search(message, said[0])


def permuted_params(s):
    params = s["optimizer"]["param_groups"][0]["params"]
    params[0], params[1] = params[1], params[0]


# AdamW's hyperparameters: gradient ascent, a NaN beta, a moment AdamW would then look for, other parameters
BAD_GROUPS = [
    (group(0, maximize=True), r"optimizer group 0 has maximize=True, this trainer's AdamW maximize=False"),
    (group(1, betas=(float("nan"), 0.999)), r"optimizer group 1 has betas=\(nan, 0.999\), this trainer's AdamW "
                                            r"betas=\(0.9, 0.999\)"),
    (group(0, amsgrad=True), r"optimizer group 0 has amsgrad=True, this trainer's AdamW amsgrad=False"),
    (group(0, eps=1), r"optimizer group 0 has eps=1, this trainer's AdamW eps=1e-08"),
    (group(1, fused=None), r"optimizer group 1 has fused=None, this trainer's AdamW fused=True"),
    (lambda s: s["optimizer"]["param_groups"][0].pop("params"), r"optimizer group 0 is a dict without params"),
    (permuted_params, r"optimizer group 0 has params=\[1, 0, 2, 3, 4, 5, \.\.\.\], this trainer's AdamW "
                      r"params=\[0, 1, 2, 3, 4, 5, \.\.\.\]"),
    (lambda s: s["optimizer"]["param_groups"].pop(), r"1 optimizer parameter groups, this trainer's AdamW has 2"),
]


@pytest.mark.parametrize("change,message", BAD_GROUPS)
def test_optimizer_hyperparameters_must_be_this_trainers(nb, run, tmp_path, trainer, change, message):
    refused_leaving_the_trainer_as_it_was(nb, run, tmp_path, trainer, change, message)


def test_a_group_key_of_another_torch_version_is_left_to_this_one(nb, run, tmp_path):
    """A file from an older torch, without decoupled_weight_decay, or with a key this torch lacks, still
    resumes, with this torch's groups; a key both hold must still agree."""
    def other_torch(s):
        for saved in s["optimizer"]["param_groups"]:
            saved.pop("decoupled_weight_decay")
            saved["an_older_key"] = 1
    cfg, run_dir = fresh_copy(run, tmp_path, last=edited(run, other_torch))
    t = nb.DINOTrainer(cfg, 16, CPU)
    fresh_groups = t.optimizer.state_dict()["param_groups"]
    nb.load_checkpoint(t, run_dir / "last.pth")
    assert t.step == 3 and t.optimizer.state_dict()["param_groups"] == fresh_groups
    assert all(g["decoupled_weight_decay"] is True and "an_older_key" not in g for g in t.optimizer.param_groups)


def test_the_per_step_settings_stay_the_trainers(nb, run, tmp_path):
    """lr and weight decay come from the schedules at every step: the file's are neither checked nor loaded."""
    cfg, run_dir = fresh_copy(run, tmp_path, last=edited(run, group(0, lr=torch.tensor(123.0), weight_decay=7.0)))
    t = nb.DINOTrainer(cfg, 16, CPU)
    nb.load_checkpoint(t, run_dir / "last.pth")
    assert t.step == 3 and all(float(g["lr"]) == 0.0 and g["weight_decay"] == 0.0 for g in t.optimizer.param_groups)


def test_a_scalers_state_is_checked_against_this_trainers_scaler(nb, tmp_path):
    scaler = torch.amp.GradScaler("cpu")
    good = scaler.state_dict()
    nb.check_scaler_state(good, scaler, "x.pth")
    nb.check_scaler_state({}, scaler, "x.pth")   # a run without float16: the scaler starts fresh
    for change, message in [(dict(growth_factor=3.0), r"x.pth: scaler has growth_factor=3.0, this trainer's "
                                                      r"GradScaler growth_factor=2.0"),
                            (dict(scale=float("nan")), r"scale nan"), (dict(_growth_tracker=2000), r"tracker 2000"),
                            (dict(scale=-1.0), r"scale -1.0")]:
        with pytest.raises(nb.CheckpointError, match=message):
            nb.check_scaler_state({**good, **change}, scaler, "x.pth")
    nb.check_scaler_state({**good, "growth_factor": 3.0}, torch.amp.GradScaler("cpu", enabled=False), "x.pth")


def test_size_bound_comes_from_the_architecture(nb, run, tmp_path):
    cfg = run[0]
    student, _ = nb.build_models(cfg, CPU)
    numbers = sum(v.numel() for v in student.state_dict().values())
    assert nb.architecture_size(cfg) == numbers
    assert nb.training_checkpoint_bound(cfg) == 16 * numbers + 64 * 2**20
    assert len(run[2]["last.pth"]) < nb.training_checkpoint_bound(cfg)


def test_a_small_file_that_inflates_is_refused_before_loading(nb, run, tmp_path):
    bomb = tmp_path / "last.pth"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data/0", bytes(2**20))
    data = bytearray(bomb.read_bytes())   # the directory now says: 1 GiB once inflated
    directory = data.rindex(b"PK\x01\x02")
    data[directory + 24:directory + 28] = (2**30).to_bytes(4, "little")
    bomb.write_bytes(bytes(data))
    assert bomb.stat().st_size < 2**20
    bound = nb.training_checkpoint_bound(run[0])
    with pytest.raises(nb.CheckpointError, match=rf"last.pth declares 1,073,741,824 bytes, more than the {bound:,}"):
        nb.load_weights_file(bomb, bound)
    small = tmp_path / "small.pth"
    with zipfile.ZipFile(small, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"x" * 1000)
    with pytest.raises(nb.CheckpointError, match=r"small.pth: compressed or encrypted members"):
        nb.load_weights_file(small, bound)


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/nonexistent")


def test_exporting_from_a_malicious_file_is_a_clear_error(nb, tmp_path):
    global MARKER
    MARKER = tmp_path / "code_ran"
    evil = tmp_path / "evil.pth"
    torch.save({"teacher": Payload(), "config": {}}, evil)
    with pytest.raises(nb.CheckpointError, match=r"evil.pth could not be read as weights \(UnpicklingError"):
        nb.export_teacher_backbone(evil, tmp_path / "out.pth")
    with pytest.raises(nb.CheckpointError, match=r"evil.pth could not be read"):
        nb.read_state_dict(evil)
    assert not MARKER.exists() and not (tmp_path / "out.pth").exists()


def test_a_checkpoint_in_the_format_before_torch_1_6_is_named_so_not_damaged(nb, tmp_path):
    """A file torch.save wrote with _use_new_zipfile_serialization=False was called "damaged: not a complete
    zip archive" by every loader, though it is intact and only in the older format."""
    old = tmp_path / "old_format.pth"
    for protocol in (2, 4, 5):   # 4 and 5 frame the magic number
        torch.save({"pos_embed": torch.zeros(1, 5, 8)}, old, _use_new_zipfile_serialization=False,
                   pickle_protocol=protocol)
        for load in (nb.load_weights_file, nb.read_state_dict, nb.backbone_from_checkpoint):
            with pytest.raises(nb.CheckpointError, match=r"old_format.pth is in PyTorch's format before 1.6 .*re-save"):
                load(old)
    other = tmp_path / "weights.pkl"   # a pickle, but not torch's: not called an older torch.save
    other.write_bytes(pickle.dumps({"w": [0.0] * 3}, protocol=4))
    with pytest.raises(nb.CheckpointError, match=r"weights.pkl is not a checkpoint: torch.save writes a zip archive, "
                                                 r"and this file is a pickle \(not the zip format"):
        nb.load_weights_file(other)
    cut = tmp_path / "cut.pth"
    torch.save({"pos_embed": torch.zeros(1, 5, 8)}, cut)
    cut.write_bytes(cut.read_bytes()[:-100])
    with pytest.raises(nb.CheckpointError, match=r"cut.pth is damaged: not a complete zip archive"):
        nb.load_weights_file(cut)


@pytest.mark.parametrize("content, said", [
    (b"\x10\x00\x00\x00\x00\x00\x00\x00" + b'{"w": {"dtype": "F32"}}', r"a safetensors file \(as Hugging Face stores "
                                                                          r"weights\), which is not read here"),
    (b"", r"empty \(0 bytes\)"),
    (b"\xff\xd8\xff\xe0 a photograph", r"a JPEG image")], ids=["safetensors", "empty", "jpeg"])
def test_a_file_of_another_format_is_named_not_called_damaged(nb, tmp_path, content, said):
    """A file that is no zip archive at all (Hugging Face's safetensors, an empty file, a photograph) is intact,
    only not what torch.save writes: the loaders called it "damaged: not a complete zip archive", and the
    settings' check said its first bytes; both now say what it is. A zip cut short is still damaged."""
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    for load in (nb.load_weights_file, nb.read_state_dict, nb.backbone_from_checkpoint):
        with pytest.raises(nb.CheckpointError, match=r"model\.pth is not a checkpoint: torch\.save writes a zip "
                                                     r"archive, and this file is " + said):
            load(path)
    with pytest.raises(nb.ConfigError, match=r"init_from='.*model\.pth': not a checkpoint: .*this file is " + said):
        nb.make_config("demo", init_from=str(path))


def test_export_checks_the_teacher(nb, run, tmp_path):
    path = tmp_path / "nan.pth"
    path.write_bytes(edited(run, lambda s: s["teacher"]["backbone.norm.weight"].fill_(float("nan"))))
    with pytest.raises(nb.CheckpointError, match=r"nan.pth: backbone.norm.weight holds non-finite"):
        nb.export_teacher_backbone(path, tmp_path / "out.pth")
    good = tmp_path / "good.pth"
    good.write_bytes(run[2]["last.pth"])
    out = torch.load(nb.export_teacher_backbone(good, tmp_path / "out.pth"), weights_only=True)
    assert out["norm.weight"].dtype == torch.float16


def test_a_damaged_log_line_is_skipped_with_a_warning(nb, tmp_path):
    """Cut lines, and rows without a field their kind is read by (each would stop the run at an epoch's end)."""
    log = tmp_path / "log.jsonl"
    step = lambda n, **kw: {**dict(kind="step", step=n, epoch=0, loss=1.0, entropy=0.5, kl=0.5, center_norm=0.1), **kw}
    rows = [step(1), dict(kind="eval", step=2, epoch=0, knn_top1=12.5, knn_top5=None), step(2, loss=0.5)]
    bad = ['{"kind": "step", "st', "[1, 2]", json.dumps({k: v for k, v in step(3).items() if k != "epoch"}),
           json.dumps(step(3, loss="0.5")), json.dumps(step(3, epoch=True)), json.dumps(dict(kind="note", step=3)),
           json.dumps(dict(kind="eval", step=3, epoch=0, top1=40.0))]   # (it passed, then a KeyError in the plot)
    log.write_text("\n".join([json.dumps(rows[0]), bad[0], json.dumps(rows[1]), *bad[1:], json.dumps(rows[2])]) + "\n")
    with pytest.warns(UserWarning) as caught:
        assert nb.read_log(log) == rows
    assert [str(w.message).split(":")[0] for w in caught] == [f"{log}, line {n}" for n in (2, 4, 5, 6, 7, 8, 9)]
    assert "a 'step' row whose epoch is missing or of the wrong type" in str(caught[2].message)
    assert "'eval' row whose knn_top1 is missing or of the wrong type" in str(caught[-1].message)


def test_a_resume_keeps_the_log_lines_it_cannot_read(nb, tmp_path):
    """A resume rewrites the log cut back to its checkpoint's step: the lines it could not read (cut by a
    crash, of a kind from a newer notebook) were dropped with it. They are moved beside it, byte for byte."""
    step = lambda n: dict(kind="step", step=n, epoch=0, loss=1.0, entropy=0.5, kl=0.5, center_norm=0.1)
    lines = [json.dumps(step(1)), json.dumps(dict(kind="probe", step=1, epoch=1, lin_top1=55.0)),
             '{"kind": "step", "step": 2, "lo', json.dumps(step(2)), json.dumps(step(3))]
    (tmp_path / "log.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match=r"log.jsonl: its 2 damaged line\(s\) were moved to log-damaged-lines.txt"):
        log = nb.RunLog(tmp_path / "log.jsonl", resume_step=2)
    assert log.rows == [step(1), step(2)]
    assert (tmp_path / "log.jsonl").read_text().splitlines() == [lines[0], lines[3]]
    assert (tmp_path / "log-damaged-lines.txt").read_text().splitlines() == lines[1:3]


def test_planted_links_are_never_followed(nb, tmp_path, monkeypatch):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    folder = tmp_path / "out"
    folder.mkdir()
    target = folder / "last.pth"
    (folder / f".last.pth.tmp-{os.getpid()}").symlink_to(victim)   # the old predictable temporary name
    names = iter(["0" * 16, "1" * 16])
    monkeypatch.setattr(nb.secrets, "token_hex", lambda n: next(names))
    (folder / f".last.pth.{'0' * 16}.tmp").symlink_to(victim)       # the next temporary name, foreseen
    target.symlink_to(victim)                                        # and the target itself
    nb.atomic_write(target, lambda f: f.write(b"new"), keep_previous=folder / "last.prev.pth")
    assert victim.read_bytes() == b"precious"
    assert target.read_bytes() == b"new" and not target.is_symlink()
    assert (folder / f".last.pth.{'0' * 16}.tmp").is_symlink()    # skipped, not written through
    assert not (folder / f".last.pth.{'1' * 16}.tmp").exists()


CHILD = r"""
import resource, signal, sys, torch
sys.path.insert(0, sys.argv[1])
from nbloader import load_notebook
from test_train import tiny_cfg
from pathlib import Path
nb = load_notebook()
t = nb.DINOTrainer(tiny_cfg(nb, Path(sys.argv[2])), 16, torch.device("cpu"))
path = Path(sys.argv[2]) / "last.pth"
nb.save_checkpoint(t, path)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # so that the write fails with EFBIG, not a signal
resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size // 4,) * 2)
t.step = 1
try:
    nb.save_checkpoint(t, path)
except OSError as error:
    print(f"errno={error.errno} message={error}")
"""


def test_a_failed_write_keeps_the_previous_checkpoint_and_says_why(tmp_path):
    tests = Path(__file__).resolve().parent
    done = subprocess.run([sys.executable, "-c", CHILD, str(tests), str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    import errno
    assert f"errno={errno.EFBIG} message=" in done.stdout
    assert f"could not write {tmp_path / 'last.pth'}: File too large" in done.stdout
    assert torch.load(tmp_path / "last.pth", weights_only=True)["step"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]


BUFFERED_CHILD = r"""
import resource, signal, sys
sys.path.insert(0, sys.argv[1])
from nbloader import load_notebook
from pathlib import Path
nb = load_notebook()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (60000, 60000))
def write(f):   # bytes left in the buffer when the write fails: the file's close fails to flush them too
    f.write(bytes(60000)); f.flush(); f.write(bytes(10)); raise OSError(5, "Input/output error")
try:
    nb.atomic_write(Path(sys.argv[2]) / "x.u8", write)
except OSError as error:
    print(f"message={error}")
"""


def test_a_write_that_fails_with_bytes_in_its_buffer_leaves_no_temp_file_and_says_why(tmp_path):
    """The temp file is closed after its rename now (its lock held till then): a close that failed to flush
    the buffer's rest raised from the clean-up, skipping the temp file's removal, and its bare error replaced
    the one that says the previous file is left as it was."""
    done = subprocess.run([sys.executable, "-c", BUFFERED_CHILD, str(Path(__file__).resolve().parent), str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"could not write {tmp_path / 'x.u8'}: Input/output error; the previous file is left as it was" in done.stdout
    assert list(tmp_path.iterdir()) == []


def test_largest_difference_walks_nested_states_in_order(nb):
    """The kill check and check_graphs.py compare two trainer_state()s with it: every tensor, however deep,
    is compared with its twin; other values are not numbers to compare; states that differ in structure
    or shapes are refused."""
    a = {"x": torch.zeros(3), "y": [torch.ones(2, 2), "name", (torch.tensor(1.0), torch.zeros(0))]}
    b = {"x": torch.tensor([0.0, 0.0, 0.5]), "y": [torch.ones(2, 2), "other", (torch.tensor(-1.0), torch.zeros(0))]}
    assert nb.largest_difference(a, a) == 0.0
    assert nb.largest_difference(a, b) == 2.0
    assert nb.tensor_bytes(a) == (3 + 4 + 1) * 4
    with pytest.raises(ValueError, match="different shapes"):
        nb.largest_difference(a, {**b, "x": torch.zeros(1)})
    with pytest.raises(ValueError, match="hold 4 and 1 tensors"):
        nb.largest_difference(a, {"x": torch.zeros(3)})


def test_a_run_moved_to_another_device_resumes_with_a_fresh_augmentation_stream(nb, run, tmp_path):
    """A run written on a GPU (its augmentation generator a CUDA one: 16 bytes of seed and offset) resumes on
    a CPU: every other state is restored, and the crops restart from stream_seed (a CPU generator cannot take
    a CUDA generator's state). On the device it was written on, the stream resumes where it was."""
    def from_a_gpu(s):
        s["augment"] = {"generator": torch.zeros(16, dtype=torch.uint8), "device": "cuda"}
    cfg, run_dir = fresh_copy(run, tmp_path, last=edited(run, from_a_gpu))
    moved = nb.DINOTrainer(cfg, 16, CPU)
    nb.load_checkpoint(moved, run_dir / "last.pth")
    saved = torch.load(io.BytesIO(run[2]["last.pth"]), weights_only=True)
    assert moved.step == 3 and torch.equal(torch.get_rng_state(), saved["rng"]["torch"])
    expected = torch.Generator().manual_seed(nb.stream_seed(cfg.seed, "crops", 0, 3)).get_state()
    assert torch.equal(moved.augment.generator.get_state(), expected)
    assert saved["augment"]["device"] == "cpu"   # what a CPU run writes
    same = nb.DINOTrainer(cfg, 16, CPU)
    nb.load_checkpoint(same, tmp_path / "ck" / cfg.run_name / "last.prev.pth")
    assert torch.equal(same.augment.generator.get_state(),
                       torch.load(io.BytesIO(run[2]["last.prev.pth"]), weights_only=True)["augment"]["generator"])
    def from_an_older_gpu_run(s):   # written before the state named its device: told by its size
        s["augment"] = {"generator": torch.zeros(16, dtype=torch.uint8)}
    _, old_dir = fresh_copy(run, tmp_path / "older", last=edited(run, from_an_older_gpu_run))
    older = nb.DINOTrainer(cfg, 16, CPU)
    nb.load_checkpoint(older, old_dir / "last.pth")
    assert torch.equal(older.augment.generator.get_state(), expected)
    for bad, message in [({"generator": torch.zeros(16, dtype=torch.uint8), "device": "tpu"}, "augment is not a dict"),
                         ({"generator": torch.zeros(4, 4, dtype=torch.uint8), "device": "cuda"}, "not a 1-D uint8")]:
        _, bad_dir = fresh_copy(run, tmp_path / message.split()[-1], last=edited(run, lambda s: s.update(augment=bad)))
        with pytest.raises(nb.CheckpointError, match=message):
            nb.load_checkpoint(nb.DINOTrainer(cfg, 16, CPU), bad_dir / "last.pth")
