#!/usr/bin/env bash
# Run a grid of study cells ("variant:seed"), JOBS at a time (docs/findings.md).
# Usage: bash studies/run_cells.sh OUT_DIR JOBS "variant:seed" ...
#   e.g. ENGINE=simulation DATA="data=easyvqa data.stream=ability" MODEL=tiny_vision \
#        bash studies/run_cells.sh out 2 vanilla:0 asr:0 asr_local:0 spectral_distill:0
# Each cell is one `fed-asr` process (one thread) writing OUT_DIR/<variant>-s<seed>/; a
# cell whose metrics.json exists is skipped, so an interrupted grid resumes. Settings
# shared by every cell come from the environment:
#   ENGINE  central | simulation (default central)
#   DATA    the data overrides (default "data=easyvqa data.stream=ability")
#   MODEL   the base preset (default tiny)
#   LORA    LoRA targets, e.g. "[q_proj,k_proj,v_proj,o_proj]" (default: the config's)
#   EXTRA   more overrides for every cell (split on spaces)
# Summarise with: python studies/scenes/summarize.py OUT_DIR [--stage K]
set -uo pipefail
out=${1:?output folder}; jobs=${2:?parallel jobs}; shift 2
read -r -a data <<< "${DATA:-data=easyvqa data.stream=ability}"
common=(engine="${ENGINE:-central}" "${data[@]}" model="${MODEL:-tiny}" progress=false)
[ -n "${LORA:-}" ] && common+=("lora.target_modules=$LORA")
variant_args() {
  case $1 in
    vanilla_ours) echo "method=vanilla regularizer.descriptor=ours regularizer.query_tokens=prompt" ;;
    asr_hinge) echo "method=asr regularizer.spec_loss=hinge" ;;
    asr_moment) echo "method=asr regularizer.spec_loss=moment" ;;
    asr_ours) echo "method=asr regularizer.descriptor=ours regularizer.query_tokens=prompt regularizer.sym_kl=sum regularizer.geometry=token regularizer.gamma=0.05 regularizer.geo_temperature=0.1" ;;
    spectral_distill_w3) echo "method=spectral_distill method.options.weight=3.0" ;;
    *) echo "method=$1" ;;  # any registered method; fed-asr refuses an unknown name
  esac
}
for cell in "$@"; do
  name=${cell%%:*}; seed=${cell##*:}; dir="$out/$name-s$seed"
  [ -f "$dir/metrics.json" ] && continue
  args=$(variant_args "$name")
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 2; done
  mkdir -p "$dir"
  echo "$(date +%T) start $cell"
  # shellcheck disable=SC2086
  (OMP_NUM_THREADS=1 fed-asr "${common[@]}" $args ${EXTRA:-} seed="$seed" \
     output_dir="$dir" > "$dir/run.log" 2>&1 && echo "$(date +%T) done $cell" \
     || echo "$(date +%T) FAILED $cell (see $dir/run.log)") &
done
wait
