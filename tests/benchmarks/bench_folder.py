"""Cache build from a folder of JPEGs: images/s on 1 core and on all cores, at img_size 64 and 224, and
peak RSS at two folder sizes (it should not grow with N).

Generates N JPEGs of 500x375 (photograph crops, quality 90, 100 class folders) once into --dir, then
builds the ImageFolder cache (train and val splits) in a fresh process per measurement. Also times
one core decoding 1,000 files with and without JPEG draft mode, and a plain read of the files' bytes.
Usage: python tests/benchmarks/bench_folder.py [--n 20000] [--dir /tmp/bench_folder]
"""
import argparse
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from nbloader import bench_header, check_at_least, load_notebook  # noqa: E402


def write_jpegs(args):
    folder, indices = args
    import numpy as np
    import skimage.data
    from PIL import Image
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    for i in indices:
        rng = np.random.default_rng(i)
        photo = photos[i % len(photos)]
        top, left = rng.integers(0, photo.shape[0] - 240), rng.integers(0, photo.shape[1] - 320)
        crop = Image.fromarray(photo[top:top + 240, left:left + 320]).resize((500, 375), Image.BICUBIC)
        path = folder / f"class_{i % 100:03d}" / f"img_{i:07d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        crop.save(path, quality=90)


def make_folder(folder, n):
    done = folder / f".complete-{n}"
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        jobs = [(folder, range(k, n, 64)) for k in range(64)]
        with multiprocessing.Pool() as pool:
            pool.map(write_jpegs, jobs)
        done.touch()
    return folder


def build(folder, cache, size, workers):
    """Child process: build both splits' caches; images/s and the peak RSS (MiB) of this process. The decoder
    processes are not measured: RUSAGE_CHILDREN holds the largest child reaped so far, which is the helper
    process that importing torch forks (about 430 MiB), not a decoder still running."""
    nb = load_notebook()
    shutil.rmtree(cache, ignore_errors=True)
    t = time.perf_counter()
    sets = [nb.ImageFolder(folder, split, size, 0.1, cache, workers=workers) for split in ("train", "val")]
    seconds = time.perf_counter() - t
    n = sum(len(s) for s in sets)
    return {"images": n, "seconds": round(seconds, 2), "images_per_s": round(n / seconds, 1),
            "peak_rss_main_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}   # KiB -> MiB


def draft_effect(folder, size, n=1000):
    """One core: nb.load_square (draft + bicubic) against a full decode + the same bicubic resize."""
    from PIL import Image
    nb = load_notebook()
    paths = sorted(folder.rglob("*.jpg"))[:n]
    t = time.perf_counter()
    for p in paths:
        nb.load_square(p, size)
    ours = time.perf_counter() - t
    t = time.perf_counter()
    for p in paths:
        with Image.open(p) as im:
            rgb = im.convert("RGB")
        side = min(rgb.size)
        box = ((rgb.width - side) / 2, (rgb.height - side) / 2, (rgb.width + side) / 2, (rgb.height + side) / 2)
        rgb.resize((size, size), Image.BICUBIC, box=box)
    full = time.perf_counter() - t
    n = len(paths)   # fewer than asked when the folder holds fewer
    return {"size": size, "images": n, "ours_images_per_s": round(n / ours, 1),
            "full_decode_images_per_s": round(n / full, 1)}


def child(*call):
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(call)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--dir", default="/tmp/bench_folder")
    parser.add_argument("--child")
    args = parser.parse_args()
    check_at_least(parser, args, n=4000)   # its quarter: 10 images of each of the 100 classes, one held out
    if args.child:
        name, *rest = json.loads(args.child)
        fn = {"build": build, "draft": draft_effect}[name]
        print(json.dumps(fn(*[Path(r) if isinstance(r, str) else r for r in rest])))
        return
    print(bench_header(), flush=True)
    cores = len(os.sched_getaffinity(0))
    root = Path(args.dir)
    t = time.perf_counter()
    big, small = make_folder(root / f"n{args.n}", args.n), make_folder(root / f"n{args.n // 4}", args.n // 4)
    print(f"generated / found the JPEG folders in {time.perf_counter() - t:.0f} s; {cores} cores")
    files = sorted(big.rglob("*.jpg"))
    t = time.perf_counter()
    total = sum(len(p.read_bytes()) for p in files)
    read_s = time.perf_counter() - t
    print(f"{len(files)} files, {total / 2**20:.0f} MiB; reading their bytes (page cache): "
          f"{len(files) / read_s:,.0f} files/s, {total / 2**20 / read_s:.0f} MiB/s")
    for size in (64, 224):
        print("draft mode, one core:", child("draft", str(big), size))
    for size in (64, 224):
        for workers in sorted({1, cores}):
            print(f"img_size {size}, {workers} worker(s), N={args.n}:",
                  child("build", str(big), str(root / "cache"), size, workers))
    print(f"img_size 224, {cores} worker(s), N={args.n // 4}:",
          child("build", str(small), str(root / "cache"), 224, cores))


if __name__ == "__main__":
    main()
