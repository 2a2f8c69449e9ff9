/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Events shared by the BPF programs (bpf/tcpscope.bpf.c) and user space.
 * This is the only definition: both sides compile this header, and the C++
 * side static_asserts the sizes below, so the two can never drift apart.
 * Fixed-width types only; no pointers, no implicit padding.
 */
#ifndef TCPSCOPE_EVENTS_H
#define TCPSCOPE_EVENTS_H

#ifdef __BPF__
/* vmlinux.h provides __u8.. __u64 */
#else
#include <linux/types.h>
#endif

#define TCPSCOPE_COMM_LEN 16
#define TCPSCOPE_ADDR_LEN 16

/* What happened. Values are part of the capture format: never renumber. */
enum tcpscope_event_type {
	TCPSCOPE_EV_STATE = 1,		/* inet_sock_set_state on a TCP socket */
	TCPSCOPE_EV_RETRANSMIT = 2,	/* tcp_retransmit_skb; aux = the skb's
					   segments << 32 | the socket's
					   total_retrans (0: unknown) */
	TCPSCOPE_EV_RESET_SENT = 3,	/* tcp_send_reset (sk may be gone) */
	TCPSCOPE_EV_RESET_RECEIVED = 4, /* tcp_receive_reset */
	/* The timer of a timewait sock (timer tracepoints, filtered on
	 * tw_timer_handler): its whole life, exactly. conn = the tw sock's
	 * cookie (that of its connection), sk = the tw sock, new_state =
	 * tw_substate, aux = when the timer fires (boot ns, 0 unknown). */
	TCPSCOPE_EV_TW_START = 5,  /* armed: the tw sock was just created, or
				      re-armed (a retransmitted FIN restarts
				      TIME_WAIT: then a TW_CANCEL precedes) */
	TCPSCOPE_EV_TW_CANCEL = 6, /* disarmed: killed (recycled by a SYN,
				      reused by connect(), an RST, netns exit)
				      unless a TW_START follows at once */
	TCPSCOPE_EV_TW_EXPIRE = 7, /* fired: TIME_WAIT is over */
	TCPSCOPE_EV_OWNER = 8,	   /* an accepted socket's first send/recv
				      came from another process than the
				      owner it was given (its listener's):
				      pid, comm = that process, owner_src =
				      TCPSCOPE_OWNER_IO; conn, tuple = the
				      socket's; old_state = new_state = its
				      state. Only without the kernel's
				      socket table (see pid below) */
	/* Records made by user space, never by BPF; kept in captures so a
	 * replay sees exactly what the live run saw. */
	TCPSCOPE_EV_LOST = 16,	/* conn = events lost since the last one;
				   aux = how many of them are runs of our
				   programs the kernel skipped (recursion),
				   the rest found the ring buffer full;
				   reason = TCPSCOPE_EV_RESET_SENT: resets
				   the kernel counted in the namespace
				   (TcpOutRsts) that never reached us
				   (aux = conn: its skipped runs) */
	TCPSCOPE_EV_END = 17,	/* end of the trace (ts_ns = stop time) */
	/* From the iter/tcp sweep of timewait socks (the state tracepoint
	 * never shows TIME_WAIT). conn is the tw sock's; the first TW_SEEN
	 * of one also has its tuple and netns, later records only conn. */
	TCPSCOPE_EV_TW_SEEN = 18, /* a tw sock first seen, or its substate
				     changed: new_state = substate (TIME_WAIT
				     or FIN_WAIT2), aux = when its timer fires
				     (boot ns, 0 unknown); sk_flags has
				     TCPSCOPE_SK_SNAPSHOT if found by the first
				     sweep (it predates the trace) */
	TCPSCOPE_EV_TW_GONE = 19, /* a tw sock seen before is gone: ts_ns =
				     the sweep that missed it, seg_len = us
				     since the sweep that last saw it, aux =
				     its timer as last seen (0 unknown),
				     new_state = last substate */
	TCPSCOPE_EV_SWEEP = 20,	  /* one sweep done: conn = tw socks seen,
				     aux = its duration in ns, seg_len = the
				     sweep interval in ms */
	TCPSCOPE_EV_CONFIG = 21,  /* host facts the analysis needs, once at
				     start: reason/seg_len = the local port
				     range (ip_local_port_range) low/high,
				     netns = the namespace it was read in,
				     aux = TCPSCOPE_CONFIG_* bits,
				     tx_queue = the CLOSE_WAIT threshold in ms
				     (--close-wait-threshold; 0 = 60 s) */
	/* CLOSE_WAIT analysis (user/holders.cpp makes them live). */
	TCPSCOPE_EV_SNAPSHOT = 22, /* a socket that existed when the trace
				     started (start-up iter/tcp pass; never a
				     timewait or request sock: those have
				     TW_SEEN or nothing). conn, netns, family,
				     tuple = the socket's; old_state =
				     new_state = its state; rx_queue/tx_queue
				     = its queues; aux = its inode (0 none);
				     reason = its uid; seg_len = ms from the
				     last ACK it received (tp->rcv_tstamp) to
				     ts_ns, saturated, 0xffffffff unknown: a
				     CLOSE_WAIT is at least that old (the
				     peer's FIN carried an ACK); sk_flags =
				     TCPSCOPE_SK_SNAPSHOT */
	TCPSCOPE_EV_TICK = 23,	   /* time passes (no payload), every 100-250
				     ms: decisions that wait on event time (a
				     CLOSE_WAIT crossing, a cancelled tw timer's
				     cause) are made without other traffic */
	TCPSCOPE_EV_PROC = 24,	   /* a process that holds a socket, as /proc
				     showed it: pid = tgid, comm, cgroup = its
				     cgroup v2 id (0 unknown), aux = its start
				     time (boot ns). Its cmdline and cgroup
				     path follow as PROC_TEXT records; sent in
				     every resolution round before the HOLDER
				     records naming it */
	TCPSCOPE_EV_PROC_TEXT = 25, /* a piece of a text of the last PROC with
				     this pid: reason = which text (enum
				     tcpscope_proc_text), seg_len = byte offset
				     of the piece, rx_queue = bytes in it
				     (<= TCPSCOPE_TEXT_CHUNK), tx_queue = the
				     whole text's length (as stored: cmdline
				     <= TCPSCOPE_CMDLINE_MAX, the cgroup path's
				     last TCPSCOPE_CGROUP_MAX bytes), tcp_flags
				     = 1 if the text was cut; the bytes are
				     in laddr, raddr, comm (48 contiguous
				     bytes from offset 68). cmdline NULs are
				     sent as spaces */
	TCPSCOPE_EV_HOLDER = 26,   /* one fd of a process holding a CLOSE_WAIT
				     socket (found by socket inode in
				     /proc/PID/fd): conn, netns, family, tuple
				     = the socket's; pid, comm = the holder
				     (pid 0: no holder found); reason = the fd
				     number; aux = the inode; rx_queue = its
				     unread bytes at the scan; new_state = its
				     state at the scan; seg_len = index of this
				     record in the socket's batch, tx_queue =
				     records in the batch (a batch replaces
				     what was known; an empty batch is one
				     record with pid 0 and tx_queue 0) */
	TCPSCOPE_EV_HOLDER_SCAN = 27, /* one holder-resolution round done
				     (after its HOLDER records): ts_ns = its
				     end, aux = ns spent reading /proc, sk =
				     ns of its iter/tcp pass, cgroup = ns of
				     its longest step, conn = fd entries read,
				     seg_len = processes read, reason =
				     sockets searched, rx_queue = sockets
				     found held, tx_queue = steps */
	TCPSCOPE_EV_VANISHED = 28, /* a connection the trace holds open was not
				     in the kernel's socket table at an audit
				     pass (iter/tcp, --audit-interval), and
				     its CLOSE never came: its last events
				     were lost (the kernel skipped our
				     programs, or the ring dropped them).
				     conn, netns, family, tuple = the
				     connection's; old_state = the last
				     state seen; aux = when it was entered
				     (boot ns) */
	TCPSCOPE_EV_SNAPSHOT_END = 29, /* the start-up snapshot is complete
				     (after its SNAPSHOT records and the
				     events read during its pass): a socket
				     first seen after this, not in it, was
				     born after it, so its first transition
				     leaves CLOSE (or LISTEN, for an accepted
				     child); one leaving another state lost
				     its first events. ts_ns = its end */
	TCPSCOPE_EV_STATS = 32,	   /* tcpscope's own overhead, once at the end
				     of a live trace (before END), so that
				     `report` of a capture prints what live
				     printed: conn = runs of our BPF programs,
				     aux = ns spent in them (bpf_prog_info
				     run_cnt/run_time_ns; both 0 unless
				     sk_flags has TCPSCOPE_STATS_BPF), sk =
				     records the ring buffer delivered, cgroup
				     = events lost, reason/seg_len = user/
				     system CPU time of tcpscope in ms,
				     rx_queue = its peak RSS in KiB, netns =
				     sockets whose owner the socket table could
				     not keep (it was full), laddr[0..8)
				     = records delivered while the BPF
				     statistics were on (they are sampled:
				     per-event costs divide by this) */
};

/* Bits of the STATS record's sk_flags. */
#define TCPSCOPE_STATS_BPF 1 /* BPF run-time statistics were on */

/* Which text a TCPSCOPE_EV_PROC_TEXT record carries. */
enum tcpscope_proc_text {
	TCPSCOPE_TEXT_CMDLINE = 1, /* /proc/PID/cmdline */
	TCPSCOPE_TEXT_CGROUP = 2,  /* cgroup v2 path (/proc/PID/cgroup "0::") */
};
#define TCPSCOPE_TEXT_CHUNK 48
#define TCPSCOPE_CMDLINE_MAX 2048
#define TCPSCOPE_CGROUP_MAX 256

/* Which sockets one iter/tcp pass reports (set in .bss before the pass). */
enum tcpscope_iter_pass {
	TCPSCOPE_ITER_TIME_WAIT = 0,  /* timewait socks: the periodic sweep */
	TCPSCOPE_ITER_ALL = 1,	      /* every socket: start-up snapshot */
	TCPSCOPE_ITER_CLOSE_WAIT = 2, /* CLOSE_WAIT sockets: holder resolution */
	TCPSCOPE_ITER_AUDIT = 3,      /* every socket but timewait socks: the
					 audit of open connections */
};

/* How the owner (pid, comm) of the connection was learnt. */
enum tcpscope_owner_source {
	TCPSCOPE_OWNER_NONE = 0,     /* not known (socket predates tcpscope) */
	TCPSCOPE_OWNER_SYSCALL = 1,  /* a transition only a syscall makes:
					connect, listen, close, shutdown */
	TCPSCOPE_OWNER_LISTENER = 2, /* accepted child: the listener's owner */
	TCPSCOPE_OWNER_IO = 3,	     /* first send/recv on the socket */
};

/* Bits of the CONFIG record's aux. */
#define TCPSCOPE_CONFIG_TW_TIMERS 1ULL /* TW_START/CANCEL/EXPIRE are traced */
#define TCPSCOPE_CONFIG_TW_SWEEP 2ULL  /* TW_SEEN/GONE sweeps run */
#define TCPSCOPE_CONFIG_HOLDERS 4ULL   /* CLOSE_WAIT holders are resolved
					  (HOLDER records will come) */
#define TCPSCOPE_CONFIG_SNAPSHOT 8ULL  /* SNAPSHOT records of the sockets
					  that predate the trace follow */

/* Bits of tcpscope_event.sk_flags. */
enum tcpscope_sk_flags {
	/* Bit 0 is no "still hashed": the state tracepoint fires in
	 * inet_sk_state_store(), after tcp_set_state() unhashed the socket,
	 * so that cannot tell a timewait sock from a bucket overflow (the tw
	 * timer records, TW_START, do). It serves TW_CANCEL only: */
	TCPSCOPE_SK_NETNS_EXIT = 1 << 0,    /* TW_CANCEL: the namespace was being
					       dismantled (inet_twsk_purge) */
	TCPSCOPE_SK_RCV_SHUTDOWN = 1 << 1,  /* peer's FIN was received */
	TCPSCOPE_SK_SEND_SHUTDOWN = 1 << 2, /* our FIN was queued */
	TCPSCOPE_SK_NO_SOCKET = 1 << 3,	    /* reset with no socket (sk NULL):
					       tuple comes from the segment */
	TCPSCOPE_SK_TIMEWAIT = 1 << 4,	    /* event on a timewait sock */
	TCPSCOPE_SK_NEW = 1 << 5,	    /* first event of this socket seen
					       by the tracer (set only with
					       the kernel's socket table) */
	TCPSCOPE_SK_SNAPSHOT = 1 << 6,	    /* found by the start-up sweep */
	TCPSCOPE_SK_LISTENER = 1 << 7,	    /* reset sent by a listener for a
					       segment no connection matched:
					       the tuple is the segment's */
};

/* TCP header flag bits as in the wire format (tcp_flags below). */
#define TCPSCOPE_TCP_FIN 0x01
#define TCPSCOPE_TCP_SYN 0x02
#define TCPSCOPE_TCP_RST 0x04
#define TCPSCOPE_TCP_PSH 0x08
#define TCPSCOPE_TCP_ACK 0x10

/* Index of the drop counters in the per-CPU "drops" map. */
enum tcpscope_drop_kind {
	TCPSCOPE_DROP_RINGBUF = 0, /* bpf_ringbuf_reserve failed: event lost */
	TCPSCOPE_DROP_SOCKMAP = 1, /* socket table full: owner not kept */
	TCPSCOPE_NESTED_STATE = 2, /* not a drop: state events made by the
				      nested twin because the kernel skipped
				      the main program (its recursion misses
				      less these were lost) */
	TCPSCOPE_DROP_RESET_RINGBUF = 3, /* not a drop of its own: the
					    RESET_SENT records among
					    TCPSCOPE_DROP_RINGBUF (user space
					    compares resets seen with the
					    kernel's count) */
	TCPSCOPE_DROP_MAX = 4,
};

/* Tracepoints whose main program has a nested twin (key of "nest"). */
enum tcpscope_nest_site {
	TCPSCOPE_NEST_SET_STATE = 0, /* inet_sock_set_state */
	TCPSCOPE_NEST_DESTROY = 1,   /* tcp_destroy_sock */
	TCPSCOPE_NEST_MAX = 2,
};

/* One kernel event. 128 bytes, 8-byte aligned. */
struct tcpscope_event {
	__u64 ts_ns;   /* CLOCK_BOOTTIME of the event, ns */
	__u64 conn;    /* connection id: the kernel socket cookie (shared by
			  the socket and its timewait sock); 0 if unknown */
	__u64 sk;      /* kernel socket address, only to pair events of one
			  socket when conn is 0; never shown to users */
	__u64 cgroup;  /* cgroup v2 id of the socket, 0 if unknown */
	__u32 netns;   /* network namespace inode */
	__u32 pid;     /* owner process (tgid), 0 if unknown. With the kernel's
			  socket table (--pid, fallback flavours) every event
			  carries the owner known so far; without it only the
			  events that learn it (a system call's transition,
			  an accepted child's first, OWNER), and user space
			  keeps it for the connection */
	__u32 reason;  /* RESET_SENT: enum sk_rst_reason (kernel >= 6.10, else
			  0); RETRANSMIT: err of the transmit (kernel >= 6.13) */
	__u32 seg_len; /* RESET_SENT: payload bytes of the segment that drew the
			  reset; RETRANSMIT: bytes retransmitted */
	__u32 rx_queue; /* bytes received but not read by the application */
	__u32 tx_queue; /* bytes written but not yet acknowledged */
	__u16 lport;   /* local port, host order */
	__u16 rport;   /* remote port, host order */
	__u8 type;     /* enum tcpscope_event_type */
	__u8 family;   /* 4 or 6 (v4-mapped IPv6 is reported as 4) */
	__u8 old_state; /* TCP state before (kernel numbering, TCP_ESTABLISHED=1
			   ... TCP_NEW_SYN_RECV=12); STATE only, else state at
			   the event */
	__u8 new_state; /* TCP state after; STATE only */
	__u8 tcp_flags; /* RESET_SENT: flags of the provoking segment;
			   RETRANSMIT: flags of the retransmitted segment */
	__u8 owner_src; /* enum tcpscope_owner_source */
	__u8 sk_flags;	/* enum tcpscope_sk_flags */
	__u8 _pad0;	/* zero */
	__u8 laddr[TCPSCOPE_ADDR_LEN]; /* local address; IPv4 in the first 4 */
	__u8 raddr[TCPSCOPE_ADDR_LEN]; /* remote address; IPv4 in the first 4 */
	char comm[TCPSCOPE_COMM_LEN];  /* owner's command name */
	__u32 _pad1;		       /* zero */
	__u64 aux;     /* per type, see enum tcpscope_event_type; else 0 */
};

#define TCPSCOPE_EVENT_SIZE 128

/* One socket as the iter/tcp program reports it (read from the iterator's
 * seq file, never through the ring buffer). */
struct tcpscope_sock_record {
	__u64 conn;	  /* socket cookie */
	__u64 expires_ns; /* TIME_WAIT: boot ns when the tw timer fires;
			     0 if unknown (CONFIG_HZ not readable) */
	__u64 ino;	  /* socket inode (full sockets with a file), else 0 */
	__u64 ts_ns;	  /* boot ns when the record was made */
	__u32 netns;	  /* network namespace inode */
	__u32 rx_queue;	  /* bytes received, unread (full sockets) */
	__u32 tx_queue;	  /* bytes unacknowledged (full sockets) */
	__u32 uid;	  /* socket owner uid (full sockets) */
	__u16 lport;	  /* host order */
	__u16 rport;
	__u8 family;	  /* 4 or 6 */
	__u8 state;	  /* TCP state (TIME_WAIT for tw socks); 0: a progress
			     record, no socket (read_sockets drops it) */
	__u8 substate;	  /* tw_substate for tw socks, else state */
	__u8 _pad;
	__u8 laddr[TCPSCOPE_ADDR_LEN];
	__u8 raddr[TCPSCOPE_ADDR_LEN];
	__u64 last_ack_ns; /* full sockets: boot ns of the last ACK received
			      (tp->rcv_tstamp, jiffies), 0 if unknown */
};

#define TCPSCOPE_SOCK_RECORD_SIZE 96

#endif /* TCPSCOPE_EVENTS_H */
