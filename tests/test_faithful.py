"""Points where the notebook follows the authors' reference code (main_dino.py, utils.py, eval_linear.py)
rule for rule; each test writes the reference's rule out by hand and compares."""
import pytest
import torch

from test_train import Data, tiny_cfg


def reference_clip_gradients(model, clip):
    """utils.clip_gradients: a Python loop, one norm and one scale per parameter."""
    norms = []
    for p in model.parameters():
        if p.grad is not None:
            norm = p.grad.norm(2)
            norms.append(norm.item())
            coef = clip / (norm + 1e-6)
            if coef < 1:
                p.grad.mul_(coef)
    return norms


def test_clip_gradients_matches_the_reference_loop(nb, tmp_path):
    student, _ = nb.build_models(tiny_cfg(nb, tmp_path), torch.device("cpu"))
    twin, _ = nb.build_models(tiny_cfg(nb, tmp_path), torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    for p, q in zip(student.parameters(), twin.parameters()):
        p.grad = torch.randn(p.shape, generator=gen) * torch.rand(1, generator=gen).item() * 10
        q.grad = p.grad.clone()
    norms = nb.clip_gradients(student, 3.0)
    expected = reference_clip_gradients(twin, 3.0)
    assert torch.is_tensor(norms) and norms.tolist() == pytest.approx(expected, rel=1e-6)
    assert 0 < sum(n > 3.0 for n in expected) < len(expected)   # some clipped, some left alone
    for (name, p), q in zip(student.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0, msg=name)


def test_cancel_gradients_last_layer_only_in_the_first_epochs(nb, tmp_path):
    student, _ = nb.build_models(tiny_cfg(nb, tmp_path, norm_last_layer=False), torch.device("cpu"))
    assert [name for name, _ in student.named_parameters() if "last_layer" in name]   # there is one to freeze
    for epoch, cancelled in [(0, True), (1, False)]:
        for p in student.parameters():
            p.grad = torch.ones_like(p)
        nb.cancel_gradients_last_layer(epoch, student, freeze_last_layer=1)
        grads = {name: p.grad for name, p in student.named_parameters()}
        assert {name for name, g in grads.items() if g is None} == \
            ({name for name in grads if "last_layer" in name} if cancelled else set())


def test_teacher_stays_in_train_mode_and_its_batchnorm_uses_batch_statistics(nb, tmp_path):
    cfg = tiny_cfg(nb, tmp_path, use_bn_in_head=True)
    trainer = nb.DINOTrainer(cfg, 16, torch.device("cpu"))
    assert trainer.teacher.training and trainer.student.training
    bn = [m for m in trainer.teacher.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(bn) == cfg.head_nlayers - 1
    before = [m.running_mean.clone() for m in bn]
    captured = {}
    handle = bn[0].register_forward_hook(lambda m, inputs, out: captured.update(x=inputs[0], y=out))
    nb.train_step(trainer, torch.from_numpy(Data().images[:4]))
    handle.remove()
    assert trainer.teacher.training
    # the teacher's first BatchNorm normalised with the mean and variance of its own batch (the
    # reference's teacher is never put in eval mode), and its running statistics moved
    x, y = captured["x"], captured["y"]
    by_batch = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + bn[0].eps) * bn[0].weight + bn[0].bias
    torch.testing.assert_close(y, by_batch, rtol=1e-4, atol=1e-4)
    assert all(not torch.equal(b, m.running_mean) for b, m in zip(before, bn))


@pytest.mark.parametrize("use_bn", [True, False])
def test_batchnorm_in_the_head_becomes_sync_batchnorm_when_distributed(nb, tmp_path, use_bn):
    cfg = tiny_cfg(nb, tmp_path, use_bn_in_head=use_bn)
    # the meta device stands in for a GPU: no memory, no accelerator needed
    student, teacher = nb.build_models(cfg, torch.device("meta"), distributed=True)
    for model in (student, teacher):
        sync = [m for m in model.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
        assert len(sync) == (cfg.head_nlayers - 1 if use_bn else 0)
    for distributed, device in [(False, "meta"), (True, "cpu")]:   # one process, or CPU ranks: plain BN
        student, teacher = nb.build_models(cfg, torch.device(device), distributed=distributed)
        assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in (*student.modules(), *teacher.modules()))


def test_drop_path_drops_the_samples_the_reference_drops_for_the_same_random_numbers(nb):
    """vision_transformer.drop_path: random_tensor = keep_prob + rand, floored; x / keep_prob * random_tensor.
    The notebook drew `rand < keep_prob`, the same rate but other samples for the same numbers, so a step
    with drop path could not be compared with the authors' step by step."""
    x = torch.randn(4096, 3, 8)
    for drop_prob in (0.1, 0.5):
        torch.manual_seed(7)
        ours = nb.DropPath(drop_prob).train()(x)
        torch.manual_seed(7)
        keep_prob = 1 - drop_prob
        random_tensor = (keep_prob + torch.rand(x.shape[0], 1, 1, dtype=x.dtype)).floor_()
        reference = x.div(keep_prob) * random_tensor
        assert torch.equal(ours == 0, reference == 0)   # the same samples dropped
        assert (ours - reference).abs().max().item() <= 1e-6 * x.abs().max().item()


@pytest.mark.parametrize("capability, expected", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_bfloat16_only_where_the_gpu_computes_it(nb, monkeypatch, capability, expected):
    """torch.cuda.is_bf16_supported() counts emulation by default: True on a V100 or T4, where bfloat16 is
    slow, so float16 with its GradScaler was never chosen. And it asks the current GPU, not the trainer's."""
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert nb.amp_dtype(torch.device("cuda", 1)) == expected and asked == [torch.device("cuda", 1)]
    assert nb.amp_dtype(torch.device("cuda", 1), enabled=False) is None and nb.amp_dtype(torch.device("cpu")) is None
