"""The float32 CPU training step keeps its numerics through every speed change: 10 recorded steps
(tests/record_trajectory.py) are replayed and compared, loss by loss, and for every tensor of both
networks and the loss its norm and 8 values at fixed positions. The step equals the authors'
train_one_epoch step by step (tests/benchmarks/check_official_step.py, run on demand with a checkout of
their code: 12 steps with drop path, losses within 2.4e-6, weights within 5e-7); the step's parts are also checked
against the reference's formulas in test_faithful.py and test_loss.py."""
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


def test_the_recording_and_the_replay_moved_what_a_step_moves(replay):
    """Both are of a real run (a step that did nothing could not be told from a recording of one): the loss
    changes every step, the teacher is not the student, and the loss's centre left zero."""
    recorded = json.loads(RECORDING.read_text())
    for run_losses, after in [(recorded["losses"], recorded["after_10_steps"]), replay]:
        assert len(set(round(x, 4) for x in run_losses)) == 10
        assert after["student"]["backbone.cls_token"]["values"] != after["teacher"]["backbone.cls_token"]["values"]
        assert any(v["norm"] > 0 for v in after["loss"].values())
