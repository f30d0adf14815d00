"""Folders of images: faithful decoding, links, the held-out split, image size, limits, parallel build."""
import json
import os
import struct
import unicodedata
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def asymmetric(h=24, w=40, seed=0):
    """A uint8 RGB image where any flip, rotation or channel swap shows."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    image[:4, :8] = (255, 0, 0)
    return image


def write_png(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def png_declaring(path, width, height):
    """A few-hundred-byte PNG whose header declares width x height 1-bit pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b""))
    return path


# --- decoding as a viewer shows the image -------------------------------------------------------

@pytest.mark.parametrize("array, suffix, expected", [
    (np.array([[0, 32768, 65535]], np.uint16), ".png", [0, 128, 255]),                  # I;16
    (np.array([[0, 32768, 65535]], ">u2"), ".tif", [0, 128, 255]),                       # I;16B
    (np.array([[0, 32768, 65535]], np.int32), ".tif", [0, 128, 255]),                    # I, 16-bit values
    (np.array([[-100, 0, 900]], np.int32), ".tif", [0, 26, 255]),                       # I, beyond 16 bits
    (np.array([[0, 1000, 4095]], np.uint16), ".png", [0, 4, 16]),                       # 12 bits in I;16: dark
    (np.array([[0.0, 0.5, 1.0]], np.float32), ".tif", [0, 128, 255]),                   # F in 0..1
    (np.array([[0.25, 0.5]], np.float32), ".tif", [64, 128]),                           # F in 0..1, as it is
    (np.array([[-2.0, 0.0, 6.0]], np.float32), ".tif", [0, 64, 255]),                   # F, any range
    (np.array([[-2.0, np.nan, 6.0, np.inf, -np.inf]], np.float32), ".tif", [0, 0, 255, 255, 0]),  # F, no data
])
def test_high_bit_depth_is_scaled_not_clipped(nb, tmp_path, array, suffix, expected):
    path = tmp_path / f"x{suffix}"
    Image.fromarray(array).save(path)
    assert Image.open(path).mode in ("I;16", "I;16B", "I", "F")
    rgb = nb.load_image(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (1, len(expected), 3)
    np.testing.assert_array_equal(rgb[0, :, 0], expected)
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])  # grey stays grey


def test_alpha_is_composited_on_white(nb, tmp_path):
    assert nb.ALPHA_BACKGROUND == (255, 255, 255)
    rgba = np.array([[[200, 0, 0, 0], [200, 0, 0, 255], [0, 0, 200, 128]]], np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    got = nb.load_image(tmp_path / "rgba.png")[0].astype(int)
    np.testing.assert_array_equal(got[0], [255, 255, 255])        # transparent: the background
    np.testing.assert_array_equal(got[1], [200, 0, 0])            # opaque: unchanged
    assert np.abs(got[2] - [127, 127, 227]).max() <= 1           # half: the mix
    Image.fromarray(np.array([[[0, 0], [0, 255]]], np.uint8), "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(nb.load_image(tmp_path / "la.png")[0], [[255] * 3, [0] * 3])
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png", transparency=0)
    np.testing.assert_array_equal(nb.load_image(tmp_path / "p.png")[0], [[255] * 3, [40, 50, 60]])
    palette.save(tmp_path / "opaque.gif")
    np.testing.assert_array_equal(nb.load_image(tmp_path / "opaque.gif")[0], [[10, 20, 30], [40, 50, 60]])
    for array in (np.array([[0, 30000, 65535]], np.uint16), np.array([[0, 117, 255]], np.uint8)):
        Image.fromarray(array).save(tmp_path / "grey.png", transparency=0)   # its 0 transparent: white in both
        np.testing.assert_array_equal(nb.load_image(tmp_path / "grey.png")[0, :, 0], [255, 117, 255])


def test_cmyk_greyscale_and_bilevel_become_rgb(nb, tmp_path):
    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(tmp_path / "c.tif")
    np.testing.assert_array_equal(nb.load_image(tmp_path / "c.tif")[0, 0], [255, 0, 0])
    Image.fromarray(np.array([[0, 77, 255]], np.uint8)).save(tmp_path / "l.png")
    np.testing.assert_array_equal(nb.load_image(tmp_path / "l.png")[0], [[0] * 3, [77] * 3, [255] * 3])
    Image.fromarray(np.array([[True, False]])).save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode == "1"
    np.testing.assert_array_equal(nb.load_image(tmp_path / "b.png")[0], [[255] * 3, [0] * 3])


def test_exif_orientation_is_applied(nb, tmp_path):
    image = asymmetric()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(image).save(tmp_path / "phone.png", exif=exif)
    shown = nb.load_image(tmp_path / "phone.png")
    np.testing.assert_array_equal(shown, np.rot90(image, k=-1))
    square = nb.load_square(tmp_path / "phone.png", 24)  # short side is the stored height 24
    np.testing.assert_array_equal(square.transpose(1, 2, 0), np.rot90(image, k=-1)[8:32])


def test_short_side_resize_and_centre_crop(nb, tmp_path):
    image = asymmetric(40, 100)
    write_png(tmp_path / "wide.png", image)
    got = nb.load_square(tmp_path / "wide.png", 20)
    expected = np.asarray(Image.fromarray(image[:, 30:70]).resize((20, 20), Image.BICUBIC))
    assert got.shape == (3, 20, 20)
    error = np.abs(got.transpose(1, 2, 0).astype(int) - expected)
    assert error[:, 2:-2].max() <= 1  # near the crop's left and right edges the filter sees the pixels beyond


def test_jpeg_draft_keeps_quality(nb, tmp_path):
    """Decoding a JPEG at reduced scale, then the antialiased resize, against decoding it in full."""
    import skimage.data
    Image.fromarray(skimage.data.astronaut()).resize((1024, 768)).save(tmp_path / "a.jpg", quality=92)
    fast = nb.load_square(tmp_path / "a.jpg", 64).astype(float)
    with Image.open(tmp_path / "a.jpg") as im:
        full = np.asarray(im.convert("RGB").resize((64, 64), Image.BICUBIC, box=(128, 0, 896, 768)))
    error = np.abs(fast - full.transpose(2, 0, 1))
    assert error.mean() < 1.5 and np.percentile(error, 99) < 12, (error.mean(), np.percentile(error, 99))


# --- limits and bad files ------------------------------------------------------------------------

def test_decompression_bombs_and_broken_files_are_skipped_and_named(nb, tmp_path):
    """One warning counts and names them: PIL's own DecompressionBombWarning (from 89.5 megapixels) came
    beside it for the bomb between that and MAX_IMAGE_PIXELS's refusal."""
    folder = tmp_path / "f"
    for i in range(4):
        write_png(folder / "cat" / f"{i}.png", asymmetric(seed=i))
        write_png(folder / "dog" / f"{i}.png", asymmetric(seed=10 + i))
    png_declaring(folder / "cat" / "bomb240mp.png", 20000, 12000)   # past PIL's own error threshold
    png_declaring(folder / "dog" / "bomb150mp.png", 12500, 12000)   # past MAX_IMAGE_PIXELS only
    assert (folder / "cat" / "bomb240mp.png").stat().st_size < 1000
    (folder / "dog" / "notes.jpg").write_text("not an image")
    jpeg = folder / "dog" / "cut.jpg"
    Image.fromarray(asymmetric(64, 64)).save(jpeg)
    jpeg.write_bytes(jpeg.read_bytes()[:300])
    paths, labels, classes = nb.list_image_folder(folder)
    assert len(paths) == 12 and classes == ["cat", "dog"]
    with pytest.warns(UserWarning) as caught:
        chunks = list(nb.read_image_folder(paths, labels, size=16, workers=1))
    assert [w.category for w in caught] == [UserWarning]
    message = str(caught[0].message)
    assert "skipped 4 unreadable image(s) of 12" in message and "bomb240mp.png" in message
    assert "exceeds MAX_IMAGE_PIXELS=100,000,000" in message
    assert sum(len(x) for x, _ in chunks) == 8
    for bomb in (folder / "dog" / "bomb150mp.png", folder / "cat" / "bomb240mp.png"):   # the second: PIL's
        with pytest.raises(nb.UnusableImage, match="MAX_IMAGE_PIXELS=100,000,000"):     # own error, not its type
            nb.load_image(bomb)
    assert nb.MAX_IMAGE_PIXELS == 100_000_000


def test_a_folder_without_usable_images_is_an_error_naming_it(nb, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(nb.DataError, match="empty: no images"):
        nb.ImageFolder(tmp_path / "empty", "train", 16, cache_dir=tmp_path / "c")
    for i in range(3):
        (tmp_path / "bad" / "x").mkdir(parents=True, exist_ok=True)
        (tmp_path / "bad" / "x" / f"{i}.jpg").write_bytes(b"\xff\xd8 junk")
    with pytest.warns(UserWarning), pytest.raises(nb.DataError, match=r"bad: none of the \d image file"):
        nb.ImageFolder(tmp_path / "bad", "train", 16, val_fraction=0.5, cache_dir=tmp_path / "c")


# --- links ---------------------------------------------------------------------------------------

def test_links_that_loop_or_leave_are_skipped_and_counted(nb, tmp_path):
    folder = tmp_path / "f"
    for i in range(3):
        write_png(folder / "a" / f"{i}.png", asymmetric(seed=i))
        write_png(folder / "b" / "deep" / f"{i}.png", asymmetric(seed=5 + i))
    write_png(tmp_path / "outside" / "o.png", asymmetric(seed=9))
    os.symlink(folder, folder / "loop")                          # a class folder that is its parent
    os.symlink(folder / "a", folder / "b" / "again")             # a second route to class a
    os.symlink(tmp_path / "outside", folder / "c")               # a class folder outside
    os.symlink(tmp_path / "outside" / "o.png", folder / "a" / "o.png")
    os.symlink(folder / "a" / "0.png", folder / "b" / "0_link.png")
    with pytest.warns(UserWarning, match=r"skipped 5 link\(s\)"):
        paths, labels, classes = nb.list_image_folder(folder)
    assert classes == ["a", "b"] and labels == [0, 0, 0, 1, 1, 1]
    assert len(set(paths)) == 6 and all(p == p.resolve() for p in paths)


# --- the split -----------------------------------------------------------------------------------

def test_held_out_split_is_stratified_stable_and_exclusive(nb):
    paths = [f"c{c}/img_{i}.jpg" for c in range(4) for i in range(2000)]
    labels = [c for c in range(4) for _ in range(2000)]
    mask = nb.held_out(paths, labels, 0.1, ["c0", "c1", "c2", "c3"])
    per_class = mask.reshape(4, 2000).mean(axis=1)
    assert np.abs(per_class - 0.1).max() < 0.025, per_class            # binomial sd 0.0067
    assert (mask == nb.held_out(paths, labels, 0.1, None)).all()           # deterministic
    more = paths + [f"c{c}/new_{i}.jpg" for c in range(4) for i in range(50)]
    more_labels = labels + [c for c in range(4) for _ in range(50)]
    moved = (nb.held_out(more, more_labels, 0.1, None)[:len(paths)] != mask).reshape(4, 2000).sum(axis=1)
    assert (moved <= 50).all() and moved.sum() < 4 * 50   # at most as many old images move as were added
    tiny = nb.held_out(["a/1", "a/2", "b/1", "b/2", "b/3"], [0, 0, 1, 1, 1], 0.01, ["a", "b"])
    assert tiny.tolist().count(True) == 2 and tiny[:2].sum() == 1 and tiny[2:].sum() == 1


def test_every_class_holds_out_its_share_rounded(nb):
    sizes = [22, 31, 4, 2, 25, 15, 176]          # at 10%: 2.2, 3.1, 0.4, 0.2, 2.5, 1.5, 17.6 images
    paths = [f"c{c}/{i}.jpg" for c, n in enumerate(sizes) for i in range(n)]
    labels = [c for c, n in enumerate(sizes) for _ in range(n)]
    mask = nb.held_out(paths, labels, 0.1, None)
    per_class = np.bincount(labels, weights=mask).astype(int).tolist()
    assert per_class == [2, 3, 1, 1, 3, 2, 18]     # rounded to the nearest, halves up; at least 1
    assert [nb.held_out_count(n, 0.9) for n in (2, 10, 11)] == [1, 9, 10]   # at most n - 1
    hashes = np.array([nb.path_hash(p) for p in paths])
    for c in range(len(sizes)):   # the held-out images are those of lowest hash in their class
        members = np.flatnonzero(np.array(labels) == c)
        assert hashes[members][mask[members]].max() < hashes[members][~mask[members]].min()


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5])
def test_val_fraction_outside_0_1_is_refused(nb, fraction):
    with pytest.raises(ValueError, match=f"val_fraction.*{fraction}"):
        nb.held_out(["a/1", "a/2"], [0, 0], fraction, ["a"])


def test_a_class_with_one_image_is_an_error_naming_it(nb, tmp_path):
    for i in range(3):
        write_png(tmp_path / "f" / "many" / f"{i}.png", asymmetric(8, 8, seed=i))
    write_png(tmp_path / "f" / "single" / "only.png", asymmetric(8, 8))
    with pytest.raises(nb.DataError, match=r"only.png.*'single'"):
        nb.ImageFolder(tmp_path / "f", "train", 8, cache_dir=tmp_path / "c")


def test_folder_split_every_image_once_and_train_val_folders(nb, tmp_path):
    for c in ("x", "y"):
        for i in range(12):
            write_png(tmp_path / "f" / c / f"{i}.png", asymmetric(8, 8, seed=i))
    train = nb.folder_split(tmp_path / "f", "train", 0.25)
    val = nb.folder_split(tmp_path / "f", "val", 0.25)
    assert not set(train[0]) & set(val[0]) and len(train[0]) + len(val[0]) == 24
    assert set(val[1]) == {0, 1} and set(train[1]) == {0, 1}
    given = tmp_path / "given"
    for split, names in (("train", ("x", "y")), ("val", ("y",))):
        for c in names:
            for i in range(2):
                write_png(given / split / c / f"{i}.png", asymmetric(8, 8, seed=i))
    paths, labels, classes, how = nb.folder_split(given, "val", 0.1)
    assert classes == ["x", "y"] and labels == [1, 1] and "val/" in how
    write_png(given / "val" / "z" / "0.png", asymmetric(8, 8))
    with pytest.raises(nb.DataError, match="do not match"):
        nb.folder_split(given, "val", 0.1)


@pytest.mark.parametrize("held_out, beside", [("valid", ["test"]), ("validation", []), ("test", [])])
def test_a_kaggle_layout_is_its_own_split_not_three_classes(nb, tmp_path, held_out, beside):
    """train/ beside valid/ (Kaggle's and Roboflow's exports, often with test/), validation/ or test/ alone:
    only train/ + val/ was a split, so these trained with the split names as the classes ['test', 'train',
    'valid'], and the k-NN scored which split an image came from."""
    for split in ["train", held_out, *beside]:
        for c in ("cat", "dog"):
            for i in range(3):
                write_png(tmp_path / "set" / split / c / f"{i}.png", asymmetric(8, 8, seed=i))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        train, val = (nb.folder_split(tmp_path / "set", split, 0.1) for split in ("train", "val"))
    assert train[2] == val[2] == ["cat", "dog"] and train[1] == val[1] == [0, 0, 0, 1, 1, 1]
    assert {Path(p).parent.parent.name for p in val[0]} == {held_out} and f"own {held_out}/" in val[3]
    assert {Path(p).parent.parent.name for p in train[0]} == {"train"}
    assert [str(w.message) for w in said if "ignored ['test']" in str(w.message)] != [] or not beside
    assert nb.labelled_images(tmp_path / "set")[2] == ["cat", "dog"]


def test_a_lone_train_folder_is_a_split_of_its_classes_not_one_class(nb, tmp_path):
    """data_root holding train/cat and train/dog alone read as one class, 'train': k-NN scored 100% for
    any network, with no word. A class named train beside others stays a class."""
    for c in ("cat", "dog"):
        for i in range(4):
            write_png(tmp_path / "set" / "train" / c / f"{i}.png", asymmetric(8, 8, seed=i))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        train, val = (nb.folder_split(tmp_path / "set", split, 0.25) for split in ("train", "val"))
    assert train[2] == val[2] == ["cat", "dog"] and val[1] == [0, 1] and len(train[0]) == 6
    assert any("its only folder is train/" in str(w.message) for w in said)
    assert nb.labelled_images(tmp_path / "set")[2] == ["cat", "dog"]
    for c in ("car", "train"):   # photographs of trains and of cars
        for i in range(2):
            write_png(tmp_path / "vehicles" / c / f"{i}.png", asymmetric(8, 8, seed=i))
    assert nb.folder_split(tmp_path / "vehicles", "train", 0.5)[2] == ["car", "train"]


def test_a_linked_train_folder_or_images_beside_it_keep_the_folder_as_it_is(nb, tmp_path):
    """A train/ that is a link resolved outside the folder and raised a raw ValueError; images beside a lone
    train/ were dropped without a word (and, for a while, made the folder one class, 'train')."""
    for c in ("cat", "dog"):
        for i in range(3):
            write_png(tmp_path / "elsewhere" / c / f"{i}.png", asymmetric(8, 8, seed=i))
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "train").symlink_to(tmp_path / "elsewhere")
    assert nb.lone_train_folder(tmp_path / "linked") is None
    with pytest.warns(UserWarning, match="skipped 1 link"):
        assert nb.folder_split(tmp_path / "linked", "train", 0.25)[0] == []
    for c in ("cat", "dog"):
        for i in range(3):
            write_png(tmp_path / "beside" / "train" / c / f"{i}.png", asymmetric(8, 8, seed=i))
    write_png(tmp_path / "beside" / "loose.png", asymmetric(8, 8))   # a preview beside train/: named, ignored
    write_png(tmp_path / "beside" / "._loose.png", asymmetric(8, 8))   # macOS's fork of it: hidden, not counted
    with pytest.warns(UserWarning, match=r"its only folder is train/.*; ignored 1 image\(s\) beside train/, e.g. "
                                         r"\['.*loose.png'\]"):
        assert nb.folder_split(tmp_path / "beside", "train", 0.25)[2] == ["cat", "dog"]


def test_one_class_folder_is_read_as_unlabelled_images(nb, tmp_path):
    """One class folder: k-NN and the probe scored 100% whatever the network."""
    for i in range(6):
        write_png(tmp_path / "f" / "cat" / f"{i}.png", asymmetric(8, 8, seed=i))
    with pytest.warns(UserWarning, match=r"one class folder, cat/: read as unlabelled images"):
        train = nb.ImageFolder(tmp_path / "f", "train", 8, 0.2, cache_dir=tmp_path / "c")
    assert not train.has_labels and train.classes == [] and len(train) == 5
    with pytest.raises(nb.DataError, match="no labels to score k-NN accuracy against"):
        nb.knn_accuracy(None, train, train, nb.make_config("demo"), "cpu")


@pytest.mark.parametrize("size", [0, -8, "64", 16.0, True])
def test_an_image_size_that_is_no_pixel_count_is_refused_before_a_cache_is_written(nb, tmp_path, size):
    write_png(tmp_path / "f" / "a.png", asymmetric(8, 8))
    with pytest.raises(ValueError, match=rf"img_size={size!r}: must be a whole number of pixels >= 1"):
        nb.ImageFolder(tmp_path / "f", "train", size, cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_a_class_folder_named_in_another_encoding_is_shown_escaped(nb, tmp_path):
    """A folder b'caf\\xe9' (Latin-1, from an old zip or a Windows share): its name printed in the split's
    counts failed under UTF-8 output, and drawn as a figure title failed in every environment."""
    for c in (os.fsdecode(b"caf\xe9"), "dog"):
        for i in range(2):
            write_png(tmp_path / "f" / c / f"{i}.png", asymmetric(8, 8, seed=i))
    paths, labels, classes = nb.list_image_folder(tmp_path / "f")
    assert classes == ["caf\\xe9", "dog"] and labels == [0, 0, 1, 1]
    classes[0].encode("utf-8")   # printable: no lone surrogate left
    assert nb.folder_split(tmp_path / "f", "val", 0.5)[2] == classes


# --- the data set, its size and its cache ---------------------------------------------------------

def test_flat_folder_trains_without_labels(nb, tmp_path):
    for i in range(20):
        write_png(tmp_path / "flat" / f"{i:02d}.png", asymmetric(20, 30, seed=i))
    train = nb.ImageFolder(tmp_path / "flat", "train", 16, 0.2, cache_dir=tmp_path / "c")
    val = nb.ImageFolder(tmp_path / "flat", "val", 16, 0.2, cache_dir=tmp_path / "c")
    assert not train.has_labels and train.classes == [] and len(train) + len(val) == 20 and len(val) >= 1
    assert train.images.shape == (len(train), 3, 16, 16) and set(train.labels.tolist()) == {0}
    assert nb.class_count(train) == "no labels (a flat folder)"   # not "1 classes"
    assert nb.class_count(val) == "no labels (a flat folder)"
    assert nb.label_name(val, 0, nb.make_config("demo")) == ""   # figures title no 'class 0'


def test_every_suffix_pil_reads_is_read_and_others_are_counted(nb, tmp_path):
    assert {".jpg", ".png", ".tif", ".webp", ".ppm", ".tga", ".pcx", ".jp2", ".qoi"} <= nb.IMAGE_SUFFIXES
    (tmp_path / "f" / "c").mkdir(parents=True)
    for i, suffix in enumerate((".ppm", ".tga", ".pcx", ".png")):   # the first three were skipped before
        Image.fromarray(asymmetric(8, 8, seed=i)).save(tmp_path / "f" / "c" / f"{i}{suffix}")
    (tmp_path / "f" / "c" / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match=r"ignored 1 file\(s\) whose suffix is no image format PIL reads.*notes.txt"):
        paths, labels, classes = nb.list_image_folder(tmp_path / "f")
    assert sorted(p.suffix for p in paths) == [".pcx", ".png", ".ppm", ".tga"]
    images, ok, bad = nb.decode_chunk(paths, 8)
    assert ok.all() and not bad
    assert not {".eps", ".ps"} & nb.IMAGE_SUFFIXES   # PIL would hand these to Ghostscript, a program outside it


def test_hidden_files_and_folders_are_skipped_and_counted_once(nb, tmp_path):
    """A folder copied from macOS: ._0.png resource forks beside the images (a photo's suffix, no image),
    .DS_Store, a zip's __MACOSX/ tree and a hidden folder of thumbnails; then a Synology NAS's thumbnail
    folders, @eaDir/ in every folder (they were a class and two thirds of the images); none is an image or
    a class."""
    for c in ("cat", "dog"):
        for i in range(2):
            write_png(tmp_path / "f" / c / f"{i}.png", asymmetric(8, 8, seed=i))
            (tmp_path / "f" / c / f"._{i}.png").write_bytes(b"\x00\x05\x16\x07" + bytes(60))
            write_png(tmp_path / "f" / "__MACOSX" / c / f"{i}.png", asymmetric(8, 8, seed=i))
            write_png(tmp_path / "f" / c / "@eaDir" / f"{i}.png" / "SYNOPHOTO_THUMB_S.png", asymmetric(8, 8, seed=i))
    write_png(tmp_path / "f" / "@eaDir" / "cat" / "SYNOPHOTO_THUMB_S.png", asymmetric(8, 8))
    write_png(tmp_path / "f" / ".thumbnails" / "0.png", asymmetric(8, 8))
    (tmp_path / "f" / ".DS_Store").write_bytes(bytes(8))
    with pytest.warns(UserWarning, match=r"ignored 10 hidden or system file\(s\) and folder\(s\) \(names starting "
                                         r"with '\.', or one of \[.*'@eaDir', .*'__MACOSX'"):
        paths, labels, classes = nb.list_image_folder(tmp_path / "f")
    assert classes == ["cat", "dog"] and labels == [0, 0, 1, 1]
    assert [p.relative_to(tmp_path / "f").as_posix() for p in paths] == ["cat/0.png", "cat/1.png", "dog/0.png",
                                                                         "dog/1.png"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")                           # said once a process, not at every listing
        assert len(nb.list_image_folder(tmp_path / "f", by_class=False)[0]) == 4
    (tmp_path / "f" / "dog" / ".DS_Store").write_bytes(bytes(8))
    with pytest.warns(UserWarning, match="ignored 11 hidden"):   # news is said
        nb.list_image_folder(tmp_path / "f")


def test_img_size_sets_the_stored_size_and_the_cache_is_never_misread(nb, tmp_path, monkeypatch):
    for c in ("p", "q"):
        for i in range(3):
            write_png(tmp_path / "f" / c / f"{i}.png", asymmetric(30, 50, seed=i))
    small = nb.ImageFolder(tmp_path / "f", "train", 16, 0.4, cache_dir=tmp_path / "c")
    large = nb.ImageFolder(tmp_path / "f", "train", 24, 0.4, cache_dir=tmp_path / "c")
    assert small.images.shape[1:] == (3, 16, 16) and large.images.shape[1:] == (3, 24, 24)
    assert small.has_labels and small.classes == ["p", "q"]
    meta_path = next((tmp_path / "c").glob("train-*-24px.json"))
    assert json.loads(meta_path.read_text())["shape"] == [3, 24, 24]
    monkeypatch.setattr(nb, "decode_chunk", lambda *a: pytest.fail("the cache should have been used"))
    again = nb.ImageFolder(tmp_path / "f", "train", 24, 0.4, cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(again.images, large.images)
    monkeypatch.undo()
    meta = json.loads(meta_path.read_text())
    meta["shape"] = [3, 16, 16]  # a cache whose recorded shape is not the one asked for
    meta_path.write_text(json.dumps(meta))
    assert nb.open_cache(meta_path.with_suffix(""), meta["fingerprint"], image_shape=(3, 24, 24)) is None
    rebuilt = nb.ImageFolder(tmp_path / "f", "train", 24, 0.4, cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(rebuilt.images, large.images)


def test_parallel_decoding_equals_serial_in_order(nb, tmp_path):
    paths = [write_png(tmp_path / f"{i:02d}.png", asymmetric(20, 36, seed=i)) for i in range(21)]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG nothing")
    paths.insert(7, tmp_path / "broken.png")
    with pytest.warns(UserWarning, match="skipped 1"):
        serial = list(nb.decode_images(paths, 12, workers=1, chunk=4))
    with pytest.warns(UserWarning, match="skipped 1"):
        parallel = list(nb.decode_images(paths, 12, workers=2, chunk=4))
    assert [s for s, _, _ in parallel] == list(range(0, 22, 4))
    assert len(serial) == len(parallel)
    for (_, a, ok_a), (_, b, ok_b) in zip(serial, parallel):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ok_a, ok_b)
    assert np.concatenate([ok for _, _, ok in parallel]).tolist() == [i != 7 for i in range(22)]


def test_load_datasets_picks_the_folder_at_cfg_img_size(nb, tmp_path, capsys):
    for c in ("p", "q"):
        for i in range(10):
            write_png(tmp_path / "f" / c / f"{i}.png", asymmetric(30, 50, seed=i))
    cfg = nb.make_config("demo", data_root=str(tmp_path / "f"), img_size=32, global_crop_size=32,
                         local_crop_size=16, val_fraction=0.3, cache_dir=str(tmp_path / "c"))
    train, val = nb.load_datasets(cfg, verbose=False)
    assert isinstance(train, nb.ImageFolder) and train.images.shape[1:] == (3, 32, 32)
    assert f"train {len(train)} / val {len(val)} images" in capsys.readouterr().out
    (tmp_path / "i64").mkdir()
    (tmp_path / "i64" / "val_data").write_bytes(b"")
    with pytest.raises(nb.DataError, match="img_size=32"):
        nb.load_datasets(nb.make_config("demo", data_root=str(tmp_path / "i64"), img_size=32, global_crop_size=32,
                                        local_crop_size=16))


def test_load_datasets_prints_the_count_of_every_class(nb, tmp_path, capsys):
    for name, n in (("cat", 22), ("dog", 31), ("owl", 4)):
        for i in range(n):
            write_png(tmp_path / "f" / name / f"{i}.png", asymmetric(8, 8, seed=i))
    cfg = nb.make_config("demo", data_root=str(tmp_path / "f"), img_size=16, global_crop_size=16,
                         local_crop_size=8, cache_dir=str(tmp_path / "c"))
    train, val = nb.load_datasets(cfg, verbose=False)
    out = capsys.readouterr().out
    assert "train 51 / val 6 images (val_fraction=0.1 of each class" in out and "at least 1" in out
    assert "3 classes" in out and "held out per class (val/all): cat 2/22, dog 3/31, owl 1/4" in out
    assert np.bincount(val.labels).tolist() == [2, 3, 1]


def test_a_folder_of_images_is_not_searched_for_imagenet64_files(nb, tmp_path, monkeypatch):
    """Telling the two formats apart takes one walk by name; the ImageNet-64 search (which opens zips)
    runs only where such files are."""
    for c in ("p", "q"):
        for i in range(4):
            write_png(tmp_path / "f" / c / f"{i}.png", asymmetric(seed=i))
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "Imagenet64_val_npz.zip").write_bytes(b"")
    (tmp_path / "n" / "deep").mkdir(parents=True)
    (tmp_path / "n" / "deep" / "train_data_batch_3.npz").write_bytes(b"")
    assert not nb.holds_imagenet64(tmp_path / "f")
    assert nb.holds_imagenet64(tmp_path / "z") and nb.holds_imagenet64(tmp_path / "n")
    searched = []
    monkeypatch.setattr(nb, "find_sources", lambda *a, **k: searched.append(a) or [])
    cfg = nb.make_config("demo", data_root=str(tmp_path / "f"), val_fraction=0.5, cache_dir=str(tmp_path / "c"))
    train, val = nb.load_datasets(cfg, verbose=False)
    assert searched == [] and len(train) + len(val) == 8


# --- your own files --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_vit(nb):
    import torch
    torch.manual_seed(0)
    return nb.vit_tiny(patch_size=8, img_size=16).eval()


def test_export_features_of_a_folder_and_of_files(nb, tmp_path, small_vit):
    import torch
    for c in ("a", "b"):
        for i in range(3):
            write_png(tmp_path / "f" / c / f"{i}.png", asymmetric(20 + 4 * i, 30, seed=i + (c == "b") * 7))
    (tmp_path / "f" / "b" / "broken.jpg").write_bytes(b"\xff\xd8")
    with pytest.warns(UserWarning, match="broken.jpg"):
        out = nb.export_features(small_vit, tmp_path / "f", tmp_path / "out", workers=1)
    features = np.load(out / "features.npy")
    files = json.loads((out / "files.json").read_text())
    assert features.shape == (6, 192) and features.dtype == np.float32 and len(files) == 6
    assert np.load(out / "labels.npy").tolist() == [0, 0, 0, 1, 1, 1]
    assert json.loads((out / "classes.json").read_text()) == ["a", "b"]
    square = torch.from_numpy(np.array(nb.load_square(files[4], 16)[None]))  # native size 16 from pos_embed
    expected = nb.extract_features(small_vit, square)[0].numpy()
    assert np.abs(features[4] - expected).max() < 1e-4
    out2 = nb.export_features(small_vit, [files[4], files[0]], tmp_path / "out2", workers=1)
    np.testing.assert_allclose(np.load(out2 / "features.npy"), features[[4, 0]], atol=1e-5)
    assert not (out2 / "labels.npy").exists()


def test_an_unlabelled_export_leaves_no_labels_of_an_earlier_one_and_names_files_in_full(nb, tmp_path,
                                                                                          small_vit, monkeypatch):
    """Into a folder that held a labelled export, an unlabelled one left the old labels.npy and classes.json
    beside features they do not describe; files given by relative paths were recorded as given."""
    for c in ("a", "b"):
        for i in range(2):
            write_png(tmp_path / "f" / c / f"{i}.png", asymmetric(20, 30, seed=i + (c == "b") * 7))
    nb.export_features(small_vit, tmp_path / "f", tmp_path / "out", workers=1)
    assert (tmp_path / "out" / "labels.npy").exists()
    monkeypatch.chdir(tmp_path)
    out = nb.export_features(small_vit, ["f/a/0.png"], tmp_path / "out", workers=1)
    assert sorted(p.name for p in out.iterdir()) == ["features.npy", "files.json"]
    assert json.loads((out / "files.json").read_text()) == [str((tmp_path / "f" / "a" / "0.png").resolve())]


def test_attention_rows_for_files_of_any_size_and_aspect(nb, tmp_path, small_vit):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(asymmetric(40, 100)).save(tmp_path / "wide.png", exif=exif)  # shown 100 x 40
    write_png(tmp_path / "small.png", asymmetric(17, 23))
    rows = nb.attention_rows_for_files(small_vit, [tmp_path / "wide.png", tmp_path / "small.png"], 0.6,
                                       max_side=50)
    (shown, heats, masks), (small, _, _) = rows
    assert shown.shape == (48, 16, 3) and len(heats) == 1 + 3 and heats[0].shape == (48, 16)
    assert small.shape == (16, 16, 3)


def test_images_narrower_than_one_patch_are_skipped_and_named(nb, tmp_path, small_vit):
    """A 5x5 icon, and a banner whose short side shrinks below one patch with its long side, cannot be
    attended to: each is named in the warning, and the others are drawn."""
    write_png(tmp_path / "icon.png", asymmetric(5, 5))
    write_png(tmp_path / "banner.png", asymmetric(20, 400))   # 400 x 20, shrunk to 50 x 2
    write_png(tmp_path / "photo.png", asymmetric(40, 48))
    paths = [tmp_path / "icon.png", tmp_path / "banner.png", tmp_path / "photo.png"]
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable or too small image\(s\) of 3") as caught:
        rows = nb.attention_rows_for_files(small_vit, paths, 0.6, max_side=50)
    assert len(rows) == 1 and rows[0][0].shape == (40, 48, 3)
    message = str(caught[0].message)
    assert "icon.png', '5x5 px" in message and "banner.png', '50x2 px" in message and "8-px patch" in message
    with pytest.raises(nb.DataError, match="none of the 2 image file"):
        nb.attention_rows_for_files(small_vit, paths[:2], 0.6, max_side=50)


def test_one_file_is_a_list_of_one_and_a_missing_one_is_named(nb, tmp_path, small_vit):
    """A path given as a str was read a character at a time ('/', 't', ...); a Path was not iterable; a file
    that is not there was 'none of the 1 image file(s) could be read'; max_side=0 blamed the photograph."""
    photo = write_png(tmp_path / "photo.png", asymmetric(40, 48))
    for given in (str(photo), photo):
        assert len(nb.attention_rows_for_files(small_vit, given, 0.6, max_side=50)) == 1
    assert len(nb.attention_rows_for_files(small_vit, [photo], 0.6, max_side=np.int64(50))) == 1
    with pytest.raises(ValueError, match="max_side=0: must be a whole number of pixels >= 1"):
        nb.attention_rows_for_files(small_vit, [photo], 0.6, max_side=0)
    with pytest.raises(nb.DataError, match="no_such_folder: no such file or folder"):
        nb.export_features(small_vit, tmp_path / "no_such_folder", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_features_of_a_folder_with_train_and_val_labels_by_class(nb, tmp_path, small_vit):
    """train/ and val/ are the splits of one data set, not two classes: both are exported, each image
    labelled by its class folder, in train/'s class order."""
    for split, classes in [("train", ["a", "b"]), ("val", ["b"])]:
        for name in classes:
            (tmp_path / "set" / split / name).mkdir(parents=True)
            for i in range(2):
                write_png(tmp_path / "set" / split / name / f"{i}.png", asymmetric(16, 16))
    out = nb.export_features(small_vit, tmp_path / "set", tmp_path / "out", workers=1)
    files = [Path(f).relative_to((tmp_path / "set").resolve()).parts[:2] for f in json.loads((out / "files.json").read_text())]
    assert files == [("train", "a")] * 2 + [("train", "b")] * 2 + [("val", "b")] * 2
    assert np.load(out / "labels.npy").tolist() == [0, 0, 1, 1, 1, 1]
    assert json.loads((out / "classes.json").read_text()) == ["a", "b"]


def test_export_features_leaves_files_it_did_not_write(nb, tmp_path, small_vit):
    """out_dir set to the photo folder itself, which holds the user's own labels.npy and classes.json: both
    were deleted as an earlier export's stale labels. Such a folder is refused and left as it was; an
    earlier export's own folder is written again."""
    for i in range(3):
        write_png(tmp_path / "mine" / f"{i}.png", asymmetric(16, 16, seed=i))
    np.save(tmp_path / "mine" / "labels.npy", [3, 1, 4])
    (tmp_path / "mine" / "classes.json").write_text('["ant", "bee"]')
    before = {p.name: p.read_bytes() for p in (tmp_path / "mine").iterdir()}
    with pytest.raises(nb.DataError, match=r"mine: holds \['labels.npy', 'classes.json'\], which no earlier export"):
        nb.export_features(small_vit, tmp_path / "mine", tmp_path / "mine", workers=1)
    assert {p.name: p.read_bytes() for p in (tmp_path / "mine").iterdir()} == before
    out = nb.export_features(small_vit, tmp_path / "mine", tmp_path / "out", workers=1)
    assert nb.export_features(small_vit, tmp_path / "mine", out, workers=1) == out   # its own: again


def test_own_images_of_a_folder_are_every_image_under_it(nb, tmp_path):
    """own_images draws and exports every image of a folder, beside subfolders or in them (the class-folder
    rule of data sets does not apply)."""
    (tmp_path / "mine" / "trip").mkdir(parents=True)
    for path in [tmp_path / "mine" / "top.png", tmp_path / "mine" / "trip" / "beach.png"]:
        write_png(path, asymmetric(16, 16))
    cfg = nb.make_config("demo", own_images=[str(tmp_path / "mine"), str(tmp_path / "mine" / "top.png")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # nothing "ignored beside the class folders"
        files = nb.own_image_files(cfg)
    assert [p.relative_to((tmp_path / "mine").resolve()).as_posix() for p in files[:2]] == ["top.png", "trip/beach.png"]
    assert files[2] == tmp_path / "mine" / "top.png" and len(files) == 3


def test_own_images_that_hold_no_image_are_named(nb, tmp_path):
    """A folder of own images with none PIL reads: the error names it (it said 'none of the 0 image file(s)
    could be read: []')."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no image here")
    cfg = nb.make_config("demo", own_images=[str(tmp_path / "empty")])
    with pytest.warns(UserWarning, match="notes.txt"), \
            pytest.raises(nb.DataError, match=rf"own_images=\['{tmp_path}/empty'\]: no image files there"):
        nb.own_image_files(cfg)


def test_a_file_name_that_is_not_utf8_is_read_and_split_by_its_bytes(nb, tmp_path):
    """Linux names are bytes: b'\\xff\\xfe.png' arrives as a str with surrogates, which str.encode refuses. The
    held-out split hashes the name's own bytes (os.fsencode), the same as before for every UTF-8 name, and an
    accented name the same whether it is stored composed or decomposed."""
    for c in ("p", "q"):
        for i in range(3):
            write_png(tmp_path / "f" / c / f"{i}.png", asymmetric(30, 50, seed=i))
    odd = tmp_path / "f" / "p" / os.fsdecode(b"\xff\xfe.png")
    write_png(odd, asymmetric(30, 50, seed=9))
    train = nb.ImageFolder(tmp_path / "f", "train", img_size=16, cache_dir=tmp_path / "c", workers=1)
    val = nb.ImageFolder(tmp_path / "f", "val", img_size=16, cache_dir=tmp_path / "c", workers=1)
    assert len(train) + len(val) == 7 and val.labels.tolist() == [0, 1]
    assert nb.path_hash(os.path.join("p", os.fsdecode(b"\xff\xfe.png"))) == \
        int.from_bytes(__import__("hashlib").sha1(b"p/\xff\xfe.png").digest()[:8], "big") / 2**64
    assert nb.path_hash("p/é.png") == int.from_bytes(__import__("hashlib").sha1("p/é.png".encode()).digest()[:8],
                                                        "big") / 2**64   # UTF-8 names keep their split
    decomposed = unicodedata.normalize("NFD", "p/é.png")      # "e" and a combining accent, as macOS may store it
    assert decomposed.encode() != "p/é.png".encode() and nb.path_hash(decomposed) == nb.path_hash("p/é.png")


def test_a_flat_folder_shows_as_many_images_as_a_labelled_one(nb):
    """The first look, the crops figure and the attention maps took the first image of each label: a flat
    folder (one label, 0) showed one image where 64, 3 and 4 were meant."""
    import types
    flat = types.SimpleNamespace(labels=np.zeros(100, np.int64), has_labels=False)
    labelled = types.SimpleNamespace(labels=np.repeat(np.arange(10), 5)[np.random.default_rng(0).permutation(50)])
    for n_classes, per_class, spread in [(16, 4, False), (3, 1, True), (4, 1, False)]:
        shown = nb.class_examples(flat, n_classes, per_class, spread)
        assert len(np.unique(shown)) == len(shown) == n_classes * per_class and shown.max() == 99
        picked = nb.class_examples(labelled, n_classes, per_class, spread)
        classes = np.unique(labelled.labels)[::max(1, 10 // n_classes) if spread else 1][:n_classes]
        assert picked.tolist() == [i for c in classes for i in np.flatnonzero(labelled.labels == c)[:per_class]]
    few = types.SimpleNamespace(labels=np.zeros(10, np.int64), has_labels=False)
    assert nb.class_examples(few, 16, per_class=4).tolist() == list(range(10))   # fewer images than meant: all


# --- folders as users' disks hold them ------------------------------------------------------------

def two_class_split(root, splits, seed=0):
    for split in splits:
        for c in ("cat", "dog"):
            for i in range(3):
                write_png(root / split / c / f"{i}.png", asymmetric(8, 8, seed=seed + i))


@pytest.mark.parametrize("splits", [("Train", "Test"), ("TRAIN", "VALID"), ("Training", "Testing"),
                                    ("train", "Validation")])
def test_split_folders_in_any_case_are_the_split_not_two_classes(nb, tmp_path, splits):
    """Train/ beside Test/ (a brain-MRI set ships Training/ and Testing/) was two classes, 'Test' and 'Train':
    the k-NN scored which split an image came from; a lone Train/ was one class, read as unlabelled."""
    two_class_split(tmp_path / "set", splits)
    train, val = (nb.folder_split(tmp_path / "set", split, 0.1) for split in ("train", "val"))
    assert train[2] == val[2] == ["cat", "dog"] and f"own {splits[1]}/" in val[3]
    assert {Path(p).parts[-3] for p in train[0]} == {splits[0]} and {Path(p).parts[-3] for p in val[0]} == {splits[1]}
    assert nb.labelled_images(tmp_path / "set")[2] == ["cat", "dog"]
    two_class_split(tmp_path / "lone", splits[:1])
    with pytest.warns(UserWarning, match=f"its only folder is {splits[0]}/"):
        assert nb.folder_split(tmp_path / "lone", "train", 0.25)[2] == ["cat", "dog"]


@pytest.mark.parametrize("linked", ["val", "train"])
def test_a_linked_split_folder_is_refused_by_name_not_followed_nor_made_a_class(nb, tmp_path, linked):
    """A val/ link beside train/ took its images from wherever it pointed, though links are not followed;
    then (for a while) a linked train/ beside val/ made val/ the only class, 'val'."""
    two_class_split(tmp_path / "set", [s for s in ("train", "val") if s != linked])
    two_class_split(tmp_path / "elsewhere", [linked], seed=5)
    (tmp_path / "set" / linked).symlink_to(tmp_path / "elsewhere" / linked)
    for split in ("train", "val"):
        with pytest.raises(nb.DataError, match=rf"its split folder\(s\) \['{linked}'\] are links, and links are not"):
            nb.folder_split(tmp_path / "set", split, 0.34)
    two_class_split(tmp_path / "kaggle", ["train", "valid"])
    (tmp_path / "kaggle" / "val").symlink_to(tmp_path / "kaggle" / "valid")   # a convenience link beside it
    assert "own valid/" in nb.folder_split(tmp_path / "kaggle", "val", 0.1)[3]


def test_class_folders_named_like_splits_beside_other_classes_stay_classes(nb, tmp_path, monkeypatch):
    """Split names in any case made Test/ and Train/ (images inside, beside dog/) a split: the classes went,
    and dog/ was ignored."""
    for c in ("Test", "dog", "Train"):
        for i in range(3):
            write_png(tmp_path / "set" / c / f"{i}.png", asymmetric(8, 8, seed=i))
    assert nb.folder_split(tmp_path / "set", "train", 0.34)[2] == ["Test", "Train", "dog"]
    for split in ("train", "val"):   # an unlabelled split beside a folder of notes: still the split
        for i in range(4):
            write_png(tmp_path / "flat" / split / f"{i}.png", asymmetric(8, 8, seed=i))
    (tmp_path / "flat" / "notes").mkdir()
    (tmp_path / "flat" / "notes" / "README.txt").write_text("how the images were taken")
    assert [len(nb.folder_split(tmp_path / "flat", split, 0.25)[0]) for split in ("train", "val")] == [4, 4]
    two_class_split(tmp_path / "raw", ["train"])   # ImageNet's raw layout: a flat val/ (its labels in a file)
    for i in range(2):
        write_png(tmp_path / "raw" / "val" / f"{i}.png", asymmetric(8, 8, seed=i))
    (tmp_path / "raw" / "devkit").mkdir()
    (tmp_path / "raw" / "devkit" / "labels.txt").write_text("0\n1\n")
    with pytest.raises(nb.DataError, match="do not match"):
        nb.folder_split(tmp_path / "raw", "val", 0.1)
    (tmp_path / "flat" / "locked").mkdir()   # a folder that cannot be listed: passed over, not a crash
    iterdir = Path.iterdir
    def refuse_locked(folder):
        if folder.name == "locked":
            raise PermissionError(13, "Permission denied", str(folder))
        return iterdir(folder)
    monkeypatch.setattr(Path, "iterdir", refuse_locked)
    assert [len(nb.folder_split(tmp_path / "flat", split, 0.25)[0]) for split in ("train", "val")] == [4, 4]
    monkeypatch.undo()
    two_class_split(tmp_path / "split", ["Train", "Test"])
    write_png(tmp_path / "split" / "notes" / "0.png", asymmetric(8, 8))   # a folder beside real split folders
    with pytest.warns(UserWarning, match=r"its own split, Train/ and Test/ \(held out\); ignored \['notes'\]"):
        assert nb.folder_split(tmp_path / "split", "val", 0.1)[2] == ["cat", "dog"]


def test_hidden_files_and_links_beside_a_flat_split_do_not_make_its_folders_classes(nb, tmp_path):
    """macOS leaves a ._0.png of metadata beside each photo it copies, and links are not followed: a folder of
    only these beside flat Train/ and Test/ made the two folders classes, and the k-NN scored which split an
    image came from (the same files made no class in the listing)."""
    for split in ("Train", "Test"):
        for i in range(4):
            write_png(tmp_path / "set" / split / f"{i}.png", asymmetric(8, 8, seed=i))
    (tmp_path / "set" / "extras").mkdir()
    (tmp_path / "set" / "extras" / "._0.png").write_bytes(b"\0\5\26\7" + bytes(60))   # AppleDouble's header
    (tmp_path / "set" / "extras" / "1.png").symlink_to(tmp_path / "set" / "Train" / "0.png")
    with pytest.warns(UserWarning, match=r"its own split, Train/ and Test/ \(held out\); ignored \['extras'\]"):
        train = nb.folder_split(tmp_path / "set", "train", 0.1)
    val = nb.folder_split(tmp_path / "set", "val", 0.1)
    assert train[2] == val[2] == [] and [len(train[0]), len(val[0])] == [4, 4]
    assert {Path(p).parent.name for p in val[0]} == {"Test"}
    assert nb.loose_images(tmp_path / "set" / "extras") == []
    for i in (2, 3):   # real images there: the three folders are classes
        write_png(tmp_path / "set" / "extras" / f"{i}.png", asymmetric(8, 8, seed=i))
    assert nb.loose_images(tmp_path / "set" / "extras") == [tmp_path / "set" / "extras" / f"{i}.png" for i in (2, 3)]
    assert nb.folder_split(tmp_path / "set", "train", 0.1)[2] == ["Test", "Train", "extras"]


def test_class_names_in_either_unicode_form_are_one_class(nb, tmp_path):
    """macOS stores 'café' decomposed (NFD), Linux as typed (NFC): train/café and val/café did 'not match',
    in an error that showed the same two names; without a split they were two classes of one name."""
    composed, decomposed = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    for split, name in (("train", composed), ("val", decomposed)):
        for c in (name, "dog"):
            for i in range(2):
                write_png(tmp_path / "set" / split / c / f"{i}.png", asymmetric(8, 8, seed=i))
    paths, labels, classes, _ = nb.folder_split(tmp_path / "set", "val", 0.1)
    assert classes == [composed, "dog"] and labels == [0, 0, 1, 1]
    for i, name in enumerate((composed, decomposed)):
        write_png(tmp_path / "flat" / name / f"{i}.png", asymmetric(8, 8, seed=i))
    paths, labels, classes = nb.list_image_folder(tmp_path / "flat")
    assert classes == [composed] and labels == [0, 0]


def test_folders_that_give_nothing_are_named_not_dropped_silently(nb, tmp_path, monkeypatch):
    """An empty class folder, a folder that cannot be listed (os.walk skips it without a word), a pipe named
    like an image (called a link) and an MPEG video (PIL reads its size, not its pixels: an 'unreadable image')."""
    for c in ("a", "c", "locked"):
        write_png(tmp_path / "f" / c / "0.png", asymmetric(8, 8))
    (tmp_path / "f" / "b").mkdir()
    os.mkfifo(tmp_path / "f" / "a" / "pipe.jpg")
    (tmp_path / "f" / "c" / "clip.mpg").write_bytes(b"\0\0\1\xb3\x14\0\xf0\x13" + bytes(64))
    scandir = os.scandir
    def refuse_locked(path="."):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)
    monkeypatch.setattr(os, "scandir", refuse_locked)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        paths, labels, classes = nb.list_image_folder(tmp_path / "f")
    said = "\n".join(str(w.message) for w in said)
    assert classes == ["a", "c"] and [Path(p).name for p in paths] == ["0.png", "0.png"]
    assert "could not list 1 folder(s), their images left out" in said and "locked: Permission denied" in said
    assert "ignored 2 folder(s) without an image, e.g. ['b', 'locked']" in said
    assert "skipped 1 file(s) that are no regular file" in said and "pipe.jpg" in said and "link" not in said
    assert "ignored 1 file(s) whose suffix is no image format" in said and "clip.mpg" in said


def test_the_first_readable_images_are_drawn_whatever_comes_before_them(nb, tmp_path, small_vit):
    """own_images whose first 8 files were unreadable stopped the cell ('none of the 8 image file(s) could be
    read') before any features were exported; a 1-pixel-wide image gave an OpenCV assertion as its reason;
    a pipe named in own_images was opened, and the cell waited for it forever."""
    broken = [tmp_path / f"a{i}.jpg" for i in range(2)] + [tmp_path / "pipe.jpg"]
    for path in broken[:2]:
        path.write_bytes(b"")
    os.mkfifo(broken[2])
    write_png(tmp_path / "line.png", np.zeros((1, 600, 3), np.uint8))
    good = [write_png(tmp_path / f"b{i}.png", asymmetric(40, 48, seed=i)) for i in range(3)]
    with pytest.warns(UserWarning, match=r"skipped 4 unreadable or too small image\(s\) of 6") as caught:
        rows = nb.attention_rows_for_files(small_vit, [tmp_path / "line.png"] + broken + good, 0.6, 50, limit=2)
    assert len(rows) == 2 and "line.png', '50x1 px" in str(caught[0].message)
    with pytest.raises(nb.DataError, match=r"pipe.jpg', 'UnusableImage: no regular file"):
        nb.attention_rows_for_files(small_vit, broken[2:], 0.6, 50)
    with pytest.raises(ValueError, match=r"img_size=16.0: must be a whole number of pixels >= 1"):
        nb.export_features(small_vit, good, tmp_path / "out", img_size=16.0)
    with pytest.raises(ValueError, match=r"limit=0: must be None \(every file\) or a whole number >= 1"):
        nb.attention_rows_for_files(small_vit, good, 0.6, 50, limit=0)
    assert len(nb.attention_rows_for_files(small_vit, good, 0.6, 50, limit=np.int64(1))) == 1


def test_unreadable_files_are_counted_on_every_run_and_an_unreadable_split_says_why(nb, tmp_path):
    """Files skipped when the cache was built went unmentioned on every later run; a held-out split whose one
    image was broken stopped with 'none of the 1 image file(s) could be read', and not why that one."""
    names = [f"p{i}.png" for i in range(10)]
    lowest = min(names, key=nb.path_hash)   # the one image held out at val_fraction 0.1
    for i, name in enumerate(names):
        if name == lowest or i == 0 and name != lowest:
            (tmp_path / "flat").mkdir(exist_ok=True)
            (tmp_path / "flat" / name).write_bytes(b"\xff\xd8\xff")
        else:
            write_png(tmp_path / "flat" / name, asymmetric(16, 16, seed=i))
    build = lambda split: nb.ImageFolder(tmp_path / "flat", split, np.int64(16), 0.1, cache_dir=tmp_path / "c",
                                         workers=1)   # a numpy size too: it went into the cache's JSON key
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\) of 9"):
        assert len(build("train")) == 8
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        assert len(build("train")) == 8
    assert [str(w.message) for w in said if "1 of 9 image file(s) unreadable and left out" in str(w.message)]
    with pytest.raises(nb.DataError, match=r"none of the 1 image file\(s\) of split 'val' could be read "
                                           r"\(val_fraction=0.1 .*chosen before they are decoded\): fix or remove"):
        build("val")


def test_high_depth_images_keep_their_levels_whatever_their_range(nb):
    """Converted in float32, a 32-bit image near 2**31 lost its levels (float32 steps by 256 there) and a float
    image spanning -3e38..3e38 went black (its range overflowed to inf); 16-bit images are exact in float32."""
    ramp = 2_147_483_000 + np.arange(0, 648, 8, dtype=np.int64).reshape(1, -1)
    levels = np.asarray(nb._scaled_to_uint8(Image.fromarray(ramp.astype(np.int32))))[0]
    expected = np.floor((ramp[0] - ramp.min()) / (ramp.max() - ramp.min()) * 255 + 0.5)
    assert np.array_equal(levels, expected.astype(np.uint8))
    wide = np.array([[-3e38, 1e38, 3e38, 0.0]], np.float32)
    assert np.asarray(nb._scaled_to_uint8(Image.fromarray(wide)))[0].tolist() == [0, 170, 255, 128]
    sixteen = np.array([[0, 257, 32768, 65535]], np.uint16)
    assert np.asarray(nb._scaled_to_uint8(Image.fromarray(sixteen)))[0].tolist() == [0, 1, 128, 255]
