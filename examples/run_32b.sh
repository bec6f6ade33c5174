#!/usr/bin/env bash
# LUFFY on Qwen2.5-32B: 4 nodes x 8 GPUs. Nodes 0-1 train (Megatron TP 8 x PP 2), nodes 2-3 serve rollouts
# (8 SGLang servers of TP 4 behind sglang-router). Weights go to the servers over NCCL after every step.
#   sbatch examples/run_32b.sh [CONFIG] [key=value ...]
#SBATCH --job-name=luffy-32b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=120:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
CONFIG=${1:-configs/luffy_qwen2.5_32b.yaml}
shift || true
source "$(dirname "$0")/slurm_common.sh"
TRAIN_NODES=2
launch_rollout_servers 2 4 4
launch_rollout_servers 3 4 4
run_trainer_nodes "$TRAIN_NODES" 8 "$CONFIG" "rollout.sglang.urls=[$SERVER_URLS]" "$@"
