"""Training throughput of the full DINO step (augmentation, teacher and student passes, loss, backward,
clip, step, EMA), one image = all its crops, with the model FLOPs per image and the achieved rate next
to the machine's measured matmul rate.

CPU (issue default): vit_tiny/8, 2x64 + 6x32 crops, batch 32, out_dim 4096, float32.
GPU: the imagenet64 profile's step (2x64 + 10x32, batch 256, bf16) for --archs, its peak memory and
model-FLOP utilisation, our GPU augmentation fed from a memmap versus the classic per-image CPU pipeline
(torchvision transforms in DataLoader workers).
Run: python tests/benchmarks/bench_train.py [--device cuda] [--archs vit_tiny vit_small vit_base]
     python tests/benchmarks/bench_train.py --compare OLD.ipynb [--rounds 8]   (CPU step, old vs this
     notebook, interleaved; e.g. OLD.ipynb from `git show <commit>:dino_vit.ipynb > OLD.ipynb`)
"""
import platform
import statistics
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from nbloader import load_notebook  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device, dtype, n):
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    reps, start = 10, time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


def flops_per_image(nb, trainer, batch):
    with FlopCounterMode(display=False) as counter:
        nb.train_step(trainer, batch)
    return counter.get_total_flops() / len(batch)


def step_rate(nb, trainer, batches, steps):
    """images/s of train_step over `steps` steps drawn from the iterator `batches` (after 2 warm-ups)."""
    for _ in range(2):
        nb.train_step(trainer, next(batches))
    sync(trainer.device)
    start, n = time.perf_counter(), 0
    for _ in range(steps):
        batch = next(batches)
        n += len(batch) if torch.is_tensor(batch) else len(batch[0])
        nb.train_step(trainer, batch)
    sync(trainer.device)
    return n / (time.perf_counter() - start)


def repeat(batch):
    while True:
        yield batch


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--archs", nargs="+", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--workers", type=int, default=12, help="DataLoader workers of the per-image pipeline")
    p.add_argument("--batch", type=int, default=256, help="batch size of the GPU runs")
    p.add_argument("--gpu-path-on", default=None, help="run the GPU comparison on this device (e.g. cpu, to check it)")
    p.add_argument("--compare", default=None, help="another notebook file: time its CPU step against this one's")
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds of --compare")
    a = p.parse_args()
    nb = load_notebook()
    device = torch.device(a.device)
    if a.compare:
        compare_cpu(load_notebook(a.compare, name="dino_vit_other"), nb, a.rounds)
    elif a.gpu_path_on:
        run_gpu(nb, torch.device(a.gpu_path_on), a.archs or ["vit_small"], a.steps or 2, a.workers, a.batch)
    elif device.type == "cpu":
        run_cpu(nb, a.steps or 3)
    else:
        run_gpu(nb, device, a.archs or ["vit_tiny", "vit_small", "vit_base"], a.steps or 20, a.workers, a.batch)


def cpu_trainer(nb):
    """The issue's CPU step: vit_tiny/8, batch 32, 2x64 + 6x32 crops, out_dim 4096, float32."""
    cfg = nb.make_config("demo", arch="vit_tiny", patch_size=8, batch_size=32, n_local_crops=6, out_dim=4096,
                         checkpoint_dir="/tmp/bench_train")
    return nb.DINOTrainer(cfg, 10_000, torch.device("cpu"))


def cpu_model():
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def compare_cpu(old_nb, new_nb, rounds):
    """Median wall and process-CPU seconds per step of two notebooks' steps, alternating step by step, so
    that both see the same load on a shared machine; the ratio is old / new."""
    batch = torch.randint(0, 256, (32, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    runs = {"old": (old_nb, cpu_trainer(old_nb)), "new": (new_nb, cpu_trainer(new_nb))}
    flops = flops_per_image(new_nb, runs["new"][1], batch) * len(batch)
    wall, cpu = {k: [] for k in runs}, {k: [] for k in runs}
    for r in range(rounds + 1):
        for name, (nb, trainer) in (runs.items() if r % 2 else reversed(runs.items())):
            w, c = time.perf_counter(), time.process_time()
            nb.train_step(trainer, batch)
            if r:   # round 0 warms up
                wall[name].append(time.perf_counter() - w)
                cpu[name].append(time.process_time() - c)
    c = time.process_time()
    peak = {"wall": matmul_rate(torch.device("cpu"), torch.float32, 2048)}
    peak["CPU"] = 2 * 2048 ** 3 * 13 / (time.process_time() - c)   # matmul_rate: 3 warm-up + 10 timed products
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}; {rounds} interleaved "
          f"rounds; vit_tiny/8, batch 32, 2x64 + 6x32 crops, out_dim 4096, float32; {flops / 1e9:.0f} GFLOP/step")
    print(f"  measured matmul (2048^3): {peak['wall'] / 1e9:.1f} GFLOP/s of wall time, "
          f"{peak['CPU'] / 1e9:.1f} GFLOP/s of CPU time")
    for label, times in (("wall", wall), ("CPU", cpu)):
        old, new = statistics.median(times["old"]), statistics.median(times["new"])
        print(f"  {label:4s} s/step, median: old {old:.2f}, new {new:.2f} -> {old / new:.3f}x; "
              f"new {flops / new / 1e9:.1f} GFLOP/s of {label} time ({100 * flops / new / peak[label]:.0f}% of matmul)")
        print(f"       all old: {[round(x, 2) for x in times['old']]}\n       all new: {[round(x, 2) for x in times['new']]}")


def run_cpu(nb, steps):
    trainer = cpu_trainer(nb)
    cfg, device = trainer.cfg, trainer.device
    batch = torch.randint(0, 256, (cfg.batch_size, 3, 64, 64), dtype=torch.uint8)
    flops = flops_per_image(nb, trainer, batch)
    rate = step_rate(nb, trainer, repeat(batch), steps)
    peak = matmul_rate(device, torch.float32, 2048)
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}: vit_tiny/8, 2x64 + 6x32 crops, "
          f"batch 32, out_dim 4096, float32")
    print(f"  full step: {rate:.2f} images/s; model FLOPs {flops / 1e9:.2f} GFLOP/image (forward + backward)")
    print(f"  achieved {rate * flops / 1e9:.1f} GFLOP/s vs measured matmul {peak / 1e9:.1f} GFLOP/s "
          f"= {100 * rate * flops / peak:.0f}% (goal >= 90%)")


def per_image_loader(nb, cfg, images, workers):
    from bench_augment import per_image_pipeline
    pipeline = per_image_pipeline(nb, cfg)

    class PerImage(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return pipeline(torch.from_numpy(np.ascontiguousarray(images[i])))

    loader = torch.utils.data.DataLoader(PerImage(), batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, pin_memory=True, persistent_workers=True,
                                         prefetch_factor=4)
    while True:
        yield from loader


def run_gpu(nb, device, archs, steps, workers, batch_size):
    cuda = device.type == "cuda"
    peak = matmul_rate(device, torch.bfloat16 if cuda else torch.float32, 8192 if cuda else 1024)
    print(f"{torch.cuda.get_device_name() if cuda else 'CPU'}, torch {torch.__version__}; measured "
          f"{'bf16' if cuda else 'fp32'} matmul {peak / 1e12:.2f} TFLOP/s")
    images = np.random.default_rng(0).integers(0, 256, (max(8192, 40 * batch_size), 3, 64, 64), dtype=np.uint8)
    for arch in archs:
        cfg = nb.make_config("imagenet64", arch=arch, checkpoint_dir="/tmp/bench_train", num_workers=4,
                             batch_size=batch_size)
        trainer = nb.DINOTrainer(cfg, len(images), device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        on_gpu = torch.from_numpy(images[:cfg.batch_size]).to(device)
        flops = flops_per_image(nb, trainer, on_gpu)
        compute = step_rate(nb, trainer, repeat(on_gpu), steps)
        batches = nb.batch_loader(images, nb.epoch_batches(len(images), cfg.batch_size, 0, 0) * 10,
                                  cfg.num_workers, pin_memory=cuda)
        fed = step_rate(nb, trainer, batches, steps)
        augment = trainer.augment
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            augment(on_gpu)
        sync(device)
        aug_share = (time.perf_counter() - start) / steps / (cfg.batch_size / compute)
        mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        print(f"\n[{arch}/8] imagenet64 step, batch {cfg.batch_size}, 2x64 + {cfg.n_local_crops}x32, bf16")
        print(f"  ours, data on GPU   : {compute:8,.0f} images/s, {flops / 1e9:.1f} GFLOP/image, "
              f"MFU {100 * compute * flops / 989e12:.0f}% of 989 TFLOP/s dense bf16 "
              f"({100 * compute * flops / peak:.0f}% of measured matmul); peak memory {mem:.1f} GiB; "
              f"augmentation {100 * aug_share:.0f}% of the step")
        print(f"  ours, from memmap   : {fed:8,.0f} images/s (GPU busy {100 * fed / compute:.0f}% of the step)")
        if arch == "vit_small":
            classic = step_rate(nb, trainer, per_image_loader(nb, cfg, images, workers), steps)
            print(f"  per-image CPU pipeline, {workers} workers: {classic:8,.0f} images/s -> ours is "
                  f"{fed / classic:.1f}x (goal >= 3x)")
        del trainer
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
