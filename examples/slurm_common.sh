#!/usr/bin/env bash
# Helpers shared by the sbatch scripts: node list, SGLang servers on rollout nodes, torchrun trainers, requeue on
# Slurm's warning signal (slurm_requeue.sh), a per-job API key.
mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
export MASTER_ADDR=${NODES[0]}
export MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python}
SERVER_URLS=""
source "$(dirname "${BASH_SOURCE[0]}")/slurm_requeue.sh"
# The servers listen on the cluster network: without a key any user could generate from them or load any weights
# into them. Unless the user exports SGLANG_API_KEY, each job makes its own; it reaches the servers (--api-key) and
# the trainer (the environment, rollout.sglang.api_key_env) and is never printed.
if [[ -z ${SGLANG_API_KEY:-} ]]; then
    SGLANG_API_KEY=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
fi
export SGLANG_API_KEY
# When the script ends, so do the server restart loops below (Slurm then ends their steps).
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
# Trainer overrides every script passes: the key's variable and the fault_tolerance files.
TRAINER_OVERRIDES=("rollout.sglang.api_key_env=SGLANG_API_KEY" "${FT_OVERRIDES[@]}")

# launch_rollout_servers NODE_INDEX NUM_SERVERS TP: start SGLang servers on one node (background job steps) on GPUs
# 0 to NUM_SERVERS x TP - 1, and add their URLs to SERVER_URLS. The trainer needs the same rollout.sglang.tp_size:
# server i's TP rank r joins its weight-update group as rank 1 + i x TP + r. A server that exits is started again
# after SERVER_RESTART_DELAY seconds (default 30); the trainer waits for it and re-syncs its weights before it serves
# again.
launch_rollout_servers() {
    local node=${NODES[$1]} count=$2 tp=$3 i gpus port
    for ((i = 0; i < count; i++)); do
        gpus=$(seq -s, $((i * tp)) $((i * tp + tp - 1)))
        port=$((30000 + i))
        # The GPUs are set inside the step (`env`): Slurm sets CUDA_VISIBLE_DEVICES to all of the node's GPUs in
        # every step, overriding a value passed with srun --export.
        while true; do
            srun --nodes=1 --ntasks=1 -w "$node" --overlap \
                env CUDA_VISIBLE_DEVICES="$gpus" \
                "$PYTHON" -m sglang.launch_server --model-path "${MODEL_PATH:?set MODEL_PATH}" --tp-size "$tp" \
                --host "$node" --port "$port" --api-key "$SGLANG_API_KEY" --skip-tokenizer-init --dtype bfloat16 \
                >>"logs/sglang-${SLURM_JOB_ID}-${node}-${port}.log" 2>&1 || true
            echo "luffy: SGLang server $node:$port exited; starting it again in ${SERVER_RESTART_DELAY:-30} s" >&2
            sleep "${SERVER_RESTART_DELAY:-30}"
        done &
        SERVER_URLS+="${SERVER_URLS:+,}http://${node}:${port}"
    done
}

# run_trainer NODE_INDEX GPUS CONFIG [overrides...]: one training node. A rank that dies ends the job (torchrun stops
# its node's other ranks, --kill-on-bad-exit the other nodes'); TORCHRUN_ARGS="--max-restarts=3" restarts the ranks
# instead, from the newest checkpoint.
run_trainer() {
    local node=${NODES[$1]} gpus=$2 config=$3
    shift 3
    # shellcheck disable=SC2086  # TORCHRUN_ARGS may hold several flags
    srun --nodes=1 --ntasks=1 -w "$node" --overlap --kill-on-bad-exit=1 \
        "$PYTHON" -m torch.distributed.run ${TORCHRUN_ARGS:-} --nnodes 1 --nproc-per-node "$gpus" \
        --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
        -m luffy_megatron.train.cli "$config" "model.hf_path=${MODEL_PATH:?set MODEL_PATH}" "${TRAINER_OVERRIDES[@]}" "$@"
}

# run_trainer_nodes NUM_NODES GPUS CONFIG [overrides...]: the first NUM_NODES nodes train together.
run_trainer_nodes() {
    local nnodes=$1 gpus=$2 config=$3 args
    shift 3
    # Quoted for the inner shell: overrides keep their spaces and brackets.
    args=$(printf '%q ' "$config" "model.hf_path=${MODEL_PATH:?set MODEL_PATH}" "${TRAINER_OVERRIDES[@]}" "$@")
    srun --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 -w "$(IFS=,; echo "${NODES[*]:0:$nnodes}")" \
        --overlap --kill-on-bad-exit=1 bash -c "exec $(printf %q "$PYTHON") -m torch.distributed.run \
        ${TORCHRUN_ARGS:-} --nnodes $nnodes \
        --node-rank \$SLURM_NODEID --nproc-per-node $gpus --master-addr $MASTER_ADDR --master-port $MASTER_PORT \
        -m luffy_megatron.train.cli $args"
}
