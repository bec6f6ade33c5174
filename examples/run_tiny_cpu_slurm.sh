#!/usr/bin/env bash
# The tiny CPU config on Slurm, no GPU needed: one node, one task running torchrun with two CPU processes (TP 2),
# two steps by default. Submit from the repository root (configs/ and the package are found from there):
#   sbatch examples/run_tiny_cpu_slurm.sh [CONFIG] [key=value ...]
#   PYTHON=.venv/bin/python sbatch examples/run_tiny_cpu_slurm.sh trainer.total_steps=20
# Without a model.hf_path override it trains the demo's tiny model and task in outputs/demo/ (made here when missing,
# as `make demo` makes them). The job's output is luffy-tiny-cpu-JOBID.out in the submit directory.
#SBATCH --job-name=luffy-tiny-cpu
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --time=00:30:00
#SBATCH --output=%x-%j.out
set -euo pipefail
CONFIG=configs/tiny_cpu_luffy.yaml
if [[ $# -gt 0 && $1 != *=* ]]; then
    CONFIG=$1
    shift
fi
PYTHON=${PYTHON:-python}
NPROC=${NPROC:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}

if [[ " $* " != *" model.hf_path="* ]]; then
    [[ -f outputs/demo/tiny_model/config.json ]] || "$PYTHON" tools/make_tiny_model.py --out outputs/demo/tiny_model \
        --hidden-size 128 --layers 2 --heads 4 --kv-heads 4 --intermediate-size 512 --seed 1
    [[ -f outputs/demo/task/train.parquet ]] || "$PYTHON" tools/make_synthetic_task.py --out outputs/demo/task \
        --num-train 9000 --num-val 256 --no-system-prompt --seed 1
fi

echo "luffy-tiny-cpu: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, $NPROC processes, master $MASTER_ADDR:$MASTER_PORT"
# Defaults first: the command line's key=value overrides win.
srun --ntasks=1 "$PYTHON" -m torch.distributed.run --nnodes 1 --nproc-per-node "$NPROC" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    -m luffy_megatron.train.cli "$CONFIG" parallel.tp=2 trainer.total_steps=2 logging.progress_bar=false "$@"
