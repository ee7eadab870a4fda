#!/bin/bash
# The whole project as one chain of Slurm jobs: prepare -> train -> export -> eval, each
# starting only when the previous one succeeded (--dependency=afterok). Run it where you run
# sbatch (a login node), not through sbatch:
#
#   PLAIT_SOURCE=/data/corpus.jsonl PLAIT_DATA=/data/prepared PLAIT_OUT=runs/based \
#       PLAIT_SBATCH_ARGS="--partition=gpu --account=myproj" bash slurm/pipeline.sh
#
# Every PLAIT_* variable of the four scripts applies (sbatch passes the environment on);
# train gets PLAIT_SET="data.datasets=[$PLAIT_DATA] $PLAIT_SET". PLAIT_SBATCH_ARGS goes to
# every sbatch, PLAIT_{PREPARE,TRAIN,EXPORT,EVAL}_SBATCH to one stage's. PLAIT_SKIP_PREPARE=1
# uses an existing PLAIT_DATA. Prints the job ids, the last one on the last line.

set -euo pipefail

here=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
repo=$(dirname "$here")
die() {
    echo "pipeline: error: $1" >&2
    exit 2
}
command -v sbatch >/dev/null || die "sbatch not found: run this where Slurm jobs are submitted"
[[ -n ${PLAIT_DATA:-} ]] || die "PLAIT_DATA: where the prepared data goes (or is, with PLAIT_SKIP_PREPARE=1)"
[[ -n ${PLAIT_OUT:-} ]] || die "PLAIT_OUT: the run directory (checkpoints, hf/, eval)"
data=$(readlink -f "$PLAIT_DATA")
out=$(readlink -f "$PLAIT_OUT")
export PLAIT_REPO=${PLAIT_REPO:-$repo} PLAIT_DATA=$data PLAIT_OUT=$out
export PLAIT_HF=${PLAIT_HF:-$out/hf}
read -r -a common <<<"${PLAIT_SBATCH_ARGS:-}"

submit() { # stage, dependency, script
    local dep=$2 script=$3 own var="PLAIT_${1}_SBATCH"
    read -r -a own <<<"${!var:-}"
    local args=(--parsable "${common[@]}" "${own[@]}")
    [[ -n $dep ]] && args+=(--dependency="afterok:$dep" --kill-on-invalid-dep=yes)
    sbatch "${args[@]}" "$repo/slurm/$script" | cut -d';' -f1
}

prepare=""
if [[ ${PLAIT_SKIP_PREPARE:-0} != 1 ]]; then
    [[ -n ${PLAIT_SOURCE:-} ]] || die "PLAIT_SOURCE: the corpus to prepare (or PLAIT_SKIP_PREPARE=1)"
    prepare=$(submit PREPARE "" prepare.sh)
    echo "prepare: job $prepare"
fi
train=$(PLAIT_SET="data.datasets=[$data] ${PLAIT_SET:-}" submit TRAIN "$prepare" train_1b.sh)
echo "train:   job $train"
export_job=$(submit EXPORT "$train" export_hf.sh)
echo "export:  job $export_job"
eval_job=$(submit EVAL "$export_job" eval.sh)
echo "eval:    job $eval_job"
echo "$eval_job"
