#!/usr/bin/env bash
# The whole system end to end on a small embedded checkpoint, on CPU:
#   1. install the pinned packages into .venv (first run only)
#   2. build the tiny random-weight checkpoint in the real folder layout (checkpoints/tiny)
#   3. convert its CLIP pytorch_model.bin with convert.py (as for the real weights)
#   4. start the caption and VAE services on loopback and wait until they are ready
#   5. run run_parallel.py under msrun with 4 workers (Ulysses 2 x pipeline 2)
#   6. check the mp4 by reading it back, and say where it is
# The services are stopped on exit, on error and on Ctrl-C.
#
# Usage: bash scripts/demo.sh [--image PATH] ["prompt"]   (env: MODEL_DIR, SAVE_PATH, STEPS, FRAMES, HEIGHT, WIDTH)
#   --image PATH: image-to-video (Step-Video-TI2V) from that first frame, on the tiny TI2V checkpoint
#                 (checkpoints/tiny-ti2v, built with make_tiny_checkpoint.py --ti2v)
set -euo pipefail
IMAGE=""
if [ "${1:-}" = "--image" ]; then
  [ -f "${2:-}" ] || { echo "error: --image needs an image file, got '${2:-}'" >&2; exit 2; }
  IMAGE=$(realpath "$2")  # before the cd below
  shift 2
fi
cd "$(dirname "$0")/.."
PROMPT="${1:-A cat walks on the grass, realistic style.}"
if [ -n "$IMAGE" ]; then
  MODEL_DIR="${MODEL_DIR:-checkpoints/tiny-ti2v}"
  TINY_FLAGS=(--ti2v)
  IMAGE_FLAGS=(--first_image "$IMAGE")
else
  MODEL_DIR="${MODEL_DIR:-checkpoints/tiny}"
  TINY_FLAGS=()
  IMAGE_FLAGS=()
fi
SAVE_PATH="${SAVE_PATH:-results}"
LOG_DIR="${LOG_DIR:-logs/demo}"
STEPS="${STEPS:-4}"
FRAMES="${FRAMES:-34}"
HEIGHT="${HEIGHT:-128}"
WIDTH="${WIDTH:-224}"

started=$(date +%s)
phase_start=$started
phase() {  # print the time the previous phase took, then announce the next one
  local now; now=$(date +%s)
  [ -n "${phase_name:-}" ] && echo "   ... ${phase_name} took $((now - phase_start))s"
  phase_name=$1; phase_start=$now
  echo "== $1"
}

phase "installing packages (first run only)"
source scripts/env.sh
stepvideo_venv requirements.txt

phase "building the tiny checkpoint in $MODEL_DIR"
if [ -f "$MODEL_DIR/model_index.json" ]; then
  echo "   already there"
else
  python scripts/make_tiny_checkpoint.py "$MODEL_DIR" "${TINY_FLAGS[@]}"
fi

phase "converting the CLIP weights (convert.py, no torch, no pickle execution)"
clip="$MODEL_DIR/hunyuan_clip/clip_text_encoder"
python convert.py --pt_filename "$clip/pytorch_model.bin" --sf_filename "$clip/model.safetensors" \
  --config_path "$clip/config.json"

phase "starting the caption and VAE services on 127.0.0.1"
mkdir -p "$LOG_DIR"
stop_services() { bash scripts/stop_servers.sh "$LOG_DIR/services/services.pids"; }
trap stop_services EXIT
trap 'stop_services; exit 130' INT TERM
urls=$(MODEL_DIR="$MODEL_DIR" CAPTION_PORT=0 VAE_PORT=0 DEVICE=cpu LOG_DIR="$LOG_DIR/services" \
  bash scripts/start_servers.sh)
eval "$urls"
echo "   caption_url=$caption_url"
echo "   vae_url=$vae_url"

phase "running the DiT under msrun: 4 workers, Ulysses 2 x pipeline 2 (logs in $LOG_DIR/msrun)"
MODEL_DIR="$MODEL_DIR" CAPTION_URL="$caption_url" VAE_URL="$vae_url" ULYSSES=2 PP=2 DEVICE=cpu \
  LOG_DIR="$LOG_DIR/msrun" bash scripts/run_parallel.sh \
  --prompt "$PROMPT" --infer_steps "$STEPS" --num_frames "$FRAMES" --height "$HEIGHT" --width "$WIDTH" \
  --save_path "$SAVE_PATH" --seed 42 "${IMAGE_FLAGS[@]}"

phase "checking the video"
video=$(ls -1t "$SAVE_PATH"/*.mp4 | head -n 1)
python - "$video" <<'EOF'
import sys
from stepvideo.utils.video_process import read_mp4
frames, fps = read_mp4(sys.argv[1])
print(f"   {sys.argv[1]}: {frames.shape[0]} frames of {frames.shape[2]}x{frames.shape[1]} at {fps:g} fps")
EOF
phase "done"
echo "The video is at $video (total $(( $(date +%s) - started ))s)"
