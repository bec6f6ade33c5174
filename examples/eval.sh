#!/usr/bin/env bash
# luffy-eval on one GPU node: the paper's benchmarks (AIME24/25, AMC, MATH-500, Minerva, Olympiad) and the
# out-of-distribution sets, with SGLang servers started by the tool behind sglang-router: one per GPU, or one per
# EVAL_TP GPUs.
#   MODEL_PATH=hf_out [EVAL_TP=2] sbatch examples/eval.sh [DATA.parquet ...] [-- luffy-eval options]
# MODEL_PATH is an HF folder or a luffy-megatron checkpoint (converted to OUT/hf_model first). Results in
# ${EVAL_OUT:-eval/$SLURM_JOB_ID}: results.md, results.json, samples.jsonl; a resubmission with the same EVAL_OUT
# generates only what is missing.
#SBATCH --job-name=luffy-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
PYTHON=${PYTHON:-python}
DATA=()
while [[ $# -gt 0 && $1 != -- ]]; do
    DATA+=("$1")
    shift
done
[[ $# -gt 0 ]] && shift  # the --
[[ ${#DATA[@]} -gt 0 ]] || DATA=(data/valid.all.parquet)
GPUS=${SLURM_GPUS_ON_NODE:-8}
TP=${EVAL_TP:-1}  # GPUs per server (a 32B model needs 2 or more): GPUS / TP servers fill the node
if ((GPUS % TP != 0)); then
    echo "eval.sh: EVAL_TP=$TP does not divide the node's $GPUS GPUs" >&2
    exit 2
fi
exec "$PYTHON" -m luffy_megatron.eval.cli --model "${MODEL_PATH:?set MODEL_PATH}" --data "${DATA[@]}" \
    --out "${EVAL_OUT:-eval/${SLURM_JOB_ID:-local}}" --backend sglang --sglang-launch \
    --sglang-servers $((GPUS / TP)) --sglang-tp "$TP" --sglang-router --chunk-size 1024 "$@"
