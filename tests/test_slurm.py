"""The slurm scripts: per-node command lines (no slurm needed) and real submissions to a one-node cluster.

    pytest tests/test_slurm.py                 # command lines, script structure
    pytest tests/test_slurm.py -m slow         # + a real slurm cluster (root; installs slurm-wlm and munge)

The cluster follows /work/shared/SLURM.md: munged, slurmctld and slurmd on localhost, started here in the
foreground so that teardown stops exactly the daemons this module started, by process id. An already running
cluster is used as it is and left running. Without root, apt or working daemons the slow tests are skipped,
with the reason.
"""

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from latentwire.exit_codes import OOM_RESTART_EXIT_CODE, REQUEUE_EXIT_CODE

REPO_ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO_ROOT / "launch" / "slurm"
NODE_CMD = SLURM_DIR / "node_cmd.sh"
SBATCH_SCRIPTS = [SLURM_DIR / "train.sbatch", SLURM_DIR / "train_multinode.sbatch"]


# ------------------------------------------------------------------------------------ per-node command lines


def fake_scontrol(bin_dir: Path, hosts: list[str]) -> None:
    """An `scontrol` that answers `show hostnames <anything>` with `hosts`, one per line."""
    script = bin_dir / "scontrol"
    script.write_text("#!/bin/bash\n"
                      "[[ \"$1 $2\" == 'show hostnames' ]] || { echo \"fake scontrol: $*\" >&2; exit 1; }\n"
                      + "".join(f"echo {h}\n" for h in hosts))
    script.chmod(0o755)


def node_command(tmp_path: Path, hosts: list[str], node_id: int, train_args: list[str], **env) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake_scontrol(bin_dir, hosts)
    full_env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin", "TMPDIR": str(tmp_path), "LATENTWIRE_PRINT_NODE_CMD": "1",
        "SLURM_NNODES": str(len(hosts)), "SLURM_NODEID": str(node_id), "SLURM_JOB_ID": "123457",
        "SLURM_JOB_NODELIST": f"gpu[{len(hosts)}]", **env,
    }
    result = subprocess.run(["bash", str(NODE_CMD), *train_args], env=full_env, capture_output=True, text=True,
                            cwd=REPO_ROOT, timeout=30)
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout)


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


TRAIN_ARGS = ["--config", "configs/tiny.json", "--output_dir", "runs/a b", "--set", "train.max_steps=2"]


@pytest.mark.parametrize("n_nodes", [2, 4])
def test_deepspeed_node_commands(tmp_path, n_nodes):
    hosts = [f"gpu-{i:02d}" for i in range(n_nodes)]
    for node_id in range(n_nodes):
        argv = node_command(tmp_path, hosts, node_id, TRAIN_ARGS, SLURM_GPUS_ON_NODE="8")
        separator = argv.index("--")
        assert argv[:separator] == ["python", "launch/supervise.py", "--max_restarts", "0"]
        launcher, script = argv[separator + 1:], argv.index("launch/train.py")
        assert launcher[0] == "deepspeed" and "--no_ssh" in launcher
        assert option(argv, "--num_nodes") == str(n_nodes) and option(argv, "--node_rank") == str(node_id)
        assert option(argv, "--num_gpus") == "8"
        assert option(argv, "--master_addr") == "gpu-00"
        assert option(argv, "--master_port") == str(20000 + 123457 % 20000)
        assert argv[script + 1:] == TRAIN_ARGS  # train.py arguments pass through intact, spaces included
        hostfile = Path(option(argv, "--hostfile"))
        assert hostfile.read_text().splitlines() == [f"{h} slots=8" for h in hosts]


@pytest.mark.parametrize("n_nodes", [2, 4])
def test_torchrun_node_commands(tmp_path, n_nodes):
    hosts = [f"node{i}" for i in range(n_nodes)]
    seen_ranks = []
    for node_id in range(n_nodes):
        argv = node_command(tmp_path, hosts, node_id, TRAIN_ARGS, SLURM_GPUS_ON_NODE="4",
                            LATENTWIRE_LAUNCHER="torchrun", MASTER_ADDR="10.0.0.7", MASTER_PORT="29999")
        launcher = argv[argv.index("--") + 1:argv.index("launch/train.py")]
        assert launcher == ["torchrun", "--nnodes", str(n_nodes), "--node_rank", str(node_id),
                            "--nproc_per_node", "4", "--master_addr", "10.0.0.7", "--master_port", "29999"]
        seen_ranks.append(int(option(argv, "--node_rank")))
    assert seen_ranks == list(range(n_nodes))


def test_cpu_node_runs_one_rank(tmp_path):
    argv = node_command(tmp_path, ["a", "b"], 1, TRAIN_ARGS)  # no SLURM_GPUS_ON_NODE, no nvidia-smi on PATH
    assert option(argv, "--num_gpus") == "1"


def test_node_list_must_match_node_count(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_scontrol(bin_dir, ["only-one"])
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_JOB_ID": "1",
           "SLURM_JOB_NODELIST": "x", "LATENTWIRE_PRINT_NODE_CMD": "1"}
    result = subprocess.run(["bash", str(NODE_CMD)], env=env, capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 2 and "1 host(s)" in result.stderr


@pytest.mark.parametrize("script", SBATCH_SCRIPTS, ids=lambda p: p.name)
def test_sbatch_scripts_are_documented_and_agree_with_exit_codes(script):
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    sections = re.findall(r"^# -+ (\w+)$", text, re.M)
    assert sections == ["SBATCH", "environment", "launch"]
    assert "sbatch " in text.split("# ---")[0]  # the submit command is in the header
    assert "# <-- set this" in text
    assert re.search(rf"^REQUEUE_EXIT_CODE={REQUEUE_EXIT_CODE}\b", text, re.M)
    assert "#SBATCH --signal=B:USR1@120" in text and "#SBATCH --requeue" in text
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert "launch/supervise.py --max_restarts" in text


def test_multinode_script_sets_rendezvous_and_nccl_env():
    text = (SLURM_DIR / "train_multinode.sbatch").read_text()
    assert 'export MASTER_PORT="$((20000 + SLURM_JOB_ID % 20000))"' in text
    assert "export NCCL_ASYNC_ERROR_HANDLING=1" in text and "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in text
    assert "srun --nodes" in text and "launch/slurm/node_cmd.sh" in text


# ------------------------------------------------------------------------------------ a real one-node cluster

CONF_MARKER = "# written by LatentWire tests/test_slurm.py"
SLURM_CONF = Path("/etc/slurm/slurm.conf")
MUNGE_KEY = Path("/etc/munge/munge.key")
DAEMONS = ("sbatch", "srun", "scontrol", "sinfo", "slurmctld", "slurmd", "munged", "munge", "unmunge")


def _ok(cmd: list[str], timeout: float = 10) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=timeout).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _munge_works() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        return cred.returncode == 0 and subprocess.run(["unmunge"], input=cred.stdout, capture_output=True,
                                                       timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _node_state() -> str:
    result = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=10)
    return result.stdout.strip() if result.returncode == 0 else ""


def _slurm_conf(host: str) -> str:
    return f"""{CONF_MARKER}: a one-node cluster on localhost (see /work/shared/SLURM.md)
ClusterName=local
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ReturnToService=2
NodeName={host} CPUs={os.cpu_count()} RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class LocalSlurm:
    """Brings a one-node slurm cluster up; `stop()` ends only the daemons it started itself."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.started: list[subprocess.Popen] = []

    def _start(self, name: str, argv: list[str]) -> None:
        log = open(self.log_dir / f"{name}.log", "w")
        self.started.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))

    def _log_tail(self) -> str:
        tails = []
        for path in sorted(self.log_dir.glob("*.log")) + [Path("/var/log/slurm/slurmctld.log"),
                                                           Path("/var/log/slurm/slurmd.log")]:
            if path.exists():
                tails.append(f"{path}: " + " | ".join(path.read_text(errors="replace").splitlines()[-5:]))
        return "; ".join(tails)

    def up(self) -> str | None:
        """Start what is missing; None when sbatch can run jobs, else why not."""
        if os.geteuid() != 0:
            return "installing and starting slurm daemons needs root"
        if not all(shutil.which(tool) for tool in DAEMONS):
            if not shutil.which("apt-get"):
                return "slurm is not installed and apt-get is not available"
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "slurm-wlm", "munge"]):
                result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
                if result.returncode != 0:
                    return f"`{' '.join(cmd)}` failed: {result.stderr.strip()[-300:]}"
        if _ok(["scontrol", "ping"]) and _node_state() == "idle":
            return None  # somebody's cluster is already up: use it, leave it alone
        if not MUNGE_KEY.exists():
            MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
            MUNGE_KEY.write_bytes(os.urandom(1024))
            MUNGE_KEY.chmod(0o400)
            shutil.chown(MUNGE_KEY, "munge", "munge")
        if not _munge_works():
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            self._start("munged", ["munged", "--foreground", "--force"])
            if not self._wait(_munge_works, 20):
                return f"munged did not start: {self._log_tail()}"
        host = socket.gethostname()
        ours = not SLURM_CONF.exists() or SLURM_CONF.read_text().startswith(CONF_MARKER)
        if ours:
            SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
            SLURM_CONF.write_text(_slurm_conf(host))
        for directory in ("/var/spool/slurmctld", "/var/spool/slurmd", "/var/log/slurm"):
            Path(directory).mkdir(parents=True, exist_ok=True)
        if not _ok(["scontrol", "ping"]):
            # On our own throw-away cluster, a cold start (-c): jobs saved by an earlier, killed session would be
            # recovered and keep the one node ALLOCATED, which no `state=resume` can clear.
            self._start("slurmctld", ["slurmctld", "-D"] + (["-c"] if ours else []))
            if not self._wait(lambda: _ok(["scontrol", "ping"]), 30):
                return f"slurmctld did not come up: {self._log_tail()}"
        if _node_state() != "idle":
            self._start("slurmd", ["slurmd", "-D"])
            if not self._wait(lambda: _node_state() == "idle", 45):
                subprocess.run(["scontrol", "update", f"nodename={host}", "state=resume"], capture_output=True)
                if not self._wait(lambda: _node_state() == "idle", 15):
                    return f"node state is {_node_state()!r}, not idle: {self._log_tail()}"
        return None

    def _wait(self, ready, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return True
            if any(proc.poll() is not None for proc in self.started):
                return False  # a daemon we started has died; its log says why
            time.sleep(0.5)
        return False

    def stop(self) -> None:
        for proc in reversed(self.started):  # slurmd, slurmctld, munged: the reverse of starting
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.started.clear()


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm-daemons"))
    try:
        why_not = cluster.up()
        if why_not is not None:
            cluster.stop()
            pytest.skip(f"no local slurm cluster: {why_not}")
        yield cluster
    finally:
        cluster.stop()


def sbatch_wait(script: Path, args: list[str], workdir: Path, options: list[str] = (), timeout: float = 900,
                env: dict | None = None) -> tuple[int, str]:
    """Submit from the repository root, wait for the job; (exit code of `sbatch --wait`, the job's log)."""
    log = workdir / "job.out"
    cmd = ["sbatch", "--wait", f"--output={log}", *options, str(script), *args]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                            env=dict(os.environ, **(env or {})))
    return result.returncode, (log.read_text() if log.exists() else "") + result.stderr


def submit(script: Path, args: list[str], log: Path, cwd: Path = REPO_ROOT, options: list[str] = (),
           env: dict | None = None) -> str:
    result = subprocess.run(["sbatch", "--parsable", f"--output={log}", *options, str(script), *args], cwd=cwd,
                            capture_output=True, text=True, timeout=60, env=dict(os.environ, **(env or {})))
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def wait_until(ready, deadline: float, what) -> None:
    """Poll `ready()`; on the way start requeued jobs early. Slurm holds a requeued job back for ~2 minutes; it
    needs a few seconds of that (started at once, slurmd refuses it: "Job credential revoked")."""
    held_since: dict[str, float] = {}
    while not ready():
        assert time.monotonic() < deadline, what()
        for job in subprocess.run(["squeue", "-h", "-t", "PENDING", "-o", "%i %r"], capture_output=True,
                                  text=True).stdout.splitlines():
            job_id, reason = job.split(maxsplit=1)
            if reason == "BeginTime" and time.monotonic() - held_since.setdefault(job_id, time.monotonic()) > 5:
                subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True)
        time.sleep(0.5)


FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def job_finished(job_id: str, restarts: int = 0) -> bool:
    """The job reached a final state after `restarts` requeues (a busy controller that does not answer: not yet)."""
    result = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True)
    fields = dict(item.split("=", 1) for item in result.stdout.split() if "=" in item)
    return (result.returncode == 0 and fields.get("JobState") in FINAL_STATES
            and int(fields.get("Restarts", "0")) >= restarts)


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"({path} does not exist)"


def train_works() -> str | None:
    train = REPO_ROOT / "launch" / "train.py"
    if not train.exists():
        return "launch/train.py does not exist yet"
    result = subprocess.run([sys.executable, str(train), "--help"], capture_output=True, text=True, timeout=120)
    return None if result.returncode == 0 else f"launch/train.py --help fails: {result.stderr.strip()[-300:]}"


def check_run_dir(run_dir: Path, log: str) -> None:
    assert (run_dir / "run_info.json").exists(), log[-3000:]
    assert (run_dir / "checkpoints" / "latest").exists(), log[-3000:]


@pytest.mark.slow
def test_cluster_runs_a_job(slurm_cluster, tmp_path):
    script = tmp_path / "hello.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --nodes=1\n"
                      "srun hostname\nscontrol show hostnames \"$SLURM_JOB_NODELIST\"\n")
    code, log = sbatch_wait(script, [], tmp_path, timeout=120)
    assert code == 0, log
    assert log.splitlines().count(socket.gethostname()) == 2


TINY_RUN = ["--config", "configs/tiny.json", "--set", "train.max_steps=2", "--set", "train.save_every=2",
            "--set", "eval.at_end=false"]


@pytest.mark.slow
def test_train_sbatch_trains_on_one_node(slurm_cluster, tmp_path):
    if (why_not := train_works()) is not None:
        pytest.skip(why_not)
    run_dir = tmp_path / "run"
    code, log = sbatch_wait(SLURM_DIR / "train.sbatch", [*TINY_RUN, "--output_dir", str(run_dir)], tmp_path)
    assert code == 0, log[-3000:]
    check_run_dir(run_dir, log)
    assert "train.sbatch: exit status 0" in log


@pytest.mark.slow
def test_train_multinode_sbatch_on_one_node(slurm_cluster, tmp_path):
    if (why_not := train_works()) is not None:
        pytest.skip(why_not)
    run_dir = tmp_path / "run"
    code, log = sbatch_wait(SLURM_DIR / "train_multinode.sbatch", [*TINY_RUN, "--output_dir", str(run_dir)],
                            tmp_path, options=["--nodes=1"])
    assert code == 0, log[-3000:]
    check_run_dir(run_dir, log)
    assert "node 0/1" in log


# A stand-in for launch/train.py that behaves as the contract says: exit 75 on its first run (an OOM the
# supervisor must relaunch), then wait for SIGUSR1, checkpoint (a marker) and exit 76 unless it has already
# been requeued once, in which case it finishes with 0.
FAKE_TRAIN = """
import os, signal, sys, time
out = sys.argv[sys.argv.index("--output_dir") + 1]
os.makedirs(out, exist_ok=True)
def note(text):
    with open(os.path.join(out, "events.txt"), "a") as f:
        f.write(text + "\\n")
note(f"start restart={os.environ.get('LATENTWIRE_RESTART_COUNT')} requeue={os.environ.get('SLURM_RESTART_COUNT', '0')}")
if os.environ.get("LATENTWIRE_RESTART_COUNT") == "0" and os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
    sys.exit(OOM_CODE)
if os.environ.get("SLURM_RESTART_COUNT", "0") != "0":
    note("done")
    sys.exit(0)
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
open(os.path.join(out, "ready"), "w").close()
while not got:
    time.sleep(0.1)
note("usr1: checkpoint")
sys.exit(REQUEUE_CODE)
"""


@pytest.mark.slow
@pytest.mark.parametrize("script", SBATCH_SCRIPTS, ids=lambda p: p.name)
def test_oom_relaunch_and_requeue_on_sigusr1(slurm_cluster, tmp_path, script):
    """Real slurm, fake trainer: 75 is relaunched by the supervisor; SIGUSR1 to the batch shell (what
    --signal=B:USR1 does) reaches the rank through the launcher chain, 76 requeues the job, the requeued job
    runs the same command again."""
    root = tmp_path / "repo"  # a copy of the launch scripts (and the exit codes they import) around a fake train.py
    shutil.copytree(REPO_ROOT / "launch", root / "launch", ignore=shutil.ignore_patterns("__pycache__", "train.py"))
    (root / "latentwire").mkdir()
    for name in ("__init__.py", "exit_codes.py"):
        shutil.copyfile(REPO_ROOT / "latentwire" / name, root / "latentwire" / name)
    fake = FAKE_TRAIN.replace("OOM_CODE", str(OOM_RESTART_EXIT_CODE)).replace("REQUEUE_CODE", str(REQUEUE_EXIT_CODE))
    (root / "launch" / "train.py").write_text(fake)
    (root / ".venv").symlink_to(REPO_ROOT / ".venv")
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    events = run_dir / "events.txt"
    job_id = submit(root / script.relative_to(REPO_ROOT), ["--output_dir", str(run_dir)], log, cwd=root,
                    options=["--nodes=1"])
    deadline = time.monotonic() + 300
    try:
        wait_until((run_dir / "ready").exists, deadline, lambda: read(log))
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True, timeout=30)
        wait_until(lambda: job_finished(job_id, restarts=1), deadline, lambda: read(events) + read(log))
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    assert read(events).splitlines() == ["start restart=0 requeue=0", "start restart=1 requeue=0",
                                         "usr1: checkpoint", "start restart=0 requeue=1", "done"], read(log)
    assert "restart 1/3" in read(log) and "requeueing job" in read(log)


def metrics_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in read(run_dir / "metrics.jsonl").splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_real_oom_under_zero3_is_relaunched_with_a_smaller_micro_batch(slurm_cluster, tmp_path):
    if (why_not := train_works()) is not None:
        pytest.skip(why_not)
    run_dir = tmp_path / "run"
    code, log = sbatch_wait(SLURM_DIR / "train.sbatch",
                            [*TINY_RUN, "--set", "train.max_steps=3", "--deepspeed", "ds_configs/zero3.json",
                             "--output_dir", str(run_dir)], tmp_path, env={"LATENTWIRE_INJECT_OOM_AT_STEP": "2"})
    assert code == 0, log[-3000:]
    assert "restart 1/3" in log  # train.py exited 75 under ZeRO-3 and the supervisor ran it again
    assert json.loads(read(run_dir / "run_state.json"))["micro_batch"] == 1  # tiny.json has micro_batch 2
    assert metrics_steps(run_dir)[-1] == 3


@pytest.mark.slow
def test_real_sigusr1_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    if (why_not := train_works()) is not None:
        pytest.skip(why_not)
    # Enough steps (tiny.json runs ~12 steps/s on 2 cores) that the signal, sent at the first metrics row, lands
    # while the ranks still train: a signal that arrives after the last step rightly ends the job without a requeue.
    steps = 150
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job_id = submit(SLURM_DIR / "train.sbatch", ["--config", "configs/tiny.json", "--set", f"train.max_steps={steps}",
                                                 "--set", "train.save_every=1000", "--set", "eval.at_end=false",
                                                 "--output_dir", str(run_dir)], log)
    deadline = time.monotonic() + 600

    def finished_after_requeue() -> bool:
        if job_finished(job_id, restarts=0) and not job_finished(job_id, restarts=1):
            text = read(log)
            assert "requeueing job" in text, f"the job ended without a requeue:\n{text[-3000:]}"
        return job_finished(job_id, restarts=1)

    try:
        wait_until(lambda: len(metrics_steps(run_dir)) >= 1, deadline, lambda: read(log))
        signalled_at = metrics_steps(run_dir)[-1]
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True, timeout=30)
        wait_until(finished_after_requeue, deadline, lambda: read(log))
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    text = read(log)
    assert signalled_at < steps, text[-3000:]
    assert "SIGUSR1: checkpointed step" in text and "requeueing job" in text, text[-3000:]
    assert "restart count 1" in text  # the requeued job ran the same command ...
    # ... resumed after the checkpoint (no step twice, none missing) and finished
    assert metrics_steps(run_dir) == list(range(1, steps + 1)), text[-3000:]
    assert (run_dir / "checkpoints" / "latest").exists()
