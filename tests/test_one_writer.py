"""One run, one writer: the process that trains holds the run folder's lock; a second trainer of the same
run is refused at once, naming the holder; a SIGKILLed holder leaves nothing to clean and the lock is taken over."""
import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent

# A fork server: it imports the notebook once, then each "start NAME RUN" line forks a trainer of run RUN that
# prints "NAME step S" before each step and, at step 1, waits for the file NAME.go; "wait NAME" reaps it.
SERVER = r"""
import os, sys, time
sys.path.insert(0, sys.argv[1])
from tiny_run import nb, train
from tiny_settings import SETTINGS
folder = sys.argv[2]

def say(line):   # one write of a whole line: the server's and its trainers' lines never interleave in the pipe
    os.write(1, (line.replace("\n", " ") + "\n").encode())

def trainer(name, run):
    real_step = nb.train_step
    def step(t, images, diagnostics=False):
        say(f"{name} step {t.step}")
        while t.step == 1 and not os.path.exists(os.path.join(folder, name + ".go")):
            time.sleep(0.01)
        return real_step(t, images, diagnostics)
    nb.train_step = step
    cfg = nb.make_config("demo", run_name=run, checkpoint_dir=folder, **SETTINGS, epochs=1, eval_every_epochs=1)
    try:
        train(cfg)
    except nb.RunInUse as error:
        say(f"{name} refused {error}")
        os._exit(3)
    os._exit(0)

children = {}
for line in sys.stdin:
    command, name, *run = line.split()
    if command == "start":
        pid = os.fork()
        if pid == 0:
            try:
                trainer(name, run[0])
            finally:
                os._exit(1)
        children[name] = pid
        say(f"{name} pid {pid}")
    else:
        status = os.waitpid(children[name], 0)[1]
        say(f"{name} exit {os.waitstatus_to_exitcode(status)}")
"""


class Server:
    def __init__(self, folder):
        self.errors = open(folder / "server.err", "w+")
        self.process = subprocess.Popen([sys.executable, "-c", SERVER, str(TESTS), str(folder)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors,
                                        text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        self.lines, self.said, self.unread = queue.Queue(), [], []
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.process.stdout], daemon=True).start()

    def send(self, line):
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def until(self, prefix, timeout=120):
        """The remainder of the first line not yet taken that starts with `prefix`, waited for. A trainer and the
        server write to one pipe, so their lines come in either order ("b refused" before "b pid")."""
        deadline = time.monotonic() + timeout
        while True:
            for i, line in enumerate(self.unread):
                if line.startswith(prefix):
                    return self.unread.pop(i)[len(prefix):].strip()
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.errors.seek(0)
                raise AssertionError(f"no {prefix!r}; the server said {self.said[-5:]}, {self.errors.read()[-2000:]}")
            self.said.append(line.strip())
            self.unread.append(line)

    def start(self, name, run):
        self.send(f"start {name} {run}")
        return int(self.until(f"{name} pid "))

    def wait(self, name):
        self.send(f"wait {name}")
        return int(self.until(f"{name} exit "))

    def close(self):
        self.process.stdin.close()
        return self.process.wait(timeout=60)

    def kill_children(self):
        """Whatever a failed test left running (a trainer waiting at its step 1)."""
        for line in self.said:
            if " pid " in line:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(line.split()[-1]), signal.SIGKILL)


def step_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [row["step"] for row in rows if row["kind"] == "step"], [row["step"] for row in rows]


def test_a_second_trainer_is_refused_at_once_and_a_killed_holder_is_taken_over(nb, tmp_path):
    server = Server(tmp_path)
    try:
        holder = server.start("a", "run")
        server.until("a step 1")                 # a trains, holds the lock, and waits at step 1
        server.start("b", "run")
        refusal = server.until("b refused ")   # a lock that waited would never print this while a holds it
        assert server.wait("b") == 3
        assert str(tmp_path / "run") in refusal and f"PID {holder} on host {socket.gethostname()}, since " in refusal
        assert "another run_name" in refusal
        # a reader needs no lock: the holder's last checkpoint loads while it trains
        assert nb.load_weights_file(tmp_path / "run" / "last.pth")["step"] == 1
        (tmp_path / "a.go").touch()
        assert server.wait("a") == 0
        steps, every_row = step_rows(tmp_path / "run")
        assert steps == [1, 2, 3] and every_row == sorted(every_row)   # one writer: no row twice
        assert (tmp_path / "run" / "train.lock").read_text() == ""          # released, and says so

        killed = server.start("c", "killed")
        server.until("c step 1")
        os.kill(killed, signal.SIGKILL)         # the holder dies without a chance to clean up
        assert server.wait("c") == -signal.SIGKILL
        assert f"PID {killed} " in (tmp_path / "killed" / "train.lock").read_text()  # what it left
        (tmp_path / "d.go").touch()
        server.start("d", "killed")             # the kernel dropped the dead holder's lock: d takes it over
        assert server.wait("d") == 0
        assert step_rows(tmp_path / "killed")[0] == [1, 2, 3]
        assert torch.load(tmp_path / "killed" / "last.pth", weights_only=True)["step"] == 3
    except BaseException:
        server.kill_children()
        raise
    assert server.close() == 0


def test_the_lock_is_refused_within_one_process_and_free_again_after(nb, tmp_path):
    with nb.run_lock(tmp_path / "run") as path:
        assert path.read_text().startswith(f"PID {os.getpid()} on host ")
        with pytest.raises(nb.RunInUse, match=rf"{tmp_path / 'run'} is being trained by another process: "
                                              rf"PID {os.getpid()} on host .*, since 20\d\d-"):
            with nb.run_lock(tmp_path / "run"):
                pass
    with nb.run_lock(tmp_path / "run"):
        pass


def test_a_file_system_without_locks_trains_with_a_warning_and_keeps_no_descriptor(nb, tmp_path, monkeypatch):
    """NFS without its lock daemon fails flock with ENOLCK ("No locks available"): training stopped with that
    bare OSError, naming neither the run nor the lock file, and each try kept train.lock open."""
    import errno

    from tiny_settings import SETTINGS, Data   # tiny_run's, without its second notebook module

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(nb.fcntl, "flock", no_locks)
    open_fds = lambda: len(os.listdir("/proc/self/fd"))
    before = open_fds()
    cfg = nb.make_config("demo", checkpoint_dir=str(tmp_path), **SETTINGS, epochs=1, eval_every_epochs=1)
    with pytest.warns(UserWarning, match=r"train\.lock: this file system takes no locks, so a second trainer"):
        nb.train_dino(cfg, Data(), Data(), torch.device("cpu"), progress=False)
    assert (nb.run_directory(cfg) / "last.pth").is_file() and open_fds() == before
    with pytest.warns(UserWarning, match="takes no locks"), nb.run_lock(tmp_path / "run") as path:
        assert path.read_text().startswith(f"PID {os.getpid()} on host ")   # who trains, though unguarded
    assert path.read_text() == "" and open_fds() == before


@pytest.mark.parametrize("mmap", [False, True])
def test_a_reader_loads_the_file_it_checked_though_the_trainer_replaces_it_meanwhile(nb, tmp_path, monkeypatch, mmap):
    last, newer = tmp_path / "last.pth", tmp_path / ".last.pth.0123456789abcdef.tmp"
    torch.save({"step": torch.tensor(1)}, last)
    torch.save({"step": torch.tensor(2)}, newer)
    real_check = nb.check_archive

    def check_then_replace(path, max_bytes=None, file=None):
        declared = real_check(path, max_bytes, file)
        os.replace(newer, last)              # the trainer's atomic rename lands between the check and the load
        return declared
    monkeypatch.setattr(nb, "check_archive", check_then_replace)
    assert nb.load_weights_file(last, mmap=mmap)["step"] == 1
    assert torch.load(last, weights_only=True)["step"] == 2


HOLDER = r"""
import sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from tiny_run import nb
with nb.run_lock(sys.argv[2]):
    loader = nb.batch_loader(np.zeros((8, 3, 8, 8), dtype=np.uint8), [np.arange(2)] * 4, num_workers=1)
    next(loader)   # its reader process is up
    print("reading", flush=True)
    time.sleep(120)
"""


def test_a_killed_holder_is_taken_over_at_once_though_its_reader_processes_live_on(nb, tmp_path):
    """A trainer's forked reader processes held copies of its lock's descriptor, so a trainer killed by
    SIGKILL kept the lock until its readers noticed (up to 5 s): the re-run was refused, naming a dead PID."""
    import psutil
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(TESTS), str(tmp_path / "run")],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    readers = []
    try:
        assert holder.stdout.readline().strip() == "reading"
        readers = psutil.Process(holder.pid).children()
        assert readers
        for reader in readers:   # stopped, they cannot notice the holder's death and exit: they live on
            reader.suspend()
        holder.kill()
        holder.wait(timeout=60)
        with nb.run_lock(tmp_path / "run"):   # taken over at once
            assert all(reader.is_running() for reader in readers)
    finally:
        holder.kill()
        for reader in readers:   # no longer the holder's children: gone with it
            with contextlib.suppress(psutil.NoSuchProcess):
                reader.kill()


def test_without_posix_file_locks_the_lock_cell_says_to_use_wsl(nb, monkeypatch):
    """Windows has no fcntl: the cell that imports it (for the run lock and the temp files' locks) stops with
    what to do, not an import error."""
    from nbloader import ROOT, export_sources
    notebook = os.environ.get("DINO_NOTEBOOK") or ROOT / "dino_vit.ipynb"   # the notebook under test
    lock_cells = [src for src in export_sources(notebook) if "import fcntl" in src]
    assert len(lock_cells) == 1
    monkeypatch.setitem(sys.modules, "fcntl", None)          # `import fcntl` now fails, as on Windows
    with pytest.raises(RuntimeError, match=r"POSIX file locks \(fcntl\), which Windows lacks: run it in WSL"):
        exec(lock_cells[0], dict(vars(nb)))
