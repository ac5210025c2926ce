"""Run a training command and start it again when it asks to be relaunched after an out-of-memory fault.

    python launch/supervise.py [--max_restarts 3] -- deepspeed --num_gpus 8 launch/train.py --config C --output_dir DIR

The command runs as a child in its own session (so its launcher and ranks form one process group) and the
supervisor waits for it:

- exit code 75 (`OOM_RESTART_EXIT_CODE`): train.py could not absorb an OOM in process (ZeRO-3, or a second OOM)
  and has persisted the halved micro-batch in `DIR/run_state.json`. The same argv runs again; train.py resumes
  from `DIR/checkpoints/latest`. After `--max_restarts` relaunches a further 75 ends the supervisor with 75.
- any other code (0, 76 = `REQUEUE_EXIT_CODE`, a crash) is returned unchanged, at once; a child killed by
  signal N is reported as 128 + N, as a shell does.

SIGTERM, SIGINT and SIGUSR1 sent to the supervisor are forwarded to the child's process group; once one of them
has arrived the supervisor never relaunches. SIGUSR1 (slurm's "time is nearly up") is meant for the training
ranks only, which catch it, checkpoint and exit with 76. Launchers in between (deepspeed, torchrun) would die of
it, since they install no handler, so the child starts with SIGUSR1 ignored, a disposition every process below
it inherits until train.py installs its own handler. torchrun puts each rank in a session of its own, so
SIGUSR1 also goes to every descendant outside the child's group.

Each run gets `LATENTWIRE_RESTART_COUNT` in its environment: the relaunches before it (0 for the first run),
added to any count inherited from an outer supervisor.
"""

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence

if __package__ in (None, ""):  # run as `python launch/supervise.py`: make `launch` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from latentwire.exit_codes import OOM_RESTART_EXIT_CODE, REQUEUE_EXIT_CODE  # noqa: E402

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

__all__ = ["OOM_RESTART_EXIT_CODE", "REQUEUE_EXIT_CODE", "FORWARDED_SIGNALS", "Supervisor", "main"]


def _log(message: str) -> None:
    print(f"[supervise] {message}", file=sys.stderr, flush=True)


def _child_setup() -> None:
    """Runs in the child between fork and exec: launchers inherit an ignored SIGUSR1 (see the module doc)."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)  # blocked by the parent around the fork


def _exit_status(returncode: int) -> int:
    """Popen's returncode (negative when killed by a signal) as a shell exit status."""
    return 128 - returncode if returncode < 0 else returncode


def _signal_descendants_outside_group(pid: int, group: int, signum: int) -> None:
    import psutil  # a DeepSpeed dependency; only needed on this path

    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:  # the child is already gone; nothing below it to reach
        return
    for proc in descendants:
        try:
            if os.getpgid(proc.pid) != group:
                proc.send_signal(signum)
        except (ProcessLookupError, psutil.NoSuchProcess):  # exited while we walked the tree
            continue


class Supervisor:
    """Runs `cmd` until it exits with something other than 75, relaunching at most `max_restarts` times."""

    def __init__(self, cmd: Sequence[str], max_restarts: int, log: Callable[[str], None] = _log):
        if not cmd:
            raise ValueError("supervise: no command given (put it after `--`)")
        if max_restarts < 0:
            raise ValueError(f"supervise: --max_restarts must be >= 0, got {max_restarts}")
        self.cmd = list(cmd)
        self.max_restarts = max_restarts
        self.log = log
        self.restarts = 0
        self.stop_signal: int | None = None  # the first forwarded signal; after it we never relaunch
        self._child: subprocess.Popen | None = None

    def forward(self, signum: int, frame=None) -> None:
        """Signal handler: pass the signal on to the running child's process group."""
        if self.stop_signal is None:
            self.stop_signal = signum
        child = self._child
        if child is None:
            return
        self.log(f"forwarding {signal.Signals(signum).name} to process group {child.pid}")
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:  # the group has already exited; the wait loop picks up its status
            pass
        if signum == signal.SIGUSR1:
            _signal_descendants_outside_group(child.pid, child.pid, signum)

    def _run_once(self) -> int | None:
        """One run of the command; None when a forwarded signal arrived before it could start."""
        # Counted across nested supervisors (a per-node one under srun inherits the batch-level count).
        restarts = int(os.environ.get("LATENTWIRE_RESTART_COUNT", "0")) + self.restarts
        env = dict(os.environ, LATENTWIRE_RESTART_COUNT=str(restarts))
        # Hold the forwarded signals while the child starts, so that none can arrive after the fork but
        # before `self._child` is set and be lost; they are handled (and forwarded) right after.
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
        try:
            if self.stop_signal is not None:
                return None
            self._child = subprocess.Popen(self.cmd, env=env, start_new_session=True, preexec_fn=_child_setup)
        except FileNotFoundError:
            self.log(f"command not found: {self.cmd[0]}")
            return 127
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
        try:
            return _exit_status(self._child.wait())
        finally:
            self._child = None

    def run(self) -> int:
        """Run the command to its final exit status (see the module doc)."""
        while True:
            status = self._run_once()
            if status is None:
                self.log(f"got {signal.Signals(self.stop_signal).name} before the command started; not starting it")
                return 128 + self.stop_signal
            if status != OOM_RESTART_EXIT_CODE:
                return status
            if self.stop_signal is not None:
                self.log(f"command exited {status} after {signal.Signals(self.stop_signal).name}; not relaunching")
                return status
            if self.max_restarts == 0:
                self.log(f"command exited {status} (OOM, relaunch requested); passing it on (--max_restarts 0)")
                return status
            if self.restarts >= self.max_restarts:
                self.log(f"command exited {status} (OOM, relaunch requested) but all {self.max_restarts} "
                         f"restarts are used up; giving up with exit code {status}")
                return status
            self.restarts += 1
            self.log(f"command exited {status} (OOM, relaunch requested); restart {self.restarts}/"
                     f"{self.max_restarts}: {' '.join(self.cmd)}")


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    if "--" not in argv:
        raise SystemExit("usage: python launch/supervise.py [--max_restarts N] -- COMMAND [ARGS ...]")
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max_restarts", type=int, default=3,
                        help="how many times an exit code of 75 relaunches the command (default 3)")
    return parser.parse_args(argv[:split]), argv[split + 1:]


def main(argv: Sequence[str] | None = None) -> int:
    args, cmd = parse_args(sys.argv[1:] if argv is None else argv)
    supervisor = Supervisor(cmd, args.max_restarts)
    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, supervisor.forward)
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
