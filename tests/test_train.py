"""Schedules, optimiser rules, EMA, checkpoints and exact resume of the training section."""
import itertools
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nbloader import notebook_cells


def tiny_cfg(nb, tmp_path, **kw):
    base = dict(patch_size=16, out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16, batch_size=4,
                n_local_crops=2, max_train_images=0, epochs=2, warmup_epochs=1, checkpoint_dir=str(tmp_path / "ck"),
                figure_dir=str(tmp_path / "fig"), log_every_steps=1, eval_every_epochs=1, save_every_epochs=1)
    return nb.make_config("demo", **{**base, **kw})



class Data:
    def __init__(self, n=16, seed=0):
        rng = np.random.default_rng(seed)
        self.images = rng.integers(0, 256, (n, 3, 64, 64), dtype=np.uint8)
        self.labels = np.arange(n, dtype=np.int64) % 4

    def __len__(self):
        return len(self.labels)


def reads_the_batches(loader, images, batches):
    """The loader serves each batch's images, in order, and nothing more."""
    got = [b.numpy() for b in loader]
    return len(got) == len(batches) and all(np.array_equal(g, images[b]) for g, b in zip(got, batches))


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def reference_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """The formula of the authors' utils.cosine_scheduler: warm-up by np.linspace, endpoint included."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    return np.concatenate((warmup, final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))))


@pytest.mark.parametrize("args", [(1.0, 0.1, 10, 5, 2), (5e-4, 1e-6, 100, 7, 10, 1e-5), (0.04, 0.4, 3, 4, 0),
                                  (0.9995, 1.0, 2, 3)])
def test_cosine_scheduler_equals_the_reference_formula(nb, args):
    ours, theirs = nb.cosine_scheduler(*args), reference_cosine_scheduler(*args)
    assert len(ours) == len(theirs) == args[2] * args[3]
    np.testing.assert_array_equal(ours, theirs)


def test_cosine_scheduler_warmup_endpoints_length(nb):
    s = nb.cosine_scheduler(1.0, 0.1, epochs=10, niter_per_ep=5, warmup_epochs=2)
    assert len(s) == 50
    assert s[0] == 0.0 and s[9] == 1.0 and s[10] == 1.0          # the warm-up's last step reaches the base
    assert np.all(np.diff(s[:10]) > 0) and np.all(np.diff(s[10:]) <= 1e-12)   # rises, then falls
    assert s[-1] == pytest.approx(0.1, abs=2e-3) and s[-1] >= 0.1   # the reference's cosine stops one step short
    cfg = nb.make_config("imagenet64")
    sch = nb.make_schedules(cfg, iters_per_epoch=100)
    assert sch["lr"][cfg.warmup_epochs * 100 - 1] == pytest.approx(cfg.base_lr * cfg.batch_size / 256)
    assert sch["wd"][0] == pytest.approx(0.04) and sch["wd"][-1] == pytest.approx(0.4, abs=1e-4)
    assert sch["momentum"][0] == pytest.approx(cfg.momentum_teacher) and sch["momentum"][-1] == pytest.approx(1.0, abs=1e-6)
    assert nb.make_schedules(cfg, 100, world_size=8)["lr"][1000] == pytest.approx(8 * sch["lr"][1000])


def test_no_weight_decay_for_biases_and_norms(nb, tmp_path):
    student, _ = nb.build_models(tiny_cfg(nb, tmp_path), torch.device("cpu"))
    decay, no_decay = nb.get_params_groups(student)
    names = {id(p): n for n, p in student.named_parameters()}
    assert no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    assert any(names[id(p)].endswith("norm.weight") for p in no_decay["params"])
    assert any(names[id(p)].endswith("qkv.bias") for p in no_decay["params"])
    assert {id(p) for p in decay["params"]} | {id(p) for p in no_decay["params"]} == \
        {id(p) for p in student.parameters() if p.requires_grad}


def test_ema_formula(nb):
    teacher, student = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = weights(teacher)
    nb.ema_update(teacher, student, 0.9)
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, 0.9 * before[k] + 0.1 * student.state_dict()[k])


def test_gradients_clipped_per_parameter(nb):
    model = torch.nn.Linear(4, 3)
    model.weight.grad = torch.full_like(model.weight, 10.0)   # norm 34.6
    model.bias.grad = torch.full_like(model.bias, 0.1)        # norm 0.17: left alone
    norms = nb.clip_gradients(model, 3.0)
    assert norms[0] == pytest.approx(np.sqrt(12) * 10, rel=1e-5)
    assert model.weight.grad.norm() == pytest.approx(3.0, rel=1e-4)
    torch.testing.assert_close(model.bias.grad, torch.full_like(model.bias, 0.1))


def test_teacher_starts_as_copy_without_grads_or_drop_path(nb, tmp_path):
    student, teacher = nb.build_models(tiny_cfg(nb, tmp_path, drop_path_rate=0.2), torch.device("cpu"))
    for (k, s), t in zip(student.state_dict().items(), teacher.state_dict().values()):
        assert torch.equal(s, t), k
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(b.drop_path.drop_prob == 0 for b in teacher.backbone.blocks)
    assert student.backbone.blocks[-1].drop_path.drop_prob == pytest.approx(0.2)


def test_last_layer_frozen_during_first_epochs(nb, tmp_path):
    cfg = tiny_cfg(nb, tmp_path, freeze_last_layer=1, norm_last_layer=False)
    t = nb.DINOTrainer(cfg, 16, torch.device("cpu"))
    before = weights(t.student)
    for _ in range(t.iters_per_epoch):
        nb.train_step(t, torch.from_numpy(Data().images[:4]))
    after = weights(t.student)
    last = [k for k in before if "last_layer" in k]
    assert last and all(torch.equal(before[k], after[k]) for k in last)
    assert not torch.equal(before["backbone.blocks.0.attn.qkv.weight"], after["backbone.blocks.0.attn.qkv.weight"])
    nb.train_step(t, torch.from_numpy(Data().images[:4]))   # epoch 1: the last layer learns
    assert any(not torch.equal(after[k], t.student.state_dict()[k]) for k in last)


def test_epoch_batches_shard_the_global_batch(nb):
    single = nb.epoch_batches(50, 8, epoch=3, seed=1)
    ranks = [nb.epoch_batches(50, 4, epoch=3, seed=1, rank=r, world_size=2) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 6
    for s, a, b in zip(single, *ranks):
        assert sorted(np.concatenate([a, b])) == sorted(s) and not set(a) & set(b)
    assert [list(b) for b in single] == [list(b) for b in nb.epoch_batches(50, 8, epoch=3, seed=1)]
    assert [list(b) for b in single] != [list(b) for b in nb.epoch_batches(50, 8, epoch=4, seed=1)]
    assert len(nb.epoch_batches(50, 8, 0, 1, limit=20)) == 2


def test_run_batches_are_the_epochs_batches_one_after_another(nb):
    """One loader serves a whole run: its item k is the batch of step first_step + k, epoch after epoch,
    on every rank, from wherever a resumed run starts."""
    for rank in range(2):
        run = nb.RunBatches(50, 4, epochs=3, seed=1, first_step=5, rank=rank, world_size=2, limit=40)
        steps = [b for e in range(3) for b in nb.epoch_batches(50, 4, e, 1, rank=rank, world_size=2, limit=40)]
        assert len(steps) == 15 and len(run) == 10
        assert all(np.array_equal(run[k], steps[5 + k]) for k in range(len(run)))
        with pytest.raises(IndexError, match="step 15 is outside the run's 15 steps"):
            run[len(run)]


def test_reader_processes_start_once_a_run_and_change_nothing(nb, tmp_path, monkeypatch):
    """With num_workers > 0 a run (and its resumption) builds one DataLoader, not one an epoch, and trains
    exactly as the run without reader processes."""
    data, built = Data(), []

    class CountedLoader(torch.utils.data.DataLoader):
        def __init__(self, *args, **kwargs):
            built.append(kwargs["num_workers"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", CountedLoader)
    plain, _ = nb.train_dino(tiny_cfg(nb, tmp_path, run_name="plain", epochs=3), data, data, torch.device("cpu"),
                             progress=False)
    assert built == []
    cfg = tiny_cfg(nb, tmp_path, run_name="read", epochs=3, num_workers=2)
    nb.train_dino(cfg, data, data, torch.device("cpu"), max_steps=6, progress=False)   # stops mid-epoch 2
    read, history = nb.train_dino(cfg, data, data, torch.device("cpu"), progress=False)
    assert built == [2, 2] and read.step == plain.step == 12
    assert [r["step"] for r in history if r["kind"] == "step"] == list(range(1, 13))
    for (k, a), b in zip(plain.teacher.state_dict().items(), read.teacher.state_dict().values()):
        assert torch.equal(a, b), k


def test_resume_is_bit_exact(nb, tmp_path):
    data = Data()
    whole, _ = nb.train_dino(tiny_cfg(nb, tmp_path, run_name="whole"), data, data, torch.device("cpu"),
                             progress=False)
    assert whole.step == 8
    cfg = tiny_cfg(nb, tmp_path, run_name="halves")
    half, _ = nb.train_dino(cfg, data, data, torch.device("cpu"), max_steps=3, progress=False)
    assert half.step == 3
    torch.manual_seed(1234)   # whatever ran in between, the checkpoint's RNG states are restored
    resumed, history = nb.train_dino(cfg, data, data, torch.device("cpu"), progress=False)
    assert resumed.step == 8
    for (k, a), b in zip(whole.teacher.state_dict().items(), resumed.teacher.state_dict().values()):
        assert torch.equal(a, b), k
    for (k, a), b in zip(whole.student.state_dict().items(), resumed.student.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(whole.loss.center, resumed.loss.center)
    assert [r["step"] for r in history if r["kind"] == "step"] == list(range(1, 9))
    assert sorted(p.name for p in (tmp_path / "ck" / "halves").iterdir()) == [   # last.prev.pth goes at the end
        "epoch_0001.pth", "epoch_0002.pth", "last.pth", "log.jsonl", "settings.json", "teacher.pth",
        "train.lock"]   # the one-writer lock's file stays, empty and unlocked


def test_a_stop_on_an_epochs_last_step_still_ends_the_epoch(nb, tmp_path, capsys):
    """max_steps at an epoch's end: its k-NN, summary and checkpoints come before the run returns. A run
    cut off after that step's checkpoint but before the epoch's end (a Ctrl-C, a kill) ends it on resume."""
    data, ends = Data(), lambda rows: [(r["kind"], r["step"]) for r in rows if r["kind"] in ("eval", "epoch_end")]
    whole, whole_rows = nb.train_dino(tiny_cfg(nb, tmp_path, run_name="whole"), data, data, torch.device("cpu"),
                                      progress=False)
    assert ends(whole_rows) == [("eval", 0), ("eval", 4), ("epoch_end", 4), ("eval", 8), ("epoch_end", 8)]
    cfg = tiny_cfg(nb, tmp_path, run_name="stopped")
    first, rows = nb.train_dino(cfg, data, data, torch.device("cpu"), max_steps=4, progress=False)
    run_dir = tmp_path / "ck" / "stopped"
    assert first.step == 4 and ends(rows) == ends(whole_rows)[:3] and (run_dir / "epoch_0001.pth").is_file()
    assert "epoch 1: k-NN top-1" in capsys.readouterr().out
    cut = tiny_cfg(nb, tmp_path, run_name="cut")
    nb.train_dino(cut, data, data, torch.device("cpu"), max_steps=4, progress=False)
    cut_dir = tmp_path / "ck" / "cut"
    (cut_dir / "epoch_0001.pth").unlink()   # as if killed after step 4's checkpoint, before its epoch's end
    log = cut_dir / "log.jsonl"
    log.write_text("".join(line + "\n" for line in log.read_text().splitlines()
                           if json.loads(line)["kind"] not in ("epoch_end", "eval") or json.loads(line)["step"] == 0))
    resumed, history = nb.train_dino(cut, data, data, torch.device("cpu"), progress=False)
    assert "epoch 1: k-NN top-1" in capsys.readouterr().out and (cut_dir / "epoch_0001.pth").is_file()
    assert ends(history) == ends(whole_rows)
    for name in ("stopped", "cut"):
        again, _ = nb.train_dino(tiny_cfg(nb, tmp_path, run_name=name), data, data, torch.device("cpu"), progress=False)
        assert again.step == 8 and (tmp_path / "ck" / name / "teacher.pth").is_file()
        assert all(torch.equal(a, b) for a, b in zip(whole.teacher.state_dict().values(),
                                                     again.teacher.state_dict().values()))


def test_a_run_keeps_what_its_plan_says_at_the_sizes_it_says(nb, tmp_path, capsys):
    assert nb.kept_epochs(nb.make_config("imagenet64")) == list(range(10, 101, 10))
    assert nb.kept_epochs(nb.make_config("demo", epochs=5, save_every_epochs=2)) == [2, 4, 5]
    assert nb.kept_epochs(nb.make_config("demo")) == []     # the demo keeps no epoch checkpoints
    cfg = tiny_cfg(nb, tmp_path, save_every_epochs=0)
    data = Data()
    nb.train_dino(cfg, data, data, torch.device("cpu"), progress=False)
    run_dir = tmp_path / "ck" / cfg.run_name
    assert sorted(p.name for p in run_dir.iterdir()) == ["last.pth", "log.jsonl", "settings.json", "teacher.pth",
                                                         "train.lock"]
    sizes = nb.checkpoint_sizes(cfg)
    for name, key in (("last.pth", "training"), ("teacher.pth", "teacher")):
        on_disk = (run_dir / name).stat().st_size
        assert sizes[key] <= on_disk <= 1.02 * sizes[key] + 2**20, (name, on_disk, sizes[key])
    mb = lambda n: f"{n / 1e6:,.0f} MB"
    assert (f"disk: last.pth {mb(sizes['training'])} (with last.prev.pth while training), no epoch_XXXX.pth "
            f"(save_every_epochs=0), teacher.pth {mb(sizes['teacher'])}") in capsys.readouterr().out


def test_the_plan_counts_the_epoch_files_it_keeps(nb):
    assert "epoch_XXXX.pth at epochs 1 (1 file)," in nb.checkpoint_plan(nb.make_config("demo", epochs=1,
                                                                                       save_every_epochs=1))
    assert "epoch_XXXX.pth at epochs 10, 20, 30, 40, … (10 files)," in nb.checkpoint_plan(nb.make_config("imagenet64"))


@pytest.mark.parametrize("n_train, cap, says", [(2, 2, "2 training images (max_train_images=2) are fewer than one "
                                                      "global batch (4 × 1 processes): lower batch_size or raise "
                                                      "max_train_images"),
                                               (3, 0, "3 training images are fewer than one global batch (4 × 1 "
                                                      "processes): lower batch_size")])
def test_too_few_images_for_one_batch_say_which_setting_to_change(nb, tmp_path, n_train, cap, says):
    cfg = tiny_cfg(nb, tmp_path, max_train_images=cap)
    with pytest.raises(ValueError) as error:
        nb.DINOTrainer(cfg, n_train, torch.device("cpu"))
    assert str(error.value) == says


def test_the_crash_checks_train_two_epochs_of_four_steps_on_a_folder_of_ten_images(nb, tmp_path):
    """The Training section's kill check waits for five of the run's eight steps: on a folder whose training
    split holds 8 images (2 steps an epoch) the run ended first and the notebook stopped there."""
    from PIL import Image
    for name in ("a", "b"):
        (tmp_path / "photos" / name).mkdir(parents=True)
        for i in range(5):
            image = np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(image).save(tmp_path / "photos" / name / f"{i}.png")
    cfg = nb.make_config("demo", data_root=str(tmp_path / "photos"), cache_dir=str(tmp_path / "cache"),
                         log_every_steps=10)   # a profile that logs every tenth step: the check still waits
    assert len(nb.load_datasets(cfg, verbose=False)[0]) == 8   # for five logged steps of eight
    trainer, rows = nb.crash_check_runs(cfg, str(tmp_path / "runs"))("straight")
    assert (trainer.iters_per_epoch, trainer.step) == (4, 8)
    assert [row["step"] for row in rows if row["kind"] == "step"] == list(range(1, 9))


def test_kill_during_save_keeps_previous_checkpoint(nb, tmp_path, monkeypatch):
    cfg = tiny_cfg(nb, tmp_path)
    t = nb.DINOTrainer(cfg, 16, torch.device("cpu"))
    path = tmp_path / "last.pth"
    nb.save_checkpoint(t, path)
    good = path.read_bytes()
    nb.train_step(t, torch.from_numpy(Data().images[:4]))

    def dies_half_way(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        nb.save_checkpoint(t, path)
    monkeypatch.undo()
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]
    assert nb.load_checkpoint(nb.DINOTrainer(cfg, 16, torch.device("cpu")), path) == {}


def test_non_finite_loss_stops_and_keeps_checkpoint(nb, tmp_path):
    cfg = tiny_cfg(nb, tmp_path)
    data = Data()
    t, _ = nb.train_dino(cfg, data, data, torch.device("cpu"), max_steps=2, progress=False)
    last = tmp_path / "ck" / cfg.run_name / "last.pth"
    good = last.read_bytes()
    with torch.no_grad():
        t.student.backbone.norm.weight.fill_(float("nan"))
    with pytest.raises(nb.NonFiniteLoss, match=r"step 2 .*loss=nan.*lr="):
        nb.train_step(t, torch.from_numpy(data.images[:4]))
    assert last.read_bytes() == good


def test_a_resumed_run_names_a_non_finite_loss_by_its_own_step(nb, tmp_path):
    """The steps checked were counted from 0 after a resume: 'one of steps 0..2' for the step after it."""
    cfg, data = tiny_cfg(nb, tmp_path, log_every_steps=100), Data()
    nb.train_dino(cfg, data, data, torch.device("cpu"), max_steps=2, progress=False)
    resumed = nb.DINOTrainer(cfg, len(data), torch.device("cpu"))
    nb.load_checkpoint(resumed, tmp_path / "ck" / cfg.run_name / "last.pth")
    with torch.no_grad():
        resumed.student.backbone.norm.weight.fill_(float("nan"))
    with pytest.raises(nb.NonFiniteLoss, match=r"non-finite loss at step 2 \(epoch 0\): loss=nan"):
        nb.train_step(resumed, torch.from_numpy(data.images[:4]))

def test_weights_an_update_made_non_finite_after_a_finite_loss_are_never_saved(nb, tmp_path):
    """base_lr 1e5, two steps an epoch: the epoch's last update overflows while its loss is finite. The epoch's
    checkpoints were written with NaN weights, the next step then said it had left the checkpoint as it was,
    and the run had no intact file to resume from."""
    cfg = tiny_cfg(nb, tmp_path, warmup_epochs=0, clip_grad=0.0, base_lr=1e5, log_every_steps=2)
    data = Data(8)
    with pytest.raises(nb.NonFiniteLoss, match=r"non-finite weights after the update of step 1 \(epoch 0\), whose "
                                               r"loss was finite: it overflowed at lr=[0-9.e+]+ \(lower base_lr\)"):
        nb.train_dino(cfg, data, data, torch.device("cpu"), progress=False)
    assert not list((tmp_path / "ck").rglob("*.pth"))


def test_a_checkpoint_of_another_architecture_is_refused(nb, tmp_path):
    """A run folder without settings.json (an older run) whose last.pth is of another model: refused."""
    data = Data()
    nb.train_dino(tiny_cfg(nb, tmp_path), data, data, torch.device("cpu"), max_steps=1, progress=False)
    run_dir = tmp_path / "ck" / "demo"
    (run_dir / "settings.json").unlink()
    with pytest.raises(ValueError, match=r"last.pth.*out_dim: checkpoint 64 vs config 32"):
        nb.train_dino(tiny_cfg(nb, tmp_path, out_dim=32), data, data, torch.device("cpu"), progress=False)
    with pytest.raises(ValueError, match=r"patch_size: checkpoint 16 vs config 8"):
        nb.train_dino(tiny_cfg(nb, tmp_path, patch_size=8), data, data, torch.device("cpu"), progress=False)


def test_other_settings_train_in_their_own_folder(nb, tmp_path):
    data = Data()
    nb.train_dino(tiny_cfg(nb, tmp_path), data, data, torch.device("cpu"), max_steps=1, progress=False)
    run_dir = tmp_path / "ck" / "demo"
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    trainer, _ = nb.train_dino(tiny_cfg(nb, tmp_path, out_dim=32), data, data, torch.device("cpu"), progress=False)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    other = [d for d in run_dir.parent.iterdir() if d.name.startswith("demo-")]
    assert len(other) == 1 and (other[0] / "teacher.pth").exists() and trainer.epoch == trainer.cfg.epochs


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])   # Ctrl-C; kill, a cluster's preemption
def test_interrupt_saves_then_stops_and_resumes(nb, tmp_path, monkeypatch, signal_number):
    cfg = tiny_cfg(nb, tmp_path)
    data = Data()
    real_step = nb.train_step

    def interrupted_at_step_2(t, images, diagnostics=False):
        if t.step == 2:
            os.kill(os.getpid(), signal_number)   # arrives in the middle of the step
        return real_step(t, images, diagnostics)
    monkeypatch.setattr(nb, "train_step", interrupted_at_step_2)
    with pytest.raises(KeyboardInterrupt, match="step 3"):
        nb.train_dino(cfg, data, data, torch.device("cpu"), progress=False)
    monkeypatch.undo()
    state = torch.load(tmp_path / "ck" / cfg.run_name / "last.pth", weights_only=True)
    assert state["step"] == 3 and state["batch_in_epoch"] == 3
    handler = signal.getsignal(signal_number)
    t, _ = nb.train_dino(cfg, data, data, torch.device("cpu"), progress=False)
    assert t.step == 8 and signal.getsignal(signal_number) is handler   # the handler given back after the run


@pytest.mark.parametrize("max_steps, says", [(None, "interrupted as the run ended: .*teacher.pth is saved"),
                                              (4, "interrupted at step 4; saved .*last.pth")])
def test_a_ctrl_c_during_the_last_k_nn_stops_the_run_not_dropped(nb, tmp_path, monkeypatch, max_steps, says):
    """A Ctrl-C held while the last epoch's k-NN ran came after the loop's last look: it was dropped, the cell
    returned as if nothing happened, and the kill check (or Jupyter's "Run All") went on below it."""
    cfg, data, real_evaluate = tiny_cfg(nb, tmp_path), Data(), nb.evaluate
    last = max_steps or 8

    def interrupted_in_the_last_evaluation(trainer, *args):
        if trainer.step == last:
            os.kill(os.getpid(), signal.SIGINT)   # held by the run's handler until it looks
        return real_evaluate(trainer, *args)
    monkeypatch.setattr(nb, "evaluate", interrupted_in_the_last_evaluation)
    with pytest.raises(KeyboardInterrupt, match=says):
        nb.train_dino(cfg, data, data, torch.device("cpu"), max_steps=max_steps, progress=False)
    monkeypatch.undo()
    run_dir = tmp_path / "ck" / cfg.run_name
    assert torch.load(run_dir / "last.pth", weights_only=True)["step"] == last
    assert (run_dir / "teacher.pth").is_file() == (max_steps is None)
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "epoch_end"] == [4, 8][:last // 4]   # the epoch was ended
    trainer, _ = nb.train_dino(cfg, data, data, torch.device("cpu"), progress=False)
    assert trainer.step == 8 and (run_dir / "teacher.pth").is_file()


def test_a_ctrl_c_during_an_earlier_epochs_k_nn_stops_at_that_epochs_end(nb, tmp_path, monkeypatch):
    """A Ctrl-C held while the k-NN of an epoch before the last ran: the run trained one more step and saved
    again before it stopped; it stops at that epoch's end, whose last.pth was saved before the k-NN."""
    cfg, data, real_evaluate, real_step, trained = tiny_cfg(nb, tmp_path), Data(), nb.evaluate, nb.train_step, []

    def interrupted_in_the_first_epochs_evaluation(trainer, *args):
        if trainer.step == 4:   # the end of epoch 1 of 2
            os.kill(os.getpid(), signal.SIGINT)
        return real_evaluate(trainer, *args)
    monkeypatch.setattr(nb, "evaluate", interrupted_in_the_first_epochs_evaluation)
    monkeypatch.setattr(nb, "train_step", lambda t, images, read: (trained.append(t.step), real_step(t, images, read))[1])
    with pytest.raises(KeyboardInterrupt, match=r"interrupted at step 4; saved .*last.pth"):
        nb.train_dino(cfg, data, data, torch.device("cpu"), progress=False)
    monkeypatch.undo()
    run_dir = tmp_path / "ck" / cfg.run_name
    assert trained == [0, 1, 2, 3] and torch.load(run_dir / "last.pth", weights_only=True)["step"] == 4
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in rows if r["kind"] in ("eval", "epoch_end")] == [
        ("eval", 0), ("eval", 4), ("epoch_end", 4)]
    trainer, _ = nb.train_dino(cfg, data, data, torch.device("cpu"), progress=False)
    assert trainer.step == 8 and (run_dir / "teacher.pth").is_file()


def test_a_ctrl_c_whose_traceback_is_kept_leaves_no_reader_running(nb, tmp_path, monkeypatch):
    """Jupyter keeps a cell's last error, and with it the run's frames and their loader: its reader processes
    went on running beside the kernel, two more with each interrupted re-run."""
    cfg, data, real_step = tiny_cfg(nb, tmp_path, num_workers=2), Data(), nb.train_step
    monkeypatch.setattr(nb, "train_step", lambda t, images, read: (
        os.kill(os.getpid(), signal.SIGINT) if t.step == 2 else None, real_step(t, images, read))[1])
    with pytest.raises(KeyboardInterrupt, match="step 3") as kept:
        nb.train_dino(cfg, data, data, torch.device("cpu"), progress=False)
    assert kept.tb is not None and multiprocessing.active_children() == []


def test_a_ctrl_c_while_the_readers_start_leaves_none_running(nb, tmp_path, monkeypatch):
    """The readers were started before the run held Ctrl-C: one that came while they forked (Jupyter's stop,
    a second or two into the kill check) was lost, and the run went on to its end; two raised inside the
    loader's start, with nothing saved, and the readers started so far ran on beside the kernel (and Python's
    exit waited for them)."""
    cfg, data, real_start = tiny_cfg(nb, tmp_path, num_workers=2), Data(), nb.start_reader
    monkeypatch.setattr(nb, "start_reader", lambda worker_id: (   # in the first forked reader, as it starts
        real_start(worker_id), worker_id == 0 and os.kill(os.getppid(), signal.SIGINT)))
    with pytest.raises(KeyboardInterrupt, match="interrupted at step 1; saved") as kept:
        nb.train_dino(cfg, data, data, torch.device("cpu"), progress=False)
    assert kept.tb is not None and multiprocessing.active_children() == []


def test_a_script_stopped_by_ctrl_c_exits_after_saving(tmp_path):
    """Uncaught, the Ctrl-C's traceback lives until Python exits, and Python's exit waited forever for the
    readers it kept (they leave SIGTERM to their trainer): a preempted job sat until its grace period's kill."""
    script = tmp_path / "stopped.py"
    script.write_text(f"""
import os, signal, sys, torch
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).parent)!r})
from nbloader import load_notebook
from test_train import Data, tiny_cfg
nb = load_notebook()
real_step = nb.train_step
nb.train_step = lambda t, images, read: (
    os.kill(os.getpid(), signal.SIGINT) if t.step == 2 else None, real_step(t, images, read))[1]
nb.train_dino(tiny_cfg(nb, Path({str(tmp_path)!r}), num_workers=2), Data(), Data(), torch.device("cpu"),
              progress=False)
""")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180)
    assert "KeyboardInterrupt: interrupted at step 3; saved" in done.stderr, done.stderr[-2000:]
    assert torch.load(tmp_path / "ck" / "demo" / "last.pth", weights_only=True)["step"] == 3


def test_max_steps_already_reached_trains_no_further(nb, tmp_path):
    cfg, data = tiny_cfg(nb, tmp_path), Data()
    nb.train_dino(cfg, data, data, torch.device("cpu"), max_steps=3, progress=False)
    last = tmp_path / "ck" / cfg.run_name / "last.pth"
    written = last.read_bytes()
    for max_steps in (3, 2):   # a second call, or a smaller bound: it stopped after one more step each time
        trainer, _ = nb.train_dino(cfg, data, data, torch.device("cpu"), max_steps=max_steps, progress=False)
        assert trainer.step == 3 and last.read_bytes() == written


def test_a_checkpoint_of_another_number_of_processes_is_refused_not_taken_for_damaged(nb, tmp_path):
    """Its step stands for another point of the schedule (global batch, steps per epoch, lr): 2 processes resuming
    a run of 1 took its step 10 for damage (outside 0..8), fell back to last.prev.pth and called the run done."""
    cfg, data = tiny_cfg(nb, tmp_path), Data()
    nb.train_dino(cfg, data, data, torch.device("cpu"), max_steps=5, progress=False)
    run_dir = tmp_path / "ck" / cfg.run_name
    state = torch.load(run_dir / "last.pth", weights_only=True)
    assert state["world_size"] == 1
    state["step"] = 3   # within a 2-process run's 4 steps
    for written, refusal in ((2, nb.ConfigError), ("2", nb.CheckpointError)):
        state["world_size"] = written
        torch.save(state, run_dir / "last.pth")
        trainer = nb.DINOTrainer(cfg, len(data), torch.device("cpu"))
        with pytest.raises(refusal, match=r"2 process\(es\), a global batch of 8; this one has 1\. Resume it "
                           r"with torchrun --nproc_per_node=2" if written == 2 else "'2' is not a number"):
            nb.read_training_checkpoint(trainer, run_dir / "last.pth")
        assert trainer.step == 0
    state["world_size"] = 2
    torch.save(state, run_dir / "last.pth")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    with pytest.raises(nb.ConfigError, match="--nproc_per_node=2"):   # no fall-back to last.prev.pth
        nb.train_dino(cfg, data, data, torch.device("cpu"), progress=False)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    state["step"] = 4   # the end of a 2-process run: 2 epochs of 16 images / (4 x 2)
    trainer = nb.DINOTrainer(cfg, len(data), torch.device("cpu"))
    with pytest.raises(nb.ConfigError, match=r"this one has 1\. The run is finished: its teacher.pth is still "
                       r"evaluated as it is; to train it with these processes, choose another run_name"):   # not "Resume it"
        nb.check_processes(state, trainer, run_dir / "last.pth")


def test_a_flat_folder_trains_and_says_evaluation_is_skipped(nb, tmp_path, capsys):
    data = Data()
    data.has_labels, data.root = False, tmp_path / "flat"
    trainer, history = nb.train_dino(tiny_cfg(nb, tmp_path), data, data, torch.device("cpu"), progress=False)
    assert trainer.epoch == trainer.cfg.epochs
    assert "k-NN evaluation skipped" in capsys.readouterr().out
    assert [r for r in history if r["kind"] == "eval"] == []
    with pytest.raises(nb.DataError, match="no class folders"):
        nb.knn_accuracy(trainer.teacher.backbone, data, data, trainer.cfg, torch.device("cpu"))


def test_the_loader_starts_no_more_workers_than_there_are_cores(nb):
    import warnings
    data = Data(n=32)
    batches = nb.epoch_batches(len(data), 4, epoch=0, seed=0)
    cores = len(os.sched_getaffinity(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # torch warns when asked for more workers than cores
        loader = nb.batch_loader(data.images, batches, num_workers=cores + 6)   # paper224 asks for 8
        assert loader._num_workers == cores
        assert reads_the_batches(loader, data.images, batches)


def test_a_signal_to_the_process_group_leaves_the_readers_reading(nb):
    """torchrun passes a SIGTERM or Ctrl-C to each rank's whole process group: the reader processes died of
    it ('DataLoader worker ... is killed by signal: Terminated') before the rank could stop at a step's end
    and save. They leave the signals to their trainer."""
    data = Data(n=32)
    batches = nb.epoch_batches(len(data), 4, epoch=0, seed=0)
    loader = nb.batch_loader(data.images, batches, num_workers=2)
    first = [next(loader) for _ in loader._workers]   # each reader has served a batch: it has started
    for worker in loader._workers:
        for number in (signal.SIGTERM, signal.SIGINT):
            os.kill(worker.pid, number)
    time.sleep(0.5)
    assert all(worker.is_alive() for worker in loader._workers)
    assert reads_the_batches(itertools.chain(first, loader), data.images, batches)


def test_readers_are_forked_whatever_the_default_start_method(nb, tmp_path):
    """macOS and Python 3.14 start processes by spawn or forkserver by default: such a reader cannot import
    the notebook's classes and dies. The loader forks its readers, so they read the same batches."""
    script = tmp_path / "spawned.py"
    script.write_text(f"""
import multiprocessing, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from nbloader import load_notebook
from test_train import Data, reads_the_batches
if __name__ == "__main__":   # (what a spawned process runs again on import)
    for method in ("spawn", "forkserver"):
        multiprocessing.set_start_method(method, force=True)
        nb, data = load_notebook(), Data(n=32)
        batches = nb.epoch_batches(len(data), 4, epoch=0, seed=0)
        assert reads_the_batches(nb.batch_loader(data.images, batches, num_workers=2), data.images, batches)
        print(method, "read", len(batches), "batches")
""")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == ["spawn read 8 batches", "forkserver read 8 batches"]


def test_without_fork_or_an_affinity_mask_the_data_is_still_read(nb, monkeypatch):
    """Where fork is missing the batches are read in the training process; where the system has no
    affinity mask (macOS), every core counts."""
    data = Data(n=32)
    batches = nb.epoch_batches(len(data), 4, epoch=0, seed=0)
    monkeypatch.delattr(os, "sched_getaffinity")
    assert nb.usable_cores() == os.cpu_count()
    monkeypatch.setattr(nb.multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    loader = nb.batch_loader(data.images, batches, num_workers=2)
    assert not isinstance(loader, torch.utils.data.dataloader._BaseDataLoaderIter)
    assert reads_the_batches(loader, data.images, batches)


def settings_cells_run(nb):
    """The notebook's parameters and settings cells, run on a copy of its namespace; torch's thread count after."""
    cells = {cell.get("id"): cell["source"] for cell in notebook_cells(nb.__file__)}
    namespace, threads, states = dict(vars(nb)), torch.get_num_threads(), nb.rng_states()
    try:
        for cell_id in ("cell-011", "cell-012"):
            exec(cells[cell_id], namespace)
        return torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
        nb.set_rng_states(states)   # (the settings cell seeds them)


@pytest.mark.parametrize("given, expected", [(None, None), ("", None), ("1", 1), ("3", 3), (" 2,1 ", 2), ("+2", 2)])
def test_the_settings_cell_keeps_the_thread_count_omp_num_threads_gives(nb, monkeypatch, capsys, given, expected):
    """It set every usable core whatever the environment said: a job given one core of a shared machine took
    them all (the tests' own kernels, started with OMP_NUM_THREADS=1, among them)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    if given is not None:
        monkeypatch.setenv("OMP_NUM_THREADS", given)
    assert nb.cpu_threads() == (expected or nb.usable_cores())
    assert settings_cells_run(nb) == (expected or nb.usable_cores())


@pytest.mark.parametrize("given", ["0", "four", "-2", "2.5", "²", "٣", "10001", "9" * 23])
def test_a_thread_count_that_is_no_whole_number_is_refused_by_name(nb, monkeypatch, given):
    """Not a raw ValueError of int() ('²' passes str.isdigit) or of torch.set_num_threads (a 23-digit count)."""
    monkeypatch.setenv("OMP_NUM_THREADS", given)
    with pytest.raises(nb.ConfigError, match=rf"OMP_NUM_THREADS={given!r}: a whole number of threads from 1 to 10,000"):
        nb.cpu_threads()


def test_a_checkpoint_from_another_device_steps_here(nb, tmp_path):
    """A checkpoint's optimizer groups carry where they were written (capturable on a GPU); after loading,
    the step uses this trainer's own settings: its device-side learning rate, no AdamW weight decay."""
    cfg = tiny_cfg(nb, tmp_path)
    t = nb.DINOTrainer(cfg, 16, torch.device("cpu"))
    nb.train_step(t, torch.from_numpy(Data().images[:4]))
    state = t.optimizer.state_dict()
    for group in state["param_groups"]:
        group.update(capturable=True, lr=0.5, weight_decay=0.04)   # as a GPU run with a float lr saved them
    t.optimizer.load_state_dict(state)
    stats = nb.train_step(t, torch.from_numpy(Data().images[4:8]))
    assert all(g["capturable"] is False and g["lr"] is t.now["lr"] and g["weight_decay"] == 0.0
               for g in t.optimizer.param_groups)
    assert t.now["lr"].item() == pytest.approx(stats["lr"])


def first_draws(state):
    """The 4096 numbers a torch generator in `state` draws first, as a set (two streams that share none)."""
    return set(torch.rand(4096, dtype=torch.float64, generator=torch.Generator().set_state(state)).tolist())


def test_a_runs_random_streams_share_no_numbers(nb, tmp_path, monkeypatch):
    """Drop path draws from the global stream, the crops from the augmentation's generator: both were seeded
    with seed + rank, so every drop-path mask re-read numbers the crops had already used. Now each stream,
    rank and restart has a seed of its own, none of them the weights' seed."""
    data, states = Data(), []
    real_step = nb.train_step

    def first_step(t, images, diagnostics=False):
        if not states:   # the streams as the run's first step finds them
            states.append((torch.get_rng_state(), t.augment.generator.get_state()))
        return real_step(t, images, diagnostics)
    monkeypatch.setattr(nb, "train_step", first_step)
    cfg = tiny_cfg(nb, tmp_path)
    nb.train_dino(cfg, data, data, torch.device("cpu"), max_steps=1, progress=False)
    (global_state, crops_state), = states
    draws = [first_draws(state) for state in states[0]]
    assert not draws[0] & draws[1], "the global stream and the crops' stream repeat each other's numbers"
    weights = first_draws(torch.Generator().manual_seed(cfg.seed).get_state())
    assert not draws[0] & weights, "drop path re-reads the numbers that initialised the weights"
    fresh = [nb.DINOTrainer(cfg, len(data), torch.device("cpu"), rank=rank).augment.generator.get_state()
             for rank in (0, 1)]
    assert not torch.equal(*fresh), "two ranks of a fresh run draw the same crops"
    seeds = [nb.stream_seed(7, stream, rank, step) for stream in nb.SEED_STREAMS for rank in range(4)
             for step in range(4)]
    assert len(set(seeds)) == len(seeds) and 7 not in seeds
    assert nb.stream_seed(7, "crops", 1, 2) == nb.stream_seed(7, "crops", 1, 2)   # a function of its arguments


def test_a_resumed_rank_other_than_0_draws_its_own_random_streams(nb, tmp_path):
    """A checkpoint holds rank 0's generators. Under DDP every rank resumed from it, so all of them drew
    rank 0's crops: now rank 0 restores them, and another rank reseeds from (seed, rank, step), the same
    each time it resumes at that step."""
    data = Data()
    cfg = tiny_cfg(nb, tmp_path)
    nb.train_dino(cfg, data, data, torch.device("cpu"), max_steps=3, progress=False)
    saved = torch.load(tmp_path / "ck" / cfg.run_name / "last.pth", weights_only=True)
    resumed = {}
    for rank in (0, 1, 1, 2):
        trainer = nb.DINOTrainer(cfg, len(data), torch.device("cpu"), rank=rank)   # one process: the loading alone
        nb.load_checkpoint(trainer, tmp_path / "ck" / cfg.run_name / "last.pth")
        streams = (trainer.augment.generator.get_state(), torch.get_rng_state(), np.random.get_state()[1].copy())
        assert trainer.step == 3
        resumed.setdefault(rank, []).append(streams)
    assert torch.equal(resumed[0][0][0], saved["augment"]["generator"])
    assert torch.equal(resumed[0][0][1], saved["rng"]["torch"])
    first, again = resumed[1]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again))   # reproducible
    for other in (resumed[0][0], resumed[2][0]):
        assert not any(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, other))   # its own
    crops, drop_path = (first_draws(state) for state in first[:2])
    assert not crops & drop_path, "a resumed rank's drop path re-reads its crops' numbers"
    trainer = nb.DINOTrainer(cfg, len(data), torch.device("cpu"), rank=1)
    at_step = {}
    for step in (3, 6, 3):
        nb.reseed_rank(trainer, step)
        at_step.setdefault(step, []).append(trainer.augment.generator.get_state())
    assert torch.equal(*at_step[3]) and not torch.equal(at_step[3][0], at_step[6][0]), \
        "a rank resumed at another step replays the same crops"


def test_a_second_ctrl_c_while_the_checkpoint_is_written_waits_for_the_file(nb, tmp_path, monkeypatch):
    """The second Ctrl-C stops at once, but not in the middle of a save: that gave an error of torch's writer
    ("unexpected pos") and no checkpoint of the step."""
    cfg, data = tiny_cfg(nb, tmp_path), Data()
    real_step, real_save = nb.train_step, torch.save

    def interrupted_at_step_2(t, images, diagnostics=False):
        if t.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(t, images, diagnostics)

    def save_interrupted_again(state, f):
        os.kill(os.getpid(), signal.SIGINT)   # the second Ctrl-C, as the file is being written
        return real_save(state, f)
    monkeypatch.setattr(nb, "train_step", interrupted_at_step_2)
    monkeypatch.setattr(torch, "save", save_interrupted_again)
    with pytest.raises(KeyboardInterrupt) as stopped:
        nb.train_dino(cfg, data, data, torch.device("cpu"), progress=False)
    monkeypatch.undo()
    assert not isinstance(stopped.value.__context__, RuntimeError)
    assert torch.load(tmp_path / "ck" / cfg.run_name / "last.pth", weights_only=True)["step"] == 3


def test_a_finished_run_says_it_only_loads(nb, tmp_path, capsys):
    cfg, data = tiny_cfg(nb, tmp_path), Data()
    nb.train_dino(cfg, data, data, torch.device("cpu"), progress=False)
    capsys.readouterr()
    trainer, _ = nb.train_dino(cfg, data, data, torch.device("cpu"), progress=False)
    said = capsys.readouterr().out
    assert trainer.step == 8 and "the run is finished (step 8, 2 epochs): loaded, nothing to train" in said
    assert "resuming" not in said


def test_a_stop_right_after_the_teacher_is_exported_leaves_no_last_prev_on_the_re_run(nb, tmp_path, monkeypatch):
    """A run's end exports teacher.pth, then removes last.prev.pth; a Ctrl-C or a kill between the two left a
    whole training checkpoint that no re-run removed: a re-run of a finished run skipped both."""
    cfg, data = tiny_cfg(nb, tmp_path), Data()
    run_dir = tmp_path / "ck" / cfg.run_name

    def stopped(folder):
        raise KeyboardInterrupt("stopped between the export and the clean-up")
    monkeypatch.setattr(nb, "finish_run_files", stopped)
    with pytest.raises(KeyboardInterrupt, match="between the export"):
        nb.train_dino(cfg, data, data, torch.device("cpu"), progress=False)
    assert (run_dir / "teacher.pth").is_file() and (run_dir / "last.prev.pth").is_file()
    monkeypatch.undo()
    trainer, _ = nb.train_dino(cfg, data, data, torch.device("cpu"), progress=False)
    assert trainer.step == 8 and not (run_dir / "last.prev.pth").exists() and (run_dir / "last.pth").is_file()


def test_a_second_interrupt_stops_at_once_and_says_what_was_kept(nb):
    with nb.DeferredInterrupt() as interrupt:
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupt.pending   # held: the step goes on
        with pytest.raises(KeyboardInterrupt, match="a second interrupt: stopped at once.*nothing was saved since "
                                                    "the last checkpoint, which a re-run resumes from"):
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_run_whose_last_layer_stays_frozen_throughout_says_so(nb, tmp_path, capsys):
    data, note = Data(), "the head's last layer keeps its initial weights throughout"
    for epochs, freeze_last_layer, says in ((1, 1, True), (2, 1, False), (1, 0, False)):
        cfg = tiny_cfg(nb, tmp_path / f"{epochs}-{freeze_last_layer}", epochs=epochs,
                       freeze_last_layer=freeze_last_layer)
        nb.train_dino(cfg, data, data, torch.device("cpu"), max_steps=1, progress=False)
        assert (note in capsys.readouterr().out) == says, (epochs, freeze_last_layer)


def test_a_run_whose_data_changed_is_not_resumed_on_the_new_schedule(nb, tmp_path):
    """Photos added to or removed from data_root change the steps of an epoch: the saved step would stand for
    another point of the schedule (a grown run trained on past its end and saved nothing; a shrunk one was
    called finished and exported early). Refused, naming both counts; nothing in the run's folder changes."""
    cfg = tiny_cfg(nb, tmp_path)   # 16 images: 4 steps an epoch, 8 in all
    nb.train_dino(cfg, Data(n=16), Data(n=16), torch.device("cpu"), max_steps=6, progress=False)
    run_dir = tmp_path / "ck" / cfg.run_name
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    for n in (24, 12):   # grown: 6 steps an epoch; shrunk: 3, so step 6 would end the run
        with pytest.raises(nb.ConfigError, match=rf"last.pth: a run on 16 training images, but the data now give "
                                                 rf"{n} .*: restore the data \(or the notebook version that read them so\) to resume it, or "
                                                 rf"train anew under"):
            nb.train_dino(cfg, Data(n=n), Data(n=n), torch.device("cpu"), progress=False)
        assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    resumed, _ = nb.train_dino(cfg, Data(n=16), Data(n=16), torch.device("cpu"), progress=False)
    assert resumed.step == 8 and (run_dir / "teacher.pth").is_file()
    with pytest.raises(nb.ConfigError, match=r"a finished run on 16 training images, but the data now give 24 .*: "
                                             r"its teacher.pth is still evaluated as it is; to train on these data"):
        nb.train_dino(cfg, Data(n=24), Data(n=24), torch.device("cpu"), progress=False)


def test_an_older_checkpoint_that_does_not_count_its_images_is_not_resumed_on_another_schedule(nb, tmp_path):
    """Files written before train_images was recorded resumed on whatever the data gave: a folder whose test/
    an older notebook had read as a class, now a held-out split, went on at its step with other epochs, images
    and labels. Their epoch and batch say how many steps their epochs had."""
    cfg = tiny_cfg(nb, tmp_path)   # 16 images: 4 steps an epoch; stopped at step 6 = epoch 1, batch 2
    nb.train_dino(cfg, Data(n=16), Data(n=16), torch.device("cpu"), max_steps=6, progress=False)
    last = tmp_path / "ck" / cfg.run_name / "last.pth"
    state = torch.load(last, weights_only=False)
    for key in ("train_images", "data_images"):
        del state[key]
    torch.save(state, last)
    with pytest.raises(nb.ConfigError, match=r"last.pth: its step 6 is batch 2 of epoch 1, but this run has 6 steps an "
                                             r"epoch .*: the data, or how this notebook reads them, changed"):
        nb.train_dino(cfg, Data(n=24), Data(n=24), torch.device("cpu"), progress=False)
    resumed, _ = nb.train_dino(cfg, Data(n=16), Data(n=16), torch.device("cpu"), progress=False)
    assert resumed.step == 8


def test_a_capped_run_whose_data_changed_is_not_resumed_on_other_images(nb, tmp_path):
    """With max_train_images, photos added leave the images an epoch unchanged, but each epoch draws them from
    another pool: the run went on without a word on other images than it would have trained on. Refused,
    naming both counts; a run on the data it was written with resumes."""
    cfg = tiny_cfg(nb, tmp_path, max_train_images=12)   # 12 of 16 images an epoch: 3 steps, 6 in all
    nb.train_dino(cfg, Data(n=16), Data(n=16), torch.device("cpu"), max_steps=4, progress=False)
    run_dir = tmp_path / "ck" / cfg.run_name
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    with pytest.raises(nb.ConfigError, match=r"last.pth: a run on 12 training images an epoch of 16, but the data now "
                                             r"give 12 training images an epoch of 20 .*; its steps would draw other "
                                             r"images: restore the data \(or the notebook version that read them so\) to "
                                             r"resume it"):
        nb.train_dino(cfg, Data(n=20), Data(n=20), torch.device("cpu"), progress=False)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    resumed, _ = nb.train_dino(cfg, Data(n=16), Data(n=16), torch.device("cpu"), progress=False)
    assert resumed.step == 6


def test_the_progress_bar_is_drawn_every_mininterval_not_every_logged_step(nb, tmp_path, capsys):
    """set_postfix redrew the bar at every logged step (log_every_steps=1 in the demo): a notebook saved by
    papermill or Jupyter kept a line per step. It is drawn when opened, at most every 10 s, and when closed."""
    cfg = tiny_cfg(nb, tmp_path, epochs=1, warmup_epochs=0, max_train_images=0)   # 8 steps, each logged
    nb.train_dino(cfg, Data(n=32), Data(n=16), torch.device("cpu"), progress=True)
    drawn = [line for line in capsys.readouterr().out.replace("\r", "\n").splitlines() if line.startswith("epoch 1/1")]
    assert drawn[-1].startswith("epoch 1/1: 100%") and "8/8" in drawn[-1] and "loss=" in drawn[-1]
    assert len(drawn) <= 3, drawn


def test_a_stopped_epochs_bar_counts_the_step_it_stopped_after(nb, tmp_path, capsys):
    """tqdm counts a step when the next begins: a run stopped after step 3 (max_steps, or a Ctrl-C whose
    message says 'interrupted at step 3') was left showing 2/8 above it."""
    cfg = tiny_cfg(nb, tmp_path, epochs=1, warmup_epochs=0, max_train_images=0)   # 8 steps an epoch
    trainer, _ = nb.train_dino(cfg, Data(n=32), Data(n=16), torch.device("cpu"), max_steps=3, progress=True)
    drawn = [line for line in capsys.readouterr().out.replace("\r", "\n").splitlines() if line.startswith("epoch 1/1")]
    assert trainer.step == 3 and " 3/8 " in drawn[-1], drawn


def test_every_epoch_is_summed_up_though_it_has_fewer_steps_than_log_every_steps(nb, tmp_path, capsys):
    """An epoch's last step is always logged, so its summary and the stall alarm have figures (with 4 steps an
    epoch and log_every_steps 10, two of three epochs printed 'loss nan')."""
    cfg = tiny_cfg(nb, tmp_path, epochs=3, warmup_epochs=1, log_every_steps=10)
    _, rows = nb.train_dino(cfg, Data(), Data(), torch.device("cpu"), progress=False)
    assert [r["step"] for r in rows if r["kind"] == "step"] == [1, 4, 8, 11, 12]   # steps 0 and 10 taken, and each last
    summaries = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert len(summaries) == 3 and not any("nan" in line for line in summaries), summaries


def test_a_finished_run_whose_checkpoints_were_deleted_only_loads(nb, tmp_path, capsys):
    """Keeping only teacher.pth (save_every_epochs=0, last.pth deleted to save disk): the re-run retrained from
    step 0, emptied the log, then redid its last epoch at every later run. It is finished: nothing is trained,
    nothing in its folder changes, and its history is its log's."""
    cfg = tiny_cfg(nb, tmp_path, save_every_epochs=0)
    _, rows = nb.train_dino(cfg, Data(), Data(), torch.device("cpu"), progress=False)
    run_dir = tmp_path / "ck" / cfg.run_name
    (run_dir / "last.pth").unlink()
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    capsys.readouterr()
    trainer, history = nb.train_dino(cfg, Data(), Data(), torch.device("cpu"), progress=False)
    assert trainer is None and history == rows
    assert "the run is finished and its training checkpoints are gone" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


def test_a_run_of_a_patch_size_that_does_not_divide_the_default_crops_resumes_and_finishes(nb, tmp_path):
    """Patch 14 (DINOv2's) at 28-pixel crops: a checkpoint's claimed config was rebuilt from the defaults'
    64/32-pixel crops, which 14 does not divide, so the run's own last.pth was 'damaged' and its end could
    not write teacher.pth."""
    cfg = tiny_cfg(nb, tmp_path, patch_size=14, img_size=28, global_crop_size=28, local_crop_size=14)
    half, _ = nb.train_dino(cfg, Data(), Data(), torch.device("cpu"), max_steps=3, progress=False)
    resumed, _ = nb.train_dino(cfg, Data(), Data(), torch.device("cpu"), progress=False)
    assert half.step == 3 and resumed.step == 8
    teacher = torch.load(tmp_path / "ck" / cfg.run_name / "teacher.pth", weights_only=True)
    assert teacher["patch_embed.proj.weight"].shape[-1] == 14


def test_the_demonstration_runs_are_a_vit_tiny_whatever_the_profiles_arch(nb, tmp_path):
    """The checks that train in seconds (the kill check, centring and sharpening switched off) are described
    as ViT-Ti/16 runs; under arch=vit_small they were ViT-S/16 runs, slower and not what the prose says."""
    for arch in ("vit_small", "vit_base"):
        shrunk = nb.seconds_long(nb.make_config("demo", arch=arch), epochs=2)
        assert (shrunk.arch, shrunk.patch_size, shrunk.epochs) == ("vit_tiny", 16, 2)


def test_an_epoch_is_saved_before_its_k_nn(nb, tmp_path, monkeypatch):
    """A kill during an epoch's k-NN (long on a large set; torchrun kills the ranks 30 s after passing a
    signal on) lost the whole epoch: its checkpoints were written after the evaluation. They come first."""
    cfg = tiny_cfg(nb, tmp_path, epochs=2)
    evaluate = nb.knn_accuracy
    def killed_after_the_first_epoch(backbone, train_set, val_set, cfg, device, *args):
        if any(r.get("kind") == "step" for r in nb.read_log(nb.run_directory(cfg) / "log.jsonl")):
            raise KeyboardInterrupt("killed during the k-NN")
        return evaluate(backbone, train_set, val_set, cfg, device, *args)
    monkeypatch.setattr(nb, "knn_accuracy", killed_after_the_first_epoch)
    with pytest.raises(KeyboardInterrupt, match="during the k-NN"):
        nb.train_dino(cfg, Data(), Data(), torch.device("cpu"), progress=False)
    run_dir = nb.run_directory(cfg)
    assert torch.load(run_dir / "last.pth", weights_only=True)["step"] == 4   # the epoch's 16 images / 4
    assert (run_dir / "epoch_0001.pth").is_file()
    monkeypatch.setattr(nb, "knn_accuracy", evaluate)
    trainer, history = nb.train_dino(cfg, Data(), Data(), torch.device("cpu"), progress=False)   # resumes there
    assert trainer.step == 8 and [r["step"] for r in history if r["kind"] == "eval"] == [0, 4, 8]
