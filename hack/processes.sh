# shellcheck shell=bash
# Sourced by controlplane.sh and kueue.sh: the long-running processes each of them keeps
# in its run dir (RUN_DIR/NAME.pid and RUN_DIR/NAME.log), started, found and stopped the
# same way, and the watchdog that stops them when the process that wanted them exits.
# The caller defines RUN_DIR and die.

# start_proc NAME COMMAND...: runs COMMAND in the background, its output in NAME.log.
# 7>&- 8>&- 9>&-: the callers' lock fds are not leaked into long-running children.
start_proc() {
  local name="$1"; shift
  "$@" > "${RUN_DIR}/${name}.log" 2>&1 < /dev/null 7>&- 8>&- 9>&- &
  echo $! > "${RUN_DIR}/${name}.pid"
}

# pid_of NAME: prints the pid if the process is alive and belongs to RUN_DIR (its
# command line names the run dir).
pid_of() {
  local f="${RUN_DIR}/$1.pid" pid
  [[ -f "${f}" ]] || return 1
  pid="$(cat "${f}")"
  [[ "${pid}" =~ ^[0-9]+$ && -r "/proc/${pid}/cmdline" ]] || return 1
  tr '\0' ' ' < "/proc/${pid}/cmdline" | grep -qF -- "${RUN_DIR}/" || return 1
  echo "${pid}"
}

# alive NAME: liveness of a process this run just started. Unlike pid_of, no cmdline
# check: right after the fork, before exec, the child still shows this script's.
alive() {
  local pid
  pid="$(cat "${RUN_DIR}/$1.pid" 2>/dev/null)" || return 1
  [[ "${pid}" =~ ^[0-9]+$ ]] && kill -0 "${pid}" 2>/dev/null \
    && [[ "$(awk '{print $3}' "/proc/${pid}/stat" 2>/dev/null)" != "Z" ]]
}

# stop_procs NAME...: SIGTERM to each that runs (in the order given), then up to 10 s
# for each to go before SIGKILL. A zombie child of ours counts as gone.
stop_procs() {
  local name pid pids=() i
  for name in "$@"; do
    if pid="$(pid_of "${name}")"; then
      kill -TERM "${pid}" 2>/dev/null || true
      pids+=("${pid}")
    fi
  done
  for pid in "${pids[@]}"; do
    for (( i = 0; i < 100; i++ )); do
      [[ -d "/proc/${pid}" && "$(awk '{print $3}' "/proc/${pid}/stat" 2>/dev/null)" != "Z" ]] || break
      sleep 0.1
    done
    kill -KILL "${pid}" 2>/dev/null || true
  done
}

# tail_log NAME: the last lines of NAME.log, to stderr.
tail_log() {
  if [[ -f "${RUN_DIR}/$1.log" ]]; then
    echo "---- last lines of ${RUN_DIR}/$1.log ----" >&2
    tail -n 30 "${RUN_DIR}/$1.log" >&2
    echo "----" >&2
  fi
}

# free_ports N: N distinct free loopback TCP ports, one per line.
free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
for s in socks:
    print(s.getsockname()[1])
PY
}

# start_watchdog PID SCRIPT...: runs `SCRIPT... _watchdog PID` in the background; the
# script's _watchdog waits for process PID to exit and then takes the run down.
start_watchdog() {
  local watch="$1"; shift
  [[ "${watch}" =~ ^[0-9]+$ ]] || die "the process to watch must be given by its pid, got '${watch}'"
  nohup "$@" _watchdog "${watch}" > /dev/null 2>&1 < /dev/null 7>&- 8>&- 9>&- &
  echo $! > "${RUN_DIR}/watchdog.pid"
}

# stop_watchdog SCRIPT_NAME: stops the run's watchdog (its command line names
# SCRIPT_NAME), unless this process is that watchdog.
stop_watchdog() {
  local pid
  pid="$(cat "${RUN_DIR}/watchdog.pid" 2>/dev/null)" || return 0
  [[ "${pid}" =~ ^[0-9]+$ && "${pid}" != "${WATCHDOG_SELF:-}" ]] || return 0
  if tr '\0' ' ' < "/proc/${pid}/cmdline" 2>/dev/null | grep -qF -- "$1"; then
    kill -TERM "${pid}" 2>/dev/null || true
  fi
}

# wait_for_exit PID: returns when process PID has exited (the watchdogs' loop).
wait_for_exit() {
  while kill -0 "$1" 2>/dev/null; do sleep 2; done
}
