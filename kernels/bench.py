"""Microbenchmarks of the kernels package: every available provider of an op over a sweep of shapes (including the
real receivers' H and V: Llama-3.1-8B H=4096 V=128256, Qwen2.5-7B H=3584 V=152064), timed after warm-up
(p20/p50/p80; CUDA events on GPU), peak memory measured per provider in a fresh process, appended as CSV rows.

    python -m kernels.bench --op k_token_ce --device cpu --csv kernels/results/cpu.csv
    python -m kernels.bench --op kd_softmax --device cuda --csv kernels/results/cuda.csv
    python -m kernels.bench --op rms_calibrate --device cpu --shapes 0 --modes fwd_bwd   # one shape, one mode
    python -m kernels.bench --markdown kernels/results/cpu.csv                            # the README table
    python -m kernels.bench --compass --csv OUT/kernels.csv       # the GPU targets' shapes, every peer (gpu_check)
    python -m kernels.bench --merge OUT                            # OUT/kernels.csv -> results/<gpu>.csv + table

Ops: `rms_calibrate`, `k_token_ce`, `kd_softmax` (teacher logits given), and `kd_distill`: the KD of a training
step from the teachers' hidden states, teacher logits included (T no-grad GEMMs, then the loss), the work Liger's
fused distillation loss does. Providers: `naive` (eager PyTorch, full logits), `torch_lce` (torch's chunked
F.linear_cross_entropy, where it exists), `torch_compile` (the naive function under torch.compile; CUDA only),
`liger` (liger-kernel's fused linear cross-entropy for k_token_ce, its fused JSD distillation loss with beta=0,
i.e. KL(teacher || student), once per teacher for kd_distill; when installed), `cce` (Apple's cut-cross-entropy
`linear_cross_entropy`, k_token_ce on CUDA, when installed), `copy` (x.clone(): the measured copy bandwidth the
rms_calibrate target is read against; fwd only), `latentwire` (this package; the Triton kernels on CUDA, the
chunked PyTorch reference on CPU). With `--all_peers` (and `--compass`) a peer that cannot run here (missing
package, an API this torch lacks, CUDA only) gets a row with `not measured` and the reason in `note`. Modes: `fwd`
(no gradient, e.g. evaluation) and `fwd_bwd` (gradient to hidden / x; the LM head frozen as in training). Peak
memory is the growth over the worker's footprint after its inputs exist: max RSS (VmHWM after a reset) on CPU,
torch.cuda.max_memory_allocated on CUDA. On CUDA the providers run one after another in one process (`--in_process`,
the default there: the allocator's peak is reset between them); on CPU each runs in a fresh process. Throughput
counts the nominal FLOPs of the eager algorithm (TFLOP/s for the LM-head ops) or the bytes an ideal kernel moves
(GB/s for rms_calibrate), the same number for every provider so the column compares them directly.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

OPS = ("rms_calibrate", "k_token_ce", "kd_softmax", "kd_distill")
MODES = ("fwd", "fwd_bwd")
REPO_ROOT = Path(__file__).resolve().parent.parent
FIELDS = ["op", "provider", "shape", "mode", "dtype", "ms_p20", "ms_p50", "ms_p80", "gbps_or_tflops", "unit",
          "peak_mb", "device", "load_avg", "versions", "git_sha", "date", "note"]
NOT_MEASURED = "not measured"

# Shapes per op and device. CPU shapes keep N small at the real vocabularies so a sweep finishes in minutes on a
# few cores; the first k_token_ce CPU shape is the target shape of the CPU acceptance numbers.
SHAPES = {
    "k_token_ce": {
        "cpu": [dict(N=4096, H=1024, V=32000), dict(N=128, H=4096, V=128256), dict(N=128, H=3584, V=152064)],
        "cuda": [dict(N=4096, H=1024, V=32000), dict(N=512, H=4096, V=128256), dict(N=4096, H=4096, V=128256),
                 dict(N=512, H=3584, V=152064), dict(N=4096, H=3584, V=152064)],
    },
    "kd_softmax": {
        "cpu": [dict(N=1024, H=1024, V=32000, T=2), dict(N=64, H=4096, V=128256, T=1),
                dict(N=64, H=3584, V=152064, T=2)],
        "cuda": [dict(N=512, H=4096, V=128256, T=1), dict(N=512, H=4096, V=128256, T=2),
                 dict(N=512, H=3584, V=152064, T=2), dict(N=2048, H=4096, V=128256, T=1)],
    },
    "rms_calibrate": {
        "cpu": [dict(B=64, M=32, D=4096), dict(B=64, M=32, D=3584), dict(B=256, M=16, D=1024)],
        "cuda": [dict(B=64, M=32, D=4096), dict(B=64, M=32, D=3584), dict(B=256, M=64, D=4096)],
    },
    "kd_distill": {
        "cpu": [dict(N=64, H=1024, V=32000, T=2)],
        "cuda": [dict(N=512, H=4096, V=128256, T=2), dict(N=512, H=3584, V=152064, T=2)],
    },
}
# The GPU targets (issue 17), measured by `--compass` (launch/gpu_check.sh) in bf16, forward + backward:
#   rms_calibrate >= 90% of the measured copy bandwidth (fwd) and >= 3x eager (fwd_bwd);
#   k_token_ce at N=512 >= 1.5x faster than the best of liger, torch_compile, torch_lce, at no more memory;
#   KD (2 teachers, tau=2, V=128256) >= 1.3x faster than Liger's distillation loss, at no more memory.
# Most important first: a sweep cut by a time limit keeps the rows of the shapes it finished.
COMPASS = [
    ("k_token_ce", dict(N=512, H=4096, V=128256), ("fwd_bwd",)),
    ("kd_distill", dict(N=512, H=4096, V=128256, T=2), ("fwd_bwd",)),
    ("rms_calibrate", dict(B=256, M=64, D=4096), ("fwd", "fwd_bwd")),
    ("k_token_ce", dict(N=512, H=3584, V=152064), ("fwd_bwd",)),
    ("kd_distill", dict(N=512, H=3584, V=152064, T=2), ("fwd_bwd",)),
    ("rms_calibrate", dict(B=64, M=32, D=4096), ("fwd", "fwd_bwd")),
]
# The same sweep at toy shapes, for `--compass --dry` on a CPU (checks the harness, not the kernels).
COMPASS_DRY = [
    ("k_token_ce", dict(N=16, H=32, V=1000), ("fwd_bwd",)),
    ("kd_distill", dict(N=16, H=32, V=1000, T=2), ("fwd_bwd",)),
    ("rms_calibrate", dict(B=2, M=4, D=64), ("fwd", "fwd_bwd")),
]
# Without --reps, a worker times about BUDGET_MS of calls (at least MIN_REPS, at most 100). On a shared CPU the
# load changes over minutes, so CPU sweeps run ROUNDS rounds, each starting every provider afresh in a rotated
# order, and pool the samples: slow periods hit all providers alike and the ratios stay meaningful.
BUDGET_MS = {"cpu": 2000.0, "cuda": 1000.0}
MIN_REPS = {"cpu": 2, "cuda": 10}
ROUNDS = {"cpu": 3, "cuda": 1}
TEMPERATURE = 2.0
TARGET_RMS = 0.02


# ----------------------------------------------------------------------------------------------------------------
# Providers: each returns a closure that runs one forward (and backward in fwd_bwd) on prepared inputs.
# ----------------------------------------------------------------------------------------------------------------


def _torch_lce_available() -> bool:
    import torch
    return hasattr(torch.nn.functional, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")


def _liger_available() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _cce_available() -> bool:
    try:
        from cut_cross_entropy import linear_cross_entropy  # noqa: F401
    except ImportError:
        return False
    return True


# Every provider an op is compared with, in table order (`copy` is a bandwidth reference, not a peer).
PEERS = {
    "rms_calibrate": ["copy", "naive", "torch_compile", "latentwire"],
    "k_token_ce": ["naive", "torch_lce", "torch_compile", "liger", "cce", "latentwire"],
    "kd_softmax": ["naive", "torch_lce", "torch_compile", "latentwire"],
    "kd_distill": ["naive", "torch_compile", "liger", "latentwire"],
}


def unavailable_reason(op: str, provider: str, device: str, mode: str = "fwd_bwd") -> str | None:
    """Why `provider` cannot run `op` here (None when it can)."""
    if provider not in PEERS[op]:
        return f"{provider} does not implement {op}"
    if provider == "copy" and mode != "fwd":
        return "a copy has no backward to compare"
    if provider == "torch_lce" and not _torch_lce_available():
        import torch
        return f"torch {torch.__version__} has no F.linear_cross_entropy"
    if provider == "torch_compile" and device != "cuda":
        return "torch.compile is timed on CUDA only"
    if provider == "liger" and not _liger_available():
        return "liger-kernel is not installed"
    if provider == "liger" and device != "cuda":
        return "liger-kernel runs on CUDA only"
    if provider == "cce" and not _cce_available():
        return "cut-cross-entropy is not installed"
    if provider == "cce" and device != "cuda":
        return "cut-cross-entropy runs on CUDA only"
    return None


def available_providers(op: str, device: str, mode: str | None = None) -> list[str]:
    return [p for p in PEERS[op] if unavailable_reason(op, p, device, mode or "fwd") is None
            and (mode is not None or p != "copy")]


def _make_inputs(op, shape, dtype, device, mode):
    import torch
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=gen) * scale).to(device=device, dtype=dtype)

    needs_grad = mode == "fwd_bwd"
    if op == "rms_calibrate":
        x = randn(shape["B"], shape["M"], shape["D"]).requires_grad_(needs_grad)
        return dict(x=x, grad_y=randn(shape["B"], shape["M"], shape["D"]))
    n_rows, width, vocab = shape["N"], shape["H"], shape["V"]
    hidden = randn(n_rows, width).requires_grad_(needs_grad)
    weight = randn(vocab, width, scale=width ** -0.5)  # frozen head, logits of order 1
    if op == "k_token_ce":
        targets = torch.randint(0, vocab, (n_rows,), generator=gen)
        targets[torch.rand(n_rows, generator=gen) < 0.1] = -100  # answer padding, as in training
        return dict(hidden=hidden, weight=weight, targets=targets.to(device))
    if op == "kd_distill":  # teachers' final hidden states (no grad) and their head: here the student's
        targets = torch.randint(0, vocab, (n_rows,), generator=gen).to(device)  # (Liger's hard-loss labels)
        return dict(hidden=hidden, weight=weight, teacher_hidden=randn(shape["T"], n_rows, width), targets=targets)
    teacher_logits = randn(shape["T"], n_rows, vocab, scale=2.0)
    return dict(hidden=hidden, weight=weight, teacher_logits=teacher_logits)


def _loss_fn(op, provider):
    """The provider's function of the inputs dict, returning a loss (or y for rms_calibrate)."""
    import torch
    import torch.nn.functional as F

    import kernels

    if op == "rms_calibrate":
        if provider == "copy":
            return lambda inp: inp["x"].clone()
        fn = {"naive": kernels.rms_calibrate_naive, "torch_compile": torch.compile(kernels.rms_calibrate_naive),
              "latentwire": kernels.rms_calibrate}[provider]
        return lambda inp: fn(inp["x"], TARGET_RMS)

    if op == "kd_distill":
        return _kd_distill_fn(provider)

    if op == "k_token_ce":
        if provider == "torch_lce":
            options = torch.nn.LinearCrossEntropyOptions()
            return lambda inp: F.linear_cross_entropy(inp["hidden"], inp["weight"], inp["targets"], ignore_index=-100,
                                                      options=options)
        if provider == "liger":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
            liger_loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
            return lambda inp: liger_loss(inp["weight"], inp["hidden"], inp["targets"])
        if provider == "cce":
            from cut_cross_entropy import linear_cross_entropy
            return lambda inp: linear_cross_entropy(inp["hidden"], inp["weight"], inp["targets"], ignore_index=-100)
        fn = {"naive": kernels.k_token_ce_naive, "torch_compile": torch.compile(kernels.k_token_ce_naive),
              "latentwire": kernels.k_token_cross_entropy}[provider]
        return lambda inp: fn(inp["hidden"], inp["weight"], inp["targets"])

    if provider == "torch_lce":
        # KL(p_bar || q) = CE(p_bar, q) - H(p_bar): torch's chunked soft-target path on hidden / tau.
        options = torch.nn.LinearCrossEntropyOptions()

        def kd_torch_lce(inp):
            teacher = inp["teacher_logits"].float() / TEMPERATURE
            p_bar = torch.softmax(teacher, dim=-1).mean(dim=0)
            entropy = -torch.special.xlogy(p_bar, p_bar).sum(dim=-1).mean()
            cross = F.linear_cross_entropy(inp["hidden"] / TEMPERATURE, inp["weight"], p_bar.to(inp["hidden"].dtype),
                                           options=options)
            return TEMPERATURE ** 2 * (cross - entropy)
        return kd_torch_lce
    fn = {"naive": kernels.kd_softmax_naive, "torch_compile": torch.compile(kernels.kd_softmax_naive),
          "latentwire": kernels.kd_softmax_loss}[provider]
    return lambda inp: fn(inp["hidden"], inp["weight"], inp["teacher_logits"], TEMPERATURE)


def _kd_distill_fn(provider):
    """KD from the teachers' hidden states (T, N, H): teacher logits (no grad) + the loss against the student."""
    import torch

    import kernels

    if provider == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        # beta=0: KL(teacher || student), the hard (CE) term weighted 0; one call per teacher, averaged.
        liger_loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0,
                                             temperature=TEMPERATURE)

        def kd_liger(inp):
            teachers = inp["teacher_hidden"]
            return sum(liger_loss(inp["hidden"], inp["weight"], t, inp["weight"], inp["targets"])
                       for t in teachers) / teachers.shape[0]
        return kd_liger

    def eager(inp):
        with torch.no_grad():
            teacher_logits = inp["teacher_hidden"] @ inp["weight"].t()
        return kernels.kd_softmax_naive(inp["hidden"], inp["weight"], teacher_logits, TEMPERATURE)

    if provider in ("naive", "torch_compile"):
        return eager if provider == "naive" else torch.compile(eager)

    def kd_latentwire(inp):  # what a training step does: latentwire.losses.teacher_logits_at, then the loss
        t, n, h = inp["teacher_hidden"].shape
        teacher_logits = kernels.lm_head_logits(inp["teacher_hidden"].reshape(t * n, h), inp["weight"])
        return kernels.kd_softmax_loss(inp["hidden"], inp["weight"], teacher_logits.view(t, n, -1), TEMPERATURE)
    return kd_latentwire


def _work_units(op, shape, mode, dtype):
    """(amount, unit) of nominal work per call: FLOPs of the eager algorithm or bytes of an ideal kernel."""
    import torch
    if op == "rms_calibrate":
        numel = shape["B"] * shape["M"] * shape["D"]
        passes = 2 if mode == "fwd" else 5  # fwd: read x, write y; bwd adds read x, dy and write dx
        return passes * numel * torch.finfo(dtype).bits // 8, "GB/s"
    gemms = 1 if mode == "fwd" else 2  # logits, then dhidden (the head is frozen)
    if op == "kd_distill":
        gemms += shape["T"]  # the teachers' logits
    return gemms * 2 * shape["N"] * shape["H"] * shape["V"], "TFLOP/s"


# ----------------------------------------------------------------------------------------------------------------
# Worker: one (op, provider, shape, mode) in this fresh process; prints one RESULT line.
# ----------------------------------------------------------------------------------------------------------------


def _read_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's VmHWM (max RSS) to the current RSS; Linux only."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _max_rss_kb() -> float:
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB on Linux


def run_worker(spec: dict) -> dict:
    import torch

    op, provider, shape, mode, device = spec["op"], spec["provider"], spec["shape"], spec["mode"], spec["device"]
    dtype = getattr(torch, spec["dtype"])
    cuda = device == "cuda"
    if cuda:  # in-process runs: the previous provider's memory is gone before this one's baseline
        gc.collect()
        torch.cuda.empty_cache()
    inputs = _make_inputs(op, shape, dtype, device, mode)
    fn = _loss_fn(op, provider)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                fn(inputs)
            return
        for tensor in inputs.values():
            if tensor.requires_grad:
                tensor.grad = None
        out = fn(inputs)
        if op == "rms_calibrate":
            out.backward(inputs["grad_y"])
        else:
            out.backward()

    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_bytes = torch.cuda.memory_allocated()
    else:
        hwm_reset = _reset_peak_rss()
        base_kb = _read_status_kb("VmRSS") if hwm_reset else _max_rss_kb()  # fallback: growth over the old peak

    times_ms = []
    reps = spec["reps"]
    i = 0
    while i < spec["warmup"] + (reps or MIN_REPS[device]):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            step()
            elapsed = (time.perf_counter() - t0) * 1e3
        if i >= spec["warmup"]:
            times_ms.append(elapsed)
        elif spec["reps"] is None:  # adaptive, from the latest warm-up call
            reps = min(100, max(MIN_REPS[device], int(BUDGET_MS[device] / max(elapsed, 1e-3))))
        i += 1

    if cuda:
        peak_mb = (torch.cuda.max_memory_allocated() - base_bytes) / 2**20
    else:
        peak_kb = _read_status_kb("VmHWM") if hwm_reset else _max_rss_kb()
        peak_mb = (peak_kb - base_kb) / 1024
    backend = None
    if provider == "latentwire":
        import kernels
        backend = kernels.last_backend("kd_softmax" if op == "kd_distill" else op)  # 'triton' or 'reference'
    return dict(times_ms=times_ms, peak_mb=peak_mb, backend=backend)


# ----------------------------------------------------------------------------------------------------------------
# Parent: the sweep, one worker process per (shape, mode, provider), CSV rows, markdown table.
# ----------------------------------------------------------------------------------------------------------------


def _device_name(device: str) -> str:
    if device == "cuda":
        import torch
        return torch.cuda.get_device_name()
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch
    return f"{model} ({torch.get_num_threads()} threads)"


def _versions() -> str:
    import torch
    parts = [f"python={platform.python_version()}", f"torch={torch.__version__}"]
    for name in ("triton", "liger_kernel"):
        try:
            module = __import__(name)
            parts.append(f"{name}={getattr(module, '__version__', '?')}")
        except ImportError:
            parts.append(f"{name}=none")
    return ";".join(parts)


def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "uncommitted"


def _shape_text(shape: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in shape.items())


def _run_one(spec: dict, timeout_s: float, in_process: bool = False) -> dict | None:
    """One provider's measurement; None (and the reason in spec["error"]) when it failed."""
    if in_process:
        try:
            return run_worker(spec)
        except Exception as err:  # a peer that fails here (OOM, compile error) is reported, the sweep goes on
            spec["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
            print(f"  {spec['provider']}: failed: {spec['error']}", file=sys.stderr)
            return None
    cmd = [sys.executable, "-m", "kernels.bench", "--_worker", json.dumps(spec)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        print(f"  {spec['provider']}: timed out after {timeout_s:.0f} s", file=sys.stderr)
        spec["error"] = f"timed out after {timeout_s:.0f} s"
        return None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
    print(f"  {spec['provider']}: failed (exit {proc.returncode})\n{tail}", file=sys.stderr)
    last = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    spec["error"] = f"failed (exit {proc.returncode}): {last[0][:160]}"
    return None


def _append_rows(path: Path, rows: list[dict]) -> None:
    """Append `rows`; an existing file keeps its own header (older files lack the `note` column)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not path.exists() or path.stat().st_size == 0
    fields = FIELDS
    if not new_file:
        with path.open(newline="") as handle:
            fields = next(csv.reader(handle))
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        if new_file:
            writer.writeheader()
        writer.writerows(rows)


def run_sweep(args) -> list[dict]:
    """The sweep the command line asks for: `--op` over its shapes for this device, or the `--compass` shapes."""
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    modes = args.modes.split(",")
    if set(modes) - set(MODES):
        raise SystemExit(f"--modes takes {MODES}")
    if args.compass:
        jobs = COMPASS_DRY if args.device == "cpu" else COMPASS
    else:
        shapes = SHAPES[args.op][args.device]
        if args.shapes:
            shapes = [shapes[int(i)] for i in args.shapes.split(",")]
        jobs = [(args.op, shape, tuple(modes)) for shape in shapes]
    wanted = args.providers.split(",") if args.providers else None
    if wanted and not args.compass:
        runnable = set(available_providers(args.op, args.device, "fwd")) | set(
            available_providers(args.op, args.device, "fwd_bwd"))
        unknown = set(wanted) - runnable
        if unknown and not args.all_peers:
            raise SystemExit(f"providers {sorted(unknown)} are not available here; available: {sorted(runnable)}")
    rows = []
    for op, shape, job_modes in jobs:
        for mode in job_modes:
            new_rows = sweep_one(op, shape, mode, args, wanted)
            if args.csv:
                _append_rows(Path(args.csv), new_rows)  # as each shape ends: a cut run keeps what it measured
            rows += new_rows
    return rows


def sweep_one(op: str, shape: dict, mode: str, args, wanted: list[str] | None = None) -> list[dict]:
    """Every provider of one (op, shape, mode): rows of timings, or `not measured` rows with the reason."""
    import torch
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    warmup = args.warmup if args.warmup is not None else (1 if args.device == "cpu" else 5)
    rounds = args.rounds if args.rounds is not None else ROUNDS[args.device]
    in_process = args.in_process if args.in_process is not None else args.device == "cuda"
    common = dict(device=_device_name(args.device), versions=_versions(), git_sha=_git_sha(),
                  date=datetime.date.today().isoformat())
    print(f"{op} {_shape_text(shape)} {mode} {dtype} on {args.device}", flush=True)
    load_avg = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""  # other work on the box
    candidates = [p for p in PEERS[op] if wanted is None or p in wanted]
    reasons = {p: unavailable_reason(op, p, args.device, mode) for p in candidates}
    providers = [p for p in candidates if reasons[p] is None]
    samples = {p: [] for p in providers}
    peaks = {p: [] for p in providers}
    backends, errors = {}, {}
    for round_index in range(rounds):
        order = providers[round_index % len(providers):] + providers[:round_index % len(providers)]
        for provider in order:
            spec = dict(op=op, provider=provider, shape=shape, mode=mode, dtype=dtype, device=args.device,
                        warmup=warmup, reps=args.reps)
            result = _run_one(spec, args.timeout, in_process)
            if result is None:
                errors[provider] = spec.get("error", "failed")
                continue
            samples[provider] += result["times_ms"]
            peaks[provider].append(result["peak_mb"])
            backends[provider] = result["backend"]
    new_rows = []
    for provider in candidates:
        base = dict(op=op, provider=provider, shape=_shape_text(shape), mode=mode, dtype=dtype, load_avg=load_avg,
                    **common)
        if not samples.get(provider):
            if reasons[provider] and "does not implement" in reasons[provider]:
                continue
            if reasons[provider] and not (args.all_peers or args.compass):
                continue
            note = reasons[provider] or errors.get(provider, "failed")
            new_rows.append(dict(base, ms_p20=NOT_MEASURED, ms_p50=NOT_MEASURED, ms_p80=NOT_MEASURED,
                                 gbps_or_tflops="", unit="", peak_mb="", note=note))
            print(f"  {provider:>24}: {NOT_MEASURED} ({note})", flush=True)
            continue
        p20, p50, p80 = np.percentile(samples[provider], [20, 50, 80])
        work, unit = _work_units(op, shape, mode, getattr(torch, dtype))
        rate = work / (p50 / 1e3) / (1e9 if unit == "GB/s" else 1e12)
        row = dict(base, ms_p20=f"{p20:.3f}", ms_p50=f"{p50:.3f}", ms_p80=f"{p80:.3f}",
                   gbps_or_tflops=f"{rate:.4g}", unit=unit, peak_mb=f"{max(peaks[provider]):.1f}",
                   note=f"backend {backends[provider]}" if backends.get(provider) else "")
        new_rows.append(row)
        backend = f" [{backends[provider]}]" if backends.get(provider) else ""
        print(f"  {provider + backend:>24}: p50 {row['ms_p50']} ms (p20 {row['ms_p20']}, p80 {row['ms_p80']}, "
              f"{len(samples[provider])} calls), {row['gbps_or_tflops']} {unit}, peak {row['peak_mb']} MB",
              flush=True)
    return new_rows


# ----------------------------------------------------------------------------------------------------------------
# The GPU targets, the README table, merging a GPU run's rows (launch/gpu_check.sh --merge)
# ----------------------------------------------------------------------------------------------------------------


def _measured(row: dict | None) -> bool:
    return row is not None and row.get("ms_p50") not in (None, "", NOT_MEASURED)


def _latest(rows: list[dict]) -> dict[tuple, dict]:
    latest: dict[tuple, dict] = {}
    for row in rows:
        latest[(row["op"], row["shape"], row["mode"], row["dtype"], row["device"], row["provider"])] = row
    return latest


def compass_verdicts(rows: list[dict]) -> list[dict]:
    """Each GPU target (see COMPASS) against the latest rows: {target, shape, value, met, detail}. A peer that
    was not measured leaves its target unmet."""
    latest = _latest(rows)
    verdicts = []
    keys = sorted({k[:5] for k in latest})
    for op, shape, mode, dtype, device in keys:
        def get(provider, m=mode):
            return latest.get((op, shape, m, dtype, device, provider))

        ours = get("latentwire")
        if op == "rms_calibrate" and mode == "fwd":
            copy = get("copy")
            ok = _measured(ours) and _measured(copy)
            frac = float(ours["gbps_or_tflops"]) / float(copy["gbps_or_tflops"]) if ok else None
            verdicts.append(dict(target="rms_calibrate >= 90% of copy bandwidth", shape=shape, device=device,
                                 value=f"{frac:.0%}" if ok else NOT_MEASURED, met=bool(ok and frac >= 0.9),
                                 detail=f"{ours['gbps_or_tflops']} vs copy {copy['gbps_or_tflops']} GB/s" if ok
                                 else "copy or latentwire not measured"))
        elif op == "rms_calibrate" and mode == "fwd_bwd":
            naive = get("naive")
            ok = _measured(ours) and _measured(naive)
            speed = float(naive["ms_p50"]) / float(ours["ms_p50"]) if ok else None
            verdicts.append(dict(target="rms_calibrate >= 3x eager (fwd+bwd)", shape=shape, device=device,
                                 value=f"{speed:.2f}x" if ok else NOT_MEASURED, met=bool(ok and speed >= 3.0),
                                 detail=""))
        elif op in ("k_token_ce", "kd_distill") and mode == "fwd_bwd" and shape.startswith("N=512,"):
            peers = ["liger", "torch_compile", "torch_lce"] if op == "k_token_ce" else ["liger"]
            need = 1.5 if op == "k_token_ce" else 1.3
            name = (f"k_token_ce >= {need}x the best of liger / torch_compile / torch_lce, no more memory"
                    if op == "k_token_ce" else f"KD >= {need}x Liger's distillation loss, no more memory")
            missing = [p for p in peers if not _measured(get(p))]
            if not _measured(ours) or missing:
                verdicts.append(dict(target=name, shape=shape, device=device, value=NOT_MEASURED, met=False,
                                     detail="not measured: " + ", ".join(missing or ["latentwire"])))
                continue
            best = min(peers, key=lambda p: float(get(p)["ms_p50"]))
            speed = float(get(best)["ms_p50"]) / float(ours["ms_p50"])
            memory_ok = float(ours["peak_mb"]) <= float(get(best)["peak_mb"])
            verdicts.append(dict(target=name, shape=shape, device=device, value=f"{speed:.2f}x vs {best}",
                                 met=speed >= need and memory_ok,
                                 detail=f"peak {ours['peak_mb']} MB vs {get(best)['peak_mb']} MB"))
    return verdicts


def gpu_table(rows: list[dict]) -> str:
    """The README's GPU table: latest row per provider (not measured ones say so), then the targets."""
    latest = _latest(rows)
    lines = ["| gpu | op | shape | mode | provider | ms p50 | throughput | peak MB | time / latentwire |",
             "|---|---|---|---|---|---:|---:|---:|---:|"]
    for key, row in latest.items():
        ours = latest.get(key[:5] + ("latentwire",))
        if not _measured(row):
            lines.append(f"| {row['device']} | {row['op']} | {row['shape']} {row['dtype']} | {row['mode']} | "
                         f"{row['provider']} | {NOT_MEASURED} | {row.get('note', '')} | | |")
            continue
        ratio = f"{float(row['ms_p50']) / float(ours['ms_p50']):.2f}x" if _measured(ours) else "-"
        lines.append(f"| {row['device']} | {row['op']} | {row['shape']} {row['dtype']} | {row['mode']} | "
                     f"{row['provider']} | {row['ms_p50']} | {row['gbps_or_tflops']} {row['unit']} | "
                     f"{row['peak_mb']} | {ratio} |")
    verdicts = compass_verdicts(rows)
    if verdicts:
        lines += ["", "| target | shape | measured | met |", "|---|---|---|---|"]
        lines += [f"| {v['target']} | {v['shape']} | {v['value']} {v['detail']} | {'yes' if v['met'] else 'no'} |"
                  for v in verdicts]
    return "\n".join(lines)


def gpu_slug(device_name: str) -> str:
    """kernels/results/<slug>.csv for a device name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    slug = "".join(c if c.isalnum() else "-" for c in device_name.lower())
    return "-".join(part for part in slug.split("-") if part) or "unknown"


def merge(run_dir: Path, results_dir: Path = REPO_ROOT / "kernels" / "results") -> tuple[Path, str]:
    """Append RUN/kernels.csv (a GPU run's rows) to results_dir/<gpu>.csv; returns (that file, the README
    table of its latest rows)."""
    with (Path(run_dir) / "kernels.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise SystemExit(f"{run_dir}/kernels.csv holds no rows")
    target = Path(results_dir) / f"{gpu_slug(rows[0]['device'])}.csv"
    _append_rows(target, rows)
    with target.open() as handle:
        return target, gpu_table(list(csv.DictReader(handle)))


def markdown_table(csv_path: Path) -> str:
    """Latest row per (op, shape, mode, dtype, device, provider) as a markdown table, with ratios to `naive`."""
    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    latest: dict[tuple, dict] = {}
    for row in rows:
        latest[(row["op"], row["shape"], row["mode"], row["dtype"], row["device"], row["provider"])] = row
    lines = ["| op | shape | mode | provider | ms p50 (p20-p80) | throughput | peak MB | time / naive | "
             "peak / naive |", "|---|---|---|---|---|---|---|---|---|"]
    for key, row in latest.items():
        if not _measured(row):
            lines.append(f"| {row['op']} | {row['shape']} {row['dtype']} | {row['mode']} | {row['provider']} | "
                         f"{NOT_MEASURED} | {row.get('note', '')} | | | |")
            continue
        naive = latest.get(key[:5] + ("naive",))
        time_ratio = peak_ratio = "-"
        if _measured(naive):
            time_ratio = f"{float(row['ms_p50']) / float(naive['ms_p50']):.2f}x"
            if float(naive["peak_mb"]) > 0:
                peak_ratio = f"{100 * float(row['peak_mb']) / float(naive['peak_mb']):.1f}%"
        lines.append(f"| {row['op']} | {row['shape']} {row['dtype']} | {row['mode']} | {row['provider']} | "
                     f"{row['ms_p50']} ({row['ms_p20']}-{row['ms_p80']}) | {row['gbps_or_tflops']} {row['unit']} | "
                     f"{row['peak_mb']} | {time_ratio} | {peak_ratio} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", choices=OPS)
    parser.add_argument("--compass", action="store_true",
                        help="the GPU targets' shapes and every peer (toy shapes with --device cpu)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if visible, else cpu")
    parser.add_argument("--csv", help="append one row per (shape, mode, provider) to this CSV file")
    parser.add_argument("--providers", help="comma-separated subset of the providers")
    parser.add_argument("--all_peers", action="store_true", help="a `not measured` row for each peer that cannot run")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of fwd,fwd_bwd")
    parser.add_argument("--shapes", help="comma-separated indices into the op's shape list for this device")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default fp32 CPU, bf16 CUDA")
    parser.add_argument("--warmup", type=int, help="untimed calls first (default 1 CPU, 5 CUDA)")
    parser.add_argument("--reps", type=int, help="timed calls per worker (default: about 2 s CPU / 1 s CUDA)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds of all providers (default 3 CPU, 1 CUDA)")
    parser.add_argument("--in_process", action=argparse.BooleanOptionalAction, default=None,
                        help="run the providers in this process (default on CUDA; fresh processes on CPU)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per worker process")
    parser.add_argument("--markdown", metavar="CSV", help="print the README table of a results CSV and exit")
    parser.add_argument("--merge", metavar="RUN_DIR", help="append RUN_DIR/kernels.csv (launch/gpu_check.sh's $OUT) "
                        "to kernels/results/<gpu>.csv and print the README GPU table")
    parser.add_argument("--results_dir", default=str(REPO_ROOT / "kernels" / "results"), help=argparse.SUPPRESS)
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        print("RESULT " + json.dumps(run_worker(json.loads(args._worker))), flush=True)
        return
    if args.markdown:
        print(markdown_table(Path(args.markdown)))
        return
    if args.merge:
        target, table = merge(Path(args.merge), Path(args.results_dir))
        print(f"appended to {target}\n\n{table}")
        return
    if not args.op and not args.compass:
        parser.error("--op or --compass is required")
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    run_sweep(args)


if __name__ == "__main__":
    main()
