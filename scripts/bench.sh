#!/usr/bin/env bash
# Overhead benchmark: connection churn on loopback in a fresh private network
# namespace per run (bench/churn: 4 client threads connect and close as fast
# as they can, the server closes first), with no tracer, with tcpscope in each
# mode, and with libbpf-tools tcpstates/tcplife when available. Runs alternate
# (round 1: every mode, round 2: every mode, ...) so drift on a noisy host
# hits every mode alike; the figures that count are the ratios to "none"
# measured in one invocation. Then the memory scenario: tcpscope's RSS while
# it tracks HOLD open loopback connections (2 x HOLD established sockets,
# both ends are in the netns) plus TW TIME_WAITs.
#
#   scripts/bench.sh                   # 5 rounds x every mode x 10 s
#   ROUNDS=3 SECS=5 scripts/bench.sh
#   MODES="none tcpscope-json" scripts/bench.sh
#   MEMORY=0 scripts/bench.sh          # skip the memory scenario
#
# Environment: ROUNDS (5), SECS (10), CLIENTS (4), SERVERS (2), WARMUP (2 s
# for a tracer to attach), MODES (all below), MEMORY (1), HOLD (50000: 100,000
# established sockets, as ss counts them), TW
# (100000), OUT (a scratch directory), INSTALL_TOOLS (1: apt-get install
# libbpf-tools if missing, tolerating failure).
#
# Modes: none; tcpscope-table, tcpscope-json, tcpscope-record (--netns
# filtered in the kernel); tcpscope-table-all, tcpscope-json-all (no filter:
# every socket on the host); tcpstates, tcplife (libbpf-tools; they have no
# netns filter, so they run unfiltered, as an operator would run them).
# Output goes to /dev/null, captures to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

ROUNDS=${ROUNDS:-5}
SECS=${SECS:-10}
CLIENTS=${CLIENTS:-4}
SERVERS=${SERVERS:-2}
WARMUP=${WARMUP:-2}
MEMORY=${MEMORY:-1}
HOLD=${HOLD:-50000}
TW=${TW:-100000}
INSTALL_TOOLS=${INSTALL_TOOLS:-1}
MODES=${MODES:-"none tcpscope-table tcpscope-json tcpscope-record tcpscope-table-all tcpscope-json-all tcpstates tcplife"}

if [[ $(id -u) -ne 0 ]]; then
	echo "bench: needs root (network namespaces, BPF)" >&2
	exit 1
fi
scripts/install-deps.sh
if [[ $INSTALL_TOOLS == 1 ]] && ! command -v tcpstates >/dev/null && [[ ! -x /usr/sbin/tcpstates ]]; then
	echo "bench: installing libbpf-tools (comparison only)" >&2
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libbpf-tools \
		>/dev/null 2>&1 || echo "bench: libbpf-tools not available; skipping tcpstates/tcplife" >&2
fi
cmake -S . -B build -DCMAKE_BUILD_TYPE="${BUILD_TYPE:-RelWithDebInfo}" >/dev/null
cmake --build build -j"$(nproc)" --target tcpscope churn >/dev/null
tcpscope=$root/build/tcpscope
churn=$root/build/bench/churn
tool() { command -v "$1" 2>/dev/null || { [[ -x /usr/sbin/$1 ]] && echo "/usr/sbin/$1"; } || true; }
tcpstates=$(tool tcpstates)
tcplife=$(tool tcplife)
has_record=0
"$tcpscope" record --help >/dev/null 2>&1 && has_record=1

OUT=${OUT:-$(mktemp -d /tmp/tcpscope-bench.XXXXXX)}
mkdir -p "$OUT"
results=$OUT/results.tsv
: >"$results"
ns=tcpscope-bench-$$
cleanup() {
	[[ -n ${tracer_pid:-} ]] && kill -INT "$tracer_pid" 2>/dev/null && wait "$tracer_pid" 2>/dev/null
	ip netns del "$ns" 2>/dev/null || true
}
trap cleanup EXIT

make_netns() {
	ip netns del "$ns" 2>/dev/null || true
	ip netns add "$ns"
	ip -n "$ns" link set lo up
	# The workload's own limits: the whole port range, and connect() may
	# reuse a port whose TIME_WAIT (here the server's) is on the tuple.
	ip netns exec "$ns" sysctl -q -w net.ipv4.ip_local_port_range="1024 65535" \
		net.ipv4.tcp_tw_reuse=1 net.ipv4.tcp_max_tw_buckets="${1:-131072}"
}

available() {
	case $1 in
	none | tcpscope-table | tcpscope-json | tcpscope-table-all | tcpscope-json-all) return 0 ;;
	tcpscope-record) [[ $has_record == 1 ]] ;;
	tcpstates) [[ -n $tcpstates ]] ;;
	tcplife) [[ -n $tcplife ]] ;;
	*) echo "bench: unknown mode $1" >&2; exit 2 ;;
	esac
}

# Starts the tracer of a mode in the background (tracer_pid), stats on
# $OUT/stats.
start_tracer() {
	local mode=$1
	tracer_pid=
	local filt=(--netns "/run/netns/$ns")
	case $mode in
	none) return ;;
	tcpscope-table) "$tcpscope" "${filt[@]}" --stats >/dev/null 2>"$OUT/stats" & ;;
	tcpscope-json) "$tcpscope" --json "${filt[@]}" --stats >/dev/null 2>"$OUT/stats" & ;;
	tcpscope-record)
		rm -f "$OUT/capture"*
		"$tcpscope" record -o "$OUT/capture" "${filt[@]}" --stats >/dev/null 2>"$OUT/stats" &
		;;
	tcpscope-table-all) "$tcpscope" --stats >/dev/null 2>"$OUT/stats" & ;;
	tcpscope-json-all) "$tcpscope" --json --stats >/dev/null 2>"$OUT/stats" & ;;
	tcpstates) "$tcpstates" >/dev/null 2>"$OUT/stats" & ;;
	tcplife) "$tcplife" >/dev/null 2>"$OUT/stats" & ;;
	esac
	tracer_pid=$!
	sleep "$WARMUP"
	if ! kill -0 "$tracer_pid" 2>/dev/null; then
		echo "bench: $mode exited early:" >&2
		cat "$OUT/stats" >&2
		exit 1
	fi
}

# The tracer's CPU time so far (user+sys), in clock ticks.
tracer_ticks() {
	sed 's/.*) //' "/proc/$tracer_pid/stat" | awk '{print $12 + $13}'
}

# Stops it; sets st="cpu_s rss_kib lost bpf_ns_per_event ring_peak_fill_pct
# ring_late_wakeups"
# (not in a subshell: wait needs the tracer to be our child).
stop_tracer() {
	st="- - - - - -"
	[[ -z $tracer_pid ]] && return
	local hwm ticks
	ticks=$(tracer_ticks)
	hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$tracer_pid/status")
	kill -INT "$tracer_pid"
	wait "$tracer_pid" || true
	tracer_pid=
	local cpu lost bpf fill sampled late
	cpu=$(awk -v t="$ticks" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.2f", t / hz}')
	lost=$(sed -n 's/.* lost \([0-9]*\).*/\1/p' "$OUT/stats" | tail -1)
	bpf=$(sed -n 's/.* bpf_ns_per_event \([0-9.]*\).*/\1/p' "$OUT/stats" | tail -1)
	# No event in a statistics window (1 s in every 5): no figure, not 0.
	sampled=$(sed -n 's/.* bpf_sampled_events \([0-9]*\).*/\1/p' "$OUT/stats" | tail -1)
	[[ ${sampled:-0} == 0 ]] && bpf=-
	fill=$(sed -n 's/.* ring_peak_fill_pct \([0-9.]*\).*/\1/p' "$OUT/stats" | tail -1)
	late=$(sed -n 's/.* ring_late_wakeups \([0-9]*\).*/\1/p' "$OUT/stats" | tail -1)
	st="$cpu $hwm ${lost:--} ${bpf:--} ${fill:--} ${late:--}"
}

run_one() {
	local mode=$1 round=$2
	make_netns
	start_tracer "$mode"
	local line rate conns t0 t1 per_conn=-
	[[ -n $tracer_pid ]] && t0=$(tracer_ticks)
	line=$(ip netns exec "$ns" "$churn" --seconds "$SECS" --clients "$CLIENTS" --servers "$SERVERS")
	rate=$(echo "$line" | awk '{print $6}')
	conns=$(echo "$line" | awk '{print $2}')
	# What the tracer spent while the churn ran (not its start-up), per
	# connection: steadier than the throughput on a noisy host.
	if [[ -n $tracer_pid ]]; then
		t1=$(tracer_ticks)
		per_conn=$(awk -v d=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v n="$conns" \
			'BEGIN {printf "%.2f", (n > 0 ? d / hz / n * 1e6 : 0)}')
	fi
	local unanswered
	unanswered=$(echo "$line" | awk '{print $10}')
	if [[ -n $unanswered && $unanswered != 0 ]]; then
		echo "round $round $mode: churn gave up on $unanswered connection(s) the server never answered (its unanswered count)" \
			>>"$OUT/workload"
	fi
	stop_tracer
	printf '%s\t%s\t%s\t%s\t%s\n' "$round" "$mode" "$rate" "${st// /$'\t'}" "$per_conn" >>"$results"
	# What tcpscope said of events it lost (how full its ring got, and
	# after how long unread; which programs' runs the kernel skipped).
	local lost_now
	lost_now=$(echo "$st" | awk '{print $3}')
	if [[ $lost_now != - && $lost_now != 0 ]]; then
		grep -h 'warning' "$OUT/stats" | sed "s/^/round $round $mode: /" >>"$OUT/warnings" || true
	fi
	printf 'round %s %-20s %8s conn/s  cpu_s/rss_kib/lost/bpf_ns/ring%%/late_wk/cpu_us_per_conn %s %s\n' \
		"$round" "$mode" "$rate" "$st" "$per_conn" >&2
	ip netns del "$ns"
}

modes=()
for m in $MODES; do available "$m" && modes+=("$m") || echo "bench: $m not available, skipped" >&2; done
echo "bench: ${#modes[@]} modes x $ROUNDS rounds x ${SECS}s; results in $results" >&2
for ((r = 1; r <= ROUNDS; ++r)); do
	for m in "${modes[@]}"; do run_one "$m" "$r"; done
done

echo
echo "Connection churn, $CLIENTS clients, ${SECS}s x $ROUNDS rounds, $(nproc) CPUs, $(uname -r)"
awk -F'\t' '
	function median(arr, n,   i, j, t) {
		for (i = 1; i <= n; ++i) for (j = i + 1; j <= n; ++j)
			if (arr[j] < arr[i]) { t = arr[i]; arr[i] = arr[j]; arr[j] = t }
		return n % 2 ? arr[(n + 1) / 2] : (arr[n / 2] + arr[n / 2 + 1]) / 2
	}
	{ rate[$2, ++n[$2]] = $3; base[$1] = ($2 == "none") ? $3 : base[$1]
	  round[$2, n[$2]] = $1; cpu[$2, n[$2]] = $4; rss[$2, n[$2]] = $5
	  if ($6 != "-") lost[$2] += $6; else lost[$2] = lost[$2] ""
	  bpf[$2, n[$2]] = $7; if ($8 != "-" && (!(($2) in fill) || $8 > fill[$2])) fill[$2] = $8
	  if ($9 != "-") late[$2] += $9
	  pc[$2, n[$2]] = $10
	  if (!($2 in seen)) { seen[$2] = 1; order[++m] = $2 } }
	END {
		for (i = 1; i <= m; ++i) for (k = 1; k <= n[order[i]]; ++k) if (order[i] == "none") b[++nb] = rate["none", k]
		bm = nb ? median(b, nb) : 0
		printf "%-20s %10s %8s %10s %10s %8s %9s %12s %8s %12s %7s %7s\n", "mode", "conn/s", "ratio", "ratio/rnd", "rnd_range", "lost", "cpu_s", "cpu_us/conn", "rss_MiB", "bpf_ns/ev", "ring%", "late_wk"
		for (i = 1; i <= m; ++i) {
			mo = order[i]; c = n[mo]
			delete r; delete q; delete cp; delete rs; delete bp; delete pcs; nq = 0; nbp = 0
			for (k = 1; k <= c; ++k) {
				r[k] = rate[mo, k]; cp[k] = cpu[mo, k]; rs[k] = rss[mo, k]; pcs[k] = pc[mo, k]
				if (base[round[mo, k]] > 0) q[++nq] = rate[mo, k] / base[round[mo, k]]
				if (bpf[mo, k] != "-") bp[++nbp] = bpf[mo, k]
			}
			med = median(r, c)
			# median() sorts: q[1] and q[nq] are the lowest and highest.
			qm = nq ? sprintf("%.3f", median(q, nq)) : "-"
			printf "%-20s %10.0f %8s %10s %10s %8s %9s %12s %8s %12s %7s %7s\n", mo, med,
				bm ? sprintf("%.3f", med / bm) : "-", qm,
				nq ? sprintf("%.2f-%.2f", q[1], q[nq]) : "-",
				lost[mo] == "" ? "-" : lost[mo], cp[1] == "-" ? "-" : sprintf("%.2f", median(cp, c)),
				pcs[1] == "-" ? "-" : sprintf("%.2f", median(pcs, c)),
				rs[1] == "-" ? "-" : sprintf("%.1f", median(rs, c) / 1024),
				nbp ? sprintf("%.0f", median(bp, nbp)) : "-", (mo in fill) ? fill[mo] : "-",
				(mo in late) ? late[mo] : "-"
		}
	}' "$results"
echo "ratio: median conn/s over the median with no tracer; ratio/rnd: median of each"
echo "run over the no-tracer run of its round (rnd_range: the lowest and highest of"
echo "those); lost: events tcpscope lost, all runs;"
echo "cpu_s: the tracer's CPU time (user+sys) per run; cpu_us/conn: what it spent"
echo "while the churn ran, per connection made; rss: its peak RSS;"
echo "bpf_ns/ev: tcpscope's BPF run time per event delivered (kernel.bpf_stats);"
echo "ring%: the fullest tcpscope found its ring buffer, all runs (100: records lost);"
echo "late_wk: its waits in which more than two wake-up batches came in, all runs."
if [[ -s $OUT/warnings ]]; then
	echo "What tcpscope said of the events it lost:"
	cat "$OUT/warnings"
fi
if [[ -s $OUT/workload ]]; then
	echo "The workload:"
	cat "$OUT/workload"
fi

if [[ $MEMORY == 1 ]]; then
	echo
	echo "Memory: tcpscope --json --netns while $HOLD loopback connections ($((HOLD * 2)) sockets) are open and $TW in TIME_WAIT"
	make_netns $((TW * 2))
	"$tcpscope" --json --netns "/run/netns/$ns" --stats >/dev/null 2>"$OUT/stats" &
	tracer_pid=$!
	sleep "$WARMUP"
	ip netns exec "$ns" "$churn" --hold "$HOLD" --time-wait "$TW" --seconds 6 >"$OUT/hold" &
	churn_pid=$!
	until grep -q holding "$OUT/hold" 2>/dev/null; do
		kill -0 "$churn_pid" 2>/dev/null || { echo "bench: churn --hold failed" >&2; exit 1; }
		sleep 0.5
	done
	sleep 3 # a TIME_WAIT sweep and the close grace have passed
	socks=$(ip netns exec "$ns" ss -tanH | awk '{s[$1]++} END {for (k in s) printf "%s %d  ", k, s[k]}')
	rss=$(awk '/^VmRSS/ {print $2}' "/proc/$tracer_pid/status")
	hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$tracer_pid/status")
	wait "$churn_pid"
	sleep 2 # the held connections close: 100,000 closings, 50,000 more TIME_WAITs
	hwm_after=$(awk '/^VmHWM/ {print $2}' "/proc/$tracer_pid/status")
	kill -INT "$tracer_pid"
	wait "$tracer_pid" || true
	tracer_pid=
	echo "  sockets in the namespace: $socks"
	awk -v r="$rss" -v h="$hwm" -v a="$hwm_after" 'BEGIN {
		printf "  tcpscope RSS while holding: %.1f MiB, peak so far: %.1f MiB (limit 64 MiB)\n", r / 1024, h / 1024
		printf "  peak once the held connections closed too: %.1f MiB\n", a / 1024 }'
	grep -h 'stats:' "$OUT/stats" | sed 's/^/  /' || true
fi
