#!/usr/bin/env bash
# The acceptance run for the first machine with Ascend NPUs; writes one Markdown report to attach to an issue.
#
#     bash scripts/ascend_check.sh                 # kernels, golden bf16, HCCL parity, compiled vs eager
#     MODEL_DIR=ckpts/stepvideo-t2v bash scripts/ascend_check.sh   # + timed step at 544x992x204, services
#
# What it runs (each step's command, exit status and last lines go into the report):
#   1. FlashAttentionScore, RmsNorm and GELU on the NPU against float64 references and their documented
#      errors (tests/unit/test_ascend_standins.py: on an NPU it checks the real ops beside the stand-ins);
#   2. the golden DiT, Step-LLM and VAE-attention tests in bf16 with the bounds of docs/ascend.md
#      (tests/golden/test_ascend_mode.py -k bf16: real bf16 on the NPU), among them FlashAttentionScore
#      with the VAE's head dim 512 and causal sparse_mode 2 at full size (42,160 positions, 544 x 992)
#      and the fused RmsNorm against the original's rounding order;
#   3. msrun on HCCL with the tiny checkpoint: Ulysses 2, and Ulysses 2 x pipeline 2, Ulysses 4,
#      pipeline 4 on 4 NPUs, against the single-NPU run (bound 0.012, the DiT bf16 bound);
#   4. the compiled DiT (default) against --eager on one NPU (same bound), and --offload blocks (the
#      copy stream of backend.weight_copy_stream) against the resident DiT;
#   5. with MODEL_DIR: one timed denoising step (2 steps run) at 544 x 992 x 204 for the three 4-NPU
#      layouts, projected to 50 steps, and the caption / VAE services' /health.
# Settings: MODEL_DIR (published checkpoint, optional), CAPTION_DEVICES (default 4), VAE_DEVICES (5),
# REPORT (default results/ascend_check-<time>.md).
# Without an NPU it prints one line and exits 0, running nothing.
set -u
cd "$(dirname "$0")/.."
PYTHON="${PYTHON_BIN:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"

if ! command -v npu-smi >/dev/null 2>&1 || ! "$PYTHON" -c "import mindspore as ms, sys
sys.exit(0 if ms.hal.is_available('Ascend') and ms.hal.device_count('Ascend') > 0 else 1)" >/dev/null 2>&1; then
  echo "ascend_check: no Ascend NPU on this machine (npu-smi or MindSpore's Ascend device not found); nothing was run."
  exit 0
fi

export PYTHONPATH="$PWD" GLOG_v=3 STEPVIDEO_DEVICE=ascend
STAMP=$(date -u +%Y%m%d-%H%M%S)
WORK="results/ascend_check-$STAMP"
REPORT="${REPORT:-$WORK.md}"
mkdir -p "$WORK"
MSRUN="$(dirname "$PYTHON")/msrun"
command -v "$MSRUN" >/dev/null 2>&1 || MSRUN=msrun
failures=0

{
  echo "# Ascend acceptance run, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- MindSpore: $("$PYTHON" -c 'import mindspore; print(mindspore.__version__)' 2>&1)"
  echo "- NPUs: $(npu-smi info -l 2>/dev/null | grep -c 'NPU ID' || echo '?')"
  echo "- SoC (backend.check_ascend_soc): $("$PYTHON" -c 'from stepvideo import backend
print(backend.init("ascend").device, end=" ")
import mindspore as ms
print(ms.hal.get_device_name(0, "Ascend"))' 2>&1 | tail -n 1)"
  echo
  echo '```'
  npu-smi info 2>&1 | head -n 20
  echo '```'
} > "$REPORT"

step() {  # title, command... : run, record status and the last lines of the output
  local title=$1; shift
  local log="$WORK/$(echo "$title" | tr -c 'A-Za-z0-9' '_').log"
  local started=$SECONDS
  "$@" > "$log" 2>&1
  local status=$?
  [ "$status" -ne 0 ] && failures=$((failures + 1))
  {
    echo
    echo "## $title: $([ "$status" -eq 0 ] && echo passed || echo "FAILED (exit $status)") in $((SECONDS - started)) s"
    echo
    echo "\`$*\`"
    echo
    echo '```'
    tail -n 40 "$log"
    echo '```'
  } >> "$REPORT"
  echo "ascend_check: $title: exit $status (log $log)"
  return 0
}

# ----------------------------------------------------------------------------- 1, 2: kernels, golden bf16
step "1. FlashAttentionScore, RmsNorm, GELU against float64 and their documented errors" \
  "$PYTHON" -m pytest tests/unit/test_ascend_standins.py -q -s
step "2. golden tests in bf16 with the bounds of docs/ascend.md" \
  "$PYTHON" -m pytest tests/golden/test_ascend_mode.py -k bf16 -q -s

# ----------------------------------------------------------------------------- 3, 4: HCCL parity, compiled vs eager
TINY="$WORK/tiny"
"$PYTHON" scripts/make_tiny_checkpoint.py "$TINY" --layers 4 > "$WORK/tiny.log" 2>&1
CLIP="$TINY/hunyuan_clip/clip_text_encoder"
"$PYTHON" convert.py --pt_filename "$CLIP/pytorch_model.bin" --sf_filename "$CLIP/model.safetensors" \
  --config_path "$CLIP/config.json" >> "$WORK/tiny.log" 2>&1
tiny_args() {  # latents_out
  echo --model_dir "$TINY" --local_models --prompt "A cat walks on the grass." --infer_steps 2 --num_frames 1 \
    --height 80 --width 112 --seed 42 --output_type latent --device ascend --latents_out "$1"
}
compare() {  # name, reference latents, port latents
  "$PYTHON" - "$@" <<'EOF'
import sys
import numpy as np
from stepvideo.utils import safetensors_io as st
name, ref, port = sys.argv[1], st.load_file(sys.argv[2])["latents"], st.load_file(sys.argv[3])["latents"]
err = float(np.abs(port.astype(np.float64) - ref).max() / max(1.0, float(np.abs(ref).max())))
print(f"{name}: max|port - single| / max(1, max|single|) = {err:.3e} (bound 0.012)")
sys.exit(0 if err <= 0.012 else 1)
EOF
}
layout() {  # name workers ulysses pp
  local name=$1 workers=$2 u=$3 pp=$4
  "$MSRUN" --worker_num="$workers" --local_worker_num="$workers" --join=True --log_dir="$WORK/logs-$name" \
    run_parallel.py $(tiny_args "$WORK/$name.safetensors") --ulysses_degree "$u" --pp_degree "$pp" \
    && compare "$name" "$WORK/single.safetensors" "$WORK/$name.safetensors"
}
step "3a. single NPU, compiled (reference)" "$PYTHON" run_parallel.py $(tiny_args "$WORK/single.safetensors") \
  --ulysses_degree 1
step "3b. HCCL Ulysses 2" layout u2 2 2 1
step "3c. HCCL Ulysses 2 x pipeline 2" layout u2pp2 4 2 2
step "3d. HCCL Ulysses 4" layout u4 4 4 1
step "3e. HCCL pipeline 4" layout pp4 4 1 4
eager() {
  "$PYTHON" run_parallel.py $(tiny_args "$WORK/eager.safetensors") --ulysses_degree 1 --eager \
    && compare "eager vs compiled" "$WORK/single.safetensors" "$WORK/eager.safetensors"
}
step "4. compiled DiT against --eager" eager
offload() {
  "$PYTHON" run_parallel.py $(tiny_args "$WORK/offload.safetensors") --ulysses_degree 1 --offload blocks \
    && compare "--offload blocks vs resident" "$WORK/single.safetensors" "$WORK/offload.safetensors"
}
step "4b. --offload blocks (block weights copied on their own stream) against the resident DiT" offload

# ----------------------------------------------------------------------------- 5: timing and services
if [ -n "${MODEL_DIR:-}" ]; then
  SERVICES="$WORK/services"
  services() {
    MODEL_DIR="$MODEL_DIR" DEVICE=ascend CAPTION_DEVICES="${CAPTION_DEVICES:-4}" VAE_DEVICES="${VAE_DEVICES:-5}" \
      CAPTION_PORT=0 VAE_PORT=0 LOG_DIR="$SERVICES" bash scripts/start_servers.sh > "$SERVICES.env" || return 1
    . "$SERVICES.env"
    echo "caption: $(curl -s "http://$caption_url/health")"
    echo "vae:     $(curl -s "http://$vae_url/health")"
  }
  mkdir -p "$SERVICES"
  step "5a. services' health" services
  timed() {  # name ulysses pp
    local name=$1 u=$2 pp=$3
    ASCEND_RT_VISIBLE_DEVICES=0,1,2,3 "$MSRUN" --worker_num=4 --local_worker_num=4 --join=True \
      --log_dir="$WORK/logs-time-$name" run_parallel.py --model_dir "$MODEL_DIR" \
      --caption_url "$caption_url" --vae_url "$vae_url" --prompt "An astronaut finds a stone tablet on the moon." \
      --infer_steps 2 --num_frames 204 --height 544 --width 992 --output_type latent \
      --latents_out "$WORK/time-$name.safetensors" --ulysses_degree "$u" --pp_degree "$pp" \
      --stats_dir "$WORK/stats-$name" || return 1
    "$PYTHON" - "$WORK/stats-$name" "$name" <<'EOF'
import json, sys
from pathlib import Path
ranks = [json.loads(p.read_text()) for p in sorted(Path(sys.argv[1]).glob("rank*.json"))]
step = max(r["seconds_per_step"] for r in ranks)
print(f"{sys.argv[2]}: {step:.1f} s per denoising step (mean of 2 steps, the first includes graph compilation)")
print(f"projection to 50 steps = 50 x {step:.1f} s = {50 * step / 60:.1f} min "
      "(assumes every step costs the measured mean; text encoding and VAE decoding not included)")
for r in ranks:
    print(f"rank {r['rank']}: idle {r['timing']['idle_fraction']:.2f}, sp comm {r['timing']['sp_comm_s']:.1f} s")
EOF
  }
  if [ -f "$SERVICES.env" ]; then
    . "$SERVICES.env"
    step "5b. timed step 544x992x204, Ulysses 4" timed u4 4 1
    step "5c. timed step 544x992x204, Ulysses 2 x pipeline 2" timed u2pp2 2 2
    step "5d. timed step 544x992x204, pipeline 4" timed pp4 1 4
  fi
  [ -f "$SERVICES/services.pids" ] && xargs -r kill < "$SERVICES/services.pids" 2>/dev/null
else
  echo -e "\n## 5. timing and services: not run (set MODEL_DIR to the published checkpoint)" >> "$REPORT"
fi

echo -e "\n**$failures step(s) failed.**" >> "$REPORT"
echo "ascend_check: report written to $REPORT ($failures step(s) failed)"
[ "$failures" -eq 0 ]
