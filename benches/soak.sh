#!/usr/bin/env bash
# The soak test, one command, loopback only:
#   bash benches/soak.sh [--minutes 10] [--keep-ended-jobs-days 7]
# Builds the release binary, then runs benches/soak.rs: a mock fal, the proxy
# on its own config and database in a temporary folder, ~44 accounts and ~100
# keys, and N minutes of mixed traffic (sync, queue, large answers, 402, 429,
# upstream 5xx, stalled, vanishing and silent clients), a SIGKILL and restart
# halfway, RSS and descriptors every minute, SIGTERM at the end. Then the
# books, from SQLite: for every account, opening credits + top-ups (the
# `changes` table's balance_delta, checked against what the driver put in)
# - the sum of its charges = its balance, with no hold and no uncharged
# pending job left and no ledger entry rejected. Exits non-zero if they do not balance.
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=10
KEEP=7
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) MINUTES="$2"; shift 2 ;;
    --keep-ended-jobs-days) KEEP="$2"; shift 2 ;;
    *) echo "usage: bash benches/soak.sh [--minutes N] [--keep-ended-jobs-days D]" >&2; exit 2 ;;
  esac
done
case "$MINUTES$KEEP" in ''|*[!0-9]*) echo "--minutes takes a whole number" >&2; exit 2 ;; esac
command -v sqlite3 >/dev/null || { echo "sqlite3 is needed for the books" >&2; exit 2; }

DIR=$(mktemp -d /tmp/abhiapi-soak.XXXXXX)
echo "soak: $MINUTES minutes, working folder $DIR (config, database, proxy log)"
cargo build --release --quiet
# Bounded: the load stops at N minutes, settling at 2 more, SIGTERM at 1 more.
timeout $((MINUTES * 60 + 600)) cargo bench --quiet --bench soak -- --minutes "$MINUTES" --keep-ended-jobs-days "$KEEP" --dir "$DIR"

DB="$DIR/abhiapi.db"
echo
echo "## The books"
echo
echo "| account | expected deposits | changes.balance_delta | charges | balance | holds | uncharged pending jobs | difference |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
BAD=0
LOST=0
while IFS='|' read -r name deltas charged balance nholds pending; do
  expected=$(awk -F'\t' -v n="$name" '$1 == n { print $2 }' "$DIR/expected.tsv")
  diff=$((deltas - charged - balance))
  echo "| $name | ${expected:-?} | $deltas | $charged | $balance | $nholds | $pending | $diff |"
  if [ "$diff" -ne 0 ] || [ "$nholds" -ne 0 ] || [ "$pending" -ne 0 ] || [ "${expected:-x}" != "$deltas" ]; then
    BAD=$((BAD + 1))
  fi
  LOST=$((LOST + (diff < 0 ? -diff : diff)))
done < <(sqlite3 -separator '|' "$DB" "
  SELECT a.name,
    (SELECT COALESCE(SUM(balance_delta), 0) FROM changes c WHERE c.account_id = a.id),
    (SELECT COALESCE(SUM(credits), 0) FROM charges h WHERE h.account_id = a.id),
    a.balance,
    (SELECT COUNT(*) FROM holds o WHERE o.account_id = a.id),
    (SELECT COUNT(*) FROM jobs j WHERE j.account_id = a.id AND j.state = 'pending'
       AND NOT EXISTS (SELECT 1 FROM charges c WHERE c.id = j.hold_id))
  FROM accounts a ORDER BY a.name;")

echo
echo "charges by outcome:"
sqlite3 -separator ' ' "$DB" "SELECT outcome, COUNT(*), SUM(credits), SUM(shortfall) FROM charges GROUP BY outcome ORDER BY outcome;" \
  | awk '{ printf "  %s: %s charges, %s credits, shortfall %s\n", $1, $2, $3, $4 }'
# A SIGKILL between a job's charge and the write of its end leaves the row
# 'pending' beside its charge; the server reads such a job as ended (see
# store::jobs::load). Only a pending job without a charge still holds credits.
echo "pending jobs already charged (killed between charge and end): $(sqlite3 "$DB" "SELECT COUNT(*) FROM jobs j WHERE state = 'pending' AND EXISTS (SELECT 1 FROM charges c WHERE c.id = j.hold_id);")"
echo "jobs by state: $(sqlite3 "$DB" "SELECT group_concat(state || ' ' || n, ', ') FROM (SELECT state, COUNT(*) n FROM jobs GROUP BY state);")"
REJECTS=$(sqlite3 "$DB" "SELECT COUNT(*) FROM ledger_rejects;")
echo "ledger rejects: $REJECTS"
ACCOUNTS=$(sqlite3 "$DB" "SELECT COUNT(*) FROM accounts;")
EXPECTED=$(wc -l < "$DIR/expected.tsv")
echo "accounts: $ACCOUNTS in the database, $EXPECTED created"
# A clean stop empties the hold journal's folder.
if [ -n "$(ls -A "$DB.holds" 2>/dev/null)" ]; then
  echo "hold journal left behind: $(ls "$DB.holds")"
  BAD=$((BAD + 1))
fi
[ "$REJECTS" -eq 0 ] || BAD=$((BAD + 1))
[ "$ACCOUNTS" -eq "$EXPECTED" ] || BAD=$((BAD + 1))
echo
echo "credits lost or made up: $LOST"
if [ "$BAD" -ne 0 ]; then
  echo "THE BOOKS DO NOT BALANCE: $BAD problem(s); see $DIR" >&2
  exit 1
fi
echo "the books balance"
