#!/usr/bin/env bash
# Cost of the TIME_WAIT sweep (iter/tcp over every tw sock) on a namespace
# holding many TIME_WAIT sockets (default 100,000).
#
#   sudo scripts/bench-tw-sweep.sh [COUNT] [DURATION_S]
#
# Creates a private network namespace, fills it with COUNT server-side
# TIME_WAIT sockets over loopback (the server closes first; 127.0.0.x source
# addresses x explicit client ports x several server ports give enough
# distinct tuples), then runs `tcpscope --json --netns ... --duration S`
# twice: with the tw timer tracepoints (the default) and with --no-tw-timers.
# For each run it prints the report's sweep figures (sweep_avg_us,
# sweep_max_us, sweep_max_sockets, sweeps), the ratio of sweep time to the
# sweep interval, and tcpscope's CPU time. TW_SWEEP_INTERVAL (seconds,
# default 1) sets --tw-sweep-interval.
#
# A TIME_WAIT lasts 60 s and cannot be made longer, so both runs must end
# within a minute of the fill: keep DURATION_S small (default 5).
set -euo pipefail
cd "$(dirname "$0")/.."

count=${1:-100000}
duration=${2:-5}
interval=${TW_SWEEP_INTERVAL:-1}

if [[ $(id -u) -ne 0 ]]; then
	echo "bench-tw-sweep: run as root (needs BPF and a network namespace)" >&2
	exit 1
fi
scripts/install-deps.sh
if [[ ! -x build/tcpscope ]]; then
	cmake -S . -B build >&2
	cmake --build build -j"$(nproc)" --target tcpscope >&2
fi
bin=${TCPSCOPE_BINARY:-$PWD/build/tcpscope}

ns=tcpscope-bench-tw-$$
work=$(mktemp -d)
cleanup() {
	ip netns del "$ns" 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT
ip netns add "$ns"
ip -n "$ns" link set lo up
in_ns() { ip netns exec "$ns" "$@"; }
in_ns sysctl -q -w net.ipv4.ip_local_port_range="1024 65535" \
	net.ipv4.tcp_max_tw_buckets=$((count * 2 + 1024)) \
	net.ipv4.tcp_tw_reuse=0 >/dev/null

# The filler: one process per CPU, each with its own 127.0.0.x addresses.
# A client binds (addr, port) explicitly, so no tuple repeats (a repeat would
# recycle a tw sock instead of adding one); the server closes first.
cat >"$work/fill.py" <<'EOF'
import os, socket, sys

count, workers = int(sys.argv[1]), int(sys.argv[2])
server_ports = [9001, 9002, 9003, 9004]
client_ports = range(10000, 60000)
listeners = []
for p in server_ports:
    l = socket.socket()
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("127.0.0.1", p))
    l.listen(4096)
    listeners.append(l)

def fill(w, n):
    made, host = 0, 2 + w  # 127.0.0.(2+w), (2+w+workers), ...
    while made < n:
        addr = "127.0.0.%d" % host
        for cp in client_ports:
            for sp, l in zip(server_ports, listeners):
                if made == n:
                    return
                c = socket.socket()
                c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                c.bind((addr, cp))
                c.connect(("127.0.0.1", sp))
                a, _ = l.accept()
                a.close()  # the server closes first: its side keeps the tw
                c.close()
                made += 1
        host += workers

pids = []
for w in range(workers):
    share = count // workers + (1 if w < count % workers else 0)
    pid = os.fork()
    if pid == 0:
        fill(w, share)
        os._exit(0)
    pids.append(pid)
rc = 0
for pid in pids:
    _, st = os.waitpid(pid, 0)
    rc |= st
sys.exit(1 if rc else 0)
EOF

tw_count() { in_ns ss -tanH state time-wait | wc -l; }

echo "filling $ns with $count TIME_WAIT sockets..." >&2
t0=$(date +%s.%N)
in_ns python3 "$work/fill.py" "$count" "$(nproc)"
t1=$(date +%s.%N)
before=$(tw_count)
printf 'fill: %d TIME_WAIT sockets in %.1f s\n' "$before" "$(python3 -c "print($t1 - $t0)")"

run() {
	local name=$1
	shift
	local out=$work/$name.json
	local TIMEFORMAT='%U %S %R'
	{ time "$bin" --json --netns "/run/netns/$ns" --duration "$duration" \
		--tw-sweep-interval "$interval" "$@" >"$out" 2>"$work/$name.err"; } 2>"$work/$name.time"
	local tw_after
	tw_after=$(tw_count)
	python3 - "$name" "$out" "$work/$name.time" "$interval" "$tw_after" <<'EOF'
import json, sys
name, out, timef, interval, tw_after = sys.argv[1:6]
report = None
for line in open(out):
    line = line.strip()
    if line.startswith('{"type":"report"'):
        report = json.loads(line)
if report is None:
    sys.exit(f"{name}: no report in {out}")
m = report["time_wait"]["end_method"]
user, sys_, real = (float(x) for x in open(timef).read().split())
interval_us = float(interval) * 1e6
print(f"{name}: method={m['method']} sweeps={m['sweeps']} "
      f"sweep_avg_us={m['sweep_avg_us']} sweep_max_us={m['sweep_max_us']} "
      f"sweep_max_sockets={m['sweep_max_sockets']} "
      f"sweep/interval avg={m['sweep_avg_us'] / interval_us:.2%} max={m['sweep_max_us'] / interval_us:.2%} "
      f"cpu user={user:.2f}s sys={sys_:.2f}s ({(user + sys_) / real:.1%} of one CPU over {real:.1f} s) "
      f"tw_open={report['time_wait']['open']} tw_after={tw_after}")
EOF
}

run timers
run sweep --no-tw-timers
