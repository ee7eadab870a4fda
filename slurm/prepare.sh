#!/bin/bash
# Prepare a corpus for training (CPU job): train the sentencepiece tokenizer on a sample,
# tokenize with one worker per CPU into shards, split train/validation, write the manifest.
# Resumable: a requeued or resubmitted job keeps the shards already finished.
#
#   PLAIT_SOURCE=/data/corpus.jsonl PLAIT_DATA=/data/prepared sbatch slurm/prepare.sh
#   PLAIT_PREPARE_ARGS="--vocab-size 32000 --docs-per-shard 50000" ...
#
#SBATCH --job-name=plait-prepare
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --mem=64G
#SBATCH --time=12:00:00
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.err
#SBATCH --open-mode=append
#SBATCH --requeue

set -euo pipefail
PLAIT_JOB_KIND=plait-prepare

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

source_=${PLAIT_SOURCE:-}
[[ -n $source_ ]] || die "PLAIT_SOURCE: give the corpus (JSON lines / text files or a directory, parquet, or a hub dataset name)"
data=${PLAIT_DATA:-data/prepared}
workers=${PLAIT_WORKERS:-${SLURM_CPUS_PER_TASK:-1}}
read -r -a extra <<<"${PLAIT_PREPARE_ARGS:-}"
cmd=("$python" -m plait.data.prepare --source "$source_" --out "$data" --workers "$workers" "${extra[@]}")
log "command: ${cmd[*]}"
"${cmd[@]}"
log "summary: prepared $data (manifest $data/manifest.json)"
