# Shared by scripts/test, scripts/run, scripts/demo, grafana/check.sh and loadtest/bench/device-svc.sh: find or start the Redis and
# PostgreSQL the project needs, install what is missing, and small helpers (ports, URLs). Sourced, not run.
#
# After `services_up`:
#   REDIS_URL      redis://host:port/          (the given one, the local one, or a private one)
#   DATABASE_URL   postgres://user@host:port/db (a server where CREATE DATABASE is allowed)
# `services_down` stops only what `services_up` started.
#
# Knobs (environment):
#   REDIS_URL, DATABASE_URL   use these servers as they are
#   PRIVATE_SERVICES=1        ignore servers on the standard ports; start private ones
#   NO_INSTALL=1              never install packages; fail with a clear message instead

SERVICES_DIR=""
STARTED_REDIS_PID=""
STARTED_PG_DATA=""
STARTED_CLUSTER_PIDS=()
PG_BIN=""

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Runs apt-get install for the named packages, if allowed and possible.
install_packages() {
  if [ "${NO_INSTALL:-0}" = 1 ]; then
    die "missing: $* (NO_INSTALL=1 is set; install them, or set REDIS_URL/DATABASE_URL)"
  fi
  command -v apt-get >/dev/null 2>&1 || die "missing: $* and no apt-get to install them"
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    sudo -n true 2>/dev/null || die "missing: $* (not root and no passwordless sudo to install them)"
    sudo="sudo -n"
  fi
  say "installing Debian packages: $*"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null \
    || { $sudo apt-get update -q >/dev/null && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null; } \
    || die "failed to install: $*"
}

# True if something accepts TCP connections on 127.0.0.1:$1.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Waits up to 30 s for something to accept connections on 127.0.0.1:$1; dies naming $2 if not.
wait_port() {
  for _ in $(seq 1 300); do port_open "$1" && return 0; sleep 0.1; done
  die "$2 did not come up on port $1"
}

# $1 (a PostgreSQL URL) with its database, the URL's path, replaced by $2.
url_with_db() {
  local url=$1 db=$2 base query=""
  base=${url%%\?*}
  [ "$base" != "$url" ] && query="?${url#*\?}"
  local scheme=${base%%://*} rest=${base#*://}
  echo "$scheme://${rest%%/*}/$db$query"
}

# Prints a free local TCP port, below the kernel's ephemeral range (32768 and up by default), so
# that no outgoing connection holds it by the time a server binds it.
free_port() {
  local p
  for _ in $(seq 1 200); do
    p=$(( 20000 + RANDOM % 12000 ))
    port_open "$p" || { echo "$p"; return 0; }
  done
  die "no free local port found"
}

services_tmpdir() {
  if [ -z "$SERVICES_DIR" ]; then
    SERVICES_DIR=$(mktemp -d "${TMPDIR:-/tmp}/iotgw-services.XXXXXX")
    chmod 755 "$SERVICES_DIR"
  fi
}

# True if a Redis answers PING at 127.0.0.1:$1.
redis_answers() {
  local reply
  reply=$( { exec 3<>"/dev/tcp/127.0.0.1/$1" && printf 'PING\r\n' >&3 && timeout 2 head -c 5 <&3; } 2>/dev/null ) || return 1
  [ "$reply" = "+PONG" ]
}

# Says so when the Redis at URL $1 keeps no append-only file: the bus must be durable for an
# acknowledgement to survive a Redis crash (README, "Redis: what must persist").
warn_if_not_durable() {
  command -v redis-cli >/dev/null 2>&1 || return 0
  local aof; aof=$(redis-cli -u "$1" config get appendonly 2>/dev/null | sed -n 2p)
  [ "$aof" = "no" ] && say "note: this Redis runs without appendonly; fine for tests, not for production"
  return 0
}

ensure_redis() {
  if [ -n "${REDIS_URL:-}" ]; then
    say "Redis: using REDIS_URL"
    warn_if_not_durable "$REDIS_URL"
    return
  fi
  if [ "${PRIVATE_SERVICES:-0}" != 1 ] && redis_answers 6379; then
    REDIS_URL="redis://127.0.0.1:6379/"
    say "Redis: using the server on 127.0.0.1:6379"
    warn_if_not_durable "$REDIS_URL"
    return
  fi
  command -v redis-server >/dev/null 2>&1 || install_packages redis-server
  services_tmpdir
  local port; port=$(free_port)
  # The append-only file, fsynced every second, as production needs it (README): a Redis
  # process that crashes loses nothing it confirmed.
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly yes --appendfsync everysec --daemonize yes \
    --dir "$SERVICES_DIR" --pidfile "$SERVICES_DIR/redis.pid" --logfile "$SERVICES_DIR/redis.log" >/dev/null \
    || die "failed to start redis-server (log: $SERVICES_DIR/redis.log)"
  for _ in $(seq 1 50); do redis_answers "$port" && break; sleep 0.1; done
  redis_answers "$port" || die "redis-server did not come up on port $port (log: $SERVICES_DIR/redis.log)"
  STARTED_REDIS_PID=$(cat "$SERVICES_DIR/redis.pid")
  REDIS_URL="redis://127.0.0.1:$port/"
  say "Redis: started a private server on 127.0.0.1:$port"
}

pg_bin() {
  if [ -z "$PG_BIN" ]; then
    PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  fi
  [ -n "$PG_BIN" ] && [ -x "$PG_BIN/initdb" ]
}

# True if $1 (a URL) accepts a query.
pg_answers() {
  command -v psql >/dev/null 2>&1 || return 1
  PGCONNECT_TIMEOUT=3 psql "$1" -XAtqc 'select 1' >/dev/null 2>&1
}

# Runs a PostgreSQL server tool as an unprivileged user when we are root (initdb refuses root).
as_pg_user() {
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/sh postgres
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

# pg_start_private PORT: starts (or starts again) the private cluster in $SERVICES_DIR/pgdata on
# PORT: throwaway settings, no durability (tests and demos only).
pg_start_private() {
  as_pg_user "$PG_BIN/pg_ctl" -D "$SERVICES_DIR/pgdata" -l "$SERVICES_DIR/postgres.log" -w -t 30 \
    -o "-p $1 -k $SERVICES_DIR -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=400" \
    start >/dev/null
}

ensure_postgres() {
  if [ -n "${DATABASE_URL:-}" ]; then
    say "PostgreSQL: using DATABASE_URL"
    return
  fi
  if [ "${PRIVATE_SERVICES:-0}" != 1 ] && port_open 5432; then
    local url
    for url in "postgres://postgres@127.0.0.1:5432/postgres" "postgres://$(id -un)@127.0.0.1:5432/postgres"; do
      if pg_answers "$url"; then
        DATABASE_URL="$url"
        say "PostgreSQL: using the server on 127.0.0.1:5432"
        return
      fi
    done
    say "PostgreSQL: 127.0.0.1:5432 does not accept us without a password; starting a private one"
  fi
  { pg_bin && command -v psql >/dev/null 2>&1; } || install_packages postgresql postgresql-client
  pg_bin || die "PostgreSQL server binaries not found under /usr/lib/postgresql"
  services_tmpdir
  local port; port=$(free_port)
  local data="$SERVICES_DIR/pgdata"
  mkdir -p "$data"
  [ "$(id -u)" = 0 ] && chown postgres "$data" "$SERVICES_DIR"
  as_pg_user "$PG_BIN/initdb" -D "$data" -U postgres --auth=trust -E UTF8 --no-sync >"$SERVICES_DIR/initdb.log" 2>&1 \
    || die "initdb failed (log: $SERVICES_DIR/initdb.log)"
  pg_start_private "$port" || die "PostgreSQL did not start (log: $SERVICES_DIR/postgres.log)"
  STARTED_PG_DATA="$data"
  DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
  pg_answers "$DATABASE_URL" || die "private PostgreSQL on port $port does not answer"
  say "PostgreSQL: started a private server on 127.0.0.1:$port"
}

# The tools tests run as real peers: redis-server/redis-cli (private servers and clusters for
# tests that restart Redis), Debian's MQTT clients, and paho-mqtt from PyPI.
# ensure_pip CHECK SPEC: installs SPEC from PyPI unless the Python statement CHECK runs.
ensure_pip() {
  python3 -c "$1" >/dev/null 2>&1 && return 0
  [ "${NO_INSTALL:-0}" = 1 ] && die "missing: $2 for python3 (NO_INSTALL=1 is set)"
  python3 -m pip --version >/dev/null 2>&1 || install_packages python3-pip
  say "installing $2 from PyPI"
  python3 -m pip install --quiet --disable-pip-version-check "$2" >/dev/null 2>&1 \
    || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "$2" >/dev/null \
    || die "failed to install $2"
}

ensure_test_tools() {
  local missing=()
  command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1 || missing+=(redis-server redis-tools)
  command -v mosquitto_sub >/dev/null 2>&1 && command -v mosquitto_pub >/dev/null 2>&1 || missing+=(mosquitto-clients)
  command -v python3 >/dev/null 2>&1 || missing+=(python3)
  command -v stdbuf >/dev/null 2>&1 || missing+=(coreutils)
  # The console's browser test: headless Chromium over WebDriver.
  command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || missing+=(chromium chromium-driver)
  [ "${#missing[@]}" -eq 0 ] || install_packages "${missing[@]}"
  ensure_pip 'import paho.mqtt.client as m; m.CallbackAPIVersion' 'paho-mqtt>=2,<3'
  # The OpenAPI document's test checks it with a validator nobody here wrote.
  ensure_pip 'import openapi_spec_validator' 'openapi-spec-validator>=0.7,<0.8'
  # The S3 path of the OTA package store runs against moto's S3 server.
  ensure_pip 'import moto.server, flask_cors' 'moto[server]>=5,<6'
}

# redis_cluster_up: starts three private cluster-mode Redis servers (no persistence) in
# $SERVICES_DIR, joins them into a Redis Cluster and waits for cluster_state:ok; exports
# TEST_REDIS_CLUSTER (the seed URLs, comma-separated). services_down stops them.
redis_cluster_up() {
  command -v redis-server >/dev/null 2>&1 || install_packages redis-server
  services_tmpdir
  local port dir nodes=() urls=() started
  # The cluster bus listens on port + 10000. Both stay below the kernel's ephemeral range, where
  # an outgoing connection of the tests may hold the port between the check and the bind.
  local low span
  low=$(awk '{ print $1 }' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
  span=$(( low - 10000 - 20000 )); [ "$span" -gt 100 ] || span=12000
  for _ in 1 2 3; do
    started=0
    for _ in 1 2 3 4 5; do
      for _ in $(seq 1 50); do port=$(( 20000 + RANDOM % span )); port_open "$port" || port_open $((port + 10000)) || break; done
      dir="$SERVICES_DIR/cluster-$port" && mkdir -p "$dir"
      redis-server --port "$port" --bind 127.0.0.1 --cluster-enabled yes --cluster-config-file "$dir/nodes.conf" \
        --cluster-node-timeout 2000 --save '' --appendonly no --daemonize yes --dir "$dir" \
        --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" >/dev/null || continue
      for _ in $(seq 1 50); do redis_answers "$port" && break; sleep 0.1; done
      if [ -s "$dir/redis.pid" ] && redis_answers "$port"; then started=1 && break; fi
      # Taken after all (or too slow to start): stop what may run there and try another port.
      if [ -s "$dir/redis.pid" ]; then kill "$(cat "$dir/redis.pid")" 2>/dev/null || true; fi
      say "a cluster node did not start on port $port ($(tail -n 1 "$dir/redis.log" 2>/dev/null)); trying another"
    done
    [ "$started" = 1 ] || die "failed to start a cluster node"
    STARTED_CLUSTER_PIDS+=("$(cat "$dir/redis.pid")")
    nodes+=("127.0.0.1:$port") urls+=("redis://127.0.0.1:$port/")
  done
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >/dev/null || die "redis-cli --cluster create failed"
  for _ in $(seq 1 200); do
    local ok=0 n
    for n in "${nodes[@]}"; do redis-cli -p "${n#*:}" cluster info 2>/dev/null | grep -q 'cluster_state:ok' && ok=$((ok + 1)); done
    [ "$ok" = 3 ] && break
    sleep 0.1
  done
  [ "$ok" = 3 ] || die "the Redis Cluster did not reach cluster_state:ok"
  TEST_REDIS_CLUSTER=$(IFS=,; echo "${urls[*]}")
  export TEST_REDIS_CLUSTER
  say "Redis Cluster: three private nodes (${nodes[*]})"
}

services_up() {
  ensure_redis
  ensure_postgres
  export REDIS_URL DATABASE_URL
}

services_down() {
  local pid
  for pid in "${STARTED_CLUSTER_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  # Gone before their directories are removed (a node still saving its nodes.conf would
  # leave a file behind and fail the removal).
  for pid in "${STARTED_CLUSTER_PIDS[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done
  STARTED_CLUSTER_PIDS=()
  if [ -n "$STARTED_REDIS_PID" ]; then
    kill "$STARTED_REDIS_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$STARTED_REDIS_PID" 2>/dev/null || break; sleep 0.1; done
    STARTED_REDIS_PID=""
  fi
  if [ -n "$STARTED_PG_DATA" ]; then
    as_pg_user "$PG_BIN/pg_ctl" -D "$STARTED_PG_DATA" -m immediate -w stop >/dev/null 2>&1 || true
    STARTED_PG_DATA=""
  fi
  if [ -n "$SERVICES_DIR" ]; then
    rm -rf "$SERVICES_DIR"
    SERVICES_DIR=""
  fi
}

# api_parties DEVICE_SVC_BINARY DATABASE_URL LABEL
# Creates an API key per party of the flows in the database (with `device-svc keys create`,
# which also applies the migrations) and a payment provider secret, and exports what the load
# harness reads (IOTGW_OPERATOR_KEY, IOTGW_VIEWER_KEY, IOTGW_SHOP_KEY, IOTGW_OWNER_APP_KEY,
# IOTGW_METRICS_KEY, IOTGW_PAYMENT_PROVIDER, IOTGW_PAYMENT_SECRET) and what the device service
# reads (DEVICE_SVC_PAYMENT_PROVIDERS). Keys go through the environment, never the command line.
api_parties() {
  local bin=$1 db=$2 label=$3 role var
  for role in operator viewer shop owner_app metrics; do
    var="IOTGW_$(printf '%s' "$role" | tr '[:lower:]' '[:upper:]')_KEY"
    local tenant=()
    [ "$role" = shop ] && tenant=(--tenant "$label-shop")
    printf -v "$var" '%s' "$("$bin" --database-url "$db" keys create --role "$role" --name "$label-$role" "${tenant[@]}" 2>/dev/null)" \
      || die "failed to create the $role API key"
    [ -n "${!var}" ] || die "failed to create the $role API key"
    export "${var?}"
  done
  # The shop key's tenant: the payment provider's contract callbacks name it.
  export IOTGW_SHOP_TENANT="$label-shop"
  export IOTGW_PAYMENT_PROVIDER="$label-pay"
  IOTGW_PAYMENT_SECRET=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
  export IOTGW_PAYMENT_SECRET
  export DEVICE_SVC_PAYMENT_PROVIDERS="$IOTGW_PAYMENT_PROVIDER:$IOTGW_PAYMENT_SECRET"
}

# ota_package_keys LABEL DIR: stored OTA packages on for a device service started after it, with
# fresh keys of this run only (a master key named LABEL and an Ed25519 signing key; a
# deployment keeps its own in a secret store, rotation in docs/api.md) and packages under DIR.
ota_package_keys() {
  local hex="import secrets; print(secrets.token_hex(32))"
  export DEVICE_SVC_OTA_MASTER_KEYS="$1:$(python3 -c "$hex")" DEVICE_SVC_OTA_SIGNING_KEY="$(python3 -c "$hex")"
  export DEVICE_SVC_OTA_PACKAGES_PATH="$2"
}
