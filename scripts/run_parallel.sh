#!/usr/bin/env bash
# Launch run_parallel.py under msrun on this machine: ULYSSES x PP workers, one per device.
#
#   CAPTION_URL=10.0.0.5:5000 VAE_URL=10.0.0.5:5001 MODEL_DIR=ckpts/stepvideo-t2v \
#   ULYSSES=2 PP=2 ASCEND_RT_VISIBLE_DEVICES=0,1,2,3 \
#   bash scripts/run_parallel.sh --prompt "一名宇航员在月球上发现一块石碑" --infer_steps 50
#
# On CPU (development, fp32): DEVICE=cpu. Every argument is passed on to run_parallel.py
# (--prompt, --layer_split 20,28, --local_models, --output_type latent, ...).
#
# Variables (defaults):
#   MODEL_DIR (./ckpts)   CAPTION_URL (127.0.0.1:5000)   VAE_URL (127.0.0.1:5001)
#   ULYSSES (2)   PP (2)   DEVICE (auto: Ascend if present, else CPU)
#   ASCEND_RT_VISIBLE_DEVICES   the Ascend devices to use (ULYSSES x PP of them)
#   MASTER_PORT   the msrun scheduler port (default: a free one); it must be free
#   LOG_DIR       (logs/run_parallel-<date>): scheduler.log and worker_<rank>.log
#   CLUSTER_TIME_OUT (300)  seconds for all workers to join the job
#   MS_NODE_TIMEOUT (20)    seconds after which a dead worker ends the job
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL_DIR="${MODEL_DIR:-./ckpts}"
CAPTION_URL="${CAPTION_URL:-127.0.0.1:5000}"
VAE_URL="${VAE_URL:-127.0.0.1:5001}"
ULYSSES="${ULYSSES:-2}"
PP="${PP:-2}"
DEVICE="${DEVICE:-auto}"
LOG_DIR="${LOG_DIR:-logs/run_parallel-$(date +%Y%m%d-%H%M%S)}"
CLUSTER_TIME_OUT="${CLUSTER_TIME_OUT:-300}"
export MS_NODE_TIMEOUT="${MS_NODE_TIMEOUT:-20}"

die() { echo "run_parallel.sh: error: $*" >&2; exit 2; }

[[ "$ULYSSES" =~ ^[1-9][0-9]*$ && "$PP" =~ ^[1-9][0-9]*$ ]] || die "ULYSSES and PP must be positive integers (got '$ULYSSES', '$PP')"
WORKERS=$((ULYSSES * PP))

source scripts/env.sh
stepvideo_venv requirements.txt

if [[ -n "${ASCEND_RT_VISIBLE_DEVICES:-}" ]]; then
  IFS=, read -r -a devices <<< "$ASCEND_RT_VISIBLE_DEVICES"
  (( ${#devices[@]} >= WORKERS )) || die "ASCEND_RT_VISIBLE_DEVICES=$ASCEND_RT_VISIBLE_DEVICES lists ${#devices[@]} device(s) but ULYSSES x PP = $WORKERS workers need one each"
fi

# A port in use makes msrun wait until CLUSTER_TIME_OUT; check it (or pick a free one) first.
# (A probe, not a server: binding every interface finds a port taken on any of them.)
if [[ -n "${MASTER_PORT:-}" ]]; then
  python - "$MASTER_PORT" <<'EOF' || die "MASTER_PORT=$MASTER_PORT is already in use on this machine; free it, choose another, or unset MASTER_PORT to pick a free port"
import socket, sys
with socket.socket() as s:
    s.bind(("0.0.0.0", int(sys.argv[1])))
EOF
else
  MASTER_PORT="$(python -c 'import socket; s = socket.socket(); s.bind(("0.0.0.0", 0)); print(s.getsockname()[1])')"
fi

mkdir -p "$LOG_DIR"
echo "== msrun: $WORKERS workers (ulysses $ULYSSES x pp $PP), port $MASTER_PORT, logs in $LOG_DIR"
rc=0
# msrun's own messages (which worker pid ended how) also go to $LOG_DIR/msrun.log.
msrun --worker_num="$WORKERS" --local_worker_num="$WORKERS" --master_port="$MASTER_PORT" --join=True \
  --cluster_time_out="$CLUSTER_TIME_OUT" --log_dir="$LOG_DIR" \
  run_parallel.py --model_dir "$MODEL_DIR" --caption_url "$CAPTION_URL" --vae_url "$VAE_URL" \
  --ulysses_degree "$ULYSSES" --pp_degree "$PP" --device "$DEVICE" "$@" 2>&1 | tee "$LOG_DIR/msrun.log" \
  || rc=${PIPESTATUS[0]}

if (( rc != 0 )); then
  echo "run_parallel.sh: the job failed (exit $rc). Logs: $LOG_DIR/worker_<rank>.log and $LOG_DIR/scheduler.log" >&2
  # A worker killed by a signal wrote no error of its own: name it from msrun's report of its pid.
  grep -o 'Worker process [0-9]* exit with exception. Error code: -\?[0-9]*' "$LOG_DIR/msrun.log" 2>/dev/null |
    while read -r _ _ pid _ _ _ _ _ code; do
      rank="$(grep -l "process id $pid\$" "$LOG_DIR"/worker_*.log 2>/dev/null | head -n 1 | sed 's/.*worker_\([0-9]*\)\.log/\1/')"
      how="exit code $code"
      (( code < 0 )) && how="signal $((-code)) ($(kill -l $((-code)) 2>/dev/null || echo unknown))"
      echo "run_parallel.sh: rank ${rank:-?} (pid $pid) ended by $how" >&2
    done
  first="$(grep -l '] error' "$LOG_DIR"/worker_*.log 2>/dev/null | head -n 1 || true)"
  [[ -n "$first" ]] && echo "run_parallel.sh: see the error in $first" >&2
  exit "$rc"
fi
echo "== done; logs in $LOG_DIR"
