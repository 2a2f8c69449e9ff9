#!/usr/bin/env bash
# Formats the C++ sources (user/, include/tcpscope/*.hpp, bench/, tests/)
# with clang-format and .clang-format. With --check it changes nothing and
# fails, naming the lines, if any file is not formatted (a test runs this).
# The BPF side (bpf/, include/tcpscope/events.h) keeps the kernel's style.
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t files < <(find user include bench tests -name '*.cpp' -o -name '*.hpp' | sort)
if [[ ${1:-} == --check ]]; then
	exec clang-format --dry-run --Werror "${files[@]}"
fi
clang-format -i "${files[@]}"
