#!/usr/bin/env bash
# Helpers shared by the sbatch scripts: node list, SGLang servers on rollout nodes, torchrun trainers.
mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
export MASTER_ADDR=${NODES[0]}
export MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python}
SERVER_URLS=""
mkdir -p logs

# launch_rollout_servers NODE_INDEX NUM_SERVERS TP: start SGLang servers on one node (background job step).
launch_rollout_servers() {
    local node=${NODES[$1]} count=$2 tp=$3 i gpus port
    for ((i = 0; i < count; i++)); do
        gpus=$(seq -s, $((i * tp)) $((i * tp + tp - 1)))
        port=$((30000 + i))
        # The GPUs are set inside the step (`env`): Slurm sets CUDA_VISIBLE_DEVICES to all of the node's GPUs in
        # every step, overriding a value passed with srun --export.
        srun --nodes=1 --ntasks=1 -w "$node" --overlap \
            env CUDA_VISIBLE_DEVICES="$gpus" \
            "$PYTHON" -m sglang.launch_server --model-path "${MODEL_PATH:?set MODEL_PATH}" --tp-size "$tp" \
            --host "$node" --port "$port" ${SGLANG_API_KEY:+--api-key "$SGLANG_API_KEY"} --skip-tokenizer-init --dtype bfloat16 \
            >"logs/sglang-${SLURM_JOB_ID}-${node}-${port}.log" 2>&1 &
        SERVER_URLS+="${SERVER_URLS:+,}http://${node}:${port}"
    done
}

# run_trainer NODE_INDEX GPUS CONFIG [overrides...]: one training node.
run_trainer() {
    local node=${NODES[$1]} gpus=$2 config=$3
    shift 3
    srun --nodes=1 --ntasks=1 -w "$node" --overlap \
        "$PYTHON" -m torch.distributed.run --nnodes 1 --nproc-per-node "$gpus" \
        --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
        -m luffy_megatron.train.cli "$config" "model.hf_path=${MODEL_PATH:?set MODEL_PATH}" "$@"
}

# run_trainer_nodes NUM_NODES GPUS CONFIG [overrides...]: the first NUM_NODES nodes train together.
run_trainer_nodes() {
    local nnodes=$1 gpus=$2 config=$3 args
    shift 3
    # Quoted for the inner shell: overrides keep their spaces and brackets.
    args=$(printf '%q ' "$config" "model.hf_path=${MODEL_PATH:?set MODEL_PATH}" "$@")
    srun --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 -w "$(IFS=,; echo "${NODES[*]:0:$nnodes}")" \
        --overlap bash -c "exec $(printf %q "$PYTHON") -m torch.distributed.run --nnodes $nnodes \
        --node-rank \$SLURM_NODEID --nproc-per-node $gpus --master-addr $MASTER_ADDR --master-port $MASTER_PORT \
        -m luffy_megatron.train.cli $args"
}
