"""Does a recipe learn in the time a user has? One command for the evidence.

Trains a profile of the notebook on its generated shapes (ShapesDataset: ten classes, random position,
size, rotation, colours and background; raw pixels near chance) for a budget, and writes the curve:
weighted k-NN top-1 of the teacher per epoch (epoch 0 = random init) against the raw-pixel line, the
loss, the teacher's entropy, KL(teacher || student), images/s, and the Jaccard similarity between the
teacher's attention mask (the notebook's mass fraction, mean of the heads) and the objects' masks; the
k-NN and Jaccard figures with their standard errors, and the Jaccard gain over init paired by image.
Output: tests/benchmarks/results/learn-<name>.json, with the machine named.

    python tests/benchmarks/bench_learn.py --name cpu-short --profile short --images 10000 --img-size 32 ...
    python tests/benchmarks/bench_learn.py --name gpu-short --profile short --images 50000 --device cuda

With --fit-epochs the schedule is sized to the budget: epochs = the whole epochs that fit what is left of
--minutes after the data, the raw-pixel line and the evaluation at init (and after the sizing itself),
each epoch with its evaluation, from steps timed on this machine (the notebook's epochs_for_budget); the
run is then the run of --set epochs=<that number> (with the warm-ups cut where they would fill it: the
notebook's budget_settings), and its minutes in all stay within --minutes.
"""
import argparse
import contextlib
import copy
import dataclasses
import datetime
import itertools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from nbloader import bench_header, check_at_least, load_notebook, machine, parse_overrides  # noqa: E402


def shapes_config(nb, profile, img_size, **overrides):
    """The profile at the generated set's image size (global crops the whole image, local crops half), every
    image an epoch, a temporary checkpoint folder; `overrides` on top."""
    cfg = nb.make_config(profile, **{"img_size": img_size, "global_crop_size": img_size,
                                     "local_crop_size": img_size // 2, "max_train_images": 0, **overrides})
    return dataclasses.replace(cfg, checkpoint_dir=tempfile.mkdtemp(prefix="bench-learn-"))   # once the rest holds


def knn_top1(nb, features, train, val, cfg, device, bank):
    """Weighted k-NN top-1 (%) of all of val against `bank` training images, evenly spaced."""
    bank_images, bank_labels = nb.evenly_spaced(train, bank)
    return nb.knn_classify(features(bank_images), bank_labels, features(val.images), val.labels,
                           k=cfg.knn_k, T=cfg.knn_temperature, device=device)[cfg.knn_k][0]


def raw_pixels(nb, device):
    return lambda images: nb.normalize_uint8(torch.from_numpy(np.asarray(images)).to(device)).flatten(1).cpu()


def attention_masks(nb, backbone, images, cfg, chunk=250):
    """(n, h, w) boolean: for each image, the smallest set of patches holding cfg.attn_threshold of the
    CLS token's last-layer attention, the mean of the heads (the notebook's mass fraction)."""
    maps = torch.cat([nb.cls_attention_maps(backbone, torch.from_numpy(images[s:s + chunk]))
                      for s in range(0, len(images), chunk)])
    return nb.attention_mass_mask(maps.mean(dim=1), cfg.attn_threshold)


def image_jaccards(nb, backbone, val, cfg, n=500):
    """(n,): the Jaccard similarity between the teacher's attention mask and the object's mask of each of
    the first n validation images, at the patch grid."""
    patch, masks = cfg.patch_size, torch.from_numpy(val.masks[:n])
    kept = attention_masks(nb, backbone, val.images[:n], cfg)
    pixels = kept.repeat_interleave(patch, dim=1).repeat_interleave(patch, dim=2)
    objects = masks[:, :pixels.shape[1], :pixels.shape[2]]
    union = (pixels | objects).flatten(1).sum(1).clamp(min=1)
    return (pixels & objects).flatten(1).sum(1) / union


def mean_and_error(values):
    """(mean, standard error of the mean) of a 1-d tensor."""
    return values.mean().item(), (values.std() / len(values) ** 0.5).item()


def attention_figure(nb, backbones, val, cfg, path, n=6):
    """One row per model (random init, trained): the attention mask of each of n validation images (the
    mean of the heads, cfg.attn_threshold of the mass) in cyan, the object's outline in yellow."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(backbones), n, figsize=(1.6 * n, 1.75 * len(backbones)), squeeze=False)
    for row, (name, (backbone, jaccard)) in enumerate(backbones.items()):
        kept = attention_masks(nb, backbone, val.images[:n], cfg).float().numpy()
        for col, ax in enumerate(axes[row]):
            image = val.images[col].transpose(1, 2, 0)
            size = image.shape[:2]
            ax.imshow(image)
            for mask, colour in ((nb.upsample_map(kept[col], size) > 0.5, "cyan"), (val.masks[col], "yellow")):
                for contour in nb.mask_contours(mask):
                    ax.plot(contour[:, 1], contour[:, 0], color=colour, linewidth=1.2)
            ax.axis("off")
        axes[row, 0].set_title(f"{name}: Jaccard {jaccard:.2f}", fontsize=9, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=80, format="jpeg", pil_kwargs={"quality": 85})
    plt.close(fig)


def fit_epochs(nb, cfg, train, device, minutes, eval_seconds):
    """epochs_for_budget's answer for the `minutes` left, said; an error if not one epoch fits."""
    if minutes <= 0:
        sys.exit("--fit-epochs: the data, the raw-pixel line and the evaluation at init took the whole budget")
    fitted = nb.epochs_for_budget(cfg, train, device, minutes, eval_seconds=eval_seconds)
    print(f"fit: {fitted['images_per_s']:.0f} images/s over {fitted['timed_steps']} steps "
          f"({fitted['sizing_seconds']:.1f} s in all), an epoch with its evaluation ({eval_seconds:.1f} s) "
          f"{fitted['seconds_per_epoch']:.1f} s, {fitted['start_seconds']:.1f} s to start, {fitted['spare']:.0%} "
          f"kept spare: {fitted['epochs']} epochs in the {minutes:.2f} minutes left", flush=True)
    if fitted["epochs"] < 1:
        sys.exit(f"--fit-epochs: not one epoch fits {minutes:.2f} minutes "
                 f"(one takes {fitted['seconds_per_epoch']:.0f} s)")
    return fitted


def evaluate(nb, trainer, train, val, device, bank):
    """(k-NN top-1 with its binomial standard error and the mean attention Jaccard with its standard error,
    the Jaccard of each image)."""
    backbone, cfg = trainer.teacher.backbone, trainer.cfg
    features = lambda images: nb.extract_features(backbone, images, batch_size=500, device=device)
    top1 = knn_top1(nb, features, train, val, cfg, device, bank)
    jaccards = image_jaccards(nb, backbone, val, cfg)
    jaccard, jaccard_se = mean_and_error(jaccards)
    return dict(knn_top1=top1, knn_top1_se=(top1 * (100 - top1) / len(val)) ** 0.5,
                attention_jaccard=jaccard, attention_jaccard_se=jaccard_se), jaccards


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True)
    p.add_argument("--profile", default="short")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="FIELD=VALUE",
                   help="Config overrides; repeated --set options add up")
    p.add_argument("--images", type=int, default=50_000, help="training images")
    p.add_argument("--val-images", type=int, default=None, help="held-out images (default: a fifth)")
    p.add_argument("--bank", type=int, default=20_000, help="training images in the k-NN memory bank")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--minutes", type=float, default=10.0, help="stop training after this much time")
    p.add_argument("--fit-epochs", action="store_true",
                   help="set epochs to the whole epochs that fit what is left of --minutes, each epoch's "
                        "evaluation included (the notebook's epochs_for_budget, from steps timed here)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(HERE / "results"))
    a = p.parse_args()
    check_at_least(p, a, images=1, val_images=1, bank=1, img_size=8)
    if a.val_images is None and a.images < 5:
        p.error(f"--images={a.images}: its fifth, the default held-out set, holds no image: give --val-images")
    if not a.minutes > 0:
        p.error(f"--minutes={a.minutes}: must be > 0")
    out = Path(a.out) / f"learn-{a.name}.json"
    try:   # before the run, not after it
        out.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out.parent).close()
    except OSError as error:
        p.error(f"--out={a.out}: cannot write there ({error})")
    nb = load_notebook()
    try:
        device, overrides = torch.device(a.device), parse_overrides(a.set, nb.Config)
        cfg = shapes_config(nb, a.profile, a.img_size, **overrides)
    except (ValueError, RuntimeError) as error:   # ConfigError is a ValueError; a device torch does not know
        p.error(str(error))
    try:
        run(nb, a, cfg, overrides, device, out)
    finally:
        shutil.rmtree(cfg.checkpoint_dir, ignore_errors=True)   # shapes_config's temporary folder


def run(nb, a, cfg, overrides, device, out):
    """The run of main's arguments: the curve written to `out` (and its attention figure beside it)."""
    print(bench_header(device), flush=True)   # before the first figure, --fit-epochs' included
    start = time.perf_counter()
    train = nb.ShapesDataset(a.images, a.img_size, seed=1)
    val = nb.ShapesDataset(a.images // 5 if a.val_images is None else a.val_images, a.img_size, seed=2)
    made = time.perf_counter() - start
    nb.seed_everything(cfg.seed)
    trainer = nb.DINOTrainer(cfg, len(train), device)
    initial = copy.deepcopy(trainer.teacher.backbone)
    raw = knn_top1(nb, raw_pixels(nb, device), train, val, cfg, device, a.bank)
    tick = time.perf_counter()
    first, first_jaccards = evaluate(nb, trainer, train, val, device, a.bank)
    eval_seconds, minutes_left = time.perf_counter() - tick, a.minutes - (time.perf_counter() - start) / 60
    fitted = fit_epochs(nb, cfg, train, device, minutes_left, eval_seconds) if a.fit_epochs else None
    if fitted:
        cfg = dataclasses.replace(cfg, **fitted["settings"])   # budget_settings: the run, warm-ups cut to fit
        nb.seed_everything(cfg.seed)   # the run is then the run of --set epochs=<fitted>
        trainer = nb.DINOTrainer(cfg, len(train), device)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    result = dict(machine=machine(device), device=device.type, date=date, profile=a.profile, settings=overrides,
                  fitted=fitted,
                  config={k: v for k, v in json.loads(json.dumps(vars(cfg))).items() if not k.startswith("_")},
                  data=dict(name="ShapesDataset", train=len(train), val=len(val), knn_bank=min(a.bank, len(train)), img_size=a.img_size,
                            classes=len(nb.SHAPE_CLASSES), seconds_to_make=round(made, 1)),
                  command=" ".join(sys.argv), raw_pixel_knn=raw,
                  epochs=[dict(epoch=0, **first, loss=None, entropy=None, kl=None, images_per_s=None)])
    print(f"{a.name}: raw pixels {raw:.1f}%; init {result['epochs'][0]}", flush=True)
    train_seconds, alarms, loader, last_jaccards = 0.0, [], None, first_jaccards
    with contextlib.ExitStack() as stack:   # the readers stopped also when the run fails: Python's exit waits for them
        while trainer.epoch < cfg.epochs and train_seconds < 60 * a.minutes:
            rows, tick, images_seen = [], time.perf_counter(), 0
            if loader is None:   # one for the run, as train_dino's: its reader processes start once, timed here
                loader = stack.enter_context(nb.readers_stopped(nb.run_loader(trainer, train.images)))
            for images in itertools.islice(loader, trainer.iters_per_epoch):
                # every log_every_steps-th step and each epoch's last, as the notebook's loop logs them
                log_now = nb.is_logged(trainer)
                stats = nb.train_step(trainer, images, log_now)
                rows += [stats] if log_now else []
                images_seen += len(images)
                if train_seconds + time.perf_counter() - tick > 60 * a.minutes:
                    break
            nb.synchronize(device)
            seconds = time.perf_counter() - tick
            train_seconds += seconds
            last_epoch = (trainer.step - 1) // trainer.iters_per_epoch  # the rows' epoch, from 0, even if the budget cut it
            alarm = nb.stall_alarm(rows, cfg, last_epoch) if hasattr(nb, "stall_alarm") else None
            # null, not NaN, when the budget cut an epoch before its first logged step
            mean = lambda key: float(np.mean([r[key] for r in rows])) if rows else None
            scores, last_jaccards = evaluate(nb, trainer, train, val, device, a.bank)
            epoch = dict(epoch=round(trainer.step / trainer.iters_per_epoch, 3), **scores,
                         loss=mean("loss"), entropy=mean("entropy"), kl=mean("kl"), images_per_s=images_seen / seconds)
            result["epochs"].append(epoch)
            alarms += [dict(epoch=epoch["epoch"], message=alarm)] if alarm else []
            print(f"  epoch {epoch['epoch']:g}: " + ", ".join(f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in epoch.items()
                                                               if k != "epoch") + f" ({time.perf_counter() - start:.0f} s)", flush=True)
    # the same images at init and after: the gain's error from the paired differences, smaller than either's
    gain, gain_se = mean_and_error(last_jaccards - first_jaccards)
    result.update(minutes=(time.perf_counter() - start) / 60, train_minutes=train_seconds / 60,
                  max_entropy=float(np.log(cfg.out_dim)), alarms=alarms,
                  attention_jaccard_gain=dict(mean=gain, se=gain_se))
    print(f"attention Jaccard gain over init, paired over the same images: {gain:+.3f} +- {gain_se:.3f}")
    nb.atomic_write(out, lambda f: f.write((json.dumps(result, indent=1) + "\n").encode()))   # whole or not at all
    epochs = result["epochs"]
    attention_figure(nb, {"random init": (initial, epochs[0]["attention_jaccard"]),
                          f"trained, epoch {epochs[-1]['epoch']:g}": (trainer.teacher.backbone,
                                                                      epochs[-1]["attention_jaccard"])},
                     val, cfg, out.with_name(f"learn-{a.name}-attention.jpg"))
    print(f"wrote {out} and its attention figure")


if __name__ == "__main__":
    main()
