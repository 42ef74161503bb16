#!/usr/bin/env bash
# The whole-proxy load benchmark, one command:
#   bash benches/load.sh [--secs 5] [--conns 32] [--rounds 3] [--rate 1000] [--stream-mib 1024] [--fixed-only]
#                        [--baseline PATH] [--fsync]
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
cargo build --release --quiet
cargo bench --quiet --bench loadgen -- "$@"
