#!/usr/bin/env bash
# LUFFY on Qwen2.5-32B: 4 nodes x 8 GPUs. Nodes 0-1 train (Megatron TP 8 x PP 2), nodes 2-3 serve rollouts
# (4 SGLang servers of TP 4, two per node, behind sglang-router). Weights go to the servers over NCCL after every step.
#   sbatch examples/run_32b.sh [CONFIG] [key=value ...]
# From the repository root. Job output: luffy-32b-JOBID.out there (Slurm fails a job silently when the folder of
# --output is missing); SGLang server logs: logs/.
#SBATCH --job-name=luffy-32b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=120:00:00
#SBATCH --output=%x-%j.out
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@1800
set -euo pipefail
CONFIG=configs/luffy_qwen2.5_32b.yaml
if [[ $# -gt 0 && $1 != *=* ]]; then  # an optional CONFIG first; key=value arguments are overrides
    CONFIG=$1
    shift
fi
# sbatch runs a copy of this script from its spool directory: slurm_common.sh is next to the original.
HERE=$(dirname "$(scontrol show job "${SLURM_JOB_ID:?submit with sbatch}" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')")
source "$HERE/slurm_common.sh"
TRAIN_NODES=2
# GPUs per SGLang server, for the servers and the trainer alike: its weight-update group has a rank per server GPU.
SERVER_TP=4
for node in 2 3; do  # the rollout nodes: 2 servers of TP 4 fill each one's 8 GPUs
    launch_rollout_servers "$node" $((8 / SERVER_TP)) "$SERVER_TP"
done
run_step run_trainer_nodes "$TRAIN_NODES" 8 "$CONFIG" "rollout.sglang.launch=false" \
    "rollout.sglang.tp_size=$SERVER_TP" "rollout.sglang.urls=[$SERVER_URLS]" "$@"
