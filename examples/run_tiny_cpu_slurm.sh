#!/usr/bin/env bash
# The tiny CPU config on Slurm, no GPU needed: one node, one task running torchrun with two CPU processes (TP 2),
# two steps by default. Submit from the repository root (configs/ and the package are found from there):
#   sbatch examples/run_tiny_cpu_slurm.sh [CONFIG] [key=value ...]
#   PYTHON=.venv/bin/python sbatch examples/run_tiny_cpu_slurm.sh trainer.total_steps=20
# Without a model.hf_path override it trains the demo's tiny model and task of seed 1 in outputs/demo/seed1/ (made
# here when missing, as `make demo` makes them). The job's output is luffy-tiny-cpu-JOBID.out in the submit directory.
#SBATCH --job-name=luffy-tiny-cpu
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --time=00:30:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@60
#SBATCH --output=%x-%j.out
set -euo pipefail
CONFIG=configs/tiny_cpu_luffy.yaml
if [[ $# -gt 0 && $1 != *=* ]]; then
    CONFIG=$1
    shift
fi
# sbatch runs a copy of this script from its spool directory: slurm_requeue.sh is next to the original.
HERE=$(dirname "$(scontrol show job "${SLURM_JOB_ID:?submit with sbatch}" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')")
source "$HERE/slurm_requeue.sh"
PYTHON=${PYTHON:-python}
NPROC=${NPROC:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}

if [[ " $* " != *" model.hf_path="* ]]; then
    [[ -f outputs/demo/seed1/tiny_model/config.json && -f outputs/demo/seed1/task/train.parquet ]] ||
        "$PYTHON" tools/run_demo.py --out outputs/demo --seeds 1 --prepare-only
fi

echo "luffy-tiny-cpu: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, $NPROC processes, master $MASTER_ADDR:$MASTER_PORT"
# Defaults first: the command line's key=value overrides win. A rank that dies ends the job (torchrun stops the
# other ranks; --kill-on-bad-exit the other nodes' tasks); TORCHRUN_ARGS="--max-restarts=3" restarts them instead
# (from the newest checkpoint).
run_step srun --ntasks=1 --kill-on-bad-exit=1 "$PYTHON" -m torch.distributed.run ${TORCHRUN_ARGS:-} --nnodes 1 \
    --nproc-per-node "$NPROC" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    -m luffy_megatron.train.cli "$CONFIG" parallel.tp=2 trainer.total_steps=2 logging.progress_bar=false \
    "${FT_OVERRIDES[@]}" "$@"
