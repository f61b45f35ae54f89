#!/usr/bin/env bash
# A whole Switchboard fleet on this machine, on loopback, from Debian's packages
# and this repo's binaries:
#
#   redis-server, PostgreSQL, 3 gateway nodes (a fleet on both), HAProxy in front
#   (deploy/haproxy.cfg) and a Prometheus server scraping every node with
#   deploy/prometheus/rules.yml loaded.
#
#   deploy/local-cluster.sh up       start it all (builds the binaries if needed)
#   deploy/local-cluster.sh status   each part's health; exits 1 if any is unwell
#   deploy/local-cluster.sh down     stop exactly what `up` started, remove its files
#
# And for rolling restarts and failure drills (scripts/chaos drives these):
#   deploy/local-cluster.sh node N start|stop|restart|kill|pause|resume
#       stop/restart drain (SIGTERM); kill is kill -9; pause/resume are SIGSTOP/SIGCONT
#   deploy/local-cluster.sh redis restart       (comes back empty: the fleet re-forms)
#   deploy/local-cluster.sh postgres restart
#
# Addresses (override with the environment before `up`):
#   clients (HAProxy)   ws://127.0.0.1:${SB_PORT:-8000}/v1/ws
#   nodes               127.0.0.1:${SB_NODE_PORTS:-8081 8082 8083}
#   HAProxy stats       http://127.0.0.1:${SB_STATS_PORT:-8404}/stats
#   Prometheus          http://127.0.0.1:${SB_PROMETHEUS_PORT:-9090}
#   Redis, PostgreSQL   127.0.0.1:${SB_REDIS_PORT:-6390}, 127.0.0.1:${SB_PG_PORT:-5440}
# State (configs, logs, data, pids): ${SWITCHBOARD_CLUSTER_DIR:-/tmp/switchboard-local-cluster}.
# PROFILE=debug uses debug builds (default: release).
#
# Point loadgen at it (`up` prints this with the admin secret filled in):
#   SWITCHBOARD_ADMIN_SECRET=$(cat /tmp/switchboard-local-cluster/admin-secret) \
#     target/release/loadgen run --target ws://127.0.0.1:8000 \
#     --metrics-url http://127.0.0.1:8081/metrics,http://127.0.0.1:8082/metrics,http://127.0.0.1:8083/metrics \
#     --connections 1000 --rate 500 --duration 30s --reconnect
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
. scripts/lib/fleet.sh
fleet_detach=(setsid)

dir=${SWITCHBOARD_CLUSTER_DIR:-${TMPDIR:-/tmp}/switchboard-local-cluster}
profile=${PROFILE:-release}
bin=$repo/target/$profile
port=${SB_PORT:-8000}
node_list=${SB_NODE_PORTS:-8081 8082 8083}
stats_port=${SB_STATS_PORT:-8404}
prom_port=${SB_PROMETHEUS_PORT:-9090}
redis_port=${SB_REDIS_PORT:-6390}
pg_port=${SB_PG_PORT:-5440}
# A cluster that is up keeps the addresses and binaries it started with.
if [[ "${1:-}" != up && -f "$dir/env" ]]; then
  . "$dir/env"
fi
read -r -a node_ports <<< "$node_list"
# The readiness notice covers HAProxy's checks (inter 1s, fall 2) and one check's time.
drain_notice_ms=2500

say() { echo "local-cluster: $*" >&2; }

# Installs what the cluster runs on, from Debian's packages, when missing.
need_packages() {
  local missing=()
  command -v redis-server >/dev/null || missing+=(redis-server)
  [[ -n "$fleet_pgbin" ]] || missing+=(postgresql)
  command -v haproxy >/dev/null || missing+=(haproxy)
  command -v prometheus >/dev/null || missing+=(prometheus)
  command -v curl >/dev/null || missing+=(curl)
  [[ ${#missing[@]} -eq 0 ]] && return 0
  [[ $(id -u) == 0 ]] || fleet_fail "missing ${missing[*]}: apt-get install -y ${missing[*]} (as root)"
  say "installing ${missing[*]} from Debian's packages"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  # The packages' own services are not used (they would hold the default ports).
  for s in prometheus haproxy redis-server postgresql; do
    systemctl disable --now "$s" >/dev/null 2>&1 || service "$s" stop >/dev/null 2>&1 || true
  done
  fleet_pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
}

port_free() {
  python3 -c 'import socket,sys; s=socket.socket(); s.bind(("127.0.0.1",int(sys.argv[1])))' "$1" 2>/dev/null
}

# Records a started part: name and pid, one per line (a restart replaces its line).
record() {
  sed -i "/^$1 /d" "$dir/pids"
  echo "$1 $2" >> "$dir/pids"
}

pid_of() { awk -v n="$1" '$1 == n {print $2}' "$dir/pids" 2>/dev/null; }

alive() { [[ -n "$1" ]] && kill -0 "$1" 2>/dev/null; }

up() {
  if [[ -f "$dir/pids" ]]; then
    fleet_fail "already up (state in $dir): run \`$0 status\` or \`$0 down\` first"
  fi
  need_packages
  for p in "$port" "${node_ports[@]}" "$stats_port" "$prom_port" "$redis_port" "$pg_port"; do
    port_free "$p" || fleet_fail "port $p on 127.0.0.1 is taken: set SB_PORT, SB_NODE_PORTS, SB_STATS_PORT, SB_PROMETHEUS_PORT, SB_REDIS_PORT or SB_PG_PORT"
  done
  if [[ ! -x "$bin/gateway" || ! -x "$bin/loadgen" || -z "${SKIP_BUILD:-}" ]]; then
    say "building the gateway and loadgen ($profile)"
    if [[ "$profile" == release ]]; then
      cargo build --locked --release -p gateway -p loadgen
    else
      cargo build --locked -p gateway -p loadgen
    fi
  fi
  mkdir -p "$dir"
  chmod 755 "$dir"
  : > "$dir/pids"
  declare -p bin port node_list stats_port prom_port redis_port pg_port > "$dir/env"
  # A failed `up` leaves nothing running.
  trap 'say "up failed: stopping what started"; down_quiet' EXIT

  fleet_start_redis "$dir" "$redis_port"
  record redis "$fleet_redis_pid"
  fleet_start_postgres "$dir" "$pg_port"
  record postgres "$fleet_pg_pid"

  fleet_secret > "$dir/token-secret"
  fleet_secret > "$dir/admin-secret"
  local urls=() i=0
  for np in "${node_ports[@]}"; do
    i=$((i + 1))
    cat > "$dir/node$i.toml" <<EOF
node_id = $i
[limits]
# loadgen's group scenarios put fresh users in groups (the default, "contacts",
# needs them to have chatted first).
group_adds = "anyone"
drain_notice_ms = $drain_notice_ms
shutdown_grace_secs = 10
[auth]
token_secret = "$(cat "$dir/token-secret")"
admin_secret = "$(cat "$dir/admin-secret")"
[storage]
backend = "postgres"
migrate_on_start = true
[storage.postgres]
url = "postgres://switchboard@127.0.0.1:$pg_port/switchboard"
[fleet]
redis_url = "redis://127.0.0.1:$redis_port"
EOF
    fleet_start_gateway "$bin" "$dir/node$i.toml" "$dir/node$i" "127.0.0.1:$np" "$dir/node$i"
    record "node$i" "$fleet_gateway_pid"
    urls+=("http://127.0.0.1:$np")
  done
  fleet_wait_ring "${#node_ports[@]}" "${urls[@]}" || fleet_fail "the nodes did not all see each other" "$dir"/node*.log

  # HAProxy from deploy/haproxy.cfg, its addresses from the environment.
  local k=0 env=(SB_LISTEN="127.0.0.1:$port" SB_STATS="127.0.0.1:$stats_port")
  for np in "${node_ports[@]}"; do
    k=$((k + 1))
    env+=("SB_NODE$k=127.0.0.1:$np")
  done
  setsid env "${env[@]}" haproxy -W -db -f deploy/haproxy.cfg > "$dir/haproxy.log" 2>&1 &
  record haproxy $!
  for _ in $(seq 100); do [[ $(haproxy_up_count) == "${#node_ports[@]}" ]] && break; sleep 0.2; done
  [[ $(haproxy_up_count) == "${#node_ports[@]}" ]] || fleet_fail "HAProxy does not see every node up" "$dir/haproxy.log"

  # Prometheus scraping every node, with the alert and recording rules.
  {
    echo "global:"
    echo "  scrape_interval: 5s"
    echo "  evaluation_interval: 5s"
    echo "rule_files:"
    echo "  - $repo/deploy/prometheus/rules.yml"
    echo "scrape_configs:"
    echo "  - job_name: switchboard"
    echo "    static_configs:"
    echo "      - targets: [$(printf '"127.0.0.1:%s",' "${node_ports[@]}" | sed 's/,$//')]"
  } > "$dir/prometheus.yml"
  setsid prometheus --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/prometheus" \
    --web.listen-address="127.0.0.1:$prom_port" > "$dir/prometheus.log" 2>&1 &
  record prometheus $!
  for _ in $(seq 150); do [[ $(prometheus_targets_up 2>/dev/null) == "${#node_ports[@]}" ]] && break; sleep 0.2; done
  [[ $(prometheus_targets_up) == "${#node_ports[@]}" ]] || fleet_fail "Prometheus does not scrape every node" "$dir/prometheus.log"
  trap - EXIT

  say "up: clients ws://127.0.0.1:$port/v1/ws (HAProxy), nodes ${node_ports[*]}, Prometheus http://127.0.0.1:$prom_port, state $dir"
  cat >&2 <<EOF
local-cluster: loadgen through HAProxy (--metrics-url: every node's figures, summed):
  SWITCHBOARD_ADMIN_SECRET=$(cat "$dir/admin-secret") $bin/loadgen run --target ws://127.0.0.1:$port \\
    --metrics-url $(printf 'http://127.0.0.1:%s/metrics,' "${node_ports[@]}" | sed 's/,$//') \\
    --connections 1000 --rate 500 --duration 30s --reconnect
EOF
}

# Nodes HAProxy counts UP in the gateways backend (from its stats CSV).
haproxy_up_count() {
  curl -fsS "http://127.0.0.1:$stats_port/stats;csv" 2>/dev/null \
    | awk -F, '$1 == "gateways" && $2 != "BACKEND" && $18 ~ /^UP/ {n++} END {print n + 0}'
}

# Scrape targets Prometheus has up.
prometheus_targets_up() {
  curl -fsS "http://127.0.0.1:$prom_port/api/v1/targets?state=active" \
    | python3 -c 'import json,sys; print(sum(t["health"] == "up" for t in json.load(sys.stdin)["data"]["activeTargets"]))'
}

status() {
  [[ -f "$dir/pids" ]] || { say "not up (no $dir/pids)"; return 1; }
  local bad=0 name pid health
  while read -r name pid; do
    if ! alive "$pid"; then
      health="NOT RUNNING"
    else
      case "$name" in
        redis) health=$(redis-cli -p "$redis_port" ping 2>&1) ;;
        postgres) health=$("$fleet_pgbin/pg_isready" -h 127.0.0.1 -p "$pg_port" 2>&1 | sed 's/.*- //') ;;
        node*)
          local np=${node_ports[$((${name#node} - 1))]}
          health="readyz $(curl -sS -o /dev/null -w '%{http_code}' "http://127.0.0.1:$np/readyz" 2>&1)"
          health+=", ring $(curl -fsS "http://127.0.0.1:$np/metrics" 2>/dev/null | awk '$1 == "switchboard_fleet_nodes" {print $2}') nodes"
          health+=", $(curl -fsS "http://127.0.0.1:$np/metrics" 2>/dev/null | awk '$1 == "switchboard_connections" {print $2}') connections"
          ;;
        haproxy) health="$(haproxy_up_count)/${#node_ports[@]} nodes UP" ;;
        prometheus) health="$(prometheus_targets_up 2>/dev/null || echo 0)/${#node_ports[@]} targets up" ;;
      esac
    fi
    case "$health" in
      PONG | "accepting connections" | "readyz 200, ring ${#node_ports[@]} nodes"* | "${#node_ports[@]}/${#node_ports[@]} "*) ;;
      *) bad=1 ;;
    esac
    printf '%-11s pid %-8s %s\n' "$name" "$pid" "$health"
  done < "$dir/pids"
  return "$bad"
}

# Stops every recorded part: first Prometheus, HAProxy and the gateways at once
# (the gateways drain: SIGTERM), then the stores they used.
down_quiet() {
  [[ -f "$dir/pids" ]] || return 0
  local name pid
  stop_all() {
    local pids=()
    while read -r name pid; do
      alive "$pid" || continue
      if [[ "$name" == postgres ]]; then fleet_stop_postgres "$dir"; else kill -TERM "$pid" 2>/dev/null || true; fi
      pids+=("$name:$pid")
    done
    # Gateways drain within their shutdown_grace_secs (10 s).
    for np in "${pids[@]}"; do
      for _ in $(seq 150); do alive "${np#*:}" || break; sleep 0.1; done
      if alive "${np#*:}"; then
        say "${np%%:*} (pid ${np#*:}) did not stop: kill -9"
        kill -9 "${np#*:}" 2>/dev/null || true
      fi
    done
  }
  grep -Ev '^(redis|postgres) ' "$dir/pids" | stop_all
  grep -E '^(redis|postgres) ' "$dir/pids" | stop_all
  rm -rf "$dir"
}

down() {
  [[ -f "$dir/pids" ]] || { say "not up (no $dir/pids)"; return 0; }
  down_quiet
  say "down"
}

need_up() { [[ -f "$dir/pids" ]] || fleet_fail "not up (no $dir/pids)"; }

# Waits until pid $1 has exited (up to $2 tenths of a second).
wait_gone() {
  for _ in $(seq "$2"); do alive "$1" || return 0; sleep 0.1; done
  return 1
}

node() {
  need_up
  local n=$1 action=$2 pid np
  [[ "$n" =~ ^[0-9]+$ && "$n" -ge 1 && "$n" -le ${#node_ports[@]} ]] || fleet_fail "no node $n (1..${#node_ports[@]})"
  pid=$(pid_of "node$n")
  np=${node_ports[$((n - 1))]}
  case "$action" in
    start)
      ! alive "$pid" || fleet_fail "node$n is running (pid $pid)"
      fleet_start_gateway "$bin" "$dir/node$n.toml" "$dir/node$n" "127.0.0.1:$np" "$dir/node$n"
      record "node$n" "$fleet_gateway_pid"
      # Back in service: in the ring and ready (HAProxy sends it clients again).
      for _ in $(seq 300); do
        [[ $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$np/readyz") == 200 ]] && break
        sleep 0.1
      done
      say "node$n started (pid $fleet_gateway_pid)"
      ;;
    stop)
      alive "$pid" || fleet_fail "node$n is not running"
      kill -TERM "$pid"
      wait_gone "$pid" 200 || fleet_fail "node$n did not finish draining" "$dir/node$n.log"
      say "node$n drained and stopped"
      ;;
    restart) node "$n" stop; node "$n" start ;;
    kill)
      alive "$pid" || fleet_fail "node$n is not running"
      kill -9 "$pid"
      wait_gone "$pid" 50 || true
      say "node$n killed (-9)"
      ;;
    pause) kill -STOP "$pid"; say "node$n paused (SIGSTOP)" ;;
    resume) kill -CONT "$pid"; say "node$n resumed (SIGCONT)" ;;
    *) fleet_fail "node N start|stop|restart|kill|pause|resume" ;;
  esac
}

redis() {
  need_up
  [[ "${1:-}" == restart ]] || fleet_fail "redis restart"
  local pid
  pid=$(pid_of redis)
  kill -TERM "$pid" 2>/dev/null || true
  wait_gone "$pid" 100 || kill -9 "$pid" 2>/dev/null || true
  fleet_start_redis "$dir" "$redis_port"
  record redis "$fleet_redis_pid"
  say "redis restarted, empty (pid $fleet_redis_pid)"
}

postgres() {
  need_up
  [[ "${1:-}" == restart ]] || fleet_fail "postgres restart"
  "${fleet_as_pg[@]}" "$fleet_pgbin/pg_ctl" -D "$dir/pg" -l "$dir/pg/log" -m fast -w restart > /dev/null \
    || fleet_fail "postgres did not restart" "$dir/pg/log"
  record postgres "$(head -1 "$dir/pg/postmaster.pid")"
  say "postgres restarted (pid $(pid_of postgres))"
}

case "${1:-}" in
  up) up ;;
  status) status ;;
  down) down ;;
  node) node "${2:-}" "${3:-}" ;;
  redis) redis "${2:-}" ;;
  postgres) postgres "${2:-}" ;;
  *) echo "usage: $0 up|status|down|node N start|stop|restart|kill|pause|resume|redis restart|postgres restart" >&2; exit 2 ;;
esac
