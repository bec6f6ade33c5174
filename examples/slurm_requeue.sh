#!/usr/bin/env bash
# Sourced by the sbatch scripts: requeue on Slurm's warning signal, and the trainer step's fate in the job output.
# The scripts ask Slurm for
#   #SBATCH --requeue              the job may go back to the queue (when it requeues itself, or is preempted)
#   #SBATCH --signal=B:USR1@600    SIGUSR1 to this batch shell 600 s before the time limit
# On SIGUSR1 (or SIGTERM) the trap creates the stop file; the trainer finishes its current step, writes a checkpoint,
# leaves the requeue marker and exits; run_step then requeues the job, which resumes from that checkpoint.
# The signal goes to this shell only (B:): torchrun would die of a SIGUSR1 without passing it to its workers.
mkdir -p logs
LUFFY_STOP_FILE=$PWD/logs/luffy-stop-$SLURM_JOB_ID
LUFFY_REQUEUE_MARKER=$PWD/logs/luffy-requeue-$SLURM_JOB_ID
rm -f "$LUFFY_STOP_FILE" "$LUFFY_REQUEUE_MARKER"
# Overrides for the trainer's fault_tolerance section.
FT_OVERRIDES=("fault_tolerance.stop_file=$LUFFY_STOP_FILE" "fault_tolerance.requeue_marker=$LUFFY_REQUEUE_MARKER")
ask_to_stop() {
    echo "luffy: job $SLURM_JOB_ID got $1: the trainer stops after its current step and checkpoints"
    touch "$LUFFY_STOP_FILE"
}
trap 'ask_to_stop SIGUSR1' USR1
trap 'ask_to_stop SIGTERM' TERM
echo "luffy: job $SLURM_JOB_ID, start ${SLURM_RESTART_COUNT:-0} (0 = first; more after a requeue)"

# run_step CMD [ARGS...]: run CMD (the trainer's srun) in the background and wait for it through trapped signals.
# Afterwards: requeue the job when the trainer left the marker, else end the job with the step's exit status.
run_step() {
    local pid rc
    "$@" &
    pid=$!
    while true; do
        rc=0
        wait "$pid" || rc=$?
        kill -0 "$pid" 2>/dev/null || break  # still running: wait was interrupted by a trapped signal
    done
    if [[ -f $LUFFY_REQUEUE_MARKER ]]; then
        echo "luffy: $(cat "$LUFFY_REQUEUE_MARKER"); requeueing job $SLURM_JOB_ID"
        rm -f "$LUFFY_REQUEUE_MARKER" "$LUFFY_STOP_FILE"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    if ((rc != 0)); then
        echo "luffy: the trainer step failed with exit status $rc; the first error above names the cause" >&2
        exit "$rc"
    fi
}
