"""The notebook's training code under torchrun: 2 CPU processes (gloo) against one process."""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

LAUNCHER = Path(__file__).resolve().parent / "torchrun_train.py"
# Deterministic views (whole image, no colour ops, no drop path), so that the only difference between
# the runs is how the global batch is split over processes.
SETTINGS = ["patch_size=16", "out_dim=64", "head_hidden_dim=32", "head_bottleneck_dim=16", "n_local_crops=2",
            "global_crop_scale=(1.0,1.0)", "local_crop_scale=(1.0,1.0)", "crop_ratio=(1.0,1.0)", "flip_p=0.0",
            "jitter_p=0.0", "grayscale_p=0.0", "blur_p=(0.0,0.0,0.0)", "solarize_p=0.0", "drop_path_rate=0.0",
            "epochs=2", "warmup_epochs=1", "max_train_images=0", "log_every_steps=1", "eval_every_epochs=1"]


def write_imagenet64(root, n_train=32, n_val=8):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for name, n in (("train_data_batch_1", n_train), ("val_data", n_val)):
        batch = {"data": rng.integers(0, 256, (n, 12288), dtype=np.uint8), "labels": list(rng.integers(1, 5, n))}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)


def rank_env(tmp_path):
    """One thread a rank; torchrun's log folders (torchelastic_*) in the test's own folder, not left in /tmp."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}


def launch(tmp_path, run_name, nproc, batch_size):
    settings = SETTINGS + [f"batch_size={batch_size}", f"run_name={run_name}", f"data_root={tmp_path / 'data'}",
                           f"cache_dir={tmp_path / 'cache'}", f"checkpoint_dir={tmp_path / 'ck'}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(LAUNCHER), "--profile", "demo", "--max-steps", "4", "--dump-teachers", "--set", *settings]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                            env=rank_env(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp_path / "ck" / run_name


def test_two_cpu_ranks_match_each_other_and_one_process(nb, tmp_path):
    write_imagenet64(tmp_path / "data")
    ddp = launch(tmp_path, "ddp", nproc=2, batch_size=4)
    single = launch(tmp_path, "single", nproc=1, batch_size=8)
    rank0, rank1 = (torch.load(ddp / f"teacher_rank{r}.pt", weights_only=True) for r in (0, 1))
    one = torch.load(single / "teacher_rank0.pt", weights_only=True)
    # (a) the replicas are identical, bit for bit
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    # (b) they match one process with the same global batch (8) and seed, up to float summation order
    for k in rank0:
        torch.testing.assert_close(rank0[k], one[k], rtol=1e-4, atol=1e-5, msg=k)
    # the teacher moved in 4 steps, so this is no comparison of two initialisations
    from torchrun_train import parse_overrides
    _, initial = nb.build_models(nb.make_config("demo", **parse_overrides(SETTINGS)), torch.device("cpu"))
    assert any(not torch.allclose(v, rank0[k]) for k, v in initial.state_dict().items())
    assert torch.load(ddp / "last.pth", weights_only=True)["step"] == 4
    # the first epoch (4 steps) ended with a k-NN that both ranks took part in, as at initialisation
    evals = {run: [r for r in nb.read_log(run / "log.jsonl") if r["kind"] == "eval"] for run in (ddp, single)}
    assert [r["step"] for r in evals[ddp]] == [r["step"] for r in evals[single]] == [0, 4]
    assert evals[ddp][0]["knn_top1"] == evals[single][0]["knn_top1"]   # the same initialisation
    # the logged figures are the global batch's, as one process logs them (they were rank 0's half batch)
    steps = {run: [r for r in nb.read_log(run / "log.jsonl") if r["kind"] == "step"] for run in (ddp, single)}
    for key in ("loss", "entropy", "kl", "center_norm"):
        np.testing.assert_allclose([r[key] for r in steps[ddp]], [r[key] for r in steps[single]], rtol=1e-5,
                                   atol=1e-6, err_msg=key)
    # only rank 0 wrote the checkpoint, the log and the run's settings, and held the run's lock (the run is not
    # finished: no teacher.pth)
    assert sorted(p.name for p in ddp.iterdir()) == ["last.pth", "log.jsonl", "settings.json",
                                                     "teacher_rank0.pt", "teacher_rank1.pt", "train.lock"]


def run_two_ranks(script_text, tmp_path):
    """Run a script (formatted with the tests' folder and tmp_path) on 2 gloo ranks under torchrun; it must pass."""
    script = tmp_path / "ranks.py"
    script.write_text(script_text.format(tests=str(Path(__file__).resolve().parent), tmp=str(tmp_path)))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], capture_output=True, text=True, timeout=600,
                            env=rank_env(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


RANK_SCRIPT = """
import os, sys
import torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from nbloader import load_notebook
from test_train import tiny_cfg
nb = load_notebook()
dist.init_process_group("gloo")
rank = dist.get_rank()
cfg = tiny_cfg(nb, __import__("pathlib").Path({tmp!r}))
trainer = nb.DINOTrainer(cfg, 16, torch.device("cpu"), rank, 2)
if rank == 1:
    trainer.finite.fill_(False)   # as if this rank's loss had been non-finite since the last check
images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
nb.train_step(trainer, images, read=False)   # a step whose figures are not read: no check yet
try:
    nb.check_finite(trainer)   # what rank 0's save and every rank's epoch end do
    said = "went on"
except nb.NonFiniteLoss as error:
    said = f"stopped: {{error}}"
open(os.path.join({tmp!r}, f"rank{{rank}}.txt"), "w").write(said)   # one file each: printed lines interleave
del trainer   # the DDP wrapper goes before its process group
dist.barrier()
dist.destroy_process_group()
"""


def test_dumped_teachers_go_to_the_runs_own_folder(nb, tmp_path, monkeypatch):
    """--dump-teachers wrote to checkpoint_dir/run_name: a run of other settings, which trains in
    run_name-<hash>, put its teacher into the other run's folder."""
    import torchrun_train
    write_imagenet64(tmp_path / "data")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    # the session's notebook module: a second load would replace sys.modules["dino_vit"], and the pickling of
    # its functions by name (the image decoders' process pool) in later tests would then fail
    monkeypatch.setattr(torchrun_train, "load_notebook", lambda: nb)
    folders = []
    for batch_size in (4, 8):
        torchrun_train.main(["--profile", "demo", "--max-steps", "1", "--dump-teachers", "--set", *SETTINGS,
                             f"batch_size={batch_size}", "run_name=r", "device=cpu", f"data_root={tmp_path / 'data'}",
                             f"cache_dir={tmp_path / 'cache'}", f"checkpoint_dir={tmp_path / 'ck'}"])
        folders.append(sorted(p.parent.name for p in (tmp_path / "ck").glob("*/teacher_rank0.pt")))
    assert folders[0] == ["r"] and len(folders[1]) == 2 and folders[1][0] == "r" and folders[1][1].startswith("r-")
    for folder in folders[1]:   # each beside its own run's last.pth
        dumped = torch.load(tmp_path / "ck" / folder / "teacher_rank0.pt", weights_only=True)
        saved = torch.load(tmp_path / "ck" / folder / "last.pth", weights_only=True)["teacher"]
        assert all(torch.equal(dumped[k], saved[k]) for k in saved)


def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """Each rank's flag alone would stop rank 1 and leave rank 0 waiting in the next all-reduce, or saving
    weights the NaN reached through the averaged gradients; the flags are shared at every step."""
    run_two_ranks(RANK_SCRIPT, tmp_path)
    said = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert all(line.startswith("stopped: non-finite loss at step 0") for line in said), said


RESUME_SCRIPT = """
import dataclasses, sys
from pathlib import Path
import torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from nbloader import load_notebook
from test_train import Data, tiny_cfg
nb = load_notebook()
dist.init_process_group("gloo")
rank, tmp, data, cpu = dist.get_rank(), Path({tmp!r}), Data(), torch.device("cpu")
shared = tiny_cfg(nb, tmp)
nb.train_dino(shared, data, data, cpu, rank, 2, max_steps=2, progress=False)   # last.pth at step 2
cfg = shared if rank == 0 else dataclasses.replace(shared, checkpoint_dir=str(tmp / "node1"))   # rank 1: its own disk
try:
    nb.train_dino(cfg, data, data, cpu, rank, 2, progress=False)
    said = "trained on"
except nb.CheckpointError as error:
    said = f"refused: {{error}}"
open(tmp / f"rank{{rank}}.txt", "w").write(said)
dist.destroy_process_group()
"""


def test_ranks_that_resume_at_different_steps_are_refused_not_left_waiting(tmp_path):
    """A rank that reads a checkpoint_dir of its own (a node's local disk) starts at step 0 while rank 0
    resumes at step 2: each then waited for the other in a different all-reduce until gloo's timeout. Every
    rank now stops at once and says which steps the ranks stand at."""
    run_two_ranks(RESUME_SCRIPT, tmp_path)
    said = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert said[0].startswith("refused: rank 0 resumed from ") and "last.pth at step 2" in said[0], said
    assert said[1].startswith(f"refused: rank 1 found no checkpoint (step 0) in {tmp_path / 'node1'}"), said
    assert all("the ranks stand between step 0 and step 2" in s for s in said), said


SHARE_SCRIPT = """
import os, sys
import numpy as np, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from nbloader import load_notebook
from test_eval import small_vit
from test_train import Data
nb = load_notebook()
dist.init_process_group("gloo")
rank = dist.get_rank()
read, seen = [], []

class Recorded(np.ndarray):   # images that note which of their rows are read
    def __getitem__(self, key):
        read.extend(np.arange(len(self))[key].tolist())
        return np.asarray(self)[key]

model, data = small_vit(nb, img_size=64), Data(n=9)
data.images = data.images.view(Recorded)
model.register_forward_pre_hook(lambda module, args: seen.append(len(args[0])))
shares = {{}}
for cap in (0, 6):
    read.clear()
    seen.clear()
    cfg = nb.make_config("demo", max_eval_images=cap, knn_k=3)
    features, labels = nb.dataset_features(model, data, cfg, torch.device("cpu"), rank, 2)
    shares[cap] = dict(read=list(read), extracted=sum(seen), features=features, labels=labels)
knn = nb.knn_accuracy(model, data, data, cfg, torch.device("cpu"), rank, 2)
torch.save(dict(shares=shares, knn=knn), os.path.join({tmp!r}, f"share{{rank}}.pt"))
dist.barrier()
dist.destroy_process_group()
"""


def test_each_rank_reads_and_extracts_its_share_of_the_evaluation_features_and_rank_0_votes(nb, tmp_path):
    """A k-NN of the whole memory bank on rank 0 alone would leave every other GPU idle (and waiting in the
    next all-reduce) for as long as the features of every image take; each rank reads and extracts a share
    instead, and only rank 0, which votes, holds the whole bank (as the official eval_knn.py)."""
    from test_eval import small_vit
    from test_train import Data
    run_two_ranks(SHARE_SCRIPT, tmp_path)
    ranks = [torch.load(tmp_path / f"share{rank}.pt", weights_only=True) for rank in (0, 1)]
    model, data = small_vit(nb, img_size=64), Data(n=9)
    numbered = Data(n=9)
    numbered.images = np.arange(9).reshape(9, 1, 1, 1)   # image i holds i: which rows the cap takes
    for cap in (0, 6):
        shares = [r["shares"][cap] for r in ranks]
        rows = nb.evenly_spaced(numbered, cap)[0].ravel().tolist()
        assert shares[0]["read"] + shares[1]["read"] == rows   # each rank its own rows, in order, none twice
        assert [len(s["read"]) for s in shares] == [s["extracted"] for s in shares]   # and extracts them alone
        assert abs(len(shares[0]["read"]) - len(shares[1]["read"])) <= 1
        cfg = nb.make_config("demo", max_eval_images=cap, knn_k=3)
        features, labels = nb.dataset_features(model, data, cfg, torch.device("cpu"))
        assert torch.equal(shares[0]["labels"], labels) and torch.equal(shares[1]["labels"], labels)
        torch.testing.assert_close(shares[0]["features"], features, rtol=0, atol=1e-5)   # rank 0: every row
        assert shares[1]["features"] is None   # the bank is not held twice
    assert ranks[0]["knn"] == nb.knn_accuracy(model, data, data, cfg, torch.device("cpu"))
    assert ranks[1]["knn"] is None


def rank_pid(rank, marker):
    """The PID of the torchrun worker of `rank` whose command line holds `marker`."""
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if marker.encode() in b" ".join(command) and str(LAUNCHER).encode() in command \
                and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def test_a_ctrl_c_on_any_rank_stops_every_rank_at_the_same_step_and_rank_0_saves(nb, tmp_path):
    """A Ctrl-C seen by one rank alone stopped that rank and left rank 0 in the next all-reduce, to fail there
    without saving; now any rank's is agreed on the next logged step, every rank stops there, rank 0 saves."""
    import signal
    import time
    write_imagenet64(tmp_path / "data")
    run_name = f"interrupted-{os.getpid()}"
    settings = [s for s in SETTINGS if not s.startswith(("epochs=", "eval_every_epochs="))] + [
        "batch_size=4", "epochs=500", "eval_every_epochs=500", f"run_name={run_name}", f"data_root={tmp_path / 'data'}",
        f"cache_dir={tmp_path / 'cache'}", f"checkpoint_dir={tmp_path / 'ck'}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(LAUNCHER),
           "--profile", "demo", "--set", *settings]
    run_dir = tmp_path / "ck" / run_name
    with open(tmp_path / "out.txt", "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=rank_env(tmp_path))
        try:
            deadline = time.monotonic() + 300
            while not ((run_dir / "log.jsonl").exists() and (run_dir / "log.jsonl").read_text().count('"step"') > 3):
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "out.txt").read_text()[-3000:]
                time.sleep(0.2)
            os.kill(rank_pid(1, run_name), signal.SIGINT)   # rank 1 alone
            proc.wait(timeout=300)
        finally:
            proc.kill()
    said = (tmp_path / "out.txt").read_text()
    steps = [r["step"] for r in nb.read_log(run_dir / "log.jsonl") if r["kind"] == "step"]
    assert torch.load(run_dir / "last.pth", weights_only=True)["step"] == steps[-1] < 2000, said[-3000:]
    assert said.count(f"KeyboardInterrupt: interrupted at step {steps[-1]}") == 2, said[-3000:]   # both ranks


KNN_INTERRUPT_SCRIPT = """
import os, signal, sys
from pathlib import Path
import torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from nbloader import load_notebook
from test_train import Data, tiny_cfg
nb = load_notebook()
dist.init_process_group("gloo")
rank, tmp, data = dist.get_rank(), Path({tmp!r}), Data()
real_evaluate, real_step, trained = nb.evaluate, nb.train_step, []

def evaluate(trainer, *args):
    if rank == 1 and trainer.step == trainer.iters_per_epoch:   # rank 1 alone, in the k-NN of epoch 1 of 2
        os.kill(os.getpid(), signal.SIGINT)
    return real_evaluate(trainer, *args)
nb.evaluate = evaluate
nb.train_step = lambda t, images, read: (trained.append(t.step), real_step(t, images, read))[1]
try:
    trainer, _ = nb.train_dino(tiny_cfg(nb, tmp), data, data, torch.device("cpu"), rank, 2, progress=False)
    said = f"not stopped, at step {{trainer.step}}"
except KeyboardInterrupt as stop:
    said = f"stopped: {{stop}}"
open(tmp / f"rank{{rank}}.txt", "w").write(f"{{said}}; trained steps {{trained}}")
dist.destroy_process_group()
"""


def test_a_ctrl_c_on_one_rank_during_an_epochs_k_nn_stops_every_rank_at_that_epochs_end(tmp_path):
    """The ranks agree, with one all-reduce at an epoch's end, on a Ctrl-C that one of them held during the
    epoch's k-NN: every rank stops there, after the epoch checkpoint rank 0 saved, none trains a step more."""
    run_two_ranks(KNN_INTERRUPT_SCRIPT, tmp_path)
    said = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert all(s.startswith("stopped: interrupted at step 2; saved ") and s.endswith("trained steps [0, 1]")
               for s in said), said
    assert torch.load(tmp_path / "ck" / "demo" / "last.pth", weights_only=True)["step"] == 2


def test_only_rank_0_says_how_a_folder_was_split(nb, tmp_path, capsys, recwarn):
    """Every rank opens the data; the split of a folder and its warnings (here: a hidden file) are said once,
    by rank 0, not once by every rank."""
    from PIL import Image
    from torchrun_train import load_data
    for name in ("a", "b"):
        (tmp_path / "photos" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(tmp_path / "photos" / name / f"{i}.png")
    (tmp_path / "photos" / "a" / ".DS_Store").write_bytes(bytes(8))
    cfg = nb.make_config("demo", data_root=str(tmp_path / "photos"), cache_dir=str(tmp_path / "cache"))
    said = "held out per class (val/all): a 1/4, b 1/4"
    train, val = load_data(nb, cfg, rank=1, world_size=1)
    assert (len(train), len(val)) == (6, 2) and capsys.readouterr().out == "" and len(recwarn) == 0
    nb.SAID.clear()   # each rank is a process of its own, with its own record of what it said
    load_data(nb, cfg, rank=0, world_size=1)
    assert capsys.readouterr().out.count(said) == 1
    assert [str(w.message) for w in recwarn if "ignored 1 hidden" in str(w.message)] != []


WAIT_SCRIPT = """
import datetime, os, sys, time
import torch.distributed as dist
sys.path.insert(0, {tests!r})
from torchrun_train import load_data
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=2))   # standing in for 10 or 30 minutes

class SlowConversion:   # rank 0 converts for longer than the process group's timeout
    def load_datasets(self, cfg, verbose=True):
        if verbose:
            time.sleep(8)
        return "train", "val"

said = load_data(SlowConversion(), None, dist.get_rank(), 2)
open(os.path.join({tmp!r}, f"rank{{dist.get_rank()}}.txt"), "w").write(repr(said))
dist.barrier()   # the default group still works after the wait
dist.destroy_process_group()
"""


def test_the_other_ranks_wait_for_a_conversion_longer_than_the_process_groups_timeout(tmp_path):
    """Rank 0 converts a folder while the others wait: under the default group's timeout (10 min for NCCL) a
    large folder's conversion stopped them partway, and every relaunch converted from the start again."""
    run_two_ranks(WAIT_SCRIPT, tmp_path)
    assert [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)] == ["('train', 'val')"] * 2


def sinkhorn_rank(nb, rank, scores, init_file, results):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        results.put((rank, nb.sinkhorn_knopp(scores[rank * 4:(rank + 1) * 4].clone())))
    finally:
        torch.distributed.destroy_process_group()


def test_sinkhorn_centring_over_two_ranks_equals_one_process_with_the_whole_batch(nb, tmp_path):
    """DINOv2's centring sums each prototype's mass over the global batch (logsumexp_over_samples's
    all_reduce of the peak and of the sum): only a torchrun run with centering='sinkhorn_knopp' took that
    path, and no test did."""
    import multiprocessing
    scores = torch.randn(8, 50, generator=torch.Generator().manual_seed(0)) * 5
    scores[5, 7] = 80.0   # one prototype's peak on rank 1 alone: ranks that did not share it would differ
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    ranks = [context.Process(target=sinkhorn_rank, args=(nb, r, scores, tmp_path / "init", results)) for r in (0, 1)]
    for process in ranks:
        process.start()
    halves = dict(results.get(timeout=120) for _ in ranks)
    for process in ranks:
        process.join(timeout=60)
        assert process.exitcode == 0
    together, alone = torch.cat([halves[0], halves[1]]), nb.sinkhorn_knopp(scores.clone())
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    assert (together - alone).abs().max() < 1e-5 < (together - torch.cat([nb.sinkhorn_knopp(scores[:4].clone()),
                                                                      nb.sinkhorn_knopp(scores[4:].clone())])).abs().max()
