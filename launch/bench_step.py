"""The framework's own cost: LatentWire's training step against a bare PyTorch loop over the same modules.

    python -m launch.bench_step                                  # toy and tiny: 1 rank ZeRO-0 vs bare, 2 ranks ZeRO-3
    python -m launch.bench_step --preset tiny --layouts single --steps 10
    python -m launch.bench_step --preset real --device cuda      # Llama-3.1-8B + Qwen2.5-7B shapes, random bf16 weights
    python -m launch.bench_step --preset real --dry              # the same on the meta device: sizes and planner only

LatentWire's step is the trainer's own: `latentwire.train.setup` (DeepSpeed engine, the non-finite guard, the OOM
guards), then per step `train.run_step` (collation, forward, backward, DeepSpeed's step, the all-reduce of the loss
parts) and the row `train.train` logs (`_step_row` into metrics.jsonl and TensorBoard through `Monitor`). The bare
loop runs the same LatentWire module (same receivers, encoder and adapters) on the same batches: collation, the
forward, `loss.backward()`, `clip_grad_norm_`, `torch.optim.AdamW.step()`, `loss.item()`: no DeepSpeed, no guards,
no logging, no collectives. At 1 rank (ZeRO-0) the two alternate in blocks of steps in one process, so load changes
on a shared machine hit both alike; the ratio of their median step times is the overhead (target <= 1.10x). At 2
ranks under ZeRO-3 (the deepspeed launcher) only LatentWire's step runs; its median step time is compared with the
1-rank bare loop's at the same micro-batch per rank, so the ratio is what partitioning costs on top (on a CPU machine
it also holds the two ranks' contention for the cores).

Presets: `toy` (configs/toy.json: the committed toy receivers, toy data written to a temporary directory), `tiny`
(configs/tiny.json), `real` (configs/llama8b_qwen7b.json; the receivers are built from the architectures' numbers
below with random bf16 weights on the GPU, since the weights cannot be fetched there and throughput does not depend
on them; tokenizers from `--tokenizers DIR` (DIR/llama3, DIR/qwen2.5: the real ones, carried by
launch/gpu_check.sh) or else the tiny local ones; the real preset also reports peak GPU memory against the
device planner's estimate). Without CUDA each rank runs one torch thread (`--threads`): on a shared machine a
2-thread step waits on whichever thread the other jobs delayed, which swamps the difference being measured. Rows
(git sha, versions, load average before and after, threads) are appended to `--csv` (default
launch/results/bench_step.csv).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as `python launch/bench_step.py` by the deepspeed launcher
    sys.path.insert(0, str(REPO_ROOT))

DEFAULT_CSV = REPO_ROOT / "launch" / "results" / "bench_step.csv"
FIELDS = ["preset", "layout", "side", "device", "steps", "ms_p20", "ms_p50", "ms_p80", "ratio_vs_bare",
          "ratio_p20_vs_bare", "examples_per_s", "tokens_per_s", "peak_mem_mb", "planner_peak_mb",
          "micro_batch_per_rank", "world", "threads", "load_avg_start", "load_avg_end", "versions", "git_sha", "date",
          "note"]

# The real preset's receivers: the published architectures (no network on the GPU machines, so not AutoConfig).
REAL_ARCHITECTURES = {
    "llama": ("llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                            intermediate_size=14336, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
                            max_position_embeddings=131072, tie_word_embeddings=False, bos_token_id=128000,
                            eos_token_id=128009)),
    "qwen": ("qwen2", dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                           intermediate_size=18944, vocab_size=152064, rope_theta=1000000.0, rms_norm_eps=1e-6,
                           max_position_embeddings=32768, tie_word_embeddings=False, bos_token_id=151643,
                           eos_token_id=151645)),
}
REAL_TOKENIZERS = {"llama": "llama3", "qwen": "qwen2.5"}  # sub-directories of --tokenizers

# Every preset: no evaluation, no diagnostics (the bare loop would not run them), saving never due.
COMMON = ["eval.every=0", "eval.at_start=false", "eval.at_end=false", "train.diagnostics_every=0",
          "train.max_steps=1000000", "train.save_every=1000000", "train.grad_accum=1"]
PRESETS = {
    "tiny": ("configs/tiny.json", []),
    # + the toy data files (written by `_toy_data`); no data stage (it is left on validation, which is off here)
    "toy": ("configs/toy.json", ["curriculum.data_stages=[]"]),
    "real": ("configs/llama8b_qwen7b.json", ["data.train_files=[]", "data.eval_files=[]", "data.val_files=[]"]),
}


# ----------------------------------------------------------------------------------------------------------------
# building a preset


def _toy_data(root: Path) -> list[str]:
    from latentwire.toy import write_splits

    write_splits(root, n_train=2000, n_val=64, n_test=64)
    return [f"data.train_files=[\"{root / 'train.json'}\"]", f"data.val_files=[\"{root / 'val.json'}\"]",
            f"data.eval_files=[\"{root / 'test.json'}\"]"]


def preset_config(preset: str, work: Path, extra: list[str]):
    from latentwire import config as config_lib

    path, sets = PRESETS[preset]
    if preset == "toy":
        sets = sets + _toy_data(work / "toy_data")
    return config_lib.load_config(REPO_ROOT / path, sets + COMMON + extra)


def real_hf_config(name: str):
    from transformers import AutoConfig

    model_type, values = REAL_ARCHITECTURES[name]
    return AutoConfig.for_model(model_type, **values)


def real_tokenizer(name: str, tokenizers: str | None):
    """The real tokenizer when carried (DIR/llama3, DIR/qwen2.5), else the tiny local one of the same family."""
    from latentwire.receivers import load_tokenizer, resolve_model_path

    if tokenizers and (Path(tokenizers) / REAL_TOKENIZERS[name]).is_dir():
        return load_tokenizer(str(Path(tokenizers) / REAL_TOKENIZERS[name])), "real"
    return load_tokenizer(resolve_model_path("tiny:llama" if name == "llama" else "tiny:qwen2")), "tiny"


def real_receivers(cfg, device: str, tokenizers: str | None):
    """The real preset's receivers with random bf16 weights, built directly on `device` (meta: sizes only)."""
    import torch
    from transformers import AutoModelForCausalLM

    from latentwire.receivers import Receiver

    receivers, kinds = [], []
    for rcfg in cfg.receivers:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(real_hf_config(rcfg.name), dtype=torch.bfloat16)
        tokenizer, kind = real_tokenizer(rcfg.name, tokenizers)
        kinds.append(kind)
        receivers.append(Receiver(rcfg, model, tokenizer, cfg.data.max_answer_tokens))
    return receivers, kinds


def planner_peak_bytes(cfg, world: int, gpu_mem: int) -> int:
    """launch/plan.py's estimate of the fullest device's peak for this config's receivers."""
    from launch.plan import ModelSpec, count_params_on_meta, dtype_bytes, plan_placement

    specs = []
    for rcfg in cfg.receivers:
        hf = real_hf_config(rcfg.name)
        specs.append(ModelSpec(rcfg.name, "receiver", count_params_on_meta(hf), dtype_bytes(rcfg.dtype),
                               hf.hidden_size, hf.num_hidden_layers))
    return plan_placement(specs, gpus=1, gpu_mem_bytes=gpu_mem, world_size=world).peak_bytes


# ----------------------------------------------------------------------------------------------------------------
# the two steps


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def tokens_in(batch: dict) -> int:
    """Tokens the frozen receivers read in one micro-batch: per receiver, the latent pass (soft slots + suffix)
    and the text-teacher pass."""
    total = 0
    for rb in batch["receivers"].values():
        total += int(rb["latent_mask"].sum()) + int(rb["text_mask"].sum())
    return total


class LatentWireStep:
    """The trainer's step and its logging, exactly as `train.train` runs them (minus evaluation and saving)."""

    def __init__(self, run):
        from latentwire import train as T
        from latentwire.monitor import Monitor

        self.run, self.T = run, T
        self.contracts = {name: r.contract for name, r in run.model.receivers.items()}
        tr = run.cfg.train
        self.monitor = Monitor(run.out, tr.max_steps, 0, tr.log_every, run.is_main, tr.tensorboard)

    def __call__(self, step: int) -> None:
        from latentwire import curriculum

        run = self.run
        skipped_before = run.engine.skipped_steps
        started = time.perf_counter()
        loss, parts = self.T.run_step(run, step, self.contracts)
        curriculum.after_step(run.model, parts)
        row = self.T._step_row(run, step, loss, parts, run.engine.skipped_steps > skipped_before,
                               time.perf_counter() - started)
        self.monitor.log(row)


class BareStep:
    """The same forward and backward on the same module, in a plain PyTorch loop."""

    def __init__(self, run):
        import torch

        from latentwire import features
        from latentwire import train as T

        self.run, self.T = run, T
        self.contracts = {name: r.contract for name, r in run.model.receivers.items()}
        tr = run.cfg.train
        self.params = run.model.trainable_parameters()
        self.opt = torch.optim.AdamW(features.optimizer_groups(run.model), lr=tr.lr, betas=(0.9, 0.95), eps=1e-8,
                                     weight_decay=tr.weight_decay)
        self.clip = tr.grad_clip

    def batch(self, step: int) -> dict:
        from latentwire import data as data_lib

        run = self.run
        batch = data_lib.collate([run.splits.train[i] for i in self.T._indices(run, step, 0, run.rank)],
                                 self.contracts, run.cfg.data.max_prompt_bytes, run.cfg.losses.k_tokens, run.stats)
        for name, norm in self.T.loss_norms(run, step, self.contracts).items():
            batch["receivers"][name].update(norm)
        return data_lib.to_device(batch, run.engine.device)

    def __call__(self, step: int) -> None:
        import torch

        loss = self.run.model(self.batch(step), step)["loss"]
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        loss.item()


def time_steps(fn, steps: range, device) -> list[float]:
    out = []
    for step in steps:
        _sync(device)
        started = time.perf_counter()
        fn(step)
        _sync(device)
        out.append((time.perf_counter() - started) * 1000.0)
    return out


# ----------------------------------------------------------------------------------------------------------------
# one measurement (a child process: 1 rank, or one rank of the deepspeed launcher)


def measure(args) -> dict:
    """Set the preset up through the trainer and time the steps; returns the RESULT of this rank."""
    from latentwire.distributed import setup_environment

    setup_environment()
    import torch

    from latentwire import train as T

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_step_"))
    cfg = preset_config(args.preset, work, list(args.set))
    note = ""
    if args.preset == "real":
        receivers, kinds = real_receivers(cfg, "cuda" if torch.cuda.is_available() else "cpu", args.tokenizers)
        note = f"random bf16 weights; tokenizers {','.join(kinds)}"
        T.load_receivers = lambda cfg, ds_config: receivers  # built above, not loaded from a path
        T.max_hidden_size = lambda configs: max(r.hidden_size for r in receivers)
    run = T.setup(cfg, work / "run", args.deepspeed)
    device = run.engine.device
    lw = LatentWireStep(run)
    sides = {"latentwire": lw}
    if not args.deepspeed:
        sides["bare"] = BareStep(run)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = {side: [] for side in sides}
    step = 0
    for side, fn in sides.items():  # warm-up: first calls allocate, compile and fill caches
        time_steps(fn, range(step, step + args.warmup), device)
        step += args.warmup
    block = max(1, args.block)
    for i in range(max(1, args.steps // block)):
        order = list(sides) if i % 2 == 0 else list(reversed(sides))
        for side in order:
            times[side] += time_steps(sides[side], range(step, step + block), device)
            step += block
    probe = (sides.get("bare") or BareStep(run)).batch(0)
    result = {"times": times, "tokens_per_step": tokens_in(probe) * run.world,
              "examples_per_step": run.micro_batch * run.world, "world": run.world, "zero": run.zero,
              "micro_batch": run.micro_batch, "device": device.type, "threads": torch.get_num_threads(), "note": note}
    if torch.cuda.is_available():
        result["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["gpu"] = torch.cuda.get_device_name()
        if args.preset == "real":
            total = torch.cuda.get_device_properties(0).total_memory
            result["planner_peak_mb"] = planner_peak_bytes(cfg, run.world, total) / 2**20
    return result


def dry_real(args) -> dict:
    """The real preset without a GPU: the receivers at their real shapes and the trainables on the meta device,
    parameter counts against the planner's (launch/plan.py), the prefix contract on the tokenizers, and the
    planner's estimate of the peak on an 80 GB and a 141 GB GPU."""
    import torch
    from transformers import AutoModelForCausalLM

    from latentwire.adapters import Adapter
    from latentwire.encoder import ByteEncoder
    from latentwire.receivers import PrefixContract
    from launch.plan import DEFAULT_TRAINABLE_BYTES, count_params_on_meta, model_spec_from_config

    cfg = preset_config("real", Path(tempfile.mkdtemp(prefix="bench_step_")), list(args.set))
    out: dict = {"params": {}, "tokenizers": {}}
    n_slots = cfg.encoder.m_shared + cfg.encoder.m_private
    with torch.device("meta"):
        trainable = ByteEncoder(cfg.encoder, len(cfg.receivers), cfg.data.max_prompt_bytes)
        n_trainable = sum(p.numel() for p in trainable.parameters())
    for rcfg in cfg.receivers:
        hf = real_hf_config(rcfg.name)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf, dtype=torch.bfloat16)
            adapter = Adapter(cfg.adapter, cfg.encoder.d_z, n_slots, hf.hidden_size, 1.0)
        n_trainable += sum(p.numel() for p in adapter.parameters())
        params = sum(p.numel() for p in model.parameters())
        assert params == count_params_on_meta(hf), rcfg.name
        # The planner's built-in table (it sizes hub ids without a network) agrees with these numbers.
        assert model_spec_from_config(rcfg.path, rcfg.name, "receiver", rcfg.dtype).n_params == params, rcfg.name
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        tokenizer, kind = real_tokenizer(rcfg.name, args.tokenizers)
        PrefixContract(tokenizer, rcfg.anchor, rcfg.bos_policy, cfg.data.max_answer_tokens)
        out["params"][rcfg.name] = params
        out["tokenizers"][rcfg.name] = kind
    # fp32 weights, gradients and two Adam moments per trainable parameter, against the planner's allowance.
    out["trainable_params"] = n_trainable
    out["trainable_bytes"] = 16 * n_trainable
    assert out["trainable_bytes"] <= DEFAULT_TRAINABLE_BYTES, out
    out["planner_peak_mb"] = {f"{g} GiB GPU": round(planner_peak_bytes(cfg, 1, g * 2**30) / 2**20)
                              for g in (80, 141)}
    return out


# ----------------------------------------------------------------------------------------------------------------
# the parent: children per (preset, layout), CSV rows


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (out or "unknown") + ("+dirty" if dirty else "")


def _versions() -> str:
    import torch

    parts = [f"python={platform.python_version()}", f"torch={torch.__version__}"]
    for name in ("deepspeed", "transformers"):
        try:
            from importlib.metadata import version

            parts.append(f"{name}={version(name)}")
        except Exception:  # noqa: BLE001  (a missing package is reported as such)
            parts.append(f"{name}=none")
    return ";".join(parts)


def _child_cmd(args, layout: str) -> list[str]:
    cmd = [str(REPO_ROOT / "launch" / "bench_step.py"), "--_child", "--preset", args.preset, "--steps",
           str(args.steps), "--warmup", str(args.warmup), "--block", str(args.block), "--threads", str(args.threads)]
    for s in args.set:
        cmd += ["--set", s]
    if args.tokenizers:
        cmd += ["--tokenizers", args.tokenizers]
    if layout == "single":
        return [sys.executable] + cmd
    launcher = str(Path(sys.executable).parent / "deepspeed")
    port = str(_free_port())
    return [launcher, "--num_gpus", "2", "--master_port", port] + cmd + ["--deepspeed", "ds_configs/zero3.json"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_child(args, layout: str) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(_child_cmd(args, layout), cwd=REPO_ROOT, capture_output=True, text=True, env=env,
                          timeout=args.timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"bench_step {args.preset} {layout} failed (exit {proc.returncode}):\n"
                       f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


def quantiles(samples: list[float]) -> tuple[float, float, float]:
    """p20, p50, p80 of step times."""
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    deciles = statistics.quantiles(samples, n=10, method="inclusive")
    return deciles[1], statistics.median(samples), deciles[7]


def rows_for(preset: str, layout: str, result: dict, bare: tuple | None, common: dict) -> list[dict]:
    rows = []
    for side, samples in result["times"].items():
        p20, p50, p80 = quantiles(samples)
        ratio = p50 / bare[1] if bare else None
        ratio20 = p20 / bare[0] if bare else None
        rows.append(dict(common, preset=preset, layout=layout, side=side, device=result.get("gpu", result["device"]),
                         steps=len(samples), ms_p20=f"{p20:.2f}", ms_p50=f"{p50:.2f}", ms_p80=f"{p80:.2f}",
                         ratio_vs_bare=f"{ratio:.3f}" if ratio else "",
                         ratio_p20_vs_bare=f"{ratio20:.3f}" if ratio20 else "",
                         examples_per_s=f"{result['examples_per_step'] / (p50 / 1e3):.2f}",
                         tokens_per_s=f"{result['tokens_per_step'] / (p50 / 1e3):.1f}",
                         peak_mem_mb=f"{result['peak_mem_mb']:.0f}" if "peak_mem_mb" in result else "",
                         planner_peak_mb=f"{result['planner_peak_mb']:.0f}" if "planner_peak_mb" in result else "",
                         micro_batch_per_rank=result["micro_batch"], world=result["world"],
                         threads=result["threads"], note=result.get("note", "")))
    return rows


def append_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), action="append",
                        help="toy, tiny (default: both) or real (a GPU)")
    parser.add_argument("--layouts", default="single,zero3",
                        help="single (1 rank ZeRO-0, with the bare loop) and/or zero3 (2 ranks)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side first")
    parser.add_argument("--block", type=int, default=5, help="steps per side before the sides alternate")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--tokenizers", default=None, help="real preset: DIR/llama3 and DIR/qwen2.5 tokenizers")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per rank (default 1 without CUDA: on a shared machine one thread per "
                             "rank keeps the two sides from waiting on each other's stragglers)")
    parser.add_argument("--csv", default=str(DEFAULT_CSV), help="append the rows here ('' for none)")
    parser.add_argument("--dry", action="store_true", help="real preset on the meta device: sizes and planner only")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--deepspeed", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    presets = args.preset or ["toy", "tiny"]
    if args.threads is None:
        import torch

        args.threads = 0 if torch.cuda.is_available() else 1
    if args._child:
        args.preset = presets[0]
        result = measure(args)
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(result), flush=True)
        sys.stdout.flush()
        os._exit(0)  # no interpreter teardown of the engine's process group
    if args.dry:
        args.preset = "real"
        print(json.dumps(dry_real(args), indent=2))
        return 0
    all_rows = []
    for preset in presets:
        args.preset = preset
        layouts = [x for x in args.layouts.split(",") if x]
        if preset == "real":
            layouts = ["single"]  # one GPU
        bare = None  # (p20, p50) of the 1-rank bare loop
        for layout in layouts:
            load_start = _load()
            result = run_child(args, layout)
            common = dict(load_avg_start=f"{load_start:.2f}", load_avg_end=f"{_load():.2f}", versions=_versions(),
                          git_sha=_git_sha(), date=datetime.datetime.now().isoformat(timespec="minutes"))
            if "bare" in result["times"]:
                bare = quantiles(result["times"]["bare"])[:2]
            name = "1 rank ZeRO-0" if layout == "single" else "2 ranks ZeRO-3"
            rows = rows_for(preset, name, result, bare, common)
            if args.csv:
                append_rows(Path(args.csv), rows)  # as each layout ends
            all_rows += rows
            for row in rows:
                print(f"{preset:5} {name:15} {row['side']:10} p50 {row['ms_p50']:>9} ms  "
                      f"x{row['ratio_vs_bare'] or '-':>6} vs bare (p20 x{row['ratio_p20_vs_bare'] or '-'})  "
                      f"{row['examples_per_s']:>8} ex/s  "
                      f"{row['tokens_per_s']:>10} tok/s  {row['peak_mem_mb'] and row['peak_mem_mb'] + ' MB peak'} "
                      f"{row['planner_peak_mb'] and '(planner ' + row['planner_peak_mb'] + ' MB)'}  "
                      f"load {row['load_avg_start']}->{row['load_avg_end']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
