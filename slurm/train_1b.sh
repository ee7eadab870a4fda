#!/bin/bash
# Train a 1B-class hybrid on one node of GPUs: one srun task per GPU, checkpoint and requeue
# itself when Slurm wants the node back. Every knob is an environment variable or an #SBATCH
# line; slurm/README.md lists them all. Also runs without Slurm (`bash slurm/train_1b.sh`):
# then it starts the trainer as one plain process.
#
#   sbatch slurm/train_1b.sh
#   PLAIT_PRESET=h3-1.3b PLAIT_SET="training.steps=20000 data.seq_len=2048" sbatch slurm/train_1b.sh
#
# The #SBATCH lines are defaults; options on the sbatch command line override them
# (e.g. `sbatch --gpus-per-node=4 --ntasks-per-node=4 slurm/train_1b.sh`).
#
#SBATCH --job-name=plait-1b
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.err
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue

set -euo pipefail

log() { printf '[plait-1b %s] %s\n' "$(date '+%F %T')" "$*"; }
die() {
    log "error: $1" >&2
    exit "${2:-2}"
}

# ------------------------------------------------------------------ where the repository is
# sbatch runs a copy of this file from the spool directory, so its own path says nothing
# there: ask Slurm for the submitted script's path instead (then the submit directory).
find_repo() {
    if [[ -n ${PLAIT_REPO:-} ]]; then
        printf '%s\n' "$PLAIT_REPO"
        return
    fi
    if [[ -n ${SLURM_JOB_ID:-} ]]; then
        local cmd
        cmd=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null |
            sed -n 's/.* Command=\([^ ]*\).*/\1/p') || cmd=""
        if [[ -f $cmd ]]; then
            dirname "$(dirname "$(readlink -f "$cmd")")"
            return
        fi
        printf '%s\n' "${SLURM_SUBMIT_DIR:-$PWD}"
        return
    fi
    dirname "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")"
}
repo=$(find_repo)
[[ -f $repo/slurm/train_1b.sh ]] ||
    die "cannot find the plait repository (looked in '$repo'): set PLAIT_REPO"
cd "$repo"

# ------------------------------------------------------------------ configuration
# PLAIT_PRESET: based-1.3b by default, the published Based 1.3B (BaseConv + Based linear
# attention + sliding-window attention), a true hybrid whose every layer has a Triton GPU path.
# It applies to the default config (configs/train_1b.yaml); with PLAIT_CONFIG only when given.
config=${PLAIT_CONFIG:-configs/train_1b.yaml}
preset=${PLAIT_PRESET:-}
if [[ -z ${PLAIT_CONFIG:-} ]]; then
    preset=${preset:-based-1.3b}
fi
out=${PLAIT_OUT:-runs/1b-${preset:-$(basename "$config" .yaml)}}
python=${PLAIT_PYTHON:-$repo/.venv/bin/python}
max_requeues=${PLAIT_MAX_REQUEUES:-100}
read -r -a extra_sets <<<"${PLAIT_SET:-}"
read -r -a srun_extra <<<"${PLAIT_SRUN_ARGS:-}" # e.g. container options

[[ -f $config ]] || die "PLAIT_CONFIG: $config: no such file (relative paths start at $repo)"
summary_python=$python
if [[ ! -x $python ]]; then
    # Inside a container (PLAIT_SRUN_ARGS) the interpreter need not exist out here.
    [[ -n ${PLAIT_SRUN_ARGS:-} && -n ${SLURM_JOB_ID:-} ]] ||
        die "PLAIT_PYTHON: $python is not an executable (make setup creates .venv)"
    summary_python=python3
elif [[ $(head -c 2 "$python") == "#!" ]]; then
    # A wrapper script (a pyenv shim, say) would receive the stop signal instead of Python
    # and die of it without a checkpoint.
    log "warning: PLAIT_PYTHON $python is a script, not the interpreter: stop signals reach it first"
fi

args=(--config "$config" --set "out_dir=$out")
[[ -n $preset ]] && args+=(--set "model.preset=$preset")
[[ -t 1 ]] || args+=(--set logging.progress_bar=false) # a log file, not a terminal
for s in "${extra_sets[@]}"; do
    args+=(--set "$s")
done

# ------------------------------------------------------------------ environment
# Not torchrun's variables: with RANK/WORLD_SIZE set, plait would take them over Slurm's.
unset RANK WORLD_SIZE LOCAL_RANK
if [[ -n ${SLURM_JOB_ID:-} ]]; then
    # One thread pool per task sized to its CPUs, not to the whole node.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
fi
# NCCL's warnings and errors reach the log, not its INFO lines (set INFO to debug a hang).
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Activation shapes change with data.warmup_seq_len: growable segments keep the CUDA
# caching allocator from fragmenting.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

launch=()
if [[ -n ${SLURM_JOB_ID:-} ]]; then
    # The rendezvous: the first host of the allocation (Slurm parses its own node list);
    # plait derives the port from the job id (20000 + id % 20000), the same in every task.
    # Its address as Slurm reaches it (NodeAddr), which is the node name on most clusters.
    mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null || true)
    if [[ -n ${hosts[0]:-} ]]; then
        addr=$(scontrol show node -o "${hosts[0]}" 2>/dev/null |
            sed -n 's/.* NodeAddr=\([^ ]*\).*/\1/p') || addr=""
        export MASTER_ADDR=${addr:-${hosts[0]}}
    else
        unset MASTER_ADDR # plait parses SLURM_JOB_NODELIST itself
    fi
    # srun, not torchrun: a task's exit code reaches this script (srun returns the highest),
    # srun forwards SIGUSR1 to every task, and there is no second rendezvous layer.
    # --cpus-per-task again: srun of Slurm 22.05 to 23.02 does not inherit it from sbatch.
    # --wait: a rank that crashed must not leave the others blocked in a collective.
    launch=(srun --wait=120)
    [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && launch+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    launch+=("${srun_extra[@]}")
    log "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST}:" \
        "${SLURM_NTASKS:-1} tasks, rendezvous ${MASTER_ADDR:-(from the node list)}"
else
    log "no Slurm allocation: one process on this machine"
fi
log "config $config${preset:+, preset $preset}, out $out, python $python"
cmd=("${launch[@]}" "$python" -m plait.launcher.train "${args[@]}")
log "command: ${cmd[*]}"

# ------------------------------------------------------------------ signals
# Slurm's advance warning (--signal=B:USR1@300, `scancel --signal=USR1 --batch`) and SIGTERM
# reach this shell; so does Ctrl-C without Slurm. All go on to the trainer as SIGUSR1: srun
# forwards USR1 to every task, while a SIGTERM to srun aborts the job step (measured). The
# trainer saves at the next step boundary and exits 75. A second Ctrl-C kills it.
child=""
stop_requested=0
signalled=0
# shellcheck disable=SC2329 # called by the traps below
on_signal() {
    signalled=1
    if [[ $1 == INT && $stop_requested == 1 && -n $child ]]; then
        log "second interrupt: killing the trainer (no checkpoint)"
        kill -KILL "$child" 2>/dev/null || true
        return 0 # a bare return in a trap returns the interrupted command's status (set -e)
    fi
    stop_requested=1
    if [[ -n $child ]]; then
        log "got SIG$1: asking the trainer to checkpoint and stop"
        kill -USR1 "$child" 2>/dev/null || true
    else
        log "got SIG$1"
    fi
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT

mkdir -p "$out"
rm -f "$out/stop.json" # a stale one must not decide this run's fate
"${cmd[@]}" &
child=$!
if ((stop_requested)); then # the signal came before the trainer started
    kill -USR1 "$child" 2>/dev/null || true
fi
while :; do
    signalled=0
    if wait "$child"; then rc=0; else rc=$?; fi
    # A trapped signal interrupts `wait` (status > 128) while the trainer runs on.
    ((signalled && rc > 128)) || break
done
child=""

# ------------------------------------------------------------------ outcome
code=$rc
if [[ $rc -ne 0 && -f $out/stop.json ]]; then
    # The trainer's own record of an early stop (launchers may report another code).
    code=$(sed -n 's/.*"exit_code": *\([0-9]*\).*/\1/p' "$out/stop.json")
    code=${code:-$rc}
elif ((stop_requested && rc == 128 + 10)); then
    # SIGUSR1 killed the trainer before it installed its handler: nothing was trained since
    # the last checkpoint, so this is a stop for requeue too.
    code=75
fi

# One line for people and scripts: steps, last loss, throughput, newest checkpoint.
"$summary_python" - "$out" "$code" <<'EOF' || log "summary: cannot read $out"
import json, pathlib, sys

out, code = pathlib.Path(sys.argv[1]), int(sys.argv[2])
row = None
if (out / "metrics.jsonl").is_file():
    for line in (out / "metrics.jsonl").read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:  # a line cut short by a killed process
            continue
        if r.get("kind") == "train":
            row = r
ckpt_dir = out / "checkpoints"
if (out / "config.json").is_file():
    ckpt_dir = pathlib.Path(json.loads((out / "config.json").read_text())["checkpoint"]["dir"]
                            or ckpt_dir)
latest = ckpt_dir / "latest"
ckpt = ckpt_dir / latest.read_text().strip() if latest.is_file() else "none"
what = {0: "finished", 2: "config or checkpoint error", 3: "non-finite steps",
        75: "stopped to be resumed"}.get(code, "failed")
if row is None:
    print(f"summary: no training step logged in {out}, checkpoint {ckpt}, exit {code} ({what})")
else:
    print(f"summary: step {row['step']}, loss {row['loss']:.4f}, "
          f"{row['tokens_per_s']:.0f} tokens/s, checkpoint {ckpt}, exit {code} ({what})")
EOF

if ((code == 75)); then
    if [[ -z ${SLURM_JOB_ID:-} ]]; then
        log "stopped early: run the same command again to resume from the newest checkpoint"
        exit 75
    fi
    # `scancel <job>` sends SIGTERM to everything; the trainer saves and exits 75 then too,
    # and Slurm would still accept a requeue (measured). A cancelled job ends with
    # Reason=None; at its time limit the reason is TimeLimit and the job is requeued.
    info=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null || true)
    state=$(sed -n 's/.* JobState=\([^ ]*\).*/\1/p' <<<"$info")
    reason=$(sed -n 's/.* Reason=\([^ ]*\).*/\1/p' <<<"$info")
    if [[ ($state == COMPLETING || $state == CANCELLED) && $reason == None ]]; then
        log "the job was cancelled: not requeued (submit it again to resume)"
        exit 75
    fi
    if ((${SLURM_RESTART_COUNT:-0} >= max_requeues)); then
        log "not requeued: $max_requeues requeues already (PLAIT_MAX_REQUEUES)"
        exit 75
    fi
    if scontrol requeue "$SLURM_JOB_ID"; then
        log "requeued job $SLURM_JOB_ID: it resumes from the checkpoint when it starts again"
        exit 0
    fi
    log "scontrol requeue failed: submit the same job again to resume"
    exit 75
fi
exit "$code"
