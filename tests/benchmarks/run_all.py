"""Run every benchmark in this folder, one after another, each printing its own figures.

    python tests/benchmarks/run_all.py [--quick]    (or: make bench)

--quick shrinks the data-set benchmark (10,000 images instead of a full 128,116-image file).
GPU parts run only where CUDA is available.
"""
import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    runs = [["bench_data.py"] + (["--n", "10000", "--reads", "10000"] if a.quick else []),
            ["bench_augment.py"], ["bench_knn.py"], ["bench_head_loss.py", "--device", "cpu"],
            ["bench_train.py", "--device", "cpu"], ["bench_budget.py"], ["bench_readers.py"],
            ["check_attention_squash.py"]]
    try:
        import torch
        if torch.cuda.is_available():
            runs += [["bench_knn.py", "--device", "cuda"], ["bench_head_loss.py", "--device", "cuda", "--batch", "256"],
                     ["bench_train.py", "--device", "cuda"], ["check_graphs.py", "--device", "cuda"]]
    except ImportError:
        pass
    failed = []
    for script, *args in runs:
        print(f"\n=== {script} {' '.join(args)} ({time.strftime('%Y-%m-%d %H:%M')})", flush=True)
        if subprocess.run([sys.executable, str(HERE / script), *args]).returncode:
            failed.append(script)
    if failed:
        raise SystemExit(f"benchmarks that failed: {failed}")


if __name__ == "__main__":
    main()
