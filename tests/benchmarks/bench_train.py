"""Training throughput of the full DINO step (augmentation, teacher and student passes, loss, backward,
clip, step, EMA), one image = all its crops, with the FLOPs per image (of the step as it runs, attention
included) and the achieved rate next to the machine's measured matmul rate.

CPU (issue default): vit_tiny/8, 2x64 + 6x32 crops, batch 32, out_dim 4096, float32.
GPU: the imagenet64 profile's step (2x64 + 10x32, batch 256, bf16) for --archs, its peak memory and
model-FLOP utilisation, our GPU augmentation fed from a memmap versus the classic per-image CPU pipeline
(torchvision transforms in DataLoader workers).
Run: python tests/benchmarks/bench_train.py [--device cuda] [--archs vit_tiny vit_small vit_base]
     python tests/benchmarks/bench_train.py --compare OLD.ipynb [--rounds 8]   (CPU step, old vs this
     notebook, interleaved; e.g. OLD.ipynb from `git show <commit>:dino_vit.ipynb > OLD.ipynb`)
"""
import argparse
import gc
import math
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from nbloader import bench_header, check_at_least, load_notebook  # noqa: E402


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


# what FlopCounterMode has no formula for: the CPU's attention (counted as 0 before, 4% of a ViT-T step) and the
# in-place addmm_ of the float32 loss's last-layer gradient
ATEN = torch.ops.aten
MORE_FLOP_FORMULAS = {  # shapes in, FLOPs out (FlopCounterMode passes the shapes of the op's arguments)
    ATEN._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v),
    ATEN._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *_, **__: sdpa_backward_flop_count(grad, q, k, v),
    ATEN.addmm_: lambda _, a, b, *__, **___: 2 * a[0] * a[1] * b[1]}


def flops_per_image(nb, trainer, batch):
    """FLOPs of one step per image as run (ChunkedHeadCrossEntropy's recomputed last layer included), counted
    on an eager step (a graph replay dispatches no ops)."""
    captured, trainer.captured = getattr(trainer, "captured", None), None
    try:
        with FlopCounterMode(display=False, custom_mapping=MORE_FLOP_FORMULAS) as counter:
            nb.train_step(trainer, batch)
    finally:
        trainer.captured = captured
    return counter.get_total_flops() / len(batch)


def timed_steps(nb, trainer, batches, steps, read_every=None, warmups=2):
    """(images/s over `steps` steps drawn from the iterator `batches`, seconds of the `warmups` steps before
    them: compile, eager steps and the recording of a CUDA graph happen there). read_every=10 reads the
    figures back every 10 steps as run_epoch does with log_every_steps=10; None calls train_step with its
    defaults (also a notebook from before the read-back existed)."""
    read = (lambda i: (i is None or (i + 1) % read_every == 0,)) if read_every else (lambda i: ())
    sync(trainer.device)
    start = time.perf_counter()
    for _ in range(warmups):   # figures read at each warm-up step (i None)
        nb.train_step(trainer, next(batches), *read(None))
    sync(trainer.device)
    first, start, n = time.perf_counter() - start, time.perf_counter(), 0
    for i in range(steps):
        batch = next(batches)
        n += len(batch) if torch.is_tensor(batch) else len(batch[0])
        nb.train_step(trainer, batch, *read(i))
    sync(trainer.device)
    return n / (time.perf_counter() - start), first


def step_rate(nb, trainer, batches, steps):
    """images/s of train_step with its defaults, after 2 warm-up steps."""
    return timed_steps(nb, trainer, batches, steps)[0]


def repeat(batch):
    while True:
        yield batch


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--archs", nargs="+", default=None, choices=["vit_tiny", "vit_small", "vit_base"])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--workers", type=int, default=12, help="DataLoader workers of the per-image pipeline")
    p.add_argument("--batch", type=int, default=256, help="batch size of the GPU runs")
    p.add_argument("--gpu-path-on", default=None, help="run the GPU comparison on this device (e.g. cpu, to check it)")
    p.add_argument("--compare", default=None, help="another notebook file: time its CPU step against this one's")
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds of --compare")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="GPU: the step variants measured for vit_small (the other sizes: graphs)")
    p.add_argument("--before", default=None, help="GPU: another notebook file whose step is measured too")
    p.add_argument("--official", default=None, help="GPU: a checkout of facebookresearch/dino to time its step")
    p.add_argument("--no-profile", action="store_true")
    a = p.parse_args()
    check_at_least(p, a, steps=1, batch=1, rounds=1, workers=0)
    for name in ("compare", "before", "official"):
        if getattr(a, name) and not Path(getattr(a, name)).exists():
            p.error(f"--{name}={getattr(a, name)}: no such file or folder")
    try:
        device = torch.device(a.device)
    except RuntimeError as error:
        p.error(f"--device={a.device}: {error}")
    gpu_run = device.type != "cpu" or a.gpu_path_on
    if not gpu_run and (a.archs or a.before or a.official):
        p.error("--archs, --before and --official are for the GPU run (--device cuda, or --gpu-path-on)")
    print(bench_header(device), flush=True)
    nb, steps, failed = load_notebook(), lambda default: default if a.steps is None else a.steps, 0
    if a.compare and device.type == "cpu":
        compare_cpu(load_notebook(a.compare, name="dino_vit_other"), nb, a.rounds)
    elif a.gpu_path_on:
        failed = run_gpu(nb, torch.device(a.gpu_path_on), a.archs or ["vit_small"], steps(2), a.workers, a.batch,
                         a.variants, profile=False)
    elif device.type == "cpu":
        run_cpu(nb, steps(3))
    else:
        old = load_notebook(a.before, name="dino_vit_before") if a.before else None
        failed = run_gpu(nb, device, a.archs or ["vit_tiny", "vit_small", "vit_base"], steps(20), a.workers,
                         a.batch, a.variants, old, a.official, not a.no_profile)
    sys.exit(f"{failed} measurement(s) FAILED" if failed else 0)


def cpu_trainer(nb):
    """The issue's CPU step: vit_tiny/8, batch 32, 2x64 + 6x32 crops, out_dim 4096, float32."""
    cfg = nb.make_config("demo", arch="vit_tiny", patch_size=8, batch_size=32, n_local_crops=6, out_dim=4096,
                         checkpoint_dir="/tmp/bench_train")
    return nb.DINOTrainer(cfg, 10_000, torch.device("cpu"))


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
    print(f"{rounds} interleaved "
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
    print("vit_tiny/8, 2x64 + 6x32 crops, batch 32, out_dim 4096, float32")   # the machine: bench_header's line
    print(f"  full step: {rate:.2f} images/s; {flops / 1e9:.2f} GFLOP/image (forward + backward, as run)")
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
                                         num_workers=workers, pin_memory=True, persistent_workers=workers > 0,
                                         prefetch_factor=4 if workers else None)
    while True:
        yield from loader


VARIANTS = {"eager": dict(compile=False, cuda_graphs=False), "graphs": dict(compile=False, cuda_graphs=True),
            "compile": dict(compile=True, cuda_graphs=False), "compile+graphs": dict(compile=True, cuda_graphs=True)}


def gpu_variant(nb, arch, variant, images, device, steps, batch_size):
    cfg = nb.make_config("imagenet64", arch=arch, checkpoint_dir="/tmp/bench_train", num_workers=6,
                         batch_size=batch_size, **VARIANTS[variant])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    nb.seed_everything(0)
    trainer = nb.DINOTrainer(cfg, len(images), device)
    on_gpu, warmups = torch.from_numpy(images[:cfg.batch_size]).to(device), 3
    compute, first = timed_steps(nb, trainer, repeat(on_gpu), steps, read_every=10, warmups=warmups)
    batches = nb.batch_loader(images, nb.epoch_batches(len(images), cfg.batch_size, 0, 0) * 10, cfg.num_workers,
                              pin_memory=device.type == "cuda")
    fed, _ = timed_steps(nb, trainer, batches, steps, read_every=10, warmups=warmups)
    overhead = first - warmups * cfg.batch_size / compute
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return trainer, dict(compute=compute, fed=fed, overhead=overhead, memory=memory)


def run_gpu(nb, device, archs, steps, workers, batch_size, variants, old_nb=None, official=None, profile=True):
    """The GPU comparison, printed; returns how many of its measurements failed (the others still run)."""
    cuda, failed, classic_done = device.type == "cuda", 0, False
    peak = matmul_rate(device, torch.bfloat16 if cuda else torch.float32, 8192 if cuda else 1024)
    print(f"{torch.cuda.get_device_name() if cuda else 'CPU'}, torch {torch.__version__}; measured "
          f"{'bf16' if cuda else 'fp32'} matmul {peak / 1e12:.2f} TFLOP/s", flush=True)
    images = np.random.default_rng(0).integers(0, 256, (max(8192, 40 * batch_size), 3, 64, 64), dtype=np.uint8)
    for arch in archs:
        print(f"\n[{arch}/8] imagenet64 step, batch {batch_size}, 2x64 + 10x32 crops, out_dim 65536, bf16; "
              f"figures read back every 10 steps", flush=True)
        flops = None
        for variant in (variants if arch == "vit_small" else ["graphs"]):
            try:
                trainer, r = gpu_variant(nb, arch, variant, images, device, steps, batch_size)
            except Exception as error:   # a variant that fails is reported, the others still run
                print(f"  {variant:15s}: FAILED {type(error).__name__}: {str(error)[:300]}", flush=True)
                failed += 1
                continue
            if flops is None:
                flops = flops_per_image(nb, trainer, torch.from_numpy(images[:batch_size]).to(device))
            print(f"  {variant:15s}: {r['compute']:8,.0f} images/s (data on the GPU), {r['fed']:8,.0f} from the "
                  f"memmap; MFU {100 * r['fed'] * flops / 989e12:.0f}% of 989 TFLOP/s dense bf16 "
                  f"({100 * r['fed'] * flops / peak:.0f}% of measured); first 3 steps +{r['overhead']:.1f} s; "
                  f"peak memory {r['memory']:.1f} GiB", flush=True)
            if profile and arch == "vit_small" and variant in ("eager", "graphs", "compile+graphs"):
                try:
                    print(profile_table(nb, trainer, torch.from_numpy(images[:batch_size]).to(device), variant))
                except Exception as error:
                    print(f"  profile of {variant} FAILED: {type(error).__name__}: {error}")
                    failed += 1
            if arch == "vit_small" and not classic_done:   # beside the first variant that ran (a later one may fail)
                classic_done = True
                try:
                    classic = step_rate(nb, trainer, per_image_loader(nb, trainer.cfg, images, workers), steps)
                    print(f"  per-image CPU pipeline, {workers} workers: {classic:8,.0f} images/s -> ours ({variant}) "
                          f"from the memmap is {r['fed'] / classic:.1f}x", flush=True)
                except Exception as error:
                    print(f"  per-image CPU pipeline FAILED: {type(error).__name__}: {error}", flush=True)
                    failed += 1
            del trainer
            gc.collect()   # a trainer and its CUDA graph refer to each other: freed before the next peak is measured
            if cuda:
                torch.cuda.empty_cache()
        print(f"  {flops / 1e9:.1f} GFLOP/image (as run)" if flops else "", flush=True)
        if arch == "vit_small" and old_nb is not None:
            old = old_nb.make_config("imagenet64", checkpoint_dir="/tmp/bench_train_old", num_workers=6)
            old_trainer = old_nb.DINOTrainer(old, len(images), device)
            rate = step_rate(old_nb, old_trainer, repeat(torch.from_numpy(images[:batch_size]).to(device)), steps)
            print(f"  {'before (eager)':15s}: {rate:8,.0f} images/s (data on the GPU): the step as it was", flush=True)
            del old_trainer
            gc.collect()
            torch.cuda.empty_cache()
        if arch == "vit_small" and official:
            try:
                print(f"  {'official code':15s}: {official_step_rate(official, device, batch_size, steps):8,.0f} "
                      f"images/s (its modules, fp16 autocast + GradScaler, crops ready on the GPU)", flush=True)
            except Exception as error:
                print(f"  official code FAILED: {type(error).__name__}: {error}", flush=True)
                failed += 1
    return failed


KERNEL_KINDS = [  # (kind, pattern in the kernel name), first match wins: attention before matmul (flash and
    # fmha kernels are cutlass templates), Inductor's before conv (its kernels name the ops they fuse)
    ("attention", r"flash|fmha|attention|sdpa|efficient"),
    ("matmul", r"gemm|cutlass|xmma|cublas|nvjet|wgmma|gemv|splitK|^triton_tem"),
    ("fused (Inductor)", r"^triton_"),
    ("patch conv", r"conv|implicit|cudnn|winograd"),
    ("norm", r"layer_norm|LayerNorm|norm_kernel"),
    ("GELU", r"gelu|Gelu"),
    ("softmax", r"softmax|Softmax|SoftMax"),
    ("optimizer + clip + EMA", r"adam|Adam|multi_tensor|foreach|MultiTensor"),
    ("copies", r"[Mm]emcpy|[Mm]emset|copy|cat_|CatArray"),
    ("reductions", r"reduce|Reduce"),
    ("elementwise", r"elementwise|vectorized|unrolled|Elementwise"),
]


def profile_table(nb, trainer, batch, variant, steps=5):
    """Where the GPU time of a step goes, from torch.profiler: busy time by kernel kind, the idle gaps
    between kernels, kernels and host syncs per step; the GPU-timeline span of regions marked by
    record_function (the profiler mirrors each as a user annotation, which is no kernel)."""
    from torch.profiler import ProfilerActivity, profile, record_function
    regions = {"augmentation": (trainer, "augment"), "loss (forward)": (trainer.loss, "forward"),
               "optimizer step": (trainer.optimizer, "step")}
    originals = {name: getattr(owner, attr) for name, (owner, attr) in regions.items()}

    def recorded(call, name):
        def wrapper(*args, **kwargs):
            with record_function(name):
                return call(*args, **kwargs)
        return wrapper
    for name, (owner, attr) in regions.items():
        setattr(owner, attr, recorded(originals[name], name))
    try:
        for i in range(3):
            nb.train_step(trainer, batch, True)
        sync(trainer.device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(steps):
                nb.train_step(trainer, batch, i == steps - 1)
            sync(trainer.device)
    finally:
        for name, (owner, attr) in regions.items():
            setattr(owner, attr, originals[name])
    events = prof.events()
    on_gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu = [e for e in on_gpu if not e.is_user_annotation]   # kernels and copies
    spans = sorted((e.time_range.start, e.time_range.end) for e in gpu)
    busy, end = 0.0, -1.0
    for a, b in spans:
        if b > end:
            busy += b - max(a, end)
            end = b
    wall = spans[-1][1] - spans[0][0]
    by_kind = {}
    for e in gpu:
        kind = next((k for k, pattern in KERNEL_KINDS if re.search(pattern, e.name)), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + e.time_range.elapsed_us()
    # the runtime's waits only: an .item() is aten::_local_scalar_dense and the cudaStreamSynchronize it makes
    syncs = sum(1 for e in events if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                 "cudaEventSynchronize"))
    lines = [f"  profile ({variant}, {steps} steps): GPU span {wall / steps / 1e3:.1f} ms/step, busy "
             f"{busy / steps / 1e3:.1f} ms, idle gaps {(wall - busy) / steps / 1e3:.1f} ms "
             f"({100 * (wall - busy) / wall:.0f}%); {len(gpu) / steps:.0f} kernels and copies per step; "
             f"{syncs / steps:.1f} host syncs per step"]
    total = sum(by_kind.values())
    for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        lines.append(f"    {kind:24s} {us / steps / 1e3:7.2f} ms/step  {100 * us / total:5.1f}% of kernel time")
    for name in regions:
        span = sum(e.time_range.elapsed_us() for e in on_gpu if e.is_user_annotation and e.name == name)
        if span:
            lines.append(f"    region {name:17s} {span / steps / 1e3:7.2f} ms/step of the GPU's timeline")
    return "\n".join(lines)


def official_step_rate(path, device, batch_size, steps):
    """The official code's training step (its modules, as main_dino.py's train_one_epoch runs them on one
    GPU: fp16 autocast, GradScaler, its per-parameter clipping and EMA loop) on crops already on the GPU."""
    import os
    import torch.distributed as dist
    sys.path.insert(0, str(path))
    import main_dino
    import utils as official_utils
    import vision_transformer as vits
    if not dist.is_initialized():   # its loss all-reduces the centre
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        make = lambda rate: official_utils.MultiCropWrapper(vits.vit_small(patch_size=8, drop_path_rate=rate),
                                                            vits.DINOHead(384, 65536, False, False)).to(device)
        student, teacher = make(0.1), make(0.0)
        teacher.load_state_dict(student.state_dict())
        for p in teacher.parameters():
            p.requires_grad = False
        loss_fn = main_dino.DINOLoss(65536, 12, 0.04, 0.07, 30, 100).to(device)
        optimizer = torch.optim.AdamW(official_utils.get_params_groups(student))
        scaler = torch.amp.GradScaler("cuda")
        crops = [torch.randn(batch_size, 3, s, s, device=device) for s in [64] * 2 + [32] * 10]

        def step():
            with torch.autocast("cuda", dtype=torch.float16):
                teacher_output, student_output = teacher(crops[:2]), student(crops)
                loss = loss_fn(student_output, teacher_output, 0)
            assert math.isfinite(loss.item())
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            official_utils.clip_gradients(student, 3.0)
            official_utils.cancel_gradients_last_layer(1, student, 1)
            scaler.step(optimizer)
            scaler.update()
            with torch.no_grad():
                for param_q, param_k in zip(student.parameters(), teacher.parameters()):
                    param_k.data.mul_(0.9995).add_((1 - 0.9995) * param_q.detach().data)
            torch.cuda.synchronize()
        for _ in range(3):
            step()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        return steps * batch_size / (time.perf_counter() - start)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
