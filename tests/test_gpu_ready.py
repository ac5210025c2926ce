"""GPU-path defects made visible on CPU, and the GPU checks themselves (behind the `gpu` marker).

- bf16 receivers and teachers keep bf16 under ZeRO-3 (2 CPU ranks): every partition is bf16, run_info.json's
  frozen bytes are 2 per parameter, the trainables stay fp32, and the planner's figures (launch/plan.py) equal
  what is resident.
- launch/eval.py records where it ran ("device": "cpu" here, "cuda" on a GPU machine).
- `bash launch/gpu_check.sh --dry` checks every step of the GPU run that a CPU can (tests/run.sh runs it here).
- GPU only: every kernel in bf16 against float64 references at the real heads' shapes, evaluation on the GPU.

Run: python -m pytest tests/test_gpu_ready.py -m "slow or not slow" -q     (GPU: -m gpu)
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from tests.conftest import ROOT, deepspeed_cmd, run_cli, small_overrides

BF16 = ["receivers.0.dtype=bfloat16", "receivers.1.dtype=bfloat16", "receivers.0.teachers.0.path=tiny:llama"]

# Sets the run up (receivers and a live teacher partitioned as they load), trains it, then reports the dtype of
# every frozen partition and trainable parameter.
INSPECT_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    sys.path.insert(0, os.getcwd())
    from latentwire.distributed import setup_environment
    setup_environment()
    import torch
    from latentwire import config as C, train as T
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out, overrides = Path(args[0]), args[1:]
    run = T.setup(C.load_config("configs/tiny.json", overrides), out, "ds_configs/zero3.json")
    T.train(run)
    def dtypes(params):
        return sorted({str(p.ds_tensor.dtype if hasattr(p, "ds_id") else p.dtype) for p in params})
    frozen = [p for p in run.model.parameters() if not p.requires_grad]
    teacher = list(run.model.teachers["llama"][0].forward.parameters())
    if torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps({
            "frozen": dtypes(frozen), "frozen_partitioned": all(hasattr(p, "ds_id") for p in frozen),
            "teacher": dtypes(teacher), "teacher_partitioned": all(hasattr(p, "ds_id") for p in teacher),
            "teacher_bytes": sum(p.ds_numel * p.element_size() for p in teacher),
            "trainable": dtypes(run.model.trainable_parameters())}))
""")


@pytest.mark.slow
def test_bf16_receivers_and_teachers_stay_bf16_under_zero3(tmp_path, tiny_dir):
    from launch.plan import model_specs_from_receivers, resolve_model_path
    from latentwire.config import load_config

    script = tmp_path / "bf16_run.py"  # (not inspect.py: that would shadow the standard library)
    script.write_text(INSPECT_SCRIPT)
    out = tmp_path / "run"
    overrides = small_overrides(2, ["eval.at_end=false"] + BF16)
    proc = run_cli(deepspeed_cmd(2) + [str(script), str(out), *overrides], timeout=900)
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["frozen"] == ["torch.bfloat16"] and result["frozen_partitioned"], result
    assert result["teacher"] == ["torch.bfloat16"] and result["teacher_partitioned"], result
    assert result["trainable"] == ["torch.float32"], result

    # The planner sizes the same models from their configs alone (meta device): 2 bytes per parameter, and
    # ceil(bytes / world) per rank under ZeRO-3, against what the ranks really hold (each tensor's partition is
    # padded to a multiple of the world size: at most one element per tensor more).
    info = json.loads((out / "run_info.json").read_text())
    specs = model_specs_from_receivers(load_config(ROOT / "configs" / "tiny.json", overrides).receivers,
                                       resolve=resolve_model_path)
    receivers = [s for s in specs if s.role == "receiver"]
    (teacher_spec,) = [s for s in specs if s.role == "teacher"]
    assert {s.dtype_bytes for s in specs} == {2}
    assert info["frozen_bytes_total"] == sum(s.weight_bytes for s in receivers) == 2 * sum(s.n_params
                                                                                          for s in receivers)
    assert result["teacher_bytes"] == teacher_spec.weight_bytes
    planned = sum(math.ceil(s.weight_bytes / 2) for s in receivers)
    n_tensors = sum(1 for _ in _frozen_tensor_names(tiny_dir))
    for resident in info["frozen_bytes_per_rank"]:
        assert planned <= resident <= planned + 2 * n_tensors, (resident, planned)
    print(f"\nbf16 ZeRO-3: {info['frozen_bytes_total']} frozen bytes = 2 x {info['frozen_bytes_total'] // 2} "
          f"parameters; per rank {info['frozen_bytes_per_rank']} (planner {planned})")


def _frozen_tensor_names(tiny_dir):
    from safetensors import safe_open

    for kind in ("tiny-llama", "tiny-qwen2"):
        with safe_open(str(tiny_dir / kind / "model.safetensors"), framework="pt") as handle:
            yield from handle.keys()


def test_launch_eval_records_the_device(tiny_receivers, tmp_path):
    from tests.helpers import make_checkpoint

    ckpt, _, _ = make_checkpoint(tmp_path / "run", tiny_receivers)
    out = tmp_path / "eval"
    run_cli(["launch/eval.py", "--checkpoint", str(ckpt), "--output_dir", str(out), "--no_plots",
             "--set", "eval.max_examples=2", "--set", "eval.precisions=[\"int8\"]"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.slow
def test_gpu_check_dry_mode(tmp_path, tiny_dir):
    """Every step of launch/gpu_check.sh that a CPU can run: script syntax, the wheel install plan, imports, the
    real presets' models and planner estimate on the meta device, the kernel benchmark harness and the training
    benchmark at tiny shapes, and the --merge step on the rows the dry run wrote."""
    out = tmp_path / "out"
    started = time.perf_counter()
    proc = subprocess.run(["bash", "launch/gpu_check.sh", "--dry"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OUT": str(out), "PYTHON": sys.executable})
    elapsed = time.perf_counter() - started
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert 0 < len(files) <= 8 and all(len(p.parts) <= 2 for p in files), files
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry"] is True
    assert [s["name"] for s in summary["stages"]] == ["setup", "tests", "kernels", "train", "merge"]
    assert all(s["status"] == "ok" for s in summary["stages"]), summary["stages"]
    assert "| gpu |" in proc.stdout  # the README table printed by the merge step
    print(f"\ngpu_check.sh --dry: {elapsed:.1f} s")


# ---------------------------------------------------------------------------------------------------------------
# GPU only (launch/gpu_check.sh runs these on the first machine lent a GPU)
# ---------------------------------------------------------------------------------------------------------------

REAL_HEADS = [(4096, 128256), (3584, 152064)]  # Llama-3.1-8B, Qwen2.5-7B: H, V


def _close(actual, expected, rel, what):
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = max(expected.abs().max().item(), 1e-6)
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("width,vocab", REAL_HEADS)
def test_every_kernel_bf16_against_float64_at_real_head_shapes(width, vocab):
    """rms_calibrate, k_token_cross_entropy, kd_softmax_loss (2 teachers, tau 2) and lm_head_logits / argmax in
    bf16 on CUDA (Triton) against float64 eager references on the same rounded values; bf16 outputs and
    gradients are rounded to 8 bits, statistics are fp32."""
    import kernels

    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(0)
    n_rows = 512
    hidden = torch.randn(n_rows, width, device="cuda", generator=gen).bfloat16().requires_grad_()
    weight = (torch.randn(vocab, width, device="cuda", generator=gen) * width ** -0.5 * 3).bfloat16()
    targets = torch.randint(0, vocab, (n_rows,), device="cuda", generator=gen)
    targets[::7] = -100
    h64, w64 = hidden.detach().double().requires_grad_(), weight.double()

    loss = kernels.k_token_cross_entropy(hidden, weight, targets)
    (dh,) = torch.autograd.grad(loss, hidden)
    assert kernels.last_backend("k_token_ce") == "triton"
    loss64 = torch.nn.functional.cross_entropy(h64 @ w64.t(), targets, ignore_index=-100)
    (dh64,) = torch.autograd.grad(loss64, h64)
    _close(loss, loss64, 1e-4, "k_token_ce loss")
    _close(dh, dh64, 1.6e-2, "k_token_ce dhidden")
    del loss64, dh64

    teacher = (torch.randn(2, n_rows, vocab, device="cuda", generator=gen) * 3).bfloat16()
    kd = kernels.kd_softmax_loss(hidden, weight, teacher, temperature=2.0)
    (dh_kd,) = torch.autograd.grad(kd, hidden)
    assert kernels.last_backend("kd_softmax") == "triton"
    log_q = torch.log_softmax(h64 @ w64.t() / 2.0, dim=-1)
    p_bar = torch.softmax(teacher.double() / 2.0, dim=-1).mean(0)
    kd64 = 4.0 * (p_bar * (torch.log(p_bar) - log_q)).sum(-1).mean()
    (dh_kd64,) = torch.autograd.grad(kd64, h64)
    _close(kd, kd64, 1e-4, "kd_softmax loss")
    _close(dh_kd, dh_kd64, 1.6e-2, "kd_softmax dhidden")
    del log_q, p_bar, kd64, dh_kd64, teacher

    logits = kernels.lm_head_logits(hidden.detach()[:64], weight)
    logits64 = h64.detach()[:64] @ w64.t()
    _close(logits, logits64, 1e-5, "lm_head_logits")
    assert (kernels.lm_head_argmax(hidden.detach()[:64], weight) == logits.argmax(-1)).all()

    x = (torch.randn(64, 32, width, device="cuda", generator=gen) * 0.7).bfloat16().requires_grad_()
    y = kernels.rms_calibrate(x, 0.02)
    upstream = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, upstream)
    assert kernels.last_backend("rms_calibrate") == "triton"
    x64 = x.detach().double().requires_grad_()
    y64 = x64 * 0.02 / torch.sqrt(x64.pow(2).mean(dim=(1, 2), keepdim=True) + 1e-6)
    (dx64,) = torch.autograd.grad(y64, x64, upstream.double())
    _close(y, y64, 1.6e-2, "rms_calibrate y")
    _close(dx, dx64, 1.6e-2, "rms_calibrate dx")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_checkpoint_model_evaluates_on_the_gpu(tiny_receivers, tmp_path):
    from latentwire.checkpoint import default_device, load_checkpoint_model
    from latentwire.eval import evaluate
    from latentwire.data import load_splits
    from tests.helpers import make_checkpoint

    ckpt, _, _ = make_checkpoint(tmp_path / "run", tiny_receivers)
    cfg, model = load_checkpoint_model(ckpt, ["eval.max_examples=2"], device=default_device())
    assert default_device().type == "cuda"
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    result, _ = evaluate(model, load_splits(cfg.data).test)
    assert result["latency"]
