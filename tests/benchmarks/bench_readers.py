"""What do reader processes cost a run? train_dino on generated images (ViT-S/8 at 32 px, batch 32, the
`short` profile, a k-NN after every epoch), with no readers and with --workers of them (at most one per
core), the seconds of every epoch and of the whole run; with --compare, another notebook file's code
runs the same, in turn, in its own process.

    python tests/benchmarks/bench_readers.py [--compare OLD.ipynb] [--workers 4] [--epochs 5]
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from bench_learn import shapes_config  # noqa: E402
from nbloader import bench_header, load_notebook, machine  # noqa: E402


def one_run(a):
    """One run of the notebook that DINO_NOTEBOOK names (the default: this one), printed as one line."""
    nb = load_notebook()
    train = nb.ShapesDataset(a.images, a.img_size, seed=1)
    val = nb.ShapesDataset(a.images // 4, a.img_size, seed=2)
    seconds, run_epoch = [], nb.run_epoch

    def timed_epoch(*args, **kwargs):
        tick = time.perf_counter()
        finished = run_epoch(*args, **kwargs)
        seconds.append(time.perf_counter() - tick)
        return finished

    nb.run_epoch = timed_epoch   # train_run looks it up when it calls it
    cfg = shapes_config(nb, "short", a.img_size, arch="vit_small", batch_size=32, epochs=a.epochs,
                        num_workers=a.one, save_every_epochs=0, figure_dir=tempfile.mkdtemp(prefix="bench-readers-"))
    tick = time.perf_counter()
    try:
        nb.train_dino(cfg, train, val, torch.device("cpu"), progress=False)
        total = time.perf_counter() - tick
    finally:   # the run's checkpoints (about 440 MB) and figures go with it
        for folder in (cfg.checkpoint_dir, cfg.figure_dir):
            shutil.rmtree(folder, ignore_errors=True)
    name = Path(os.environ.get("DINO_NOTEBOOK", "dino_vit.ipynb")).name
    print(f"RESULT {machine(torch.device('cpu'))}; {name}, num_workers={a.one}: epochs "
          + " ".join(f"{s:.1f}" for s in seconds) + f" s; run {total:.1f} s", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compare", default=None, help="another notebook file, run the same way first")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)   # a single run, in this process
    a = p.parse_args()
    if a.one is not None:
        return one_run(a)
    print(bench_header(), flush=True)
    failed = 0
    for notebook in ([a.compare] if a.compare else []) + [None]:
        env = {k: v for k, v in os.environ.items() if k != "DINO_NOTEBOOK"}
        if notebook:
            env["DINO_NOTEBOOK"] = str(Path(notebook).resolve())
        for workers in (0, a.workers):
            args = ["--one", str(workers), "--epochs", str(a.epochs), "--images", str(a.images),
                    "--img-size", str(a.img_size)]
            done = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
            lines = [line[len("RESULT "):] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            print(lines[0] if lines and done.returncode == 0 else f"FAILED: {done.stderr[-1500:]}", flush=True)
            failed += not (lines and done.returncode == 0)
    if failed:
        sys.exit(f"{failed} run(s) FAILED")


if __name__ == "__main__":
    main()
