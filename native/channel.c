/*
 * slitter._channel: a one-way ring of handles, from one sending thread to
 * one receiving thread, in any two processes attached to the same arena
 * (doc/design.md (h), doc/fast_path.md "Channels").
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
 * with one compare-and-swap; every later one compares one word.
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
#include <limits.h>
#include <pthread.h>
#include <linux/futex.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define CHANNEL_MAGIC 0x314e414843544c53ULL /* "SLTCHAN1" */
#define LINE 64

struct channel {
    /* Line 0: set by the creator; then only the claims and `closed` change. */
    uint64_t magic;
    uint64_t capacity;         /* slots, a power of two */
    uint64_t sender;           /* the sending thread's token (its tid), claimed by its first send; 0: none yet */
    uint64_t receiver;         /* the same for the receiving thread */
    uint32_t closed;           /* no more sends: set by either side, never cleared */
    uint8_t pad0[LINE - 36];
    /* Line 1: the sender's.  head changes once per batch. */
    uint64_t head;
    uint32_t receiver_wake;    /* futex word the receiver sleeps on; bumped to wake it */
    uint32_t receiver_sleeping;
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
enum { CH_OK = 0, CH_TIMEOUT = 1, CH_CLOSED = 2, CH_IN_USE = 3 };

/*
 * How long a side spins before it sleeps.  A futex sleep and wake-up costs
 * the sleeper 5-10 us of latency and the waker a system call; a peer that
 * is merely mid-batch publishes within a few microseconds.  Spinning past
 * that burns a core that, on a small machine, the peer may need.
 */
#define SPIN_NS 20000

#define load_acquire(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define load_relaxed(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define store_release(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define store_relaxed(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
#define full_fence() __atomic_thread_fence(__ATOMIC_SEQ_CST)

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* A shared (not FUTEX_PRIVATE) wait: the word is in memory several processes map. */
static int futex_wait(uint32_t *word, uint32_t expected, int64_t timeout_ns)
{
    struct timespec ts, *tsp = NULL;
    if (timeout_ns >= 0) {
        ts.tv_sec = timeout_ns / 1000000000;
        ts.tv_nsec = timeout_ns % 1000000000;
        tsp = &ts;
    }
    return (int)syscall(SYS_futex, word, FUTEX_WAIT, expected, tsp, NULL, 0);
}

static void futex_wake(uint32_t *word)
{
    syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

/*
 * The other side published (or took) and may be asleep: wake it.  The
 * fence orders our head/tail store before the load of its flag; the
 * sleeper stores its flag and fences before it looks at head/tail again
 * (wait_for), so at least one of the two sees the other (Dekker).  The
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
 * Wait, without the GIL, until *watched differs from `seen` or the channel
 * is closed: spin up to SPIN_NS, then sleep on `wake`.  deadline_ns < 0:
 * no deadline.  Returns CH_OK (look again), CH_TIMEOUT, or -1 with a Python
 * exception set (a signal handler raised).
 */
static int wait_for(struct channel *ch, const uint64_t *watched, uint64_t seen, uint32_t *sleeping,
                    uint32_t *wake, int64_t deadline_ns)
{
    int status = CH_OK;
    PyThreadState *gil = PyEval_SaveThread();
    int64_t start = now_ns();
    for (unsigned i = 0;; i++) {
        if (load_acquire(watched) != seen || load_acquire(&ch->closed))
            goto done;
        if ((i & 63) == 0) {  /* the clock every 64 turns, the first included: timeout 0 does not spin */
            int64_t t = now_ns();
            if (deadline_ns >= 0 && t >= deadline_ns) {
                status = CH_TIMEOUT;
                goto done;
            }
            if (t - start >= SPIN_NS)
                break;
        }
        cpu_relax();
    }
    for (;;) {
        uint32_t w = load_acquire(wake);
        store_relaxed(sleeping, 1);
        full_fence();
        if (load_acquire(watched) != seen || load_acquire(&ch->closed))
            break;
        int64_t remaining = -1;
        if (deadline_ns >= 0) {
            remaining = deadline_ns - now_ns();
            if (remaining <= 0) {
                status = CH_TIMEOUT;
                break;
            }
        }
        if (futex_wait(wake, w, remaining) == 0 || errno == EAGAIN)
            continue;  /* woken, or bumped before we slept: look again */
        if (errno == ETIMEDOUT) {
            status = CH_TIMEOUT;
            break;
        }
        if (errno == EINTR) {
            store_relaxed(sleeping, 0);
            PyEval_RestoreThread(gil);
            if (PyErr_CheckSignals() < 0)
                return -1;
            gil = PyEval_SaveThread();
            continue;
        }
        break;  /* no other error is possible on a valid word; look again rather than spin on it */
    }
    store_relaxed(sleeping, 0);
done:
    PyEval_RestoreThread(gil);
    return status;
}

/* The channel at `offset` of the arena buffer, checked against the caller's capacity; NULL with an exception. */
static struct channel *channel_at(Py_buffer *arena, PyObject *offset_obj, PyObject *capacity_obj,
                                  uint64_t *capacity)
{
    unsigned long long offset = PyLong_AsUnsignedLongLong(offset_obj);
    unsigned long long cap = PyLong_AsUnsignedLongLong(capacity_obj);
    if (PyErr_Occurred())
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

static int parse(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, const char *name, Py_buffer *arena,
                 struct channel **ch, uint64_t *capacity)
{
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments", name, want);
        return -1;
    }
    if (PyObject_GetBuffer(args[0], arena, PyBUF_WRITABLE) < 0)
        return -1;
    *ch = channel_at(arena, args[1], args[2], capacity);
    if (*ch == NULL) {
        PyBuffer_Release(arena);
        return -1;
    }
    return 0;
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
 * This thread's token: its tid, asked of the kernel once per thread.  A
 * forked child's one thread has the forking thread's cache, so the child
 * forgets it (forget_tid, registered with pthread_atfork).
 */
static __thread uint64_t my_tid;

static void forget_tid(void)
{
    my_tid = 0;
}

/* Claim `*claim` for this thread, or see that it is ours: one load once claimed. */
static int claimed(uint64_t *claim)
{
    if (my_tid == 0)
        my_tid = (uint64_t)syscall(SYS_gettid);
    uint64_t me = my_tid;
    uint64_t owner = load_acquire(claim);
    if (owner == me)
        return 1;
    if (owner != 0)
        return 0;
    return __atomic_compare_exchange_n(claim, &owner, me, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

static PyObject *result(uint64_t count, int status)
{
    return Py_BuildValue("(Ki)", (unsigned long long)count, status);
}

/* init(arena, offset, capacity): a fresh, empty, unclaimed channel. */
static PyObject *channel_init(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer arena;
    struct channel *ch;
    uint64_t capacity;
    (void)self;
    if (parse(args, nargs, 3, "init", &arena, &ch, &capacity) < 0)
        return NULL;
    memset(ch, 0, sizeof *ch);
    ch->capacity = capacity;
    store_release(&ch->magic, CHANNEL_MAGIC);
    PyBuffer_Release(&arena);
    Py_RETURN_NONE;
}

/* valid(arena, offset, capacity): the header is a channel of that capacity. */
static PyObject *channel_valid(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer arena;
    struct channel *ch;
    uint64_t capacity;
    (void)self;
    if (parse(args, nargs, 3, "valid", &arena, &ch, &capacity) < 0)
        return NULL;
    int ok = load_acquire(&ch->magic) == CHANNEL_MAGIC && load_relaxed(&ch->capacity) == capacity;
    PyBuffer_Release(&arena);
    return PyBool_FromLong(ok);
}

/*
 * send(arena, offset, capacity, handles, timeout) -> (sent, status).  Copies
 * the handles (an 8-byte buffer) into the ring as room allows, publishing
 * each run with one head store; waits for room.  Stops early on a timeout
 * or a closed channel; then `sent` says how many went.
 */
static PyObject *channel_send(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer arena, items;
    struct channel *ch;
    uint64_t capacity, sent = 0;
    int status = CH_OK;
    (void)self;
    if (parse(args, nargs, 5, "send", &arena, &ch, &capacity) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[3], &items, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&arena);
        return NULL;
    }
    int64_t deadline = deadline_of(args[4]);
    if (deadline == -2 || items.len % 8 != 0) {
        if (deadline != -2)
            PyErr_SetString(PyExc_ValueError, "send: the handles' buffer is not whole 8-byte items");
        goto fail;
    }
    const uint64_t *src = items.buf;
    uint64_t n = (uint64_t)items.len / 8, mask = capacity - 1;
    if (!claimed(&ch->sender)) {
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
            int w = wait_for(ch, &ch->tail, tail, &ch->sender_sleeping, &ch->sender_wake, deadline);
            if (w < 0)
                goto fail;
            if (w == CH_TIMEOUT) {
                status = CH_TIMEOUT;
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
    PyBuffer_Release(&items);
    PyBuffer_Release(&arena);
    return result(sent, status);
fail:
    PyBuffer_Release(&items);
    PyBuffer_Release(&arena);
    return NULL;
}

/*
 * recv(arena, offset, capacity, out, timeout) -> (count, status).  Waits
 * until at least one handle is in the ring, then copies up to len(out)
 * into the writable 8-byte buffer `out` and frees their slots with one
 * tail store.  A closed channel still yields what was sent before it
 * closed; once empty, (0, CH_CLOSED).
 */
static PyObject *channel_recv(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer arena, out;
    struct channel *ch;
    uint64_t capacity, got = 0;
    int status = CH_OK;
    (void)self;
    if (parse(args, nargs, 5, "recv", &arena, &ch, &capacity) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[3], &out, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&arena);
        return NULL;
    }
    int64_t deadline = deadline_of(args[4]);
    if (deadline == -2 || out.len % 8 != 0 || out.len == 0) {
        if (deadline != -2)
            PyErr_SetString(PyExc_ValueError, "recv: the output buffer is not one or more 8-byte items");
        goto fail;
    }
    uint64_t *dst = out.buf, max = (uint64_t)out.len / 8, mask = capacity - 1;
    if (!claimed(&ch->receiver)) {
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
        int w = wait_for(ch, &ch->head, head, &ch->receiver_sleeping, &ch->receiver_wake, deadline);
        if (w < 0)
            goto fail;
        if (w == CH_TIMEOUT) {
            status = CH_TIMEOUT;
            break;
        }
    }
done:
    PyBuffer_Release(&out);
    PyBuffer_Release(&arena);
    return result(got, status);
fail:
    PyBuffer_Release(&out);
    PyBuffer_Release(&arena);
    return NULL;
}

/* close(arena, offset, capacity): no more sends; wakes both sides. */
static PyObject *channel_close(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer arena;
    struct channel *ch;
    uint64_t capacity;
    (void)self;
    if (parse(args, nargs, 3, "close", &arena, &ch, &capacity) < 0)
        return NULL;
    store_release(&ch->closed, 1);
    wake_both(ch);
    PyBuffer_Release(&arena);
    Py_RETURN_NONE;
}

/* state(arena, offset, capacity) -> (head, tail, closed, sender, receiver): for repr, stats and tests. */
static PyObject *channel_state(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer arena;
    struct channel *ch;
    uint64_t capacity;
    (void)self;
    if (parse(args, nargs, 3, "state", &arena, &ch, &capacity) < 0)
        return NULL;
    PyObject *r = Py_BuildValue("(KKiKK)", (unsigned long long)load_acquire(&ch->head),
                                (unsigned long long)load_acquire(&ch->tail), (int)load_acquire(&ch->closed),
                                (unsigned long long)load_acquire(&ch->sender),
                                (unsigned long long)load_acquire(&ch->receiver));
    PyBuffer_Release(&arena);
    return r;
}

#define FASTCALL(f) (PyCFunction)(void (*)(void))(f), METH_FASTCALL

static PyMethodDef channel_methods[] = {
    {"init", FASTCALL(channel_init), "init(arena, offset, capacity): a fresh, empty, unclaimed channel."},
    {"valid", FASTCALL(channel_valid), "valid(arena, offset, capacity): a channel of that capacity is there."},
    {"send", FASTCALL(channel_send), "send(arena, offset, capacity, handles, timeout) -> (sent, status)."},
    {"recv", FASTCALL(channel_recv), "recv(arena, offset, capacity, out, timeout) -> (count, status)."},
    {"close", FASTCALL(channel_close), "close(arena, offset, capacity): no more sends; wakes both sides."},
    {"state", FASTCALL(channel_state), "state(arena, offset, capacity) -> (head, tail, closed, sender, receiver)."},
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
    if (pthread_atfork(NULL, NULL, forget_tid) != 0) {
        Py_DECREF(m);
        return PyErr_NoMemory();
    }
    if (PyModule_AddIntConstant(m, "HEADER", sizeof(struct channel)) < 0 ||
        PyModule_AddIntConstant(m, "OK", CH_OK) < 0 || PyModule_AddIntConstant(m, "TIMEOUT", CH_TIMEOUT) < 0 ||
        PyModule_AddIntConstant(m, "CLOSED", CH_CLOSED) < 0 || PyModule_AddIntConstant(m, "IN_USE", CH_IN_USE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
