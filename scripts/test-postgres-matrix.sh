#!/usr/bin/env bash
# Runs the tests against several PostgreSQL majors, one after another, and ends with one summary
# line per major and a total. A failure names the major it happened on.
#
#   scripts/test-postgres-matrix.sh                       # every test on each major
#   scripts/test-postgres-matrix.sh 13 18                 # every test on 13, then on 18
#   scripts/test-postgres-matrix.sh 13 14 -- --test secrets   # arguments after -- go to cargo test
#
# A major is `system` (the installation the tests find by themselves, Debian's 15 here, run with
# exactly `cargo test`) or one that scripts/install-postgres-matrix.sh installs (installed on
# demand into .postgres/<major>, run with PG_BINDIR pointing at it). PG_MATRIX_TIMEOUT (seconds,
# default 1500) bounds each major's run.
set -uo pipefail
cd "$(dirname "$0")/.."

DEFAULT_MATRIX=(system 13 14 16 17 18)
DEST="${PG_MATRIX_DIR:-$PWD/.postgres}"
TIMEOUT="${PG_MATRIX_TIMEOUT:-1500}"

specs=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do
    specs+=("$1")
    shift
done
[ $# -eq 0 ] || shift
cargo_args=("$@")
[ ${#specs[@]} -gt 0 ] || specs=("${DEFAULT_MATRIX[@]}")

majors=()
for major in "${specs[@]}"; do
    case "$major" in
    system) ;;
    *[!0-9]* | '')
        echo "test-postgres-matrix: '$major' is neither 'system' nor a major version" >&2
        exit 2
        ;;
    *) majors+=("$major") ;;
    esac
done
if [ ${#majors[@]} -gt 0 ]; then
    PG_MATRIX_DIR="$DEST" scripts/install-postgres-matrix.sh "${majors[@]}" || {
        echo "test-postgres-matrix: installing PostgreSQL ${majors[*]} failed" >&2
        exit 1
    }
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
summary=()
total_passed=0
total_failed=0
failed_majors=()

for major in "${specs[@]}"; do
    command=(cargo test)
    if [ "$major" = system ]; then
        bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
        [ -n "$bindir" ] || bindir=$(pg_config --bindir 2>/dev/null || true)
        environment=(env -u PG_BINDIR)
    else
        bindir="$DEST/$major/bin"
        environment=(env "PG_BINDIR=$bindir")
        # Every failing target of this major is reported, not only the first.
        command+=(--no-fail-fast)
    fi
    command+=("${cargo_args[@]}")
    version=$("$bindir/postgres" --version 2>/dev/null | awk '{ print $3 }')
    label="PostgreSQL ${version:-$major}"
    echo
    echo "===== $label ($bindir): ${command[*]} ====="
    start=$(date +%s)
    timeout --kill-after=60 "$TIMEOUT" "${environment[@]}" "${command[@]}" 2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
    seconds=$(($(date +%s) - start))
    read -r passed failed < <(sed -nE 's/^test result: [A-Za-z]+\. ([0-9]+) passed; ([0-9]+) failed.*/\1 \2/p' "$log" |
        awk '{ p += $1; f += $2 } END { print p + 0, f + 0 }')
    result=ok
    if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
        result="FAILED: timed out after ${TIMEOUT}s"
    elif [ "$status" -ne 0 ]; then
        result="FAILED: cargo exited $status"
    fi
    if [ "$result" != ok ]; then
        failed_majors+=("$label")
        # A run that failed without a failing test (build error, crash, timeout) still counts.
        [ "$failed" -gt 0 ] || failed=1
    fi
    total_passed=$((total_passed + passed))
    total_failed=$((total_failed + failed))
    line="$label: $result; $passed passed, $failed failed; ${seconds}s"
    summary+=("$line")
    echo "===== $line ====="
done

echo
echo "===== PostgreSQL matrix ====="
printf '%s\n' "${summary[@]}"
if [ ${#failed_majors[@]} -gt 0 ]; then
    echo "failed on: ${failed_majors[*]}"
fi
echo "matrix: $total_passed passed, $total_failed failed"
[ ${#failed_majors[@]} -eq 0 ]
