"""Attention maps: CLS attention per patch, mass-threshold masks, upsampling, overlays, contours,
figures, and the optional official checkpoint."""
import numpy as np
import pytest
import torch
import torch.nn as nn


def small_vit(nb, **kw):
    torch.manual_seed(0)
    return nb.VisionTransformer(**{**dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3), **kw})


class BrightPatchAttention(nn.Module):
    """A stand-in whose CLS attention follows the brightness of each patch: orientation is checkable."""
    def __init__(self, patch=8, heads=2):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, 1, kernel_size=patch, stride=patch)
        self.heads = heads

    def get_last_selfattention(self, x):
        p = self.patch_embed.proj.kernel_size[0]
        brightness = nn.functional.avg_pool2d(x.mean(1, keepdim=True), p).flatten(1)  # (B, N) row-major
        scores = torch.cat([torch.zeros(len(x), 1), 10 * brightness], dim=1).softmax(-1)
        n = scores.shape[1]
        return scores[:, None, None, :].expand(len(x), self.heads, n, n)


# ---------------------------------------------------------------- masks

def reference_threshold_mask(attn, t):
    """visualize_attention.py: ascending sort, cumulative sum, keep where cumsum > 1 - t."""
    val, idx = torch.sort(attn)
    val = val / val.sum()
    keep = torch.cumsum(val, 0) > (1 - t)
    return keep[torch.argsort(idx)]


@pytest.mark.parametrize("fraction", [0.1, 0.6, 0.9, 0.999])
def test_mask_holds_fraction_and_is_minimal(nb, fraction):
    gen = torch.Generator().manual_seed(0)
    maps = torch.rand(5, 3, 6, 9, generator=gen) ** 4  # peaky, like attention
    masks = nb.attention_mass_mask(maps, fraction)
    assert masks.dtype == torch.bool and masks.shape == maps.shape
    for m, mask in zip(maps.reshape(-1, 6, 9), masks.reshape(-1, 6, 9)):
        share = m / m.sum()
        kept = share[mask]
        assert kept.sum() >= fraction - 1e-6
        assert kept.sum() - kept.min() < fraction  # without its weakest patch it falls short
        # the kept patches are the strongest ones
        assert (~mask).any() and kept.min() >= share[~mask].max()
        assert torch.equal(mask.flatten(), reference_threshold_mask(m.flatten(), fraction))


def test_mask_on_hand_made_map(nb):
    toy = torch.tensor([[0.05, 0.30], [0.15, 0.50]])
    assert nb.attention_mass_mask(toy, 0.5).tolist() == [[False, False], [False, True]]
    assert nb.attention_mass_mask(toy, 0.6).tolist() == [[False, True], [False, True]]
    assert nb.attention_mass_mask(toy * 7, 0.9).tolist() == [[False, True], [True, True]]  # scale-free
    assert nb.attention_mass_mask(toy, 1.0).all()


# ---------------------------------------------------------------- maps

@pytest.mark.parametrize("height,width", [(32, 32), (40, 72), (45, 70), (72, 24)])
def test_cls_attention_maps_any_size(nb, height, width):
    model = small_vit(nb).train()
    images = np.random.default_rng(0).integers(0, 256, (2, 3, height, width), dtype=np.uint8)
    maps = nb.cls_attention_maps(model, images)
    grid = (height // 8, width // 8)
    assert maps.shape == (2, 3, *grid) and maps.dtype == torch.float32
    assert model.training  # mode restored
    cropped = torch.from_numpy(images[:, :, :grid[0] * 8, :grid[1] * 8].copy())
    with torch.no_grad():
        attention = model.eval().get_last_selfattention(nb.normalize_uint8(cropped))
    assert torch.allclose(maps.flatten(2), attention[:, :, 0, 1:], atol=1e-6)
    assert torch.all(maps >= 0) and torch.all(maps.flatten(2).sum(-1) <= 1 + 1e-5)


def test_cls_attention_maps_orientation_on_non_square_image(nb):
    images = np.zeros((1, 3, 24, 48), dtype=np.uint8)     # 3 x 6 patches
    images[:, :, 8:16, 32:40] = 255                      # patch row 1, column 4
    maps = nb.cls_attention_maps(BrightPatchAttention(), images)
    assert maps.shape == (1, 2, 3, 6)
    assert np.unravel_index(maps[0, 0].argmax().item(), (3, 6)) == (1, 4)


# ---------------------------------------------------------------- pictures

def test_upsample_nearest_and_smooth(nb):
    grid = np.arange(6, dtype=np.float32).reshape(2, 3)
    nearest = nb.upsample_map(grid, (16, 24))
    assert nearest.shape == (16, 24) and np.array_equal(nearest[::8, ::8], grid)
    assert np.array_equal(nearest, np.kron(grid, np.ones((8, 8), np.float32)))
    smooth = nb.upsample_map(grid, (16, 24), smooth=True)
    assert smooth.shape == (16, 24) and smooth.min() >= 0 and smooth.max() <= 5
    assert len(np.unique(smooth)) > 6


def test_overlay_is_uint8_rgb_same_size(nb):
    import cv2
    image = np.full((30, 50, 3), 100, dtype=np.uint8)
    heat = np.random.default_rng(0).random((30, 50))
    overlay = nb.heatmap_overlay(image, heat)
    assert overlay.dtype == np.uint8 and overlay.shape == (30, 50, 3)
    # colour order: COLORMAP_AUTUMN maps 0 to red; with alpha=1 a zero map must be red in RGB
    red = nb.heatmap_overlay(image, np.zeros((30, 50)), alpha=1.0, colormap=cv2.COLORMAP_AUTUMN)
    assert np.all(red[..., 0] == 255) and np.all(red[..., 2] == 0)
    untouched = nb.heatmap_overlay(image, heat, alpha=0.0)
    assert np.array_equal(untouched, image)
    # attention maps are ~1/N a patch: the colours span the map's own range, whatever its scale and offset
    faint = nb.heatmap_overlay(image, 0.01 * heat + 0.002)
    assert np.abs(faint.astype(int) - overlay.astype(int)).max() <= 1


def test_mask_contours_close_at_the_border(nb):
    mask = np.zeros((10, 12), bool)
    mask[:4, :5] = True       # touches the top-left corner
    mask[6:9, 7:10] = True    # inside
    contours = nb.mask_contours(mask)
    assert len(contours) == 2
    for contour in contours:
        assert np.allclose(contour[0], contour[-1])  # closed
        assert contour[:, 0].min() >= -0.5 and contour[:, 1].min() >= -0.5
    corner = min(contours, key=lambda c: c[:, 0].min())
    assert corner[:, 0].max() == pytest.approx(3.5) and corner[:, 1].max() == pytest.approx(4.5)


def test_attention_row_and_figure(nb, tmp_path):
    model = small_vit(nb)
    image = np.random.default_rng(1).integers(0, 256, (45, 70, 3), dtype=np.uint8)
    for smooth in (False, True):
        shown, heats, masks = nb.attention_row(model, image, 0.6, smooth=smooth, scale=2)
        assert shown.shape == (80, 128, 3) and shown.dtype == np.uint8
        assert len(heats) == len(masks) == 1 + 3  # mean over heads, then each head
        assert all(h.shape == (80, 128) for h in heats) and all(m.dtype == bool for m in masks)
        if not smooth:   # nearest: each patch a block of patch * scale pixels
            step = model.patch_embed.proj.kernel_size[0] * 2
            np.testing.assert_allclose(heats[0], np.mean(heats[1:], axis=0), rtol=1e-5, atol=1e-7)
            for heat, mask in zip(heats, masks):   # the fewest patches that hold 60% of each map's mass
                patches, kept = heat[::step, ::step], mask[::step, ::step]
                share = patches[kept].sum() / patches.sum()
                assert share >= 0.6 and share - patches[kept].min() / patches.sum() < 0.6
    fig = nb.plot_attention_rows([nb.attention_row(model, image, 0.6)] * 2, "test")
    assert len(fig.axes) == 2 * 5
    cfg = nb.make_config("demo", figure_dir=str(tmp_path / "figures"))
    path = nb.save_figure(fig, cfg, "attention_test")
    assert path.is_file() and path.stat().st_size > 1000


PICTURE = np.random.default_rng(2).integers(0, 256, (40, 48, 3), dtype=np.uint8)


@pytest.mark.parametrize("picture,says", [
    (PICTURE / 255.0, r"expected uint8 RGB images \(B, 3, H, W\) in 0\.\.255, got float64 .*\(x \* 255\)\.round\(\)"),
    (PICTURE.astype(np.float32) / 255, "got float32"),   # plt.imread of a PNG: divided by 255 twice, no error
    (PICTURE[..., 0], r"expected an RGB picture \(H, W, 3\), got shape \(40, 48\): load files with load_image"),
    (np.dstack([PICTURE, PICTURE[..., :1]]), r"got shape \(40, 48, 4\)"),   # RGBA
    (PICTURE.transpose(2, 0, 1), r"got shape \(3, 40, 48\)"),
    (PICTURE[:5, :30], "images of 30x5 px: smaller than one 8-px patch")])
@pytest.mark.parametrize("entry", ["attention_row", "patch_token_norms", "patch_pca_images"])
def test_a_picture_that_is_not_uint8_rgb_is_refused_by_what_it_is(nb, picture, says, entry):
    model = small_vit(nb)
    run = {"attention_row": lambda: nb.attention_row(model, picture, 0.6),
           "patch_token_norms": lambda: nb.patch_token_norms(model, picture),
           "patch_pca_images": lambda: nb.patch_pca_images(model, [PICTURE, picture])}[entry]
    with pytest.raises(ValueError, match=says):
        run()


def test_batches_that_are_not_uint8_are_refused_by_the_batch_entry_points(nb):
    model, batch = small_vit(nb), torch.from_numpy(PICTURE.transpose(2, 0, 1).copy())[None]
    for run in (lambda x: nb.cls_attention_maps(model, x), lambda x: nb.extract_features(model, x)):
        assert torch.isfinite(run(batch)).all()
        with pytest.raises(ValueError, match=r"got float32 of shape \(1, 3, 40, 48\)"):
            run(batch.float() / 255)
    with pytest.raises(ValueError, match="images of 48x7 px: smaller than one 8-px patch"):
        nb.cls_attention_maps(model, batch[..., :7, :])


def test_a_channels_last_batch_is_refused_as_such_not_as_a_small_image(nb):
    """(1, 40, 56, 3) was cropped to patches first and refused as 'images of 3x56 px'."""
    batch = torch.from_numpy(np.ascontiguousarray(PICTURE[None]))
    with pytest.raises(ValueError, match=r"expected uint8 RGB images \(B, 3, H, W\).* shape \(1, 40, 48, 3\)"):
        nb.cls_attention_maps(small_vit(nb), batch)


def test_photo_for_attention_caps_the_long_side(nb):
    photo = nb.photo_for_attention("chelsea", 200)
    assert photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[2] == 3
    assert max(photo.shape[:2]) == 200 and photo.shape[1] > photo.shape[0]  # landscape kept
    assert nb.photo_for_attention("chelsea", 10_000).shape[:2] == (300, 451)


# ---------------------------------------------------------------- official checkpoint

def saved_vit_small_8(nb, path, seed):
    """Random weights of ViT-S/8 at 224 px, the layout of the release's dino_deitsmall8_pretrain.pth, saved
    at `path`; returns them."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in nb.vit_small(patch_size=8, img_size=224).state_dict().items()}
    torch.manual_seed(seed)
    state = {k: torch.randn(shape) * 0.02 for k, shape in shapes.items()}
    torch.save(state, path)
    return state


def test_missing_checkpoint_says_where_and_returns_none(nb, tmp_path, capsys, monkeypatch):
    # the release files are optional where the config's default names them; given by hand, one must exist
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))   # torch.hub's cache, empty
    with pytest.raises(nb.ConfigError, match="pretrained_path=.*nothing_here.pth': no such file"):
        nb.make_config("demo", pretrained_path=str(tmp_path / "nothing_here.pth"))
    cfg = nb.dataclasses.replace(nb.make_config("demo"), pretrained_path=str(tmp_path / "nothing_here.pth"))
    assert nb.load_pretrained(cfg, "pretrained_path") is None
    message = capsys.readouterr().out
    assert "nothing_here.pth" in message and nb.DINO_VITS8_URL in message


def test_the_release_file_in_torch_hubs_cache_is_read_and_said(nb, tmp_path, capsys, monkeypatch):
    """A user who ran torch.hub.load('facebookresearch/dino:main', 'dino_vits8') has the release file in torch.hub's
    cache: it was ignored, and the section said to download it. It is read from there, and the line says so."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "dino_deitsmall8_pretrain.pth"
    cached.parent.mkdir(parents=True)
    state = saved_vit_small_8(nb, cached, seed=1)
    cfg = nb.dataclasses.replace(nb.make_config("demo"), pretrained_path=str(tmp_path / "dino_deitsmall8_pretrain.pth"))
    model = nb.load_pretrained(cfg, "pretrained_path")
    assert torch.equal(model.pos_embed, state["pos_embed"])
    assert f"reading torch.hub's copy of it, {cached}" in capsys.readouterr().out
    cfg = nb.dataclasses.replace(cfg, pretrained_path=str(tmp_path / "other_name.pth"))   # another file: not that one
    assert nb.load_pretrained(cfg, "pretrained_path") is None


def test_present_checkpoint_loads_vit_small_8(nb, tmp_path):
    state = saved_vit_small_8(nb, tmp_path / "dino_deitsmall8_pretrain.pth", seed=0)
    cfg = nb.make_config("demo", pretrained_path=str(tmp_path / "dino_deitsmall8_pretrain.pth"))
    model = nb.load_pretrained(cfg, "pretrained_path")
    assert not model.training and model.patch_embed.proj.kernel_size == (8, 8)
    assert torch.equal(model.pos_embed, state["pos_embed"]) and model.pos_embed.shape[1] == 1 + 28 * 28
    maps = nb.cls_attention_maps(model, np.zeros((1, 3, 40, 56), np.uint8))
    assert maps.shape == (1, 6, 5, 7)


def test_a_release_file_of_another_model_is_refused_not_titled_as_the_field(nb, tmp_path):
    """A ViT-B/16 saved as dinov2_reg_path was loaded and its figures titled "DINOv2 ViT-S/14 + registers",
    its register-free token norms shown as the registers' case. It is refused by name, found against wanted."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in nb.vit_base(patch_size=16, img_size=224).state_dict().items()}
    torch.save({k: torch.randn(shape) * 0.02 for k, shape in shapes.items()}, tmp_path / "dino_vitbase16_pretrain.pth")
    cfg = nb.make_config("demo", dinov2_reg_path=str(tmp_path / "dino_vitbase16_pretrain.pth"))
    with pytest.raises(nb.ConfigError, match=r"dinov2_reg_path=.*dino_vitbase16_pretrain\.pth' holds a ViT of width "
                       r"768, patch 16 and 0 register\(s\); this field is for dinov2_vits14_reg4_pretrain\.pth, the "
                       r"DINOv2 ViT-S/14 \+ registers: width 384, patch 14, 4 register\(s\)"):
        nb.load_pretrained(cfg, "dinov2_reg_path")


def test_a_wide_photograph_keeps_its_labels_and_titles_apart(nb):
    """A 256x100 photograph gave rows 0.7 inches high: tight_layout gave up with a warning, the rotated model
    labels ran into each other and the figure's title into the column titles."""
    import warnings
    import matplotlib
    matplotlib.use("Agg")
    model = small_vit(nb)
    wide = np.random.default_rng(0).integers(0, 256, (100, 256, 3), dtype=np.uint8)
    rows = [nb.attention_row(model, wide, 0.6)] * 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # "Tight layout not applied" included
        fig = nb.plot_attention_rows(rows, "a long title of a model and the files it was shown: the first 1 of 5",
                                     panel_inches=1.8, labels=["DINO teacher", "start (dino_deitsmall8_pretrain.pth)"])
    renderer = fig.canvas.get_renderer()
    n_cols = 1 + len(rows[0][1])
    labels = [fig.axes[0].texts[0], fig.axes[n_cols].texts[0]]
    titles = [ax.title for ax in fig.axes[:n_cols]]
    boxes = lambda texts: [text.get_window_extent(renderer) for text in texts]
    assert not boxes(labels)[0].overlaps(boxes(labels)[1])
    assert not any(fig._suptitle.get_window_extent(renderer).overlaps(box) for box in boxes(titles))
    assert fig.get_size_inches()[1] >= 2 * 0.5 * 1.8   # two rows, each at least half a 1.8-inch panel high
    matplotlib.pyplot.close(fig)
