#!/bin/bash
# The per-node half of train_multinode.sbatch: srun starts this once on every node, and it starts the launcher
# that starts one training rank per GPU of that node.
#
#   srun --ntasks-per-node=1 bash launch/slurm/node_cmd.sh --config C --output_dir D [--set a.b=c ...]
#   LATENTWIRE_PRINT_NODE_CMD=1 SLURM_NNODES=2 SLURM_NODEID=1 ... bash launch/slurm/node_cmd.sh ...   # print only
#
# Reads SLURM_NNODES, SLURM_NODEID, SLURM_JOB_ID, SLURM_JOB_NODELIST (through `scontrol show hostnames`) and,
# when set, MASTER_ADDR / MASTER_PORT (train_multinode.sbatch exports them; the defaults are the same).
# LATENTWIRE_LAUNCHER picks the launcher:
# - deepspeed (default): `deepspeed --no_ssh` with a hostfile of the job's nodes written to $TMPDIR; it returns
#   the exit code of a failed rank, so 75 (relaunch after OOM) and 76 (requeue) reach the batch script.
# - torchrun: static rendezvous at MASTER_ADDR:MASTER_PORT. torchrun reports any failed rank as exit code 1,
#   so with it the automatic OOM relaunch and the requeue on SIGUSR1 do not happen.
# GPUs per node come from SLURM_GPUS_ON_NODE, else nvidia-smi; a node without GPUs runs one CPU rank
# (DS_ACCELERATOR=cpu), or LATENTWIRE_NPROC_PER_NODE of them.
#
# The launcher runs under `launch/supervise.py --max_restarts 0`, which relays SIGUSR1 from srun to the ranks
# (launchers would die of it) and passes exit codes through; relaunching is the batch script's business.
set -euo pipefail

NNODES="${SLURM_NNODES:?node_cmd.sh runs under srun: SLURM_NNODES is not set}"
NODE_RANK="${SLURM_NODEID:?node_cmd.sh runs under srun: SLURM_NODEID is not set}"
JOB_ID="${SLURM_JOB_ID:?node_cmd.sh runs under srun: SLURM_JOB_ID is not set}"

mapfile -t HOSTS < <(scontrol show hostnames "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST is not set}")
if (( ${#HOSTS[@]} != NNODES )); then
    echo "node_cmd.sh: SLURM_NNODES=$NNODES but the node list has ${#HOSTS[@]} host(s): ${HOSTS[*]}" >&2
    exit 2
fi
MASTER_ADDR="${MASTER_ADDR:-${HOSTS[0]}}"
MASTER_PORT="${MASTER_PORT:-$((20000 + JOB_ID % 20000))}"

GPUS="${SLURM_GPUS_ON_NODE:-}"
if [[ -z "$GPUS" ]] && command -v nvidia-smi >/dev/null 2>&1; then
    GPUS="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
fi
GPUS="${GPUS:-0}"
if (( GPUS == 0 )); then
    export DS_ACCELERATOR=cpu
fi
NPROC="${LATENTWIRE_NPROC_PER_NODE:-$(( GPUS > 0 ? GPUS : 1 ))}"

case "${LATENTWIRE_LAUNCHER:-deepspeed}" in
    deepspeed)
        HOSTFILE="${TMPDIR:-/tmp}/latentwire-hostfile-$JOB_ID-$NODE_RANK"
        for host in "${HOSTS[@]}"; do echo "$host slots=$NPROC"; done > "$HOSTFILE"
        LAUNCH=(deepspeed --hostfile "$HOSTFILE" --no_ssh --num_nodes "$NNODES" --node_rank "$NODE_RANK"
                --num_gpus "$NPROC" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
        ;;
    torchrun)
        LAUNCH=(torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC"
                --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
        ;;
    *)
        echo "node_cmd.sh: LATENTWIRE_LAUNCHER must be deepspeed or torchrun, got '$LATENTWIRE_LAUNCHER'" >&2
        exit 2
        ;;
esac
CMD=(python launch/supervise.py --max_restarts 0 -- "${LAUNCH[@]}" launch/train.py "$@")

if [[ "${LATENTWIRE_PRINT_NODE_CMD:-0}" == 1 ]]; then
    printf '%q ' "${CMD[@]}"
    echo
    exit 0
fi
echo "node_cmd.sh: node $NODE_RANK/$NNODES on $(hostname), $NPROC rank(s), master $MASTER_ADDR:$MASTER_PORT" >&2
exec "${CMD[@]}"
