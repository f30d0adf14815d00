"""Multi-crop augmentation: shapes and order, determinism, crop boxes, probabilities, and every operation
against torchvision's functional op on the same image."""
import dataclasses
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import RandomResizedCrop

BICUBIC = TF.InterpolationMode.BICUBIC
TV_JITTER = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def uint8_images(n, seed=0):
    """Smooth-ish random images (noise upsampled), so crops have structure at every scale."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 16, 16, generator=g)
    fine = torch.nn.functional.interpolate(coarse, size=(64, 64), mode="bilinear", align_corners=False)
    noisy = fine + 0.15 * torch.rand(n, 3, 64, 64, generator=g)
    return (noisy.clamp(0, 1) * 255).round().to(torch.uint8)


def float_images(n, seed=0):
    return uint8_images(n, seed).float() / 255


@pytest.fixture(scope="module")
def cfg(nb):
    return nb.make_config("demo", n_local_crops=2)


def no_random_ops(cfg, **changes):
    """Full-image crops and every probability 0, then `changes`."""
    base = dict(global_crop_scale=(1.0, 1.0), local_crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0,
                jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=0.0)
    return dataclasses.replace(cfg, **{**base, **changes})


# ---------------------------------------------------------------- the augmentation object

def test_views_shapes_dtypes_and_order(nb, cfg):
    views = nb.MultiCropAugmentation(cfg, device="cpu")(uint8_images(5))
    assert len(views) == 2 + cfg.n_local_crops
    sizes = [cfg.global_crop_size] * 2 + [cfg.local_crop_size] * cfg.n_local_crops
    for view, size in zip(views, sizes):
        assert view.shape == (5, 3, size, size) and view.dtype == torch.float32
        shown = nb.denormalize(view)
        assert torch.isfinite(view).all() and (shown > 0).any() and (shown < 1).any()
    imagenet = nb.make_config("imagenet64")
    assert len(nb.MultiCropAugmentation(imagenet, device="cpu")(uint8_images(2))) == 12


def test_rejects_float_images(nb, cfg):
    with pytest.raises(ValueError):
        nb.MultiCropAugmentation(cfg, device="cpu")(float_images(2))


def test_same_seed_same_views_and_state_dict_round_trip(nb, cfg):
    images = uint8_images(4)
    a, b = nb.MultiCropAugmentation(cfg, device="cpu"), nb.MultiCropAugmentation(cfg, device="cpu")
    assert all(torch.equal(x, y) for x, y in zip(a(images), b(images)))
    state = a.state_dict()
    first = a(images)
    second = a(images)
    assert not torch.equal(first[0], second[0])  # the stream moves on
    c = nb.MultiCropAugmentation(cfg, device="cpu", seed=123)
    c.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(first, c(images)))
    other = nb.MultiCropAugmentation(cfg, device="cpu", seed=cfg.seed + 1)(images)
    assert not torch.equal(other[0], nb.MultiCropAugmentation(cfg, device="cpu")(images)[0])


# ---------------------------------------------------------------- crop boxes

@pytest.mark.parametrize("scale", [(0.4, 1.0), (0.05, 0.4)])
def test_crop_boxes_inside_image_and_in_range(nb, cfg, scale):
    g = torch.Generator().manual_seed(0)
    uniforms = torch.rand(20_000, nb.CROP_TRIES, 4, generator=g)
    top, left, h, w = nb.sample_crop_boxes(uniforms, 64, 64, scale, cfg.crop_ratio).unbind(-1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 64).all() and (left + w <= 64).all()
    assert (h >= 1).all() and (w >= 1).all()
    # w and h are sqrt(area * r) and sqrt(area / r) rounded to whole pixels: bounds up to +-0.5 pixel
    area, (r0, r1) = 64 * 64, cfg.crop_ratio
    assert ((w - 0.5) * (h - 0.5) <= scale[1] * area + 1e-3).all()
    assert ((w + 0.5) * (h + 0.5) >= scale[0] * area - 1e-3).all()
    assert ((w - 0.5) / (h + 0.5) <= r1 + 1e-6).all() and ((w + 0.5) / (h - 0.5) >= r0 - 1e-6).all()
    fraction = (h * w).float() / area
    assert fraction.min() < scale[0] + 0.03 and fraction.max() > min(scale[1], 0.9) - 0.03  # the range is covered
    assert abs(torch.log(w.float() / h.float()).mean().item()) < 0.02  # log-uniform ratio: symmetric


def ks_distance(a, b):
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    cdf = lambda x: np.searchsorted(x, grid, side="right") / len(x)
    return np.abs(cdf(a) - cdf(b)).max()


def test_crop_boxes_follow_torchvision_distribution(nb, cfg):
    g = torch.Generator().manual_seed(1)
    uniforms = torch.rand(20_000, nb.CROP_TRIES, 4, generator=g)
    ours = nb.sample_crop_boxes(uniforms, 64, 64, cfg.global_crop_scale, cfg.crop_ratio).numpy()
    torch.manual_seed(1)
    image = torch.zeros(3, 64, 64)
    theirs = np.array([RandomResizedCrop.get_params(image, list(cfg.global_crop_scale), list(cfg.crop_ratio))
                       for _ in range(3000)])
    for column in range(4):  # top, left, h, w: same distributions (Kolmogorov-Smirnov distance)
        assert ks_distance(ours[:, column], theirs[:, column]) < 0.05


def test_crop_boxes_fall_back_to_centre_crop(nb):
    g = torch.Generator().manual_seed(0)
    boxes = nb.sample_crop_boxes(torch.rand(50, nb.CROP_TRIES, 4, generator=g), 64, 64, (1.0, 1.0), (2.0, 3.0))
    # no try can fit
    expected = RandomResizedCrop.get_params(torch.zeros(3, 64, 64), [1.0, 1.0], [2.0, 3.0])
    assert expected == (16, 0, 32, 64)
    assert (boxes == torch.tensor(expected)).all()


# ---------------------------------------------------------------- operations against torchvision

def test_crop_matrices_equal_direct_resize_matrices(nb):
    g = torch.Generator().manual_seed(0)
    uniforms = torch.rand(300, nb.CROP_TRIES, 4, generator=g)
    top, left, h, w = nb.sample_crop_boxes(uniforms, 64, 64, (0.05, 1.0), (0.5, 2.0)).unbind(-1)
    flip = torch.rand(300, generator=g) < 0.5
    for antialias in (True, False):
        table = nb.resize_table(64, 32, antialias, torch.device("cpu"))
        direct = nb.resize_matrix(left, w, 64, 32, flip, antialias=antialias)
        assert (nb.crop_matrices(left, w, flip, table) - direct).abs().max() < 1e-6  # sums in another order


@pytest.mark.parametrize("antialias", [True, False])
def test_resized_crop_and_flip_match_torchvision(nb, antialias):
    images = float_images(6)
    boxes = torch.tensor([[0, 0, 64, 64], [10, 3, 20, 15], [0, 40, 64, 24], [50, 50, 14, 14], [5, 0, 40, 64],
                          [30, 20, 7, 9]])
    flip = torch.tensor([False, True, False, True, True, False])
    for size in (64, 32):
        ours = nb.resized_crop(images, boxes[None], size, flip[None], antialias)[0]
        for image, box, flipped, crop in zip(images, boxes, flip, ours):
            reference = TF.resized_crop(image, *box.tolist(), [size, size], BICUBIC, antialias=antialias)
            reference = TF.hflip(reference) if flipped else reference
            assert (crop - reference).abs().max() < 1e-5


@pytest.mark.parametrize("op_index", range(4))
def test_jitter_ops_match_torchvision(nb, op_index):
    images = float_images(8)
    low, high = [(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.5, 0.5)][op_index]
    factors = torch.linspace(low, high, 8)
    ours = (nb.adjust_brightness, nb.adjust_contrast, nb.adjust_saturation, nb.adjust_hue)[op_index](images, factors)
    reference = torch.stack([TV_JITTER[op_index](x, f.item()) for x, f in zip(images, factors)])
    assert (ours - reference).abs().max() < 1e-5


def test_grayscale_and_solarize_match_torchvision(nb):
    images = float_images(4)
    assert (nb.grayscale(images) - TF.rgb_to_grayscale(images)).abs().max() < 1e-6
    assert torch.equal(nb.solarize(images, 128 / 255), TF.solarize(images, 128 / 255))


def test_color_jitter_random_order_matches_torchvision_sequence(nb):
    images = float_images(12, seed=3)
    g = torch.Generator().manual_seed(0)
    ranges = [(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]  # brightness, contrast, saturation, hue
    factors = torch.stack([torch.empty(12).uniform_(low, high, generator=g) for low, high in ranges], 1)
    order = torch.rand(12, 4, generator=g).argsort(-1)
    order[0] = -1                                     # no jitter for the first image
    ours = nb.color_jitter(images, factors, order)
    assert torch.equal(ours[0], images[0])
    for image, f, steps, result in zip(images[1:], factors[1:], order[1:], ours[1:]):
        for op_index in steps.tolist():
            image = TV_JITTER[op_index](image, f[op_index].item())
        assert (result - image).abs().max() < 1e-5
    assert len({tuple(o) for o in order[1:].tolist()}) > 3  # several different orders were exercised


def test_gaussian_blur_matches_torchvision(nb, cfg):
    images = float_images(5)
    size = nb.blur_kernel_size(cfg)
    low, high = nb.blur_sigma_range(cfg)
    assert size == 5 and math.isclose(low, 0.1 * 64 / 224) and math.isclose(high, 2.0 * 64 / 224)
    sigma = torch.linspace(low, high, 5)
    ours = nb.gaussian_blur(images, sigma, size)
    reference = torch.stack([TF.gaussian_blur(x, [size, size], [s.item()] * 2) for x, s in zip(images, sigma)])
    assert (ours - reference).abs().max() < 1e-5
    assert (ours[-1] - images[-1]).abs().max() > 0.01  # it does blur


def test_whole_pipeline_matches_torchvision_chain(nb, cfg):
    """Sampled parameters applied by augment_crops == torchvision ops applied image by image, in DINO's order."""
    cfg = dataclasses.replace(cfg, solarize_p=0.5, grayscale_p=0.3)
    g = torch.Generator().manual_seed(0)
    images = float_images(6, seed=1)
    size, blur_size = cfg.local_crop_size, nb.blur_kernel_size(cfg)
    uniforms = torch.rand(4, 6, nb.UNIFORMS_PER_CROP, generator=g)
    half = nb.per_crop([0.5] * 4, "cpu")
    params = nb.crop_params(cfg, uniforms, (64, 64), cfg.local_crop_scale, half, half)
    ours = nb.augment_crops(images, params, size, cfg, blur_size)
    errors = []
    for v in range(4):
        for b in range(6):
            p = {name: value[v, b] for name, value in params.items()}
            x = TF.resized_crop(images[b], *p["boxes"].tolist(), [size, size], BICUBIC, antialias=True).clamp(0, 1)
            x = TF.hflip(x) if p["flip"] else x
            for op_index in p["jitter_order"].tolist():
                x = TV_JITTER[op_index](x, p["jitter_factors"][op_index].item()) if op_index >= 0 else x
            x = TF.rgb_to_grayscale(x, num_output_channels=3) if p["grayscale"] else x
            x = TF.gaussian_blur(x, [blur_size] * 2, [p["blur_sigma"].item()] * 2) if p["blur"] else x
            x = TF.solarize(x, cfg.solarize_threshold / 255) if p["solarize"] else x
            x = TF.normalize(x, list(nb.IMAGENET_MEAN), list(nb.IMAGENET_STD))
            errors.append((ours[v, b] - x).abs().flatten())
    errors = torch.cat(errors)
    # float rounding only, except where a pixel sits right at the solarization threshold
    assert errors.mean() < 1e-5 and (errors > 1e-4).float().mean() < 1e-3
    for name in ("flip", "grayscale", "blur", "solarize"):
        assert params[name].any() and not params[name].all(), name  # both branches were exercised


# ---------------------------------------------------------------- probabilities

def test_sampled_probabilities_and_ranges(nb):
    cfg = nb.make_config("imagenet64")
    g = torch.Generator().manual_seed(0)
    n = 20_000
    n_crops, _, scale, blur_p, solarize_p = nb.MultiCropAugmentation(cfg, device="cpu").crop_groups[0]  # global crops
    uniforms = torch.rand(n_crops, n, nb.UNIFORMS_PER_CROP, generator=g)
    params = nb.crop_params(cfg, uniforms, (64, 64), scale, blur_p, solarize_p)

    def rate_ok(mask, p):
        return abs(mask.float().mean().item() - p) <= 5 * math.sqrt(p * (1 - p) / mask.numel()) + 1e-9

    assert rate_ok(params["flip"], cfg.flip_p) and rate_ok(params["grayscale"], cfg.grayscale_p)
    jittered = params["jitter_order"][..., 0] >= 0
    assert rate_ok(jittered, cfg.jitter_p)
    assert (params["jitter_order"][jittered].sort(-1).values == torch.arange(4)).all()  # permutations
    assert (params["jitter_order"][~jittered] == -1).all()
    for view in range(2):
        assert rate_ok(params["blur"][view], cfg.blur_p[view])
        assert rate_ok(params["solarize"][view], (0.0, cfg.solarize_p)[view])
    f = params["jitter_factors"]
    assert nb.jitter_ranges(cfg) == [(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]
    for column, (low, high) in enumerate(nb.jitter_ranges(cfg)):
        assert f[..., column].min() >= low and f[..., column].max() <= high
        assert f[..., column].min() < low + 0.01 and f[..., column].max() > high - 0.01
    low, high = nb.blur_sigma_range(cfg)
    assert params["blur_sigma"].min() >= low and params["blur_sigma"].max() <= high


def test_probability_zero_leaves_crops_untouched(nb, cfg):
    images = uint8_images(4)
    views = nb.MultiCropAugmentation(no_random_ops(cfg), device="cpu")(images)
    expected = nb.normalize_uint8(images)
    assert (views[0] - expected).abs().max() < 1e-5 and (views[1] - expected).abs().max() < 1e-5
    resized = TF.resize(images.float() / 255, [32, 32], BICUBIC, antialias=True).clamp(0, 1)
    for local in views[2:]:
        assert (nb.denormalize(local) - resized).abs().max() < 1e-5


def test_probability_one_always_applies(nb, cfg):
    images = uint8_images(4)
    untouched = nb.MultiCropAugmentation(no_random_ops(cfg), device="cpu")(images)
    flipped = nb.MultiCropAugmentation(no_random_ops(cfg, flip_p=1.0), device="cpu")(images)
    assert all((f - TF.hflip(u)).abs().max() < 1e-5 for f, u in zip(flipped, untouched))
    gray = nb.MultiCropAugmentation(no_random_ops(cfg, grayscale_p=1.0), device="cpu")(images)
    for view in gray:
        rgb = nb.denormalize(view)
        assert (rgb - rgb[:, :1]).abs().max() < 1e-5
    jittered = nb.MultiCropAugmentation(no_random_ops(cfg, jitter_p=1.0), device="cpu")(images)
    assert all((j - u).abs().amax(dim=(1, 2, 3)).min() > 1e-3 for j, u in zip(jittered, untouched))
    strong_blur = no_random_ops(cfg, blur_p=(1.0, 0.0, 1.0), blur_sigma_224=(2.0, 2.0))  # sigma 0.57 px
    blurred = nb.MultiCropAugmentation(strong_blur, device="cpu")(images)
    assert (blurred[0] - untouched[0]).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    assert torch.equal(blurred[1], untouched[1])
    assert all((b - u).abs().amax(dim=(1, 2, 3)).min() > 1e-3 for b, u in zip(blurred[2:], untouched[2:]))


def test_solarization_only_on_second_global_crop(nb, cfg):
    images = uint8_images(4)
    untouched = nb.MultiCropAugmentation(no_random_ops(cfg), device="cpu")(images)
    solarized = nb.MultiCropAugmentation(no_random_ops(cfg, solarize_p=1.0), device="cpu")(images)
    expected = nb.normalize_uint8(TF.solarize(images, cfg.solarize_threshold))
    assert (solarized[1] - expected).abs().max() < 1e-5
    assert torch.equal(solarized[0], untouched[0])
    assert all(torch.equal(s, u) for s, u in zip(solarized[2:], untouched[2:]))


def test_a_blur_window_wider_than_a_crop_is_refused_by_name_where_the_config_is_made(nb):
    """The blur reflects a crop's borders, so its window's half must fit the smallest crop: a sigma too large
    for it is refused naming the setting (it stopped inside torch's padding), when the config is made or
    changed (it was refused only when the augmentation was built, after the data had been loaded)."""
    sigma = 20.0 * 64 / 224
    refusal = (rf"Config.blur_sigma_224=\(0.1, 20.0\): sigma up to {sigma:.3g} pixels at global_crop_size=64 needs a "
               rf"{2 * math.ceil(3 * sigma) + 1}-pixel window, too wide for a 16-pixel crop")
    with pytest.raises(nb.ConfigError, match=refusal):
        nb.make_config("demo", blur_sigma_224=(0.1, 20.0), local_crop_size=16)
    cfg = nb.make_config("demo", local_crop_size=16)
    with pytest.raises(nb.ConfigError, match=refusal):
        cfg.blur_sigma_224 = (0.1, 20.0)
    assert cfg.blur_sigma_224 == (0.1, 2.0)   # the refused change changed nothing
    with pytest.raises(nb.ConfigError, match="33-pixel window, too wide for a 16-pixel crop"):   # half 16: reflect
        nb.make_config("demo", blur_sigma_224=(0.1, 18.2), local_crop_size=16)   # padding needs it under 16
    widest = nb.make_config("demo", blur_sigma_224=(0.1, 17.0), local_crop_size=16)   # a 31-pixel window: fits
    crops = nb.MultiCropAugmentation(widest)(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    assert [c.shape[-1] for c in crops] == [64, 64] + [16] * widest.n_local_crops


def test_each_crop_group_gets_its_own_scale_and_probabilities(nb, cfg):
    """The two global crops draw their boxes from global_crop_scale, blur with p 1.0 and 0.1 and solarize
    the second with p 0.2; the local crops from local_crop_scale, blur p 0.5, no solarization. Recorded from
    the augmentation's own calls, the boxes read back from the numbers it drew (a swap of the two scales
    passed every other test of this file)."""
    augment = nb.MultiCropAugmentation(cfg, device="cpu", seed=0)
    calls, real = [], augment.make_crops

    def recording(images, uniforms, size, scale, blur_p, solarize_p, *rest):
        calls.append((uniforms, size, scale, blur_p, solarize_p))
        return real(images, uniforms, size, scale, blur_p, solarize_p, *rest)
    augment.make_crops = recording
    crops = augment(uint8_images(200))
    assert len(crops) == 2 + cfg.n_local_crops and [size for _, size, *_ in calls] == \
        [cfg.global_crop_size, cfg.local_crop_size]
    expected = [(cfg.global_crop_scale, [1.0, 0.1], [0.0, 0.2]),
                (cfg.local_crop_scale, [0.5] * cfg.n_local_crops, [0.0] * cfg.n_local_crops)]
    for (uniforms, _, scale, blur_p, solarize_p), (want_scale, want_blur, want_solarize) in zip(calls, expected):
        assert tuple(scale) == tuple(want_scale) and solarize_p.flatten().tolist() == pytest.approx(want_solarize)
        assert blur_p.flatten().tolist() == pytest.approx(want_blur)
        boxes = nb.crop_params(cfg, uniforms, (64, 64), scale, blur_p, solarize_p)["boxes"]
        area = (boxes[..., 2] * boxes[..., 3]).float() / 64 ** 2
        # rounding w and h to whole pixels moves the area by at most about (w + h) / 2 pixels
        assert want_scale[0] - 0.03 <= area.min() and area.max() <= want_scale[1] + 0.03
        assert area.max() - area.min() > 0.8 * (want_scale[1] - want_scale[0])   # the range is used
