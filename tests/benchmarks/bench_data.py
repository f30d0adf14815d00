"""ImageNet-64 cache: build from one full-size train file, then random-access reads.

Writes a synthetic train_data_batch_1 of 128,116 images (the official size, ~1.57 GB) in the official
pickle format, converts it in a fresh process (seconds, MB/s, peak RSS), then reads 100k random
indices in another fresh process (images/s, RSS: anonymous memory vs. file pages of the memmap).
Usage: python tests/benchmarks/bench_data.py [--n 128116] [--dir /tmp/bench_imagenet64]
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def rss_mb():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    kb = lambda k: int(fields[k].split()[0]) / 1024
    return {"rss": kb("VmRSS"), "anon": kb("RssAnon"), "file": kb("RssFile"),
            "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def write_file(root, n):
    import pickle
    import numpy as np
    rng = np.random.default_rng(0)
    batch = {"data": rng.integers(0, 256, (n, 12288), dtype=np.uint8),
             "labels": rng.integers(1, 1001, n).tolist(), "mean": np.zeros(12288)}
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "train_data_batch_1", "wb") as f:
        pickle.dump(batch, f, protocol=4)


def convert(root, cache):
    sys.path.insert(0, str(HERE.parent))
    from nbloader import load_notebook
    nb = load_notebook()
    before = rss_mb()
    t = time.perf_counter()
    ds = nb.ImageNet64(root, "train", cache_dir=cache)
    seconds = time.perf_counter() - t
    size_mb = (root / "train_data_batch_1").stat().st_size / 2**20
    return {"images": len(ds), "seconds": seconds, "source_mb": size_mb, "mb_per_s": size_mb / seconds,
            "peak_rss_mb": rss_mb()["peak"], "rss_before_mb": before["rss"]}


def read(root, cache, n_reads):
    import numpy as np
    sys.path.insert(0, str(HERE.parent))
    from nbloader import load_notebook
    nb = load_notebook()
    t = time.perf_counter()
    ds = nb.ImageNet64(root, "train", cache_dir=cache)
    open_s = time.perf_counter() - t
    before = rss_mb()
    idx = np.random.default_rng(1).integers(0, len(ds), n_reads)
    t = time.perf_counter()
    total = 0
    for i in idx:
        image, label = ds[i]
        total += int(image[0, 0, 0])
    single_s = time.perf_counter() - t
    t = time.perf_counter()
    for start in range(0, n_reads, 256):
        batch = ds.images[np.sort(idx[start:start + 256])]
    batch_s = time.perf_counter() - t
    after = rss_mb()
    return {"open_s": open_s, "single_images_per_s": n_reads / single_s,
            "batch256_images_per_s": n_reads / batch_s, "rss_before": before, "rss_after": after}


def child(mode, *args):
    out = subprocess.run([sys.executable, __file__, "--child", mode, *map(str, args)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=128_116)
    p.add_argument("--reads", type=int, default=100_000)
    p.add_argument("--dir", default="/tmp/bench_imagenet64")
    p.add_argument("--child", nargs="+")
    a = p.parse_args()
    if a.child:
        mode, *rest = a.child
        fn = {"write": write_file, "convert": convert, "read": read}[mode]
        args = [Path(rest[0])] + ([Path(rest[1])] if len(rest) > 1 else [])
        result = fn(*args, a.reads) if mode == "read" else fn(*args) if mode == "convert" else fn(args[0], a.n)
        print(json.dumps(result))
        return
    root, cache = Path(a.dir) / "src", Path(a.dir) / "cache"
    shutil.rmtree(a.dir, ignore_errors=True)
    t = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--child", "write", str(root), "--n", str(a.n)], check=True)
    print(f"wrote {a.n} images in the official pickle format in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    with open(root / "train_data_batch_1", "rb") as src, open(Path(a.dir) / "copy", "wb") as dst:
        shutil.copyfileobj(src, dst, 16 << 20)
        dst.flush()
        os.fsync(dst.fileno())
    disk_mb_s = (root / "train_data_batch_1").stat().st_size / 2**20 / (time.perf_counter() - t)
    (Path(a.dir) / "copy").unlink()
    print(f"disk reference: copying the source file (read + write + fsync) runs at {disk_mb_s:.0f} MB/s")
    c = child("convert", root, cache)
    print(f"cache build: {c['images']} images, {c['source_mb']:.0f} MB in {c['seconds']:.1f} s = "
          f"{c['mb_per_s']:.0f} MB/s; peak RSS {c['peak_rss_mb']:.0f} MB "
          f"({c['peak_rss_mb'] / c['source_mb']:.2f}x the source file)")
    r = child("read", root, cache)
    b, e = r["rss_before"], r["rss_after"]
    print(f"open cached split: {r['open_s'] * 1000:.0f} ms")
    print(f"random access, {a.reads} indices: {r['single_images_per_s']:,.0f} images/s one by one, "
          f"{r['batch256_images_per_s']:,.0f} images/s in sorted batches of 256")
    print(f"RSS before/after reads: anonymous {b['anon']:.0f} -> {e['anon']:.0f} MB (flat in N), "
          f"memmap file pages {b['file']:.0f} -> {e['file']:.0f} MB (page cache, reclaimable)")
    shutil.rmtree(a.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
