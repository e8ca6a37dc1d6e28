#!/usr/bin/env bash
# Central comparison on the embedded `scenes` stream (docs/findings.md): studies/run_cells.sh
# with the scenes defaults (LoRA on q/k/v/o, MODEL default scenes_cpu; MODEL=scenes_vision
# prepares the vision tower first; EXTRA adds overrides to every cell).
# Usage: bash studies/scenes/run_central.sh OUT_DIR JOBS "variant:seed" ...
#   e.g. bash studies/scenes/run_central.sh out 2 vanilla:0 asr:0 asr_hinge:0
ENGINE=central DATA="data=scenes" MODEL="${MODEL:-scenes_cpu}" \
  LORA="${LORA:-[q_proj,k_proj,v_proj,o_proj]}" \
  exec bash "$(dirname "$0")/../run_cells.sh" "$@"
