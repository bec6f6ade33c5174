#!/usr/bin/env bash
# LUFFY on Qwen2.5-Math-7B, the paper's recipe: 2 nodes x 8 GPUs. Node 0 trains (Megatron, TP 4 x DP 2);
# node 1 serves rollouts (4 SGLang servers of TP 2). Weights go to the servers over NCCL after every step.
#   sbatch examples/run_7b.sh [CONFIG] [key=value ...]
# From the repository root. Job output: luffy-7b-JOBID.out there (Slurm fails a job silently when the folder of
# --output is missing); SGLang server logs: logs/.
#SBATCH --job-name=luffy-7b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=72:00:00
#SBATCH --output=%x-%j.out
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@900
set -euo pipefail
CONFIG=configs/luffy_qwen2.5_math_7b.yaml
if [[ $# -gt 0 && $1 != *=* ]]; then  # an optional CONFIG first; key=value arguments are overrides
    CONFIG=$1
    shift
fi
# sbatch runs a copy of this script from its spool directory: slurm_common.sh is next to the original.
HERE=$(dirname "$(scontrol show job "${SLURM_JOB_ID:?submit with sbatch}" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')")
source "$HERE/slurm_common.sh"
# GPUs per SGLang server, for the servers and the trainer alike: its weight-update group has a rank per server GPU.
SERVER_TP=2
launch_rollout_servers 1 $((8 / SERVER_TP)) "$SERVER_TP"  # node index, servers (filling its 8 GPUs), TP per server
run_step run_trainer 0 8 "$CONFIG" "rollout.sglang.launch=false" "rollout.sglang.tp_size=$SERVER_TP" \
    "rollout.sglang.urls=[$SERVER_URLS]" "$@"
