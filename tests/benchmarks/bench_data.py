"""ImageNet-64 cache: build from one full-size train file, then epochs and random-access reads.

Writes a synthetic train_data_batch_1 of 128,116 images (the official size, ~1.57 GB) in the official
pickle format, converts it in a fresh process (seconds, MiB/s, peak RSS), then, in another fresh process,
reads epochs as training does (every image once, in sorted batches of 256 of a random order): through a
plain memmap, and through the checked images, whose first epoch hashes the blocks still to check (the
cost of the lazy checks): a 1/128 sample of the blocks (at least one) while the image file is sealed,
every block once after it was touched; then 100k random indices (images/s, RSS: anonymous memory vs. file pages).
Usage: python tests/benchmarks/bench_data.py [--n 128116] [--dir /tmp/bench_imagenet64]
"""
import argparse
import contextlib
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from nbloader import bench_header, load_notebook  # noqa: E402


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
    nb = load_notebook()
    before = rss_mb()
    t = time.perf_counter()
    ds = nb.ImageNet64(root, "train", cache_dir=cache)
    seconds = time.perf_counter() - t
    size_mb = (root / "train_data_batch_1").stat().st_size / 2**20
    return {"images": len(ds), "seconds": seconds, "source_mb": size_mb, "mb_per_s": size_mb / seconds,
            "peak_rss_mb": rss_mb()["peak"], "rss_before_mb": before["rss"]}


def epoch_seconds(images, seed):
    """One epoch of reading as the training loop does it: every image once, sorted batches of 256."""
    import numpy as np
    order = np.random.default_rng(seed).permutation(len(images))
    t = time.perf_counter()
    for start in range(0, len(order), 256):
        np.ascontiguousarray(images[np.sort(order[start:start + 256])])
    return time.perf_counter() - t


def read(root, cache, n_reads):
    import numpy as np
    nb = load_notebook()
    t = time.perf_counter()
    ds = nb.ImageNet64(root, "train", cache_dir=cache)
    open_s = time.perf_counter() - t
    plain = np.memmap(f"{ds.prefix}.u8", np.uint8, "r", shape=ds.images.shape)
    epoch_seconds(plain, 0)   # the page cache warmed, as in any epoch after the first
    plain_s = [epoch_seconds(plain, seed) for seed in (1, 2, 3, 4, 5)]
    sampled = int(len(ds.images.checked) - ds.images.checked.sum())
    def later(images):
        """A later epoch's extra time against the plain memmap, each read alternately six times (medians):
        the first epochs after a hashing pass run slow for both alike."""
        pairs = np.array([(epoch_seconds(images, seed), epoch_seconds(plain, seed)) for seed in range(2, 8)])
        return float(np.median(pairs[:, 0]) - np.median(pairs[:, 1]))
    sealed_s = [epoch_seconds(ds.images, 1), later(ds.images)]
    # the first epoch of five fresh opens (each checks a fresh sample), and the hashing alone
    sealed_first_s = [epoch_seconds(nb.ImageNet64(root, "train", cache_dir=cache).images, seed) for seed in range(5)]
    block = np.ascontiguousarray(plain[:nb.CHECKSUM_IMAGES])
    t = time.perf_counter()
    for _ in range(5):
        hashlib.sha256(block).hexdigest()
    hash_block_s = (time.perf_counter() - t) / 5
    time.sleep(0.05)
    os.chmod(f"{ds.prefix}.u8", os.stat(f"{ds.prefix}.u8").st_mode)   # touched: the seal is broken
    touched = nb.ImageNet64(root, "train", cache_dir=cache)
    touched_s = [epoch_seconds(touched.images, 1), later(touched.images)]
    resealed = int(len(ds.images.checked) - nb.ImageNet64(root, "train", cache_dir=cache).images.checked.sum())
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
        ds.images[np.sort(idx[start:start + 256])]  # one sorted fancy read of 256 images
    batch_s = time.perf_counter() - t
    after = rss_mb()
    return {"open_s": open_s, "plain_epoch_s": plain_s, "sealed_epoch_s": sealed_s, "touched_epoch_s": touched_s,
            "sealed_first_epochs_s": sealed_first_s, "hash_block_s": hash_block_s,
            "blocks": len(ds.images.checked), "sampled": sampled, "resealed_sample": resealed,
            "gb": ds.images.nbytes / 1e9, "single_images_per_s": n_reads / single_s,
            "batch256_images_per_s": n_reads / batch_s, "rss_before": before, "rss_after": after}


def child(mode, *args):
    out = subprocess.run([sys.executable, __file__, "--child", mode, *map(str, args)],
                         check=True, stdout=subprocess.PIPE, text=True).stdout   # its errors go to the terminal
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=128_116)
    p.add_argument("--reads", type=int, default=100_000)
    p.add_argument("--dir", default="/tmp/bench_imagenet64")
    p.add_argument("--child", nargs="+")
    a = p.parse_args()
    for name in ("n", "reads"):
        if getattr(a, name) < 1:
            p.error(f"--{name}={getattr(a, name)}: must be >= 1")
    if a.child:
        mode, *rest = a.child
        fn = {"write": write_file, "convert": convert, "read": read}[mode]
        args = [Path(rest[0])] + ([Path(rest[1])] if len(rest) > 1 else [])
        result = fn(*args, a.reads) if mode == "read" else fn(*args) if mode == "convert" else fn(args[0], a.n)
        if result is not None:   # the write mode returns nothing
            print(json.dumps(result))
        return
    root, cache = Path(a.dir) / "src", Path(a.dir) / "cache"
    others = sorted(p.name for p in Path(a.dir).iterdir() if p.name not in ("src", "cache")) \
        if Path(a.dir).is_dir() else []
    if others:   # it deletes its own two folders only: a folder of other files was given by mistake
        raise SystemExit(f"--dir {a.dir} holds {others[:3]}, not only this benchmark's src/ and cache/: "
                         f"give a new or empty folder")
    remove_folders(a.dir, root, cache)
    print(bench_header(), flush=True)
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
    print(f"disk reference: copying the source file (read + write + fsync) runs at {disk_mb_s:.0f} MiB/s")
    c = child("convert", root, cache)
    print(f"cache build: {c['images']} images, {c['source_mb']:.0f} MiB in {c['seconds']:.1f} s = "
          f"{c['mb_per_s']:.0f} MiB/s; peak RSS {c['peak_rss_mb']:.0f} MiB, {c['rss_before_mb']:.0f} before "
          f"(the conversion's own: {(c['peak_rss_mb'] - c['rss_before_mb']) / c['source_mb']:.2f}x the source file)")
    r = child("read", root, cache)
    b, e = r["rss_before"], r["rss_after"]
    print(f"open cached split: {r['open_s'] * 1000:.0f} ms (content samples of the source included)")
    plain = min(r["plain_epoch_s"])
    print(f"an epoch's reading ({r['gb']:.2f} GB, page cache warm) through a plain memmap: {plain:.3f} s")
    for case, blocks in (("sealed", f"{r['sampled']} of {r['blocks']} blocks"), ("touched", f"all {r['blocks']} blocks")):
        first, later = r[f"{case}_epoch_s"][0] - plain, r[f"{case}_epoch_s"][1]
        print(f"  checked images, {case} file: first epoch {r[f'{case}_epoch_s'][0]:.3f} s ({blocks} hashed, "
              f"{100 * first / plain:+.1f}% of an epoch's reading), later epochs {100 * later / plain:+.1f}% "
              f"(medians, read alternately with the plain memmap)")
    median = lambda xs: sorted(xs)[len(xs) // 2]
    plain_median, first_median = median(r["plain_epoch_s"]), median(r["sealed_first_epochs_s"])
    hashing = r["sampled"] * r["hash_block_s"]
    print(f"  sealed file, five fresh opens: first epoch median {first_median:.3f} s against the plain memmap's "
          f"median {plain_median:.3f} s ({100 * (first_median / plain_median - 1):+.1f}%); the sample's hashing "
          f"alone: {r['sampled']} x {1000 * r['hash_block_s']:.1f} ms = {100 * hashing / plain_median:.1f}% of an "
          f"epoch's reading (SHA-256 at {r['gb'] / r['blocks'] / r['hash_block_s']:.2f} GB/s)")
    print(f"  after the touched file's blocks all matched it was sealed again: the next open checks "
          f"{r['resealed_sample']} block(s)")
    print(f"random access, {a.reads} indices: {r['single_images_per_s']:,.0f} images/s one by one, "
          f"{r['batch256_images_per_s']:,.0f} images/s in sorted batches of 256")
    print(f"RSS before/after reads: anonymous {b['anon']:.0f} -> {e['anon']:.0f} MiB (flat in N), "
          f"memmap file pages {b['file']:.0f} -> {e['file']:.0f} MiB (page cache, reclaimable)")
    remove_folders(a.dir, root, cache)


def remove_folders(folder, *inside):
    """This benchmark's folders inside `folder`, then `folder` itself if that leaves it empty."""
    for path in inside:
        shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        Path(folder).rmdir()


if __name__ == "__main__":
    main()
