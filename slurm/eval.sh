#!/bin/bash
# Evaluate a trained run: plait's long-context evaluation of its newest checkpoint
# (python -m plait.launcher.evaluate: loss by position at 1x-8x the training length, passkey,
# MQAR; TensorBoard beside the training curves) and lm-eval-harness on its HF export
# (pip install -e ".[eval]"): by default the local last-word task over the held-out split of
# the prepared data (plait.data.lastword; nothing from the hub), or any lm-eval tasks where
# the hub is reachable. PLAIT_EVAL=long|lm|both (default: both, as far as the inputs exist).
#
#   PLAIT_OUT=runs/x PLAIT_DATA=data/prepared sbatch slurm/eval.sh
#   PLAIT_HF=runs/x/hf PLAIT_EVAL=lm PLAIT_EVAL_TASKS=lambada_openai,hellaswag \
#       HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 sbatch slurm/eval.sh
#
#SBATCH --job-name=plait-eval
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=4:00:00
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.err
#SBATCH --open-mode=append

set -euo pipefail
PLAIT_JOB_KIND=plait-eval

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
hf=${PLAIT_HF:-${run:+$run/hf}}
mode=${PLAIT_EVAL:-both}
[[ $mode == long || $mode == lm || $mode == both ]] || die "PLAIT_EVAL: '$mode' is not long, lm or both"
if [[ $mode != lm && -n $run && -d $run/checkpoints ]]; then
    read -r -a long_args <<<"${PLAIT_EVAL_LONG_ARGS:-}"
    long=("$python" -m plait.launcher.evaluate --checkpoint "$run/checkpoints"
        --tensorboard "$run" "${long_args[@]}")
    [[ -n ${PLAIT_DATA:-} ]] && long+=(--set "data.datasets=[$PLAIT_DATA]")
    # the layout of the evaluation: one process (srun with several tasks for TP/CP)
    [[ -n ${SLURM_JOB_ID:-} && ${SLURM_NTASKS:-1} -gt 1 ]] && long=(srun "${long[@]}")
    log "command: ${long[*]}"
    "${long[@]}"
elif [[ $mode == long ]]; then
    die "PLAIT_OUT: '$run' has no checkpoints/ to evaluate"
fi
if [[ $mode == long ]]; then
    log "summary: long-context evaluation of $run done"
    exit 0
fi
[[ -n $hf && -f $hf/config.json ]] || die "PLAIT_HF: '$hf' is not an exported model directory (slurm/export_hf.sh)"
tasks=${PLAIT_EVAL_TASKS:-plait_lastword}
results=${PLAIT_EVAL_OUT:-$hf/eval}
device=${PLAIT_EVAL_DEVICE:-$("$python" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
read -r -a extra <<<"${PLAIT_EVAL_ARGS:-}"
include=()
if [[ ,$tasks, == *,plait_lastword,* ]]; then
    data=${PLAIT_DATA:-}
    [[ -n $data ]] || die "PLAIT_DATA: the prepared data directory (its held-out split is the plait_lastword task)"
    "$python" -m plait.data.lastword --data "$data" --out "$results/task" --docs "${PLAIT_EVAL_DOCS:-500}"
    include=(--include_path "$results/task")
fi
cmd=("$python" -m lm_eval --model hf
    --model_args "pretrained=$hf,trust_remote_code=True,dtype=${PLAIT_EVAL_DTYPE:-float32}"
    --tasks "$tasks" "${include[@]}" --device "$device"
    --batch_size "${PLAIT_EVAL_BATCH:-8}" --output_path "$results" "${extra[@]}")
log "command: ${cmd[*]}"
"${cmd[@]}"
log "summary: $tasks on $hf, results in $results"
