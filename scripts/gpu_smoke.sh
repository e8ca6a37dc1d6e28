#!/usr/bin/env bash
# GPU smoke test of every model family: for each one, a two-client, two-stage FedASR
# run on Flower's simulation engine (easy-VQA shape -> color, one round per stage, a
# small slice), on CUDA, then a check of its metrics.json.
#
# Checkpoints: FED_ASR_CKPT_<KIND> names a local checkpoint directory of that kind
# (e.g. FED_ASR_CKPT_QWEN2_VL=/models/Qwen2-VL-2B-Instruct,
# FED_ASR_CKPT_PALIGEMMA2=/models/paligemma2-3b-pt-224,
# FED_ASR_CKPT_IDEFICS3=/models/SmolVLM-256M-Instruct (an Idefics3 or SmolVLM one),
# FED_ASR_CKPT_LLAVA_ONEVISION=/models/llava-onevision-qwen2-0.5b-ov-hf); without
# one, a tiny random checkpoint of the family is built locally
# (python -m fed_asr.models.tiny_families), so the script needs no download. `llava` always runs the built-in tiny LLaVA.
#
# Usage: scripts/gpu_smoke.sh [OUT_DIR]                (default: ./gpu-smoke)
# Environment:
#   FED_ASR_KINDS="llava paligemma ..."   kinds to run (default: all of them,
#                                    llava paligemma paligemma2 qwen2_vl qwen2_5_vl
#                                    idefics3 llava_onevision)
#   FED_ASR_DTYPE=bfloat16          model dtype on the GPU
#   FED_ASR_OVERRIDES="..."         extra Hydra overrides for every run
#   PYTHON=python                   interpreter of the fed-asr environment
# Exit code 0 when every kind ran and wrote an accuracy for both stages.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
OUT=$("$PY" -c 'import os, sys; print(os.path.abspath(sys.argv[1]))' "${1:-gpu-smoke}")
KINDS=${FED_ASR_KINDS:-llava paligemma paligemma2 qwen2_vl qwen2_5_vl idefics3 llava_onevision}
DTYPE=${FED_ASR_DTYPE:-bfloat16}
read -r -a EXTRA <<< "${FED_ASR_OVERRIDES:-}"
cd "$REPO"
mkdir -p "$OUT"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_smoke: no CUDA device visible to torch" >&2
    exit 2
fi

fed_asr() {  # the `fed-asr` console script, from this checkout
    "$PY" -c 'import sys; from server.cli import main; sys.exit(main(sys.argv[1:]))' "$@"
}

template_of() {  # the prompt template of a tiny checkpoint kind
    "$PY" -c 'import sys; from fed_asr.models.tiny_families import TINY_TEMPLATES as T
print(T[sys.argv[1]])' "$1"
}

preset_of() {  # configs/model preset of a real checkpoint kind
    case "$1" in
        paligemma|paligemma2) echo paligemma ;;
        qwen2_vl|qwen2_5_vl) echo qwen2_vl ;;
        idefics3) echo idefics3 ;;
        llava_onevision) echo llava_onevision ;;
        *) echo "gpu_smoke: no preset for kind $1" >&2; return 1 ;;
    esac
}

failed=()
for kind in $KINDS; do
    run="$OUT/$kind"
    rm -rf "$run"
    mkdir -p "$run"
    model=()
    if [[ "$kind" == llava ]]; then
        model=(model=tiny "model.cache_dir=$OUT/cache")
    else
        var="FED_ASR_CKPT_$(echo "$kind" | tr '[:lower:]' '[:upper:]')"
        ckpt=${!var:-}
        if [[ -n "$ckpt" ]]; then
            model=("model=$(preset_of "$kind")" "model.path=$ckpt")
        else
            ckpt="$run/tiny-checkpoint"
            "$PY" -m fed_asr.models.tiny_families "$kind" "$ckpt" > /dev/null
            model=(model=pretrained "model.path=$ckpt"
                   "model.prompt_template='$(template_of "$kind")'")
        fi
    fi
    echo "== $kind: ${model[*]}"
    if fed_asr engine=simulation "${model[@]}" \
        model.device=cuda "model.dtype=$DTYPE" \
        federation.num_clients=2 federation.schedule=fixed \
        federation.rounds_per_stage=1 federation.min_available_clients=2 \
        "data.stage_order=[shape,color]" data.max_train_per_stage=32 \
        data.max_test_per_stage=16 train.batch_size=8 train.eval_batch_size=16 \
        regularizer.l_sel=2 progress=false "output_dir=$run/out" \
        "${EXTRA[@]}" > "$run/log.txt" 2>&1 \
        && "$PY" - "$run/out/metrics.json" <<'CHECK'
import json, sys
metrics = json.load(open(sys.argv[1]))
matrix = metrics["accuracy_matrix"]
assert len(matrix) == 2 and matrix[0][0] is not None and None not in matrix[1], matrix
print(f"   accuracy matrix {matrix}")
CHECK
    then
        echo "   ok: $run/out/metrics.json"
    else
        echo "   FAILED (log: $run/log.txt)"
        tail -n 20 "$run/log.txt" | sed 's/^/   | /'
        failed+=("$kind")
    fi
done

if (( ${#failed[@]} )); then
    echo "gpu_smoke: failed: ${failed[*]}" >&2
    exit 1
fi
echo "gpu_smoke: all kinds passed ($KINDS)"
