#!/usr/bin/env bash
# Central comparison on the embedded `scenes` stream (docs/findings.md).
# Usage: bash studies/scenes/run_central.sh OUT_DIR JOBS "variant:seed" ...
#   e.g. bash studies/scenes/run_central.sh out 2 vanilla:0 asr:0 asr_hinge:0
# Each cell is one `fed-asr engine=central` process (one thread), JOBS at a time, in
# the order given; a cell whose metrics.json exists is skipped. MODEL picks the base
# preset (default scenes_cpu; MODEL=scenes_vision prepares the vision tower first);
# EXTRA adds overrides to every cell (split on spaces).
set -uo pipefail
out=${1:?output folder}; jobs=${2:?parallel jobs}; shift 2
common=(engine=central data=scenes model="${MODEL:-scenes_cpu}"
        "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]" progress=false)
variant_args() {
  case $1 in
    vanilla) echo "method=vanilla" ;;
    vanilla_ours) echo "method=vanilla regularizer.descriptor=ours regularizer.query_tokens=prompt" ;;
    asr) echo "method=asr" ;;
    asr_hinge) echo "method=asr regularizer.spec_loss=hinge" ;;
    asr_moment) echo "method=asr regularizer.spec_loss=moment" ;;
    asr_ours) echo "method=asr regularizer.descriptor=ours regularizer.query_tokens=prompt regularizer.sym_kl=sum regularizer.geometry=token regularizer.gamma=0.05 regularizer.geo_temperature=0.1" ;;
    lwf|ewc|joint|asr_local|attention_distill|spectral_distill) echo "method=$1" ;;
    *) echo "unknown variant $1" >&2; return 1 ;;
  esac
}
for cell in "$@"; do
  name=${cell%%:*}; seed=${cell##*:}; dir="$out/$name-s$seed"
  [ -f "$dir/metrics.json" ] && continue
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 2; done
  mkdir -p "$dir"
  # shellcheck disable=SC2046
  (OMP_NUM_THREADS=1 fed-asr "${common[@]}" $(variant_args "$name") ${EXTRA:-} seed="$seed" \
     output_dir="$dir" > "$dir/run.log" 2>&1 || echo "FAILED $cell") &
done
wait
