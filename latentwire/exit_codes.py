"""Process exit codes shared by launch/train.py, launch/supervise.py and the slurm scripts.

    from latentwire.exit_codes import OOM_RESTART_EXIT_CODE, REQUEUE_EXIT_CODE

Both codes mean "the run is healthy, start me again with the same command and the same --output_dir";
they differ in who starts it again:

- OOM_RESTART_EXIT_CODE (75, sysexits' EX_TEMPFAIL): training hit an out-of-memory fault it cannot absorb in
  process (under ZeRO-3, or a second OOM). Before exiting, train.py has saved `checkpoints/latest` (or kept the
  last one) and written the halved micro-batch to `<output_dir>/run_state.json`. `launch/supervise.py` reruns
  the command at once, up to `--max_restarts` times.
- REQUEUE_EXIT_CODE (76): train.py received SIGUSR1 (slurm's warning before the time limit), saved a
  checkpoint on every rank and exited. The supervisor passes it through untouched; the sbatch scripts answer it
  with `scontrol requeue "$SLURM_JOB_ID"`, and the requeued job resumes from `checkpoints/latest`.

The library raises `faults.Relaunch(code)` with these codes and only launch/train.py turns that into the exit code.
This module imports nothing (the supervisor runs under any Python, without torch). The sbatch scripts spell the
value 76 out in bash; tests/test_slurm.py checks that they agree with this module.
"""

OOM_RESTART_EXIT_CODE = 75
REQUEUE_EXIT_CODE = 76
