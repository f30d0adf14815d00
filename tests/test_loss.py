"""The DINO loss: value against a direct per-pair computation, centre update, temperature schedule,
collapse diagnostics."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F


def make_loss(nb, out_dim=16, ncrops=5, warmup=0.04, final=0.07, warmup_epochs=3, nepochs=6, **kw):
    return nb.DINOLoss(out_dim, ncrops, warmup, final, warmup_epochs, nepochs, **kw)


def reference_loss(student, teacher, center, ncrops, student_temp, teacher_temp):
    """The reference implementation's double loop, written out directly."""
    student_chunks = (student / student_temp).chunk(ncrops)
    teacher_chunks = F.softmax((teacher - center) / teacher_temp, dim=-1).chunk(2)
    total, n_terms = 0.0, 0
    for i, q in enumerate(teacher_chunks):
        for v, s in enumerate(student_chunks):
            if v == i:
                continue
            total += torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
            n_terms += 1
    return total / n_terms


@pytest.mark.parametrize("ncrops,batch", [(2, 3), (5, 4), (12, 2)])
def test_loss_matches_per_pair_computation(nb, ncrops, batch):
    torch.manual_seed(ncrops)
    loss_fn = make_loss(nb, ncrops=ncrops)
    loss_fn.center.copy_(torch.randn(1, 16))  # a non-zero centre takes part too
    student = torch.randn(ncrops * batch, 16) * 3
    teacher = torch.randn(2 * batch, 16) * 3
    expected = reference_loss(student, teacher, loss_fn.center.clone(), ncrops, 0.1, loss_fn.teacher_temp(1))
    assert torch.allclose(loss_fn(student, teacher, epoch=1), expected, rtol=1e-5, atol=1e-6)


def test_gradient_matches_per_pair_computation_and_teacher_gets_none(nb):
    torch.manual_seed(0)
    loss_fn = make_loss(nb, ncrops=4)
    student = torch.randn(4 * 3, 16, requires_grad=True)
    teacher = torch.randn(2 * 3, 16, requires_grad=True)
    loss_fn(student, teacher, epoch=0).backward()
    student_ref = student.detach().clone().requires_grad_(True)
    reference_loss(student_ref, teacher.detach(), torch.zeros(1, 16), 4, 0.1, 0.04).backward()
    assert torch.allclose(student.grad, student_ref.grad, atol=1e-6)
    assert teacher.grad is None


def test_same_view_pairs_are_excluded(nb):
    """Student crop v equal to teacher crop v costs nothing extra: only cross-view pairs count."""
    torch.manual_seed(1)
    batch, k = 3, 8
    loss_fn = make_loss(nb, out_dim=k, ncrops=2, warmup=0.1, final=0.1, warmup_epochs=0, nepochs=1)
    teacher = torch.randn(2 * batch, k)
    # With student_temp == teacher_temp, student crop i reproduces teacher crop i exactly.
    same = loss_fn(teacher.clone(), teacher, epoch=0)
    t0, t1 = F.softmax(teacher / 0.1, -1).chunk(2)
    s0, s1 = F.log_softmax(teacher / 0.1, -1).chunk(2)
    cross_only = 0.5 * (-(t0 * s1).sum(-1).mean() - (t1 * s0).sum(-1).mean())
    with_same_view = 0.25 * (-(t0 * s0).sum(-1).mean() - (t1 * s1).sum(-1).mean()) + 0.5 * cross_only
    assert torch.allclose(same, cross_only, atol=1e-6)
    assert not torch.allclose(same, with_same_view, atol=1e-3)
    # Swapping the two student global crops changes the loss: pairing is by view.
    swapped = torch.cat(teacher.chunk(2)[::-1])
    loss_fn.center.zero_()
    assert loss_fn(swapped, teacher, epoch=0) < same - 1e-3


def test_center_update_is_ema_of_teacher_batch_mean(nb):
    torch.manual_seed(2)
    loss_fn = make_loss(nb, ncrops=3, center_momentum=0.8)
    assert loss_fn.center.shape == (1, 16) and torch.all(loss_fn.center == 0)
    assert "center" in dict(loss_fn.named_buffers())
    teachers = [torch.randn(2 * 4, 16) for _ in range(3)]
    expected = torch.zeros(1, 16)
    for teacher in teachers:
        loss_fn(torch.randn(3 * 4, 16), teacher, epoch=0)
        expected = 0.8 * expected + 0.2 * teacher.mean(0, keepdim=True)
        assert torch.allclose(loss_fn.center, expected, atol=1e-6)
    # The centre is applied before the next softmax: the loss depends on it.
    loss_with_center = make_loss(nb, ncrops=3)
    loss_with_center.center.copy_(expected)
    student, teacher = torch.randn(12, 16), torch.randn(8, 16)
    a = loss_with_center(student, teacher, epoch=0)
    b = make_loss(nb, ncrops=3)(student, teacher, epoch=0)
    assert not torch.allclose(a, b)


def test_teacher_temperature_schedule(nb):
    loss_fn = make_loss(nb, warmup=0.04, final=0.07, warmup_epochs=4, nepochs=10)
    schedule = loss_fn.teacher_temp_schedule
    assert len(schedule) == 10
    np.testing.assert_allclose(schedule[:4], np.linspace(0.04, 0.07, 4))
    np.testing.assert_allclose(schedule[4:], 0.07)
    assert loss_fn.teacher_temp(0) == pytest.approx(0.04)
    assert loss_fn.teacher_temp(2.9) == pytest.approx(schedule[2])   # float epochs: int index
    assert loss_fn.teacher_temp(25) == pytest.approx(0.07)           # past the end: last value
    # no warm-up (the demo profile), and a warm-up longer than training
    assert np.allclose(nb.teacher_temperature_schedule(0.04, 0.04, 0, 5), 0.04)
    short = nb.teacher_temperature_schedule(0.04, 0.07, 30, 10)
    assert len(short) == 10 and short[0] == pytest.approx(0.04) and short[-1] < 0.07


def test_temperature_is_used(nb):
    """A colder teacher is sharper: the loss changes with the epoch during warm-up."""
    torch.manual_seed(3)
    student, teacher = torch.randn(4 * 2, 16), torch.randn(2 * 2, 16)
    early = make_loss(nb, ncrops=4)(student, teacher, epoch=0)
    late = make_loss(nb, ncrops=4)(student, teacher, epoch=5)
    expected_late = reference_loss(student, teacher, torch.zeros(1, 16), 4, 0.1, 0.07)
    assert torch.allclose(late, expected_late, atol=1e-6) and not torch.allclose(early, late)


def test_diagnostics_uniform_teacher_and_identical_distributions(nb):
    k, batch = 32, 4
    loss_fn = make_loss(nb, out_dim=k, ncrops=4, warmup=0.1, final=0.1, warmup_epochs=0, nepochs=1)
    constant = torch.full((2 * batch, k), 0.3)
    stats = nb.dino_diagnostics(loss_fn, torch.randn(4 * batch, k), constant, epoch=0)
    assert stats["entropy"] == pytest.approx(math.log(k), abs=1e-5)
    assert stats["center_norm"] == 0.0
    # every crop of an image has the same output: student == teacher distribution in every pair
    torch.manual_seed(4)
    one_view = torch.randn(batch, k)
    teacher, student = one_view.repeat(2, 1), one_view.repeat(4, 1)
    stats = nb.dino_diagnostics(loss_fn, student, teacher, epoch=0)
    assert stats["kl"] == pytest.approx(0.0, abs=1e-5)
    assert 0 < stats["entropy"] < math.log(k)
    # diagnostics do not move the centre; KL >= 0 and equals loss - entropy
    student = torch.randn(4 * batch, k)
    stats = nb.dino_diagnostics(loss_fn, student, teacher, epoch=0)
    assert torch.all(loss_fn.center == 0)
    loss = loss_fn(student, teacher, epoch=0).item()
    assert stats["kl"] > 0 and stats["kl"] == pytest.approx(loss - stats["entropy"], abs=1e-5)
    assert nb.dino_diagnostics(loss_fn, student, teacher, 0)["center_norm"] > 0


def test_diagnostics_kl_against_direct_pairs(nb):
    torch.manual_seed(5)
    k, batch = 8, 3
    loss_fn = make_loss(nb, out_dim=k, ncrops=3)
    student, teacher = torch.randn(3 * batch, k), torch.randn(2 * batch, k)
    p = F.softmax(teacher / 0.04, -1).chunk(2)
    log_q = F.log_softmax(student / 0.1, -1).chunk(3)
    kls = [F.kl_div(log_q[v], p[i], reduction="batchmean") for i in range(2) for v in range(3) if v != i]
    stats = nb.dino_diagnostics(loss_fn, student, teacher, epoch=0)
    assert stats["kl"] == pytest.approx(torch.stack(kls).mean().item(), rel=1e-4, abs=1e-5)
    entropy = -(p[0] * p[0].clamp_min(1e-30).log()).sum(-1).mean() / 2 \
              - (p[1] * p[1].clamp_min(1e-30).log()).sum(-1).mean() / 2
    assert stats["entropy"] == pytest.approx(entropy.item(), rel=1e-4, abs=1e-5)


def test_loss_under_autocast_is_float32(nb):
    torch.manual_seed(6)
    loss_fn = make_loss(nb, ncrops=3)
    student, teacher = torch.randn(6, 16), torch.randn(4, 16)
    expected = reference_loss(student, teacher, torch.zeros(1, 16), 3, 0.1, 0.04)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(student.bfloat16(), teacher.bfloat16(), epoch=0)
    assert loss.dtype == torch.float32
    bf16_expected = reference_loss(student.bfloat16().float(), teacher.bfloat16().float(),
                                   torch.zeros(1, 16), 3, 0.1, 0.04)
    assert torch.allclose(loss, bf16_expected, atol=1e-5) and torch.allclose(loss, expected, rtol=0.05)


def dinov2_sinkhorn_knopp(teacher_output, teacher_temp, n_iterations=3):
    """DINOv2's sinkhorn_knopp_teacher (dinov2/loss/dino_clstoken_loss.py) for one process, written out:
    Q = exp(t / temp), K x B, made to sum to 1, then rows to 1/K and columns to 1/B, 3 times; columns x B."""
    q = torch.exp(teacher_output.double() / teacher_temp).t()
    prototypes, batch = q.shape
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= batch
    return (q * batch).t()


@pytest.mark.parametrize("temp", [0.04, 0.07])
def test_sinkhorn_knopp_equals_dinov2s_formula(nb, temp):
    logits = torch.randn(12, 64, generator=torch.Generator().manual_seed(3))
    ours = nb.sinkhorn_knopp(logits / temp).exp()
    theirs = dinov2_sinkhorn_knopp(logits, temp).float()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(ours.sum(1), torch.ones(12))               # each sample a distribution
    assert ours.sum(0).std() < logits.softmax(1).sum(0).std()              # prototypes used more evenly


def test_sinkhorn_knopp_survives_scores_that_overflow_exp(nb):
    """Unnormalised heads give large logits: exp(logit / 0.04) overflows float32, the log-space form does not."""
    logits = 40 * torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    probs = nb.sinkhorn_knopp(logits / 0.04).exp()
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(1), torch.ones(8), atol=1e-5)


def test_sinkhorn_centering_loss_and_no_centre(nb):
    loss_fn = nb.DINOLoss(16, 4, 0.04, 0.04, 0, 1, centering="sinkhorn_knopp")
    student, teacher = torch.randn(4 * 3, 16), torch.randn(2 * 3, 16)
    loss, entropy = loss_fn(student, teacher, epoch=0, with_entropy=True)
    t = nb.sinkhorn_knopp(teacher / 0.04).exp().chunk(2)
    s = torch.log_softmax(student / 0.1, dim=-1).chunk(4)
    pairs = [-(ti * sv).sum(-1).mean() for i, ti in enumerate(t) for v, sv in enumerate(s) if v != i]
    assert abs(loss.item() - torch.stack(pairs).mean().item()) < 1e-5
    assert abs(entropy.item() - torch.special.entr(torch.cat(t)).sum(-1).mean().item()) < 1e-5
    assert torch.equal(loss_fn.center, torch.zeros(1, 16))                # no running centre with Sinkhorn-Knopp
    with pytest.raises(ValueError, match="centering='median'"):
        nb.DINOLoss(16, 4, 0.04, 0.04, 0, 1, centering="median")


def split_head_loss(nb, centering, ncrops, batch, out_dim=64, seed=0):
    """The loss and the head's gradients, from the logits and from the split last layer."""
    torch.manual_seed(seed)
    head = nb.DINOHead(12, out_dim, hidden_dim=24, bottleneck_dim=8, norm_last_layer=False)
    features, teacher = torch.randn(ncrops * batch, 12), 3 * torch.randn(2 * batch, out_dim)
    results = []
    for split in (False, True):
        loss_fn = make_loss(nb, out_dim, ncrops, centering=centering)
        loss_fn.center.copy_(0.1 * torch.arange(out_dim).view(1, -1) / out_dim)
        head.zero_grad()
        student = (head.embed(features), head.last_layer.weight) if split else head(features)
        loss, entropy = loss_fn(student, teacher, epoch=1, with_entropy=True)
        loss.backward()
        results.append((loss, entropy, loss_fn.center.clone(), [p.grad.clone() for p in head.parameters()]))
    return results


@pytest.mark.parametrize("centering", ["mean", "sinkhorn_knopp"])
@pytest.mark.parametrize("ncrops,batch", [(2, 3), (6, 4), (12, 2)])
def test_the_loss_from_the_split_last_layer_equals_the_loss_from_the_logits(nb, centering, ncrops, batch):
    (loss, entropy, center, grads), (split_loss, split_entropy, split_center, split_grads) = \
        split_head_loss(nb, centering, ncrops, batch)
    assert abs(loss.item() - split_loss.item()) <= 1e-5 * max(1.0, abs(loss.item()))
    assert entropy.item() == split_entropy.item() and torch.equal(center, split_center)
    for grad, split_grad in zip(grads, split_grads):
        assert (grad - split_grad).abs().max() <= 1e-5 * grad.abs().max().clamp(min=1e-6)
    assert any(g.abs().max() > 0 for g in grads)


def test_the_training_step_never_forms_the_students_logits(nb, tmp_path):
    """model_step hands the loss the last layer's inputs: the student's last layer is never called, the
    teacher's is (once, on its two global crops)."""
    cfg = nb.make_config("demo", checkpoint_dir=str(tmp_path), batch_size=4, n_local_crops=2, out_dim=64)
    trainer = nb.DINOTrainer(cfg, 8, torch.device("cpu"))
    calls = {"student": 0, "teacher": 0}
    for name in calls:
        getattr(trainer, name).head.last_layer.register_forward_hook(
            lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    stats = nb.train_step(trainer, torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8))
    assert calls == {"student": 0, "teacher": 1} and math.isfinite(stats["loss"])


def test_split_last_layer_under_bfloat16_autocast_follows_the_unsplit_product(nb):
    """Under autocast the split head hands both factors over in bfloat16, as the last layer multiplies them."""
    torch.manual_seed(0)
    wrapper = nb.MultiCropWrapper(torch.nn.Identity(), nb.DINOHead(16, 128, hidden_dim=32, bottleneck_dim=8))
    crops = [torch.randn(3, 16), torch.randn(3, 16)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = wrapper(crops)
        embeddings, weight = wrapper(crops, split_last_layer=True)
    assert embeddings.dtype == weight.dtype == logits.dtype == torch.bfloat16
    assert torch.equal(embeddings @ weight.t(), logits)


def test_split_loss_under_bfloat16_matches_the_unsplit_within_bfloat16_rounding(nb):
    """The bfloat16 step (GPU autocast) through the split loss: loss and gradients as the logits path's,
    within what bfloat16 rounding moves (both are compared with float32)."""
    torch.manual_seed(0)
    wrapper = nb.MultiCropWrapper(torch.nn.Identity(), nb.DINOHead(16, 256, hidden_dim=32, bottleneck_dim=8,
                                                                   norm_last_layer=False))
    crops, teacher = [torch.randn(4, 16) for _ in range(6)], torch.randn(8, 256)
    results = {}
    for name, split, amp in (("float32", False, False), ("logits", False, True), ("split", True, True)):
        loss_fn = make_loss(nb, 256, 6)
        wrapper.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            student = wrapper(crops, split_last_layer=split)
        loss = loss_fn(student, teacher, epoch=0)
        loss.backward()
        results[name] = (loss.item(), torch.cat([p.grad.flatten() for p in wrapper.parameters() if p.grad is not None]))
    exact_loss, exact_grad = results["float32"]
    errors = {name: (abs(loss - exact_loss), ((grad - exact_grad).norm() / exact_grad.norm()).item())
              for name, (loss, grad) in results.items() if name != "float32"}
    assert errors["logits"][1] > 0   # bfloat16 did round
    assert errors["split"][0] <= 2 * errors["logits"][0] + 1e-3
    assert errors["split"][1] <= 2 * errors["logits"][1] + 1e-3, errors


def test_koleo_is_minus_the_mean_log_distance_to_the_nearest_other_feature(nb):
    """DINOv2's KoLeo term against a direct computation with all pairwise distances; the features'
    lengths do not matter (they are normalised first)."""
    torch.manual_seed(0)
    features = torch.randn(16, 8)
    unit = F.normalize(features, dim=-1)
    distances = torch.cdist(unit, unit) + torch.diag(torch.full((16,), float("inf")))
    expected = -torch.log(distances.min(dim=1).values).mean()
    assert abs(nb.koleo_loss(features).item() - expected.item()) < 1e-5
    assert abs(nb.koleo_loss(3 * features).item() - expected.item()) < 1e-5
    spread, bunched = torch.eye(8), torch.eye(8) + 5.0           # far apart vs all alike: the term is larger
    assert nb.koleo_loss(bunched).item() > nb.koleo_loss(spread).item() + 1


def test_koleo_weight_changes_the_update_not_the_dino_loss_read_back(nb, tmp_path):
    """With koleo_weight > 0 the step's read-back loss is still DINO's alone (the logged loss and KL stay
    comparable across settings), while the update differs: the KoLeo term has a gradient."""
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    runs = {}
    for weight in (0.0, 0.5):
        cfg = nb.make_config("demo", checkpoint_dir=str(tmp_path / str(weight)), batch_size=4, n_local_crops=2,
                             out_dim=64, koleo_weight=weight)
        nb.seed_everything(0)
        trainer = nb.DINOTrainer(cfg, 8, torch.device("cpu"))
        trainer.schedules["lr"][:] = 1e-3                           # a step that moves the weights
        stats = nb.train_step(trainer, images)
        runs[weight] = stats["loss"], trainer.student.backbone.cls_token.detach().clone()
    assert abs(runs[0.0][0] - runs[0.5][0]) < 1e-6
    assert (runs[0.0][1] - runs[0.5][1]).abs().max() > 1e-6
