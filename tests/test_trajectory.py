"""The float32 CPU training step keeps its numerics through every speed change: 10 recorded steps
(tests/record_trajectory.py, made with the step that was checked against the authors' train_one_epoch)
are replayed and compared, loss by loss and weight by weight."""
import json

import numpy as np
import pytest

from record_trajectory import RECORDING, run, summary

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def replay(nb, tmp_path_factory):
    losses, trainer = run(nb, tmp_path_factory.mktemp("trajectory"))
    return losses, summary(trainer)


def test_the_ten_losses_equal_the_recording(replay):
    recorded = json.loads(RECORDING.read_text())["losses"]
    losses, _ = replay
    assert len(losses) == len(recorded) == 10
    gap = max(abs(a - b) for a, b in zip(losses, recorded))
    assert gap <= TOLERANCE, f"largest loss difference {gap:.2e} over 10 steps"


def test_the_weights_after_ten_steps_equal_the_recording(replay):
    recorded = json.loads(RECORDING.read_text())["after_10_steps"]
    _, now = replay
    worst = (0.0, None)
    for model, tensors in recorded.items():
        assert set(now[model]) == set(tensors), model
        for name, rec in tensors.items():
            got = now[model][name]
            gap = max(np.abs(np.subtract(got["values"], rec["values"])).max(),
                      abs(got["norm"] - rec["norm"]) / max(1.0, rec["norm"]))
            worst = max(worst, (gap, f"{model}.{name}"), key=lambda w: w[0])
    assert worst[0] <= TOLERANCE, f"largest weight difference {worst[0]:.2e} at {worst[1]}"


def test_the_recording_moved_what_a_step_moves(replay):
    """The recording is of a real run: the loss changes and the teacher left its initial weights."""
    recorded = json.loads(RECORDING.read_text())
    assert len(set(round(x, 4) for x in recorded["losses"])) == 10
    student, teacher = recorded["after_10_steps"]["student"], recorded["after_10_steps"]["teacher"]
    assert student["backbone.cls_token"]["values"] != teacher["backbone.cls_token"]["values"]
    assert any(v["norm"] > 0 for v in recorded["after_10_steps"]["loss"].values())
