"""The Vision Transformer, the DINO head, the multi-crop wrapper and checkpoint loading."""
import argparse
import math

import pytest
import torch
import torch.nn as nn

# Small models keep the tests fast: 32-pixel images, patch 8 (a 4x4 native grid), 3 heads of 16 dims,
# 3 blocks. The named sizes (vit_tiny/small/base) are checked on the `meta` device: shapes, no memory.
IMG, PATCH, DIM = 32, 8, 48


def mini_vit(nb, patch_size=PATCH, img_size=IMG, embed_dim=DIM, depth=3, **kwargs):
    return nb.VisionTransformer(img_size, patch_size, embed_dim=embed_dim, depth=depth, num_heads=3, **kwargs)


@pytest.fixture
def tiny(nb):
    torch.manual_seed(0)
    return mini_vit(nb).eval()


def small_head(nb, in_dim=DIM, **kwargs):
    return nb.DINOHead(in_dim, out_dim=64, hidden_dim=32, bottleneck_dim=16, **kwargs)


def tiny_wrapper(nb, seed):
    torch.manual_seed(seed)
    return nb.MultiCropWrapper(mini_vit(nb), small_head(nb)).eval()


def reference_backbone_names(depth):
    names = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(depth):
        for layer in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            names += [f"blocks.{i}.{layer}.weight", f"blocks.{i}.{layer}.bias"]
    return names + ["norm.weight", "norm.bias"]


def to_old_weight_norm(state_dict):
    """The reference training code's head spelling (torch.nn.utils.weight_norm)."""
    renamed = {}
    for key, value in state_dict.items():
        key = key.replace("parametrizations.weight.original0", "weight_g")
        renamed[key.replace("parametrizations.weight.original1", "weight_v")] = value
    return renamed


def assert_same_weights(model, state_dict):
    loaded = model.state_dict()
    assert loaded.keys() == state_dict.keys()
    for key, value in state_dict.items():
        assert torch.equal(loaded[key], value), key


# ---------------------------------------------------------------- shapes and attention

@pytest.mark.parametrize("height,width", [(32, 32), (16, 16), (64, 64), (24, 40), (40, 16)])
def test_shapes_for_crop_sizes(tiny, height, width):
    images = torch.randn(3, 3, height, width)
    n_tokens = 1 + (height // PATCH) * (width // PATCH)
    with torch.no_grad():
        assert tiny(images).shape == (3, DIM)
        layers = tiny.get_intermediate_layers(images, n=2)
        attention = tiny.get_last_selfattention(images)
    assert len(layers) == 2 and all(layer.shape == (3, n_tokens, DIM) for layer in layers)
    assert attention.shape == (3, 3, n_tokens, n_tokens)


def test_attention_rows_sum_to_one_and_cls_output_is_last_layer(tiny):
    images = torch.randn(2, 3, 48, 32)
    with torch.no_grad():
        attention = tiny.get_last_selfattention(images)
        last = tiny.get_intermediate_layers(images, n=1)[0]
        cls = tiny(images)
    assert (attention >= 0).all()
    assert torch.allclose(attention.sum(-1), torch.ones(attention.shape[:-1]), atol=1e-5)
    assert torch.allclose(last[:, 0], cls, atol=1e-6)


def test_fused_attention_equals_explicit_softmax(nb):
    torch.manual_seed(1)
    attention = nb.Attention(dim=96, num_heads=4)
    tokens = torch.randn(3, 37, 96)
    fused, no_weights = attention(tokens)
    explicit, weights = attention(tokens, return_attention=True)
    assert no_weights is None and weights.shape == (3, 4, 37, 37)
    assert torch.allclose(fused, explicit, atol=1e-5)
    assert fused.abs().max() > 1e-3  # a real output, not zeros


# ---------------------------------------------------------------- position embeddings

def test_pos_embed_identity_at_native_grid(nb, tiny):
    pos = torch.randn(1, 1 + 4 * 4, 8)
    assert nb.resize_pos_embed(pos, 4, 4) is pos
    images = torch.randn(2, 3, IMG, IMG)
    tokens = torch.cat([tiny.cls_token.expand(2, -1, -1), tiny.patch_embed(images)], dim=1)
    assert torch.equal(tiny.prepare_tokens(images), tokens + tiny.pos_embed)


def test_pos_embed_resizes_height_and_width_separately(nb):
    n, dim = 8, 3
    rows = torch.arange(n, dtype=torch.float32).view(n, 1, 1).expand(n, n, dim)  # value = row index
    pos = torch.cat([torch.full((1, 1, dim), -7.0), rows.reshape(1, n * n, dim)], dim=1)
    resized = nb.resize_pos_embed(pos, 5, 11)
    assert resized.shape == (1, 1 + 5 * 11, dim)
    assert torch.equal(resized[:, 0], pos[:, 0])                    # CLS entry untouched
    grid = resized[0, 1:].reshape(5, 11, dim)
    assert torch.allclose(grid, grid[:, :1].expand(5, 11, dim), atol=1e-5)  # constant along width
    assert (grid[1:, 0, 0] > grid[:-1, 0, 0]).all()                 # increasing along height
    constant = nb.resize_pos_embed(torch.ones(1, 1 + n * n, dim), 3, 13)
    assert torch.allclose(constant, torch.ones_like(constant), atol=1e-5)


def reference_interpolation(pos_embed, grid_h, grid_w):
    """DINO's interpolate_pos_encoding arguments: scale factor (grid + 0.1) / sqrt(N), bicubic."""
    n_pos, dim = pos_embed.shape[1] - 1, pos_embed.shape[-1]
    n = int(math.sqrt(n_pos))
    scale_factor = ((grid_h + 0.1) / math.sqrt(n_pos), (grid_w + 0.1) / math.sqrt(n_pos))
    grid = nn.functional.interpolate(pos_embed[:, 1:].reshape(1, n, n, dim).permute(0, 3, 1, 2),
                                     scale_factor=scale_factor, mode="bicubic")
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


@pytest.mark.parametrize("grid", [(4, 4), (5, 11), (3, 13), (16, 16), (28, 28), (7, 9)])
def test_pos_embed_follows_the_reference_rule(nb, grid):
    pos = torch.randn(1, 1 + 8 * 8, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(nb.resize_pos_embed(pos, *grid), reference_interpolation(pos, *grid))
    by_size = nn.functional.interpolate(pos[:, 1:].reshape(1, 8, 8, 6).permute(0, 3, 1, 2), size=grid, mode="bicubic")
    assert (nb.resize_pos_embed(pos, *grid)[:, 1:] - by_size.permute(0, 2, 3, 1).reshape(1, -1, 6)).abs().max() > 1e-3


def test_model_uses_the_reference_rule_at_every_size(nb, tiny):
    for height, width in [(16, 16), (40, 24), (32, 36)]:       # (32, 36): native 4x4 grid, not square
        images = torch.randn(1, 3, height, width)
        tokens = torch.cat([tiny.cls_token, tiny.patch_embed(images)], dim=1)
        expected = tokens + reference_interpolation(tiny.pos_embed, height // PATCH, width // PATCH)
        assert torch.equal(tiny.prepare_tokens(images), expected)


# ---------------------------------------------------------------- stochastic depth

def test_drop_path_per_sample_and_identity_in_eval(nb):
    drop = nb.DropPath(0.25).train()
    out = drop(torch.ones(20_000, 5))
    assert (out.std(dim=1) == 0).all()                              # whole samples kept or dropped
    assert out[:, 0].unique().tolist() == pytest.approx([0.0, 1 / 0.75])
    assert abs((out[:, 0] == 0).float().mean().item() - 0.25) < 0.02
    assert torch.equal(drop.eval()(out), out)


def test_drop_path_rates_rise_linearly_and_are_off_in_eval(nb):
    torch.manual_seed(0)
    model = mini_vit(nb, depth=4, drop_path_rate=0.5)
    rates = [block.drop_path.drop_prob for block in model.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.5, 4).tolist())
    images = torch.randn(8, 3, IMG, IMG)
    with torch.no_grad():
        model.train()
        first, second = model(images), model(images)
        model.eval()
        eval_out = model(images)
        plain = mini_vit(nb, depth=4)
        plain.load_state_dict(model.state_dict())
        plain_out = plain.eval()(images)
    assert not torch.allclose(first, second)
    assert torch.equal(eval_out, model(images))
    assert torch.allclose(eval_out, plain_out, atol=1e-6)


def test_build_backbone_reads_config(nb):
    cfg = nb.make_config("demo", arch="vit_small", patch_size=16, img_size=64, drop_path_rate=0.2)
    with torch.device("meta"):
        student, teacher = nb.build_backbone(cfg), nb.build_backbone(cfg, drop_path_rate=0.0)
    assert student.embed_dim == 384 and student.patch_embed.proj.kernel_size == (16, 16)
    assert student.pos_embed.shape == (1, 1 + 16, 384)
    assert student.blocks[-1].drop_path.drop_prob == pytest.approx(0.2)
    assert all(block.drop_path.drop_prob == 0 for block in teacher.blocks)
    unchecked = nb.make_config("demo")
    object.__setattr__(unchecked, "arch", "vit_huge")   # past the Config's own check, to reach build_backbone's
    with pytest.raises(ValueError, match="vit_huge") as refused:
        nb.build_backbone(unchecked)
    assert not isinstance(refused.value, nb.ConfigError)


# ---------------------------------------------------------------- sizes, names, init

def test_parameter_counts(nb):
    with torch.device("meta"):
        base16 = nb.count_parameters(nb.vit_base(patch_size=16, img_size=224))
        base12 = nb.count_parameters(nb.vit_base(patch_size=12, img_size=224))
        small16 = nb.count_parameters(nb.vit_small(patch_size=16, img_size=224))
        sizes = {(make.__name__, p): nb.count_parameters(make(patch_size=p, img_size=64))
                 for make in (nb.vit_tiny, nb.vit_small) for p in (8, 12, 16)}
    assert base16 == 85_798_656                                     # timm's ViT-B/16 minus its classifier
    assert small16 == 21_665_664
    assert abs(base12 - 86e6) / 86e6 < 0.01
    for (name, p), count in sizes.items():
        dim = {"vit_tiny": 192, "vit_small": 384}[name]
        grid = 64 // p
        expected = 12 * (12 * dim * dim + 13 * dim) + 3 * p * p * dim + dim + dim + (1 + grid * grid) * dim + 2 * dim
        assert count == expected, (name, p)


@pytest.mark.parametrize("arch,dim,heads", [("vit_tiny", 192, 3), ("vit_small", 384, 6), ("vit_base", 768, 12)])
def test_reference_parameter_names_and_shapes(nb, arch, dim, heads):
    with torch.device("meta"):
        model = nb.VIT_ARCHS[arch](patch_size=8, img_size=64)
    state = model.state_dict()
    assert list(state) == reference_backbone_names(12)
    assert model.embed_dim == dim and model.blocks[0].attn.num_heads == heads
    assert model.blocks[0].norm1.eps == 1e-6
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, 65, dim), "patch_embed.proj.weight": (dim, 3, 8, 8),
              "blocks.3.attn.qkv.weight": (3 * dim, dim), "blocks.3.attn.qkv.bias": (3 * dim,),
              "blocks.3.attn.proj.weight": (dim, dim), "blocks.3.mlp.fc1.weight": (4 * dim, dim),
              "blocks.3.mlp.fc2.weight": (dim, 4 * dim), "norm.weight": (dim,)}
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key


def test_init_statistics(nb):
    torch.manual_seed(0)
    model = nb.vit_tiny(patch_size=8, img_size=64)
    fc1 = model.blocks[0].mlp.fc1.weight
    assert abs(fc1.std().item() - 0.02) < 0.001 and abs(fc1.mean().item()) < 0.001
    assert fc1.abs().max() <= 2.0
    assert abs(model.pos_embed.std().item() - 0.02) < 0.002
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            assert (module.bias == 0).all(), name
        if isinstance(module, nn.LayerNorm):
            assert (module.weight == 1).all() and (module.bias == 0).all(), name


# ---------------------------------------------------------------- head and wrapper

def test_head_layers_and_frozen_magnitude(nb):
    head = small_head(nb, in_dim=40)
    assert [type(m) for m in head.mlp] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert head.mlp[0].bias.abs().max() == 0 and abs(head.mlp[2].weight.std().item() - 0.02) < 0.005
    magnitude = head.last_layer.parametrizations.weight.original0
    assert magnitude.shape == (64, 1) and (magnitude == 1).all() and not magnitude.requires_grad
    assert head.last_layer.bias is None
    assert set(head.state_dict()) >= {"last_layer.parametrizations.weight.original0",
                                      "last_layer.parametrizations.weight.original1"}
    scores = head(torch.randn(16, 40))
    assert scores.shape == (16, 64) and scores.abs().max() <= 1 + 1e-5   # cosine similarities
    scores.sum().backward()
    assert magnitude.grad is None and head.last_layer.parametrizations.weight.original1.grad is not None
    trainable = small_head(nb, in_dim=40, norm_last_layer=False)
    assert trainable.last_layer.parametrizations.weight.original0.requires_grad
    with_bn = small_head(nb, in_dim=40, use_bn=True, nlayers=4)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in with_bn.mlp) == 3
    assert isinstance(small_head(nb, in_dim=40, nlayers=1).mlp, nn.Linear)


def test_build_head_reads_config(nb):
    cfg = nb.make_config("demo", out_dim=128, head_hidden_dim=48, head_bottleneck_dim=24, norm_last_layer=False)
    head = nb.build_head(cfg, in_dim=20)
    assert head.mlp[0].weight.shape == (48, 20) and head.mlp[-1].weight.shape == (24, 48)
    assert head.last_layer.weight.shape == (128, 24)
    assert head.last_layer.parametrizations.weight.original0.requires_grad


def test_multicrop_wrapper_is_crop_major_and_batches_by_resolution(nb):
    wrapper = tiny_wrapper(nb, seed=0)
    calls = []
    wrapper.backbone.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    sizes = [32, 32, 16, 16, 16, 24, 32]
    crops = [torch.randn(2, 3, s, s) for s in sizes]
    with torch.no_grad():
        together = wrapper(crops)
        assert calls == [4, 6, 2, 2]                                # one pass per run of equal sizes
        one_by_one = torch.cat([wrapper.head(wrapper.backbone(c)) for c in crops])
    assert together.shape == (len(sizes) * 2, 64)
    assert torch.allclose(together, one_by_one, atol=1e-5)
    assert {k.split(".")[0] for k in wrapper.state_dict()} == {"backbone", "head"}


# ---------------------------------------------------------------- checkpoints

def test_official_backbone_file_round_trip(nb, tmp_path):
    source = mini_vit(nb)
    torch.save(source.state_dict(), tmp_path / "dino_deittiny8_pretrain.pth")
    torch.manual_seed(5)
    target = nb.load_dino_checkpoint(mini_vit(nb),
                                     str(tmp_path / "dino_deittiny8_pretrain.pth"))
    assert_same_weights(target, source.state_dict())


@pytest.mark.parametrize("old_api", [True, False])
def test_reference_training_checkpoint_round_trip(nb, tmp_path, old_api):
    teacher, student = tiny_wrapper(nb, seed=1), tiny_wrapper(nb, seed=2)
    spell = to_old_weight_norm if old_api else dict
    checkpoint = {"teacher": {k: v for k, v in spell(teacher.state_dict()).items()},
                  "student": {"module." + k: v for k, v in spell(student.state_dict()).items()},
                  "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1, 2]}]},
                  "epoch": 100, "dino_loss": {"center": torch.zeros(1, 64)},
                  "args": argparse.Namespace(arch="vit_tiny", local_crops_scale=(0.05, 0.4), out_dim=64)}
    if old_api:
        assert "head.last_layer.weight_g" in checkpoint["teacher"]
        assert "module.backbone.blocks.0.attn.qkv.weight" in checkpoint["student"]
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    assert_same_weights(nb.load_dino_checkpoint(tiny_wrapper(nb, seed=3), path), teacher.state_dict())
    loaded_student = nb.load_dino_checkpoint(tiny_wrapper(nb, seed=3), path, key="student")
    assert_same_weights(loaded_student, student.state_dict())
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
    with torch.no_grad():
        assert torch.allclose(loaded_student(crops), student(crops), atol=1e-6)
    backbone = nb.load_dino_checkpoint(mini_vit(nb), path)   # head dropped
    assert_same_weights(backbone, teacher.backbone.state_dict())


def test_a_dinov2_training_checkpoint_gives_a_bare_backbone_its_backbone(nb, tmp_path):
    """DINOv2's teacher_checkpoint.pth: backbone.* (with iBOT's mask_token) beside dino_head.* and ibot_head.*;
    only the backbone's entries go into a bare ViT (a filter that dropped only DINO's head.* refused the file)."""
    teacher = tiny_wrapper(nb, seed=5)
    backbone = {"backbone." + k: v for k, v in teacher.backbone.state_dict().items()}
    backbone["backbone.mask_token"] = torch.zeros(1, teacher.backbone.embed_dim)   # iBOT's; DINOv2 keeps one
    heads = {f"{name}.{k}": v for name in ("dino_head", "ibot_head") for k, v in teacher.head.state_dict().items()}
    torch.save({"teacher": {**backbone, **heads}}, tmp_path / "teacher_checkpoint.pth")
    loaded = nb.load_dino_checkpoint(mini_vit(nb), tmp_path / "teacher_checkpoint.pth")
    assert_same_weights(loaded, teacher.backbone.state_dict())


def test_our_checkpoints_round_trip(nb, tmp_path):
    teacher, student = tiny_wrapper(nb, seed=1), tiny_wrapper(nb, seed=2)
    cfg = nb.make_config("demo")
    torch.save({"student": student.state_dict(), "teacher": teacher.state_dict(), "epoch": 3,
                "config": cfg}, tmp_path / "ours.pth")
    torch.save(student.state_dict(), tmp_path / "bare.pth")
    assert_same_weights(nb.load_dino_checkpoint(tiny_wrapper(nb, 4), tmp_path / "ours.pth"), teacher.state_dict())
    assert_same_weights(nb.load_dino_checkpoint(tiny_wrapper(nb, 4), tmp_path / "ours.pth", key="student"),
                        student.state_dict())
    assert_same_weights(nb.load_dino_checkpoint(tiny_wrapper(nb, 4), tmp_path / "bare.pth"), student.state_dict())
    assert_same_weights(nb.load_dino_checkpoint(tiny_wrapper(nb, 4), student.state_dict()), student.state_dict())
    compiled_style = {"_orig_mod." + k: v for k, v in student.backbone.state_dict().items()}
    assert_same_weights(nb.load_dino_checkpoint(mini_vit(nb), compiled_style),
                        student.backbone.state_dict())


def test_mismatched_patch_size_is_refused_clearly(nb, tmp_path):
    path = tmp_path / "dino_vittiny16_pretrain.pth"
    torch.save(mini_vit(nb, patch_size=16).state_dict(), path)
    model = mini_vit(nb)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as error:
        nb.load_dino_checkpoint(model, path)
    message = str(error.value)
    assert "dino_vittiny16_pretrain.pth" in message and "patch_embed.proj.weight" in message
    assert "(48, 3, 16, 16)" in message and "(48, 3, 8, 8)" in message
    assert_same_weights(model, before)                              # nothing was loaded


def test_mismatched_width_and_keys_are_refused_clearly(nb, tmp_path):
    path = tmp_path / "small.pth"
    state = mini_vit(nb, embed_dim=96).state_dict()
    del state["norm.weight"]
    state["head.weight"] = torch.zeros(10, 96)
    torch.save(state, path)
    with pytest.raises(ValueError) as error:
        nb.load_dino_checkpoint(mini_vit(nb), path)
    message = str(error.value)
    assert "small.pth" in message and "(96, 3, 8, 8)" in message and "(48, 3, 8, 8)" in message
    assert "missing keys (1): norm.weight" in message and "unexpected keys (1): head.weight" in message


def test_pos_embed_of_other_image_size_is_refused_with_a_hint(nb):
    official_like = mini_vit(nb, img_size=64).state_dict()
    with pytest.raises(ValueError, match=r"pos_embed \(1, 65, 48\) in file vs \(1, 17, 48\)") as error:
        nb.load_dino_checkpoint(mini_vit(nb), official_like)
    assert "img_size=64" in str(error.value)
    bare = mini_vit(nb).state_dict()
    with pytest.raises(ValueError, match="model.backbone"):
        nb.load_dino_checkpoint(tiny_wrapper(nb, 0), bare)


def test_missing_file_and_wrong_entry(nb, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing_here.pth"):
        nb.load_dino_checkpoint(mini_vit(nb), tmp_path / "nothing_here.pth")
    torch.save({"model": {"a": torch.zeros(1)}, "epoch": 1}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="odd.pth.*'teacher'"):
        nb.load_dino_checkpoint(mini_vit(nb), tmp_path / "odd.pth")


class CompiledStyle(nn.Module):
    """Holds a model as `_orig_mod`, the state-dict layout of torch.compile's wrapper (compiling is slow)."""
    def __init__(self, module):
        super().__init__()
        self._orig_mod = module


def test_loads_into_a_compiled_backbone_and_back(nb, tmp_path):
    source = tiny_wrapper(nb, seed=1)
    torch.save({"teacher": to_old_weight_norm(source.state_dict())}, tmp_path / "reference.pth")
    target = tiny_wrapper(nb, seed=2)
    target.backbone = CompiledStyle(target.backbone)
    nb.load_dino_checkpoint(target, tmp_path / "reference.pth")
    assert all(torch.equal(target.backbone._orig_mod.state_dict()[k], v)
               for k, v in source.backbone.state_dict().items())
    assert_same_weights(target.head, source.head.state_dict())
    plain = nb.load_dino_checkpoint(mini_vit(nb), target.state_dict())      # `backbone._orig_mod.` keys
    assert_same_weights(plain, source.backbone.state_dict())
