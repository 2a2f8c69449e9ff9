#!/usr/bin/env bash
# Installs everything tcpscope needs to build, run and test, from Debian's
# archive. Idempotent: packages already present are left as they are.
set -euo pipefail

packages=(
	build-essential cmake pkg-config clang llvm libclang-rt-14-dev clang-format
	libbpf-dev bpftool libelf-dev zlib1g-dev
	libcli11-dev libspdlog-dev libfmt-dev libzstd-dev
	libgtest-dev nlohmann-json3-dev libbenchmark-dev
	iproute2 nftables procps
	redis-server
)

missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
		missing+=("$p")
done
if ((${#missing[@]} == 0)); then
	exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
	echo "install-deps: missing packages: ${missing[*]}; run as root (or: sudo apt-get install ${missing[*]})" >&2
	exit 1
fi
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
