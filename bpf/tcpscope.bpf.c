// SPDX-License-Identifier: GPL-2.0
/*
 * tcpscope kernel side: TCP state transitions, retransmits and resets.
 *
 * Every tracepoint has one shared handler (the *__handle functions) and three
 * thin entry points, one per attach flavour: tp_btf, raw_tp and the classic
 * tracepoint. User space probes which flavour the running kernel supports and
 * turns autoload off for the others before load, so a single object serves
 * every kernel (CO-RE) and no flavour is chosen at build time.
 */
#include "vmlinux.h"
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

#include "tcpscope/events.h"

char LICENSE[] SEC("license") = "GPL";

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define RCV_SHUTDOWN 1
#define SEND_SHUTDOWN 2
#define PF_KTHREAD 0x00200000

/* Reads one field of a kernel object. Through a BTF-typed pointer (tp_btf
 * and iterator arguments) it is a plain load, checked by the verifier and
 * relocated by CO-RE; through an untyped one (raw_tp, classic tracepoints)
 * it takes bpf_probe_read_kernel(). `btf` is a constant in every entry
 * point, so each program keeps only its own branch: the helper calls were
 * most of the handlers' cost. */
#define KREAD(btf, ptr, field) ((btf) ? (ptr)->field : BPF_CORE_READ(ptr, field))

/* Configuration: written by user space between open and load. */
const volatile __u32 cfg_netns = 0;	   /* netns inode, 0 = any */
const volatile __u64 cfg_cgroup = 0;	   /* cgroup v2 id, 0 = any */
const volatile __s32 cfg_cgroup_level = 0; /* depth of cfg_cgroup */
const volatile __u32 cfg_pid = 0;	   /* owner tgid, 0 = any */
const volatile __u16 cfg_port = 0;	   /* either side, 0 = any */
const volatile __u16 cfg_lport = 0;
const volatile __u16 cfg_rport = 0;
const volatile __u8 cfg_family = 0; /* 4, 6 or 0 = both */
/* Wake the consumer once per this many records emitted on a CPU; 0 = every
 * record. User space sets it from the ring size and the CPU count so that
 * all CPUs together stay well below the ring's capacity; the consumer also
 * drains on a short poll timeout, so latency stays bounded. */
const volatile __u32 cfg_wakeup_every = 0;
/* The tracepoint programs are not the BTF-typed ones: they may give a
 * socket without a cookie a private id (conn__new_id), which iter/tcp must
 * then report too (iter__conn_id). */
const volatile bool cfg_private_ids = false;
/* Keep the "socks" table of live sockets (id and owner per socket). Needed
 * only for private ids and for --pid, which must know the owner of a
 * softirq transition in the kernel. Without it each event carries the
 * cookie and, from a system call, the caller: user space keeps the owner
 * per connection. The table cost a lookup per event and an insert and a
 * delete per socket: the state handler took 534 ns a run with it, 417
 * without (churn, BPF statistics on), and tcp_destroy_sock is not needed. */
const volatile bool cfg_sock_table = true;
/* The send/recv programs are attached (owner refined on first I/O). */
const volatile bool cfg_io_owner = false;

/* What the kernel side remembers of a socket while it lives. */
struct sock_info {
	__u64 conn;	  /* id reported as tcpscope_event.conn */
	__u32 pid;	  /* owner tgid */
	__u8 owner_src;	  /* enum tcpscope_owner_source */
	__u8 _pad[3];
	char comm[TCPSCOPE_COMM_LEN]; /* owner comm */
};

struct listener_key {
	__u32 netns;
	__u16 port;
	__u16 _pad;
};

struct owner {
	__u32 pid;
	__u32 _pad;
	char comm[TCPSCOPE_COMM_LEN];
};

/* Live sockets by kernel address; entries go at tcp_destroy_sock, which
 * every TCP socket passes. A plain preallocated hash: an LRU one cost a
 * list update under a lock on every new socket (the largest part of the
 * state handler under churn). When full, new sockets are counted in
 * drops[TCPSCOPE_DROP_SOCKMAP] and traced without a remembered owner;
 * max_entries is set by user space (--max-sockets). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, __u64);
	__type(value, struct sock_info);
} socks SEC(".maps");

/* A connection's tuple, as a map key (zeroed, then filled: no padding left
 * unset). */
struct tuple_key {
	__u32 netns;
	__u16 lport;
	__u16 rport;
	__u8 family;
	__u8 _pad[7];
	__u8 laddr[TCPSCOPE_ADDR_LEN];
	__u8 raddr[TCPSCOPE_ADDR_LEN];
};

/* With private ids (cfg_private_ids): the id of a connection whose socket
 * became a timewait sock without a cookie, by tuple. The tw sock inherits
 * the cookie (none here), so the sweep would have no name for it; written
 * at FIN_WAIT2/CLOSING -> CLOSE (tcp_time_wait() hashed the tw sock just
 * before). A later connection on the tuple overwrites it; LRU bounds it. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct tuple_key);
	__type(value, __u64);
} tw_ids SEC(".maps");

/* Without the socket table: accepted sockets whose owner their first
 * send/recv may refine (the listener's owner may not be the process that
 * accepted, e.g. a pre-forked worker). Written when the child is made,
 * removed by its first send/recv; sockets that never do I/O are evicted
 * (LRU, per-CPU lists: no shared lock on insert). The cookie tells a
 * later socket at the same address from the one an entry was made for. */
struct io_wait {
	__u64 conn; /* the socket's cookie */
	__u32 pid;  /* the owner it was given (the listener's), 0 none */
	__u32 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(map_flags, BPF_F_NO_COMMON_LRU);
	__uint(max_entries, 65536); /* --max-sockets sets it */
	__type(key, __u64);
	__type(value, struct io_wait);
} io_wanted SEC(".maps");

/* Owners of listening sockets, inherited by the children they accept: the
 * handshake completes in softirq, where "current" is unrelated. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct listener_key);
	__type(value, struct owner);
} listeners SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 << 20); /* --ring-size sets it */
} events SEC(".maps");

/* Under --pid/--cgroup the tw timers cannot be matched by owner (a tw sock
 * has none): the cookies of matching connections that may enter TIME_WAIT
 * are kept here for them. Unused without those filters. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u8);
} tw_allowed SEC(".maps");

/* enum tcpscope_drop_kind -> count, per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TCPSCOPE_DROP_MAX);
	__type(key, __u32);
	__type(value, __u64);
} drops SEC(".maps");

/* Records emitted on each CPU since it last woke the consumer. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} since_wakeup SEC(".maps");

/* The kernel does not re-enter a program on a CPU where it is already
 * running: when the tracepoint fires again in an interrupt (a softirq
 * receiving a packet while set_state runs in a syscall, or one that
 * interrupts the kernel's own entry into or exit from it) it skips the run
 * and counts a recursion miss. Each such site has a twin program, attached
 * after the main one, that the tracepoint calls next for the same firing:
 * the twin does the work if the main program did not run for it. */
#define NEST_DEPTH 8
/* An entry this old (in jiffies) is no firing in progress: its twin was
 * skipped. 4 jiffies are 4-40 ms, far beyond an interrupt's nesting. */
#define NEST_STALE_JIFFIES 4

/* One firing: the socket and, for set_state, the transition. */
struct nest_hit {
	__u64 sk;
	__u32 states;  /* old << 8 | new */
	__u32 jiffies; /* when the main program pushed it (low 32 bits) */
};

/* Per CPU and enum tcpscope_nest_site. */
struct nest_state {
	/* 1 while the main program runs: a twin that finds it set runs
	 * nested inside it, so the kernel skipped the main program. */
	__u32 busy;
	/* 1 while the twin runs: the kernel will skip a nested twin, so a
	 * nested main program pushes nothing for it. */
	__u32 twin_busy;
	/* The firings the main program ran for whose twin has not come yet,
	 * innermost last: this covers the kernel's entry into and exit from
	 * the main program, where busy is not set. Interrupts nest, so a
	 * twin's firing is the last entry or lies below entries left by
	 * nested runs whose own twin the kernel skipped where twin_busy was
	 * not set (its entry and exit): those are dropped with it, or by age. */
	__u32 depth;
	__u32 _pad;
	struct nest_hit hit[NEST_DEPTH];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TCPSCOPE_NEST_MAX);
	__type(key, __u32);
	__type(value, struct nest_state);
} nest SEC(".maps");

/* Sequence for connection ids where the cookie helper is not available. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} id_seq SEC(".maps");

/* Kernels before 5.15 kept the cgroup inside a union with a u64 "val". */
struct sock_cgroup_data___old {
	__u64 val;
};

/* A namespace's reference count: ns_common.__ns_ref since 6.18 (renamed
 * from ns_common.count, where 5.13 moved it with "net: Use ns_common's
 * count"). Neither name needs to be in the vmlinux.h built against. */
struct ns_common___ref {
	refcount_t __ns_ref;
} __attribute__((preserve_access_index));
struct ns_common___count {
	refcount_t count;
} __attribute__((preserve_access_index));

/* Kernels before 6.2 ("cgroup: Use cgroup_attach_{lock,unlock}()...")
 * stored ancestor ids rather than pointers. */
struct cgroup___old {
	int level;
	__u64 ancestor_ids[];
};

static __always_inline void drops__inc(__u32 kind)
{
	__u64 *count = bpf_map_lookup_elem(&drops, &kind);

	if (count)
		*count += 1;
}

static __always_inline bool nest__is_fresh(const struct nest_hit *hit, __u32 now)
{
	return now - hit->jiffies <= NEST_STALE_JIFFIES;
}

/* Full: keeps the fresh entries (a firing in progress below ours), drops
 * the others (skipped twins'). Returns the new depth. */
static __always_inline __u32 nest__compact(struct nest_state *ns, __u32 now)
{
	__u32 kept = 0;

	for (int i = 0; i < NEST_DEPTH; i++) {
		if (!nest__is_fresh(&ns->hit[i], now))
			continue;
		ns->hit[kept & (NEST_DEPTH - 1)] = ns->hit[i];
		kept++;
	}
	return kept < NEST_DEPTH ? kept : 0;
}

/* The main program of a site runs for this firing. Returns the busy flag to
 * clear when it ends. */
static __always_inline __u32 *nest__enter(__u32 site, const struct sock *sk,
					  __u32 states)
{
	struct nest_state *ns = bpf_map_lookup_elem(&nest, &site);
	__u32 d, now;

	if (!ns)
		return NULL;
	ns->busy = 1;
	if (ns->twin_busy)
		return &ns->busy;
	now = (__u32)bpf_jiffies64();
	d = ns->depth;
	if (d >= NEST_DEPTH)
		d = nest__compact(ns, now);
	/* Depth first: a run nesting in between pushes above this slot. */
	ns->depth = d + 1;
	barrier();
	ns->hit[d & (NEST_DEPTH - 1)].sk = (__u64)sk;
	ns->hit[d & (NEST_DEPTH - 1)].states = states;
	ns->hit[d & (NEST_DEPTH - 1)].jiffies = now;
	return &ns->busy;
}

static __always_inline void nest__leave(__u32 *busy)
{
	if (busy)
		*busy = 0;
}

/* In a twin: NULL if the main program ran for this firing, else the twin's
 * busy flag, set, to clear (nest__leave) once it has done the work. */
static __always_inline __u32 *nest__twin_enter(__u32 site,
					       const struct sock *sk,
					       __u32 states)
{
	struct nest_state *ns = bpf_map_lookup_elem(&nest, &site);
	__u32 d, now;

	if (!ns)
		return NULL;
	ns->twin_busy = 1;
	if (ns->busy)
		return &ns->twin_busy;
	now = (__u32)bpf_jiffies64();
	d = ns->depth;
	for (int i = NEST_DEPTH - 1; i >= 0; i--) {
		if ((__u32)i >= d)
			continue;
		if (ns->hit[i].sk == (__u64)sk && ns->hit[i].states == states &&
		    nest__is_fresh(&ns->hit[i], now)) {
			ns->depth = i;
			ns->twin_busy = 0;
			return NULL;
		}
	}
	return &ns->twin_busy;
}

static __always_inline bool addr__is_v4_mapped(const __u8 *a)
{
	const __u32 *w = (const __u32 *)a;

	return w[0] == 0 && w[1] == 0 && w[2] == bpf_htonl(0x0000ffff);
}

static __always_inline void addr__unmap_v4(__u8 *a)
{
	__u32 *w = (__u32 *)a;

	w[0] = w[3];
	w[1] = w[2] = w[3] = 0;
}

/* Fills family, ports, addresses and netns from a socket (full, timewait
 * or request sock: all start with sock_common). */
static __always_inline void sock__read_tuple(const struct sock *sk,
					     struct tcpscope_event *e, bool btf)
{
	__u16 family = KREAD(btf, sk, __sk_common.skc_family);

	e->lport = KREAD(btf, sk, __sk_common.skc_num);
	if (!e->lport) {
		/* Closing releases the port binding (inet_num = 0) before
		 * the CLOSE transition is reported; inet_sport keeps it. Only
		 * full sockets have it: tw and request socks keep skc_num.
		 * (Outside struct sock: always a probe read.) */
		__u8 state = KREAD(btf, sk, __sk_common.skc_state);

		if (state != TCP_TIME_WAIT && state != TCP_NEW_SYN_RECV)
			e->lport = bpf_ntohs(BPF_CORE_READ(
				(const struct inet_sock *)sk, inet_sport));
	}
	e->rport = bpf_ntohs(KREAD(btf, sk, __sk_common.skc_dport));
	e->netns = btf ? sk->__sk_common.skc_net.net->ns.inum
		       : BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
	if (family == AF_INET) {
		__u32 laddr = KREAD(btf, sk, __sk_common.skc_rcv_saddr);
		__u32 raddr = KREAD(btf, sk, __sk_common.skc_daddr);

		e->family = 4;
		__builtin_memcpy(e->laddr, &laddr, 4);
		__builtin_memcpy(e->raddr, &raddr, 4);
		return;
	}
	e->family = 6;
	bpf_core_read(e->laddr, sizeof(e->laddr), &sk->__sk_common.skc_v6_rcv_saddr);
	bpf_core_read(e->raddr, sizeof(e->raddr), &sk->__sk_common.skc_v6_daddr);
	/* A dual-stack socket talking IPv4 shows mapped addresses. */
	if (addr__is_v4_mapped(e->raddr) &&
	    (addr__is_v4_mapped(e->laddr) || e->laddr[0] == 0)) {
		e->family = 4;
		addr__unmap_v4(e->laddr);
		addr__unmap_v4(e->raddr);
	}
}

static __always_inline bool filter__match_netns(const struct tcpscope_event *e)
{
	if (cfg_netns && e->netns != cfg_netns)
		return false;
	if (cfg_family && e->family != cfg_family)
		return false;
	return true;
}

static __always_inline bool filter__match_ports(const struct tcpscope_event *e)
{
	if (cfg_port && e->lport != cfg_port && e->rport != cfg_port)
		return false;
	if (cfg_lport && e->lport != cfg_lport)
		return false;
	if (cfg_rport && e->rport != cfg_rport)
		return false;
	return true;
}

static __always_inline __u64 sock__cgroup_id(const struct sock *sk)
{
	struct cgroup *cg;

	if (!bpf_core_field_exists(struct sock_cgroup_data, cgroup))
		return 0; /* < 5.15: not supported, the filter matches nothing */
	cg = BPF_CORE_READ(sk, sk_cgrp_data.cgroup);
	if (!cg)
		return 0;
	return BPF_CORE_READ(cg, kn, id);
}

/* True if the socket's cgroup is cfg_cgroup or below it. */
static __always_inline bool filter__match_cgroup(const struct sock *sk)
{
	struct cgroup *cg, *ancestor = NULL;
	int level;

	if (!cfg_cgroup)
		return true;
	if (!bpf_core_field_exists(struct sock_cgroup_data, cgroup))
		return false;
	cg = BPF_CORE_READ(sk, sk_cgrp_data.cgroup);
	if (!cg)
		return false;
	level = BPF_CORE_READ(cg, level);
	if (level < cfg_cgroup_level)
		return false;
	if (bpf_core_field_exists(cg->ancestors)) {
		bpf_core_read(&ancestor, sizeof(ancestor),
			      &cg->ancestors[cfg_cgroup_level]);
		return ancestor && BPF_CORE_READ(ancestor, kn, id) == cfg_cgroup;
	}
	{
		struct cgroup___old *old = (void *)cg;
		__u64 id = 0;

		bpf_core_read(&id, sizeof(id),
			      &old->ancestor_ids[cfg_cgroup_level]);
		return id == cfg_cgroup;
	}
}

static __always_inline bool task__is_kthread(bool btf)
{
	if (btf)
		return bpf_get_current_task_btf()->flags & PF_KTHREAD;
	return BPF_CORE_READ((struct task_struct *)bpf_get_current_task(), flags) &
	       PF_KTHREAD;
}

static __always_inline void owner__from_current(__u32 *pid, char *comm)
{
	*pid = bpf_get_current_pid_tgid() >> 32;
	bpf_get_current_comm(comm, TCPSCOPE_COMM_LEN);
}

/* Transitions that only a system call of the owning process makes, so that
 * "current" is the owner: connect(), listen(), close()/shutdown(). All
 * others (handshake completion, FIN or RST received, timers) may run in
 * softirq on behalf of whatever task was interrupted. */
static __always_inline bool state__is_syscall(int oldstate, int newstate)
{
	/* Not a transition: a retransmit or reset handler passes the state
	 * twice (a SYN retransmitted in SYN_SENT, a FIN in LAST_ACK: timers,
	 * softirq). */
	if (oldstate == newstate)
		return false;
	switch (newstate) {
	case TCP_SYN_SENT:
	case TCP_LISTEN:
	case TCP_LAST_ACK:
		return true;
	case TCP_FIN_WAIT1:
		return oldstate == TCP_ESTABLISHED || oldstate == TCP_SYN_RECV;
	default:
		return false;
	}
}

static __always_inline __u64 conn__new_id(const struct sock *sk, bool btf)
{
	__u32 zero = 0;
	__u64 *seq, id;

	/* With BTF-typed arguments the helper creates the cookie if needed;
	 * the timewait sock inherits it, which joins the two. */
	if (btf)
		return bpf_get_socket_cookie((void *)sk);
	id = BPF_CORE_READ(sk, __sk_common.skc_cookie.counter);
	if (id)
		return id;
	/* No cookie yet and no helper to make one here: a private id with the
	 * top bit set, unique per CPU and sequence. */
	seq = bpf_map_lookup_elem(&id_seq, &zero);
	if (!seq)
		return 0;
	*seq += 1;
	return (1ULL << 63) | ((__u64)bpf_get_smp_processor_id() << 48) |
	       (*seq & ((1ULL << 48) - 1));
}

/* The entry was made for an earlier socket at the same address: its id is
 * a cookie, and not this socket's. (An id of our own, made when a socket had
 * no cookie and the helper was unavailable, cannot be checked.) */
static __always_inline bool sock__is_stale(const struct sock *sk,
					   const struct sock_info *info, bool btf)
{
	__u64 cookie;

	if (btf)
		return info->conn != bpf_get_socket_cookie((void *)sk);
	if (info->conn >> 63)
		return false;
	cookie = BPF_CORE_READ(sk, __sk_common.skc_cookie.counter);
	return cookie && info->conn != cookie;
}

/* Copies the owner of an accepted child's listener into the event. */
static __always_inline bool listener__owner_of(const struct tcpscope_event *e,
					       __u32 *pid, char *comm)
{
	struct listener_key lk = {.netns = e->netns, .port = e->lport};
	struct owner *o = bpf_map_lookup_elem(&listeners, &lk);

	if (!o)
		return false;
	*pid = o->pid;
	__builtin_memcpy(comm, o->comm, TCPSCOPE_COMM_LEN);
	return true;
}

/* Without the socket table: the id is the cookie; the owner is sent only
 * where it is learnt (a system call's caller, an accepted child's listener)
 * and user space keeps it for the connection's other events. */
static __always_inline void sock__identify(const struct sock *sk,
					   struct tcpscope_event *e, bool btf,
					   int oldstate, int newstate)
{
	e->conn = conn__new_id(sk, btf);
	if (state__is_syscall(oldstate, newstate) && !task__is_kthread(btf)) {
		owner__from_current(&e->pid, e->comm);
		e->owner_src = TCPSCOPE_OWNER_SYSCALL;
	} else if (newstate == TCP_SYN_RECV && oldstate != newstate) {
		/* The child's first transition (not a retransmit or reset
		 * in SYN_RECV, which pass old == new). */
		struct io_wait w = {.conn = e->conn};
		__u64 key = (__u64)sk;

		if (listener__owner_of(e, &e->pid, e->comm)) {
			e->owner_src = TCPSCOPE_OWNER_LISTENER;
			w.pid = e->pid;
		}
		/* An entry left by an earlier socket at this address is
		 * replaced; io__refine checks the cookie. */
		if (cfg_io_owner &&
		    bpf_map_update_elem(&io_wanted, &key, &w, BPF_ANY))
			drops__inc(TCPSCOPE_DROP_SOCKMAP);
	}
}

/* Looks up (or starts) what we know of a full socket and copies the
 * connection id and owner into the event. If the socket table is full a new
 * socket is not remembered (counted in drops); the event still goes out. */
static __always_inline void sock__track(const struct sock *sk,
					struct tcpscope_event *e, bool btf,
					int oldstate, int newstate)
{
	__u64 key = (__u64)sk;
	struct sock_info *info;
	bool syscall;

	if (!cfg_sock_table) {
		sock__identify(sk, e, btf, oldstate, newstate);
		return;
	}
	info = bpf_map_lookup_elem(&socks, &key);
	syscall = state__is_syscall(oldstate, newstate) && !task__is_kthread(btf);

	/* The kernel may skip a run of ours (a program interrupted on its CPU
	 * and the tracepoint hit again in the interrupt: recursion_misses),
	 * tcp_destroy_sock's included. Then an entry outlives its socket and
	 * the next socket at that address would take over its id and owner:
	 * an entry whose id is not this socket's cookie is stale. */
	if (info && sock__is_stale(sk, info, btf))
		info = NULL;
	if (!info) {
		struct sock_info fresh = {};

		fresh.conn = conn__new_id(sk, btf);
		if (syscall) {
			owner__from_current(&fresh.pid, fresh.comm);
			fresh.owner_src = TCPSCOPE_OWNER_SYSCALL;
		} else if (newstate == TCP_SYN_RECV &&
			   listener__owner_of(e, &fresh.pid, fresh.comm)) {
			fresh.owner_src = TCPSCOPE_OWNER_LISTENER;
		}
		e->sk_flags |= TCPSCOPE_SK_NEW;
		/* Later transitions find it; this one reports what it holds
		 * (no second lookup). */
		if (bpf_map_update_elem(&socks, &key, &fresh, BPF_ANY))
			drops__inc(TCPSCOPE_DROP_SOCKMAP);
		e->conn = fresh.conn;
		e->pid = fresh.pid;
		e->owner_src = fresh.owner_src;
		__builtin_memcpy(e->comm, fresh.comm, sizeof(e->comm));
		return;
	} else if (syscall && info->owner_src != TCPSCOPE_OWNER_SYSCALL) {
		owner__from_current(&info->pid, info->comm);
		info->owner_src = TCPSCOPE_OWNER_SYSCALL;
	}
	e->conn = info->conn;
	e->pid = info->pid;
	e->owner_src = info->owner_src;
	__builtin_memcpy(e->comm, info->comm, sizeof(e->comm));
}

static __always_inline void sock__read_queues(const struct sock *sk,
					      struct tcpscope_event *e, bool btf)
{
	__u8 shutdown;

	if (btf) {
		/* tcp_sock fields lie beyond struct sock: a typed cast. */
		const struct tcp_sock *tp = bpf_skc_to_tcp_sock((void *)sk);

		if (tp) {
			e->rx_queue = tp->rcv_nxt - tp->copied_seq;
			e->tx_queue = tp->write_seq - tp->snd_una;
		}
		shutdown = BPF_CORE_READ_BITFIELD(sk, sk_shutdown);
	} else {
		const struct tcp_sock *tp = (const struct tcp_sock *)sk;

		e->rx_queue = BPF_CORE_READ(tp, rcv_nxt) - BPF_CORE_READ(tp, copied_seq);
		e->tx_queue = BPF_CORE_READ(tp, write_seq) - BPF_CORE_READ(tp, snd_una);
		shutdown = BPF_CORE_READ_BITFIELD_PROBED(sk, sk_shutdown);
	}
	if (shutdown & RCV_SHUTDOWN)
		e->sk_flags |= TCPSCOPE_SK_RCV_SHUTDOWN;
	if (shutdown & SEND_SHUTDOWN)
		e->sk_flags |= TCPSCOPE_SK_SEND_SHUTDOWN;
}

/* False if the ring buffer was full (counted: the record is lost). */
static __always_inline bool ringbuf__emit(struct tcpscope_event *e)
{
	__u64 flags = 0;

	e->ts_ns = bpf_ktime_get_boot_ns();
	if (cfg_wakeup_every) {
		/* Wake the consumer once per cfg_wakeup_every records of this
		 * CPU. Asking the ring how much is queued instead
		 * (bpf_ringbuf_query) reads the consumer's position, a cache
		 * line the consumer keeps writing: a miss on every event.
		 * Forcing a wake-up per record costs a self-IPI each (irq_work;
		 * a VM exit in a guest). */
		__u32 zero = 0, *n = bpf_map_lookup_elem(&since_wakeup, &zero);

		flags = BPF_RB_NO_WAKEUP;
		if (n && ++*n >= cfg_wakeup_every) {
			*n = 0;
			flags = BPF_RB_FORCE_WAKEUP;
		}
	}
	if (bpf_ringbuf_output(&events, e, sizeof(*e), flags)) {
		drops__inc(TCPSCOPE_DROP_RINGBUF);
		return false;
	}
	return true;
}

static __always_inline bool sock__is_tcp(const struct sock *sk, bool btf)
{
	if (btf)
		return BPF_CORE_READ_BITFIELD(sk, sk_protocol) == IPPROTO_TCP;
	return BPF_CORE_READ_BITFIELD_PROBED(sk, sk_protocol) == IPPROTO_TCP;
}

static __always_inline bool filter__match_owner(const struct tcpscope_event *e)
{
	return !cfg_pid || e->pid == cfg_pid;
}

static __always_inline void listener__update(const struct tcpscope_event *e,
					     int oldstate, int newstate)
{
	struct listener_key lk = {.netns = e->netns, .port = e->lport};

	if (newstate == TCP_LISTEN) {
		struct owner o = {};

		owner__from_current(&o.pid, o.comm);
		if (bpf_map_update_elem(&listeners, &lk, &o, BPF_ANY))
			drops__inc(TCPSCOPE_DROP_SOCKMAP);
	} else if (newstate == TCP_CLOSE) {
		/* Not LISTEN -> SYN_RECV: an accepted child is a clone of
		 * its listener and so leaves "LISTEN" too. */
		bpf_map_delete_elem(&listeners, &lk);
	}
}

static __always_inline void tuple__key(struct tuple_key *k, __u32 netns,
				       __u8 family, __u16 lport, __u16 rport,
				       const __u8 *laddr, const __u8 *raddr)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->netns = netns;
	k->family = family;
	k->lport = lport;
	k->rport = rport;
	__builtin_memcpy(k->laddr, laddr, TCPSCOPE_ADDR_LEN);
	__builtin_memcpy(k->raddr, raddr, TCPSCOPE_ADDR_LEN);
}

/* The connection's socket may have become a tw sock: with a private id, the
 * id by tuple, for the sweep and the tw timers (its cookie, if another tool
 * made one, is not the name we gave it); with a cookie, no entry, or an
 * earlier connection's on the tuple would name it. */
static __always_inline void tw__remember_id(const struct tcpscope_event *e)
{
	struct tuple_key k;

	tuple__key(&k, e->netns, e->family, e->lport, e->rport, e->laddr,
		   e->raddr);
	if (!(e->conn >> 63)) {
		bpf_map_delete_elem(&tw_ids, &k);
		return;
	}
	if (bpf_map_update_elem(&tw_ids, &k, &e->conn, BPF_ANY))
		drops__inc(TCPSCOPE_DROP_SOCKMAP);
}

/* With private ids: the id tw__remember_id kept for the tuple, or 0. */
static __always_inline __u64 tw__id_of(__u32 netns, __u8 family, __u16 lport,
				       __u16 rport, const __u8 *laddr,
				       const __u8 *raddr)
{
	struct tuple_key k;
	__u64 *id;

	tuple__key(&k, netns, family, lport, rport, laddr, raddr);
	id = bpf_map_lookup_elem(&tw_ids, &k);
	return id ? *id : 0;
}

/* ---- inet_sock_set_state ---------------------------------------------- */

static __always_inline int set_state__handle(const struct sock *sk,
					     int oldstate, int newstate,
					     bool btf)
{
	struct tcpscope_event e = {};

	sock__read_tuple(sk, &e, btf);
	if (!filter__match_netns(&e))
		return 0;
	if (newstate == TCP_LISTEN ||
	    (oldstate == TCP_LISTEN && newstate == TCP_CLOSE))
		listener__update(&e, oldstate, newstate);
	if (!filter__match_ports(&e) || !filter__match_cgroup(sk))
		return 0;
	sock__track(sk, &e, btf, oldstate, newstate);
	if (!filter__match_owner(&e))
		return 0;
	e.type = TCPSCOPE_EV_STATE;
	e.old_state = oldstate;
	e.new_state = newstate;
	if ((cfg_pid || cfg_cgroup) && e.conn &&
	    (newstate == TCP_FIN_WAIT2 || newstate == TCP_CLOSING)) {
		__u8 one = 1;

		if (bpf_map_update_elem(&tw_allowed, &e.conn, &one, BPF_ANY))
			drops__inc(TCPSCOPE_DROP_SOCKMAP);
	}
	if (cfg_cgroup)
		e.cgroup = sock__cgroup_id(sk);
	if (cfg_private_ids && newstate == TCP_CLOSE &&
	    (oldstate == TCP_FIN_WAIT2 || oldstate == TCP_CLOSING))
		tw__remember_id(&e);
	if (newstate != TCP_LISTEN && oldstate != TCP_LISTEN)
		sock__read_queues(sk, &e, btf);
	ringbuf__emit(&e);
	return 0;
}

static __always_inline int set_state__main(const struct sock *sk,
					   int oldstate, int newstate, bool btf)
{
	/* First thing: the sooner the busy flag is set, the fewer nested
	 * firings the twin must tell by name. */
	__u32 *busy = nest__enter(TCPSCOPE_NEST_SET_STATE, sk,
				  oldstate << 8 | newstate);

	if (sock__is_tcp(sk, btf))
		set_state__handle(sk, oldstate, newstate, btf);
	nest__leave(busy);
	return 0;
}

static __always_inline int set_state__nested(const struct sock *sk,
					     int oldstate, int newstate,
					     bool btf)
{
	__u32 *twin_busy = nest__twin_enter(TCPSCOPE_NEST_SET_STATE, sk,
					    oldstate << 8 | newstate);

	if (!twin_busy)
		return 0;
	if (sock__is_tcp(sk, btf)) {
		drops__inc(TCPSCOPE_NESTED_STATE);
		set_state__handle(sk, oldstate, newstate, btf);
	}
	nest__leave(twin_busy);
	return 0;
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(set_state_btf, const struct sock *sk, int oldstate, int newstate)
{
	return set_state__main(sk, oldstate, newstate, true);
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(set_state_nested_btf, const struct sock *sk, int oldstate,
	     int newstate)
{
	return set_state__nested(sk, oldstate, newstate, true);
}

SEC("raw_tp/inet_sock_set_state")
int BPF_PROG(set_state_raw, const struct sock *sk, int oldstate, int newstate)
{
	return set_state__main(sk, oldstate, newstate, false);
}

SEC("raw_tp/inet_sock_set_state")
int BPF_PROG(set_state_nested_raw, const struct sock *sk, int oldstate,
	     int newstate)
{
	return set_state__nested(sk, oldstate, newstate, false);
}

SEC("tp/sock/inet_sock_set_state")
int set_state_tp(struct trace_event_raw_inet_sock_set_state *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return 0;
	return set_state__handle(ctx->skaddr, ctx->oldstate, ctx->newstate,
				 false);
}

/* ---- tcp_retransmit_skb ------------------------------------------------ */

static __always_inline int retransmit__handle(const struct sock *sk,
					      const struct sk_buff *skb,
					      int err, bool btf)
{
	struct tcpscope_event e = {};
	__u8 state = BPF_CORE_READ(sk, __sk_common.skc_state);

	sock__read_tuple(sk, &e, btf);
	if (!filter__match_netns(&e) || !filter__match_ports(&e) ||
	    !filter__match_cgroup(sk))
		return 0;
	sock__track(sk, &e, btf, state, state);
	if (!filter__match_owner(&e))
		return 0;
	e.type = TCPSCOPE_EV_RETRANSMIT;
	e.old_state = e.new_state = state;
	e.reason = err;
	if (skb) {
		const struct tcp_skb_cb *cb = (const void *)skb->cb;
		__u32 seq = BPF_CORE_READ(cb, seq);
		__u32 end_seq = BPF_CORE_READ(cb, end_seq);

		e.tcp_flags = BPF_CORE_READ_BITFIELD_PROBED(cb, tcp_flags);
		e.seg_len = end_seq - seq -
			    !!(e.tcp_flags & (TCPSCOPE_TCP_SYN | TCPSCOPE_TCP_FIN));
		/* The kernel's own count (tp->total_retrans, segments) and
		 * this skb's segments: a jump larger than these says
		 * retransmit events of this socket were lost. */
		e.aux = (__u64)BPF_CORE_READ(cb, tcp_gso_segs) << 32 |
			BPF_CORE_READ((const struct tcp_sock *)sk, total_retrans);
	}
	if (cfg_cgroup)
		e.cgroup = sock__cgroup_id(sk);
	sock__read_queues(sk, &e, btf);
	ringbuf__emit(&e);
	return 0;
}

SEC("tp_btf/tcp_retransmit_skb")
int BPF_PROG(retransmit_btf, const struct sock *sk, const struct sk_buff *skb)
{
	return retransmit__handle(sk, skb, 0, true);
}

SEC("raw_tp/tcp_retransmit_skb")
int BPF_PROG(retransmit_raw, const struct sock *sk, const struct sk_buff *skb)
{
	return retransmit__handle(sk, skb, 0, false);
}

SEC("tp/tcp/tcp_retransmit_skb")
int retransmit_tp(struct trace_event_raw_tcp_retransmit_skb *ctx)
{
	return retransmit__handle(ctx->skaddr, ctx->skbaddr, 0, false);
}

/* ---- tcp_send_reset ----------------------------------------------------- */

/* The namespace of a segment, as tcp_v4_send_reset() takes it when it has
 * no socket: that of the device of its route (skb_dst). skb->dev alone was
 * found cleared now and then under churn (a reset in about a thousand lost
 * its record to a namespace of 0, filtered out). SKB_DST_NOREF is the
 * pointer's low bit. */
static __always_inline __u32 skb__netns(const struct sk_buff *skb)
{
	unsigned long refdst = BPF_CORE_READ(skb, _skb_refdst);
	const struct dst_entry *dst = (const void *)(refdst & ~1UL);
	__u32 inum = 0;

	if (dst)
		inum = BPF_CORE_READ(dst, dev, nd_net.net, ns.inum);
	if (!inum)
		inum = BPF_CORE_READ(skb, dev, nd_net.net, ns.inum);
	return inum;
}

/* Tuple of the segment a reset answers: it arrived from the peer, so its
 * destination is our local side. (Its namespace: skb__netns.) */
static __always_inline void skb__read_tuple(const struct sk_buff *skb,
					    struct tcpscope_event *e)
{
	unsigned char *head = BPF_CORE_READ(skb, head);
	__u16 nh = BPF_CORE_READ(skb, network_header);
	__u16 th = BPF_CORE_READ(skb, transport_header);
	__u8 version = 0;
	__u16 ports[2] = {};

	bpf_probe_read_kernel(&version, 1, head + nh);
	version >>= 4;
	if (version == 4) {
		struct iphdr ip;

		bpf_probe_read_kernel(&ip, sizeof(ip), head + nh);
		e->family = 4;
		__builtin_memcpy(e->raddr, &ip.saddr, 4);
		__builtin_memcpy(e->laddr, &ip.daddr, 4);
	} else {
		struct ipv6hdr ip6;

		bpf_probe_read_kernel(&ip6, sizeof(ip6), head + nh);
		e->family = 6;
		__builtin_memcpy(e->raddr, &ip6.saddr, 16);
		__builtin_memcpy(e->laddr, &ip6.daddr, 16);
	}
	bpf_probe_read_kernel(ports, sizeof(ports), head + th);
	e->rport = bpf_ntohs(ports[0]);
	e->lport = bpf_ntohs(ports[1]);
}

/* Flags and payload length of the segment that drew the reset. */
static __always_inline void skb__read_segment(const struct sk_buff *skb,
					      struct tcpscope_event *e)
{
	const struct tcp_skb_cb *cb = (const void *)skb->cb;
	__u32 seq = BPF_CORE_READ(cb, seq);
	__u32 end_seq = BPF_CORE_READ(cb, end_seq);

	e->tcp_flags = BPF_CORE_READ_BITFIELD_PROBED(cb, tcp_flags);
	e->seg_len = end_seq - seq - !!(e->tcp_flags & TCPSCOPE_TCP_SYN) -
		     !!(e->tcp_flags & TCPSCOPE_TCP_FIN);
}

static __always_inline int send_reset__handle(const struct sock *sk,
					      const struct sk_buff *skb,
					      __u32 reason, bool btf)
{
	struct tcpscope_event e = {};
	__u8 state = 0;

	if (sk) {
		sock__read_tuple(sk, &e, btf);
		state = BPF_CORE_READ(sk, __sk_common.skc_state);
	} else if (skb) {
		skb__read_tuple(skb, &e);
		e.netns = skb__netns(skb);
		e.sk_flags |= TCPSCOPE_SK_NO_SOCKET;
	} else {
		return 0;
	}
	if (sk && skb && state == TCP_LISTEN) {
		/* A listener answering a segment that matched no connection
		 * (a late FIN, say): what matters is the segment's tuple; the
		 * namespace stays the listener's, as the kernel takes it. */
		skb__read_tuple(skb, &e);
		e.sk_flags |= TCPSCOPE_SK_LISTENER;
	}
	if (!filter__match_netns(&e) || !filter__match_ports(&e))
		return 0;
	if (state == TCP_TIME_WAIT || state == TCP_NEW_SYN_RECV) {
		/* Not a full socket: only sock_common may be read. The
		 * timewait sock carries the cookie of its connection. */
		if (state == TCP_TIME_WAIT)
			e.sk_flags |= TCPSCOPE_SK_TIMEWAIT;
		e.conn = btf ? bpf_get_socket_cookie((void *)sk)
			     : BPF_CORE_READ(sk, __sk_common.skc_cookie.counter);
		/* The owner is known only to user space (by conn). */
		if (cfg_pid || cfg_cgroup)
			return 0;
	} else if (sk) {
		if (!filter__match_cgroup(sk))
			return 0;
		sock__track(sk, &e, btf, state, state);
		if (!filter__match_owner(&e))
			return 0;
		if (cfg_cgroup)
			e.cgroup = sock__cgroup_id(sk);
		sock__read_queues(sk, &e, btf);
	} else if (cfg_pid || cfg_cgroup) {
		return 0; /* no socket: no owner to match in the kernel */
	}
	e.type = TCPSCOPE_EV_RESET_SENT;
	e.old_state = e.new_state = state;
	e.reason = reason;
	e.sk = (__u64)sk;
	if (skb)
		skb__read_segment(skb, &e);
	if (!ringbuf__emit(&e))
		drops__inc(TCPSCOPE_DROP_RESET_RINGBUF);
	return 0;
}

/* The reason argument came with enum sk_rst_reason in 6.10 ("tcp: add
 * reason to tcp_send_reset tracepoint" series); older kernels have two
 * arguments, and reading a third would fail verification. */
static __always_inline bool send_reset__has_reason(void)
{
	return bpf_core_enum_value_exists(enum sk_rst_reason,
					  SK_RST_REASON_NOT_SPECIFIED);
}

SEC("tp_btf/tcp_send_reset")
int BPF_PROG(send_reset_btf, const struct sock *sk, const struct sk_buff *skb)
{
	__u32 reason = send_reset__has_reason() ? (__u32)ctx[2] : 0;

	return send_reset__handle(sk, skb, reason, true);
}

SEC("raw_tp/tcp_send_reset")
int BPF_PROG(send_reset_raw, const struct sock *sk, const struct sk_buff *skb)
{
	__u32 reason = send_reset__has_reason() ? (__u32)ctx[2] : 0;

	return send_reset__handle(sk, skb, reason, false);
}

SEC("tp/tcp/tcp_send_reset")
int send_reset_tp(struct trace_event_raw_tcp_send_reset *ctx)
{
	__u32 reason = 0;

	if (bpf_core_field_exists(ctx->reason))
		reason = BPF_CORE_READ(ctx, reason);
	return send_reset__handle(ctx->skaddr, ctx->skbaddr, reason, false);
}

/* ---- tcp_receive_reset ------------------------------------------------ */

static __always_inline int receive_reset__handle(const struct sock *sk,
						 bool btf)
{
	struct tcpscope_event e = {};
	__u8 state = BPF_CORE_READ(sk, __sk_common.skc_state);

	sock__read_tuple(sk, &e, btf);
	if (!filter__match_netns(&e) || !filter__match_ports(&e) ||
	    !filter__match_cgroup(sk))
		return 0;
	sock__track(sk, &e, btf, state, state);
	if (!filter__match_owner(&e))
		return 0;
	e.type = TCPSCOPE_EV_RESET_RECEIVED;
	e.old_state = e.new_state = state;
	if (cfg_cgroup)
		e.cgroup = sock__cgroup_id(sk);
	sock__read_queues(sk, &e, btf);
	ringbuf__emit(&e);
	return 0;
}

SEC("tp_btf/tcp_receive_reset")
int BPF_PROG(receive_reset_btf, const struct sock *sk)
{
	return receive_reset__handle(sk, true);
}

SEC("raw_tp/tcp_receive_reset")
int BPF_PROG(receive_reset_raw, const struct sock *sk)
{
	return receive_reset__handle(sk, false);
}

SEC("tp/tcp/tcp_receive_reset")
int receive_reset_tp(struct trace_event_raw_tcp_event_sk *ctx)
{
	return receive_reset__handle(ctx->skaddr, false);
}

/* ---- tcp_destroy_sock: forget the socket ------------------------------- */

static __always_inline int destroy__handle(const struct sock *sk)
{
	__u64 key = (__u64)sk;

	bpf_map_delete_elem(&socks, &key);
	return 0;
}

/* A skipped destroy leaves a stale entry (sock__is_stale finds it when
 * the address is reused); the twin spares the slot. */
static __always_inline int destroy__main(const struct sock *sk)
{
	__u32 *busy = nest__enter(TCPSCOPE_NEST_DESTROY, sk, 0);

	destroy__handle(sk);
	nest__leave(busy);
	return 0;
}

static __always_inline int destroy__nested(const struct sock *sk)
{
	__u32 *twin_busy = nest__twin_enter(TCPSCOPE_NEST_DESTROY, sk, 0);

	if (!twin_busy)
		return 0;
	destroy__handle(sk);
	nest__leave(twin_busy);
	return 0;
}

SEC("tp_btf/tcp_destroy_sock")
int BPF_PROG(destroy_btf, const struct sock *sk)
{
	return destroy__main(sk);
}

SEC("tp_btf/tcp_destroy_sock")
int BPF_PROG(destroy_nested_btf, const struct sock *sk)
{
	return destroy__nested(sk);
}

SEC("raw_tp/tcp_destroy_sock")
int BPF_PROG(destroy_raw, const struct sock *sk)
{
	return destroy__main(sk);
}

SEC("raw_tp/tcp_destroy_sock")
int BPF_PROG(destroy_nested_raw, const struct sock *sk)
{
	return destroy__nested(sk);
}

SEC("tp/tcp/tcp_destroy_sock")
int destroy_tp(struct trace_event_raw_tcp_event_sk *ctx)
{
	return destroy__handle(ctx->skaddr);
}

/* ---- first send/recv: the owner of accepted sockets --------------------- */

/* Without the socket table: an accepted socket's first send/recv names the
 * process that does its I/O; sent only if that is not the owner it was
 * given (user space keeps it for the connection's later events). */
static __always_inline int io__refine(const struct sock *sk, bool btf)
{
	__u64 key = (__u64)sk;
	struct io_wait *w = bpf_map_lookup_elem(&io_wanted, &key);
	__u64 conn;
	__u32 given;

	if (!w || task__is_kthread(btf))
		return 0;
	/* Copied first: a deleted entry may be taken for another at once. */
	conn = w->conn;
	given = w->pid;
	bpf_map_delete_elem(&io_wanted, &key);
	/* An entry made for an earlier socket at this address says nothing. */
	if (conn != conn__new_id(sk, btf))
		return 0;
	/* Only now: this runs on every send/recv of the host. */
	struct tcpscope_event e = {};

	owner__from_current(&e.pid, e.comm);
	if (e.pid == given)
		return 0;
	e.conn = conn;
	sock__read_tuple(sk, &e, btf);
	e.type = TCPSCOPE_EV_OWNER;
	e.owner_src = TCPSCOPE_OWNER_IO;
	e.old_state = e.new_state = KREAD(btf, sk, __sk_common.skc_state);
	e.sk = key;
	ringbuf__emit(&e);
	return 0;
}

/* sock_send_length/sock_recv_length exist since 6.3; optional. They fire in
 * the calling task for every socket family, so the work is a lookup. */
static __always_inline int io__handle(const struct sock *sk, bool btf)
{
	__u64 key = (__u64)sk;
	struct sock_info *info;

	if (!cfg_sock_table)
		return io__refine(sk, btf);
	info = bpf_map_lookup_elem(&socks, &key);
	if (!info || info->owner_src == TCPSCOPE_OWNER_SYSCALL ||
	    info->owner_src == TCPSCOPE_OWNER_IO)
		return 0;
	if (task__is_kthread(btf))
		return 0;
	/* As io__refine: only another process than the owner refines it. */
	if (info->pid && info->pid == bpf_get_current_pid_tgid() >> 32)
		return 0;
	owner__from_current(&info->pid, info->comm);
	info->owner_src = TCPSCOPE_OWNER_IO;
	return 0;
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(recv_btf, const struct sock *sk)
{
	return io__handle(sk, true);
}

SEC("tp_btf/sock_send_length")
int BPF_PROG(send_btf, const struct sock *sk)
{
	return io__handle(sk, true);
}

SEC("raw_tp/sock_recv_length")
int BPF_PROG(recv_raw, const struct sock *sk)
{
	return io__handle(sk, false);
}

SEC("raw_tp/sock_send_length")
int BPF_PROG(send_raw, const struct sock *sk)
{
	return io__handle(sk, false);
}

/* ---- timewait socks, by their timer --------------------------------------- */

/* CONFIG_HZ converts the tw timer (jiffies) to time; weak so the programs
 * still load where libbpf cannot read the kernel config. */
extern unsigned int CONFIG_HZ __kconfig __weak;
/* The tw timer's callback (a static function: libbpf finds it in
 * kallsyms); weak, 0 if hidden. */
extern const void tw_timer_handler __ksym __weak;

/* Trace tw timers: set only if the kernel exposes tw_timer_handler. */
const volatile bool cfg_tw_timers = false;

static __always_inline __u64 jiffies__to_boot_ns(__u64 expires)
{
	__u64 now_j = bpf_jiffies64();
	__u64 now = bpf_ktime_get_boot_ns();

	if (!CONFIG_HZ)
		return 0;
	if ((long)(expires - now_j) <= 0)
		return now;
	return now + (expires - now_j) * (1000000000ULL / CONFIG_HZ);
}

/* The state tracepoint never shows TIME_WAIT; the tw sock's timer does:
 * armed in inet_twsk_schedule() before tcp_done() reports CLOSE, fired on
 * expiry, cancelled when the tw sock is killed early. Every timer on the
 * host passes here, so the first test is the callback pointer. */
/* True while the tw sock's namespace is being dismantled: its count is 0,
 * the condition under which inet_twsk_purge() kills the tw socks left in it
 * (their timers cancelled, like an early kill). False where the count
 * cannot be read (before 5.13). */
static __always_inline bool tw__netns_dying(const struct inet_timewait_sock *tw)
{
	const struct net *net = BPF_CORE_READ(tw, __tw_common.skc_net.net);
	const void *ns = &net->ns;
	int refs;

	if (!net)
		return false;
	if (bpf_core_field_exists(struct ns_common___ref, __ns_ref))
		refs = BPF_CORE_READ((const struct ns_common___ref *)ns,
				     __ns_ref.refs.counter);
	else if (bpf_core_field_exists(struct ns_common___count, count))
		refs = BPF_CORE_READ((const struct ns_common___count *)ns,
				     count.refs.counter);
	else
		return false;
	return refs == 0;
}

static __always_inline int tw_timer__handle(const struct timer_list *timer,
					    __u8 type, bool btf)
{
	const struct inet_timewait_sock *tw;

	if (!cfg_tw_timers || !&tw_timer_handler)
		return 0;
	if ((__u64)KREAD(btf, timer, function) != (__u64)&tw_timer_handler)
		return 0;
	/* Only now: nearly every timer of the host is turned away above. */
	struct tcpscope_event e = {};

	tw = (const void *)timer -
	     bpf_core_field_offset(struct inet_timewait_sock, tw_timer);
	sock__read_tuple((const struct sock *)tw, &e, false);
	if (!filter__match_netns(&e) || !filter__match_ports(&e))
		return 0;
	e.type = type;
	e.conn = BPF_CORE_READ(tw, __tw_common.skc_cookie.counter);
	/* Armed before the CLOSE that names it (tw__remember_id): a start
	 * keeps the cookie, user space pairs it by tuple. */
	if (cfg_private_ids && type != TCPSCOPE_EV_TW_START) {
		__u64 id = tw__id_of(e.netns, e.family, e.lport, e.rport,
				     e.laddr, e.raddr);

		if (id)
			e.conn = id;
	}
	if (cfg_pid || cfg_cgroup) {
		if (!bpf_map_lookup_elem(&tw_allowed, &e.conn))
			return 0;
		if (type == TCPSCOPE_EV_TW_EXPIRE)
			bpf_map_delete_elem(&tw_allowed, &e.conn);
	}
	e.old_state = TCP_TIME_WAIT;
	e.new_state = BPF_CORE_READ(tw, tw_substate);
	e.sk = (__u64)tw;
	e.sk_flags = TCPSCOPE_SK_TIMEWAIT;
	if (type == TCPSCOPE_EV_TW_CANCEL && tw__netns_dying(tw))
		e.sk_flags |= TCPSCOPE_SK_NETNS_EXIT;
	if (type == TCPSCOPE_EV_TW_START)
		e.aux = jiffies__to_boot_ns(BPF_CORE_READ(timer, expires));
	ringbuf__emit(&e);
	return 0;
}

SEC("tp_btf/timer_start")
int BPF_PROG(tw_start_btf, const struct timer_list *timer)
{
	return tw_timer__handle(timer, TCPSCOPE_EV_TW_START, true);
}

SEC("tp_btf/timer_cancel")
int BPF_PROG(tw_cancel_btf, const struct timer_list *timer)
{
	return tw_timer__handle(timer, TCPSCOPE_EV_TW_CANCEL, true);
}

SEC("tp_btf/timer_expire_entry")
int BPF_PROG(tw_expire_btf, const struct timer_list *timer)
{
	return tw_timer__handle(timer, TCPSCOPE_EV_TW_EXPIRE, true);
}

SEC("raw_tp/timer_start")
int BPF_PROG(tw_start_raw, const struct timer_list *timer)
{
	return tw_timer__handle(timer, TCPSCOPE_EV_TW_START, false);
}

SEC("raw_tp/timer_cancel")
int BPF_PROG(tw_cancel_raw, const struct timer_list *timer)
{
	return tw_timer__handle(timer, TCPSCOPE_EV_TW_CANCEL, false);
}

SEC("raw_tp/timer_expire_entry")
int BPF_PROG(tw_expire_raw, const struct timer_list *timer)
{
	return tw_timer__handle(timer, TCPSCOPE_EV_TW_EXPIRE, false);
}

SEC("tp/timer/timer_start")
int tw_start_tp(struct trace_event_raw_timer_start *ctx)
{
	return tw_timer__handle(ctx->timer, TCPSCOPE_EV_TW_START, false);
}

SEC("tp/timer/timer_cancel")
int tw_cancel_tp(struct trace_event_raw_timer_class *ctx)
{
	return tw_timer__handle(ctx->timer, TCPSCOPE_EV_TW_CANCEL, false);
}

SEC("tp/timer/timer_expire_entry")
int tw_expire_tp(struct trace_event_raw_timer_expire_entry *ctx)
{
	return tw_timer__handle(ctx->timer, TCPSCOPE_EV_TW_EXPIRE, false);
}

/* ---- iter/tcp: timewait sweep and socket snapshot ------------------------ */

/* The id the tracepoint programs give the socket. With BTF-typed arguments
 * that is always its cookie. The other flavours cannot make a cookie: a
 * socket that had none got a private id (conn__new_id), kept in "socks",
 * and making one here would name it twice. So: the id in "socks" for a
 * socket we track; for a tw sock without a cookie, its connection's id by
 * tuple (tw_ids); else the cookie, made now (a socket we have not seen:
 * its next event reads it). */
static __always_inline __u64 iter__conn_id(struct sock_common *skc, __u8 state,
					   const struct tcpscope_sock_record *r)
{
	__u64 key = (__u64)skc, id;
	struct sock_info *info;

	if (!cfg_private_ids)
		return bpf_get_socket_cookie(skc);
	if (state == TCP_TIME_WAIT) {
		id = tw__id_of(r->netns, r->family, r->lport, r->rport, r->laddr,
			       r->raddr);
		return id ? id : bpf_get_socket_cookie(skc);
	}
	info = bpf_map_lookup_elem(&socks, &key);
	if (info)
		return info->conn;
	return bpf_get_socket_cookie(skc);
}

/* Set by user space before each pass: enum tcpscope_iter_pass. Only what the
 * pass needs is copied out: a busy host has far more sockets than either. */
volatile __u32 iter_pass = TCPSCOPE_ITER_TIME_WAIT;

static __always_inline void record__tuple(const struct sock_common *skc,
					  struct tcpscope_sock_record *r)
{
	struct tcpscope_event e = {};

	sock__read_tuple((const struct sock *)skc, &e, true);
	r->family = e.family;
	r->lport = e.lport;
	r->rport = e.rport;
	r->netns = e.netns;
	__builtin_memcpy(r->laddr, e.laddr, sizeof(r->laddr));
	__builtin_memcpy(r->raddr, e.raddr, sizeof(r->raddr));
}

/* A read() of the iterator returns only when its buffer is full or the walk
 * is done, and user space drains the ring buffer between reads. A pass that
 * keeps few sockets (the audit passes over timewait socks, of which a busy
 * host has tens of thousands at 0.8 us each) would keep it from the ring for
 * tens of ms, long enough to fill it. So every ITER_PROGRESS_EVERY sockets
 * passed over, a progress record (state 0, no socket) goes out. */
#define ITER_PROGRESS_EVERY 64

__u32 iter_passed_over = 0; /* one reader at a time: user space */

static __always_inline int iter__pass_over(struct seq_file *seq)
{
	struct tcpscope_sock_record progress = {};

	if (++iter_passed_over < ITER_PROGRESS_EVERY)
		return 0;
	iter_passed_over = 0;
	bpf_seq_write(seq, &progress, sizeof(progress));
	return 0;
}

SEC("iter/tcp")
int sock_iter(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	struct seq_file *seq = ctx->meta->seq;
	struct tcpscope_sock_record r = {};
	struct tcpscope_event e = {};
	__u8 state;

	if (!skc)
		return 0;
	state = BPF_CORE_READ(skc, skc_state);
	if (iter_pass == TCPSCOPE_ITER_TIME_WAIT && state != TCP_TIME_WAIT)
		return iter__pass_over(seq);
	if (iter_pass == TCPSCOPE_ITER_CLOSE_WAIT && state != TCP_CLOSE_WAIT)
		return iter__pass_over(seq);
	/* A tw sock's connection has ended (its CLOSE came first). */
	if (iter_pass == TCPSCOPE_ITER_AUDIT && state == TCP_TIME_WAIT)
		return iter__pass_over(seq);
	record__tuple(skc, &r);
	/* Same netns/family/port filters as the tracepoints. */
	e.netns = r.netns;
	e.family = r.family;
	e.lport = r.lport;
	e.rport = r.rport;
	if (!filter__match_netns(&e) || !filter__match_ports(&e))
		return iter__pass_over(seq);
	r.state = state;
	r.substate = state;
	r.conn = iter__conn_id(skc, state, &r);
	r.ts_ns = bpf_ktime_get_boot_ns();
	if (state == TCP_TIME_WAIT) {
		struct tcp_timewait_sock *tw = bpf_skc_to_tcp_timewait_sock(skc);
		long remaining;

		if (!tw)
			return 0;
		r.substate = BPF_CORE_READ(tw, tw_sk.tw_substate);
		remaining = (long)(BPF_CORE_READ(tw, tw_sk.tw_timer.expires) -
				   bpf_jiffies64());
		if (CONFIG_HZ && remaining > 0)
			r.expires_ns = r.ts_ns + (__u64)remaining *
						 (1000000000ULL / CONFIG_HZ);
		else if (CONFIG_HZ)
			r.expires_ns = r.ts_ns;
	} else if (state != TCP_NEW_SYN_RECV) {
		struct tcp_sock *tp = bpf_skc_to_tcp_sock(skc);
		struct tcpscope_event q = {};

		if (!tp)
			return 0;
		if (state != TCP_LISTEN) {
			sock__read_queues((const struct sock *)tp, &q, true);
			r.rx_queue = q.rx_queue;
			r.tx_queue = q.tx_queue;
			/* Bounds the age of a CLOSE_WAIT found at start-up:
			 * the peer's FIN came with an ACK at or before it. */
			if (CONFIG_HZ) {
				__u32 ago = (__u32)bpf_jiffies64() -
					    BPF_CORE_READ(tp, rcv_tstamp);
				__u64 ago_ns = (__u64)ago *
					       (1000000000ULL / CONFIG_HZ);

				r.last_ack_ns = ago_ns < r.ts_ns ?
						r.ts_ns - ago_ns : 1;
			}
		}
		r.ino = BPF_CORE_READ(tp, inet_conn.icsk_inet.sk.sk_socket,
				      file, f_inode, i_ino);
		r.uid = BPF_CORE_READ(tp, inet_conn.icsk_inet.sk.sk_uid.val);
	}
	bpf_seq_write(seq, &r, sizeof(r));
	return 0;
}
