"""Microbenchmarks of the kernels package: every available provider of an op over a sweep of shapes (including the
real receivers' H and V: Llama-3.1-8B H=4096 V=128256, Qwen2.5-7B H=3584 V=152064), timed after warm-up
(p20/p50/p80; CUDA events on GPU), peak memory measured per provider in a fresh process, appended as CSV rows.

    python -m kernels.bench --op k_token_ce --device cpu --csv kernels/results/cpu.csv
    python -m kernels.bench --op kd_softmax --device cuda --csv kernels/results/cuda.csv
    python -m kernels.bench --op rms_calibrate --device cpu --shapes 0 --modes fwd_bwd   # one shape, one mode
    python -m kernels.bench --markdown kernels/results/cpu.csv                            # the README table

Providers: `naive` (eager PyTorch, full logits), `torch_lce` (torch's chunked F.linear_cross_entropy, where it
exists), `torch_compile` (the naive function under torch.compile; CUDA only), `liger` (liger-kernel's fused
linear cross-entropy, when installed; k_token_ce only), `latentwire` (this package; the Triton kernels on CUDA,
the chunked PyTorch reference on CPU). Modes: `fwd` (no gradient, e.g. evaluation) and `fwd_bwd` (gradient to
hidden / x; the LM head frozen as in training). Peak memory is the growth over the worker's footprint after its
inputs exist: max RSS (VmHWM after a reset) on CPU, torch.cuda.max_memory_allocated on CUDA. Throughput counts the
nominal FLOPs of the eager algorithm (TFLOP/s for the LM-head ops) or the bytes an ideal kernel moves (GB/s for
rms_calibrate), the same number for every provider so the column compares them directly.
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

OPS = ("rms_calibrate", "k_token_ce", "kd_softmax")
MODES = ("fwd", "fwd_bwd")
REPO_ROOT = Path(__file__).resolve().parent.parent
FIELDS = ["op", "provider", "shape", "mode", "dtype", "ms_p20", "ms_p50", "ms_p80", "gbps_or_tflops", "unit",
          "peak_mb", "device", "load_avg", "versions", "git_sha", "date"]

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
}
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


def available_providers(op: str, device: str) -> list[str]:
    providers = ["naive"]
    if op in ("k_token_ce", "kd_softmax") and _torch_lce_available():
        providers.append("torch_lce")
    if device == "cuda":
        providers.append("torch_compile")
    if op == "k_token_ce" and device == "cuda" and _liger_available():
        providers.append("liger")
    providers.append("latentwire")
    return providers


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
    teacher_logits = randn(shape["T"], n_rows, vocab, scale=2.0)
    return dict(hidden=hidden, weight=weight, teacher_logits=teacher_logits)


def _loss_fn(op, provider):
    """The provider's function of the inputs dict, returning a loss (or y for rms_calibrate)."""
    import torch
    import torch.nn.functional as F

    import kernels

    if op == "rms_calibrate":
        fn = {"naive": kernels.rms_calibrate_naive, "torch_compile": torch.compile(kernels.rms_calibrate_naive),
              "latentwire": kernels.rms_calibrate}[provider]
        return lambda inp: fn(inp["x"], TARGET_RMS)

    if op == "k_token_ce":
        if provider == "torch_lce":
            options = torch.nn.LinearCrossEntropyOptions()
            return lambda inp: F.linear_cross_entropy(inp["hidden"], inp["weight"], inp["targets"], ignore_index=-100,
                                                      options=options)
        if provider == "liger":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
            liger_loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
            return lambda inp: liger_loss(inp["weight"], inp["hidden"], inp["targets"])
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


def _work_units(op, shape, mode, dtype):
    """(amount, unit) of nominal work per call: FLOPs of the eager algorithm or bytes of an ideal kernel."""
    import torch
    if op == "rms_calibrate":
        numel = shape["B"] * shape["M"] * shape["D"]
        passes = 2 if mode == "fwd" else 5  # fwd: read x, write y; bwd adds read x, dy and write dx
        return passes * numel * torch.finfo(dtype).bits // 8, "GB/s"
    gemms = 1 if mode == "fwd" else 2  # logits, then dhidden (the head is frozen)
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
    inputs = _make_inputs(op, shape, dtype, device, mode)
    fn = _loss_fn(op, provider)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                fn(inputs)
            return
        for tensor in inputs.values():
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
        backend = kernels.last_backend(op)  # which path was timed: 'triton' or 'reference'
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


def _run_one(spec: dict, timeout_s: float) -> dict | None:
    cmd = [sys.executable, "-m", "kernels.bench", "--_worker", json.dumps(spec)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        print(f"  {spec['provider']}: timed out after {timeout_s:.0f} s", file=sys.stderr)
        return None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
    print(f"  {spec['provider']}: failed (exit {proc.returncode})\n{tail}", file=sys.stderr)
    return None


def _append_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS, extrasaction="ignore")
        if new_file:
            writer.writeheader()
        writer.writerows(rows)


def run_sweep(args) -> list[dict]:
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    shapes = SHAPES[args.op][args.device]
    if args.shapes:
        shapes = [shapes[int(i)] for i in args.shapes.split(",")]
    providers = available_providers(args.op, args.device)
    if args.providers:
        wanted = args.providers.split(",")
        unknown = set(wanted) - set(providers)
        if unknown:
            raise SystemExit(f"providers {sorted(unknown)} are not available here; available: {providers}")
        providers = wanted
    modes = args.modes.split(",")
    if set(modes) - set(MODES):
        raise SystemExit(f"--modes takes {MODES}")
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    warmup = args.warmup if args.warmup is not None else (1 if args.device == "cpu" else 5)
    rounds = args.rounds if args.rounds is not None else ROUNDS[args.device]
    common = dict(device=_device_name(args.device), versions=_versions(), git_sha=_git_sha(),
                  date=datetime.date.today().isoformat())
    rows = []
    for shape in shapes:
        for mode in modes:
            print(f"{args.op} {_shape_text(shape)} {mode} {dtype} on {args.device}", flush=True)
            load_avg = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""  # other work on the box
            samples = {p: [] for p in providers}
            peaks = {p: [] for p in providers}
            backends = {}
            for round_index in range(rounds):
                order = providers[round_index % len(providers):] + providers[:round_index % len(providers)]
                for provider in order:
                    spec = dict(op=args.op, provider=provider, shape=shape, mode=mode, dtype=dtype,
                                device=args.device, warmup=warmup, reps=args.reps)
                    result = _run_one(spec, args.timeout)
                    if result is not None:
                        samples[provider] += result["times_ms"]
                        peaks[provider].append(result["peak_mb"])
                        backends[provider] = result["backend"]
            new_rows = []
            for provider in providers:
                if not samples[provider]:
                    continue
                p20, p50, p80 = np.percentile(samples[provider], [20, 50, 80])
                work, unit = _work_units(args.op, shape, mode, getattr(torch, dtype))
                rate = work / (p50 / 1e3) / (1e9 if unit == "GB/s" else 1e12)
                row = dict(op=args.op, provider=provider, shape=_shape_text(shape), mode=mode, dtype=dtype,
                           ms_p20=f"{p20:.2f}", ms_p50=f"{p50:.2f}", ms_p80=f"{p80:.2f}", gbps_or_tflops=f"{rate:.4g}",
                           unit=unit, peak_mb=f"{max(peaks[provider]):.1f}", load_avg=load_avg, **common)
                new_rows.append(row)
                backend = f" [{backends[provider]}]" if backends.get(provider) else ""
                print(f"  {provider + backend:>24}: p50 {row['ms_p50']} ms (p20 {row['ms_p20']}, p80 {row['ms_p80']}, "
                      f"{len(samples[provider])} calls), {row['gbps_or_tflops']} {unit}, peak {row['peak_mb']} MB",
                      flush=True)
            if args.csv:
                _append_rows(Path(args.csv), new_rows)
            rows += new_rows
    return rows


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
        naive = latest.get(key[:5] + ("naive",))
        time_ratio = peak_ratio = "-"
        if naive:
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
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if visible, else cpu")
    parser.add_argument("--csv", help="append one row per (shape, mode, provider) to this CSV file")
    parser.add_argument("--providers", help="comma-separated subset of the available providers")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of fwd,fwd_bwd")
    parser.add_argument("--shapes", help="comma-separated indices into the op's shape list for this device")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default fp32 CPU, bf16 CUDA")
    parser.add_argument("--warmup", type=int, help="untimed calls first (default 1 CPU, 5 CUDA)")
    parser.add_argument("--reps", type=int, help="timed calls per worker (default: about 2 s CPU / 1 s CUDA)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds of all providers (default 3 CPU, 1 CUDA)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per worker process")
    parser.add_argument("--markdown", metavar="CSV", help="print the README table of a results CSV and exit")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        print("RESULT " + json.dumps(run_worker(json.loads(args._worker))), flush=True)
        return
    if args.markdown:
        print(markdown_table(Path(args.markdown)))
        return
    if not args.op:
        parser.error("--op is required")
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    run_sweep(args)


if __name__ == "__main__":
    main()
