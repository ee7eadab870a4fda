#!/bin/bash
# Shared by prepare.sh, export_hf.sh and eval.sh (sourced after they found the repository):
# logging, errors, the interpreter. train_1b.sh is self-contained.

# shellcheck disable=SC2034 # read by the scripts that source this file
log() { printf '[%s %s] %s\n' "${PLAIT_JOB_KIND:-plait}" "$(date '+%F %T')" "$*"; }
die() {
    log "error: $1" >&2
    exit "${2:-2}"
}

# The interpreter: PLAIT_PYTHON, else the repository's .venv.
python=${PLAIT_PYTHON:-$repo/.venv/bin/python}
[[ -x $python ]] || die "PLAIT_PYTHON: $python is not an executable (make setup creates .venv)"
if [[ -n ${SLURM_JOB_ID:-} ]]; then
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    log "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}"
fi
# No hub: the jobs read local files only (set them to 0 where the hub is reachable and wanted).
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
