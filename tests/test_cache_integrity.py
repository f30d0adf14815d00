"""A cache is not served after it changed: a flipped byte is caught before a batch is served, a link in place
of a cache file is never followed, and a source rewritten with its size and mtime kept is converted again."""
import contextlib
import json
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest

N = 64


def write_val(root, data, labels):
    root.mkdir(exist_ok=True)
    with open(root / "val_data", "wb") as f:
        pickle.dump({"data": data.reshape(len(data), -1), "labels": labels}, f)


@pytest.fixture
def built(nb, tmp_path, monkeypatch):
    """A val split of N images cached in blocks of 16 images: (root, cache_dir, data set, images)."""
    monkeypatch.setattr(nb, "CHECKSUM_IMAGES", 16)
    images = np.random.default_rng(0).integers(0, 256, (N, 3, 64, 64), dtype=np.uint8)
    write_val(tmp_path / "r", images, list(range(1, N + 1)))
    ds = nb.ImageNet64(tmp_path / "r", "val", cache_dir=tmp_path / "c")
    return tmp_path / "r", tmp_path / "c", ds, images


def flip_byte(prefix, image, offset=5000):
    time.sleep(0.05)   # past the file system's timestamp granularity (a few ms): the write moves the seal's times
    with open(f"{prefix}.u8", "r+b") as f:
        f.seek(image * 12288 + offset)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))


def saved_seal(prefix):
    return json.loads(open(f"{prefix}.json").read())["seal"]


def test_an_untouched_cache_checks_a_sample_and_a_touched_one_every_block_once(nb, built):
    root, cache, ds, images = built
    assert ds.images.checked.sum() == 3          # sealed at the build: one block of the four to check, at random
    np.testing.assert_array_equal(ds.images[:], images)
    assert ds.images.checked.tolist() == [1, 1, 1, 1] and ds.images.all_checked
    time.sleep(0.05)
    os.chmod(f"{ds.prefix}.u8", 0o600)           # any change moves the status-change time: the seal is broken
    touched = nb.ImageNet64(root, "val", cache_dir=cache)
    assert touched.images.checked.tolist() == [0, 0, 0, 0]             # opening hashes nothing
    np.testing.assert_array_equal(touched.images[[3, 20]], images[[3, 20]])
    assert touched.images.checked.tolist() == [1, 1, 0, 0]             # the blocks read, and only those
    assert saved_seal(ds.prefix) != nb.file_seal(open(f"{ds.prefix}.u8"))
    np.testing.assert_array_equal(touched.images[40:50], images[40:50])
    np.testing.assert_array_equal(touched[63][0], images[63])
    assert touched.images.checked.tolist() == [1, 1, 1, 1]
    assert saved_seal(ds.prefix) == nb.file_seal(open(f"{ds.prefix}.u8"))   # all matched: sealed again
    assert nb.ImageNet64(root, "val", cache_dir=cache).images.checked.sum() == 3


def test_a_flipped_byte_is_caught_before_a_batch_is_served(nb, built):
    root, cache, ds, images = built
    flip_byte(ds.prefix, 37)
    reopened = nb.ImageNet64(root, "val", cache_dir=cache)        # same size, same sources: the open passes
    assert reopened.images.checked.tolist() == [0, 0, 0, 0]       # but the write broke the seal: check all
    batches = [np.array([1, 2]), np.array([5, 40]), np.array([60, 61])]
    loader = nb.batch_loader(reopened.images, batches)
    np.testing.assert_array_equal(next(loader).numpy(), images[[1, 2]])   # block 0 is intact: served
    message = rf"{reopened.prefix}\.u8: block 2 \(images 32\.\.47\) differs from its checksum.*Delete .*\.json"
    with pytest.raises(nb.DataError, match=message):
        next(loader)                                               # block 2 is not
    with pytest.raises(nb.DataError, match=message):
        reopened[33]
    with pytest.raises(nb.DataError, match=message):
        nb.extract_features(nb.vit_tiny(patch_size=16), reopened.images[32:34])
    with pytest.raises(nb.DataError, match=r"1 of 4 blocks differ.*block 2 \(images 32\.\.47\)"):
        reopened.verify()


def test_forked_workers_share_which_blocks_were_checked(nb, built):
    root, cache, ds, images = built
    time.sleep(0.05)
    os.chmod(f"{ds.prefix}.u8", 0o600)
    touched = nb.ImageNet64(root, "val", cache_dir=cache)
    assert touched.images.checked.tolist() == [0, 0, 0, 0]
    batches = [np.arange(s, s + 8) for s in range(0, N, 8)]
    served = np.concatenate([b.numpy() for b in nb.batch_loader(touched.images, batches, num_workers=2)])
    np.testing.assert_array_equal(served, images)
    assert touched.images.checked.tolist() == [1, 1, 1, 1]           # checked in the workers, seen here


@pytest.mark.parametrize("suffix", [".u8", ".labels.npy", ".json"])
def test_a_link_in_place_of_a_cache_file_is_not_followed_and_the_cache_is_rebuilt(nb, built, tmp_path, suffix):
    root, cache, ds, images = built
    path = f"{ds.prefix}{suffix}"
    other = tmp_path / "same size, other bytes"
    other.write_bytes(bytes(reversed(open(path, "rb").read())))
    before = other.read_bytes()
    os.unlink(path)
    os.symlink(other, path)
    with pytest.warns(UserWarning, match=rf"cache {ds.prefix} rejected.*{path}: a symbolic link"):
        rebuilt = nb.ImageNet64(root, "val", cache_dir=cache)
    np.testing.assert_array_equal(rebuilt.images[:], images)
    assert rebuilt.labels.tolist() == list(range(N))
    assert not os.path.islink(path) and other.read_bytes() == before   # the link replaced, its target untouched


def test_a_source_rewritten_with_its_size_and_mtime_kept_is_converted_again(nb, built):
    root, cache, ds, images = built
    stat = (root / "val_data").stat()
    size = stat.st_size
    changed = 255 - images
    write_val(root, changed, list(range(1, N + 1)))
    os.utime(root / "val_data", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (root / "val_data").stat().st_size == size and (root / "val_data").stat().st_mtime_ns == stat.st_mtime_ns
    again = nb.ImageNet64(root, "val", cache_dir=cache)
    np.testing.assert_array_equal(again.images[:], changed)
    assert len(nb.fingerprint([root / "val_data"], sample=True)[0]) == 4   # path, size, mtime, content sample


def test_the_content_sample_covers_its_pieces_first_and_last_bytes_included(nb, tmp_path):
    path = tmp_path / "big"
    data = bytearray(np.random.default_rng(1).integers(0, 256, 5 << 20, dtype=np.uint8).tobytes())
    path.write_bytes(data)
    first = nb.content_sample(path)
    starts = np.linspace(0, len(data) - nb.SAMPLE_BYTES, nb.SAMPLE_PIECES).astype(int)
    for at, seen in ((0, True), (len(data) - 1, True), (starts[15] + 7, True), (starts[15] + nb.SAMPLE_BYTES + 7, False)):
        data[at] ^= 1
        path.write_bytes(data)
        assert (nb.content_sample(path) != first) == seen, at   # a sample: a byte between its pieces is not seen
        data[at] ^= 1
    small = tmp_path / "small"   # under 2 MiB the pieces cover the whole file
    small.write_bytes(bytes(1 << 20))
    before = nb.content_sample(small)
    small.write_bytes(bytes(700_001) + b"\1" + bytes((1 << 20) - 700_002))
    assert nb.content_sample(small) != before


@pytest.mark.parametrize("index", [5, -1, np.int64(33), slice(None), slice(90, 10, -3), slice(5, 5), [], [3, 40],
                                   np.array([99, 0, 0]), np.arange(100) % 7 == 0, (slice(17, 18), 0), ([20, 21], 2),
                                   Ellipsis])
def test_the_blocks_a_read_touches_are_all_checked(nb, index):
    rows = np.arange(100)[index[0] if isinstance(index, tuple) else index]
    read = set((np.atleast_1d(rows) // 16).tolist())
    said = set(np.asarray(list(nb.touched_blocks(index, 100, 16))).tolist())
    assert read <= said and said <= set(range(7))
    if not isinstance(index, slice) or index.step in (None, 1):
        assert said == read


def test_labels_changed_in_place_are_caught_and_rebuilt(nb, built):
    """The labels have their checksum too: five of them reversed (same count, same range, a valid .npy) are
    refused by name, by verify() as on open, and the cache is rebuilt with the sources' labels."""
    root, cache, ds, images = built
    labels_path = f"{ds.prefix}.labels.npy"
    labels = np.load(labels_path)
    labels[10:15] = labels[10:15][::-1].copy()
    np.save(labels_path, labels)
    with pytest.raises(nb.DataError, match=rf"{labels_path}: differs from its checksum"):
        nb.verify_cache(ds.prefix)
    with pytest.warns(UserWarning, match=rf"cache {ds.prefix} rejected .*{labels_path}: differs from its checksum"):
        again = nb.ImageNet64(root, "val", cache_dir=cache)
    assert again.labels.tolist() == list(range(N))
    np.testing.assert_array_equal(again.images[:], images)
    assert again.verify() == N // 16


def test_reading_a_cache_never_needs_to_write(nb, built, monkeypatch):
    """A cache whose seal broke (chmod, a copy) is resealed once every block matched; in a read-only or full
    folder that write fails, and the read goes on (it raised from inside a batch or a k-NN pass)."""
    root, cache, ds, images = built
    time.sleep(0.05)
    os.chmod(f"{ds.prefix}.u8", 0o400)   # the seal is broken: every block is checked, then a reseal is tried

    def read_only_folder(prefix, meta):
        raise OSError(30, f"Read-only file system: '{prefix}.json'")

    monkeypatch.setattr(nb, "write_cache_meta", read_only_folder)
    copied = nb.ImageNet64(root, "val", cache_dir=cache)
    np.testing.assert_array_equal(copied.images[:], images)
    assert copied.images.all_checked and saved_seal(ds.prefix) != nb.file_seal(open(f"{ds.prefix}.u8"))


def killed_writer(target, signal_number):
    """A process that writes `target` with atomic_write, killed by `signal_number` halfway: its temp file."""
    import subprocess
    import sys
    script = f"""import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
from nbloader import load_notebook
nb = load_notebook()
def write_then_wait(f):
    f.write(bytes(1000)); f.flush(); print("writing", flush=True); sys.stdin.read()
nb.atomic_write({str(target)!r}, write_then_wait)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "writing\n"
        proc.send_signal(signal_number)
        assert proc.wait(timeout=60) == -signal_number
    finally:
        proc.kill()
        proc.wait()
    left = list(Path(target).parent.glob(f".{Path(target).name}.*.tmp"))
    assert len(left) == 1 and left[0].stat().st_size == 1000
    return left[0]


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
def test_a_killed_conversions_temp_file_is_removed_by_the_next_one_at_once(nb, tmp_path, signal_name):
    """A SIGTERM (torchrun stopping a rank, a cluster's preemption) or a SIGKILL skips the `finally` that deletes
    a conversion's temp file. An hour's age told it from a conversion under way, so a relaunch at once kept it,
    built the cache, and nothing removed it afterwards (GBs); the dead writer's lock tells it at once."""
    import signal
    images = np.random.default_rng(0).integers(0, 256, (N, 3, 64, 64), dtype=np.uint8)
    write_val(tmp_path / "r", images, list(range(1, N + 1)))
    prefix = nb.ImageNet64(tmp_path / "r", "val", cache_dir=tmp_path / "c").prefix
    killed = killed_writer(f"{prefix}.u8", getattr(signal, signal_name))
    other = tmp_path / "c" / f".{prefix.name}x.u8.{nb.host_tag()}{'c' * 12}.tmp"   # another cache's, also dead
    other.write_bytes(bytes(500))
    write_val(tmp_path / "r", images[::-1].copy(), list(range(1, N + 1)))   # a changed source: the relaunch rebuilds
    rebuilt = nb.ImageNet64(tmp_path / "r", "val", cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(rebuilt.images[:], images[::-1])
    assert not killed.exists() and other.exists()
    assert nb.remove_stale_temps(tmp_path / "c") == 500 and not other.exists()


def test_another_hosts_temp_file_is_trusted_to_its_age_and_what_is_no_file_is_left(nb, tmp_path):
    """Some shared file systems keep each machine's locks to itself: another host's temp file without a lock
    seen here may be a conversion under way there, so it is removed only once untouched for an hour (and
    never while a lock on it is seen). A FIFO named like a temp file hung the clean-up at its open; a folder
    so named raised out of it."""
    import fcntl
    other_host = "0000" if nb.host_tag() != "0000" else "ffff"
    fresh, old, held = (tmp_path / f".x.u8.{other_host}{digit * 12}.tmp" for digit in "abc")
    for path in (fresh, old, held):
        path.write_bytes(bytes(100))
    hours_ago = time.time() - 2 * 3600
    for path in (old, held):
        os.utime(path, (hours_ago, hours_ago))
    os.mkfifo(tmp_path / f".y.u8.{nb.host_tag()}{'d' * 12}.tmp")
    (tmp_path / f".z.u8.{nb.host_tag()}{'e' * 12}.tmp").mkdir()
    with open(held, "r+b") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)   # a writer on a file system whose locks are seen everywhere
        assert nb.remove_stale_temps(tmp_path) == 100
    assert fresh.exists() and not old.exists() and held.exists()
    assert sorted(p.name[:2] for p in tmp_path.glob(".*.tmp")) == [".x", ".x", ".y", ".z"]


def test_a_killed_conversions_decoders_neither_keep_its_lock_nor_outlive_it(nb, tmp_path):
    """The image decoders are forked while the cache's temp file is open and locked: they held its lock, so
    after a SIGKILL of the conversion (the OOM killer) the file was never taken, and they waited for work
    forever. They close their copy, and die with their parent."""
    import subprocess
    import sys
    import psutil
    from PIL import Image
    for i in range(200):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / f"{i}.png")
    script = f"""import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
from nbloader import load_notebook
nb = load_notebook()
paths = sorted(nb.Path({str(tmp_path)!r}).glob("*.png"))
def convert_then_wait(f):
    for start, images, ok in nb.decode_images(paths, 8, workers=2, chunk=8):
        f.write(images.tobytes()); f.flush(); print("writing", flush=True); sys.stdin.read()
nb.atomic_write(nb.Path({str(tmp_path / "c" / "x.u8")!r}), convert_then_wait)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    decoders = []
    try:
        assert proc.stdout.readline() == "writing\n"
        decoders += psutil.Process(proc.pid).children()
        assert len(decoders) == 2
        proc.kill()
        proc.wait()
        gone, alive = psutil.wait_procs(decoders, timeout=60)
        assert alive == []
        assert nb.remove_stale_temps(tmp_path / "c") == 8 * 3 * 8 * 8 and list((tmp_path / "c").glob(".*")) == []
    finally:   # (orphans, if they outlived it)
        proc.kill()
        for decoder in decoders:
            with contextlib.suppress(psutil.NoSuchProcess):
                decoder.kill()


def test_a_write_under_way_is_never_removed_however_young_or_old(nb, tmp_path):
    """Another process's conversion under way holds its temp file's lock: kept, even untouched for hours (a
    slow source), and its rename succeeds after the clean-up ran (an age of 0 took it before)."""
    target, removed = tmp_path / "c" / "x.u8", []

    def clean_up_midway(f):
        f.write(bytes(1000))
        f.flush()
        hours_ago = time.time() - 2 * 3600
        for tmp in target.parent.glob(".x.u8.*.tmp"):
            os.utime(tmp, (hours_ago, hours_ago))
        removed.append(nb.remove_stale_temps(target.parent, older_than=0))
        f.write(bytes(24))

    nb.atomic_write(target, clean_up_midway)
    assert removed == [0] and target.stat().st_size == 1024 and list(target.parent.glob(".*.tmp")) == []


def test_a_temp_file_taken_by_a_clean_up_before_its_lock_is_given_up_for_another(nb, tmp_path, monkeypatch):
    """Between a temp file's creation and its lock a clean-up may lock and remove it: the writer then takes
    another name instead of writing into a removed file, whose rename would fail."""
    real_try_lock, taken = nb.try_lock, []

    def clean_up_first(fd):
        if not taken:   # the first temp file: a clean-up gets there before its writer
            taken.append(next((tmp_path / "c").glob(".x.u8.*.tmp")))
            taken.append(nb.remove_stale_temps(tmp_path / "c", older_than=0))   # (its own try_lock: the real one)
            assert not taken[0].exists()
        return real_try_lock(fd)

    (tmp_path / "c").mkdir()
    monkeypatch.setattr(nb, "try_lock", clean_up_first)
    nb.atomic_write(tmp_path / "c" / "x.u8", lambda f: f.write(b"complete"))
    assert taken[1] == 0 and (tmp_path / "c" / "x.u8").read_bytes() == b"complete"
    assert list((tmp_path / "c").glob(".*.tmp")) == []