// SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0)
// Change-block tracking for failback-agent: reports every bio that changes content
// (write, discard, write-zeroes, secure erase...) on the devices listed in `targets`.
//
// Attached to two tracepoints: block:block_bio_queue (when a bio is submitted; covers
// bio-based devices) and block:block_rq_complete (when a request's data is on the device;
// marking again at completion closes the race "bit taken at a round's cut, block read before
// the write landed").  Field offsets come from the kernel's BTF at load time (CO-RE), because
// they differ between kernel versions (rq_complete gained `ioprio` in 6.x).
//
// A record the ring buffer has no room for increments `lost[0]`; user space then marks every
// tracked disk wholly dirty (a hash-compare round) — never a silent gap.

typedef unsigned char __u8;
typedef unsigned int __u32;
typedef unsigned long long __u64;

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int (*name)[val]
#define __type(name, val) typeof(val) *name

#define BPF_MAP_TYPE_HASH 1
#define BPF_MAP_TYPE_ARRAY 2
#define BPF_MAP_TYPE_RINGBUF 27

static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static long (*bpf_probe_read_kernel)(void *dst, __u32 size, const void *src) = (void *)113;
static void *(*bpf_ringbuf_reserve)(void *ringbuf, __u64 size, __u64 flags) = (void *)131;
static void (*bpf_ringbuf_submit)(void *data, __u64 flags) = (void *)132;

#define READ_FIELD(dst, src) bpf_probe_read_kernel(&(dst), sizeof(dst), &(src))

/* Tracepoint contexts; only the fields used. preserve_access_index makes every offset a
 * CO-RE relocation against the running kernel's BTF. */
struct trace_event_raw_block_bio {
	__u32 dev;
	__u64 sector;
	__u32 nr_sector;
	char rwbs[10];
} __attribute__((preserve_access_index));

struct trace_event_raw_block_rq_completion {
	__u32 dev;
	__u64 sector;
	__u32 nr_sector;
	char rwbs[10];
} __attribute__((preserve_access_index));

struct event {
	__u32 dev;
	__u32 nr_sector;
	__u64 sector;
};

/* Kernel dev_t (major << 20 | minor) of each tracked device -> 1. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u8);
} targets SEC(".maps");

/* [0]: records dropped because the ring buffer was full. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} lost SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 * 1024 * 1024);
} events SEC(".maps");

/* True unless the operation is a read (or a bare flush of no data): what is not known to
 * leave the content alone counts as a change.  rwbs is "[F]<op>[flags]": an optional F
 * (preflush) then R, W, D (discard/secure erase), N (write-zeroes and others)... */
static __attribute__((always_inline)) int changes(const char *rwbs, __u32 nr_sector)
{
	char op = rwbs[0] == 'F' ? rwbs[1] : rwbs[0];
	if (nr_sector == 0)
		return 0;
	return op != 'R';
}

static __attribute__((always_inline)) int report(__u32 dev, __u64 sector, __u32 nr_sector,
						 const char *rwbs)
{
	if (!bpf_map_lookup_elem(&targets, &dev) || !changes(rwbs, nr_sector))
		return 0;
	struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		__u32 zero = 0;
		__u64 *n = bpf_map_lookup_elem(&lost, &zero);
		if (n)
			__sync_fetch_and_add(n, 1);
		return 0;
	}
	e->dev = dev;
	e->sector = sector;
	e->nr_sector = nr_sector;
	bpf_ringbuf_submit(e, 0);
	return 0;
}

SEC("tracepoint/block/block_bio_queue")
int bio_queue(struct trace_event_raw_block_bio *ctx)
{
	__u32 dev = 0, nr = 0;
	__u64 sector = 0;
	char rwbs[8] = {};
	READ_FIELD(dev, ctx->dev);
	READ_FIELD(sector, ctx->sector);
	READ_FIELD(nr, ctx->nr_sector);
	READ_FIELD(rwbs, ctx->rwbs);
	return report(dev, sector, nr, rwbs);
}

SEC("tracepoint/block/block_rq_complete")
int rq_complete(struct trace_event_raw_block_rq_completion *ctx)
{
	__u32 dev = 0, nr = 0;
	__u64 sector = 0;
	char rwbs[8] = {};
	READ_FIELD(dev, ctx->dev);
	READ_FIELD(sector, ctx->sector);
	READ_FIELD(nr, ctx->nr_sector);
	READ_FIELD(rwbs, ctx->rwbs);
	return report(dev, sector, nr, rwbs);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
