#!/usr/bin/env bash
# The README's first command: install dependencies, build, start tracing.
# Arguments go to tcpscope (default: live table of every TCP transition).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh >&2
exec build/tcpscope "$@"
