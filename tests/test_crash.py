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

# The child trains with the notebook's own code and announces on stdout the moments the parent may
# kill it at; given an acknowledgement pipe, it then waits for the parent's byte, so that a kill lands inside
# that moment however late the parent is scheduled (a pause of 30 ms missed it on a busy machine).
CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
from tiny_run import nb, train as train_run
from tiny_settings import SETTINGS
cfg = nb.make_config("demo", **SETTINGS, epochs=2, eval_every_epochs=2, **json.loads(sys.argv[2]))
ack = int(sys.argv[4]) if len(sys.argv) > 4 else None

def announce(event):
    print(event, flush=True)
    if ack is not None:
        os.read(ack, 1)   # the parent kills here, or lets the run go on

real_step, real_write, real_replace = nb.train_step, nb.atomic_write, os.replace
def step(t, images, diagnostics=False):
    announce("step")                      # a kill lands before or inside the step
    return real_step(t, images, diagnostics)
def write(path, write_fn, keep_previous=None, **sizes):
    def written(f):
        write_fn(f)
        announce("written")               # the temp file is full, nothing renamed yet
    return real_write(path, written, keep_previous, **sizes)
def replace(src, dst):
    announce("replace")                   # before each rename (a save with a previous last.pth has two)
    real_replace(src, dst)
nb.train_step, nb.atomic_write, os.replace = step, write, replace

def train():
    train_run(cfg)
    print("done", flush=True)

if sys.argv[3] == "once":
    train()
else:   # a fork server: each line on stdin starts one more run, without importing torch again
    for _ in sys.stdin:
        pid = os.fork()
        if pid == 0:
            print(f"pid {os.getpid()}", flush=True)
            code = 1
            try:
                train()
                code = 0
            finally:
                os._exit(code)   # never back into the server's loop
        print(f"exit {os.waitpid(pid, 0)[1]}", flush=True)
"""


EVENTS = ("step", "written", "replace")   # what announce says


def start(run_name, checkpoint_dir, mode="once", ack=None):
    settings = json.dumps({"run_name": run_name, "checkpoint_dir": str(checkpoint_dir)})
    return subprocess.Popen([sys.executable, "-c", CHILD, str(TESTS), settings, mode, *[str(ack)] * (ack is not None)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, pass_fds=() if ack is None else (ack,))


def run_until(server, ack, event, occurrence):
    """Start a run in the fork server and SIGKILL it at the `occurrence`-th `event`, while it waits there; every
    other announcement is acknowledged on `ack`. False if the run finished first."""
    server.stdin.write("run\n")
    server.stdin.flush()
    pid, seen, killed = None, 0, False
    for line in server.stdout:
        word = line.split()[0]
        pid = int(line.split()[1]) if word == "pid" else pid
        seen += word == event
        if seen == occurrence and word == event and not killed:
            os.kill(pid, signal.SIGKILL)
            killed = True
        elif word in EVENTS:
            os.write(ack, b"k")
        if word == "exit":
            assert killed or line.split()[1] == "0"
            return killed
    raise AssertionError("the fork server stopped")


def final_state(run_dir):
    state = torch.load(run_dir / "last.pth", weights_only=True)
    losses = [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "step"]
    return state, losses


def test_sigkill_at_random_moments_then_resume_is_bit_exact(tmp_path):
    whole_run = start("whole", tmp_path)   # the uninterrupted run, alongside
    ack_read, ack = os.pipe()
    server = start("killed", tmp_path, mode="serve", ack=ack_read)
    os.close(ack_read)
    rng = random.Random(11)   # ("replace", 3): the log's rename, last.pth -> last.prev.pth, then killed before
    #                           the new last.pth is renamed into place: the run has no last.pth for a moment
    plan = [("step", rng.randint(2, 4)), ("written", rng.randint(1, 3)), ("replace", 3), ("written", 4)]
    run_dir, stale_temp_seen, no_last_seen, killed = tmp_path / "killed", 0, 0, 0
    for event, occurrence in plan:
        killed += run_until(server, ack, event, occurrence)
        stale_temp_seen += any(p.name.endswith(".tmp") for p in run_dir.iterdir())
        no_last_seen += not (run_dir / "last.pth").exists()
    assert not run_until(server, ack, "never", 1)
    server.stdin.close()
    assert server.wait() == 0 and whole_run.wait() == 0
    os.close(ack)
    assert killed == len(plan) and stale_temp_seen >= 2 and no_last_seen == 1   # the kills did cut writes short
    assert not any(p.name.endswith(".tmp") for p in run_dir.iterdir())   # and restarts cleaned up
    (whole, whole_losses), (resumed, resumed_losses) = final_state(tmp_path / "whole"), final_state(run_dir)
    assert whole["step"] == resumed["step"] == 6
    for name in ("student", "teacher", "loss"):
        for key, value in whole[name].items():
            assert torch.equal(value, resumed[name][key]), (name, key)
    assert resumed_losses == whole_losses and len(whole_losses) == 6
