#!/usr/bin/env bash
# luffy-eval on one GPU node: the paper's benchmarks (AIME24/25, AMC, MATH-500, Minerva, Olympiad) and the
# out-of-distribution sets, with SGLang servers started by the tool (one per GPU, behind sglang-router).
#   MODEL_PATH=hf_out sbatch examples/eval.sh [DATA.parquet ...] [-- luffy-eval options]
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
exec "$PYTHON" -m luffy_megatron.eval.cli --model "${MODEL_PATH:?set MODEL_PATH}" --data "${DATA[@]}" \
    --out "${EVAL_OUT:-eval/${SLURM_JOB_ID:-local}}" --backend sglang --sglang-launch \
    --sglang-servers "$GPUS" --sglang-tp 1 --sglang-router --chunk-size 1024 "$@"
