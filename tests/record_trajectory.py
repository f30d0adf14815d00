"""Record (or compare against) the float32 CPU trajectory of the training step.

The step's numerics are pinned by a recording: 10 steps of a small run through the warm-up, the frozen
last layer, the teacher-temperature warm-up, drop path and the EMA, made with a step that equals the authors'
`train_one_epoch` step by step (`tests/benchmarks/check_official_step.py`, on demand with a checkout of
their code; its figures are in `tests/benchmarks/results/check_official_step.txt`). `tests/test_trajectory.py` replays it after
every change. Run this file only to make a new recording, after a deliberate change of the numerics:
    python tests/record_trajectory.py   (writes tests/data/step_trajectory.json)
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
RECORDING = HERE / "data" / "step_trajectory.json"
SAMPLES = 8   # values kept per tensor, at fixed positions


def trajectory_config(nb, checkpoint_dir):
    """10 steps: 2 per epoch for 5 epochs, warm-up 1 epoch, last layer frozen for 1, temperature 0.04 ->
    0.07 over 2, a weight-normalised last layer with a free magnitude, drop path, 2 local crops."""
    return nb.make_config("demo", patch_size=16, out_dim=256, head_hidden_dim=64, head_bottleneck_dim=32,
                          batch_size=4, n_local_crops=2, epochs=5, warmup_epochs=1, freeze_last_layer=1,
                          warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=2,
                          norm_last_layer=False, drop_path_rate=0.1, momentum_teacher=0.99, base_lr=4e-3,
                          max_train_images=0, checkpoint_dir=str(checkpoint_dir))


def images():
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, (8, 3, 64, 64), dtype=np.uint8))


def run(nb, checkpoint_dir):
    """(losses of the 10 steps, the trainer after them), float32 on the CPU, one thread."""
    with nb.one_thread():
        cfg = trajectory_config(nb, checkpoint_dir)
        nb.seed_everything(cfg.seed)
        trainer = nb.DINOTrainer(cfg, 8, torch.device("cpu"))
        data, losses = images(), []
        for step in range(10):
            batch = data[:4] if step % 2 == 0 else data[4:]
            losses.append(float(nb.train_step(trainer, batch)["loss"]))
        return losses, trainer


def samples(tensor):
    flat = tensor.detach().double().flatten()
    positions = np.linspace(0, flat.numel() - 1, min(SAMPLES, flat.numel())).round().astype(np.int64)
    return dict(norm=flat.norm().item(), sum=flat.sum().item(), values=flat[positions].tolist())


def compared(state):
    """The floating tensors of a state dict, but the key third of each attention's qkv bias: softmax ignores a
    shift shared by every key, so that bias's gradient is zero but for rounding, and AdamW turns rounding noise
    into steps of up to the learning rate. After the 10 steps it differs by up to 3.1e-5 between torch's CPU
    kernels and MKL's code paths (AVX-512 against AVX2, none, or MKL_CBWR=COMPATIBLE; every other value by up
    to 2.1e-7), so the query and value thirds are compared on their own."""
    for name, tensor in state.items():
        if name.endswith("attn.qkv.bias"):
            query, _, value = tensor.chunk(3)
            yield f"{name}[query]", query
            yield f"{name}[value]", value
        elif tensor.is_floating_point():
            yield name, tensor


def summary(trainer):
    models = dict(student=trainer.student, teacher=trainer.teacher, loss=trainer.loss)
    return {name: {k: samples(v) for k, v in compared(model.state_dict())} for name, model in models.items()}


def largest_gaps(losses, after, recorded):
    """(largest loss difference, (largest weight difference, its tensor)) of a replay against a recording; a
    tensor's difference is that of its sampled values, or of its norm relative to max(1, norm). A value that
    is not finite on either side is an infinite difference (max() passes NaN by, as no difference)."""
    def gap(got, recorded):
        got, recorded = np.asarray(got, np.float64), np.asarray(recorded, np.float64)
        if got.shape != recorded.shape or not (np.isfinite(got).all() and np.isfinite(recorded).all()):
            return np.inf
        return float(np.abs(got - recorded).max())
    loss_gap = gap(losses, recorded["losses"])
    worst = (0.0, None)
    for model, tensors in recorded["after_10_steps"].items():
        assert set(after[model]) == set(tensors), model
        for name, rec in tensors.items():
            got = after[model][name]
            norm_gap = gap(got["norm"], rec["norm"]) / max(1.0, abs(rec["norm"])) if np.isfinite(rec["norm"]) else np.inf
            worst = max(worst, (max(gap(got["values"], rec["values"]), norm_gap), f"{model}.{name}"),
                        key=lambda w: w[0])
    return loss_gap, worst


if __name__ == "__main__":
    import argparse
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()   # --help, and no stray argument
    sys.path.insert(0, str(HERE))
    from nbloader import load_notebook
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        losses, trainer = run(load_notebook(), folder)
    RECORDING.write_text(json.dumps(dict(losses=losses, after_10_steps=summary(trainer)), indent=0) + "\n")
    print(f"wrote {RECORDING}: losses {[round(x, 5) for x in losses]}")
