"""How steady is epochs_for_budget's estimate? It times a few training steps and sizes the schedule from
them, so the noise of those few seconds becomes the run's epochs. This repeats the estimate, alternating
ten timed steps (min_seconds=0) with steps timed for at least --min-seconds, on a profile at
bench_learn.py's CPU setting (ViT-T/8 at 32 px on the generated shapes), and prints the images/s and the
epochs fitted to --minutes (each epoch with --eval-seconds of evaluation) of every call.

    python tests/benchmarks/bench_budget.py [--repeats 5] [--minutes 26] [--eval-seconds 8.3] [--workers 2]
"""
import argparse
import shutil
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from bench_learn import shapes_config  # noqa: E402
from nbloader import bench_header, check_at_least, load_notebook  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="short")
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--minutes", type=float, default=26.0)
    p.add_argument("--eval-seconds", type=float, default=8.3, help="evaluation per epoch (bench_learn's init one)")
    p.add_argument("--min-seconds", type=float, default=10.0)
    p.add_argument("--workers", type=int, default=0, help="reader processes (num_workers), as the run's")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    check_at_least(p, a, images=1, img_size=8, repeats=1, workers=0)
    nb, device = load_notebook(), torch.device(a.device)
    cfg = shapes_config(nb, a.profile, a.img_size, num_workers=a.workers)
    try:
        measure(nb, a, cfg, device)
    finally:
        shutil.rmtree(cfg.checkpoint_dir, ignore_errors=True)   # shapes_config's temporary folder


def measure(nb, a, cfg, device):
    """epochs_for_budget's rate, a.repeats times with each minimum of timed seconds, and their spread."""
    train = nb.ShapesDataset(a.images, a.img_size, seed=1)
    print(bench_header(device), flush=True)
    print(f"profile {a.profile}, {a.images} images at {a.img_size} px; "
          f"{a.minutes:g} minutes, {a.eval_seconds:g} s of evaluation an epoch, {a.workers} reader processes")
    rates = {"10 steps": [], f">= {a.min_seconds:g} s": []}
    for repeat in range(a.repeats):
        for name, min_seconds in zip(rates, (0.0, a.min_seconds)):
            fitted = nb.epochs_for_budget(cfg, train, device, a.minutes, eval_seconds=a.eval_seconds,
                                          min_seconds=min_seconds)
            rates[name].append(fitted["images_per_s"])
            print(f"  {repeat + 1}, {name:>8}: {fitted['images_per_s']:6.1f} images/s over {fitted['timed_steps']:3d} "
                  f"steps -> {fitted['epochs']} epochs", flush=True)
    for name, values in rates.items():
        spread = (max(values) - min(values)) / statistics.median(values)
        print(f"{name:>8}: images/s min {min(values):.1f}, median {statistics.median(values):.1f}, "
              f"max {max(values):.1f} (spread {100 * spread:.1f}% of the median)")


if __name__ == "__main__":
    main()
