"""DINOv2 release files: the architecture read from the file, the DINOv2 forward (interpolation rules,
registers, LayerScale) against an independent re-implementation from the formulas, and refusals.
The files are written here in the release layout (key names, shapes, float32) with small random values;
width 192 and depth 2 keep them small, the 37x37 position table and patch 14 are the release's."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

D, DEPTH, HEADS, PATCH, GRID = 192, 2, 3, 14, 37


def release_state_dict(registers, seed=0):
    """A dinov2_vit*14[_reg4]_pretrain.pth layout (block_chunks=0), random values."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, std=0.02: torch.randn(*shape, generator=g) * std  # noqa: E731
    sd = {"cls_token": rand(1, 1, D), "pos_embed": rand(1, 1 + GRID * GRID, D, std=0.5),
          "mask_token": torch.zeros(1, D),
          "patch_embed.proj.weight": rand(D, 3, PATCH, PATCH), "patch_embed.proj.bias": rand(D)}
    if registers:
        sd["register_tokens"] = rand(1, registers, D, std=0.5)
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": 1 + rand(D, std=0.1), b + "norm1.bias": rand(D),
                   b + "attn.qkv.weight": rand(3 * D, D, std=0.1), b + "attn.qkv.bias": rand(3 * D),
                   b + "attn.proj.weight": rand(D, D), b + "attn.proj.bias": rand(D),
                   b + "ls1.gamma": rand(D, std=0.5),
                   b + "norm2.weight": 1 + rand(D, std=0.1), b + "norm2.bias": rand(D),
                   b + "mlp.fc1.weight": rand(4 * D, D), b + "mlp.fc1.bias": rand(4 * D),
                   b + "mlp.fc2.weight": rand(D, 4 * D), b + "mlp.fc2.bias": rand(D),
                   b + "ls2.gamma": rand(D, std=0.5)})
    sd.update({"norm.weight": 1 + rand(D, std=0.1), "norm.bias": rand(D)})
    assert all(v.dtype == torch.float32 for v in sd.values())
    return sd


def dinov2_interpolate(pos_embed, height, width, offset, antialias):
    """DINOv2's interpolate_pos_encoding, written from its arguments."""
    n = pos_embed.shape[1] - 1
    m = math.isqrt(n)
    h0, w0 = height // PATCH, width // PATCH
    if h0 * w0 == n and height == width:
        return pos_embed
    kwargs = dict(scale_factor=((h0 + offset) / m, (w0 + offset) / m)) if offset else dict(size=(h0, w0))
    grid = F.interpolate(pos_embed[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2), mode="bicubic",
                         antialias=antialias, **kwargs)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)], dim=1)


def dinov2_forward(sd, images, offset, antialias):
    """Normed tokens (CLS, registers, patches) and last-block attention, from the formulas."""
    B, _, H, W = images.shape
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([sd["cls_token"].expand(B, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    x = x + dinov2_interpolate(sd["pos_embed"], H, W, offset, antialias)
    if "register_tokens" in sd:
        x = torch.cat([x[:, :1], sd["register_tokens"].expand(B, -1, -1), x[:, 1:]], dim=1)
    ln = lambda t, name: F.layer_norm(t, (D,), sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)  # noqa: E731
    lin = lambda t, name: F.linear(t, sd[name + ".weight"], sd[name + ".bias"])  # noqa: E731
    T = x.shape[1]
    for i in range(DEPTH):
        b = f"blocks.{i}."
        q, k, v = lin(ln(x, b + "norm1"), b + "attn.qkv").reshape(B, T, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (D // HEADS) ** -0.5).softmax(-1)
        x = x + sd[b + "ls1.gamma"] * lin((attn @ v).transpose(1, 2).reshape(B, T, D), b + "attn.proj")
        hidden = F.gelu(lin(ln(x, b + "norm2"), b + "mlp.fc1"))
        x = x + sd[b + "ls2.gamma"] * lin(hidden, b + "mlp.fc2")
    return ln(x, "norm"), attn


@pytest.fixture(scope="module")
def release_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dinov2")
    files = {}
    for registers, name in [(0, "dinov2_vits14_pretrain.pth"), (4, "dinov2_vits14_reg4_pretrain.pth")]:
        files[registers] = (folder / name, release_state_dict(registers, seed=registers))
        torch.save(files[registers][1], files[registers][0])
    return files


@pytest.mark.parametrize("registers", [0, 4])
def test_architecture_read_from_the_file(nb, release_files, registers):
    path, _ = release_files[registers]
    model = nb.backbone_from_checkpoint(path)
    assert (model.patch_size, model.embed_dim, len(model.blocks), model.num_heads) == (PATCH, D, DEPTH, HEADS)
    assert model.pos_embed.shape == (1, 1 + GRID * GRID, D) and not model.training
    assert model.num_register_tokens == registers
    assert all(isinstance(block.ls1, nb.LayerScale) and isinstance(block.ls2, nb.LayerScale)
               for block in model.blocks)
    rule = (0.0, True) if registers else (0.1, False)   # the hub's interpolate_offset / interpolate_antialias
    assert (model.interpolate_offset, model.interpolate_antialias) == rule
    assert "mask_token" not in model.state_dict()


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("size", [(GRID * PATCH, GRID * PATCH), (112, 112), (98, 140)])
def test_features_equal_the_dinov2_formulas(nb, release_files, registers, size):
    path, sd = release_files[registers]
    model = nb.backbone_from_checkpoint(path)
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    rule = (0.0, True) if registers else (0.1, False)
    with torch.no_grad():
        expected, expected_attn = dinov2_forward(sd, images, *rule)
        tokens = model.get_intermediate_layers(images)[0]
        attention = model.get_last_selfattention(images)
        cls = model(images)
    n_patches = (size[0] // PATCH) * (size[1] // PATCH)
    assert tokens.shape == (2, 1 + registers + n_patches, D)
    assert attention.shape == (2, HEADS, 1 + registers + n_patches, 1 + registers + n_patches)
    assert torch.allclose(tokens, expected, atol=1e-4)                 # CLS, registers, patches in order
    assert torch.allclose(cls, expected[:, 0], atol=1e-4)
    assert torch.allclose(attention, expected_attn, atol=1e-5)


@pytest.mark.parametrize("rule", [(0.1, False), (0.0, True)])
def test_interpolation_matches_dinov2_arguments(nb, rule):
    pos = torch.randn(1, 1 + GRID * GRID, 8)
    for grid_h, grid_w in [(16, 16), (8, 10), (40, 37), (5, 5)]:
        ours = nb.resize_pos_embed(pos, grid_h, grid_w, *rule)
        assert torch.equal(ours, dinov2_interpolate(pos, grid_h * PATCH, grid_w * PATCH, *rule))
    other = nb.resize_pos_embed(pos, 16, 16, *[(0.0, True), (0.1, False)][rule == (0.0, True)])
    assert (other - nb.resize_pos_embed(pos, 16, 16, *rule)).abs().max() > 1e-3   # the rule matters


def test_registers_sit_after_cls_without_position(nb, release_files):
    path, sd = release_files[4]
    model = nb.backbone_from_checkpoint(path)
    images = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        tokens = model.prepare_tokens(images)
    assert torch.equal(tokens[0, 1:5], sd["register_tokens"][0])          # no position added
    assert torch.allclose(tokens[0, 0], sd["cls_token"][0, 0] + sd["pos_embed"][0, 0])


def test_layerscale_scales_each_branch(nb):
    torch.manual_seed(0)
    block = nb.Block(12, 3, layerscale_init=1.0).eval()
    x = torch.randn(2, 5, 12)
    with torch.no_grad():
        block.ls1.gamma.zero_()
        block.ls2.gamma.zero_()
        assert torch.equal(block(x), x)                       # both branches scaled to nothing
        block.ls2.gamma.fill_(2.0)
        attn_free = x                                          # attention branch still off
        expected = attn_free + 2.0 * block.mlp(block.norm2(attn_free))
        assert torch.allclose(block(x), expected, atol=1e-6)
    assert not hasattr(nb.Block(12, 3).ls1, "gamma")           # off by default: DINO's block


def test_attention_maps_skip_the_registers(nb, release_files):
    model = nb.backbone_from_checkpoint(release_files[4][0])
    images = np.random.default_rng(0).integers(0, 256, (1, 3, 56, 84), dtype=np.uint8)
    maps = nb.cls_attention_maps(model, images)
    assert maps.shape == (1, HEADS, 4, 6) and model.num_register_tokens == 4
    with torch.no_grad():
        attention = model.eval().get_last_selfattention(nb.normalize_uint8(torch.from_numpy(images)))
    assert torch.allclose(maps.flatten(2), attention[:, :, 0, 1 + 4:], atol=1e-6)   # CLS row, patches only
    assert not torch.allclose(maps.flatten(2), attention[:, :, 0, 1:1 + 24], atol=1e-3)   # not the registers'


def test_patch_pca_skips_the_registers(nb, release_files):
    """The PCA colours one pixel per patch: its tokens are the patches', neither CLS nor the registers."""
    model = nb.backbone_from_checkpoint(release_files[4][0])
    images = [np.random.default_rng(i).integers(0, 256, (56, 84, 3), dtype=np.uint8) for i in range(2)]
    colours = nb.patch_pca_images(model, images)
    assert [c.shape for c in colours] == [(4, 6, 3)] * 2
    with torch.no_grad():
        tokens = torch.cat([model.get_intermediate_layers(nb.normalize_uint8(
            torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]))[0][0, 1 + 4:] for image in images])
    centred = tokens - tokens.mean(dim=0)
    first = (centred @ torch.linalg.svd(centred, full_matrices=False).Vh[0]).reshape(2, 4, 6)
    ours = torch.from_numpy(np.stack([c[..., 0] for c in colours]))
    inside = (ours > 0) & (ours < 1)   # the quantile clipping leaves the ends flat
    correlation = np.corrcoef(ours[inside].numpy(), first[inside].numpy())[0, 1]
    assert abs(correlation) > 0.999, correlation   # the first component, up to its sign and scale


def test_refusals_say_what_was_found(nb, tmp_path):
    sd = release_state_dict(0)
    swiglu = {k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3"): v for k, v in sd.items()}
    torch.save(swiglu, tmp_path / "dinov2_vitg14_pretrain.pth")
    with pytest.raises(ValueError, match=r"dinov2_vitg14_pretrain\.pth.*SwiGLU.*w12"):
        nb.backbone_from_checkpoint(tmp_path / "dinov2_vitg14_pretrain.pth")
    torch.save({k: v for k, v in sd.items() if k != "pos_embed"}, tmp_path / "no_pos.pth")
    with pytest.raises(ValueError, match=r"no_pos\.pth.*pos_embed"):
        nb.backbone_from_checkpoint(tmp_path / "no_pos.pth")
    torch.save({**sd, "pos_embed": torch.zeros(1, 1 + 37 * 36, D)}, tmp_path / "odd_grid.pth")
    with pytest.raises(ValueError, match=r"odd_grid\.pth.*pos_embed \(1, 1333, 192\)"):
        nb.backbone_from_checkpoint(tmp_path / "odd_grid.pth")
    torch.save({**sd, "blocks.1.attn.proj.weight": torch.zeros(D, D + 1)}, tmp_path / "bad_shape.pth")
    with pytest.raises(ValueError, match=r"(?s)bad_shape\.pth.*blocks\.1\.attn\.proj\.weight"):
        nb.backbone_from_checkpoint(tmp_path / "bad_shape.pth")
