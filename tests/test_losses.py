"""Loss assembly: token normalization, per-example (hard-negative) KD weights."""

import torch

from latentwire.losses import hard_negative_weights
from latentwire.losses import LMHeadLoss, kd_loss


def _setup(b=3, k=2, h=8, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, k, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g)
    teacher = torch.randn(1, b, k, v, generator=g)
    targets = torch.randint(0, v, (b, k), generator=g)
    targets[1, 1] = -100
    return hidden, weight, teacher, targets


def test_unit_example_weights_equal_the_batched_kd():
    hidden, weight, teacher, targets = _setup()
    batched = kd_loss(hidden, weight, teacher, targets, 2.0)
    per_example = kd_loss(hidden, weight, teacher, targets, 2.0, example_weights=torch.ones(3))
    torch.testing.assert_close(per_example, batched, atol=1e-6, rtol=1e-6)


def test_example_weights_scale_each_example():
    hidden, weight, teacher, targets = _setup()
    w = torch.tensor([2.0, 0.5, 0.5])
    weighted = kd_loss(hidden, weight, teacher, targets, 1.0, example_weights=w)
    parts = [kd_loss(hidden[i:i + 1], weight, teacher[:, i:i + 1], targets[i:i + 1], 1.0, norm=1.0) for i in range(3)]
    expected = sum(wi * p for wi, p in zip(w, parts)) / int((targets != -100).sum())
    torch.testing.assert_close(weighted, expected, atol=1e-6, rtol=1e-6)


def test_hard_negative_weights_have_mean_one_and_favour_hard_examples():
    v = 7
    student = torch.full((2, v), -5.0)
    student[0, 3] = 5.0  # confident and right
    student[1, 2] = 5.0  # confident and wrong
    teacher = torch.zeros(2, v)
    w = hard_negative_weights(student, teacher, torch.tensor([3, 3]), alpha=2.0)
    assert torch.isclose(w.mean(), torch.tensor(1.0))
    assert w[1] > w[0]
    assert torch.equal(hard_negative_weights(student, teacher, torch.tensor([3, 3]), alpha=0.0), torch.ones(2))


def test_head_loss_applies_hard_negative_weights_only_when_asked():
    hidden, weight, teacher, targets = _setup()
    head = LMHeadLoss(torch.nn.Linear(8, 11, bias=False))
    head._head.weight.data.copy_(weight)
    teacher_hidden = torch.randn(3, 2, 8)
    plain = head(hidden, targets, teacher_hidden)["kd"]
    again = head(hidden, targets, teacher_hidden, hard_negative_alpha=0.0)["kd"]
    sharp = head(hidden, targets, teacher_hidden, hard_negative_alpha=3.0)["kd"]
    assert torch.equal(plain, again)
    assert not torch.allclose(plain, sharp)
    sharp.backward()
    assert hidden.grad is not None and hidden.grad.isfinite().all()
