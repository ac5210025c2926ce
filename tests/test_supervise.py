"""launch/supervise.py: relaunch on exit code 75, pass other codes through, forward signals.

Each test runs the real supervisor as a subprocess around a small Python child script.

    pytest tests/test_supervise.py
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from latentwire.exit_codes import OOM_RESTART_EXIT_CODE, REQUEUE_EXIT_CODE

REPO_ROOT = Path(__file__).resolve().parents[1]
SUPERVISE = REPO_ROOT / "launch" / "supervise.py"


def write_script(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path


def supervise_cmd(child_argv: list[str], max_restarts: int | None = None) -> list[str]:
    cmd = [sys.executable, str(SUPERVISE)]
    if max_restarts is not None:
        cmd += ["--max_restarts", str(max_restarts)]
    return cmd + ["--", *child_argv]


def run_supervised(child_argv: list[str], max_restarts: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(supervise_cmd(child_argv, max_restarts), capture_output=True, text=True, timeout=60)


def wait_for(path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.02)


# A child that exits with the codes listed in argv[2:], one per run, counting runs in the file argv[1], and
# records the LATENTWIRE_RESTART_COUNT each run saw.
EXIT_SEQUENCE = """
    import os, sys
    log = sys.argv[1]
    codes = [int(c) for c in sys.argv[2:]]
    runs = open(log).read().split() if os.path.exists(log) else []
    with open(log, "a") as f:
        f.write(os.environ["LATENTWIRE_RESTART_COUNT"] + "\\n")
    sys.exit(codes[min(len(runs), len(codes) - 1)])
"""


def test_two_oom_exits_then_success_restarts_twice(tmp_path):
    child = write_script(tmp_path / "child.py", EXIT_SEQUENCE)
    log = tmp_path / "runs.txt"
    result = run_supervised([sys.executable, str(child), str(log), "75", "75", "0"], max_restarts=3)
    assert result.returncode == 0, result.stderr
    assert log.read_text().split() == ["0", "1", "2"]  # three runs, each told how many restarts preceded it
    assert result.stderr.count("restart ") == 2
    assert "restart 1/3" in result.stderr and "restart 2/3" in result.stderr


def test_always_oom_stops_after_max_restarts_with_75(tmp_path):
    child = write_script(tmp_path / "child.py", EXIT_SEQUENCE)
    log = tmp_path / "runs.txt"
    result = run_supervised([sys.executable, str(child), str(log), "75"], max_restarts=2)
    assert result.returncode == OOM_RESTART_EXIT_CODE
    assert len(log.read_text().split()) == 3  # the first run and two restarts
    assert "restarts are used up" in result.stderr


def test_zero_max_restarts_passes_75_through(tmp_path):
    child = write_script(tmp_path / "child.py", EXIT_SEQUENCE)
    log = tmp_path / "runs.txt"
    result = run_supervised([sys.executable, str(child), str(log), "75", "0"], max_restarts=0)
    assert result.returncode == OOM_RESTART_EXIT_CODE
    assert len(log.read_text().split()) == 1


@pytest.mark.parametrize("code", [1, 3, REQUEUE_EXIT_CODE])
def test_other_exit_codes_return_immediately(tmp_path, code):
    child = write_script(tmp_path / "child.py", EXIT_SEQUENCE)
    log = tmp_path / "runs.txt"
    result = run_supervised([sys.executable, str(child), str(log), str(code), "0"])
    assert result.returncode == code
    assert len(log.read_text().split()) == 1
    assert "restart" not in result.stderr


def test_child_killed_by_signal_reports_128_plus_signal(tmp_path):
    child = write_script(tmp_path / "child.py", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    result = run_supervised([sys.executable, str(child)])
    assert result.returncode == 128 + signal.SIGKILL


def test_missing_command_is_127(tmp_path):
    result = run_supervised([str(tmp_path / "no-such-program")])
    assert result.returncode == 127
    assert "command not found" in result.stderr


def test_usage_error_without_separator():
    result = subprocess.run([sys.executable, str(SUPERVISE), "python"], capture_output=True, text=True)
    assert result.returncode != 0
    assert "usage" in result.stderr


# A training-like child: catches SIGUSR1 and SIGTERM, says which one it got, exits 76 on USR1, 0 on TERM.
TRAINER = """
    import signal, sys, time
    out = sys.argv[1]
    got = []
    signal.signal(signal.SIGUSR1, lambda s, f: got.append("USR1"))
    signal.signal(signal.SIGTERM, lambda s, f: got.append("TERM"))
    open(out + ".ready", "w").close()
    while not got:
        time.sleep(0.01)
    open(out, "w").write(got[0])
    sys.exit(76 if got[0] == "USR1" else 0)
"""

# A launcher-like middle process that installs no SIGUSR1 handler (as deepspeed and torchrun do not) and, as
# torchrun does, starts the rank in a session of its own; it returns the rank's exit code.
LAUNCHER = """
    import subprocess, sys
    sys.exit(subprocess.Popen(sys.argv[1:], start_new_session=True).wait())
"""


@pytest.mark.parametrize("through_launcher", [False, True], ids=["direct", "through_launcher"])
def test_sigusr1_reaches_the_rank_and_its_exit_code_comes_back(tmp_path, through_launcher):
    trainer = write_script(tmp_path / "trainer.py", TRAINER)
    marker = tmp_path / "got"
    child = [sys.executable, str(trainer), str(marker)]
    if through_launcher:
        child = [sys.executable, str(write_script(tmp_path / "launcher.py", LAUNCHER)), *child]
    proc = subprocess.Popen(supervise_cmd(child), stderr=subprocess.PIPE, text=True)
    wait_for(Path(str(marker) + ".ready"))
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=30)
    assert marker.read_text() == "USR1"
    assert proc.returncode == REQUEUE_EXIT_CODE, stderr  # the launcher survived and passed the code on
    assert "forwarding SIGUSR1" in stderr


def test_sigterm_is_forwarded_and_stops_relaunching(tmp_path):
    trainer = write_script(tmp_path / "trainer.py", TRAINER.replace("else 0)", f"else {OOM_RESTART_EXIT_CODE})"))
    marker = tmp_path / "got"
    proc = subprocess.Popen(supervise_cmd([sys.executable, str(trainer), str(marker)], max_restarts=3),
                            stderr=subprocess.PIPE, text=True)
    wait_for(Path(str(marker) + ".ready"))
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert marker.read_text() == "TERM"
    # The child answered TERM with 75, but a terminated job must not come back to life.
    assert proc.returncode == OOM_RESTART_EXIT_CODE
    assert "not relaunching" in stderr


def test_child_runs_in_its_own_process_group(tmp_path):
    child = write_script(tmp_path / "child.py", """
        import os, sys
        open(sys.argv[1], "w").write(f"{os.getpgid(0)} {os.getpid()}")
    """)
    out = tmp_path / "pg.txt"
    result = run_supervised([sys.executable, str(child), str(out)])
    assert result.returncode == 0
    pgid, pid = out.read_text().split()
    assert pgid == pid != str(os.getpgid(0))
