# Shared by scripts/fleet-loadgen and deploy/local-cluster.sh: start the parts of
# a local fleet from Debian's packages and this repo's binaries, on loopback.
# Each start_* function fails (exit 1, with the part's log) if its part does not
# come up; the caller records the pids and stops them.

fleet_pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
# PostgreSQL refuses to run as root: as the postgres account then.
fleet_as_pg=()
if [[ $(id -u) == 0 ]]; then fleet_as_pg=(runuser -u postgres --); fi

# A prefix for the long-running parts: (setsid) to start them in a session of
# their own, so they outlive the script and its terminal.
fleet_detach=()

fleet_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# fleet_fail MESSAGE [LOG...]: says what failed with the logs' tails, exits 1.
fleet_fail() {
  echo "$(basename "$0"): $1" >&2
  shift
  for f in "$@"; do [[ -f "$f" ]] && tail -n 30 "$f" >&2; done
  exit 1
}

# fleet_start_redis DIR PORT: a redis-server without persistence (the fleet
# rebuilds what Redis held after a restart); sets fleet_redis_pid.
fleet_start_redis() {
  local dir=$1 port=$2
  "${fleet_detach[@]}" redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" \
    > "$dir/redis.log" 2>&1 &
  fleet_redis_pid=$!
  for _ in $(seq 100); do redis-cli -p "$port" ping 2>/dev/null | grep -q PONG && return 0; sleep 0.1; done
  fleet_fail "redis did not start" "$dir/redis.log"
}

# fleet_start_postgres DIR PORT: initdb in DIR/pg, a server on PORT with a
# `switchboard` database owned by the `switchboard` role (trust auth, loopback
# only; FLEET_PG_MAX_CONNECTIONS, default 200); sets fleet_pg_pid (the postmaster).
fleet_start_postgres() {
  local dir=$1 port=$2
  mkdir -p "$dir/pg"
  [[ ${#fleet_as_pg[@]} -gt 0 ]] && chown postgres "$dir/pg"
  "${fleet_as_pg[@]}" "$fleet_pgbin/initdb" -D "$dir/pg" -U switchboard --auth=trust -E UTF8 \
    > "$dir/initdb.log" 2>&1 || fleet_fail "initdb failed" "$dir/initdb.log"
  "${fleet_as_pg[@]}" "$fleet_pgbin/pg_ctl" -D "$dir/pg" -w -l "$dir/pg/log" \
    -o "-p $port -k $dir/pg -c listen_addresses=127.0.0.1 -c max_connections=${FLEET_PG_MAX_CONNECTIONS:-200}" start > /dev/null \
    || fleet_fail "postgres did not start" "$dir/pg/log"
  "${fleet_as_pg[@]}" "$fleet_pgbin/createdb" -h 127.0.0.1 -p "$port" -U switchboard switchboard
  fleet_pg_pid=$(head -1 "$dir/pg/postmaster.pid")
}

# fleet_stop_postgres DIR
fleet_stop_postgres() {
  [[ -f "$1/pg/postmaster.pid" ]] && "${fleet_as_pg[@]}" "$fleet_pgbin/pg_ctl" -D "$1/pg" -m fast stop >/dev/null 2>&1
  return 0
}

# fleet_start_gateway BIN CONFIG DATA_DIR LISTEN OUT_PREFIX: starts a gateway and
# waits for its readiness line; sets fleet_gateway_pid and fleet_gateway_addr.
# Its stdout goes to OUT_PREFIX.out, its log to OUT_PREFIX.log (appended).
fleet_start_gateway() {
  local bin=$1 config=$2 data=$3 listen=$4 out=$5 line=""
  # Emptied here, before the start: a restart must not read the last run's line.
  : > "$out.out"
  "${fleet_detach[@]}" "$bin/gateway" --config "$config" --listen "$listen" --data-dir "$data" > "$out.out" 2>> "$out.log" &
  fleet_gateway_pid=$!
  for _ in $(seq 600); do
    line=$(head -1 "$out.out" 2>/dev/null || true)
    [[ "$line" == *'"ready":true'* ]] && break
    kill -0 "$fleet_gateway_pid" 2>/dev/null || break
    sleep 0.1
  done
  [[ "$line" == *'"ready":true'* ]] || fleet_fail "the gateway ($config) did not become ready" "$out.log"
  fleet_gateway_addr=$(sed -E 's/.*"addr":"([^"]+)".*/\1/' <<< "$line")
}

# fleet_wait_ring N URL...: waits until every node's /metrics shows N live nodes.
fleet_wait_ring() {
  python3 - "$@" <<'PY'
import sys, time, urllib.request
want, urls = sys.argv[1], sys.argv[2:]
deadline = time.time() + 30
for u in urls:
    while f"switchboard_fleet_nodes {want}\n" not in urllib.request.urlopen(u + "/metrics").read().decode():
        if time.time() > deadline:
            sys.exit(f"{u} does not see {want} nodes")
        time.sleep(0.1)
PY
}

# fleet_cluster_env NAME: points deploy/local-cluster.sh at a cluster of its own
# (free loopback ports, a fresh state dir named after NAME), for scripts that
# start one and must not collide with a user's cluster or with each other.
fleet_cluster_env() {
  export SWITCHBOARD_CLUSTER_DIR SB_PORT SB_STATS_PORT SB_PROMETHEUS_PORT SB_REDIS_PORT SB_PG_PORT SB_NODE_PORTS
  SWITCHBOARD_CLUSTER_DIR=$(mktemp -u "${TMPDIR:-/tmp}/switchboard-$1.XXXXXX")
  SB_PORT=$(fleet_free_port) SB_STATS_PORT=$(fleet_free_port) SB_PROMETHEUS_PORT=$(fleet_free_port)
  SB_REDIS_PORT=$(fleet_free_port) SB_PG_PORT=$(fleet_free_port)
  SB_NODE_PORTS="$(fleet_free_port) $(fleet_free_port) $(fleet_free_port)"
}

# fleet_secret: 48 hex characters.
fleet_secret() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }
