"""The DINO loss from the student's logits against the same loss formed per crop from the last layer's
inputs (ChunkedHeadCrossEntropy, what the training step runs): time of forward + backward through the
DINO head (its MLP and last layer) and the loss, and the peak memory they add to what their inputs and
weights hold (the process's baseline, about 0.55 GiB of Python and torch on a CPU, left out), each in a fresh
process, at the imagenet64 shapes (2 global + 10 local crops, out_dim 65,536, bottleneck 256).
Run: python tests/benchmarks/bench_head_loss.py [--batch 64] [--device cpu|cuda] [--steps 5]
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nbloader import bench_header, load_notebook  # noqa: E402


def measure(split, batch, out_dim, crops, steps, device):
    nb = load_notebook()
    torch.manual_seed(0)
    head = nb.DINOHead(384, out_dim, norm_last_layer=False).to(device)
    student = nb.MultiCropWrapper(torch.nn.Identity(), head)   # the backbone's features given: the head alone
    loss_fn = nb.DINOLoss(out_dim, crops, 0.04, 0.04, 0, 1).to(device)
    features = list(torch.randn(crops * batch, 384, device=device).chunk(crops))
    teacher = torch.randn(2 * batch, out_dim, device=device)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:   # the peak so far: the interpreter, torch, the notebook, the inputs and the head
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: KiB
    times = []
    for step in range(steps + 1):
        sync()
        start = time.perf_counter()
        with torch.autocast(**amp):
            output = student(features, split_last_layer=split)
        loss = loss_fn(output, teacher, epoch=0)
        head.zero_grad(set_to_none=True)
        loss.backward()
        sync()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return dict(loss=loss.item(), seconds=sorted(times[1:])[len(times[1:]) // 2], peak_bytes=peak - before)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--out-dim", type=int, default=65536)
    p.add_argument("--crops", type=int, default=12)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--one", choices=["logits", "split"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(a.one == "split", a.batch, a.out_dim, a.crops, a.steps, torch.device(a.device))))
        return
    print(bench_header(a.device), flush=True)
    logits_mib = a.crops * a.batch * a.out_dim * 4 / 2**20
    print(f"DINO head and loss, forward and backward: {a.crops} crops x batch {a.batch} x out_dim {a.out_dim} "
          f"on {a.device}; the student's logits in float32: {logits_mib:.0f} MiB")
    results = {}
    for kind in ("logits", "split"):
        out = subprocess.run([sys.executable, __file__, "--one", kind] + sys.argv[1:], check=True,
                             stdout=subprocess.PIPE, text=True).stdout   # its errors go to the terminal
        results[kind] = json.loads(out.strip().splitlines()[-1])
        r = results[kind]
        print(f"  {kind:6s}: loss {r['loss']:.6f}, {1000 * r['seconds']:.0f} ms, peak memory above the inputs' "
              f"{r['peak_bytes'] / 2**20:.0f} MiB{' (process RSS)' if a.device == 'cpu' else ''}")
    l, s = results["logits"], results["split"]
    print(f"  split / logits: time {s['seconds'] / l['seconds']:.2f}x, peak memory "
          f"{s['peak_bytes'] / l['peak_bytes']:.2f}x; |loss difference| {abs(l['loss'] - s['loss']):.1e}")


if __name__ == "__main__":
    main()
