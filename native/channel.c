/*
 * slitter._channel: a one-way ring of handles, from one sending thread to
 * one receiving thread, in any two processes attached to the same arena
 * (doc/design.md (f), doc/fast_path.md "Channels").
 *
 * Why it exists: handles are how processes share objects, and a
 * multiprocessing Pipe or Semaphore costs 12-15 us per hand-off here (a
 * system call on each side and a sleep/wake-up), 200 ns per object in
 * batches of 64: more than allocating, writing, reading and releasing the
 * object together.  A ring in shared memory costs a few cache-line
 * transfers per batch while both sides keep up, and sleeps in the kernel
 * (futex) only when one side has waited past a short spin.
 *
 * The ring is a slitter object of its own class ("slitter.channel.N"), so
 * every attached process already maps it and its handle is all another
 * process needs.  Layout: three cache lines of header, then `capacity`
 * 8-byte slots (a power of two).  The sender owns `head` (handles ever
 * published), the receiver owns `tail` (handles ever taken); each reads the
 * other's with acquire loads.  Single sender and single receiver are
 * enforced: the first send (receive) claims the channel for its thread
 * with one compare-and-swap; every later one compares one word, and a
 * claim whose thread has exited passes to the next thread that asks.
 *
 * Nothing here trusts the shared header for memory safety: the capacity
 * comes from the caller's own copy and must match the header's, the ring
 * must lie inside the caller's arena buffer, and every slot index is
 * masked, so stray writes to head or tail can lose or repeat handles but
 * never make this code touch memory outside the ring.
 *
 * This module holds no allocator state and makes no allocator decision:
 * the handles it carries are plain integers, checked by whoever uses them
 * (Class.check, release).  It is a CPython extension, not part of the cffi
 * module, because it blocks: it releases the GIL while it waits, which the
 * cffi module never does (native/build_ffi.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define CHANNEL_MAGIC 0x314e414843544c53ULL /* "SLTCHAN1" */
#define LINE 64

struct channel {
    /* Line 0: set by the creator; then only the claims and `closed` change. */
    uint64_t magic;            /* cleared when the channel is released */
    uint64_t capacity;         /* slots, a power of two */
    uint64_t serial;           /* a random number of this channel's life: a stale Channel of a reused object differs */
    uint64_t sender;           /* the sending thread's token (token()), claimed by its first send; 0: none */
    uint64_t receiver;         /* the same for the receiving thread */
    uint32_t closed;           /* no more sends: set by either side, never cleared */
    uint8_t pad0[LINE - 44];
    /* Line 1: the sender's.  head changes once per batch. */
    uint64_t head;
    uint32_t receiver_wake;    /* futex word the receiver sleeps on; bumped to wake it */
    uint32_t receiver_sleeping; /* how many threads sleep on receiver_wake (recv, wait_any) */
    uint8_t pad1[LINE - 16];
    /* Line 2: the receiver's. */
    uint64_t tail;
    uint32_t sender_wake;
    uint32_t sender_sleeping;
    uint8_t pad2[LINE - 16];
    uint64_t slots[];
};

_Static_assert(sizeof(struct channel) == 3 * LINE, "three header lines");

/* Status codes, returned with a count; the Python side turns them into exceptions. */
enum { CH_OK = 0, CH_TIMEOUT = 1, CH_CLOSED = 2, CH_IN_USE = 3, CH_STALE = 4, CH_SELF = 5, CH_PEER_GONE = 6 };

/*
 * How long a side spins before it sleeps, and how.  A futex sleep and
 * wake-up costs the sleeper 5-10 us of latency and the waker a system
 * call; a peer that is merely mid-batch publishes within a few
 * microseconds.  Each turn of the spin yields the CPU (sched_yield): on a
 * machine with more runnable processes than cores (four producers and a
 * consumer on two), a waiter that spins with `pause` takes the very core
 * its peer needs.  Measured (bench/peers.py streaming, 64 B, four
 * producers on 2 cores): a 20 us `pause` spin ran at 0.76x the ring's rate,
 * a 2 us one at 0.90x, a 5 us yielding one at 1.21x; with one producer all
 * were within noise of each other.  When nothing else wants the core the
 * yield returns at once, and the spin is a loop of system calls.
 */
#define SPIN_NS 5000
/* The longest sleep between looks at Python's signal flag: a signal that lands just before the futex wait. */
#define SIGNAL_CHECK_NS 50000000
/*
 * How long a side waits before it asks whether its peer is gone (peer_gone:
 * a kill() and a read of /proc, some microseconds), and then between asks.
 * A live peer mostly answers well within it, so the probe costs a stream
 * nothing; a dead one is noticed within about two of it.
 */
#define PROBE_AFTER_NS 50000000

#define load_acquire(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define load_relaxed(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define store_release(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define store_relaxed(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
#define full_fence() __atomic_thread_fence(__ATOMIC_SEQ_CST)

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* A shared (not FUTEX_PRIVATE) wait: the word is in memory several processes map. */
static int futex_wait(uint32_t *word, uint32_t expected, int64_t timeout_ns)
{
    struct timespec ts = {.tv_sec = timeout_ns / 1000000000, .tv_nsec = timeout_ns % 1000000000};
    return (int)syscall(SYS_futex, word, FUTEX_WAIT, expected, &ts, NULL, 0);
}

static void futex_wake(uint32_t *word)
{
    syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

/*
 * The other side published (or took) and may be asleep: wake it.  The
 * fence orders our head/tail store before the load of its flag; the
 * sleeper stores its flag and fences before it looks at head/tail again
 * (sleep_until), so at least one of the two sees the other (Dekker).  The
 * cost while nobody sleeps: one fence and one load per batch.
 */
static void wake_if_sleeping(uint32_t *sleeping, uint32_t *wake)
{
    full_fence();
    if (load_relaxed(sleeping)) {
        __atomic_fetch_add(wake, 1, __ATOMIC_SEQ_CST);
        futex_wake(wake);
    }
}

static void wake_both(struct channel *ch)
{
    full_fence();
    __atomic_fetch_add(&ch->receiver_wake, 1, __ATOMIC_SEQ_CST);
    __atomic_fetch_add(&ch->sender_wake, 1, __ATOMIC_SEQ_CST);
    futex_wake(&ch->receiver_wake);
    futex_wake(&ch->sender_wake);
}

/*
 * A claim's token: pid << 42 | tid << 20 | the process's start fingerprint.
 * pids and tids are below 2^22 (the kernel's PID_MAX_LIMIT).  The
 * fingerprint is the process's start time (clock ticks since boot, field 22
 * of /proc/PID/stat) mod 2^20 - 1, plus 1; 0 where /proc could not be read.
 * It tells the claimant from a new process that reuses its pid after it is
 * gone: without it a side waiting for a crashed peer would find the pid
 * alive again and wait forever.
 */
#define TOKEN_PID_SHIFT 42
#define TOKEN_TID_SHIFT 20
#define TOKEN_ID_MASK 0x3FFFFFu
#define TOKEN_START_MASK 0xFFFFFu

static pid_t token_pid(uint64_t t) { return (pid_t)(t >> TOKEN_PID_SHIFT); }
static pid_t token_tid(uint64_t t) { return (pid_t)(t >> TOKEN_TID_SHIFT & TOKEN_ID_MASK); }
static uint32_t token_start(uint64_t t) { return (uint32_t)(t & TOKEN_START_MASK); }

/*
 * The state letter and start fingerprint of process `pid` from
 * /proc/PID/stat.  1: read; 0: no such process (ENOENT); -1: unreadable.
 */
static int read_stat(pid_t pid, char *state, uint32_t *start)
{
    char path[40], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT ? 0 : -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = 0;
    const char *p = strrchr(buf, ')');   /* the command name may hold spaces and parentheses */
    if (p == NULL || p[1] != ' ')
        return -1;
    *state = p[2];
    for (int field = 2; field < 22; field++) {  /* p + 1 starts field 3, the state; field 22 is the start time */
        p = strchr(p + 1, ' ');
        if (p == NULL)
            return -1;
    }
    unsigned long long ticks = strtoull(p + 1, NULL, 10);
    *start = (uint32_t)(ticks % TOKEN_START_MASK) + 1;
    return 1;
}

/*
 * This thread's token, asked of the kernel once per thread (and /proc once
 * per process).  A forked child's one thread has the forking thread's
 * cache, so the child forgets it (forget_token, registered with
 * pthread_atfork); the process's fingerprint is keyed by its pid.
 */
static __thread uint64_t my_token;
static pid_t start_pid;
static uint32_t my_start;

static void forget_token(void)
{
    my_token = 0;
}

static uint64_t token(void)
{
    if (my_token == 0) {
        pid_t pid = getpid();
        if (load_acquire(&start_pid) != pid) {  /* two threads here at once find and store the same */
            char state;
            uint32_t start = 0;
            if (read_stat(pid, &state, &start) != 1)
                start = 0;
            store_relaxed(&my_start, start);
            store_release(&start_pid, pid);
        }
        my_token = (uint64_t)pid << TOKEN_PID_SHIFT | (uint64_t)(uint32_t)syscall(SYS_gettid) << TOKEN_TID_SHIFT |
                   load_relaxed(&my_start);
    }
    return my_token;
}

/*
 * The process that made a token is gone: exited, a zombie that its parent
 * has not reaped yet, or its pid is another process's now (the start
 * fingerprint differs).  kill(pid, 0) still succeeds on a zombie, and the
 * side waiting for it may be that very parent, blocked here; so a live
 * pid's state letter is read from /proc (Z or X: dead).  An unreadable
 * state counts as alive, as does another user's process that /proc does
 * not show (mounted with hidepid): the start time cannot be checked then.
 */
static int process_gone(uint64_t t)
{
    pid_t pid = token_pid(t);
    int signalled = kill(pid, 0) == 0;
    if (!signalled && errno == ESRCH)
        return 1;
    char state;
    uint32_t start;
    int r = read_stat(pid, &state, &start);
    if (r < 0)
        return 0;
    if (r == 0)  /* no entry: exited since the kill found it (gone), or, when the kill said EPERM, another */
        return signalled;  /* user's process that /proc hides (hidepid), which counts as alive */
    return state == 'Z' || state == 'X' || (token_start(t) != 0 && start != token_start(t));
}

/*
 * The thread behind a token has exited (its process may be alive): its
 * claim may pass on.  A process's other threads leave at once, but its
 * main thread stays a zombie until the parent reaps the process, and
 * tgkill still finds it; and a pid may have been reused: so the process
 * is asked too.
 */
static int token_gone(uint64_t t)
{
    if (syscall(SYS_tgkill, token_pid(t), token_tid(t), 0) < 0)
        return errno == ESRCH;
    return process_gone(t);
}

/*
 * The other side's claim is held by a process that is gone (a producer
 * that crashed, or exited without closing): the wait for it would never
 * end.  Returns that claim's token, or 0.  Asked only where a side sleeps
 * or times out, never on a transfer: a kill() and, for a live pid, a read
 * of /proc.  A thread that exited in a live process is not a gone peer:
 * another thread of it may take the side over, as a pool's threads take
 * turns.  0 for an unclaimed side (it has not come yet) and for a claim
 * of our own process (CH_SELF's case among them).
 */
static uint64_t peer_gone(struct channel *ch, int receiver)
{
    uint64_t peer = load_acquire(receiver ? &ch->sender : &ch->receiver);
    return peer != 0 && token_pid(peer) != token_pid(token()) && process_gone(peer) ? peer : 0;
}

/*
 * What a waiter waits on: `n` channels (several only for a receiver's
 * wait_any).  A receiver waits for a handle: head past its own tail.  A
 * sender (one channel) waits for room: tail moved from `tail_seen`.
 */
struct watch {
    struct channel **chs;
    int n;
    int receiver;
    uint64_t tail_seen;          /* a sender's: the tail it found the ring full at */
    int first;                   /* where the scan starts: wait_any's round robin */
};

/* The first ready channel from w->first on, wrapping round; or -1.  A consumer that starts each wait
 * after the channel it took from last serves busy producers in turn: one that is always ready cannot
 * starve the ones after it. */
static int watched_ready(const struct watch *w)
{
    for (int k = 0, i = w->first; k < w->n; k++, i = i + 1 == w->n ? 0 : i + 1) {
        struct channel *ch = w->chs[i];
        if (load_acquire(&ch->closed))
            return i;
        if (w->receiver ? load_acquire(&ch->head) != load_relaxed(&ch->tail)
                        : load_acquire(&ch->tail) != w->tail_seen)
            return i;
    }
    return -1;
}

/* The first watched channel whose other side is gone, with its token in *gone; or -1. */
static int watched_gone(const struct watch *w, uint64_t *gone)
{
    for (int i = 0; i < w->n; i++)
        if ((*gone = peer_gone(w->chs[i], w->receiver)) != 0)
            return i;
    return -1;
}

static uint32_t *sleeping_word(const struct watch *w, int i)
{
    return w->receiver ? &w->chs[i]->receiver_sleeping : &w->chs[i]->sender_sleeping;
}

/*
 * Wait, without the GIL, until a watched channel is ready (its index
 * moved, or it was closed): spin up to SPIN_NS yielding the CPU, then sleep
 * on the futex words (futex_waitv for several, Linux 5.16; on an older
 * kernel, on the first word for at most a millisecond at a time).
 * Once it has slept PROBE_AFTER_NS, before each further sleep it also asks
 * whether a channel's other side is gone (watched_gone): then that index,
 * with the gone claim's token in *gone.
 * deadline_ns < 0: no deadline.  Returns the ready index, -1 on timeout,
 * or -2 with a Python exception set (a signal handler raised).
 */
static int sleep_until(const struct watch *w, int64_t deadline_ns, uint64_t *gone)
{
    *gone = 0;
    int found = watched_ready(w);
    if (found >= 0)
        return found;
    if (deadline_ns >= 0 && now_ns() >= deadline_ns)
        return -1;  /* timeout 0: one look, the GIL kept */
    struct futex_waitv waiters[FUTEX_WAITV_MAX];
    PyThreadState *gil = PyEval_SaveThread();
    int64_t start = now_ns(), t;
    while ((found = watched_ready(w)) < 0) {
        t = now_ns();
        if ((deadline_ns >= 0 && t >= deadline_ns) || t - start >= SPIN_NS)
            break;
        sched_yield();
    }
    /* Count this waiter in each channel's sleeping word once, for the whole sleep: a count, not a flag,
     * since a receiver in recv and a thread in wait_any may sleep on one channel at once. */
    for (int i = 0; i < w->n; i++)
        __atomic_fetch_add(sleeping_word(w, i), 1, __ATOMIC_RELAXED);
    int64_t checked = now_ns();  /* when Python's signal flag was last looked at */
    int64_t probed = checked;    /* when the peers were last asked about, or the sleep began */
    while (found < 0) {
        for (int i = 0; i < w->n; i++) {
            uint32_t *wake = w->receiver ? &w->chs[i]->receiver_wake : &w->chs[i]->sender_wake;
            waiters[i] = (struct futex_waitv){.val = load_acquire(wake), .uaddr = (uintptr_t)wake, .flags = FUTEX_32};
        }
        full_fence();
        if ((found = watched_ready(w)) >= 0)
            break;
        t = now_ns();
        if (t - probed >= PROBE_AFTER_NS) {
            probed = t;
            if ((found = watched_gone(w, gone)) >= 0)
                break;
        }
        if (deadline_ns >= 0 && t >= deadline_ns)
            break;
        int64_t nap = deadline_ns >= 0 && deadline_ns - t < SIGNAL_CHECK_NS ? deadline_ns - t : SIGNAL_CHECK_NS;
        uint32_t *first = (uint32_t *)(uintptr_t)waiters[0].uaddr;
        long r;
        if (w->n == 1) {
            r = futex_wait(first, (uint32_t)waiters[0].val, nap);
        } else {
            struct timespec until = {.tv_sec = (t + nap) / 1000000000, .tv_nsec = (t + nap) % 1000000000};
            r = syscall(SYS_futex_waitv, waiters, (unsigned)w->n, 0, &until, CLOCK_MONOTONIC);
        }
        int err = r < 0 ? errno : 0;
        if (err && err != EAGAIN && err != EINTR && err != ETIMEDOUT) {
            /* Refused: futex_waitv before Linux 5.16 (ENOSYS) or under an older seccomp profile (EPERM).
             * A millisecond on the first word instead, or plain sleep: never a hot loop. */
            struct timespec ms = {0, 1000000};
            if (futex_wait(first, (uint32_t)waiters[0].val, 1000000) < 0 && errno != EAGAIN && errno != EINTR &&
                errno != ETIMEDOUT)
                nanosleep(&ms, NULL);
        }
        t = now_ns();
        if (err == EINTR || t - checked >= SIGNAL_CHECK_NS) {
            /* A signal, or SIGNAL_CHECK_NS gone by: let Python run its handlers, which may raise. */
            checked = t;
            PyEval_RestoreThread(gil);
            int raised = PyErr_CheckSignals() < 0;
            gil = PyEval_SaveThread();
            if (raised) {
                found = -2;
                break;
            }
        }
        found = watched_ready(w);
    }
    for (int i = 0; i < w->n; i++)
        __atomic_fetch_sub(sleeping_word(w, i), 1, __ATOMIC_RELAXED);
    PyEval_RestoreThread(gil);
    return found;
}

/* The channel at `offset` of the arena buffer, checked against the caller's capacity; NULL with an exception. */
static struct channel *channel_at(Py_buffer *arena, PyObject *offset_obj, PyObject *capacity_obj,
                                  uint64_t *capacity)
{
    unsigned long long offset = PyLong_AsUnsignedLongLong(offset_obj);
    if (offset == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    unsigned long long cap = PyLong_AsUnsignedLongLong(capacity_obj);
    if (cap == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (cap == 0 || (cap & (cap - 1)) != 0 || cap > (1ULL << 32)) {
        PyErr_Format(PyExc_ValueError, "channel capacity %llu is not a power of two up to 2**32", cap);
        return NULL;
    }
    if (offset % 8 != 0 || offset > (unsigned long long)arena->len ||
        (unsigned long long)arena->len - offset < sizeof(struct channel) + cap * 8) {
        PyErr_Format(PyExc_ValueError, "no channel of %llu slots fits at offset %#llx of the arena", cap, offset);
        return NULL;
    }
    *capacity = cap;
    return (struct channel *)((char *)arena->buf + offset);
}

/* args[0..3]: arena, offset, capacity, serial.  The serial is checked by the caller (live()). */
static int parse(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, const char *name, Py_buffer *arena,
                 struct channel **ch, uint64_t *capacity, uint64_t *serial)
{
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments", name, want);
        return -1;
    }
    if (PyObject_GetBuffer(args[0], arena, PyBUF_WRITABLE) < 0)
        return -1;
    *ch = channel_at(arena, args[1], args[2], capacity);
    if (*ch != NULL && serial != NULL) {
        *serial = PyLong_AsUnsignedLongLong(args[3]);
        if (PyErr_Occurred())
            *ch = NULL;
    }
    if (*ch == NULL) {
        PyBuffer_Release(arena);
        return -1;
    }
    return 0;
}

/* The channel is still the one the caller opened: not released, not released and made again. */
static int live(struct channel *ch, uint64_t capacity, uint64_t serial)
{
    return load_acquire(&ch->magic) == CHANNEL_MAGIC && load_relaxed(&ch->capacity) == capacity &&
           load_relaxed(&ch->serial) == serial;
}

static int64_t deadline_of(PyObject *timeout)
{
    if (timeout == Py_None)
        return -1;
    double t = PyFloat_AsDouble(timeout);
    if (t == -1.0 && PyErr_Occurred())
        return -2;
    if (!(t >= 0)) {
        PyErr_SetString(PyExc_ValueError, "timeout must be None or >= 0");
        return -2;
    }
    if (t > 1e9)
        return -1;
    return now_ns() + (int64_t)(t * 1e9);
}

/*
 * Claim `*claim` for this thread, or see that it is ours: one load once
 * claimed.  A claim whose thread has exited is taken over, with one
 * compare-and-swap so that two takers cannot both win.  0: another live
 * thread holds it; 1: this thread held it already; 2: this call took it.
 */
static int claimed(uint64_t *claim)
{
    uint64_t me = token(), owner = load_acquire(claim);
    if (owner == me)
        return 1;
    if (owner != 0 && !token_gone(owner))
        return 0;
    return __atomic_compare_exchange_n(claim, &owner, me, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE) ? 2 : 0;
}


/*
 * One side's wait on one channel: a receiver's for a handle, a sender's
 * for tail to move from `tail_seen` (or for the channel to close).
 * `took`: claimed()'s answer for this call's side.
 * CH_OK: look again; CH_TIMEOUT; CH_SELF
 * when this thread holds the other side's claim too and there is no
 * timeout, so that nothing but itself could end the wait (a claim this call
 * took is given back: the call did nothing); CH_STALE when
 * the channel was released while it waited (the object may be another
 * channel by now: its ring must not be touched); -2 with a Python
 * exception set; CH_PEER_GONE, with the gone claim's token in *peer, when
 * the other side's process is gone and the ring is still empty (full, for
 * a sender): seen once it has slept PROBE_AFTER_NS, or at a timeout of at
 * least that.
 */
static int wait_one(struct channel *ch, int receiver, int took, uint64_t tail_seen, int64_t deadline,
                    uint64_t capacity, uint64_t serial, uint64_t *peer)
{
    uint64_t *other = receiver ? &ch->sender : &ch->receiver;
    if (deadline == -1 && load_relaxed(other) == token()) {
        if (took == 2)  /* this call took its own side's claim, and did nothing: give it back */
            store_release(receiver ? &ch->receiver : &ch->sender, 0);
        return CH_SELF;
    }
    struct channel *one[1] = {ch};
    struct watch w = {one, 1, receiver, tail_seen, 0};
    uint64_t gone;
    int64_t began = deadline >= 0 ? now_ns() : 0;
    int r = sleep_until(&w, deadline, &gone);
    if (r == -2)
        return -2;
    if (!live(ch, capacity, serial))
        return CH_STALE;
    if (gone == 0 && r == -1 && deadline - began >= PROBE_AFTER_NS)  /* a timeout that long: ask once more */
        gone = peer_gone(ch, receiver);
    /* Still that claim, and still nothing to do: else another process took the side over and may have sent
     * (taken) meanwhile, and the caller looks again. */
    if (gone != 0 && load_acquire(other) == gone && watched_ready(&w) < 0) {
        *peer = gone;
        return CH_PEER_GONE;
    }
    return r == -1 ? CH_TIMEOUT : CH_OK;
}

/* Release the call's two buffers and return (count, status, gone peer's token or 0), or NULL (fail: an
 * exception is set). */
static PyObject *finish(Py_buffer *handles, Py_buffer *arena, int fail, uint64_t count, int status, uint64_t peer)
{
    PyBuffer_Release(handles);
    PyBuffer_Release(arena);
    return fail ? NULL : Py_BuildValue("(KiK)", (unsigned long long)count, status, (unsigned long long)peer);
}

/*
 * The arguments of send and recv: (arena, offset, capacity, serial, buffer,
 * timeout).  The buffer holds whole 8-byte handles (recv's is writable and
 * not empty).  -1 with an exception and nothing held; 0 with both buffers held.
 */
static int parse_transfer(PyObject *const *args, Py_ssize_t nargs, const char *name, int writable, Py_buffer *arena,
                          struct channel **ch, uint64_t *capacity, uint64_t *serial, Py_buffer *buf,
                          int64_t *deadline)
{
    if (parse(args, nargs, 6, name, arena, ch, capacity, serial) < 0)
        return -1;
    if (PyObject_GetBuffer(args[4], buf, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(arena);
        return -1;
    }
    if (buf->len % 8 != 0 || (writable && buf->len == 0))
        PyErr_Format(PyExc_ValueError, "%s: the buffer is not %s8-byte handles", name, writable ? "one or more " : "whole ");
    else if ((*deadline = deadline_of(args[5])) != -2)
        return 0;
    PyBuffer_Release(buf);
    PyBuffer_Release(arena);
    return -1;
}

/* init(arena, offset, capacity, serial): a fresh, empty, unclaimed channel. */
static PyObject *channel_init(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer arena;
    struct channel *ch;
    uint64_t capacity, serial;
    (void)self;
    if (parse(args, nargs, 4, "init", &arena, &ch, &capacity, &serial) < 0)
        return NULL;
    memset(ch, 0, sizeof *ch);
    ch->capacity = capacity;
    ch->serial = serial;
    store_release(&ch->magic, CHANNEL_MAGIC);
    PyBuffer_Release(&arena);
    Py_RETURN_NONE;
}

/* serial(arena, offset, capacity) -> the channel's serial, or None when no channel of that capacity is there. */
static PyObject *channel_serial(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer arena;
    struct channel *ch;
    uint64_t capacity;
    (void)self;
    if (parse(args, nargs, 3, "serial", &arena, &ch, &capacity, NULL) < 0)
        return NULL;
    int ok = load_acquire(&ch->magic) == CHANNEL_MAGIC && load_relaxed(&ch->capacity) == capacity;
    uint64_t serial = load_relaxed(&ch->serial);
    PyBuffer_Release(&arena);
    if (!ok)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(serial);
}

/*
 * send(arena, offset, capacity, serial, handles, timeout) -> (sent, status, peer).
 * Copies the handles (an 8-byte buffer) into the ring as room allows,
 * publishing each run with one head store; waits for room.  Stops early on
 * a timeout or a closed channel; then `sent` says how many went.
 * "Went" means published: a receiver that closes the channel takes no more,
 * and what it left in the ring is the last len(channel) handles sent.
 */
static PyObject *channel_send(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer arena, items;
    struct channel *ch;
    uint64_t capacity, serial, sent = 0, peer = 0;
    int64_t deadline;
    int status = CH_OK;
    (void)self;
    if (parse_transfer(args, nargs, "send", 0, &arena, &ch, &capacity, &serial, &items, &deadline) < 0)
        return NULL;
    const uint64_t *src = items.buf;
    uint64_t n = (uint64_t)items.len / 8, mask = capacity - 1;
    if (!live(ch, capacity, serial)) {
        status = CH_STALE;
        goto out;
    }
    if (load_acquire(&ch->closed)) {  /* before the claim: a send to a closed channel fails, empty or not */
        status = CH_CLOSED;
        goto out;
    }
    if (n == 0)
        goto out;
    int took = claimed(&ch->sender);
    if (!took) {
        status = CH_IN_USE;
        goto out;
    }
    while (sent < n) {
        /* Checked before each run: a send to a closed channel fails even with room. */
        if (load_acquire(&ch->closed)) {
            status = CH_CLOSED;
            break;
        }
        uint64_t head = load_relaxed(&ch->head), tail = load_acquire(&ch->tail);
        uint64_t used = head - tail, room = used < capacity ? capacity - used : 0;
        if (room == 0) {
            int r = wait_one(ch, 0, took, tail, deadline, capacity, serial, &peer);
            if (r == -2)
                goto fail;
            if (r != CH_OK) {
                status = r;
                break;
            }
            continue;
        }
        uint64_t k = n - sent < room ? n - sent : room, at = head & mask;
        uint64_t first = k < capacity - at ? k : capacity - at;  /* up to the ring's end, then from its start */
        memcpy(&ch->slots[at], src + sent, first * 8);
        memcpy(&ch->slots[0], src + sent + first, (k - first) * 8);
        store_release(&ch->head, head + k);
        sent += k;
        wake_if_sleeping(&ch->receiver_sleeping, &ch->receiver_wake);
    }
out:
    return finish(&items, &arena, 0, sent, status, peer);
fail:
    return finish(&items, &arena, 1, 0, 0, 0);
}

/*
 * recv(arena, offset, capacity, serial, out, timeout) -> (count, status, peer).
 * Waits until at least one handle is in the ring, then copies up to
 * len(out) into the writable 8-byte buffer `out` and frees their slots
 * with one tail store.  A closed channel still yields what was sent before
 * it closed; once empty, (0, CH_CLOSED).
 */
static PyObject *channel_recv(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer arena, out;
    struct channel *ch;
    uint64_t capacity, serial, got = 0, peer = 0;
    int64_t deadline;
    int status = CH_OK;
    (void)self;
    if (parse_transfer(args, nargs, "recv", 1, &arena, &ch, &capacity, &serial, &out, &deadline) < 0)
        return NULL;
    uint64_t *dst = out.buf, max = (uint64_t)out.len / 8, mask = capacity - 1;
    if (!live(ch, capacity, serial)) {
        status = CH_STALE;
        goto done;
    }
    int took = claimed(&ch->receiver);
    if (!took) {
        status = CH_IN_USE;
        goto done;
    }
    for (;;) {
        uint64_t tail = load_relaxed(&ch->tail), head = load_acquire(&ch->head);
        if (head != tail) {
            uint64_t avail = head - tail;
            if (avail > capacity)  /* a stray write to head: take no more than the ring holds */
                avail = capacity;
            got = avail < max ? avail : max;
            uint64_t at = tail & mask, first = got < capacity - at ? got : capacity - at;
            memcpy(dst, &ch->slots[at], first * 8);
            memcpy(dst + first, &ch->slots[0], (got - first) * 8);
            store_release(&ch->tail, tail + got);
            wake_if_sleeping(&ch->sender_sleeping, &ch->sender_wake);
            break;
        }
        if (load_acquire(&ch->closed)) {
            /* Sends published before the close are visible now (acquire): look once more. */
            if (load_acquire(&ch->head) != tail)
                continue;
            status = CH_CLOSED;
            break;
        }
        int r = wait_one(ch, 1, took, 0, deadline, capacity, serial, &peer);
        if (r == -2)
            goto fail;
        if (r != CH_OK) {
            status = r;
            break;
        }
    }
done:
    return finish(&out, &arena, 0, got, status, peer);
fail:
    return finish(&out, &arena, 1, 0, 0, 0);
}

/*
 * wait_any(arena, ((offset, capacity, serial), ...), timeout, first) -> index,
 * or -1 on timeout.  A receiver's wait on several channels at once (one per
 * producer): the index of the first, from `first` on and wrapping round,
 * that is ready (has handles, or is closed), or of the first that is no
 * longer the channel it was (released: its recv says so), or, once it has
 * slept PROBE_AFTER_NS or at a timeout of at least that, of the first whose
 * sender's process is gone (its recv says that too).  Takes nothing.
 */
static PyObject *channel_wait_any(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer arena;
    struct channel *chs[FUTEX_WAITV_MAX];
    uint64_t capacity;
    int found = -1;
    (void)self;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "wait_any() takes 4 arguments");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(args[1], "wait_any: channels must be a sequence of (offset, capacity, serial)");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n < 1 || n > FUTEX_WAITV_MAX) {
        PyErr_Format(PyExc_ValueError, "wait_any: 1 to %d channels, not %zd", FUTEX_WAITV_MAX, n);
        Py_DECREF(seq);
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &arena, PyBUF_WRITABLE) < 0) {
        Py_DECREF(seq);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3) {
            PyErr_SetString(PyExc_TypeError, "wait_any: each channel is an (offset, capacity, serial) tuple");
            goto fail;
        }
        chs[i] = channel_at(&arena, PyTuple_GET_ITEM(item, 0), PyTuple_GET_ITEM(item, 1), &capacity);
        if (chs[i] == NULL)
            goto fail;
        uint64_t serial = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(item, 2));
        if (PyErr_Occurred())
            goto fail;
        if (found < 0 && !live(chs[i], capacity, serial))
            found = (int)i;
    }
    long first = PyLong_AsLong(args[3]);
    if (first == -1 && PyErr_Occurred())
        goto fail;
    if (first < 0 || first >= n) {
        PyErr_Format(PyExc_ValueError, "wait_any: start at 0 to %zd, not %ld", n - 1, first);
        goto fail;
    }
    int64_t deadline = deadline_of(args[2]);
    if (deadline == -2)
        goto fail;
    if (found < 0) {
        struct watch w = {chs, (int)n, 1, 0, (int)first};
        int64_t began = deadline >= 0 ? now_ns() : 0;  /* only a deadline needs the clock read */
        uint64_t gone;  /* its recv says so */
        found = sleep_until(&w, deadline, &gone);
        if (found == -2)
            goto fail;
        if (found == -1 && deadline - began >= PROBE_AFTER_NS)  /* at a timeout that long, as in wait_one */
            found = watched_gone(&w, &gone);
    }
    PyBuffer_Release(&arena);
    Py_DECREF(seq);
    return PyLong_FromLong(found);
fail:
    PyBuffer_Release(&arena);
    Py_DECREF(seq);
    return NULL;
}

/*
 * close(arena, offset, capacity, serial[, retire]) -> status.  No more
 * sends; wakes both sides.  retire true: the channel's object is about to
 * be released, so its header stops being a channel's (every later call,
 * from any Channel of it, gets CH_STALE).  CH_STALE, and nothing written,
 * when the channel is not the caller's any more.
 */
static PyObject *channel_close(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer arena;
    struct channel *ch;
    uint64_t capacity, serial;
    (void)self;
    int retire = nargs == 5 ? PyObject_IsTrue(args[4]) : 0;
    if (retire < 0 || parse(args, nargs, nargs == 5 ? 5 : 4, "close", &arena, &ch, &capacity, &serial) < 0)
        return NULL;
    int status = CH_OK;
    if (!live(ch, capacity, serial)) {
        status = CH_STALE;
    } else {
        store_release(&ch->closed, 1);
        if (retire)
            store_release(&ch->magic, 0);
        wake_both(ch);
    }
    PyBuffer_Release(&arena);
    return PyLong_FromLong(status);
}

/* state(arena, offset, capacity) -> (head, tail, closed, sender, receiver, receiver_sleeping, sender_sleeping). */
static PyObject *channel_state(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer arena;
    struct channel *ch;
    uint64_t capacity;
    (void)self;
    if (parse(args, nargs, 3, "state", &arena, &ch, &capacity, NULL) < 0)
        return NULL;
    PyObject *r = Py_BuildValue("(KKiKKii)", (unsigned long long)load_acquire(&ch->head),
                                (unsigned long long)load_acquire(&ch->tail), (int)load_acquire(&ch->closed),
                                (unsigned long long)load_acquire(&ch->sender),
                                (unsigned long long)load_acquire(&ch->receiver),
                                (int)load_acquire(&ch->receiver_sleeping), (int)load_acquire(&ch->sender_sleeping));
    PyBuffer_Release(&arena);
    return r;
}

#define FASTCALL(f) (PyCFunction)(void (*)(void))(f), METH_FASTCALL

static PyMethodDef channel_methods[] = {
    {"init", FASTCALL(channel_init), "init(arena, offset, capacity, serial): a fresh, empty, unclaimed channel."},
    {"serial", FASTCALL(channel_serial),
     "serial(arena, offset, capacity): the channel's serial, or None when no channel of that capacity is there."},
    {"send", FASTCALL(channel_send), "send(arena, offset, capacity, serial, handles, timeout) -> (sent, status, gone peer)."},
    {"recv", FASTCALL(channel_recv), "recv(arena, offset, capacity, serial, out, timeout) -> (count, status, gone peer)."},
    {"wait_any", FASTCALL(channel_wait_any),
     "wait_any(arena, ((offset, capacity, serial), ...), timeout, first) -> index of the first ready channel from "
     "first on, or -1."},
    {"close", FASTCALL(channel_close),
     "close(arena, offset, capacity, serial[, retire]) -> status: no more sends; wakes both sides; retire: "
     "no longer a channel."},
    {"state", FASTCALL(channel_state),
     "state(arena, offset, capacity) -> (head, tail, closed, sender, receiver, receiver_sleeping, sender_sleeping)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef channel_module = {
    PyModuleDef_HEAD_INIT, "slitter._channel",
    "One-way rings of handles in the arena, from one sending thread to one receiving thread.",
    -1, channel_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__channel(void)
{
    PyObject *m = PyModule_Create(&channel_module);
    if (m == NULL)
        return NULL;
    if (pthread_atfork(NULL, NULL, forget_token) != 0) {
        Py_DECREF(m);
        return PyErr_NoMemory();
    }
    if (PyModule_AddIntConstant(m, "HEADER", sizeof(struct channel)) < 0 ||
        PyModule_AddIntConstant(m, "MAX_WAIT_ANY", FUTEX_WAITV_MAX) < 0 ||
        PyModule_AddIntConstant(m, "OK", CH_OK) < 0 || PyModule_AddIntConstant(m, "TIMEOUT", CH_TIMEOUT) < 0 ||
        PyModule_AddIntConstant(m, "CLOSED", CH_CLOSED) < 0 || PyModule_AddIntConstant(m, "IN_USE", CH_IN_USE) < 0 ||
        PyModule_AddIntConstant(m, "STALE", CH_STALE) < 0 || PyModule_AddIntConstant(m, "SELF", CH_SELF) < 0 ||
        PyModule_AddIntConstant(m, "PEER_GONE", CH_PEER_GONE) < 0 ||
        PyModule_AddIntConstant(m, "TOKEN_PID_SHIFT", TOKEN_PID_SHIFT) < 0 ||
        PyModule_AddIntConstant(m, "TOKEN_TID_SHIFT", TOKEN_TID_SHIFT) < 0 ||
        PyModule_AddIntConstant(m, "TOKEN_ID_MASK", TOKEN_ID_MASK) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
