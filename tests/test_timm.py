"""A trained backbone in timm: strict load, the same features at the native size, and timm's own
position-embedding rule (size=, bicubic, antialiased) elsewhere."""
import pytest
import torch

import timm


def small_backbone(nb, **kwargs):
    torch.manual_seed(0)
    model = nb.VisionTransformer(32, 8, embed_dim=48, depth=2, num_heads=3, **kwargs).eval()
    with torch.no_grad():
        model.pos_embed.normal_(std=0.5)              # a table that visibly changes when resampled
    return model


def test_timm_model_loads_strictly_and_gives_our_features(nb):
    ours = small_backbone(nb)
    theirs = nb.timm_from_backbone(ours)
    assert isinstance(theirs, timm.models.vision_transformer.VisionTransformer)
    assert set(theirs.state_dict()) == set(ours.state_dict())
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(theirs(images), ours(images), atol=1e-5)
        assert theirs(images).shape == (3, 48)                 # num_classes=0, CLS token pooled


def test_timm_resamples_positions_its_own_way(nb):
    ours = small_backbone(nb)
    theirs = nb.timm_from_backbone(ours)
    timm_rule = small_backbone(nb, interpolate_offset=0.0, interpolate_antialias=True)   # size=, antialiased
    for size in [(16, 16), (48, 40)]:
        images = torch.randn(2, 3, *size)
        with torch.no_grad():
            assert torch.allclose(theirs(images), timm_rule(images), atol=1e-5)
            assert (theirs(images) - ours(images)).abs().max() > 1e-3


def test_layerscale_backbone_maps_to_init_values(nb):
    ours = small_backbone(nb, layerscale_init=1.0)
    with torch.no_grad():
        for block in ours.blocks:
            block.ls1.gamma.uniform_(0.2, 2.0)
    theirs = nb.timm_from_backbone(ours)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(theirs(images), ours(images), atol=1e-5)


def test_registers_are_refused(nb):
    with pytest.raises(ValueError, match="registers"):
        nb.timm_from_backbone(small_backbone(nb, num_register_tokens=2))
