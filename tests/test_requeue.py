"""SIGUSR1 (slurm's warning before the time limit): checkpoint, exit with the requeue code, resume on rerun."""

import os
import signal
import subprocess
import sys
import time

from latentwire.exit_codes import REQUEUE_EXIT_CODE
from tests.conftest import ROOT, read_jsonl, run_cli, train_cmd


def test_sigusr1_checkpoints_exits_76_and_the_rerun_resumes(tmp_path, tiny_dir):
    out = tmp_path / "q"
    args = train_cmd(out, 12, ["eval.at_end=false", "train.save_every=100"])
    proc = subprocess.Popen([sys.executable] + args, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == REQUEUE_EXIT_CODE, output[-3000:]
    assert "SIGUSR1: checkpointed step" in output
    saved = int((out / "checkpoints" / "latest").resolve().name.split("_")[1])
    assert 1 <= saved < 12
    assert len(read_jsonl(out / "metrics.jsonl")) == saved
    rerun = run_cli(args)
    assert f"at step {saved}" in rerun.stdout
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(1, 13))
