#!/usr/bin/env bash
# The whole-proxy load benchmark, one command:
#   bash benches/load.sh [--secs 5] [--conns 32] [--rounds 3] [--rate 1000] [--stream-mib 1024] [--fixed-only]
#                        [--baseline PATH] [--fsync] [--postgres]
# Plain HTTP/1.1 and h2c, and HTTP/1.1 and h2 over TLS (certs/dev-*.pem).
# Builds the release binary, installs nginx (Debian) and fal's Node proxy
# (npm) if missing, then runs benches/loadgen.rs: the same load direct to a
# mock fal, through AbhiAPI, through nginx and through fal's proxy, printed
# as markdown tables with the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null
fi
# (d) fal's own Node proxy, from the npm registry at the pinned versions.
if command -v npm >/dev/null && [ ! -d benches/fal-proxy/node_modules ]; then
  (cd benches/fal-proxy && npm ci --no-audit --no-fund --silent) || echo "fal's Node proxy not installed: (d) skipped" >&2
fi
# --postgres: AbhiAPI on a throwaway PostgreSQL too (Debian's package), as
# 1, 2 and 3 nodes of one database, beside SQLite.
args=()
for a in "$@"; do
  if [ "$a" = "--postgres" ]; then
    pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort | tail -1)
    if [ -z "$pgbin" ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
      pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort | tail -1)
    fi
    pgdir=$(mktemp -d)
    as=()
    if [ "$(id -u)" = 0 ]; then chown postgres "$pgdir"; as=(runuser -u postgres --); fi
    "${as[@]}" "$pgbin/initdb" -A trust -U postgres --no-sync -D "$pgdir/data" >/dev/null
    pgport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "${as[@]}" "$pgbin/pg_ctl" -D "$pgdir/data" -l "$pgdir/log" -w \
      -o "-p $pgport -k $pgdir -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null
    trap '"${as[@]}" "$pgbin/pg_ctl" -D "$pgdir/data" -m immediate stop >/dev/null; rm -rf "$pgdir"' EXIT
    args+=(--postgres-url "postgres://postgres@127.0.0.1:$pgport/postgres")
  else
    args+=("$a")
  fi
done
cargo build --release --quiet
cargo bench --quiet --bench loadgen -- "${args[@]}"
