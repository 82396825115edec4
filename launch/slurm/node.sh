#!/usr/bin/env bash
# Per-node launcher: the one SLURM task on each node runs this, and it runs `accelerate launch`
# for this node's share of the processes. All arguments go to train_imagenet.py.
#
# Everything node-specific is read here, on the node itself, from the variables srun sets for
# this task (expanding $SLURM_NODEID in the batch script would make every node rank 0):
#   SLURM_NODEID          -> --machine_rank
#   SLURM_NNODES          -> --num_machines
#   SLURM_GPUS_ON_NODE    -> processes on this node (PROCS_PER_NODE overrides, e.g. on CPU)
#   MAIN_ADDR, MAIN_PORT  -> --main_process_ip/port (exported by the batch script: first host of the job)
#   ACCELERATE_CONFIG     -> --config_file (default: the launch/accelerate/*.yaml matching the shape)
#
# Signals: SIGUSR1 (SLURM's warning before the time limit, forwarded by the batch script) or
# SIGTERM asks the trainer to checkpoint and stop. The torchrun launcher inside `accelerate launch`
# would die on SIGUSR1 and orphan its workers, so it is started with SIGUSR1 ignored, and this
# script forwards SIGUSR1 to the workers, which are the launcher's direct children.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

nnodes=${SLURM_NNODES:?run me under srun (SLURM_NNODES is not set)}
node_rank=${SLURM_NODEID:?run me under srun (SLURM_NODEID is not set)}
procs_per_node=${PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:?no GPUs on this node: request --gpus-per-node, or set PROCS_PER_NODE}}
num_processes=$((nnodes * procs_per_node))
main_addr=${MAIN_ADDR:?export MAIN_ADDR (the first host of the job) before srun}
main_port=${MAIN_PORT:?export MAIN_PORT before srun}

if [[ -z ${ACCELERATE_CONFIG:-} ]]; then
    if ((num_processes == 1)); then ACCELERATE_CONFIG=$repo/launch/accelerate/1gpu.yaml
    elif ((nnodes == 1)); then ACCELERATE_CONFIG=$repo/launch/accelerate/1node_8gpu.yaml
    else ACCELERATE_CONFIG=$repo/launch/accelerate/multi_node.yaml
    fi
fi

echo "node $node_rank/$nnodes on $(hostname -s): $procs_per_node processes of $num_processes," \
    "main $main_addr:$main_port, config $ACCELERATE_CONFIG"

# Started with SIGUSR1 ignored (inherited across exec); the trainer installs its own handler.
(
    trap '' USR1
    exec accelerate launch \
        --config_file "$ACCELERATE_CONFIG" \
        --num_machines "$nnodes" \
        --machine_rank "$node_rank" \
        --num_processes "$num_processes" \
        --main_process_ip "$main_addr" \
        --main_process_port "$main_port" \
        "$repo/train_imagenet.py" "$@"
) &
launcher=$!

interrupted=0
# shellcheck disable=SC2329 # invoked by the traps below
forward() {
    interrupted=1
    echo "node $node_rank: SIG$1 received, asking the trainer to checkpoint and stop"
    pkill -USR1 -P "$launcher" || true
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# A trapped signal makes `wait` return early (status > 128): then wait again. bash keeps the
# status of a child that ended meanwhile, so the last `wait` reports the launcher's own status.
while :; do
    interrupted=0
    status=0
    wait "$launcher" || status=$?
    ((interrupted)) || break
done
# After a stop request the launcher reports the trainer's code 75 as a failure (status 1); a status
# above 128 would mean a signal killed the launcher itself and orphaned its workers.
echo "node $node_rank: accelerate launch exited with status $status"
exit "$status"
