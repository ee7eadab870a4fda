#!/bin/bash
# Convert a run's newest complete checkpoint (or PLAIT_CHECKPOINT) to a HuggingFace
# directory that transformers loads with trust_remote_code (docs/export.md). CPU job: a
# checkpoint holds full weights whatever layout trained it, so no GPU and no process group.
#
#   PLAIT_OUT=runs/1b-based-1.3b sbatch slurm/export_hf.sh          # -> runs/.../hf
#   PLAIT_CHECKPOINT=runs/x/checkpoints/step20000 PLAIT_HF=hf/x PLAIT_DTYPE=bf16 sbatch ...
#
#SBATCH --job-name=plait-export
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=2:00:00
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.err
#SBATCH --open-mode=append

set -euo pipefail
PLAIT_JOB_KIND=plait-export

# sbatch runs a copy of this file from the spool directory: find the repository from the
# submitted script's path (scontrol), else the submit directory, else this file's location.
find_repo() {
    if [[ -n ${PLAIT_REPO:-} ]]; then
        printf '%s\n' "$PLAIT_REPO"
    elif [[ -n ${SLURM_JOB_ID:-} ]]; then
        local cmd
        cmd=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null |
            sed -n 's/.* Command=\([^ ]*\).*/\1/p') || cmd=""
        if [[ -f $cmd ]]; then dirname "$(dirname "$(readlink -f "$cmd")")"; else printf '%s\n' "${SLURM_SUBMIT_DIR:-$PWD}"; fi
    else
        dirname "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")"
    fi
}
repo=$(find_repo)
[[ -f $repo/slurm/common.sh ]] || { echo "cannot find the plait repository in '$repo': set PLAIT_REPO" >&2; exit 2; }
cd "$repo"
# shellcheck source=slurm/common.sh
source "$repo/slurm/common.sh"

run=${PLAIT_OUT:-}
ckpt=${PLAIT_CHECKPOINT:-${run:+$run/checkpoints}}
[[ -n $ckpt ]] || die "give PLAIT_OUT (the run directory) or PLAIT_CHECKPOINT"
hf=${PLAIT_HF:-${run:-$ckpt}/hf}
dtype=${PLAIT_DTYPE:-bf16}
read -r -a extra <<<"${PLAIT_EXPORT_ARGS:-}"
cmd=("$python" -m plait.launcher.export --checkpoint "$ckpt" --out "$hf" --dtype "$dtype" "${extra[@]}")
[[ -t 1 ]] || cmd+=(--no-progress)
log "command: ${cmd[*]}"
"${cmd[@]}"
log "summary: exported $ckpt -> $hf ($dtype)"
