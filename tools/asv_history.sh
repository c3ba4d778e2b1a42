#!/usr/bin/env bash
# Nightly asv job: benchmark the last N commits of main (default 10) in the pinned virtualenv and publish the
# HTML site to .asv/html. Commits already measured on this machine are skipped, so a nightly cron only pays for
# new ones. Extra arguments go to `asv run` (e.g. --bench bench_kernels for a fast kernel-only history).
#
#   tools/asv_history.sh 20                          # full suite over main~20..main
#   tools/asv_history.sh 5 --bench bench_kernels     # kernels only
#   crontab: 0 2 * * *  cd /path/to/bitnet-fast && tools/asv_history.sh 10 >> .asv/nightly.log 2>&1
#
# WikiText-2 for bench_quality is found through BITNET_FAST_DATA (default: ../shared/data beside the checkout).
set -euo pipefail
cd "$(dirname "$0")/.."

n="${1:-10}"
shift || true
if ! [[ "$n" =~ ^[0-9]+$ ]] || [ "$n" -lt 1 ]; then
    echo "usage: tools/asv_history.sh N [asv run options]   (N = number of commits of main, >= 1)" >&2
    exit 2
fi
total=$(git rev-list --count main)
range="main~$((n < total ? n : total - 1))..main"
[ "$n" -ge "$total" ] && range="main"  # the whole history: asv treats a bare branch as all its commits

export BITNET_FAST_DATA="${BITNET_FAST_DATA:-$(cd .. && pwd)/shared/data}"
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-$PWD/.asv/numba_cache}"

machine="${ASV_MACHINE:-$(hostname)}"  # asv's default machine name; results are kept per machine
asv machine --yes --machine "$machine" >/dev/null
# --skip-existing-commits: a nightly run only measures what is new; nice: the machine stays usable.
nice -n 10 asv run "$range" --machine "$machine" --skip-existing-commits --show-stderr "$@" \
    || echo "asv run: some benchmarks failed (see above)"
asv publish
echo "site: $(pwd)/.asv/html/index.html   (view with: asv preview)"
# The two newest commits side by side, as a regression check a human can read.
if [ "$total" -ge 2 ]; then
    asv compare --machine "$machine" --split --only-changed --factor 1.1 main~1 main || true
fi
