"""Benchmark of the notebook's weighted k-NN (knn_classify): 10,000 queries against 100,000 stored
features of width 384 with 1000 classes (random), k = 10, 20, 100, 200.

Each configuration runs in a fresh Python process, so its peak memory is its own: the resident-set
peak (ru_maxrss) after the features are made is subtracted from the peak after the k-NN (tracemalloc
does not see PyTorch's allocations). On CUDA the peak of torch.cuda.max_memory_allocated is reported.

    python tests/benchmarks/bench_knn.py [--device cpu|cuda] [--queries 10000] [--train 100000]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))
from nbloader import bench_header, load_notebook  # noqa: E402

CHUNKINGS = [(512, 32768), (2048, 32768), (512, 8192), (512, 131072)]  # (queries, train features) per block


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def child(args):
    import torch
    nb = load_notebook()
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(args.train, args.dim, generator=gen)
    train_labels = torch.randint(0, args.classes, (args.train,), generator=gen)
    queries = torch.randn(args.queries, args.dim, generator=gen)
    query_labels = torch.randint(0, args.classes, (args.queries,), generator=gen)
    device = torch.device(args.device)
    if device.type == "cuda":  # warm up kernels and the allocator, then measure from here
        nb.knn_classify(train[:1000], train_labels[:1000], queries[:100], query_labels[:100], device=device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = peak_rss_mb()
    start = time.perf_counter()
    result = nb.knn_classify(train, train_labels, queries, query_labels, k=(10, 20, 100, 200), T=0.07,
                             num_classes=args.classes, chunk_size=args.chunk, train_chunk_size=args.train_chunk,
                             device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    out = dict(seconds=seconds, rss_delta_mb=peak_rss_mb() - base, top1_k20=result[20][0],
               threads=torch.get_num_threads())
    if device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


def main(args):
    print(bench_header(args.device), flush=True)
    print(f"k-NN: {args.queries:,} queries x {args.train:,} stored features, width {args.dim}, "
          f"{args.classes} classes, k = 10/20/100/200, device {args.device}")
    print(f"(a full similarity matrix would take {args.queries * args.train * 4 / 2**30:.1f} GiB; "
          f"the stored features take {args.train * args.dim * 4 / 2**20:.0f} MiB)")
    print(f"{'query chunk':>11} {'train chunk':>11} {'block MiB':>9} {'seconds':>8} {'peak +MiB':>9}"
          + (f" {'cuda MiB':>9}" if args.device == "cuda" else "") + "  top-1 (k=20, chance 0.1%)")
    given = (args.chunk, args.train_chunk) != (None, None)   # one blocking asked for, or the four compared
    asked = [(args.chunk or CHUNKINGS[0][0], args.train_chunk or CHUNKINGS[0][1])]   # the other as the first's
    for chunk, train_chunk in asked if given else CHUNKINGS:
        cmd = [sys.executable, __file__, "--child", "--chunk", str(chunk), "--train-chunk", str(train_chunk)]
        cmd += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                if k in ("device", "queries", "train", "dim", "classes")]
        line = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env=os.environ).stdout   # errors shown
        r = json.loads(line.strip().splitlines()[-1])
        block = min(chunk, args.queries) * min(train_chunk, args.train) * 4 / 2**20   # no block outgrows the data
        print(f"{chunk:>11} {train_chunk:>11} {block:>9.0f} {r['seconds']:>8.2f} {r['rss_delta_mb']:>9.0f}"
              + (f" {r['cuda_peak_mb']:>9.0f}" if "cuda_peak_mb" in r else "") + f"  {r['top1_k20']:.2f}%")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--train", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--chunk", type=int, default=None, help="queries per block (default: compare four blockings)")
    parser.add_argument("--train-chunk", type=int, default=None, help="stored features per block")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    child(args) if args.child else main(args)
