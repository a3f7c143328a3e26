#!/bin/bash
# One node's share of a distill job: an `accelerate launch` that starts this node's processes.
# slurm/single_node.sbatch runs it directly; slurm/multi_node.sbatch runs one per node with srun.
#
# Reads RECIPE, ACCELERATE_CONFIG, GPUS_PER_NODE, NNODES, MASTER_ADDR, MASTER_PORT and EXTRA_ARGS
# from the batch script, and the node's rank from this node's own SLURM_NODEID.
#
# A USR1 or TERM sent to this script is passed on to the training processes (the launcher's
# children): they finish the current step, save a checkpoint and exit with 75 (several copies of
# one stop, e.g. from `scancel --full` and the launcher, count once). The launcher (torchrun's agent)
# does not forward USR1 and reports any non-zero worker exit as its own failure (exit code 1), so
# distill's first process on this node writes how it really ended to DISTILL_EXIT_FILE (code=,
# checkpoint=, phase= lines) and this script exits with that code.
#
# The launcher starts each worker in a session of its own; the workers stop by themselves when it
# dies (they watch their parent), so killing the launcher or this script's process group leaves no
# worker behind. To stop a job: `scancel --batch --signal=TERM JOBID` (see slurm/requeue.sh).
set -uo pipefail

NODE_RANK=${SLURM_NODEID:-0}
# DISTILL_EXIT_PREFIX comes from slurm/requeue.sh, which reads node 0's record
export DISTILL_EXIT_FILE="${DISTILL_EXIT_PREFIX:-${TMPDIR:-/tmp}/distill-exit-$$}.node$NODE_RANK"
rm -f "$DISTILL_EXIT_FILE"
read -r -a extra_args <<<"${EXTRA_ARGS:-}"

launch=(
    accelerate launch
    --config_file "$ACCELERATE_CONFIG"
    --num_machines "$NNODES"
    --machine_rank "$NODE_RANK"
    --num_processes "$((NNODES * GPUS_PER_NODE))"
    --main_process_ip "$MASTER_ADDR"
    --main_process_port "$MASTER_PORT"
)
if [ "$NNODES" -gt 1 ]; then
    # c10d rendezvous at MASTER_ADDR:MASTER_PORT; DeepSpeed configs start workers the same way
    launch+=(--rdzv_backend c10d --deepspeed_multinode_launcher standard)
fi
launch+=(-m distill run "$RECIPE" "${extra_args[@]}")

stopping=0
# shellcheck disable=SC2317  # called by the trap below
forward_stop() {
    stopping=1
    echo "[distill-slurm] node $NODE_RANK: $1, asking the training processes to checkpoint" >&2
    pkill "-$1" -P "$launcher" 2>/dev/null || true
}
trap 'forward_stop USR1' USR1
trap 'forward_stop TERM' TERM

echo "[distill-slurm] node $NODE_RANK ($(hostname)): ${launch[*]}" >&2
"${launch[@]}" &
launcher=$!
wait "$launcher"
rc=$?
while [ "$rc" -gt 128 ] && kill -0 "$launcher" 2>/dev/null; do
    wait "$launcher"  # `wait` returns early when a trapped signal arrives
    rc=$?
done
recorded=$(sed -n 's/^code=//p' "$DISTILL_EXIT_FILE" 2>/dev/null)
if [ -n "$recorded" ]; then
    rc=$recorded  # what distill itself returned, not the launcher's summary of it
elif [ "$stopping" = 1 ] && [ "$rc" -ne 0 ]; then
    echo "[distill-slurm] node $NODE_RANK: asked to stop, and the training processes ended ($rc) without recording why (killed?); the newest valid checkpoint, if any, is where a rerun resumes" >&2
    rc=75
fi
exit "$rc"
