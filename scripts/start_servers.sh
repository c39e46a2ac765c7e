#!/usr/bin/env bash
# Start the caption service (Step-LLM + CLIP) and the VAE service in the background and wait until
# both are ready. Prints the two URLs as shell-quoted assignments, e.g.
#     eval "$(MODEL_DIR=ckpts/stepvideo-t2v bash scripts/start_servers.sh)"
#     echo $caption_url $vae_url
#
# Settings (environment variables):
#   MODEL_DIR        model folder (required)
#   HOST             address to bind (default 127.0.0.1; set STEPVIDEO_API_TOKEN when exposing it)
#   CAPTION_PORT     default 5000; VAE_PORT default 5001 (0 = pick a free port)
#   DEVICE           auto | cpu | ascend (default auto)
#   CAPTION_DEVICES  ASCEND_RT_VISIBLE_DEVICES for the caption service (Ascend), e.g. 4
#   VAE_DEVICES      ASCEND_RT_VISIBLE_DEVICES for the VAE service (Ascend), e.g. 5
#   LOG_DIR          where the services log (default logs/services); PIDs go to $LOG_DIR/services.pids
#   WAIT_SECONDS     how long to wait for both to load (default 600)
# Stop them with: bash scripts/stop_servers.sh "$LOG_DIR/services.pids" (SIGTERM, then SIGKILL).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MODEL_DIR:?set MODEL_DIR to the model folder}"
HOST="${HOST:-127.0.0.1}"
CAPTION_PORT="${CAPTION_PORT:-5000}"
VAE_PORT="${VAE_PORT:-5001}"
DEVICE="${DEVICE:-auto}"
LOG_DIR="${LOG_DIR:-logs/services}"
WAIT_SECONDS="${WAIT_SECONDS:-600}"
PYTHON="${PYTHON_BIN:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
mkdir -p "$LOG_DIR"
: > "$LOG_DIR/services.pids"

device_env=()
[ "$DEVICE" != "auto" ] && device_env=(STEPVIDEO_DEVICE="$DEVICE")

start() {  # name flag port visible_devices   (flag: --enable_llm or --enable_vae; named alone, it serves only that)
  local name=$1 flag=$2 port=$3 devices=$4
  local envs=("${device_env[@]}")
  [ -n "$devices" ] && envs+=(ASCEND_RT_VISIBLE_DEVICES="$devices")
  env "${envs[@]}" PYTHONPATH="$PWD" "$PYTHON" api/call_remote_server.py --model_dir "$MODEL_DIR" \
    "$flag" True --host "$HOST" --port "$port" > "$LOG_DIR/$name.log" 2>&1 &
  echo "$!" >> "$LOG_DIR/services.pids"
  echo "started the $name service (pid $!, log $LOG_DIR/$name.log)" >&2
}

wait_url() {  # name pid -> prints the URL the service announced
  local name=$1 pid=$2 waited=0 line
  while [ "$waited" -lt "$WAIT_SECONDS" ]; do
    line=$(grep -m1 "^${name}_url: " "$LOG_DIR/$name.log" 2>/dev/null || true)
    if [ -n "$line" ]; then echo "${line#*: }"; return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "error: the $name service exited before it was ready; last lines of $LOG_DIR/$name.log:" >&2
      tail -n 20 "$LOG_DIR/$name.log" >&2
      return 1
    fi
    sleep 1; waited=$((waited + 1))
  done
  echo "error: the $name service was not ready after ${WAIT_SECONDS}s (see $LOG_DIR/$name.log)" >&2
  return 1
}

# If anything below fails, do not leave half-started services behind (TERM, then KILL; only ours).
stop_started() { bash scripts/stop_servers.sh "$LOG_DIR/services.pids"; }
trap stop_started EXIT

start caption --enable_llm "$CAPTION_PORT" "${CAPTION_DEVICES:-}"
caption_pid=$!
start vae --enable_vae "$VAE_PORT" "${VAE_DEVICES:-}"
vae_pid=$!
caption_url=$(wait_url caption "$caption_pid")
vae_url=$(wait_url vae "$vae_pid")
trap - EXIT
# Shell-quoted: callers eval these lines, and a URL is text a process printed.
printf 'caption_url=%q\n' "$caption_url"
printf 'vae_url=%q\n' "$vae_url"
