/* The eBPF side of backend/bpf_tracker.py (compiled by bcc; tracepoints only: this kernel has
 * no kprobes). Everything is keyed by the tgid of a tracked process; `tracked` holds the
 * tracked tgids, and a fork by a tracked process adds its child.
 *
 * Per tracked tgid it records:
 *  - dirty: the user pages written (exceptions:page_fault_user with the write bit, and
 *    exceptions:page_fault_kernel for user addresses the kernel writes on the task's behalf,
 *    e.g. read() into a buffer). Only writes that fault are seen: a first touch, a COW or a
 *    write-protected page (uffd-wp, mprotect). A write to a present writable page is not.
 *    Key: (tgid << 40) | (page address >> 8), so userspace can select one tgid by sorting
 *    and turn keys into addresses with byte copies.
 *  - events (ring buffer): address-space changes (mmap family), fd-table changes and lseek,
 *    with the syscall's arguments and result; fork, exec and exit of tracked processes.
 *  - io_calls: the read/write family counted per (tgid, fd, syscall), not one event each
 *    (they move file positions, but a busy reader would flood the ring buffer).
 * A tgid whose dirty set or events could not all be recorded is flagged in `tracked`
 * (dirty_lost, events_lost): its record is incomplete and must not be trusted.
 */
#include <uapi/linux/ptrace.h>
#include <uapi/linux/sched.h>
#include <asm/unistd.h>

#define TRACKED_MAX 8192
#define DIRTY_MAX (1 << 19)
#define PENDING_MAX 16384
#define IO_MAX 65536
#define TGID_SHIFT 40
#define ADDR_SHIFT 8
#define ADDR_LIMIT (1ULL << 48)      /* addresses above need more than 40 key bits */
#define PATH_LEN 128

enum kind { K_NONE, K_MM, K_FD, K_IO, K_TASK, K_SIG };
enum event_type { EV_SYSCALL = 1, EV_FORK, EV_EXEC, EV_EXIT };

struct tracked_t {
    u32 root;          /* the tgid whose tree this one belongs to */
    u32 dirty_lost;    /* a dirty page could not be recorded */
    u32 events_lost;   /* an event or io count could not be recorded */
    u32 unused;
};

struct pending_t {     /* a tracked thread's syscall between enter and exit */
    s64 nr;
    u64 args[6];
    u64 clone_flags;
};

struct io_key_t {
    u32 tgid;
    s32 fd;
    s64 nr;
};

struct event_t {
    u32 type;
    u32 tgid;
    u32 tid;
    u32 other;         /* syscall: its kind; fork: the child; exec: the old tid */
    s64 nr;
    u64 args[6];
    s64 ret;
    s32 fds[2];        /* pipe, pipe2, socketpair: the two new fds */
    char path[PATH_LEN];   /* open family: the path; exec: the file name */
};

BPF_HASH(tracked, u32, struct tracked_t, TRACKED_MAX);
BPF_F_TABLE("hash", u64, u8, dirty, DIRTY_MAX, BPF_F_NO_PREALLOC);
BPF_HASH(pending, u32, struct pending_t, PENDING_MAX);
BPF_HASH(io_calls, struct io_key_t, u64, IO_MAX);
BPF_RINGBUF_OUTPUT(events, 1 << 10);            /* pages: 4 MiB */

static __always_inline int syscall_kind(s64 nr)
{
    switch (nr) {
    case __NR_mmap: case __NR_munmap: case __NR_mremap: case __NR_mprotect:
    case __NR_pkey_mprotect: case __NR_brk: case __NR_madvise: case __NR_shmat:
    case __NR_shmdt: case __NR_remap_file_pages:
    /* VM_LOCKED changes with the maps lines left as they are */
    case __NR_mlock: case __NR_mlock2: case __NR_munlock: case __NR_mlockall:
    case __NR_munlockall:
        return K_MM;
    case __NR_open: case __NR_openat: case __NR_openat2: case __NR_creat:
    case __NR_open_by_handle_at: case __NR_close: case __NR_close_range:
    case __NR_dup: case __NR_dup2: case __NR_dup3: case __NR_fcntl:
    case __NR_pipe: case __NR_pipe2: case __NR_socket: case __NR_socketpair:
    case __NR_accept: case __NR_accept4: case __NR_eventfd: case __NR_eventfd2:
    case __NR_epoll_create: case __NR_epoll_create1: case __NR_signalfd:
    case __NR_signalfd4: case __NR_timerfd_create: case __NR_memfd_create:
    case __NR_inotify_init: case __NR_inotify_init1: case __NR_userfaultfd:
    case __NR_pidfd_open: case __NR_pidfd_getfd: case __NR_perf_event_open:
    case __NR_io_uring_setup: case __NR_fanotify_init: case __NR_lseek:
        return K_FD;
    case __NR_read: case __NR_write: case __NR_pread64: case __NR_pwrite64:
    case __NR_readv: case __NR_writev: case __NR_preadv: case __NR_pwritev:
    case __NR_preadv2: case __NR_pwritev2: case __NR_sendfile:
    case __NR_copy_file_range:
        return K_IO;
    case __NR_clone: case __NR_clone3: case __NR_fork: case __NR_vfork:
        return K_TASK;
    case __NR_rt_sigaction:                       /* the only way a handler is set */
        return K_SIG;
    }
    return K_NONE;
}

static __always_inline void note_write(u64 address, u64 error_code)
{
    if (!(error_code & 2))                       /* bit 1: a write */
        return;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct tracked_t *t = tracked.lookup(&tgid);
    if (!t)
        return;
    if (address >= ADDR_LIMIT) {
        t->dirty_lost = 1;
        return;
    }
    u64 key = ((u64)tgid << TGID_SHIFT) | ((address & ~4095ULL) >> ADDR_SHIFT);
    u8 one = 1;
    int err = dirty.insert(&key, &one);
    if (err && err != -EEXIST)
        t->dirty_lost = 1;
}

TRACEPOINT_PROBE(exceptions, page_fault_user)
{
    note_write(args->address, args->error_code);
    return 0;
}

TRACEPOINT_PROBE(exceptions, page_fault_kernel)
{
    if (!(args->address >> 63))                  /* a user page written by the kernel */
        note_write(args->address, args->error_code);
    return 0;
}

TRACEPOINT_PROBE(raw_syscalls, sys_enter)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    struct tracked_t *t = tracked.lookup(&tgid);
    if (!t)
        return 0;
    s64 nr = args->id;
    int kind = syscall_kind(nr);
    if (kind == K_NONE)
        return 0;
    struct pending_t p = {};
    p.nr = nr;
#pragma unroll
    for (int i = 0; i < 6; i++)
        p.args[i] = args->args[i];
    if (nr == __NR_clone)
        p.clone_flags = p.args[0];
    else if (nr == __NR_clone3)                  /* struct clone_args starts with the flags */
        bpf_probe_read_user(&p.clone_flags, sizeof(p.clone_flags), (void *)p.args[0]);
    if (pending.update(&tid, &p))               /* a fork or event would go unseen */
        t->events_lost = 1;
    return 0;
}

static __always_inline void count_io(struct tracked_t *t, u32 tgid, s64 fd, s64 nr)
{
    struct io_key_t key = {.tgid = tgid, .fd = (s32)fd, .nr = nr};
    u64 zero = 0;
    u64 *n = io_calls.lookup_or_try_init(&key, &zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    else
        t->events_lost = 1;
}

TRACEPOINT_PROBE(raw_syscalls, sys_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    struct pending_t *p = pending.lookup(&tid);
    if (!p)
        return 0;
    struct tracked_t *t = tracked.lookup(&tgid);
    int kind = syscall_kind(p->nr);
    if (!t || kind == K_TASK) {                  /* forks are seen by sched_process_fork */
        pending.delete(&tid);
        return 0;
    }
    if (kind == K_IO) {
        count_io(t, tgid, p->args[0], p->nr);
        if (p->nr == __NR_sendfile)              /* sendfile(out, in, ...) moves in's position */
            count_io(t, tgid, p->args[1], p->nr);
        else if (p->nr == __NR_copy_file_range)  /* (fd_in, off_in, fd_out, ...) */
            count_io(t, tgid, p->args[2], p->nr);
        pending.delete(&tid);
        return 0;
    }
    struct event_t *e = events.ringbuf_reserve(sizeof(struct event_t));
    if (!e) {
        t->events_lost = 1;
        pending.delete(&tid);
        return 0;
    }
    e->type = EV_SYSCALL;
    e->tgid = tgid;
    e->tid = tid;
    e->other = kind;                            /* K_MM, K_FD or K_SIG */
    e->nr = p->nr;
#pragma unroll
    for (int i = 0; i < 6; i++)
        e->args[i] = p->args[i];
    e->ret = args->ret;
    e->fds[0] = e->fds[1] = -1;
    e->path[0] = 0;
    if (args->ret == 0 && (p->nr == __NR_pipe || p->nr == __NR_pipe2))
        bpf_probe_read_user(e->fds, sizeof(e->fds), (void *)p->args[0]);
    else if (args->ret == 0 && p->nr == __NR_socketpair)
        bpf_probe_read_user(e->fds, sizeof(e->fds), (void *)p->args[3]);
    else if (p->nr == __NR_open || p->nr == __NR_creat)
        bpf_probe_read_user_str(e->path, sizeof(e->path), (void *)p->args[0]);
    else if (p->nr == __NR_openat || p->nr == __NR_openat2)
        bpf_probe_read_user_str(e->path, sizeof(e->path), (void *)p->args[1]);
    events.ringbuf_submit(e, 0);
    pending.delete(&tid);
    return 0;
}

static __always_inline void emit_task_event(struct tracked_t *t, u32 type, u32 tgid,
                                            u32 tid, u32 other)
{
    struct event_t *e = events.ringbuf_reserve(sizeof(struct event_t));
    if (!e) {
        t->events_lost = 1;
        return;
    }
    __builtin_memset(e, 0, sizeof(*e));
    e->type = type;
    e->tgid = tgid;
    e->tid = tid;
    e->other = other;
    e->fds[0] = e->fds[1] = -1;
    events.ringbuf_submit(e, 0);
}

TRACEPOINT_PROBE(sched, sched_process_fork)
{
    /* runs in the parent; a new thread (CLONE_THREAD) is no new process. No pending syscall:
     * a task the kernel made (an io_uring worker), a thread of ours, not a process */
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    struct tracked_t *t = tracked.lookup(&tgid);
    if (!t)
        return 0;
    struct pending_t *p = pending.lookup(&tid);
    if (!p || (p->clone_flags & CLONE_THREAD))
        return 0;
    u32 child = args->child_pid;
    struct tracked_t c = {.root = t->root};
    if (tracked.update(&child, &c)) {
        t->events_lost = 1;
        return 0;
    }
    emit_task_event(t, EV_FORK, tgid, tid, child);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    struct tracked_t *t = tracked.lookup(&tgid);
    if (!t)
        return 0;
    struct event_t *e = events.ringbuf_reserve(sizeof(struct event_t));
    if (!e) {
        t->events_lost = 1;
        return 0;
    }
    __builtin_memset(e, 0, sizeof(*e));
    e->type = EV_EXEC;
    e->tgid = tgid;
    e->tid = (u32)id;
    e->other = args->old_pid;
    e->fds[0] = e->fds[1] = -1;
    TP_DATA_LOC_READ_STR(e->path, filename, sizeof(e->path));
    events.ringbuf_submit(e, 0);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    pending.delete(&tid);                       /* a syscall that never returns */
    if (!args->group_dead)
        return 0;
    struct tracked_t *t = tracked.lookup(&tgid);
    if (!t)
        return 0;
    emit_task_event(t, EV_EXIT, tgid, tid, 0);
    tracked.delete(&tgid);
    return 0;
}
