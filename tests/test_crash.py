"""Crash consistency: a CPU training run killed with SIGKILL at random moments — inside steps, inside
checkpoint writes, between the renames of a save — and restarted each time ends with the same weights,
bit for bit, as a run that was never interrupted."""
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent
SETTINGS = dict(patch_size=16, out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16, batch_size=4,
                n_local_crops=2, max_train_images=0, epochs=2, warmup_epochs=1, log_every_steps=1,
                eval_every_epochs=2, save_every_epochs=1, checkpoint_every_steps=1)

# The child trains with the notebook's own code and announces on stdout the moments the parent may
# kill it at; each announcement is followed by a pause, so that a kill lands inside that moment.
CHILD = r"""
import json, os, sys, time
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
from nbloader import load_notebook
nb = load_notebook()
torch.set_num_threads(1)
cfg = nb.make_config("demo", **json.loads(sys.argv[2]))

class Data:
    images = np.random.default_rng(0).integers(0, 256, (12, 3, 64, 64), dtype=np.uint8)
    labels = np.arange(12) % 4
    def __len__(self):
        return 12

def announce(event):
    print(event, flush=True)
    time.sleep(0.03)

real_step, real_write, real_replace = nb.train_step, nb.atomic_write, os.replace
def step(t, images, diagnostics=False):
    announce("step")                      # a kill lands before or inside the step
    return real_step(t, images, diagnostics)
def write(path, write_fn, keep_previous=None):
    def written(f):
        write_fn(f)
        announce("written")               # the temp file is full, nothing renamed yet
    return real_write(path, written, keep_previous)
def replace(src, dst):
    announce("replace")                   # before each rename of a save
    real_replace(src, dst)
nb.train_step, nb.atomic_write, os.replace = step, write, replace
nb.train_dino(cfg, Data(), Data(), torch.device("cpu"), progress=False)
print("done", flush=True)
"""


def start(run_name, checkpoint_dir):
    settings = json.dumps({**SETTINGS, "run_name": run_name, "checkpoint_dir": str(checkpoint_dir)})
    return subprocess.Popen([sys.executable, "-c", CHILD, str(TESTS), settings], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def run_until(child, event, occurrence):
    """Read the child's announcements; SIGKILL it at the `occurrence`-th `event`. False if it finished first."""
    seen = 0
    for line in child.stdout:
        seen += line.strip() == event
        if seen == occurrence:
            child.send_signal(signal.SIGKILL)
            child.wait()
            return True
    assert child.wait() == 0
    return False


def final_state(run_dir):
    state = torch.load(run_dir / "last.pth", weights_only=True)
    losses = [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "step"]
    return state, losses


def test_sigkill_at_random_moments_then_resume_is_bit_exact(tmp_path):
    whole_run = start("whole", tmp_path)   # the uninterrupted run, alongside
    rng = random.Random(11)
    plan = [("step", rng.randint(2, 4)), ("written", rng.randint(1, 3)), ("replace", 2), ("written", 4)]
    run_dir, stale_temp_seen, killed = tmp_path / "killed", 0, 0
    for event, occurrence in plan:
        killed += run_until(start("killed", tmp_path), event, occurrence)
        stale_temp_seen += any(p.name.endswith(".tmp") for p in run_dir.iterdir())
    assert not run_until(start("killed", tmp_path), "never", 1)
    assert not run_until(whole_run, "never", 1)
    assert killed == len(plan) and stale_temp_seen >= 2   # the kills did cut writes short
    assert not any(p.name.endswith(".tmp") for p in run_dir.iterdir())   # and restarts cleaned up
    (whole, whole_losses), (resumed, resumed_losses) = final_state(tmp_path / "whole"), final_state(run_dir)
    assert whole["step"] == resumed["step"] == 6
    for name in ("student", "teacher", "loss"):
        for key, value in whole[name].items():
            assert torch.equal(value, resumed[name][key]), (name, key)
    assert resumed_losses == whole_losses and len(whole_losses) == 6
