#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each, one after another, one job and
# one worker each (the machine is shared). The committed seeds in
# corpus/<target>/ are read, never written: what libFuzzer finds goes to
# corpus-scratch/<target>/ (ignored by git), crashes to artifacts/<target>/.
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
#
#   fuzz/run.sh 300        # five minutes per target
#   fuzz/run.sh 60 path    # only the named targets
set -euo pipefail
seconds=${1:?usage: fuzz/run.sh SECONDS [TARGET...]}
shift
cd "$(dirname "$0")"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(splice request_facts path target_url config)
fi
# Release with debug assertions and overflow checks (cargo-fuzz's default).
cargo +nightly fuzz build
status=0
for t in "${targets[@]}"; do
    mkdir -p "corpus-scratch/$t" "logs"
    echo "== $t: ${seconds}s"
    if ! cargo +nightly fuzz run "$t" "corpus-scratch/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -jobs=1 -workers=1 -print_final_stats=1 \
        >"logs/$t.log" 2>&1; then
        echo "!! $t found a crash: see fuzz/logs/$t.log and fuzz/artifacts/$t/"
        status=1
    fi
    # With -jobs, libFuzzer's own output (coverage, the crash) goes to fuzz-0.log.
    if [ -f fuzz-0.log ]; then
        cat fuzz-0.log >>"logs/$t.log" && rm fuzz-0.log
    fi
    grep -E '^#[0-9]+ +DONE|stat::number_of_executed_units|stat::peak_rss|panicked' "logs/$t.log" || tail -n 5 "logs/$t.log"
done
exit $status
