"""Throughput of the multi-crop augmentation (images/s; one image = all its crops), batch of 256.

Ours (batched tensor ops, notebook section "Multi-crop augmentation") on the CPU, side by side in the same
process with DINO's classic per-image torchvision pipeline (DataAugmentationDINO: Compose of
RandomResizedCrop, RandomHorizontalFlip, RandomApply(ColorJitter), RandomGrayscale, GaussianBlur,
RandomSolarize, ToTensor/Normalize) on PIL images and on uint8 tensors. The per-image pipeline runs on one
thread, as in a data-loader worker (W workers scale it by up to W cores); ours is timed on one thread (the
like-for-like comparison) and on all. On a GPU, when there is one: ours eager and with torch.compile
(synchronised, after warm-up and compilation).
Run: python tests/benchmarks/bench_augment.py [--profiles imagenet64 demo] [--baseline-images 64]
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2 as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nbloader import bench_header, check_at_least, load_notebook  # noqa: E402

BATCH = 256


def per_image_pipeline(nb, cfg):
    """DINO's DataAugmentationDINO with this recipe: image (PIL or uint8 CHW tensor) -> list of crops."""
    sigma = nb.blur_sigma_range(cfg)
    blur = lambda p: T.RandomApply([T.GaussianBlur(nb.blur_kernel_size(cfg), sigma)], p=p)
    crop = lambda size, scale: T.RandomResizedCrop(size, scale, cfg.crop_ratio, T.InterpolationMode.BICUBIC)
    flip_and_color_jitter = T.Compose([
        T.RandomHorizontalFlip(cfg.flip_p),
        T.RandomApply([T.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)], p=cfg.jitter_p),
        T.RandomGrayscale(cfg.grayscale_p)])
    normalize = T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True),
                           T.Normalize(nb.IMAGENET_MEAN, nb.IMAGENET_STD)])
    global1 = T.Compose([crop(cfg.global_crop_size, cfg.global_crop_scale), flip_and_color_jitter,
                         blur(cfg.blur_p[0]), normalize])
    global2 = T.Compose([crop(cfg.global_crop_size, cfg.global_crop_scale), flip_and_color_jitter,
                         blur(cfg.blur_p[1]), T.RandomSolarize(cfg.solarize_threshold, cfg.solarize_p), normalize])
    local = T.Compose([crop(cfg.local_crop_size, cfg.local_crop_scale), flip_and_color_jitter,
                       blur(cfg.blur_p[2]), normalize])
    return lambda image: [global1(image), global2(image)] + [local(image) for _ in range(cfg.n_local_crops)]


def time_per_image(pipeline, images):
    pipeline(images[0])  # warm-up
    start = time.perf_counter()
    for image in images:
        pipeline(image)
    return len(images) / (time.perf_counter() - start)


def time_batched(augment, batch, repeats, cuda=False):
    for _ in range(3):  # warm-up (and compilation)
        augment(batch)
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        augment(batch)
    if cuda:
        torch.cuda.synchronize()
    return repeats * batch.shape[0] / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", nargs="+", default=["imagenet64", "demo"])
    parser.add_argument("--baseline-images", type=int, default=64, help="images timed per-image (of the 256)")
    parser.add_argument("--cpu-repeats", type=int, default=3)
    parser.add_argument("--gpu-repeats", type=int, default=50)
    args = parser.parse_args()
    check_at_least(parser, args, baseline_images=1, cpu_repeats=1, gpu_repeats=1)
    print(bench_header(), flush=True)
    nb = load_notebook()
    rng = np.random.default_rng(0)
    batch = torch.from_numpy(rng.integers(0, 256, (BATCH, 3, 64, 64), dtype=np.uint8))
    pil_images = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in batch[:args.baseline_images]]
    print(f"batch {BATCH}, GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    for profile in args.profiles:
        cfg = nb.make_config(profile)
        views = f"2x{cfg.global_crop_size} + {cfg.n_local_crops}x{cfg.local_crop_size}"
        pipeline = per_image_pipeline(nb, cfg)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a data-loader worker runs torch on one thread
        torch.manual_seed(0)
        pil = time_per_image(pipeline, pil_images)
        tensor = time_per_image(pipeline, list(batch[:args.baseline_images]))
        ours_one_thread = time_batched(nb.MultiCropAugmentation(cfg, device="cpu"), batch, args.cpu_repeats)
        torch.set_num_threads(threads)
        ours_cpu = time_batched(nb.MultiCropAugmentation(cfg, device="cpu"), batch, args.cpu_repeats)
        baseline = max(pil, tensor)
        print(f"\n[{profile}] crops per image: {views}")
        print(f"  per-image torchvision, PIL images,    1 thread : {pil:10,.0f} images/s")
        print(f"  per-image torchvision, uint8 tensors, 1 thread : {tensor:10,.0f} images/s")
        print(f"  ours, batched, CPU, 1 thread                   : {ours_one_thread:10,.0f} images/s   "
              f"({ours_one_thread / baseline:.1f}x the faster per-image pipeline on one core; goal >= 3x)")
        print(f"  ours, batched, CPU, {threads:2d} threads                 : {ours_cpu:10,.0f} images/s   "
              f"({ours_cpu / baseline:.1f}x)")
        if torch.cuda.is_available():
            gpu_batch = batch.cuda()
            for compiled in (False, True):
                augment = nb.MultiCropAugmentation(cfg, device="cuda", compile_crops=compiled)
                ours_gpu = time_batched(augment, gpu_batch, args.gpu_repeats, cuda=True)
                label = "torch.compile" if compiled else "eager        "
                print(f"  ours, batched, GPU, {label}              : {ours_gpu:10,.0f} images/s   "
                      f"(goal >= 50,000 on an H100)")


if __name__ == "__main__":
    main()
