"""cfg.init_from: student and teacher start from a DINO, DINOv2 or own file, position table resized to the
run's grid by the model's own rule, the file's head when it fits, clear errors when the file does not fit."""
import json
import math
import re

import pytest
import torch
import torch.nn as nn

HEAD = dict(out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16)   # the demo profile is vit_tiny/8 at 64 px
PATCH_14 = dict(patch_size=14, img_size=56, global_crop_size=56, local_crop_size=28)   # a folder, patch 14


def config(nb, path, **overrides):
    return nb.make_config("demo", init_from=str(path), **{**HEAD, **overrides})


def random_file_weights(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.05)
    return model.state_dict()


def dinov2_release(nb, seed):
    """The weights of a DINOv2 release's layout at ViT-T width: patch 14, a 37x37 grid (518 px), 4 registers,
    LayerScale."""
    return random_file_weights(nb.VisionTransformer(518, 14, embed_dim=192, depth=12, num_heads=3,
                                                    num_register_tokens=4, layerscale_init=1.0), seed)


def chunked_blocks(state, blocks_per_chunk):
    """`state` as DINOv2's training writes it with block_chunks > 0: backbone.blocks.<chunk>.<block>."""
    chunk = lambda key: key.replace("blocks.", f"blocks.{int(key.split('.')[1]) // blocks_per_chunk}.", 1)
    return {"backbone." + (chunk(key) if key.startswith("blocks.") else key): value for key, value in state.items()}


def dino_interpolation(pos_embed, grid):
    n = math.isqrt(pos_embed.shape[1] - 1)
    resized = nn.functional.interpolate(pos_embed[:, 1:].reshape(1, n, n, -1).permute(0, 3, 1, 2),
                                        scale_factor=((grid + 0.1) / n,) * 2, mode="bicubic")
    return torch.cat([pos_embed[:, :1], resized.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


def test_dino_release_backbone_starts_both_networks(nb, tmp_path, capsys):
    state = random_file_weights(nb.vit_tiny(patch_size=8, img_size=224), seed=1)   # a 28x28 table, no head
    torch.save(state, tmp_path / "dino_deittiny8_pretrain.pth")
    student, teacher = nb.build_models(config(nb, tmp_path / "dino_deittiny8_pretrain.pth"), torch.device("cpu"))
    assert capsys.readouterr().out.count("head starts fresh") == 1
    assert nb.start_label(config(nb, tmp_path / "dino_deittiny8_pretrain.pth")) == "start (dino_deittiny8_pretrain.pth)"
    loaded = student.backbone.state_dict()
    assert torch.equal(loaded["pos_embed"], dino_interpolation(state["pos_embed"], 8))    # 224 px -> 64 px
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if k != "pos_embed")
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), student.state_dict().values()))
    assert not any(p.requires_grad for p in teacher.parameters()) and teacher.training  # train mode, as the reference
    assert student.backbone.blocks[-1].drop_path.drop_prob > 0
    assert teacher.backbone.blocks[-1].drop_path.drop_prob == 0
    crops = [torch.randn(2, 3, 64, 64)] * 2 + [torch.randn(2, 3, 32, 32)] * 2
    assert student(crops).shape == (8, HEAD["out_dim"])


def test_own_checkpoint_brings_its_head(nb, tmp_path, capsys):
    source, _ = nb.build_models(nb.make_config("demo", seed=7, **HEAD), torch.device("cpu"))
    random_file_weights(source, seed=2)
    torch.save({"teacher": source.state_dict(), "student": source.state_dict(), "epoch": 3},
               tmp_path / "last.pth")
    student, teacher = nb.build_models(config(nb, tmp_path / "last.pth"), torch.device("cpu"))
    assert "head starts fresh" not in capsys.readouterr().out
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), source.state_dict().values()))
    other_head, _ = nb.build_models(config(nb, tmp_path / "last.pth", out_dim=32), torch.device("cpu"))
    assert capsys.readouterr().out.count("head starts fresh") == 1     # head of another shape: fresh
    assert torch.equal(other_head.backbone.pos_embed, source.backbone.pos_embed)


def test_dinov2_file_brings_patch_14_registers_and_layerscale(nb, tmp_path, capsys):
    state = dinov2_release(nb, seed=3)
    torch.save({**state, "mask_token": torch.zeros(1, 192)}, tmp_path / "dinov2_vitt14_reg4_pretrain.pth")
    student, teacher = nb.build_models(config(nb, tmp_path / "dinov2_vitt14_reg4_pretrain.pth"), torch.device("cpu"))
    out = capsys.readouterr().out   # the demo's 64-pixel data: no multiple of 14, so its patch wins, and says so
    assert "WARNING" in out and "uses patch 14, not cfg.patch_size=8" in out
    assert "of crops of 64 and 32 px it sees the top-left 56x56 and 28x28 px; on a folder of images, " \
           "patch_size=14" in out
    nb.build_models(config(nb, tmp_path / "dinov2_vitt14_reg4_pretrain.pth"), torch.device("cpu"))
    assert "WARNING" not in capsys.readouterr().out   # said once, as the fresh head is
    backbone = student.backbone
    assert (backbone.patch_size, backbone.num_register_tokens) == (14, 4)
    assert torch.equal(backbone.blocks[3].ls2.gamma, state["blocks.3.ls2.gamma"])
    expected_pos = nn.functional.interpolate(state["pos_embed"][:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2),
                                             size=(4, 4), mode="bicubic", antialias=True)   # 64 // 14 = 4
    assert torch.allclose(backbone.pos_embed[:, 1:], expected_pos.permute(0, 2, 3, 1).reshape(1, 16, -1))
    assert torch.equal(teacher.backbone.register_tokens, state["register_tokens"])
    with torch.no_grad():
        assert teacher.backbone.get_last_selfattention(torch.randn(1, 3, 64, 64)).shape[-1] == 1 + 4 + 16
    folder_cfg = config(nb, tmp_path / "dinov2_vitt14_reg4_pretrain.pth", **PATCH_14)   # every pixel used
    assert nb.build_models(folder_cfg, torch.device("cpu"))[0].backbone.patch_size == 14


def test_a_run_from_a_dinov2_file_is_evaluated_with_its_own_vit(nb, tmp_path):
    """The run's ViT came from the file (patch 14, registers, LayerScale), so its teacher.pth is read back
    into that ViT for the Evaluation and Attention sections, not into the config's patch-16 one."""
    from test_train import Data, tiny_cfg
    torch.save(dinov2_release(nb, seed=4), tmp_path / "dinov2_vitt14_reg4_pretrain.pth")
    cfg = tiny_cfg(nb, tmp_path, init_from=str(tmp_path / "dinov2_vitt14_reg4_pretrain.pth"), epochs=1, **PATCH_14)
    cfg = nb.dataclasses.replace(cfg, profile="short")   # its teacher is the run's, not the demo checkpoint
    trainer, _ = nb.train_dino(cfg, Data(), Data(), torch.device("cpu"), progress=False)
    backbone, path = nb.trained_teacher(cfg, torch.device("cpu"))
    assert path == nb.run_directory(cfg) / "teacher.pth"
    assert (backbone.patch_size, backbone.num_register_tokens) == (14, 4) and not backbone.training
    trained = trainer.teacher.backbone.state_dict()
    assert all(torch.equal(value, trained[key]) for key, value in backbone.state_dict().items())
    assert nb.knn_accuracy(backbone, Data(), Data(), cfg, torch.device("cpu")) == \
        nb.knn_accuracy(trainer.teacher.backbone, Data(), Data(), cfg, torch.device("cpu"))
    # its files may be named as evaluate_file: checked as the run's ViT is read, not against patch_size 16
    chosen = tiny_cfg(nb, tmp_path, init_from=cfg.init_from, epochs=1, evaluate_file=str(path), **PATCH_14)
    assert nb.trained_teacher(chosen, torch.device("cpu"))[0].patch_size == 14


def test_a_file_that_does_not_fit_is_refused_when_the_config_is_made(nb, tmp_path):
    torch.save(random_file_weights(nb.vit_small(patch_size=8, img_size=224), 4), tmp_path / "small8.pth")
    with pytest.raises(nb.ConfigError, match=r"small8\.pth.*embed_dim 384 in the file vs 192.*num_heads 6"):
        config(nb, tmp_path / "small8.pth")
    torch.save(random_file_weights(nb.vit_tiny(patch_size=16, img_size=224), 5), tmp_path / "tiny16.pth")
    with pytest.raises(nb.ConfigError, match=r"tiny16\.pth.*patch_size 16 in the file vs 8"):
        config(nb, tmp_path / "tiny16.pth")
    with pytest.raises(nb.ConfigError, match=r"init_from=.*nowhere\.pth': no such file"):
        config(nb, tmp_path / "nowhere.pth")
    # a config changed after it was made (no file checks there) is still refused when the models are built
    late = nb.dataclasses.replace(nb.make_config("demo", **HEAD), init_from=str(tmp_path / "small8.pth"))
    with pytest.raises(nb.ConfigError, match=r"small8\.pth.*embed_dim 384 in the file vs 192"):
        nb.build_models(late, torch.device("cpu"))


def test_a_file_that_is_no_checkpoint_says_so_at_once(nb, tmp_path):
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.pth", format="JPEG")    # a JPEG renamed .pth
    with pytest.raises(nb.ConfigError, match=r"photo\.pth': not a checkpoint: .*a JPEG image"):
        config(nb, tmp_path / "photo.pth")
    (tmp_path / "notes.pth").write_text("just text")
    with pytest.raises(nb.ConfigError, match=r"notes\.pth': not a checkpoint: torch.save writes a zip archive"):
        config(nb, tmp_path / "notes.pth")
    torch.save(random_file_weights(nb.vit_tiny(patch_size=8, img_size=64), seed=2), tmp_path / "whole.pth")
    (tmp_path / "half.pth").write_bytes((tmp_path / "whole.pth").read_bytes()[:(tmp_path / "whole.pth").stat().st_size // 2])
    with pytest.raises(nb.ConfigError, match=r"half\.pth': not a checkpoint: torch.save writes a zip archive, and "
                       r"this file is the start of one without its end \(a download or copy cut short\?\): fetch it"):
        config(nb, tmp_path / "half.pth")   # (it was called no zip archive, its first bytes quoted: PK\x03\x04)
    torch.save({"epoch": torch.tensor(3)}, tmp_path / "no_backbone.pth")
    with pytest.raises(nb.ConfigError, match=r"no_backbone\.pth'.*not a ViT backbone this notebook can build: it has no \['pos_embed'"):
        config(nb, tmp_path / "no_backbone.pth")
    linear = {"state_dict": {"module.linear.weight": torch.zeros(10, 8)}, "best_acc": 80.0}   # a release's probe
    torch.save(linear, tmp_path / "dino_deitsmall8_linearweights.pth")
    with pytest.raises(nb.ConfigError, match=r"linearweights\.pth': a checkpoint, but it is a linear classifier's "
                                             r"weights \(eval_linear\.py's output.*not a backbone: that is the "
                                             r"\*_pretrain\.pth file"):
        config(nb, tmp_path / "dino_deitsmall8_linearweights.pth")
    torch.save({"state_dict": {"module.fc.weight": torch.zeros(2)}, "best_acc": 1.0}, tmp_path / "other.pth")
    with pytest.raises(nb.ConfigError, match=r"has no 'teacher' entry and is no plain state dict; its entries: "
                                             r"\['best_acc', 'state_dict'\]"):
        config(nb, tmp_path / "other.pth")   # a state_dict entry of no model of the release: its entries listed
    torch.save([torch.zeros(2)], tmp_path / "a_list.pth")
    with pytest.raises(nb.ConfigError, match=r"a_list\.pth': a checkpoint, but it holds a list, not a dict"):
        config(nb, tmp_path / "a_list.pth")
    with pytest.raises(nb.ConfigError, match=r"init_from='.*': not a file"):
        config(nb, tmp_path)


@pytest.mark.parametrize("keys, said", [
    (["conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "fc.weight"], "a ResNet \\(as the release's dino_resnet50"),
    (["module.cls_token", "module.patch_embed.proj.0.0.weight", "module.blocks.0.attn.temperature",
      "module.cls_attn_blocks.0.attn.q.weight"], "an XCiT \\(as the release's dino_xcit"),
    (["module.linear.weight", "module.linear.bias"], "a linear classifier's weights \\(eval_linear\\.py's output"),
    (["embeddings.cls_token", "embeddings.position_embeddings", "embeddings.patch_embeddings.projection.weight",
      "encoder.layer.0.attention.attention.query.weight", "layernorm.weight"],
     "a state dict in Hugging Face.s spelling .*not read here: the DINO and DINOv2 release files")],
    ids=["resnet50", "xcit", "linear head", "hugging face"])
def test_the_releases_other_models_are_named_not_only_refused(nb, tmp_path, keys, said):
    """DINO's release puts ResNet-50 and XCiT backbones and linear heads beside the ViTs, and Hugging Face
    holds its ViTs in another spelling: both readers said which ViT keys such a file lacks, not what it is."""
    torch.save({key: torch.zeros(2, 2) for key in keys}, tmp_path / "release.pth")
    with pytest.raises(nb.ConfigError, match=r"release\.pth'.*not a ViT backbone this notebook can build: it is " + said):
        config(nb, tmp_path / "release.pth")
    with pytest.raises(ValueError, match=r"release\.pth is no ViT backbone this notebook can build: it is " + said):
        nb.backbone_from_checkpoint(tmp_path / "release.pth")


@pytest.mark.parametrize("key, shape, said", [("pos_embed", (192,), r"pos_embed \(192,\) is not \(1, 1 \+ n\*n, width\)"),
                                             ("pos_embed", (1, 0, 192), r"pos_embed \(1, 0, 192\)"),
                                             ("pos_embed", (1, 11, 192), r"pos_embed \(1, 11, 192\)"),
                                             ("patch_embed.proj.weight", (192,), r"patch_embed.proj.weight \(192,\)")])
def test_a_backbone_of_impossible_shapes_is_refused_by_name(nb, tmp_path, key, shape, said):
    """Shapes no ViT has: both readers (the config's and the loader's) name the file and the shape."""
    state = nb.vit_tiny(patch_size=16).state_dict()
    state[key] = torch.zeros(shape)
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(nb.ConfigError, match=r"odd\.pth'.*not a ViT backbone this notebook can build: " + said):
        config(nb, tmp_path / "odd.pth", patch_size=16)
    with pytest.raises(ValueError, match=r"odd\.pth is no ViT backbone this notebook can build: " + said):
        nb.backbone_from_checkpoint(tmp_path / "odd.pth")


def test_the_fresh_head_is_said_once_however_many_models_are_built(nb, tmp_path, capsys):
    torch.save(random_file_weights(nb.vit_tiny(patch_size=8, img_size=224), seed=6), tmp_path / "once.pth")
    cfg = config(nb, tmp_path / "once.pth")
    for _ in range(3):   # the illustration, the training run and the baseline each build the models
        nb.build_models(cfg, torch.device("cpu"))
    assert capsys.readouterr().out.count("head starts fresh") == 1


def test_under_torchrun_rank_0_alone_says_what_the_file_lacks(nb, tmp_path, capsys):
    """Every rank builds its models from the file: the fresh head and the DINOv2 patch were said by each of
    them (eight times on eight GPUs)."""
    torch.save(dinov2_release(nb, seed=8), tmp_path / "dinov2_vitt14_reg4_pretrain.pth")
    cfg = config(nb, tmp_path / "dinov2_vitt14_reg4_pretrain.pth")
    nb.DINOTrainer(cfg, 16, torch.device("cpu"), rank=1, world_size=1)   # (world_size 1: no process group)
    assert capsys.readouterr().out == ""
    nb.SAID.clear()   # each rank is a process of its own, with its own record of what it said
    nb.DINOTrainer(cfg, 16, torch.device("cpu"), rank=0, world_size=1)
    out = capsys.readouterr().out
    assert out.count("head starts fresh") == 1 and out.count("a DINOv2 file with patch 14") == 1


def test_a_dinov2_file_named_as_the_teacher_is_read_into_its_own_vit(nb, tmp_path):
    """evaluate_file = a DINOv2 release (patch 14, registers, LayerScale) with no init_from: it passed the
    config's check, then failed to load strictly into the config's patch-8 ViT. It is read as init_from reads
    it, into the ViT it describes."""
    torch.save(dinov2_release(nb, seed=5), tmp_path / "dinov2_vitt14_reg4_pretrain.pth")
    cfg = nb.make_config("demo", evaluate_file=str(tmp_path / "dinov2_vitt14_reg4_pretrain.pth"),
                         checkpoint_dir=str(tmp_path / "ck"))
    backbone, path = nb.trained_teacher(cfg, torch.device("cpu"))
    assert (backbone.patch_size, backbone.num_register_tokens) == (14, 4) and not backbone.training
    expected = nb.backbone_from_checkpoint(path).eval()
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(backbone(x), expected(x))


@pytest.mark.parametrize("setting", ["evaluate_file", "init_from"])
def test_a_dinov2_training_teacher_with_chunked_blocks_loads_as_its_release(nb, tmp_path, setting):
    """DINOv2's own training (block_chunks=4 in its ViT-L and ViT-g configs) writes
    eval/<iteration>/teacher_checkpoint.pth: {"teacher": state dict}, the blocks spelt
    backbone.blocks.<chunk>.<block>., beside dino_head. and ibot_head. entries. It was read as a ViT of
    depth 4 (one block per chunk) and refused. Now it loads as the same ViT as the release layout."""
    flat = dinov2_release(nb, seed=7)
    torch.save(flat, tmp_path / "release.pth")
    chunked = chunked_blocks(flat, 3)
    assert "backbone.blocks.3.11.ls2.gamma" in chunked
    chunked.update({"dino_head.last_layer.weight": torch.randn(64, 16), "ibot_head.last_layer.weight": torch.randn(64, 16)})
    torch.save({"teacher": chunked}, tmp_path / "teacher_checkpoint.pth")
    assert nb.backbone_in_file(setting, tmp_path / "teacher_checkpoint.pth")["depth"] == 12
    cfg = nb.make_config("demo", **{setting: str(tmp_path / "teacher_checkpoint.pth")},
                         checkpoint_dir=str(tmp_path / "ck"), **HEAD,
                         **(PATCH_14 if setting == "init_from" else {}))   # the config's check passes
    if setting == "evaluate_file":
        backbone = nb.trained_teacher(cfg, torch.device("cpu"))[0]
    else:   # the position table resized to the run's 56 px: a 4x4 grid of patch 14
        backbone = nb.build_models(cfg, torch.device("cpu"))[1].backbone
        flat["pos_embed"] = nb.resize_pos_embed(flat["pos_embed"], 4, 4, 0.0, True)
    loaded = backbone.state_dict()
    assert len(backbone.blocks) == 12 and loaded.keys() == flat.keys()
    assert all(torch.equal(loaded[key], value) for key, value in flat.items())


def file_formats(nb):
    """{name: what torch.save is given} for every layout the loaders read: a DINO release (bare backbone), a
    DINO training checkpoint (teacher and student wrapped in DDP's module.), our last.pth and teacher.pth, a
    DINOv2 release with registers and LayerScale, a DINOv2 training teacher with chunked blocks and heads,
    a torch.compile'd backbone, and a width this notebook has no heads for."""
    release = random_file_weights(nb.vit_tiny(patch_size=8, img_size=224), seed=1)
    wrapped = {f"module.backbone.{key}": value for key, value in release.items()}
    ours, _ = nb.build_models(nb.make_config("demo", **HEAD), torch.device("cpu"))
    dinov2 = dinov2_release(nb, seed=2)
    chunked = chunked_blocks(dinov2, 4)
    odd_width = random_file_weights(nb.VisionTransformer(32, 8, embed_dim=40, depth=2, num_heads=2), seed=3)
    return {"dino release": release,
            "dino training": {"teacher": wrapped, "student": wrapped, "epoch": 3},
            "our last.pth": {"teacher": ours.state_dict(), "student": ours.state_dict(), "epoch": 1},
            "our teacher.pth": {f"backbone.{k}": v for k, v in ours.backbone.state_dict().items()},
            "dinov2 release": dinov2,
            "dinov2 training": {"teacher": {**chunked, "dino_head.last_layer.weight": torch.randn(8, 4),
                                            "ibot_head.last_layer.weight": torch.randn(8, 4)}},
            "compiled": {f"_orig_mod.{key}": value for key, value in release.items()},
            "odd width": odd_width,
            "no cls_token": {k: v for k, v in release.items() if k != "cls_token"},
            "swiglu": {**release, "blocks.0.mlp.w12.weight": torch.zeros(8, 192)},
            "release and its epoch": {**release, "epoch": 3}}


def test_the_settings_check_reads_every_file_as_the_loader_does(nb, tmp_path):
    """backbone_in_file (the settings' check, in Setup) reads a file's backbone on its own, since the loader's
    backbone_architecture is defined later: for every layout both readings give the same model, or both
    refuse it for the same reason (a width with no head count passed the settings' check with num_heads None,
    and a release saved with its epoch beside the tensors passed it and then failed to load)."""
    refused = []
    for name, content in file_formats(nb).items():
        path = tmp_path / f"{name.replace(' ', '_')}.pth"
        torch.save(content, path)
        try:
            arch = nb.backbone_architecture(nb.backbone_entries(nb.read_state_dict(path)[1]), str(path))
        except nb.CheckpointError as error:
            problem = str(error).split("this notebook can build: ")[-1].split(f"checkpoint {path} ")[-1]
            with pytest.raises(nb.ConfigError, match=re.escape(problem.split("; keys seen")[0])):
                nb.backbone_in_file("evaluate_file", path)
            refused.append(name)
            continue
        found = nb.backbone_in_file("evaluate_file", path)
        assert found == dict(embed_dim=arch["embed_dim"], depth=arch["depth"], num_heads=arch["num_heads"],
                             patch_size=arch["patch_size"], grid=arch["img_size"] // arch["patch_size"],
                             layerscale=arch["layerscale_init"] is not None), name
    assert refused == ["odd width", "no cls_token", "swiglu", "release and its epoch"]


def test_the_run_says_where_it_starts_from(nb, tmp_path, capsys):
    """The Train cell said nothing of init_from: the one line about the file (its head) came from whichever
    earlier cell first built the models."""
    from test_train import Data, tiny_cfg
    torch.save(random_file_weights(nb.vit_tiny(patch_size=16, img_size=224), seed=8), tmp_path / "release.pth")
    cfg = tiny_cfg(nb, tmp_path, init_from=str(tmp_path / "release.pth"), epochs=1, max_train_images=8)
    nb.train_dino(cfg, Data(), Data(), torch.device("cpu"), progress=False)
    assert (f"student and teacher start from init_from={tmp_path / 'release.pth'}: its position table "
            f"of 14x14 resized to 4x4") in capsys.readouterr().out


def test_a_dinov2_file_is_labelled_with_its_own_patch(nb, tmp_path):
    """Evaluated in a patch-8 config, a DINOv2 file (patch 14) was titled, and recorded in source.json, as
    vit_tiny/8."""
    torch.save(dinov2_release(nb, seed=9), tmp_path / "dinov2_vitt14_reg4_pretrain.pth")
    cfg = nb.make_config("demo", evaluate_file=str(tmp_path / "dinov2_vitt14_reg4_pretrain.pth"),
                         checkpoint_dir=str(tmp_path / "ck"))
    teacher_file = nb.trained_teacher(cfg, torch.device("cpu"))[1]
    assert nb.model_label(cfg, teacher_file).startswith("vit_tiny/14 ")
    note = nb.write_source_note(tmp_path / "out", cfg, teacher_file, "some data")
    assert json.loads(note.read_text())["arch"] == "vit_tiny/14"
    assert nb.arch_label(cfg, tmp_path / "not_written_yet.pth") == "vit_tiny/8"
