"""epochs_for_budget: the whole epochs a run's settings train in a budget, from steps timed on this
machine, with the run itself left as it would have been. The steps run for real, but the notebook's clock
here is a test clock that moves STEP_SECONDS a step and what a test adds (a slow start): the budget's
arithmetic is checked exactly, whatever this machine's speed. How well it sizes real runs is measured by
tests/benchmarks/bench_budget.py and bench_learn.py --fit-epochs."""
import dataclasses
import itertools
import math
import multiprocessing
import time
import types

import pytest
import torch

from test_train import Data, tiny_cfg

STEP_SECONDS = 0.25


class StepClock:
    """perf_counter for the notebook: it moves only when a step runs or a test advances it."""
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


@pytest.fixture(autouse=True)
def clock(nb, monkeypatch):
    test_clock, real_step = StepClock(), nb.train_step

    def step(*args, **kwargs):
        test_clock.advance(STEP_SECONDS)
        return real_step(*args, **kwargs)
    monkeypatch.setattr(nb, "time", types.SimpleNamespace(**{**vars(time), "perf_counter": test_clock}))
    monkeypatch.setattr(nb, "train_step", step)
    return test_clock


def usable(budget, seconds):
    """What a budget of `seconds` (its spare already kept) leaves for epochs: the sizing took its time, and
    the run's start will take its own once more."""
    return seconds - budget["sizing_seconds"] - budget["start_seconds"]


def test_the_epochs_follow_from_the_timed_steps(nb, tmp_path):
    cfg, data = tiny_cfg(nb, tmp_path, epochs=3), Data(n=16)   # 4 steps of 4 images an epoch
    budget = nb.epochs_for_budget(cfg, data, torch.device("cpu"), minutes=0.5, warmup_steps=1, timed_steps=4,
                                  min_seconds=0, spare=0)
    seconds_per_step = cfg.batch_size / budget["images_per_s"]
    assert budget["timed_steps"] == 4 and budget["images_per_epoch"] == 16
    assert budget["seconds_per_epoch"] == pytest.approx(4 * seconds_per_step)
    assert budget["epochs"] == math.floor(usable(budget, 30) / budget["seconds_per_epoch"]) > 0
    with_eval = nb.epochs_for_budget(cfg, data, torch.device("cpu"), minutes=0.5, eval_seconds=10.0,
                                     warmup_steps=1, timed_steps=4, min_seconds=0, spare=0)
    assert with_eval["epochs"] == math.floor(usable(with_eval, 30) / with_eval["seconds_per_epoch"]) <= 2
    assert nb.epochs_for_budget(cfg, data, torch.device("cpu"), minutes=0.01, eval_seconds=1.0,
                                warmup_steps=1, timed_steps=1, min_seconds=0)["epochs"] == 0   # not one fits


def test_steps_are_timed_until_min_seconds_have_passed(nb, tmp_path):
    """Rounds of 3 timed steps of 0.25 s until 1.5 s have passed: two rounds, 6 steps."""
    cfg = tiny_cfg(nb, tmp_path, epochs=100)   # a schedule of 400 steps: time runs out first
    budget = nb.epochs_for_budget(cfg, Data(n=16), torch.device("cpu"), minutes=1, warmup_steps=1, timed_steps=3,
                                  min_seconds=1.5)
    assert budget["timed_steps"] == 6
    assert budget["images_per_s"] == pytest.approx(cfg.batch_size / STEP_SECONDS)


def test_the_start_of_the_run_is_taken_from_the_budget_once(nb, tmp_path, monkeypatch, clock):
    """A run starts its reader processes and initialises lazily once: what the warm-up steps took beyond
    steady steps comes off the budget, not off every epoch."""
    cfg, run_loader = tiny_cfg(nb, tmp_path, epochs=10, num_workers=2), nb.run_loader

    def slow_run_loader(*args):
        clock.advance(3.0)   # a start that takes 3 s more: three epochs of 4 steps
        return run_loader(*args)

    monkeypatch.setattr(nb, "run_loader", slow_run_loader)
    budget = nb.epochs_for_budget(cfg, Data(n=16), torch.device("cpu"), minutes=1, warmup_steps=2, timed_steps=4,
                                  min_seconds=0, spare=0)
    assert budget["start_seconds"] == pytest.approx(3.0)   # the start is counted ...
    assert budget["seconds_per_epoch"] == pytest.approx(4 * STEP_SECONDS)   # ... but not in the epochs
    assert budget["epochs"] == math.floor(usable(budget, 60) / budget["seconds_per_epoch"])


def test_a_ctrl_c_during_the_sizing_leaves_no_reader_running(nb, tmp_path, monkeypatch):
    """A Ctrl-C while the throwaway run waits for a batch is raised inside the loader, whose frames its
    traceback keeps: the readers outlived it, and Python's exit then waited for them forever."""
    cfg, calls = tiny_cfg(nb, tmp_path, epochs=10, num_workers=2), itertools.count()
    waiting, get_data = torch.utils.data.dataloader._MultiProcessingDataLoaderIter, \
        torch.utils.data.dataloader._MultiProcessingDataLoaderIter._get_data

    def ctrl_c_while_waiting(loader):   # where Python raises it when the third batch is awaited
        if next(calls) == 2:
            raise KeyboardInterrupt
        return get_data(loader)
    monkeypatch.setattr(waiting, "_get_data", ctrl_c_while_waiting)
    with pytest.raises(KeyboardInterrupt) as kept:
        nb.epochs_for_budget(cfg, Data(n=16), torch.device("cpu"), minutes=1, warmup_steps=1, timed_steps=4)
    assert kept.tb is not None and multiprocessing.active_children() == []

def test_a_spare_fraction_of_the_budget_is_kept(nb, tmp_path):
    """By default 5% of the budget is kept against the estimate's error (runs took up to 5.5% longer)."""
    cfg = tiny_cfg(nb, tmp_path, epochs=100)
    for spare, kept in [(None, 0.05), (0.5, 0.5)]:
        budget = nb.epochs_for_budget(cfg, Data(n=16), torch.device("cpu"), minutes=3, warmup_steps=1,
                                      timed_steps=4, min_seconds=0, **({} if spare is None else dict(spare=spare)))
        assert budget["epochs"] == math.floor(usable(budget, 180 * (1 - kept)) / budget["seconds_per_epoch"]) > 0


def test_a_start_longer_than_the_budget_leaves_no_epoch(nb, tmp_path, monkeypatch, clock):
    cfg, run_loader = tiny_cfg(nb, tmp_path, epochs=10), nb.run_loader

    def slow_run_loader(*args):
        clock.advance(1.0)   # a second to start: more than the 0.6 s budget
        return run_loader(*args)

    monkeypatch.setattr(nb, "run_loader", slow_run_loader)
    budget = nb.epochs_for_budget(cfg, Data(n=16), torch.device("cpu"), minutes=0.01, warmup_steps=2,
                                  timed_steps=4, min_seconds=0)
    assert budget["start_seconds"] == pytest.approx(1.0) and budget["epochs"] == 0


def test_the_sizing_takes_its_own_time_from_the_budget(nb, tmp_path, monkeypatch, clock):
    """Building the throwaway trainer, timing and cleaning up are spent from the budget the user gave: a
    second spent before the first step comes off a 3 s budget, and fewer epochs fit than without it."""
    cfg, trainer_class = tiny_cfg(nb, tmp_path, epochs=100), nb.DINOTrainer

    def slow_trainer(*args):
        clock.advance(1.0)
        return trainer_class(*args)

    monkeypatch.setattr(nb, "DINOTrainer", slow_trainer)
    budget = nb.epochs_for_budget(cfg, Data(n=16), torch.device("cpu"), minutes=0.05, warmup_steps=1,
                                  timed_steps=4, min_seconds=0, spare=0)
    assert budget["sizing_seconds"] >= 1.0
    assert budget["epochs"] == max(0, math.floor(usable(budget, 3) / budget["seconds_per_epoch"]))
    assert budget["epochs"] < math.floor((3 - budget["start_seconds"]) / budget["seconds_per_epoch"])


def test_max_train_images_sets_the_epoch(nb, tmp_path):
    cfg = tiny_cfg(nb, tmp_path, max_train_images=8)
    budget = nb.epochs_for_budget(cfg, Data(n=16), torch.device("cpu"), minutes=1, warmup_steps=0, timed_steps=2,
                                  min_seconds=0)
    assert budget["images_per_epoch"] == 8


def test_timing_stays_within_a_short_schedule(nb, tmp_path):
    """A run of 1 epoch of 2 steps: 3 + 10 steps, or 10 seconds of them, would run past its schedules, so 2
    are run, 1 timed."""
    cfg = tiny_cfg(nb, tmp_path, epochs=1, warmup_epochs=0)
    budget = nb.epochs_for_budget(cfg, Data(n=8), torch.device("cpu"), minutes=1)
    assert budget["timed_steps"] == 1 and budget["epochs"] >= 1


def test_the_run_after_it_is_the_run_without_it(nb, tmp_path):
    """The throwaway trainer leaves the global random state (drop path draws from it) as it found it."""
    cfg, data = tiny_cfg(nb, tmp_path, drop_path_rate=0.1), Data(n=16)

    def two_steps(measure_first):
        nb.seed_everything(cfg.seed)
        if measure_first:
            nb.epochs_for_budget(cfg, data, torch.device("cpu"), minutes=1, warmup_steps=1, timed_steps=2,
                                 min_seconds=0)
        trainer = nb.DINOTrainer(cfg, len(data), torch.device("cpu"))
        batches = nb.epoch_batches(len(data), cfg.batch_size, 0, cfg.seed)
        return [nb.train_step(trainer, torch.from_numpy(data.images[b]))["loss"] for b in batches[:2]]

    assert two_steps(measure_first=True) == two_steps(measure_first=False)


@pytest.mark.parametrize("bad", [dict(minutes=0), dict(minutes=float("nan")), dict(minutes=1, timed_steps=0),
                                 dict(minutes=1, eval_seconds=-1.0), dict(minutes=1, spare=1.0),
                                 dict(minutes=1, spare=-0.1)])
def test_a_meaningless_budget_is_refused(nb, tmp_path, bad):
    with pytest.raises(ValueError, match="epochs_for_budget needs"):
        nb.epochs_for_budget(tiny_cfg(nb, tmp_path), Data(n=16), torch.device("cpu"), **bad)


def test_the_settings_it_gives_cut_the_warm_ups_that_would_fill_the_run(nb, tmp_path):
    """A budget of one epoch gave epochs=1 with the `short` profile's warm-up of 1: the learning rate rose the
    whole run and ended at its peak, and the last layer never trained. The settings now cut what would fill
    the run, and leave what fits."""
    short = nb.make_config("short", warmup_epochs=3, freeze_last_layer=2, warmup_teacher_temp_epochs=2)
    assert nb.budget_settings(short, 0) == {}
    assert nb.budget_settings(short, 1) == dict(epochs=1, warmup_epochs=0, freeze_last_layer=0)   # (the profile's
    # warmup_teacher_temp_epochs is 0: the cut one, back to the profile's, is no override)
    kept = dict(warmup_epochs=3, freeze_last_layer=2, warmup_teacher_temp_epochs=2)   # short's own overrides
    assert nb.budget_settings(short, 3) == dict(kept, epochs=3, warmup_epochs=2)
    assert nb.budget_settings(short, 20) == dict(kept, epochs=20)
    one_epoch = nb.make_config("short", **nb.budget_settings(short, 1))
    schedule = nb.make_schedules(one_epoch, 10)["lr"]
    assert schedule[-1] < 0.05 * schedule.max()   # it decays to its end within the one epoch
    cfg = tiny_cfg(nb, tmp_path, epochs=2)
    budget = nb.epochs_for_budget(cfg, Data(n=16), torch.device("cpu"), minutes=0.5, warmup_steps=1,
                                  timed_steps=2, min_seconds=0)
    assert budget["settings"] == nb.budget_settings(cfg, budget["epochs"])


def test_the_settings_are_the_run_made_from_its_profile(nb):
    """The settings were the epochs and the cut warm-ups alone: make_config(profile, **settings), as the notebook
    says to pass them on, dropped the config's own overrides (another batch size, another run) or was refused
    (the profile's 10 warm-up epochs in a 5-epoch run, where the overrides had a warm-up of 1)."""
    paper = nb.make_config("imagenet64", warmup_epochs=1, warmup_teacher_temp_epochs=2, momentum_teacher=0.996)
    run = nb.make_config("imagenet64", **nb.budget_settings(paper, 5))
    assert run == dataclasses.replace(paper, epochs=5)
    short = nb.make_config("short", batch_size=64)
    run = nb.make_config("short", **nb.budget_settings(short, 1))
    assert (run.batch_size, run.epochs, run.warmup_epochs) == (64, 1, 0)
    assert nb.budget_settings(nb.make_config("short"), 12) == {"epochs": 12}   # nothing else differs from the profile


def test_a_run_all_warm_up_says_so(nb, tmp_path, capsys):
    data = Data(n=8)
    nb.train_dino(tiny_cfg(nb, tmp_path, epochs=1, warmup_epochs=1), data, data, torch.device("cpu"),
                  progress=False)
    assert "note: warmup_epochs=1 covers every epoch of this 1-epoch run" in capsys.readouterr().out
    nb.train_dino(tiny_cfg(nb, tmp_path, epochs=2, warmup_epochs=1, run_name="fits"), data, data,
                  torch.device("cpu"), progress=False)
    assert "warmup_epochs" not in capsys.readouterr().out
