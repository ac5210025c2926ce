"""Tests of the kernels package's Triton path: values and gradients against float64 eager oracles, on CPU through
the Triton interpreter and, behind the `gpu` marker, compiled on CUDA.

triton picks interpreter or compiler once, when `triton.language` is first imported (its own helpers such as
tl.sum are jit functions built then), and pytest has usually imported triton (through `kernels`) long before this
module runs. So the interpreter cases run in one child process started with TRITON_INTERPRET=1 (and no
LATENTWIRE_KERNELS, so the automatic dispatch has to pick Triton for CPU tensors); each test below reports one
case's verdict from that child. The CUDA variants run the same case functions in-process.

Run: pytest tests/test_kernels_triton.py            (GPU: pytest -m gpu tests/test_kernels_triton.py)
     python tests/test_kernels_triton.py --run-cases OUT.json   (the child, by hand; needs TRITON_INTERPRET=1)
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # the child runs this file as a script
    sys.path.insert(0, str(REPO_ROOT))

import kernels  # noqa: E402
from kernels import _lm_head  # noqa: E402
from tests.helpers import assert_close, grads, lm_head_inputs  # noqa: E402

CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def ran_triton(op, kernel_names, before):
    """The op dispatched to Triton and each named kernel was launched since the `before` counts."""
    assert kernels.last_backend(op) == "triton", f"{op} ran {kernels.last_backend(op)}, not triton"
    after = kernels.triton_launch_counts()
    for name in kernel_names:
        assert after.get(name, 0) > before.get(name, 0), f"{name} was not launched"


# ---------------------------------------------------------------------------------------------------------------
# Cases: each takes the device, raises AssertionError on a mismatch.
# ---------------------------------------------------------------------------------------------------------------


def _rms(device, dtype, shape, chunk):
    rms_module = importlib.import_module("kernels.rms_calibrate")
    old_chunk, rms_module.RMS_CHUNK = rms_module.RMS_CHUNK, chunk
    try:
        gen = torch.Generator().manual_seed(1)
        x = (torch.randn(*shape, generator=gen) * torch.rand(shape[0], 1, 1, generator=gen) * 5).to(device, dtype)
        upstream = torch.randn(*shape, generator=gen).to(device, dtype)
        x64 = x.double().requires_grad_()
        x.requires_grad_()
        before = kernels.triton_launch_counts()
        y = kernels.rms_calibrate(x, torch.tensor(0.7))
        (dx,) = grads(3.0 * (y.float() * upstream.float()).sum(), x)  # a loss scaled before backward
        ran_triton("rms_calibrate", ["_rms_partial_dot_kernel", "_rms_scale_fwd_kernel", "_rms_scale_bwd_kernel"],
                   before)
        y64 = kernels.rms_calibrate_naive(x64, 0.7)
        (dx64,) = grads(3.0 * (y64 * upstream.double()).sum(), x64)
        assert y.dtype == dtype
        assert_close(y, y64, dtype, "y")
        assert_close(dx, dx64, dtype, "dx")
    finally:
        rms_module.RMS_CHUNK = old_chunk


@case
def rms_fp32_one_example(device):
    _rms(device, torch.float32, (1, 7, 24), chunk=16384)


@case
def rms_bf16_split_reduction(device):
    _rms(device, torch.bfloat16, (3, 33, 100), chunk=256)  # 13 chunks per example


def _ce(device, dtype, rows, vocab, width, reduction, weight_grad, chunk_cols, ignore_every=3):
    old_bytes, _lm_head.CHUNK_BYTES = _lm_head.CHUNK_BYTES, 4 * rows * chunk_cols
    try:
        hidden, weight, hidden64, weight64 = lm_head_inputs(rows, vocab, width, dtype, weight_grad, device=device)
        targets = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(2))
        targets[1::ignore_every] = -100
        targets = targets.to(device)
        upstream = torch.rand(() if reduction != "none" else (rows,), generator=torch.Generator().manual_seed(3))
        upstream = upstream.to(device) + 0.5
        before = kernels.triton_launch_counts()
        loss = kernels.k_token_cross_entropy(hidden, weight, targets, reduction=reduction)
        got = grads(loss, hidden, weight, upstream=upstream)
        names = ["_k_token_ce_online_kernel"] + (["_k_token_ce_dlogits_kernel"] if weight_grad else [])
        ran_triton("k_token_ce", names, before)
        loss64 = kernels.k_token_ce_naive(hidden64, weight64, targets, reduction=reduction)
        want = grads(loss64, hidden64, weight64, upstream=upstream.double())
        assert_close(loss, loss64, torch.float32, "loss")
        for g, w, name in zip(got, want, ("dhidden", "dweight")):
            assert g.dtype == dtype
            assert_close(g, w, dtype, name)
    finally:
        _lm_head.CHUNK_BYTES = old_bytes


@case
def ce_fp32_rows7_vocab1000_mean_scaled(device):
    _ce(device, torch.float32, 7, 1000, 24, "mean", weight_grad=False, chunk_cols=256)


@case
def ce_fp32_rows1_vocab257_sum_dweight(device):
    _ce(device, torch.float32, 1, 257, 100, "sum", weight_grad=True, chunk_cols=256)  # last chunk is 1 column


@case
def ce_fp32_rows33_vocab4093_none_dweight(device):
    _ce(device, torch.float32, 33, 4093, 24, "none", weight_grad=True, chunk_cols=1536)


@case
def ce_bf16_rows33_vocab4093_mean_dweight(device):
    _ce(device, torch.bfloat16, 33, 4093, 100, "mean", weight_grad=True, chunk_cols=2048)


@case
def ce_bf16_rows7_vocab257_none(device):
    _ce(device, torch.bfloat16, 7, 257, 24, "none", weight_grad=False, chunk_cols=256)


@case
def ce_all_ignored(device):
    hidden, weight, _, _ = lm_head_inputs(5, 300, 24, torch.float32, weight_grad=True, device=device)
    for reduction in ("mean", "sum", "none"):
        loss = kernels.k_token_cross_entropy(hidden, weight, torch.full((5,), -100, device=device),
                                             reduction=reduction)
        assert torch.isfinite(loss).all() and (loss == 0).all(), reduction
        dh, dw = grads(loss.sum(), hidden, weight)
        assert (dh == 0).all() and (dw == 0).all(), reduction


def _kd(device, dtype, rows, vocab, width, teachers, teacher_weights, tau, masked, weight_grad, chunk_cols):
    old_bytes, _lm_head.CHUNK_BYTES = _lm_head.CHUNK_BYTES, 4 * rows * chunk_cols
    try:
        hidden, weight, hidden64, weight64 = lm_head_inputs(rows, vocab, width, dtype, weight_grad, device=device)
        teacher_logits = (torch.randn(teachers, rows, vocab, generator=torch.Generator().manual_seed(5)) * 3)
        teacher_logits[0, 0, : vocab // 4] = float("-inf")  # padded vocabulary: probability 0, not nan
        teacher_logits = teacher_logits.to(device, dtype)
        mask = (torch.arange(rows, device=device) % 3 != 1) if masked else None
        before = kernels.triton_launch_counts()
        loss = 2.5 * kernels.kd_softmax_loss(hidden, weight, teacher_logits, tau, teacher_weights, mask)
        got = grads(loss, hidden, weight)
        ran_triton("kd_softmax", ["_kd_online_lse_kernel", "_kd_grad_kernel"], before)
        loss64 = 2.5 * kernels.kd_softmax_naive(hidden64, weight64, teacher_logits.double(), tau, teacher_weights,
                                                mask)
        want = grads(loss64, hidden64, weight64)
        assert_close(loss, loss64, torch.float32, "loss")
        for g, w, name in zip(got, want, ("dhidden", "dweight")):
            assert g.dtype == dtype
            assert_close(g, w, dtype, name)
        if masked:
            assert (got[0][~mask] == 0).all()
    finally:
        _lm_head.CHUNK_BYTES = old_bytes


@case
def kd_fp32_one_teacher(device):
    _kd(device, torch.float32, 7, 1000, 24, 1, None, 1.0, masked=False, weight_grad=True, chunk_cols=256)


@case
def kd_fp32_three_weighted_teachers_tau2_mask(device):
    _kd(device, torch.float32, 33, 257, 100, 3, [0.2, 0.5, 0.3], 2.0, masked=True, weight_grad=False,
        chunk_cols=256)


@case
def kd_bf16_two_teachers_tau_half(device):
    _kd(device, torch.bfloat16, 7, 4093, 24, 2, [3.0, 1.0], 0.5, masked=True, weight_grad=True, chunk_cols=2048)


@case
def kd_all_masked(device):
    hidden, weight, _, _ = lm_head_inputs(4, 300, 24, torch.float32, weight_grad=True, device=device)
    teacher = torch.randn(2, 4, 300, device=device)
    loss = kernels.kd_softmax_loss(hidden, weight, teacher, 2.0, mask=torch.zeros(4, dtype=torch.bool, device=device))
    dh, dw = grads(loss, hidden, weight)
    assert loss.item() == 0 and (dh == 0).all() and (dw == 0).all()


@case
def cuda_operand_layout_bf16(device):
    """On CUDA bf16 GEMM operands stay bf16, so the kernels write exp(l - m) and the dlogits into bf16 buffers
    separate from the fp32 logits. Force that layout here so the interpreter covers those stores too."""
    ce_module = importlib.import_module("kernels.k_token_ce")
    kd_module = importlib.import_module("kernels.kd_softmax")
    saved = ce_module.operand_dtype, kd_module.operand_dtype
    ce_module.operand_dtype = kd_module.operand_dtype = lambda weight: weight.dtype
    try:
        _ce(device, torch.bfloat16, 33, 1000, 24, "mean", weight_grad=True, chunk_cols=256)
        _kd(device, torch.bfloat16, 7, 1000, 24, 2, None, 2.0, masked=False, weight_grad=True, chunk_cols=256)
    finally:
        ce_module.operand_dtype, kd_module.operand_dtype = saved


@case
def triton_path_really_ran(device):
    """Every kernel is launched (through the interpreter on CPU) when each op runs once with all gradients."""
    hidden, weight, _, _ = lm_head_inputs(3, 50, 8, torch.float32, weight_grad=True, device=device)
    kernels.k_token_cross_entropy(hidden, weight, torch.tensor([1, 2, 3], device=device)).backward()
    kernels.kd_softmax_loss(hidden, weight, torch.randn(1, 3, 50, device=device)).backward()
    x = torch.randn(2, 3, 4, device=device, requires_grad=True)
    kernels.rms_calibrate(x, 1.0).sum().backward()
    counts = kernels.triton_launch_counts()
    expected = ["_rms_partial_dot_kernel", "_rms_scale_fwd_kernel", "_rms_scale_bwd_kernel",
                "_k_token_ce_online_kernel", "_k_token_ce_dlogits_kernel", "_kd_online_lse_kernel", "_kd_grad_kernel"]
    assert all(counts.get(name, 0) > 0 for name in expected), counts
    if device == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        from kernels.k_token_ce import _k_token_ce_online_kernel
        assert isinstance(_k_token_ce_online_kernel, InterpretedFunction)


def run_cases(device: str) -> dict:
    results = {}
    for name, fn in CASES.items():  # definition order: triton_path_really_ran last
        try:
            fn(device)
            results[name] = {"ok": True, "error": ""}
        except Exception:  # recorded and reported by the parent test of this case
            results[name] = {"ok": False, "error": traceback.format_exc()}
    return results


# ---------------------------------------------------------------------------------------------------------------
# pytest side
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory):
    if not kernels.triton_available():
        pytest.skip("triton is not installed")
    out = tmp_path_factory.mktemp("triton_interpreter") / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "LATENTWIRE_KERNELS"}
    env.update(TRITON_INTERPRET="1", PYTHONPATH=str(REPO_ROOT), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, __file__, "--run-cases", str(out)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0 and out.exists(), f"interpreter child failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", list(CASES))
def test_triton_interpreter(name, interpreter_results):
    result = interpreter_results[name]
    assert result["ok"], result["error"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(CASES))
def test_triton_cuda(name):
    CASES[name]("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("width,vocab", [(4096, 128256), (3584, 152064)])
def test_triton_cuda_real_receiver_shapes_bf16(width, vocab):
    """Llama-3.1-8B / Qwen2.5-7B heads in bf16 against an fp32 eager oracle on the same rounded values."""
    torch.backends.cuda.matmul.allow_tf32 = False
    n_rows = 512
    hidden, weight, _, _ = lm_head_inputs(n_rows, vocab, width, torch.bfloat16, device="cuda")
    targets = torch.randint(0, vocab, (n_rows,), device="cuda")
    loss = kernels.k_token_cross_entropy(hidden, weight, targets)
    (dh,) = grads(loss, hidden)
    assert kernels.last_backend("k_token_ce") == "triton"
    hidden32 = hidden.detach().float().requires_grad_()
    loss32 = kernels.k_token_ce_naive(hidden32, weight.float(), targets)
    (dh32,) = grads(loss32, hidden32)
    torch.testing.assert_close(loss, loss32, rtol=1e-4, atol=1e-4)
    assert_close(dh, dh32, torch.bfloat16, "dhidden")
    teacher = torch.randn(2, n_rows, vocab, device="cuda", dtype=torch.bfloat16) * 3
    kd = kernels.kd_softmax_loss(hidden, weight, teacher, 2.0)
    (dh_kd,) = grads(kd, hidden)
    kd32 = kernels.kd_softmax_naive(hidden32, weight.float(), teacher.float(), 2.0)
    (dh_kd32,) = grads(kd32, hidden32)
    torch.testing.assert_close(kd, kd32, rtol=1e-4, atol=1e-4)
    assert_close(dh_kd, dh_kd32, torch.bfloat16, "kd dhidden")


def test_kernels_compile_for_sm90():
    """The CUDA path compiles: every kernel lowers to a cubin for an H100 (sm_90), no GPU needed."""
    if not kernels.triton_available():
        pytest.skip("triton is not installed")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.interpreter import InterpretedFunction

    rms = importlib.import_module("kernels.rms_calibrate")
    ce = importlib.import_module("kernels.k_token_ce")
    kd = importlib.import_module("kernels.kd_softmax")
    if isinstance(ce._k_token_ce_online_kernel, InterpretedFunction):
        pytest.skip("triton was imported in interpreter mode in this process")
    bf16, f32, i64 = "*bf16", "*fp32", "*i64"
    jobs = [  # kernel, runtime argument types in order, constexprs
        (rms._rms_partial_dot_kernel, [bf16, bf16, f32, "i32", "i32"], dict(CHUNK=16384, BLOCK=1024)),
        (rms._rms_scale_fwd_kernel, [bf16, f32, bf16, "i32"], dict(BLOCK=1024)),
        (rms._rms_scale_bwd_kernel, [bf16, bf16, f32, f32, bf16, "i32"], dict(BLOCK=1024)),
        (ce._k_token_ce_online_kernel, [f32, "i64", bf16, "i64", f32, f32, f32, "i32"],
         dict(WRITE_E=True, BLOCK_V=1024)),
        (ce._k_token_ce_dlogits_kernel, [f32, "i64", bf16, "i64", f32, i64, f32, "i32"], dict(BLOCK_V=1024)),
        (kd._kd_online_lse_kernel, [f32, "i64", bf16, "i64", "i64", i64, f32, f32, "i32", "i32", "fp32"],
         dict(N_TEACHERS=2, BLOCK_V=1024)),
        (kd._kd_grad_kernel, [f32, "i64", bf16, "i64", bf16, "i64", "i64", i64, f32, f32, f32, "i32", "i32", "fp32",
                              "fp32"], dict(N_TEACHERS=2, WRITE_GRAD=True, BLOCK_V=1024)),
    ]
    for kernel, types, constexprs in jobs:
        params = list(inspect.signature(kernel.fn).parameters)
        runtime = [p for p in params if p not in constexprs]
        assert len(runtime) == len(types), kernel.fn.__name__
        signature = dict(zip(runtime, types)) | {name: "constexpr" for name in constexprs}
        source = ASTSource(fn=kernel, signature=signature,
                           constexprs={(params.index(k),): v for k, v in constexprs.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        assert compiled.asm.get("cubin"), kernel.fn.__name__


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--run-cases":
        raise SystemExit("usage: TRITON_INTERPRET=1 python tests/test_kernels_triton.py --run-cases OUT.json")
    Path(sys.argv[2]).write_text(json.dumps(run_cases("cpu"), indent=1))
