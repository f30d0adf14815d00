"""CapturedStep, the CUDA-graph step, without a GPU: torch.cuda's streams, graph and device switch are
replaced by recorders, model_step by a stub, so what is checked is where the step records and replays, and
when it records anew. Whether a replayed graph computes the eager step's numbers needs a GPU:
tests/benchmarks/check_graphs.py, run by gpu_checks.sh."""
import contextlib
import types

import pytest
import torch


class FakeCuda:
    """The torch.cuda calls CapturedStep makes, each recorded with the device it names."""
    def __init__(self):
        self.calls, self.current = [], torch.device("cuda", 0)

    @contextlib.contextmanager
    def device(self, device):
        previous, self.current = self.current, torch.device(device)
        self.calls.append(("device", self.current))
        try:
            yield
        finally:
            self.current = previous

    def Stream(self, device=None):
        stream = types.SimpleNamespace(device=torch.device(device) if device is not None else self.current,
                                       wait_stream=lambda other: None)
        self.calls.append(("Stream", stream.device))
        return stream

    def current_stream(self, device=None):
        self.calls.append(("current_stream", torch.device(device) if device is not None else self.current))
        return self.Stream(device)

    @contextlib.contextmanager
    def stream(self, stream):
        yield

    def graph(self, graph, stream=None, capture_error_mode="global"):
        self.calls.append(("graph", stream.device if stream is not None else "the class's stream"))
        return contextlib.nullcontext()

    def CUDAGraph(self):
        return types.SimpleNamespace(replay=lambda: self.calls.append(("replay", self.current)))

    def empty_cache(self):
        pass


@pytest.fixture
def step(nb, monkeypatch):
    """A CapturedStep of a trainer on cuda:1 while cuda:0 is current; model_step counts its calls."""
    fake, ran = FakeCuda(), []
    for name in ("device", "Stream", "current_stream", "stream", "graph", "CUDAGraph", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    monkeypatch.setattr(nb, "model_step", lambda trainer, crops: ran.append(trainer.epoch) or {"loss": len(ran)})
    trainer = types.SimpleNamespace(device=torch.device("cuda", 1), epoch=0, cfg=types.SimpleNamespace(freeze_last_layer=1),
                                    loss=types.SimpleNamespace(teacher_temp=lambda epoch: 0.04 if epoch < 2 else 0.07),
                                    optimizer=types.SimpleNamespace(zero_grad=lambda set_to_none: None))
    return nb.CapturedStep(trainer), trainer, fake, ran


def test_it_records_and_replays_on_the_trainers_gpu_not_the_current_one(step):
    """device: cuda:1 with cuda:0 current: the streams, the capture and the replays were cuda:0's (the
    notebook never calls set_device), so the graph captured nothing of the step on cuda:1."""
    captured, trainer, fake, ran = step
    crops = [torch.zeros(2, 3, 8, 8)]
    for _ in range(5):
        captured(crops)
    assert len(ran) == 3   # two eager steps, then one recorded; the last two replayed
    assert [name for name, _ in fake.calls].count("replay") == 3
    named = {name for name, _ in fake.calls}
    assert {"device", "Stream", "current_stream", "graph", "replay"} <= named
    assert all(device == trainer.device for _, device in fake.calls), fake.calls


def test_a_new_key_records_a_new_graph(step):
    """The epoch's teacher temperature, the frozen last layer and the crop shapes are baked into a graph:
    a change of any runs two eager steps and records again."""
    captured, trainer, fake, ran = step
    crops = [torch.zeros(2, 3, 8, 8)]
    for epoch in (0, 0, 0, 1, 1, 1, 2, 2, 2, 2):   # epoch 1: the last layer thaws; epoch 2: the temperature
        trainer.epoch = epoch
        captured(crops)
    captured([torch.zeros(2, 3, 16, 16)])   # another crop shape
    assert ran == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]   # every key: 2 eager steps and 1 recording
    assert [name for name, _ in fake.calls].count("graph") == 3
