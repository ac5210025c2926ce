"""Tests of the kernels package's PyTorch path (what CPU tensors run): values and gradients against float64 eager
oracles on odd shapes, the ignore/mask/all-ignored rules, chunking invariance, that the (N, V) logits are never
materialized, the backend dispatch rules, and `import kernels` without triton.

Run: pytest tests/test_kernels_reference.py      (the Triton path: tests/test_kernels_triton.py)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import kernels
from kernels import _lm_head
from tests.helpers import assert_close, grads, lm_head_inputs

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    """Every test here runs the PyTorch path, whatever the caller's environment says."""
    monkeypatch.setenv("LATENTWIRE_KERNELS", "reference")


# ---------------------------------------------------------------------------------------------------------------
# rms_calibrate
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 7, 24), (3, 33, 100)])
def test_rms_calibrate_matches_float64(dtype, shape):
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(*shape, generator=gen) * torch.rand(shape[0], 1, 1, generator=gen) * 5).to(dtype)
    x64 = x.double().requires_grad_()
    x.requires_grad_()
    upstream = torch.randn(*shape, generator=gen).to(dtype)
    y = kernels.rms_calibrate(x, 0.7)
    y64 = kernels.rms_calibrate_naive(x64, 0.7)
    assert y.dtype == dtype and kernels.last_backend("rms_calibrate") == "reference"
    assert_close(y, y64, dtype, "y")
    assert_close(grads(y, x, upstream=upstream)[0], grads(y64, x64, upstream=upstream.double())[0], dtype, "dx")


def test_rms_calibrate_hits_target_per_example_and_accepts_tensor_target():
    x = torch.randn(4, 5, 6) * torch.tensor([0.1, 1.0, 10.0, 100.0])[:, None, None]
    y = kernels.rms_calibrate(x, torch.tensor(0.25))
    rms = y.pow(2).mean(dim=(1, 2)).sqrt()
    torch.testing.assert_close(rms, torch.full((4,), 0.25), rtol=1e-4, atol=0)
    # per example, not per token: the relative scale of the slots inside an example is kept
    torch.testing.assert_close(y[2] / y[2].abs().max(), x[2] / x[2].abs().max())


def test_rms_calibrate_scaled_loss_scales_gradient():
    x = torch.randn(2, 3, 8, requires_grad=True)
    (g1,) = torch.autograd.grad(kernels.rms_calibrate(x, 1.0).pow(3).sum(), x)
    (g3,) = torch.autograd.grad(3.0 * kernels.rms_calibrate(x, 1.0).pow(3).sum(), x)
    torch.testing.assert_close(g3, 3.0 * g1)


# ---------------------------------------------------------------------------------------------------------------
# k_token_cross_entropy
# ---------------------------------------------------------------------------------------------------------------

CE_CASES = [  # dtype, rows, vocab, width, reduction, weight_grad
    (torch.float32, 1, 257, 24, "mean", True),
    (torch.float32, 7, 1000, 100, "sum", False),
    (torch.float32, 33, 4093, 24, "none", True),
    (torch.bfloat16, 7, 4093, 100, "mean", True),
    (torch.bfloat16, 33, 257, 24, "none", False),
]


@pytest.mark.parametrize("dtype,rows,vocab,width,reduction,weight_grad", CE_CASES)
def test_k_token_ce_matches_float64(dtype, rows, vocab, width, reduction, weight_grad, monkeypatch):
    monkeypatch.setattr(_lm_head, "CHUNK_BYTES", 4 * rows * 300)  # several vocabulary chunks
    hidden, weight, hidden64, weight64 = lm_head_inputs(rows, vocab, width, dtype, weight_grad)
    targets = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(2))
    targets[1::3] = -100
    loss = kernels.k_token_cross_entropy(hidden, weight, targets, reduction=reduction)
    loss64 = kernels.k_token_ce_naive(hidden64, weight64, targets, reduction=reduction)
    assert kernels.last_backend("k_token_ce") == "reference"
    assert_close(loss, loss64, dtype, "loss")
    # a loss scaled before backward (or per-row upstream gradients) must scale the gradients
    upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(3)) + 0.5
    for got, want, name in zip(grads(loss, hidden, weight, upstream=upstream),
                               grads(loss64, hidden64, weight64, upstream=upstream.double()), ("dhidden", "dweight")):
        assert got.dtype == dtype
        assert_close(got, want, dtype, name)
    if reduction == "none":
        assert (loss[1::3] == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_k_token_ce_all_ignored_is_zero_with_zero_grads(reduction):
    hidden, weight, _, _ = lm_head_inputs(5, 300, 24, torch.float32, weight_grad=True)
    targets = torch.full((5,), -100)
    loss = kernels.k_token_cross_entropy(hidden, weight, targets, reduction=reduction)
    assert torch.isfinite(loss).all() and (loss == 0).all()
    loss.sum().backward()
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()


def test_k_token_ce_ignored_rows_do_not_influence_valid_ones():
    hidden, weight, _, _ = lm_head_inputs(6, 500, 24, torch.float32)
    targets = torch.tensor([1, 2, -100, 4, -100, 6])
    loss = kernels.k_token_cross_entropy(hidden, weight, targets)
    keep = targets != -100
    loss_kept = kernels.k_token_cross_entropy(hidden[keep].detach(), weight, targets[keep])
    torch.testing.assert_close(loss, loss_kept)
    loss.backward()
    assert (hidden.grad[~keep] == 0).all() and (hidden.grad[keep] != 0).any()


def test_k_token_ce_custom_ignore_index_and_bad_targets():
    hidden, weight, _, _ = lm_head_inputs(4, 50, 8, torch.float32)
    loss = kernels.k_token_cross_entropy(hidden, weight, torch.tensor([0, 7, 7, 49]), ignore_index=7)
    want = kernels.k_token_ce_naive(hidden.detach().double(), weight.double(), torch.tensor([0, 7, 7, 49]),
                                    ignore_index=7)
    assert_close(loss, want, torch.float32, "loss")
    with pytest.raises(ValueError, match="targets must lie"):
        kernels.k_token_cross_entropy(hidden, weight, torch.tensor([0, 1, 2, 50]))
    with pytest.raises(ValueError, match="reduction"):
        kernels.k_token_cross_entropy(hidden, weight, torch.tensor([0, 1, 2, 3]), reduction="max")


def test_k_token_ce_chunking_does_not_change_result(monkeypatch):
    hidden, weight, _, _ = lm_head_inputs(33, 4093, 100, torch.float32, weight_grad=True)
    targets = torch.randint(0, 4093, (33,), generator=torch.Generator().manual_seed(4))
    results = []
    for chunk_bytes in (4 * 33 * 256, 4 * 33 * 1000, 2**30):  # 16 chunks, 5 chunks, one chunk
        monkeypatch.setattr(_lm_head, "CHUNK_BYTES", chunk_bytes)
        loss = kernels.k_token_cross_entropy(hidden, weight, targets)
        results.append((loss.detach(), *torch.autograd.grad(loss, (hidden, weight))))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op allocates (views of its inputs do not count)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs, _ = tree_flatten((args, kwargs))
        input_storages = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in input_storages:
                self.largest = max(self.largest, t.numel())
        return out


def test_k_token_ce_never_materializes_full_logits(monkeypatch):
    n_rows, vocab, width = 64, 8000, 16
    monkeypatch.setattr(_lm_head, "CHUNK_BYTES", 4 * n_rows * 1024)
    hidden, weight, _, _ = lm_head_inputs(n_rows, vocab, width, torch.float32)
    targets = torch.randint(0, vocab, (n_rows,))
    with _LargestTensor() as probe:
        kernels.k_token_cross_entropy(hidden, weight, targets).backward()
    assert probe.largest <= n_rows * 1024 < n_rows * vocab
    with _LargestTensor() as eager:
        kernels.k_token_ce_naive(hidden, weight, targets).backward()
    assert eager.largest >= n_rows * vocab  # the probe does see full logits when they exist


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_)
        return func(*args, **(kwargs or {}))


def test_k_token_ce_forward_does_gradient_work_only_when_needed(monkeypatch):
    """With grad: two GEMMs per vocabulary chunk (logits, then A += e W); under no_grad or a non-grad hidden: one."""
    monkeypatch.setattr(_lm_head, "CHUNK_BYTES", 4 * 8 * 256)
    hidden, weight, _, _ = lm_head_inputs(8, 1024, 16, torch.float32)  # 4 chunks
    targets = torch.arange(8)
    counts = []
    for grad_mode, h in ((True, hidden), (False, hidden), (True, hidden.detach())):
        with torch.set_grad_enabled(grad_mode), _CountMatmuls() as probe:
            kernels.k_token_cross_entropy(h, weight, targets)
        counts.append(probe.count)
    assert counts == [8, 4, 4]


# ---------------------------------------------------------------------------------------------------------------
# kd_softmax_loss and kd_topk_loss
# ---------------------------------------------------------------------------------------------------------------

KD_CASES = [  # dtype, rows, vocab, width, teachers, teacher_weights, tau, masked, weight_grad
    (torch.float32, 7, 1000, 24, 1, None, 1.0, False, True),
    (torch.float32, 33, 257, 100, 3, [0.2, 0.5, 0.3], 2.0, True, False),
    (torch.float32, 1, 4093, 24, 2, [3.0, 1.0], 0.5, False, False),
    (torch.bfloat16, 33, 1000, 24, 2, None, 1.5, True, True),
]


def teacher_inputs(teachers, rows, vocab, dtype, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(teachers, rows, vocab, generator=gen) * 3).to(dtype)


@pytest.mark.parametrize("dtype,rows,vocab,width,teachers,teacher_weights,tau,masked,weight_grad", KD_CASES)
def test_kd_softmax_matches_float64(dtype, rows, vocab, width, teachers, teacher_weights, tau, masked, weight_grad,
                                    monkeypatch):
    monkeypatch.setattr(_lm_head, "CHUNK_BYTES", 4 * rows * 300)
    hidden, weight, hidden64, weight64 = lm_head_inputs(rows, vocab, width, dtype, weight_grad)
    teacher_logits = teacher_inputs(teachers, rows, vocab, dtype)
    mask = (torch.arange(rows) % 3 != 1) if masked else None
    loss = 2.5 * kernels.kd_softmax_loss(hidden, weight, teacher_logits, tau, teacher_weights, mask)
    loss64 = 2.5 * kernels.kd_softmax_naive(hidden64, weight64, teacher_logits.double(), tau, teacher_weights, mask)
    assert kernels.last_backend("kd_softmax") == "reference"
    assert_close(loss, loss64, torch.float32, "loss")  # statistics are fp32 whatever the input dtype
    got_grads = grads(loss, hidden, weight)
    for got, want, name in zip(got_grads, grads(loss64, hidden64, weight64), ("dh", "dW")):
        assert_close(got, want, dtype, name)
    if masked:
        assert (got_grads[0][~mask] == 0).all()


def test_kd_softmax_all_masked_and_identical_teacher():
    hidden, weight, _, _ = lm_head_inputs(4, 300, 24, torch.float32, weight_grad=True)
    teacher = (hidden @ weight.t()).detach()[None]
    loss = kernels.kd_softmax_loss(hidden, weight, teacher, 2.0, mask=torch.zeros(4, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0 and (hidden.grad == 0).all() and (weight.grad == 0).all()
    # a teacher equal to the student gives KL = 0 and no gradient
    same = kernels.kd_softmax_loss(hidden, weight, teacher, 2.0)
    assert abs(same.item()) < 1e-6
    assert grads(same, hidden)[0].abs().max() < 1e-6


def test_kd_softmax_teacher_padding_minus_inf():
    """Teacher logits of -inf (a padded vocabulary) are probability 0, not nan."""
    hidden, weight, hidden64, weight64 = lm_head_inputs(5, 400, 16, torch.float32)
    teacher = teacher_inputs(2, 5, 400, torch.float32)
    teacher[:, :, 350:] = float("-inf")
    loss = kernels.kd_softmax_loss(hidden, weight, teacher, 1.0)
    loss64 = kernels.kd_softmax_naive(hidden64, weight64, teacher.double(), 1.0)
    assert_close(loss, loss64, torch.float32, "loss")
    assert_close(grads(loss, hidden)[0], grads(loss64, hidden64)[0], torch.float32, "dh")


def test_kd_softmax_never_materializes_full_logits(monkeypatch):
    n_rows, vocab = 32, 8000
    monkeypatch.setattr(_lm_head, "CHUNK_BYTES", 4 * n_rows * 1024)
    hidden, weight, _, _ = lm_head_inputs(n_rows, vocab, 16, torch.float32)
    teacher = teacher_inputs(2, n_rows, vocab, torch.float32)
    with _LargestTensor() as probe:
        kernels.kd_softmax_loss(hidden, weight, teacher, 2.0).backward()
    # teacher_logits is an input; nothing the op creates is a full (N, V) block
    assert probe.largest <= n_rows * 1024 < n_rows * vocab


def _topk_cache(teacher_logits, k, tau):
    log_p = torch.log_softmax(teacher_logits.double() / tau, dim=-1)
    top = log_p.topk(k, dim=-1)
    return top.indices, top.values.float()


@pytest.mark.parametrize("k,masked", [(5, False), (40, True)])
def test_kd_topk_matches_float64(k, masked, monkeypatch):
    monkeypatch.setattr(_lm_head, "CHUNK_BYTES", 4 * 7 * 256)
    hidden, weight, hidden64, weight64 = lm_head_inputs(7, 1000, 24, torch.float32, weight_grad=True)
    ids, logprobs = _topk_cache(teacher_inputs(1, 7, 1000, torch.float32)[0], k, 2.0)
    mask = (torch.arange(7) != 3) if masked else None
    loss = kernels.kd_topk_loss(hidden, weight, ids, logprobs, 2.0, mask)
    loss64 = kernels.kd_topk_naive(hidden64, weight64, ids, logprobs.double(), 2.0, mask)
    assert_close(loss, loss64, torch.float32, "loss")
    for got, want, name in zip(grads(loss, hidden, weight), grads(loss64, hidden64, weight64), ("dh", "dW")):
        assert_close(got, want, torch.float32, name)


def test_kd_topk_with_k_equal_vocab_equals_dense(monkeypatch):
    monkeypatch.setattr(_lm_head, "CHUNK_BYTES", 4 * 7 * 256)
    hidden, weight, _, _ = lm_head_inputs(7, 257, 24, torch.float64, weight_grad=True)
    teacher = teacher_inputs(1, 7, 257, torch.float64)
    ids = torch.argsort(torch.rand(7, 257, generator=torch.Generator().manual_seed(6)), dim=1)  # any order
    logprobs = torch.log_softmax(teacher[0] / 1.5, dim=-1).gather(1, ids)
    sparse = kernels.kd_topk_loss(hidden, weight, ids, logprobs, 1.5)
    dense = kernels.kd_softmax_loss(hidden, weight, teacher, 1.5)
    torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads(sparse, hidden, weight), grads(dense, hidden, weight)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_kd_topk_rejects_duplicate_ids():
    hidden, weight, _, _ = lm_head_inputs(2, 50, 8, torch.float32)
    ids = torch.tensor([[1, 2, 3], [4, 4, 5]])
    with pytest.raises(ValueError, match="distinct"):
        kernels.kd_topk_loss(hidden, weight, ids, torch.full((2, 3), -2.0))


# ---------------------------------------------------------------------------------------------------------------
# dispatch and packaging
# ---------------------------------------------------------------------------------------------------------------


def test_backend_selection_rules(monkeypatch):
    cpu32 = torch.zeros(1)
    monkeypatch.delenv("LATENTWIRE_KERNELS")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert kernels.select_backend(cpu32) == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.select_backend(cpu32) == ("triton" if kernels.triton_available() else "reference")
    assert kernels.select_backend(cpu32.double()) == "reference"  # the kernels take fp32 / bf16 / fp16
    monkeypatch.setenv("LATENTWIRE_KERNELS", "reference")
    assert kernels.select_backend(cpu32) == "reference"
    monkeypatch.setenv("LATENTWIRE_KERNELS", "fast")
    with pytest.raises(ValueError, match="LATENTWIRE_KERNELS"):
        kernels.select_backend(cpu32)
    if kernels.triton_available():
        monkeypatch.setenv("LATENTWIRE_KERNELS", "triton")
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            kernels.select_backend(cpu32)


def test_triton_on_cpu_without_interpreter_fails_with_a_clear_message(monkeypatch):
    """In a process that imported triton without TRITON_INTERPRET=1, asking for the interpreter later cannot work."""
    if not kernels.triton_available():
        pytest.skip("triton not installed")
    from triton.runtime.interpreter import InterpretedFunction

    from kernels.k_token_ce import _k_token_ce_online_kernel
    if isinstance(_k_token_ce_online_kernel, InterpretedFunction):
        pytest.skip("this process runs the interpreter already")
    monkeypatch.setenv("LATENTWIRE_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    hidden, weight, _, _ = lm_head_inputs(3, 20, 8, torch.float32)
    with pytest.raises(RuntimeError, match="before anything imports triton"):
        kernels.k_token_cross_entropy(hidden, weight, torch.tensor([1, 2, 3]))


def test_import_kernels_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, kernels\n"
        "assert not kernels.triton_available()\n"
        "h = torch.randn(3, 8, requires_grad=True); w = torch.randn(20, 8)\n"
        "kernels.k_token_cross_entropy(h, w, torch.tensor([1, 2, 3])).backward()\n"
        "kernels.kd_softmax_loss(h, w, torch.randn(1, 3, 20)).backward()\n"
        "kernels.rms_calibrate(torch.randn(2, 3, 4), 1.0)\n"
        "print('ok', kernels.last_backend('k_token_ce'))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), LATENTWIRE_KERNELS="", TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok reference"
