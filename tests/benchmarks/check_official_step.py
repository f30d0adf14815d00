"""Our float32 training step against the official DINO code's, step by step, on the CPU.

    python tests/benchmarks/check_official_step.py --official PATH_TO_facebookresearch_dino [--steps 12]

The official side is main_dino.py's `train_one_epoch` loop as it runs without fp16 (the loop is written
out here, since the original moves its images to a GPU): its modules (`vision_transformer.py`'s ViT and
DINOHead, `utils.MultiCropWrapper`), its `DINOLoss`, `utils.cosine_scheduler`, `utils.get_params_groups`,
`utils.clip_gradients`, `utils.cancel_gradients_last_layer` and its EMA loop. Ours is the notebook's
`train_step` on the same crops. Both start from the same weights: our student's state dict, loaded into
the official student as it is (only the weight-norm spelling of the last layer differs). A small ViT-T/16
at 64 pixels with 2 local crops, 3 steps an epoch: the learning-rate warm-up, the frozen last layer, the
teacher-temperature warm-up, a last layer with a free magnitude, the EMA, and drop path 0.1 in the
student, both codes drawing its masks from the same random state (each step starts the official one
from the state ours started from). The key part of each qkv bias is left out of the comparison
(and its difference printed): its gradient is zero but for rounding, which AdamW magnifies. It prints each step's losses and, at the end, the largest
difference of every compared quantity. Then the trained teacher goes the other way: written as a run
writes it (`last.pth`, then `teacher.pth` exported from it) and read by the official evaluation scripts'
`utils.load_pretrained_weights` into their ViT built for the run's image size, both files, whose features
are compared with ours; the ViT their scripts build as they are (224 pixels) is tried too, and its error
printed. Exits 1 when a difference is above --tolerance. Not part of the suite:
the official code is not part of the project and nothing is downloaded; pass a checkout of it.
"""
import argparse
import contextlib
import io
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nbloader import bench_header, load_notebook  # noqa: E402

SETTINGS = dict(arch="vit_tiny", patch_size=16, img_size=64, out_dim=256, head_hidden_dim=64,
                head_bottleneck_dim=32, batch_size=4, n_local_crops=2, epochs=4, warmup_epochs=1,
                freeze_last_layer=1, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=2,
                norm_last_layer=False, drop_path_rate=0.1, momentum_teacher=0.99, base_lr=4e-3, koleo_weight=0.0,
                max_train_images=0)
ITERS_PER_EPOCH = 3


def official_spelling(nb, state_dict):
    """Our state dict with the last layer's weight norm spelt as nn.utils.weight_norm spells it: the
    notebook's own renaming of official checkpoints (WEIGHT_NORM_OLD_TO_NEW), turned round."""
    new_to_old = {new: old for old, new in nb.WEIGHT_NORM_OLD_TO_NEW.items()}
    out = {}
    for key, value in state_dict.items():
        for new, old in new_to_old.items():
            key = key.replace(new, old)
        out[key] = value
    return out


def weight_gaps(ours, theirs):
    """The largest |difference| over every tensor, the key part of each qkv bias left out; and that part's."""
    rest, key_bias = 0.0, 0.0
    for name, value in ours.items():
        gap = (value - theirs[name]).abs()
        if name.endswith("attn.qkv.bias"):
            width = len(gap) // 3   # q, k, v
            key_bias = max(key_bias, float(gap[width:2 * width].max()))
            gap = torch.cat([gap[:width], gap[2 * width:]])
        rest = max(rest, float(gap.max()))
    return rest, key_bias


def official_models(cfg, state_dict):
    """The official student and teacher (their modules, imported from the checkout on sys.path)."""
    import utils as official_utils
    import vision_transformer as vits

    def make(norm_last_layer, drop_path_rate):   # as main_dino.py builds them
        backbone = vits.__dict__[cfg.arch](patch_size=cfg.patch_size, img_size=[cfg.img_size],
                                           drop_path_rate=drop_path_rate)
        return official_utils.MultiCropWrapper(backbone, vits.DINOHead(
            backbone.embed_dim, cfg.out_dim, cfg.use_bn_in_head, norm_last_layer, hidden_dim=cfg.head_hidden_dim,
            bottleneck_dim=cfg.head_bottleneck_dim))

    # main_dino.py: the teacher's head keeps the default norm_last_layer, its backbone has no drop path
    student, teacher = make(cfg.norm_last_layer, cfg.drop_path_rate), make(True, 0.0)
    student.load_state_dict(state_dict)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher, official_utils


def read_by_official_eval(nb, cfg, ours, official_utils, images):
    """Our trained teacher as the official eval_knn.py, eval_linear.py and visualize_attention.py read it
    (utils.load_pretrained_weights: keys stripped of module. and backbone., loaded with strict=False), from
    teacher.pth and from last.pth's teacher entry, into their ViT built for the run's image size: the largest
    difference of its features from ours, per file. Their scripts build the ViT for 224 pixels: that too is
    tried, and what it says printed."""
    import vision_transformer as vits
    folder = Path(cfg.checkpoint_dir)
    last, exported = nb.save_checkpoint(ours, folder / "last.pth"), folder / "teacher.pth"
    nb.export_teacher_backbone(last, exported, dtype=torch.float32)   # as a finished run writes it
    with torch.no_grad():
        our_features = ours.teacher.backbone(images)
    gaps = {}
    for path, key in ((exported, None), (last, "teacher")):
        theirs = vits.__dict__[cfg.arch](patch_size=cfg.patch_size, num_classes=0, img_size=[cfg.img_size]).eval()
        with contextlib.redirect_stdout(io.StringIO()) as said:
            official_utils.load_pretrained_weights(theirs, str(path), key, cfg.arch, cfg.patch_size)
        with torch.no_grad():
            gaps[f"{path.name}, their ViT"] = float((theirs(images) - our_features).abs().max())
        print(f"{path.name} into their {cfg.arch}/{cfg.patch_size} for {cfg.img_size} px, as their evaluation "
              f"scripts load it: {said.getvalue().strip().splitlines()[-1].split(' and loaded with ')[-1]}")
    at_224 = vits.__dict__[cfg.arch](patch_size=cfg.patch_size, num_classes=0)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            official_utils.load_pretrained_weights(at_224, str(exported), None, cfg.arch, cfg.patch_size)
        print("teacher.pth into their ViT as their scripts build it (224 px): loaded")
    except RuntimeError as error:
        print(f"teacher.pth into their ViT as their scripts build it (224 px): {str(error).splitlines()[-1].strip()}")
    return gaps


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official", required=True, help="a checkout of facebookresearch/dino")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--tolerance", type=float, default=1e-5)
    a = p.parse_args()
    official = Path(a.official)
    if not (official / "main_dino.py").is_file():
        raise SystemExit(f"--official {official}: no main_dino.py there; pass a checkout of facebookresearch/dino")
    if not 1 <= a.steps <= SETTINGS["epochs"] * ITERS_PER_EPOCH:
        raise SystemExit(f"--steps {a.steps}: must be 1 to {SETTINGS['epochs'] * ITERS_PER_EPOCH}")
    torch.set_num_threads(1)
    print(bench_header(), flush=True)
    sys.path.insert(0, str(official))   # their main_dino, utils and vision_transformer
    nb = load_notebook()
    import torch.distributed as dist
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29544")
    dist.init_process_group("gloo", rank=0, world_size=1)   # the official loss all-reduces its centre
    try:
        with tempfile.TemporaryDirectory() as folder:
            compare(nb, a, nb.make_config("demo", checkpoint_dir=folder, **SETTINGS))
    finally:
        dist.destroy_process_group()


def compare(nb, a, cfg):
    device = torch.device("cpu")
    nb.seed_everything(cfg.seed)   # the same weights every run, so that its printed losses can be compared
    ours = nb.DINOTrainer(cfg, ITERS_PER_EPOCH * cfg.batch_size, device)
    student, teacher, official_utils = official_models(cfg, official_spelling(nb, ours.student.state_dict()))
    import main_dino
    loss_fn = main_dino.DINOLoss(cfg.out_dim, 2 + cfg.n_local_crops, cfg.warmup_teacher_temp, cfg.teacher_temp,
                                 cfg.warmup_teacher_temp_epochs, cfg.epochs, cfg.student_temp, cfg.center_momentum)
    optimizer = torch.optim.AdamW(official_utils.get_params_groups(student))
    n = ITERS_PER_EPOCH
    schedules = dict(lr=official_utils.cosine_scheduler(cfg.base_lr * cfg.batch_size / 256, cfg.min_lr, cfg.epochs, n,
                                                        warmup_epochs=cfg.warmup_epochs),
                     wd=official_utils.cosine_scheduler(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, n),
                     momentum=official_utils.cosine_scheduler(cfg.momentum_teacher, 1, cfg.epochs, n))
    gaps = {f"{name} schedule": float(np.abs(ours.schedules[name] - schedules[name]).max()) for name in schedules}
    rng = torch.Generator().manual_seed(0)
    sizes = [cfg.global_crop_size] * 2 + [cfg.local_crop_size] * cfg.n_local_crops
    loss_gap = 0.0
    for it in range(a.steps):
        crops = [torch.randn(cfg.batch_size, 3, s, s, generator=rng) for s in sizes]
        epoch = it // n
        random_state = torch.get_rng_state()   # drop path's numbers: the same for both
        ours_stats = nb.train_step(ours, [c.clone() for c in crops])
        torch.set_rng_state(random_state)
        for i, group in enumerate(optimizer.param_groups):   # train_one_epoch, without fp16
            group["lr"] = schedules["lr"][it]
            if i == 0:
                group["weight_decay"] = schedules["wd"][it]
        loss = loss_fn(student(crops), teacher(crops[:2]), epoch)
        optimizer.zero_grad()
        loss.backward()
        official_utils.clip_gradients(student, cfg.clip_grad)
        official_utils.cancel_gradients_last_layer(epoch, student, cfg.freeze_last_layer)
        optimizer.step()
        with torch.no_grad():
            m = schedules["momentum"][it]
            for param_q, param_k in zip(student.parameters(), teacher.parameters()):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
        loss_gap = max(loss_gap, abs(ours_stats["loss"] - loss.item()))
        print(f"step {it + 1:2d} (epoch {epoch + 1}): loss ours {ours_stats['loss']:.7f}, official {loss.item():.7f}, "
              f"|difference| {abs(ours_stats['loss'] - loss.item()):.1e}")
    gaps["loss, over the steps"] = loss_gap
    key_bias_gaps = {}
    for name, ours_model, theirs in [("student", ours.student, student), ("teacher", ours.teacher, teacher)]:
        theirs_in_our_spelling = {nb.canonical_key(key): value for key, value in theirs.state_dict().items()}
        gaps[f"{name} weights"], key_bias_gaps[name] = weight_gaps(ours_model.state_dict(), theirs_in_our_spelling)
    gaps["loss centre"] = float((ours.loss.center - loss_fn.center).abs().max())
    gaps.update(read_by_official_eval(nb, cfg, ours, official_utils, crops[0]))
    print(f"after {a.steps} steps, largest differences:")
    for name, gap in gaps.items():
        print(f"  {name:22s} {gap:.1e}")
    print(f"  not compared: the key biases (student {key_bias_gaps['student']:.1e}, teacher "
          f"{key_bias_gaps['teacher']:.1e}): adding one bias to every key leaves the softmax unchanged, so their "
          f"gradient is zero but for rounding, and AdamW turns that noise into steps of up to the learning rate")
    worst = max(gaps.values())
    print(f"{'passed' if worst <= a.tolerance else 'FAILED'}: largest difference {worst:.1e} "
          f"(tolerance {a.tolerance:.0e})")
    if not math.isfinite(worst) or worst > a.tolerance:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
