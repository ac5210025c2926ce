"""The stages of `bash launch/gpu_check.sh` (read that script's header first), and its --prepare and --merge steps.

    python launch/gpu_check.py run --out OUT [--dry] [--budget 420]   # the stages, after the shell script's install
    python launch/gpu_check.py prepare                                  # .whl/: GPU wheels + real tokenizers (CPU side)
    python launch/gpu_check.py merge DIR                                # a GPU run's OUT -> results files + tables

Each stage runs as a child process under its own time limit, cut to what is left of `--budget` seconds; its output
goes to OUT/gpu_check.log (and to stdout), and OUT/summary.json is rewritten as each stage ends, so a run stopped
by the device's time limit returns every stage that finished. OUT holds at most these 5 files: summary.json,
gpu_check.log, env.txt, kernels.csv, train.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

SHARED_WHEELS = REPO_ROOT.parent / "shared" / "wheels" / "gpu"
WHEEL_DIR = REPO_ROOT / ".whl"  # git-ignored; named in the device call's `carry`
TOKENIZER_DIR = WHEEL_DIR / "tokenizers"
# The packages the GPU image lacks (../shared/GPU.md); the kernel peers are optional ("not measured" without).
REQUIRED_WHEELS = ("deepspeed", "hjson", "pydantic", "pydantic_core", "annotated_types", "typing_inspection")
PEER_WHEELS = ("liger_kernel", "cut_cross_entropy")
REAL_TOKENIZERS = {"llama3": "tiny-llama3", "qwen2.5": "tiny-qwen2.5"}  # .whl/tokenizers/<name> <- hub cache dir
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
GPU_TESTS = ["tests/test_kernels_triton.py", "tests/test_gpu_ready.py"]


# ----------------------------------------------------------------------------------------------------------------
# the stages: (name, command, time limit in seconds) on a GPU, and the --dry variant on a CPU


def stages(out: Path, dry: bool, python: str) -> list[tuple[str, list[list[str]], float]]:
    kernels_csv, train_csv = str(out / "kernels.csv"), str(out / "train.csv")
    tokenizers = ["--tokenizers", str(TOKENIZER_DIR)] if TOKENIZER_DIR.is_dir() else []
    imports = [python, "-c", "import deepspeed, transformers, triton, torch, kernels, kernels.bench, launch.plan, "
               "launch.bench_step, latentwire.train; print('imports ok: torch', torch.__version__, 'triton', "
               "triton.__version__, 'deepspeed', deepspeed.__version__, 'cuda', torch.cuda.is_available())"]
    pytest = [python, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-m", "gpu", *GPU_TESTS]
    if dry:
        return [
            ("setup", [imports], 60),
            ("tests", [pytest + ["--collect-only"]], 60),
            ("kernels", [[python, "-m", "kernels.bench", "--compass", "--device", "cpu", "--csv", kernels_csv,
                          "--reps", "2", "--warmup", "1", "--rounds", "1", "--in_process"]], 90),
            ("train", [[python, "-m", "launch.bench_step", "--dry", *tokenizers],
                       [python, "-m", "launch.bench_step", "--preset", "tiny", "--layouts", "single", "--steps", "1",
                        "--warmup", "0", "--block", "1", "--csv", train_csv, "--set", "encoder.n_layers=1",
                        "--set", "data.max_prompt_bytes=128"]], 120),
            ("merge", [[python, str(Path(__file__).resolve()), "merge", str(out), "--results_root",
                        tempfile.mkdtemp(prefix="gpu_check_merge_")]], 60),
        ]
    return [
        ("setup", [imports], 90),
        ("tests", [pytest], 150),
        ("kernels", [[python, "-m", "kernels.bench", "--compass", "--device", "cuda", "--csv", kernels_csv]], 170),
        ("train", [[python, "-m", "launch.bench_step", "--preset", "real", "--steps", "8", "--warmup", "2",
                    "--block", "4", "--csv", train_csv, *tokenizers]], 170),
    ]


def write_env(out: Path, dry: bool) -> None:
    """OUT/env.txt: the machine, the image's versions and the wheels installed over it."""
    lines = [f"dry: {dry}", f"python: {sys.version.split()[0]} ({platform.platform()})"]
    smi = shutil.which("nvidia-smi")
    if smi:
        lines.append(subprocess.run([smi], capture_output=True, text=True, timeout=30).stdout)
    try:
        import torch

        lines.append(f"torch {torch.__version__}, cuda {torch.version.cuda}, available {torch.cuda.is_available()}")
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            lines.append(f"gpu: {props.name}, {props.total_memory / 2**30:.1f} GiB, sm_{props.major}{props.minor}")
    except ImportError as err:
        lines.append(f"torch: {err}")
    lines.append("wheels: " + " ".join(sorted(p.name for p in WHEEL_DIR.glob("*.whl"))))
    lines.append("tokenizers: " + " ".join(sorted(p.name for p in TOKENIZER_DIR.glob("*"))) if TOKENIZER_DIR.is_dir()
                 else "tokenizers: none carried (the train stage uses the tiny local ones)")
    (out / "env.txt").write_text("\n".join(lines) + "\n")


def _results(out: Path, name: str) -> dict:
    """The numbers a stage leaves for the summary."""
    log = (out / "gpu_check.log").read_text(errors="replace") if (out / "gpu_check.log").exists() else ""
    if name == "tests":
        found = re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected|tests collected)", log)
        return {kind: int(n) for n, kind in found[-6:]}
    if name == "kernels" and (out / "kernels.csv").exists():
        from kernels.bench import compass_verdicts

        with (out / "kernels.csv").open() as handle:
            rows = list(csv.DictReader(handle))
        return {"rows": len(rows), "targets": compass_verdicts(rows)}
    if name == "train" and (out / "train.csv").exists():
        with (out / "train.csv").open() as handle:
            rows = list(csv.DictReader(handle))
        keep = ("preset", "layout", "side", "ms_p50", "ratio_vs_bare", "examples_per_s", "tokens_per_s",
                "peak_mem_mb", "planner_peak_mb", "note")
        return {"rows": [{k: r[k] for k in keep} for r in rows]}
    return {}


def run(out: Path, dry: bool, budget: float, python: str) -> int:
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    summary = {"dry": dry, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": budget, "stages": []}
    write_env(out, dry)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [env.get("PYTHONPATH", ""), str(REPO_ROOT)] if p)
    failed = 0
    with (out / "gpu_check.log").open("a") as log:
        for name, commands, limit in stages(out, dry, python):
            left = budget - (time.time() - started) - 5
            stage = {"name": name, "status": "ok", "seconds": 0.0}
            if left < 20:
                stage["status"] = "skipped: out of time"
                summary["stages"].append(stage)
                _write_summary(out, summary)
                continue
            stage_start = time.time()
            for cmd in commands:
                timeout = max(10.0, min(limit, left) - (time.time() - stage_start))
                header = f"\n===== {name}: {' '.join(cmd)} (limit {timeout:.0f} s)\n"
                log.write(header)
                log.flush()
                print(header, end="", flush=True)
                code = _stream(cmd, env, timeout, log)
                if code != 0:
                    stage["status"] = "timeout" if code is None else f"failed (exit {code})"
                    break
            stage["seconds"] = round(time.time() - stage_start, 1)
            try:
                stage.update(_results(out, name))
            except Exception as err:  # noqa: BLE001  (the summary must still be written)
                stage["results_error"] = f"{type(err).__name__}: {err}"
            failed += stage["status"] != "ok"
            summary["stages"].append(stage)
            summary["elapsed_s"] = round(time.time() - started, 1)
            _write_summary(out, summary)  # as each stage ends
            print(f"===== {name}: {stage['status']} in {stage['seconds']} s", flush=True)
    return 1 if failed else 0


def _write_summary(out: Path, summary: dict) -> None:
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out / "summary.json")


def _stream(cmd: list[str], env: dict, timeout: float, log) -> int | None:
    """Run `cmd`, copying its output to `log` and stdout line by line; None when it ran out of time (then its
    whole process group is killed)."""
    import threading

    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)

    def pump():
        for line in proc.stdout:
            log.write(line)
            log.flush()
            sys.stdout.write(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        reader.join(timeout=5)
        log.write(f"[gpu_check] time limit of {timeout:.0f} s reached: stopped\n")
        log.flush()
        return None
    reader.join(timeout=10)
    return code


# ----------------------------------------------------------------------------------------------------------------
# prepare (CPU side, before the device call) and merge (CPU side, after it)


def prepare() -> None:
    """Copy the GPU wheels (../shared/wheels/gpu) and, when cached, the real Llama-3.1 / Qwen2.5 tokenizers
    (`python -m latentwire.hub fetch tiny:llama3 tiny:qwen2.5`) into .whl/, which the device call carries."""
    WHEEL_DIR.mkdir(exist_ok=True)
    wheels = sorted(SHARED_WHEELS.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"no wheels in {SHARED_WHEELS}")
    for wheel in wheels:
        _copy(wheel, WHEEL_DIR / wheel.name)
    from latentwire.hub import cache_dir

    for name, slug in REAL_TOKENIZERS.items():
        src = cache_dir() / slug
        if not (src / "tokenizer.json").is_file():
            print(f"tokenizer {name}: not cached ({src}); `python -m latentwire.hub fetch tiny:{name}` first, or "
                  "the train stage uses the tiny local tokenizers")
            continue
        dest = TOKENIZER_DIR / name
        dest.mkdir(parents=True, exist_ok=True)
        for fname in TOKENIZER_FILES:
            if (src / fname).is_file():
                _copy(src / fname, dest / fname)
    size = sum(p.stat().st_size for p in WHEEL_DIR.rglob("*") if p.is_file())
    print(f"{WHEEL_DIR}: {len(wheels)} wheels, tokenizers {sorted(p.name for p in TOKENIZER_DIR.glob('*'))}, "
          f"{size / 2**20:.1f} MiB (the device call carries at most 64 MiB with the working tree)")


def _copy(src: Path, dest: Path) -> None:
    """Copy a file writable (the shared wheels are read-only, and a second --prepare overwrites them)."""
    shutil.copyfile(src, dest)
    dest.chmod(0o644)


def check_wheels(wheel_dir: Path) -> list[str]:
    """The wheel files the install step would take; raises naming a required package that is missing."""
    names = sorted(p.name for p in wheel_dir.glob("*.whl"))
    have = {n.split("-")[0].lower() for n in names}
    missing = [w for w in REQUIRED_WHEELS if w not in have]
    if missing:
        raise SystemExit(f"{wheel_dir}: no wheel for {missing} (run `bash launch/gpu_check.sh --prepare`)")
    for peer in PEER_WHEELS:
        if peer not in have:
            print(f"{wheel_dir}: no {peer} wheel: its benchmark rows will say 'not measured'")
    return names


def merge(run_dir: Path, results_root: Path = REPO_ROOT) -> None:
    """RUN_DIR/kernels.csv -> kernels/results/<gpu>.csv and RUN_DIR/train.csv -> launch/results/bench_step.csv
    (under `results_root`), then print the README tables and the stage summary."""
    from kernels.bench import merge as merge_kernels
    from launch.bench_step import append_rows

    run_dir = Path(run_dir)
    if (run_dir / "kernels.csv").exists():
        target, table = merge_kernels(run_dir, results_root / "kernels" / "results")
        print(f"kernels: appended to {target}\n\n{table}\n")
    else:
        print(f"{run_dir}: no kernels.csv (the kernels stage did not finish)")
    if (run_dir / "train.csv").exists():
        with (run_dir / "train.csv").open() as handle:
            rows = list(csv.DictReader(handle))
        target = results_root / "launch" / "results" / "bench_step.csv"
        append_rows(target, rows)
        print(f"train: appended to {target}\n")
        print("| preset | layout | side | device | ms / step | x bare | examples/s | tokens/s | peak MB | planner MB |")
        print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['preset']} | {r['layout']} | {r['side']} | {r['device']} | {r['ms_p50']} | "
                  f"{r['ratio_vs_bare'] or '-'} | {r['examples_per_s']} | {r['tokens_per_s']} | "
                  f"{r['peak_mem_mb'] or '-'} | {r['planner_peak_mb'] or '-'} |")
    if (run_dir / "summary.json").exists():
        summary = json.loads((run_dir / "summary.json").read_text())
        print("\nstages: " + ", ".join(f"{s['name']} {s['status']} ({s['seconds']} s)" for s in summary["stages"]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run")
    p_run.add_argument("--out", required=True)
    p_run.add_argument("--dry", action="store_true")
    p_run.add_argument("--budget", type=float, default=420.0, help="seconds for all stages")
    p_run.add_argument("--python", default=sys.executable)
    sub.add_parser("prepare")
    p_wheels = sub.add_parser("wheels")
    p_wheels.add_argument("dir")
    p_merge = sub.add_parser("merge")
    p_merge.add_argument("dir")
    p_merge.add_argument("--results_root", default=str(REPO_ROOT), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.command == "run":
        return run(Path(args.out), args.dry, args.budget, args.python)
    if args.command == "prepare":
        prepare()
    elif args.command == "wheels":
        print("\n".join(check_wheels(Path(args.dir))))
    else:
        merge(Path(args.dir), Path(args.results_root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
