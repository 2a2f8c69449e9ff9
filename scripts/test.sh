#!/usr/bin/env bash
# The README's second command: install dependencies, build, run every test.
# Kernel tests need root; without it they skip and say why (in CI, CI=true,
# they fail instead of skipping).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
cd build
ctest --output-on-failure --timeout 900 "$@"
