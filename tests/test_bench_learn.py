"""bench_learn.py, the learning benchmark, end to end on a few tiny images: it writes the JSON the learning
evidence is read from, each epoch with the keys asked of it (epoch 0 = random init, its training figures
null), and with --fit-epochs runs the settings the budget rule gives. Its learning figures are not checked
here (they live in tests/benchmarks/results/), only that the command runs and writes what it says."""
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import nbloader

BENCH = Path(__file__).resolve().parent / "benchmarks" / "bench_learn.py"
EPOCH_KEYS = {"epoch", "knn_top1", "loss", "entropy", "kl", "images_per_s", "attention_jaccard"}


def run_bench(tmp_path, *args):
    done = subprocess.run([sys.executable, str(BENCH), "--name", "tiny", "--images", "48", "--val-images", "16",
                           "--bank", "48", "--img-size", "16", "--out", str(tmp_path), *args,
                           "--set", "patch_size=8", "batch_size=8", "out_dim=64", "n_local_crops=2",
                           "num_workers=0", "head_hidden_dim=32", "head_bottleneck_dim=16"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp_path / "learn-tiny.json").read_text()), done.stdout


def test_it_writes_the_curve_with_every_key(tmp_path):
    """...and its first line names the date, the machine and the command: figures copied into results/ carried
    them only where someone had typed them in."""
    result, out = run_bench(tmp_path, "--set", "epochs=2", "warmup_epochs=1", "--minutes", "2")
    assert {"machine", "device", "profile", "settings", "data", "minutes", "raw_pixel_knn"} <= set(result)
    assert result["settings"]["epochs"] == 2 and result["config"]["patch_size"] == 8
    assert [e["epoch"] for e in result["epochs"]] == [0, 1, 2]
    assert all(EPOCH_KEYS <= set(e) for e in result["epochs"])
    assert [result["epochs"][0][k] for k in ("loss", "entropy", "kl", "images_per_s")] == [None] * 4
    assert all(e["loss"] > 0 and e["images_per_s"] > 0 for e in result["epochs"][1:])
    assert (tmp_path / "learn-tiny-attention.jpg").stat().st_size > 0
    first = out.splitlines()[0]
    assert re.fullmatch(r"# \d{4}-\d\d-\d\d \d\d:\d\d UTC, .+ \(\d+ cores, \d+ threads\), torch \S+, command: "
                        r"python tests/benchmarks/bench_learn\.py --name tiny .*", first), first
    assert result["machine"] in first and nbloader.cpu_model() in first


def test_fit_epochs_runs_the_budget_rules_settings(tmp_path):
    """A budget of fewer epochs than the warm-up asked: the run is the budget_settings of the epochs that fit,
    its warm-up cut to fit inside them."""
    result, out = run_bench(tmp_path, "--fit-epochs", "--minutes", "0.5", "--set", "epochs=1000", "warmup_epochs=999")
    fitted = result["fitted"]   # the budget holds far fewer than 1,000 epochs on any CPU, and at least one
    assert "fit:" in out and 1 <= fitted["epochs"] < 1000
    assert out.splitlines()[0].startswith("# ") and "command: python tests/benchmarks/bench_learn.py" in out.splitlines()[0]
    assert fitted["settings"]["epochs"] == result["config"]["epochs"] == fitted["epochs"]
    assert result["config"]["warmup_epochs"] == fitted["epochs"] - 1


@pytest.mark.parametrize("args, says", [
    (["--out", "/dev/null/results"], "--out=/dev/null/results: cannot write there"),
    (["--bank", "0"], "--bank=0: must be >= 1"),
    (["--images", "4"], "--images=4: its fifth, the default held-out set, holds no image"),
    (["--set", "arch=vit_nope"], "Config.arch='vit_nope': must be one of")])
def test_a_bad_argument_is_one_line_before_the_run_not_a_traceback_after_it(tmp_path, args, says):
    """An unwritable --out failed after the whole run (5.5 minutes on the lent GPU); --bank 0 recorded a bank
    of 0 while every image voted; a bad --set printed a traceback."""
    temporary = lambda: set(Path(tempfile.gettempdir()).glob("bench-learn-*"))
    before = temporary()
    done = subprocess.run([sys.executable, str(BENCH), "--name", "bad", "--out", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr
    assert temporary() <= before   # no checkpoint folder left behind (a refused --set made one)
    assert done.stdout == "" and not (tmp_path / "learn-bad.json").exists()
