"""The stall alarm: one plain warning when, after the warm-up, the teacher stays near-uniform (the student
copying it) or collapses onto a few prototypes; quiet otherwise."""
import math

import torch

from test_train import Data, tiny_cfg


def rows(entropy, kl, n=4):
    return [dict(entropy=entropy, kl=kl)] * n


def test_the_alarm_reads_the_figures(nb, tmp_path):
    cfg = tiny_cfg(nb, tmp_path, out_dim=1024, warmup_epochs=1)
    log_k = math.log(1024)
    uniform = nb.stall_alarm(rows(0.97 * log_k, 0.05), cfg, epoch=1)
    assert "near-uniform" in uniform and f"{0.97 * log_k:.2f} of at most {log_k:.2f}" in uniform
    assert "`short` profile" in uniform and "koleo_weight=0.1" in uniform   # says what to try
    assert "out_dim=4096" in uniform and "norm_last_layer" not in uniform and "momentum_teacher" not in uniform
    short = nb.make_config("short", warmup_epochs=1)   # nothing of its recipe to offer it again
    short_alarm = nb.stall_alarm(rows(0.97 * math.log(short.out_dim), 0.05), short, epoch=1)
    assert "koleo_weight" not in short_alarm and "Settings to try: a longer run, or more images per class" in short_alarm
    changed = nb.make_config("short", warmup_epochs=1, koleo_weight=0.0)   # told its own profile's part back
    assert "Settings to try: the `short` profile's koleo_weight=0.1;" in nb.stall_alarm(
        rows(0.97 * math.log(changed.out_dim), 0.05), changed, epoch=1)
    collapse = nb.stall_alarm(rows(0.01, 0.001), cfg, epoch=1)
    assert "few prototypes" in collapse and "teacher_temp" not in collapse   # a sharper teacher works against it
    assert "koleo_weight=0.1" in collapse
    assert "few prototypes" in nb.stall_alarm(rows(0.06 * log_k, 0.18), cfg, epoch=1)  # collapsed, the KL still 0.18
    assert nb.stall_alarm(rows(0.1 * log_k, 0.5 * log_k), cfg, epoch=1) is None   # sharp, but the images differ
    assert nb.stall_alarm(rows(0.6 * log_k, 1.2), cfg, epoch=1) is None     # healthy
    assert nb.stall_alarm(rows(0.97 * log_k, 2.0), cfg, epoch=1) is None    # uniform teacher, student still learning
    assert nb.stall_alarm(rows(0.97 * log_k, 0.05), cfg, epoch=0) is None   # during the warm-up
    assert nb.stall_alarm([], cfg, epoch=3) is None


def alarms_of_a_run(nb, tmp_path, capsys, epochs=4, **settings):
    data = Data()
    cfg = tiny_cfg(nb, tmp_path, epochs=epochs, warmup_epochs=1, out_dim=256, base_lr=0.3, **settings)
    _, history = nb.train_dino(cfg, data, data, torch.device("cpu"), progress=False)
    return [r for r in history if r["kind"] == "alarm"], capsys.readouterr().out


def test_a_run_that_stalls_is_told_once(nb, tmp_path, capsys):
    """No sharpening (a teacher softer than the student, 0.2 against 0.1): the centred teacher goes
    near-uniform and the student copies it within a few epochs of 4 steps."""
    alarms, out = alarms_of_a_run(nb, tmp_path, capsys, teacher_temp=0.2, warmup_teacher_temp=0.2)
    assert len(alarms) == 1 and alarms[0]["epoch"] >= 2
    assert out.count("WARNING: training has stalled") == 1 and "near-uniform" in out


def test_the_same_run_sharpened_is_not_alarmed(nb, tmp_path, capsys):
    alarms, out = alarms_of_a_run(nb, tmp_path, capsys, teacher_temp=0.04, warmup_teacher_temp=0.04)
    assert alarms == [] and "stalled" not in out


def test_a_run_without_centring_is_told_it_collapsed(nb, tmp_path, capsys):
    """Centring off (the centre stays at zero), a sharp teacher: one prototype takes over every image. In 4
    epochs some random streams leave the teacher's entropy at 0.2 of log K, on the alarm's line; in 8 it is
    under 0.15 with the KL under 0.1 for seeds 0 to 3, every one alarmed."""
    alarms, out = alarms_of_a_run(nb, tmp_path, capsys, epochs=8, center_momentum=1.0, teacher_temp=0.04,
                                  warmup_teacher_temp=0.04)
    assert len(alarms) == 1 and "few prototypes" in alarms[0]["message"]
    assert out.count("WARNING: training has stalled") == 1


def test_a_learning_rate_above_the_short_runs_is_named_first(nb):
    """The linear rule (lr = base_lr * batch_size * processes / 256) takes the `short` profile's 5e-4 at batch 32
    to 4e-3 at batch 256. At 4e-3 the 15-epoch run of the generated set went uniform by epoch 3 (learn-cpu-short-
    e15-lr4e-3.json; at 5e-4 the same run gained 11.7 points), and the alarm offered only a longer run."""
    def advice(cfg, world_size=1, entropy=0.97):
        alarm = nb.stall_alarm(rows(entropy * math.log(cfg.out_dim), 0.05), cfg, epoch=1, world_size=world_size)
        return alarm.split("Settings to try: ")[1]
    big = nb.make_config("short", warmup_epochs=1, batch_size=256)
    assert advice(big).startswith("a lower learning rate: base_lr=0.0005 for the peak of 5.0e-04 ")
    assert "(this run's: 4.0e-03, " in advice(big) and "; or a longer run, or more images per class" in advice(big)
    two = nb.make_config("short", warmup_epochs=1, batch_size=128)   # two processes of 128: the same step
    assert advice(two, world_size=2) == advice(big) and "(this run's: 2.0e-03, " in advice(two)
    assert "learning rate" not in advice(nb.make_config("short", warmup_epochs=1))   # the short runs' own peak
    assert "learning rate" not in advice(nb.make_config("short", warmup_epochs=1, batch_size=256, base_lr=5e-4))
    assert advice(big, entropy=0.001).startswith("a lower learning rate")   # a collapse too
    paper = nb.make_config("imagenet64", warmup_epochs=1, batch_size=1024)   # the paper's 2e-3, then its parts
    assert advice(paper).startswith("a lower learning rate: base_lr=0.00013 ") and "koleo_weight=0.1" in advice(paper)
