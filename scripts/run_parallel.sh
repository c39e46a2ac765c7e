#!/usr/bin/env bash
# Launch run_parallel.py under msrun: PP x CFG x TP x ULYSSES workers, one per device, on one
# machine or on NODES machines (run this once per machine, with its NODE_RANK).
#
#   CAPTION_URL=10.0.0.5:5000 VAE_URL=10.0.0.5:5001 MODEL_DIR=ckpts/stepvideo-t2v \
#   ULYSSES=2 PP=2 ASCEND_RT_VISIBLE_DEVICES=0,1,2,3 \
#   bash scripts/run_parallel.sh --prompt "一名宇航员在月球上发现一块石碑" --infer_steps 50
#
# Two 8-NPU machines (16 workers, 8 per node; the scheduler runs on node 0 at MASTER_ADDR):
#   node 0: NODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=8118 CFG=2 TP=2 ULYSSES=4 PP=1 bash scripts/run_parallel.sh ...
#   node 1: NODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 MASTER_PORT=8118 CFG=2 TP=2 ULYSSES=4 PP=1 bash scripts/run_parallel.sh ...
#
# On CPU (development, fp32): DEVICE=cpu. Every argument is passed on to run_parallel.py
# (--prompt, --layer_split 20,28, --local_models, --output_type latent, ...).
#
# Variables (defaults):
#   MODEL_DIR (./ckpts)   CAPTION_URL (127.0.0.1:5000)   VAE_URL (127.0.0.1:5001)
#   ULYSSES (2)   PP (2)   TP (1, tensor parallel)   CFG (1, or 2: CFG parallel)
#   DEVICE (auto: Ascend if present, else CPU)
#   NODES (1)   machines in the job; NODE_RANK (0) this machine's index (node 0 runs the scheduler)
#   MASTER_ADDR (127.0.0.1) node 0's address, the same on every node
#   LOCAL_WORKERS (PP x CFG x TP x ULYSSES / NODES) workers on this machine; ranks
#                 NODE_RANK x LOCAL_WORKERS ... run here, so a node holds consecutive ranks (whole
#                 Ulysses and tensor groups when LOCAL_WORKERS is a multiple of TP x ULYSSES)
#   ASCEND_RT_VISIBLE_DEVICES   the Ascend devices to use on this machine (LOCAL_WORKERS of them)
#   MASTER_PORT   the msrun scheduler port (one machine: default a free one, checked to be free;
#                 several machines: required, the same on every node)
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
TP="${TP:-1}"
CFG="${CFG:-1}"
NODES="${NODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
DEVICE="${DEVICE:-auto}"
LOG_DIR="${LOG_DIR:-logs/run_parallel-$(date +%Y%m%d-%H%M%S)}"
CLUSTER_TIME_OUT="${CLUSTER_TIME_OUT:-300}"
export MS_NODE_TIMEOUT="${MS_NODE_TIMEOUT:-20}"

die() { echo "run_parallel.sh: error: $*" >&2; exit 2; }

for name in ULYSSES PP TP CFG NODES; do
  [[ "${!name}" =~ ^[1-9][0-9]*$ ]] || die "$name must be a positive integer (got '${!name}')"
done
[[ "$NODE_RANK" =~ ^[0-9]+$ ]] && (( NODE_RANK < NODES )) || die "NODE_RANK must be 0..$((NODES - 1)) (got '$NODE_RANK')"
WORKERS=$((PP * CFG * TP * ULYSSES))
if [[ -n "${LOCAL_WORKERS:-}" ]]; then
  [[ "$LOCAL_WORKERS" =~ ^[1-9][0-9]*$ ]] || die "LOCAL_WORKERS must be a positive integer (got '$LOCAL_WORKERS')"
else
  (( WORKERS % NODES == 0 )) || die "PP x CFG x TP x ULYSSES = $WORKERS workers do not split evenly over NODES=$NODES; set LOCAL_WORKERS"
  LOCAL_WORKERS=$((WORKERS / NODES))
fi
(( LOCAL_WORKERS * NODES == WORKERS )) || die "LOCAL_WORKERS=$LOCAL_WORKERS x NODES=$NODES != PP x CFG x TP x ULYSSES = $WORKERS workers (msrun numbers the ranks of node k from k x LOCAL_WORKERS)"
if (( NODES > 1 )) && [[ -z "${MASTER_PORT:-}" ]]; then
  die "MASTER_PORT is required with NODES=$NODES: every node must use the same scheduler port"
fi

source scripts/env.sh
stepvideo_venv requirements.txt

if [[ -n "${ASCEND_RT_VISIBLE_DEVICES:-}" ]]; then
  IFS=, read -r -a devices <<< "$ASCEND_RT_VISIBLE_DEVICES"
  (( ${#devices[@]} >= LOCAL_WORKERS )) || die "ASCEND_RT_VISIBLE_DEVICES=$ASCEND_RT_VISIBLE_DEVICES lists ${#devices[@]} device(s) but this node's $LOCAL_WORKERS workers need one each"
fi

# A port in use makes msrun wait until CLUSTER_TIME_OUT; check it (or pick a free one) first.
# (A probe, not a server: binding every interface finds a port taken on any of them.)
if (( NODE_RANK > 0 )); then
  :  # the port belongs to node 0's scheduler
elif [[ -n "${MASTER_PORT:-}" ]]; then
  python - "$MASTER_PORT" <<'EOF' || die "MASTER_PORT=$MASTER_PORT is already in use on this machine; free it, choose another, or unset MASTER_PORT to pick a free port"
import socket, sys
with socket.socket() as s:
    s.bind(("0.0.0.0", int(sys.argv[1])))
EOF
else
  MASTER_PORT="$(python -c 'import socket; s = socket.socket(); s.bind(("0.0.0.0", 0)); print(s.getsockname()[1])')"
fi

mkdir -p "$LOG_DIR"
echo "== msrun: $WORKERS workers (pp $PP x cfg $CFG x tensor $TP x ulysses $ULYSSES), node $NODE_RANK of $NODES" \
  "with $LOCAL_WORKERS of them, scheduler $MASTER_ADDR:$MASTER_PORT, logs in $LOG_DIR"
rc=0
# msrun's own messages (which worker pid ended how) also go to $LOG_DIR/msrun.log.
msrun --worker_num="$WORKERS" --local_worker_num="$LOCAL_WORKERS" --node_rank="$NODE_RANK" \
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" --join=True \
  --cluster_time_out="$CLUSTER_TIME_OUT" --log_dir="$LOG_DIR" \
  run_parallel.py --model_dir "$MODEL_DIR" --caption_url "$CAPTION_URL" --vae_url "$VAE_URL" \
  --ulysses_degree "$ULYSSES" --pp_degree "$PP" --tensor_parallel_degree "$TP" --cfg_parallel_degree "$CFG" \
  --device "$DEVICE" "$@" 2>&1 | tee "$LOG_DIR/msrun.log" || rc=${PIPESTATUS[0]}

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
