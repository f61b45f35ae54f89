# shellcheck shell=bash
# Where a long run's time went. `stage NAME CMD...` runs CMD and records when
# it began and ended in $SWITCHBOARD_STAGES. The first script to source this
# creates that file (and owns it); scripts it runs add their stages to the same
# file. The owner calls `stages_summary` from its EXIT trap, so the last lines of
# a log, even a failed or timed-out one, give every stage's seconds and the one
# that was running. NAME has no spaces.

if [[ -z "${SWITCHBOARD_STAGES:-}" ]]; then
  SWITCHBOARD_STAGES=$(mktemp "${TMPDIR:-/tmp}/switchboard-stages.XXXXXX")
  export SWITCHBOARD_STAGES
  _stages_owner=$(date +%s)
fi

# Returns CMD's status (also inside $(...), where errexit does not reach); a
# stage that failed has no END line, so the table shows it as unfinished. A
# shell function run as CMD runs without errexit (bash suspends it under `||`):
# it must return its own failures.
stage() {
  local name=$1 rc=0
  shift
  echo "== stage $name" >&2
  printf 'BEGIN %s %s\n' "$(date +%s)" "$name" >>"$SWITCHBOARD_STAGES"
  "$@" || rc=$?
  if ((rc == 0)); then
    printf 'END %s %s\n' "$(date +%s)" "$name" >>"$SWITCHBOARD_STAGES"
  fi
  return $rc
}

# Prints the table if this script owns the file; keeps the exit status.
stages_summary() {
  local rc=$?
  if [[ -n "${_stages_owner:-}" && -f "$SWITCHBOARD_STAGES" ]]; then
    echo "== stages (seconds; exit $rc):" >&2
    awk -v now="$(date +%s)" -v t0="$_stages_owner" '
      $1 == "BEGIN" { begun[$3] = $2; order[++n] = $3 }
      $1 == "END" { ended[$3] = $2 }
      END {
        for (i = 1; i <= n; i++) {
          k = order[i]
          if (k in ended) printf "  %6d  %s\n", ended[k] - begun[k], k
          else printf "  %6d  %s (did not finish)\n", now - begun[k], k
        }
        printf "  %6d  total\n", now - t0
      }' "$SWITCHBOARD_STAGES" >&2
    rm -f "$SWITCHBOARD_STAGES"
  fi
  return $rc
}

# limit DURATION CMD...: CMD under a time limit (timeout(1) syntax: 15m), killed
# 30 s after its TERM if it lingers. Stages use it with a limit far above their
# usual time, so a hung stage fails the run, named in the table, instead of
# running into CI's own limit. timeout(1) signals CMD's whole process group. A
# shell function runs in a child bash given the function's definition.
limit() {
  local duration=$1
  shift
  if [[ $(type -t "$1") == function ]]; then
    timeout --kill-after=30 "$duration" bash -c "$(declare -f "$1")"'; "$@"' limit "$@"
  else
    timeout --kill-after=30 "$duration" "$@"
  fi
}
