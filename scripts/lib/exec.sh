# shellcheck shell=bash
# Sourced by scripts/hdfs and scripts/kafka.
#
# wait_exec PID PATTERN: wait until the child PID, just started with `cmd &`, has become the
# program it was started as (its /proc/PID/cmdline contains PATTERN), or has ended. Between
# the fork and the exec the child is still a copy of this shell, with this shell's command
# line: a check of "is that pid our daemon?" made in that window says no, and a start on a
# busy machine would report a daemon that merely had not been exec'd yet as dead. Returns 0
# once exec'd, 1 if the child ended first; gives up (1) after 30 s.
wait_exec() {
  local pid=$1 pattern=$2 i cmd
  for ((i = 0; i < 3000; i++)); do
    [[ -r "/proc/$pid/cmdline" ]] || return 1
    cmd=$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline") || return 1
    [[ "$cmd" == *"$pattern"* ]] && return 0
    sleep 0.01
  done
  return 1
}
