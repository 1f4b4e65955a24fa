#!/usr/bin/env bash
# Build the C core with AddressSanitizer + UndefinedBehaviorSanitizer and run
# the whole test suite under it.  Usage (from the repository root):
#
#     bash scripts/sanitize.sh [pytest args...]
#
# The extension is built in place (not installed) in a throwaway copy of the
# tree, so the normal build is untouched.  Python itself is not instrumented,
# so the ASan runtime is preloaded; leak checking is off because CPython's
# allocator keeps memory for the process lifetime.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git -C "$root" ls-files -z --cached --others --exclude-standard | (cd "$root" && xargs -0 cp --parents -t "$work")
cd "$work"
DAMEX_SANITIZE=1 python setup.py -q build_ext --inplace 2>&1 | grep -Ei "warning|error" || true
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export PYTHONPATH="$work${PYTHONPATH:+:$PYTHONPATH}"
export DAMEX_SANITIZE=1   # tests skip their RSS checks (ASan keeps freed memory in quarantine)
if [ $# -eq 0 ]; then set -- tests; fi
python -m pytest -q -p no:cacheprovider "$@"
