#!/usr/bin/env bash
# Stop the services that scripts/start_servers.sh started, and nothing else:
#     bash scripts/stop_servers.sh logs/services/services.pids
# Each PID in the file is signalled only while it is still a caption/VAE service process
# (its command line runs api/call_remote_server.py; a PID reused by another program is left
# alone). SIGTERM first: a service stops accepting, drops its queue and lets a running job
# finish within its --shutdown_grace (default 30 s). Whatever still runs after STOP_WAIT
# seconds (default 40) gets SIGKILL. The PID file is removed at the end.
set -uo pipefail
pids_file="${1:?usage: stop_servers.sh PIDS_FILE}"
STOP_WAIT="${STOP_WAIT:-40}"
[ -f "$pids_file" ] || exit 0

is_service() {  # pid -> true while it is one of our service processes
  local cmdline
  cmdline=$(tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null) || return 1
  [[ "$cmdline" == *api/call_remote_server.py* ]]
}

ours=()
while read -r pid; do
  [[ "$pid" =~ ^[0-9]+$ ]] && is_service "$pid" && ours+=("$pid")
done < "$pids_file"

for pid in "${ours[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
waited=0
while :; do
  alive=()
  for pid in "${ours[@]}"; do is_service "$pid" && alive+=("$pid"); done
  [ "${#alive[@]}" -eq 0 ] && break
  if [ "$waited" -ge "$((STOP_WAIT * 10))" ]; then
    echo "stop_servers.sh: service(s) ${alive[*]} still running after ${STOP_WAIT}s; sending SIGKILL" >&2
    for pid in "${alive[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    break
  fi
  sleep 0.1; waited=$((waited + 1))
done
rm -f "$pids_file"
