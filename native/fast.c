/*
 * The allocate/release fast path, and the checks the daemon's audit shares
 * with it.  No system call, no lock and no Python on the fast path; every
 * rare branch goes to a named noinline function.  doc/fast_path.md walks
 * through the costs.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <time.h>

#include "slitter_fast.h"

#define slitter_likely(x)   __builtin_expect(!!(x), 1)
#define slitter_unlikely(x) __builtin_expect(!!(x), 0)
#define SLITTER_NOINLINE    __attribute__((noinline))

/*
 * The calling thread's binding: which client (and which opening of it) the
 * cached slot belongs to.  One compare pair on every call; a thread that
 * alternates between two heaps rebinds through pthread_getspecific().
 */
/* A Python hook this thread is in, innermost first: a frame of slitter__call_hook's stack. */
struct slitter__hook_frame {
    const struct slitter_client *client;
    const struct slitter__hook_frame *outer;
};

struct slitter__tls {
    struct slitter_client *client;
    uint64_t epoch;
    struct slitter_thread_slot *slot;
    const struct slitter__hook_frame *hooks;   /* the hooks this thread is in (slitter__call_hook) */
};
/* initial-exec: a %fs-relative load, not a __tls_get_addr call per access
 * (the module is dlopen'ed, but 32 bytes fit glibc's static TLS surplus). */
static __thread struct slitter__tls tls __attribute__((tls_model("initial-exec")));

/*
 * Class keys: Python passes one small integer instead of (client, class),
 * because cffi converts a single argument through METH_O and two or more
 * through a tuple, which costs more than the whole fast path.  Keys are
 * never reused in a process, so a stale key can only reach a closed client.
 */
static struct slitter_key { struct slitter_client *client; uint32_t class_id; } keys[SLITTER_MAX_KEYS];
static uint32_t next_key = 1;

/* The entry of a key Python passed, or NULL for one that names no client. */
static inline const struct slitter_key *slitter__key(uint32_t key)
{
    if (slitter_unlikely(key >= SLITTER_MAX_KEYS || keys[key].client == NULL))
        return NULL;
    return &keys[key];
}

/* Epochs are unique per open in this process; 0 means closed. */
static uint64_t next_epoch = 1;

/* Bumped by slitter_client_forked, in a child: a hook that returns to a
 * different count returns in the child of a fork made inside it. */
static uint64_t forks;

/*
 * Clients that are open, so a thread-exit destructor never writes into a
 * rack that was unmapped.  Touched only when threads bind or exit and when
 * clients open or close: never on the fast path.
 */
#define SLITTER_MAX_OPEN 64
static pthread_mutex_t open_lock = PTHREAD_MUTEX_INITIALIZER;
static struct { struct slitter_client *client; uint64_t epoch; } open_clients[SLITTER_MAX_OPEN];

struct slitter__binding {
    struct slitter_client *client;
    uint64_t epoch;
    uint32_t slot;
};

static int slitter__is_open(struct slitter_client *c, uint64_t epoch)
{
    for (int i = 0; i < SLITTER_MAX_OPEN; i++)
        if (open_clients[i].client == c && open_clients[i].epoch == epoch)
            return 1;
    return 0;
}

/* Thread exit: give the slot back (its magazines stay for the next owner). */
static void slitter__thread_exit(void *value)
{
    struct slitter__binding *b = value;
    pthread_mutex_lock(&open_lock);
    if (slitter__is_open(b->client, b->epoch)) {
        struct slitter_rack *rack = b->client->rack;
        __atomic_store_n(&rack->threads[b->slot].owner_tid, 0, __ATOMIC_RELEASE);
        __atomic_fetch_and(&rack->threads_claimed, ~(1ULL << b->slot), __ATOMIC_ACQ_REL);
    }
    pthread_mutex_unlock(&open_lock);
    free(b);
}

void slitter_view_init(struct slitter_view *v, const void *meta_tables, void *live_map, void *data)
{
    const struct slitter_header *h = meta_tables;
    const unsigned char *base = meta_tables;
    v->header = h;
    v->spans = (const struct slitter_span *)(base + h->span_table_off);
    v->classes = (const struct slitter_class *)(base + h->class_table_off);
    v->live_map = live_map;
    v->data = data;
}

int slitter_client_open(struct slitter_client *c, const void *meta_tables, void *live_map,
                        struct slitter_rack *rack, uint32_t rack_index, void *data, struct slitter_shelf *shelf)
{
    pthread_key_t key;
    int err = pthread_key_create(&key, slitter__thread_exit);
    if (err != 0)
        return err;
    slitter_view_init(&c->view, meta_tables, live_map, data);
    c->rack = rack;
    c->shelf = shelf;
    c->cache_tag = (uint8_t)SLITTER_TAG(rack_index);
    c->thread_key = (unsigned int)key;
    c->has_key = 1;
    pthread_mutex_lock(&open_lock);
    c->epoch = next_epoch++;
    for (int i = 0; i < SLITTER_MAX_OPEN; i++) {
        if (open_clients[i].client == NULL) {
            open_clients[i].client = c;
            open_clients[i].epoch = c->epoch;
            break;
        }
    }
    pthread_mutex_unlock(&open_lock);
    return 0;
}

void slitter_client_close(struct slitter_client *c)
{
    pthread_mutex_lock(&open_lock);
    for (int i = 0; i < SLITTER_MAX_OPEN; i++)
        if (open_clients[i].client == c && open_clients[i].epoch == c->epoch)
            open_clients[i].client = NULL;
    c->epoch = 0;
    c->rack = NULL;
    c->shelf = NULL;
    if (c->has_key) {
        pthread_key_delete((pthread_key_t)c->thread_key);
        c->has_key = 0;
    }
    pthread_mutex_unlock(&open_lock);
}

void slitter_client_forked(struct slitter_client *c)
{
    /* The mutex may have been held by a thread that does not exist here. */
    pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    open_lock = fresh;
    memset(open_clients, 0, sizeof(open_clients));
    c->epoch = 0;
    c->rack = NULL;
    c->shelf = NULL;  /* the parent may hold a slot: a child never touches the shelf before re-attaching */
    c->has_key = 0;   /* the key is this process's too; leak it rather than race */
    c->in_hook = 0;   /* the threads that were in a hook are the parent's */
    __atomic_fetch_add(&forks, 1, __ATOMIC_RELAXED);  /* unless this thread forked inside a hook: slitter__call_hook */
    tls.client = NULL;
    tls.slot = NULL;
    tls.hooks = NULL;
}

int slitter_bind(struct slitter_client *c, uint32_t class_id)
{
    if (c->epoch == 0 || c->rack == NULL || class_id == 0 || class_id >= SLITTER_MAX_CLASSES)
        return -2;
    const struct slitter_class *cls = &c->view.classes[class_id];
    if (__atomic_load_n(&cls->id, __ATOMIC_ACQUIRE) != class_id)
        return -2;

    pthread_key_t key = (pthread_key_t)c->thread_key;
    struct slitter__binding *b = pthread_getspecific(key);
    if (b == NULL) {
        struct slitter_rack *rack = c->rack;
        uint64_t claimed = __atomic_load_n(&rack->threads_claimed, __ATOMIC_ACQUIRE);
        int slot = -1;
        for (;;) {
            uint64_t free_mask = ~claimed & ((SLITTER_MAX_THREADS == 64) ? ~0ULL
                                             : ((1ULL << SLITTER_MAX_THREADS) - 1));
            if (free_mask == 0)
                return -1;
            slot = __builtin_ctzll(free_mask);
            if (__atomic_compare_exchange_n(&rack->threads_claimed, &claimed,
                                            claimed | (1ULL << slot), 0,
                                            __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
                break;
        }
        b = malloc(sizeof(*b));
        if (b == NULL) {
            __atomic_fetch_and(&rack->threads_claimed, ~(1ULL << slot), __ATOMIC_ACQ_REL);
            return -1;
        }
        b->client = c;
        b->epoch = c->epoch;
        b->slot = (uint32_t)slot;
        rack->threads[slot].owner_tid = (uint32_t)syscall(SYS_gettid);
        __atomic_fetch_or(&rack->threads_touched, 1ULL << slot, __ATOMIC_ACQ_REL);
        pthread_setspecific(key, b);
    }
    struct slitter_thread_slot *ts = &c->rack->threads[b->slot];
    struct slitter_thread_class *tc = &ts->classes[class_id];
    if (tc->capacity == 0) {
        /* Mark before the capacity opens the fast path: the daemon reads only
         * touched classes, and must see every magazine that can hold objects. */
        __atomic_fetch_or(&ts->classes_touched, 1ULL << class_id, __ATOMIC_ACQ_REL);
        __atomic_store_n(&tc->capacity, cls->mag_capacity, __ATOMIC_RELEASE);
    }
    tls.client = c;
    tls.epoch = c->epoch;
    tls.slot = ts;
    return (int)b->slot;
}

/* The calling thread's slot in `c`, or NULL: 2 loads and 2 compares. */
static inline struct slitter_thread_slot *slitter__slot(const struct slitter_client *c)
{
    if (slitter_likely(tls.client == c && tls.epoch == c->epoch && tls.epoch != 0))
        return tls.slot;
    return NULL;
}

/*
 * The span of `handle`, or NULL when no class owns it.  The bound check
 * against next_span keeps every foreign address (other segment bits, beyond
 * the arena, beyond the carved spans) away from never-written pages of the
 * span table: reading a hole of a tmpfs mapping would allocate it.
 */
static inline const struct slitter_span *slitter__span(const struct slitter_view *v, uint64_t handle)
{
    uint64_t span = handle >> SLITTER_SPAN_SHIFT;
    if (slitter_unlikely(span >= __atomic_load_n(&v->header->next_span, __ATOMIC_ACQUIRE)))
        return NULL;
    const struct slitter_span *sp = &v->spans[span];
    if (slitter_unlikely(__atomic_load_n(&sp->class_id, __ATOMIC_ACQUIRE) == 0))
        return NULL;
    return sp;
}

/*
 * The live-map index of the object at `handle` in span `sp` of class `cls`, or
 * -1 - SLITTER_ERR_* when `handle` is not an object start.  One multiply
 * stands in for the division by the stride (Lemire's fastdiv: exact because
 * a run is below 2^31 bytes); a second multiply tells an interior pointer.
 */
static inline int64_t slitter__run_index(const struct slitter_span *sp, uint64_t div_magic, uint64_t stride,
                                         uint32_t objects_per_run, uint64_t handle)
{
    uint64_t rel = handle - ((uint64_t)sp->run_first_span << SLITTER_SPAN_SHIFT);
    uint64_t index = (uint64_t)(((unsigned __int128)div_magic * rel) >> 64);
    if (slitter_unlikely(index >= objects_per_run))
        return -1 - SLITTER_ERR_FOREIGN_ADDRESS;    /* guard page or run tail */
    if (slitter_unlikely(index * stride != rel))
        return -1 - SLITTER_ERR_INTERIOR_POINTER;
    return (int64_t)(sp->obj_base + index);
}

static inline int64_t slitter__object_bit(const struct slitter_span *sp,
                                          const struct slitter_class *cls, uint64_t handle)
{
    return slitter__run_index(sp, cls->div_magic, cls->stride, cls->objects_per_run, handle);
}

/*
 * Whatever class owns `handle`: its live-map index, or -1 - SLITTER_ERR_*.
 * `*class_out` gets the owning class, or 0 when no class owns the span.
 */
static inline int64_t slitter__locate(const struct slitter_view *v, uint64_t handle, uint32_t *class_out)
{
    *class_out = 0;
    const struct slitter_span *sp = slitter__span(v, handle);
    if (sp == NULL)
        return -1 - SLITTER_ERR_FOREIGN_ADDRESS;
    *class_out = sp->class_id;
    return slitter__object_bit(sp, &v->classes[sp->class_id], handle);
}

/*
 * One class's constants in locals, for the checks.  The live map is bytes,
 * which alias everything in C: a batch loop reading these through
 * c->view after each live-byte store would reload every one of them (and
 * the header's next_span) per handle.  One load of next_span per batch is
 * enough: a handle the caller holds was carved before the call began.
 */
struct slitter__cursor {
    const struct slitter_span *spans;
    uint8_t *live;
    uint64_t next_span;
    uint64_t div_magic;
    uint64_t stride;
    uint32_t objects_per_run;
    uint32_t class_id;
};

static inline struct slitter__cursor slitter__view_cursor(const struct slitter_view *v, uint32_t class_id)
{
    const struct slitter_class *cls = &v->classes[class_id];
    struct slitter__cursor k = {
        .spans = v->spans,
        .live = v->live_map,
        .next_span = __atomic_load_n(&v->header->next_span, __ATOMIC_ACQUIRE),
        .div_magic = cls->div_magic,
        .stride = cls->stride,
        .objects_per_run = cls->objects_per_run,
        .class_id = class_id,
    };
    return k;
}

static inline struct slitter__cursor slitter__cursor(const struct slitter_client *c, uint32_t class_id)
{
    return slitter__view_cursor(&c->view, class_id);
}

/*
 * The checks of a release up to the live byte, with nothing changed: the
 * live-map index of `handle`, or -1 - SLITTER_ERR_*.  Foreign (beyond the
 * carved spans, or a span no class owns: one compare and one load of the
 * span entry), class (the span table says who owns the address, forever),
 * interior or guard (two multiplies against the class's stride).
 */
static inline int64_t slitter__check_at(const struct slitter__cursor *k, uint64_t handle)
{
    uint64_t span = handle >> SLITTER_SPAN_SHIFT;
    if (slitter_unlikely(span >= k->next_span))
        return -1 - SLITTER_ERR_FOREIGN_ADDRESS;
    const struct slitter_span *sp = &k->spans[span];
    uint32_t owner = __atomic_load_n(&sp->class_id, __ATOMIC_ACQUIRE);
    if (slitter_unlikely(owner != k->class_id))
        return -1 - (owner == 0 ? SLITTER_ERR_FOREIGN_ADDRESS : SLITTER_ERR_CLASS_MISMATCH);
    return slitter__run_index(sp, k->div_magic, k->stride, k->objects_per_run, handle);
}

/* The same for one handle: what slitter_release() checks. */
static inline int64_t slitter__check(const struct slitter_client *c, uint32_t class_id, uint64_t handle)
{
    struct slitter__cursor k = slitter__cursor(c, class_id);
    return slitter__check_at(&k, handle);
}

/* Rare: a magazine held an object not cached under our tag, or not of its class. */
static SLITTER_NOINLINE void slitter__count_corrupt(struct slitter_thread_class *tc)
{
    tc->counters.errors[SLITTER_ERR_CORRUPT]++;
}

/*
 * The shelf's per-handle work, for a put and a take alike: each of `n`
 * handles gets the release's checks (class, interior, guard) and must carry
 * live-map tag `from`; the good ones move to tag `to` (a plain store: the
 * caller holds both tags, so nobody else moves these bytes) and into `out`.
 * A handle that fails is dropped and counted corrupt, never handed on.
 * Returns how many moved.
 */
static inline uint32_t slitter__move_tagged(struct slitter_thread_class *tc, const struct slitter__cursor *k,
                                            const uint64_t *in, uint32_t n, uint8_t from, uint8_t to,
                                            uint64_t *out)
{
    uint32_t moved = 0;
    for (uint32_t j = 0; j < n; j++) {
        uint64_t handle = in[j];
        int64_t obj = slitter__check_at(k, handle);
        if (slitter_likely(obj >= 0 && __atomic_load_n(&k->live[obj], __ATOMIC_RELAXED) == from)) {
            /* Tag first: if we die before the count covers it, the daemon
             * still finds it under the new tag. */
            __atomic_store_n(&k->live[obj], to, __ATOMIC_RELEASE);
            out[moved++] = handle;
        } else {
            slitter__count_corrupt(tc);
        }
    }
    return moved;
}

/* A slot's count, written by a client: trusted up to the size of its array. */
static inline uint32_t slitter__slot_count(const struct slitter_shelf_slot *s)
{
    uint32_t count = __atomic_load_n(&s->count, __ATOMIC_RELAXED);
    return count < SLITTER_MAG_CAP ? count : SLITTER_MAG_CAP;
}

/*
 * Make slot `s` ours if its state is `from`: a plain load first, so that a
 * scan past other clients' slots writes nothing, then one lock cmpxchg
 * (acquire: the handles its last holder published come with it).
 */
static inline int slitter__claim(struct slitter_shelf_slot *s, uint32_t from, uint32_t to)
{
    uint32_t expected = from;
    return __atomic_load_n(&s->state, __ATOMIC_RELAXED) == from
        && __atomic_compare_exchange_n(&s->state, &expected, to, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED);
}

/*
 * Rare (once per magazine): take a full magazine of the class off the shelf
 * (layout.h), or up to this thread's capacity of it, into the empty
 * allocation magazine.  A scan of 32 state words, one lock cmpxchg to claim
 * the slot, then slitter__move_tagged from the slot's tag to ours.  Cheaper
 * than the refill it replaces by two orders of magnitude: no message, no
 * daemon.
 */
static SLITTER_NOINLINE int slitter__take_from_shelf(struct slitter_client *c, struct slitter_thread_class *tc,
                                                     uint32_t class_id)
{
    struct slitter_shelf *shelf = c->shelf;
    if (shelf == NULL || tc->capacity == 0)
        return 0;
    const uint32_t full = SLITTER_SHELF_STATE(SLITTER_SHELF_FULL, class_id);
    const uint32_t busy = SLITTER_SHELF_STATE(SLITTER_SHELF_BUSY, c->cache_tag - SLITTER_TAG_BASE);
    for (uint32_t i = 0; i < SLITTER_SHELF_SLOTS; i++) {
        struct slitter_shelf_slot *s = &shelf->slots[i];
        if (!slitter__claim(s, full, busy))
            continue;
        /* The slot is ours until we store its state again. */
        uint32_t count = slitter__slot_count(s);
        uint32_t take = count < tc->capacity ? count : tc->capacity;
        const struct slitter__cursor k = slitter__cursor(c, class_id);
        uint32_t got = slitter__move_tagged(tc, &k, s->handles + (count - take), take,
                                            (uint8_t)SLITTER_SHELF_TAG(i), c->cache_tag, tc->alloc);
        tc->alloc_count = got;
        s->count = count - take;
        __atomic_store_n(&s->state, count > take ? full : SLITTER_SHELF_EMPTY, __ATOMIC_RELEASE);
        if (take != 0)
            __atomic_fetch_add(&shelf->takes[class_id], 1, __ATOMIC_RELAXED);
        if (got != 0)
            return 1;
    }
    return 0;
}

/*
 * Rare (once per magazine): put the full release magazine on an empty slot
 * of the shelf, unless SLITTER_SHELF_PER_CLASS slots already hold this
 * class (objects nobody takes must not fill the shelf: past that, flushes
 * go to the daemon's depot).  slitter__move_tagged from our tag to the
 * slot's.  Returns 1 when the release magazine is empty again.
 */
static SLITTER_NOINLINE int slitter__put_on_shelf(struct slitter_client *c, struct slitter_thread_class *tc,
                                                  uint32_t class_id)
{
    struct slitter_shelf *shelf = c->shelf;
    if (shelf == NULL)
        return 0;
    const uint32_t full = SLITTER_SHELF_STATE(SLITTER_SHELF_FULL, class_id);
    const uint32_t busy = SLITTER_SHELF_STATE(SLITTER_SHELF_BUSY, c->cache_tag - SLITTER_TAG_BASE);
    uint32_t of_class = 0;
    for (uint32_t i = 0; i < SLITTER_SHELF_SLOTS; i++)
        of_class += __atomic_load_n(&shelf->slots[i].state, __ATOMIC_RELAXED) == full;
    if (of_class >= SLITTER_SHELF_PER_CLASS)
        return 0;
    for (uint32_t i = 0; i < SLITTER_SHELF_SLOTS; i++) {   /* slitter__claim skips a non-empty slot with a load */
        struct slitter_shelf_slot *s = &shelf->slots[i];
        if (!slitter__claim(s, SLITTER_SHELF_EMPTY, busy))
            continue;
        uint32_t n = tc->release_count;
        if (n > SLITTER_MAG_CAP)
            n = SLITTER_MAG_CAP;
        const struct slitter__cursor k = slitter__cursor(c, class_id);
        uint32_t put = slitter__move_tagged(tc, &k, tc->release, n, c->cache_tag, (uint8_t)SLITTER_SHELF_TAG(i),
                                            s->handles);
        tc->release_count = 0;
        s->count = put;
        __atomic_store_n(&s->state, put ? full : SLITTER_SHELF_EMPTY, __ATOMIC_RELEASE);
        __atomic_fetch_add(&shelf->puts[class_id], 1, __ATOMIC_RELAXED);
        return 1;
    }
    return 0;
}

/* A counter store the compiler keeps, in program order with the byte
 * change around it (x86 keeps stores in order; a SIGKILL lands between
 * instructions): see SLITTER_COUNTING. */
static inline void slitter__store_counter(uint64_t *counter, uint64_t value)
{
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    __atomic_store_n(counter, value, __ATOMIC_RELAXED);
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
}

/*
 * Rare (once per magazine): call a Python hook (slitter_spare_taken,
 * slitter_outgoing_ready).  The hook runs Python, which lets other threads
 * run, Heap.close() among them; this native frame uses the rack again when
 * the hook returns.  So close() waits while in_hook is non-zero, and asks
 * slitter_hooked_here() whether it was itself called from inside the hook
 * on this thread (a signal handler): then it cannot wait.  After a close
 * (epoch 0, rack NULL) no hook is called: nobody would act on it.
 *
 * Returns whether the caller may go on with the rack: not in the child of
 * a fork made inside the hook on this thread (a signal handler again).
 * That child's rack is the parent's, unmapped by now, and
 * slitter_client_forked has already reset in_hook and tls.hooks, so this
 * frame touches none of them.  A close during the hook is no reason to
 * stop: close() waits for this frame, which finishes the call under way.
 */
static int slitter__call_hook(struct slitter_client *c, struct slitter_thread_slot *slot, uint32_t class_id,
                              void (*hook)(struct slitter_client *, uint32_t, uint32_t))
{
    if (c->epoch == 0)
        return 1;
    uint64_t forks_before = __atomic_load_n(&forks, __ATOMIC_RELAXED);
    /* Hooks nest (a signal handler in one takes another heap's spare), and
     * slitter_hooked_here must see every one this thread is in. */
    const struct slitter__hook_frame frame = { c, tls.hooks };
    c->in_hook++;
    tls.hooks = &frame;
    hook(c, (uint32_t)(slot - c->rack->threads), class_id);
    if (slitter_unlikely(__atomic_load_n(&forks, __ATOMIC_RELAXED) != forks_before))
        return 0;
    tls.hooks = frame.outer;
    c->in_hook--;
    return 1;
}

/*
 * Rare (once per magazine): the allocation magazine is empty.  Take the
 * release magazine's objects, else a full magazine off the shelf, else the
 * prefetched spare (and ask Python to prefetch the next one, without
 * waiting), else give up: the slow path refills and waits.  The shelf comes
 * before the spare so that a stream from another thread or process, which
 * puts magazines on the shelf, keeps the spare full and sends no refill.
 * Returns 1 when the allocation magazine has objects again, 0 when the slow
 * path must refill, and SLITTER__FORKED in the child of a fork made inside
 * the prefetch hook: its caller returns at once, touching nothing of the
 * rack (the parent's) and handing out nothing it took before the fork.
 */
#define SLITTER__FORKED (-1)
static SLITTER_NOINLINE int slitter__refill_locally(struct slitter_client *c, struct slitter_thread_slot *slot,
                                                    struct slitter_thread_class *tc, uint32_t class_id)
{
    tc->releases_only = 0;   /* it allocates: its releases fill the allocation magazine again, LIFO */
    uint32_t n = tc->release_count;
    if (n != 0) {
        memcpy(tc->alloc, tc->release, n * sizeof(uint64_t));
        tc->alloc_count = n;
        tc->release_count = 0;
        return 1;
    }
    if (slitter__take_from_shelf(c, tc, class_id))
        return 1;
    n = __atomic_load_n(&tc->spare_count, __ATOMIC_ACQUIRE);
    if (n == 0 || n > tc->capacity)
        return 0;
    memcpy(tc->alloc, tc->spare, n * sizeof(uint64_t));
    tc->alloc_count = n;
    __atomic_store_n(&tc->spare_count, 0, __ATOMIC_RELEASE);
    return slitter__call_hook(c, slot, class_id, slitter_spare_taken) ? 1 : SLITTER__FORKED;
}

/* The allocation proper, for a thread whose slot is known: allocate and allocate_many share it. */
static inline uint64_t slitter__allocate_in(struct slitter_client *c, struct slitter_thread_slot *slot,
                                            uint32_t class_id)
{
    struct slitter_thread_class *tc = &slot->classes[class_id];
    const struct slitter_class *cls = &c->view.classes[class_id];
    for (;;) {
        uint32_t n = tc->alloc_count;
        /* Empty: refill from our own magazines before asking the daemon. */
        if (slitter_unlikely(n == 0)) {
            if (slitter__refill_locally(c, slot, tc, class_id) <= 0)
                return 0;
            n = tc->alloc_count;
        }
        uint64_t handle = tc->alloc[n - 1];
        tc->alloc_count = n - 1;

        /* Span and live byte: two dependent loads (span entry, live map). */
        const struct slitter_span *sp = slitter__span(&c->view, handle);
        int64_t obj = -1;
        if (slitter_likely(sp != NULL && sp->class_id == class_id))
            obj = slitter__object_bit(sp, cls, handle);
        /* No atomic here: an object cached under our tag belongs to this
         * thread alone, and the live map has a byte per object, so a plain
         * store disturbs no neighbour.  Any other byte means the magazine
         * held what it must not (live, free, another rack's), which only
         * rack corruption can cause. */
        if (slitter_likely(obj >= 0 && __atomic_load_n(&c->view.live_map[obj], __ATOMIC_RELAXED) == c->cache_tag)) {
            /* Counting bit, byte, count: a kill between them leaves the
             * bit set and the handle at alloc[alloc_count] (SLITTER_COUNTING). */
            uint64_t counted = tc->counters.allocations;
            slitter__store_counter(&tc->counters.allocations, counted | SLITTER_COUNTING);
            __atomic_store_n(&c->view.live_map[obj], SLITTER_LIVE, __ATOMIC_RELEASE);
            slitter__store_counter(&tc->counters.allocations, counted + 1);
            if (cls->flags & SLITTER_CLASS_ZERO_INIT)
                memset(c->view.data + handle, 0, cls->size);
            return handle;
        }
        slitter__count_corrupt(tc);   /* drop it, never hand it out twice */
    }
}

uint64_t slitter_allocate(struct slitter_client *c, uint32_t class_id)
{
    struct slitter_thread_slot *slot = slitter__slot(c);
    /* Unbound thread, closed or forked client: the slow path binds. */
    if (slitter_unlikely(slot == NULL || class_id >= SLITTER_MAX_CLASSES))
        return 0;
    return slitter__allocate_in(c, slot, class_id);
}

/*
 * Rare (once per magazine): the release magazine is full.  Put it on the
 * shelf for another thread to take, else move it to the outgoing magazine,
 * if the daemon is done with the last one, and ask Python to flush it
 * without waiting; else the slow path flushes and waits.
 */
/*
 * Rare (once per release magazine gone out): a thread that allocated nothing
 * of the class while that magazine filled releases what others allocate (a
 * consumer).  From now on its releases skip the allocation magazine, and
 * what that magazine holds goes out with the release magazines to come,
 * half a magazine at a time (so that the release magazine keeps room while
 * the daemon audits the last one).  Without this a consumer kept a full
 * allocation magazine, up to SLITTER_MAG_CAP objects, for allocations it
 * never made, per thread and class, for as long as it lived.  (Its spare
 * stays: at most one magazine, and the next burst of allocations of a
 * thread that allocates in bursts takes it without waiting.)  Its next
 * allocation that finds the allocation magazine empty ends this
 * (slitter__refill_locally).  No counting bit: the objects keep our tag,
 * and a kill between the stores leaves them where the reclaim, which goes
 * by the live map, finds them.
 */
static void slitter__hand_back_unused(struct slitter_thread_class *tc)
{
    uint64_t allocated = tc->counters.allocations;
    if (allocated != tc->allocations_seen) {
        tc->allocations_seen = allocated;
        return;
    }
    tc->releases_only = UINT32_MAX;
    uint32_t n = tc->alloc_count, half = tc->capacity / 2;
    if (n == 0 || tc->release_count != 0)
        return;
    uint32_t m = n < half ? n : half;
    memcpy(tc->release, tc->alloc + (n - m), m * sizeof(uint64_t));
    tc->alloc_count = n - m;
    tc->release_count = m;
}

static SLITTER_NOINLINE int slitter__send_release_out(struct slitter_client *c, struct slitter_thread_slot *slot,
                                                      struct slitter_thread_class *tc, uint32_t class_id)
{
    if (slitter__put_on_shelf(c, tc, class_id)) {
        slitter__hand_back_unused(tc);
        return SLITTER_OK;
    }
    if (__atomic_load_n(&tc->outgoing_count, __ATOMIC_ACQUIRE) != 0)
        return SLITTER_NEED_FLUSH;
    uint32_t n = tc->release_count;
    memcpy(tc->outgoing, tc->release, n * sizeof(uint64_t));
    tc->release_count = 0;
    __atomic_store_n(&tc->outgoing_count, n, __ATOMIC_RELEASE);
    slitter__hand_back_unused(tc);
    /* The release is done, in a child forked inside the hook too, and
     * nothing below touches the rack. */
    (void)slitter__call_hook(c, slot, class_id, slitter_outgoing_ready);
    return SLITTER_OK;
}

/* Rare: count a refused release under the class it was released as. */
static SLITTER_NOINLINE int slitter__refuse(struct slitter_thread_class *tc, int kind)
{
    tc->counters.errors[kind]++;
    return -1 - kind;
}

int slitter_release(struct slitter_client *c, uint32_t class_id, uint64_t handle)
{
    struct slitter_thread_slot *slot = slitter__slot(c);
    if (slitter_unlikely(slot == NULL || class_id >= SLITTER_MAX_CLASSES))
        return SLITTER_NEED_SLOW;
    struct slitter_thread_class *tc = &slot->classes[class_id];
    uint32_t capacity = tc->capacity;
    /* No room, or class unbound (capacity 0): decide before changing anything. */
    if (slitter_unlikely(tc->release_count >= capacity))
        return SLITTER_NEED_SLOW;

    /* Foreign (beyond the carved spans, or a span no class owns: one load of
     * the header's next_span, hot, and one of the span entry), class (the
     * span table says who owns the address, forever), interior or guard
     * (two multiplies against the class's stride). */
    int64_t obj = slitter__check(c, class_id, handle);
    if (slitter_unlikely(obj < 0))
        return slitter__refuse(tc, (int)(-1 - obj));
    /* Push LIFO into the allocation magazine while it has room (the next
     * allocate gets a cache-hot object), else into the release magazine.
     * The handle goes into its slot first and the count last, with the
     * counting bit set around the byte change: a kill in between leaves the
     * handle where the daemon looks (SLITTER_COUNTING). */
    uint32_t n = tc->alloc_count;
    /* A consumer's releases skip the allocation magazine: its room is masked
     * to 0 (one load from the line `capacity` is on, and an and-not). */
    const int into_alloc = n < (capacity & ~tc->releases_only);
    uint64_t *slot_of = into_alloc ? &tc->alloc[n] : &tc->release[tc->release_count];
    *slot_of = handle;
    uint64_t counted = tc->counters.releases;
    slitter__store_counter(&tc->counters.releases, counted | SLITTER_COUNTING);
    /* Double free: the one atomic of the pair (lock cmpxchg, LIVE -> our
     * tag).  Anything but LIVE means the object is cached or in the depot
     * already, whoever released it and when; of two racing releases
     * exactly one wins, and a loser changes nothing but its counting bit. */
    uint8_t expected = SLITTER_LIVE;
    if (slitter_unlikely(!__atomic_compare_exchange_n(&c->view.live_map[obj], &expected, c->cache_tag, 0,
                                                      __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))) {
        slitter__store_counter(&tc->counters.releases, counted);
        return slitter__refuse(tc, SLITTER_ERR_DOUBLE_FREE);
    }
    slitter__store_counter(&tc->counters.releases, counted + 1);
    if (slitter_likely(into_alloc)) {
        tc->alloc_count = n + 1;
        return SLITTER_OK;
    }
    uint32_t r = tc->release_count;
    tc->release_count = r + 1;
    if (slitter_likely(r + 1 < tc->capacity))
        return SLITTER_OK;
    return slitter__send_release_out(c, slot, tc, class_id);
}

int slitter_key_new(struct slitter_client *c, uint32_t class_id)
{
    pthread_mutex_lock(&open_lock);
    int key = -1;
    if (next_key < SLITTER_MAX_KEYS) {
        key = (int)next_key++;
        keys[key].client = c;
        keys[key].class_id = class_id;
    }
    pthread_mutex_unlock(&open_lock);
    return key;
}

/* A key's entry is written once, before Python ever sees the key. */
uint64_t slitter_allocate_key(uint32_t key)
{
    const struct slitter_key *k = slitter__key(key);
    return k ? slitter_allocate(k->client, k->class_id) : 0;
}

int slitter_release_as(uint32_t key, uint64_t handle)
{
    const struct slitter_key *k = slitter__key(key);
    return k ? slitter_release(k->client, k->class_id, handle) : SLITTER_NEED_SLOW;
}

int slitter_release_key(uint64_t packed)
{
    return slitter_release_as((uint32_t)(packed & (SLITTER_MAX_KEYS - 1)), packed >> SLITTER_KEY_BITS);
}

/*
 * allocate_many's loop: slitter__allocate_in's checks per object, with the
 * class's constants in locals (see slitter__cursor) and the magazine's
 * count written once per magazine.  A magazine refilled locally may hold
 * objects of runs carved since the last cursor, so the cursor is taken
 * again after each refill.
 */
static uint32_t slitter__allocate_batch(struct slitter_client *c, struct slitter_thread_slot *slot,
                                        uint32_t class_id, uint64_t *out, uint32_t n)
{
    struct slitter_thread_class *tc = &slot->classes[class_id];
    const struct slitter_class *cls = &c->view.classes[class_id];
    const uint8_t tag = c->cache_tag;
    uint32_t got = 0, corrupt = 0;
    while (got < n) {
        uint32_t avail = tc->alloc_count;
        if (slitter_unlikely(avail == 0)) {
            int refilled = slitter__refill_locally(c, slot, tc, class_id);
            if (refilled == SLITTER__FORKED)
                return 0;   /* out[0, got) and tc are the parent's: its call hands them out */
            if (refilled == 0)
                break;
            avail = tc->alloc_count;
        }
        const struct slitter__cursor k = slitter__cursor(c, class_id);
        const uint64_t *top = tc->alloc + avail;
        uint32_t take = n - got < avail ? n - got : avail;
        /* Pop the chunk, then set the counting bit with the chunk's size
         * (SLITTER_COUNTING): a kill inside the loop leaves the chunk at
         * alloc[alloc_count ..), where the daemon counts the LIVE ones.
         * Four stores a chunk, none an object. */
        uint64_t counted = tc->counters.allocations;
        uint32_t made = 0;
        tc->pending = SLITTER_PENDING(take, 0);
        tc->alloc_count = avail - take;
        slitter__store_counter(&tc->counters.allocations, counted | SLITTER_COUNTING);
        for (uint32_t i = 1; i <= take; i++) {
            uint64_t handle = top[-(int64_t)i];
            int64_t obj = slitter__check_at(&k, handle);
            /* As in slitter__allocate_in: anything but our tag is dropped. */
            if (slitter_likely(obj >= 0 && __atomic_load_n(&k.live[obj], __ATOMIC_RELAXED) == tag)) {
                __atomic_store_n(&k.live[obj], SLITTER_LIVE, __ATOMIC_RELEASE);
                out[got + made++] = handle;
            } else {
                corrupt++;
            }
        }
        slitter__store_counter(&tc->counters.allocations, counted + made);
        tc->pending = 0;
        got += made;
    }
    if (slitter_unlikely(corrupt != 0))
        tc->counters.errors[SLITTER_ERR_CORRUPT] += corrupt;
    if (cls->flags & SLITTER_CLASS_ZERO_INIT)
        for (uint32_t i = 0; i < got; i++)
            memset(c->view.data + out[i], 0, cls->size);
    return got;
}

uint32_t slitter_allocate_many_key(uint32_t key, uint64_t *out, uint32_t n)
{
    const struct slitter_key *k = slitter__key(key);
    if (k == NULL)
        return 0;
    struct slitter_client *c = k->client;
    uint32_t class_id = k->class_id;
    struct slitter_thread_slot *slot = slitter__slot(c);
    if (slitter_unlikely(slot == NULL || class_id >= SLITTER_MAX_CLASSES))
        return 0;
    return slitter__allocate_batch(c, slot, class_id, out, n);
}

/* The calling thread's slot for the class behind `key`, with its client and
 * class id; NULL for a key that names no client, or an unbound thread. */
static inline struct slitter_thread_slot *slitter__key_slot(uint32_t key, struct slitter_client **c,
                                                             uint32_t *class_id)
{
    const struct slitter_key *k = slitter__key(key);
    if (k == NULL)
        return NULL;
    *c = k->client;
    *class_id = k->class_id;
    return slitter__slot(k->client);
}

static int slitter__check_many(const struct slitter_client *c, uint32_t class_id,
                               const uint64_t *handles, uint32_t n, uint32_t *bad)
{
    const struct slitter__cursor k = slitter__cursor(c, class_id);
    for (uint32_t i = 0; i < n; i++) {
        int64_t obj = slitter__check_at(&k, handles[i]);
        if (obj >= 0 && __atomic_load_n(&k.live[obj], __ATOMIC_ACQUIRE) != SLITTER_LIVE)
            obj = -1 - SLITTER_ERR_DOUBLE_FREE;
        if (slitter_unlikely(obj < 0)) {
            *bad = i;
            return (int)obj;   /* not counted: a check, whoever calls it, changes nothing */
        }
    }
    return SLITTER_OK;
}

int slitter_check_many_key(uint32_t key, const uint64_t *handles, uint32_t n, uint32_t *bad)
{
    struct slitter_client *c;
    uint32_t class_id;
    struct slitter_thread_slot *slot = slitter__key_slot(key, &c, &class_id);
    if (slot == NULL || slot->classes[class_id].capacity == 0)
        return SLITTER_NEED_SLOW;
    return slitter__check_many(c, class_id, handles, n, bad);
}

/* release_many marks the live bytes of a chunk of handles at a time. */
#define SLITTER__CHUNK 64
/* A word of the live map: eight bytes, read and written with the bytes it holds. */
typedef uint64_t __attribute__((may_alias, aligned(8))) slitter__word;
#define SLITTER__BYTES(state) (0x0101010101010101ULL * (uint8_t)(state))

/* Whether objs[0..8) are the eight objects of one live-map word, in any order. */
static inline int slitter__fills_word(const int64_t *objs)
{
    int64_t word = objs[0] >> 3;
    unsigned seen = 0;
    for (int t = 0; t < 8; t++) {
        if ((objs[t] >> 3) != word)
            return 0;
        seen |= 1u << (objs[t] & 7);
    }
    return seen == 0xFF;
}

static int slitter__release_many(struct slitter_client *c, struct slitter_thread_slot *slot, uint32_t class_id,
                                 const uint64_t *handles, uint32_t n, uint32_t *done, int whole)
{
    *done = 0;
    struct slitter_thread_class *tc = &slot->classes[class_id];
    uint32_t capacity = tc->capacity;
    uint32_t a = tc->alloc_count, r = tc->release_count;
    uint32_t alloc_limit = capacity & ~tc->releases_only;   /* 0 for a consumer, as in slitter_release */
    uint32_t alloc_room = a < alloc_limit ? alloc_limit - a : 0;
    uint32_t room = alloc_room + (capacity - r);
    if (capacity == 0 || room == 0 || (whole && n > room))
        return SLITTER_NEED_SLOW;
    if (n > room)
        n = room;
    /* Pass 1: each handle into the slot it will be pushed into (allocation
     * magazine first, each part last handle first, so that each part pops
     * in the order it was given: a batch that fits the allocation
     * magazine's room comes back from allocate_many as it was, rising if it
     * was allocated so, not reversed).  Then the counting bit with the
     * batch's size (SLITTER_COUNTING): a kill during pass 2 leaves every
     * handle where the daemon counts those whose bytes changed. */
    uint32_t into_alloc = alloc_room < n ? alloc_room : n;
    for (uint32_t i = 0; i < into_alloc; i++)
        tc->alloc[a + into_alloc - 1 - i] = handles[i];
    for (uint32_t i = into_alloc; i < n; i++)
        tc->release[r + n - 1 - i] = handles[i];
    uint64_t counted = tc->counters.releases;
    tc->pending = SLITTER_PENDING(into_alloc, n - into_alloc);
    slitter__store_counter(&tc->counters.releases, counted | SLITTER_COUNTING);
    /* Pass 2: every check, and the live byte of each, all or none. */
    const struct slitter__cursor k = slitter__cursor(c, class_id);
    const uint8_t tag = c->cache_tag;
    for (uint32_t first = 0; first < n; first += SLITTER__CHUNK) {
        uint32_t m = n - first < SLITTER__CHUNK ? n - first : SLITTER__CHUNK;
        int64_t objs[SLITTER__CHUNK];
        int64_t refused = 0;
        for (uint32_t j = 0; j < m; j++) {
            objs[j] = slitter__check_at(&k, handles[first + j]);
            if (slitter_unlikely(objs[j] < 0)) {
                /* Mark those before it first: one of them may be refused earlier. */
                refused = objs[j];
                m = j;
                break;
            }
        }
        uint32_t j = 0;
        while (j < m) {
            /* Eight objects that fill one word of the live map, as a batch
             * allocated together mostly does: one lock cmpxchg for the
             * eight, LIVE to our tag in all of them or in none, which is
             * what eight single ones would do (a byte of any other state
             * fails it, and nobody else moves a byte out of LIVE). */
            if (j + 8 <= m && slitter__fills_word(objs + j)) {
                uint64_t expected = SLITTER__BYTES(SLITTER_LIVE);
                if (__atomic_compare_exchange_n((slitter__word *)(k.live + (objs[j] & ~7)), &expected,
                                                SLITTER__BYTES(tag), 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
                    j += 8;
                    continue;
                }
            }
            uint8_t expected = SLITTER_LIVE;
            if (slitter_unlikely(!__atomic_compare_exchange_n(&k.live[objs[j]], &expected, tag, 0,
                                                              __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))) {
                refused = -1 - SLITTER_ERR_DOUBLE_FREE;
                break;
            }
            j++;
        }
        if (slitter_unlikely(refused < 0)) {
            /* Undo: nobody can have taken the objects we marked, since none
             * of them is in a magazine yet. */
            uint32_t i = first + j;
            for (uint32_t u = 0; u < i; u++) {
                int64_t obj = slitter__check_at(&k, handles[u]);   /* >= 0: it passed just now */
                if (slitter_likely(obj >= 0))
                    __atomic_store_n(&k.live[obj], SLITTER_LIVE, __ATOMIC_RELEASE);
            }
            slitter__store_counter(&tc->counters.releases, counted);
            tc->pending = 0;
            *done = i;
            return slitter__refuse(tc, (int)(-1 - refused));
        }
    }
    /* Counted, then pushed: a kill in between leaves objects of our tag in
     * no magazine, which the reclaim frees, counted as released. */
    slitter__store_counter(&tc->counters.releases, counted + n);
    tc->pending = 0;
    tc->alloc_count = a + into_alloc;
    r += n - into_alloc;
    tc->release_count = r;
    *done = n;
    if (r < capacity)
        return SLITTER_OK;
    /* Full: out of the way to the daemon without waiting, if it is done with the last one. */
    return slitter__send_release_out(c, slot, tc, class_id);
}

int slitter_release_many_key(uint32_t key, const uint64_t *handles, uint32_t n, uint32_t *done)
{
    struct slitter_client *c;
    uint32_t class_id;
    struct slitter_thread_slot *slot = slitter__key_slot(key, &c, &class_id);
    *done = 0;
    return slot ? slitter__release_many(c, slot, class_id, handles, n, done, 0) : SLITTER_NEED_SLOW;
}

int slitter_release_whole_key(uint32_t key, const uint64_t *handles, uint32_t n, uint32_t *done)
{
    struct slitter_client *c;
    uint32_t class_id;
    struct slitter_thread_slot *slot = slitter__key_slot(key, &c, &class_id);
    *done = 0;
    return slot ? slitter__release_many(c, slot, class_id, handles, n, done, 1) : SLITTER_NEED_SLOW;
}

/*
 * Batches in one integer, `address << 16 | n`: slitter._batch packs an
 * array('Q') so (native/batch_ext.c).  One integer was first for cffi,
 * which passes two or more arguments through a tuple (about 85 ns a call)
 * and a pointer to a Python array only through ffi.from_buffer (170 ns).
 */
static inline const uint64_t *slitter__batch(uint64_t batch, uint32_t *n)
{
    *n = (uint32_t)(batch & ((1u << SLITTER_BATCH_COUNT_BITS) - 1));
    return (const uint64_t *)(uintptr_t)(batch >> SLITTER_BATCH_COUNT_BITS);
}

uint32_t slitter_allocate_batch(uint32_t key, uint64_t batch)
{
    struct slitter_client *c;
    uint32_t class_id, n;
    uint64_t *out = (uint64_t *)slitter__batch(batch, &n);
    struct slitter_thread_slot *slot = slitter__key_slot(key, &c, &class_id);
    return slot ? slitter__allocate_batch(c, slot, class_id, out, n) : 0;
}

int64_t slitter_check_batch(uint32_t key, uint64_t batch)
{
    struct slitter_client *c;
    uint32_t class_id, n, bad = 0;
    const uint64_t *handles = slitter__batch(batch, &n);
    struct slitter_thread_slot *slot = slitter__key_slot(key, &c, &class_id);
    /* Unbound, or runs carved whose guard pages this process has not
     * protected yet: the slow path binds or protects them, then checks. */
    if (slitter_unlikely(slot == NULL || slot->classes[class_id].capacity == 0 ||
                         __atomic_load_n(&c->view.header->nruns, __ATOMIC_ACQUIRE) != c->guards_applied))
        return SLITTER_NEED_SLOW;
    int result = slitter__check_many(c, class_id, handles, n, &bad);
    return result < 0 ? SLITTER_BATCH_REFUSED(bad, -1 - result) : result;
}

int64_t slitter_release_batch(uint32_t key, uint64_t batch)
{
    struct slitter_client *c;
    uint32_t class_id, n, bad = 0;
    const uint64_t *handles = slitter__batch(batch, &n);
    struct slitter_thread_slot *slot = slitter__key_slot(key, &c, &class_id);
    if (slitter_unlikely(slot == NULL))
        return SLITTER_NEED_SLOW;
    int result = slitter__release_many(c, slot, class_id, handles, n, &bad, 1);
    return result < 0 ? SLITTER_BATCH_REFUSED(bad, -1 - result) : result;
}

/* bench/ baselines: magazine traffic alone (see slitter_fast.h). */
static inline struct slitter_thread_class *slitter__bare_tc(struct slitter_client *c, uint32_t class_id)
{
    struct slitter_thread_slot *slot = slitter__slot(c);
    return (slot == NULL || class_id >= SLITTER_MAX_CLASSES) ? NULL : &slot->classes[class_id];
}

uint64_t slitter_bench_bare_allocate_key(uint32_t key)
{
    const struct slitter_key *k = slitter__key(key);
    struct slitter_thread_class *tc = k ? slitter__bare_tc(k->client, k->class_id) : NULL;
    if (tc == NULL || tc->alloc_count == 0)
        return 0;
    return tc->alloc[--tc->alloc_count];
}

int slitter_bench_bare_release_key(uint64_t packed)
{
    const struct slitter_key *k = slitter__key((uint32_t)(packed & (SLITTER_MAX_KEYS - 1)));
    struct slitter_thread_class *tc = k ? slitter__bare_tc(k->client, k->class_id) : NULL;
    if (tc == NULL || tc->alloc_count >= tc->capacity)
        return SLITTER_NEED_SLOW;
    tc->alloc[tc->alloc_count++] = packed >> SLITTER_KEY_BITS;
    return SLITTER_OK;
}

int64_t slitter_bench_bare_pairs(struct slitter_client *c, uint32_t class_id, uint64_t n)
{
    struct slitter_thread_class *tc = slitter__bare_tc(c, class_id);
    if (tc == NULL || tc->alloc_count == 0)
        return -1;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (uint64_t i = 0; i < n; i++) {
        uint64_t handle = tc->alloc[--tc->alloc_count];
        __asm__ volatile("" : : "r"(handle) : "memory");
        tc->alloc[tc->alloc_count++] = handle;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (int64_t)(t1.tv_sec - t0.tv_sec) * 1000000000 + (t1.tv_nsec - t0.tv_nsec);
}

int64_t slitter_object_size_key(uint64_t packed)
{
    uint32_t key = (uint32_t)(packed & (SLITTER_MAX_KEYS - 1));
    struct slitter_client *c = keys[key].client;
    if (slitter_unlikely(c == NULL))
        return -1 - SLITTER_ERR_FOREIGN_ADDRESS;
    /* Closed (its tables may be unmapped by now) or forked: the slow path knows. */
    if (slitter_unlikely(c->epoch == 0))
        return SLITTER_VIEW_DETACHED;
    /* A run carved since the last slow path: its guard page must be
     * PROT_NONE here before anyone touches its objects. */
    if (slitter_unlikely(__atomic_load_n(&c->view.header->nruns, __ATOMIC_ACQUIRE) != c->guards_applied))
        return SLITTER_VIEW_GUARDS;
    uint64_t handle = packed >> SLITTER_KEY_BITS;
    uint32_t class_id;
    int64_t obj = slitter__locate(&c->view, handle, &class_id);
    return obj < 0 ? obj : (int64_t)c->view.classes[class_id].size;
}

int slitter_hooked_here(const struct slitter_client *c)
{
    for (const struct slitter__hook_frame *f = tls.hooks; f != NULL; f = f->outer)
        if (f->client == c)
            return 1;
    return 0;
}

int slitter_arena_ready(const struct slitter_client *c)
{
    return c->epoch != 0 && __atomic_load_n(&c->view.header->nruns, __ATOMIC_ACQUIRE) == c->guards_applied;
}

int slitter_count_error(struct slitter_client *c, uint32_t class_id, int kind)
{
    struct slitter_thread_slot *slot = slitter__slot(c);
    if (slot == NULL || class_id >= SLITTER_MAX_CLASSES || kind < 0 || kind >= SLITTER_ERR_KINDS)
        return -1;
    slot->classes[class_id].counters.errors[kind]++;
    return 0;
}

void *slitter_object(const struct slitter_view *v, uint64_t handle,
                     uint32_t *class_out, int *kind_out)
{
    int64_t obj = slitter__locate(v, handle, class_out);
    *kind_out = obj < 0 ? (int)(-1 - obj) : 0;
    return obj < 0 ? NULL : v->data + handle;
}

uint32_t slitter_audit_flush(const struct slitter_view *v, uint32_t class_id, uint8_t tag,
                             const uint64_t *handles, uint32_t n,
                             uint64_t *accepted, uint64_t *refused,
                             uint8_t *refused_kind, uint32_t *nrefused)
{
    uint32_t nacc = 0, nref = 0;
    /* The class's constants in locals: the live-map stores below would
     * otherwise reload them per handle (see slitter__cursor). */
    const struct slitter__cursor k = slitter__view_cursor(v, class_id);
    for (uint32_t i = 0; i < n; i++) {
        uint64_t handle = handles[i];
        int64_t obj = slitter__check_at(&k, handle);
        int kind = -1;
        if (obj < 0) {
            kind = (int)(-1 - obj);
        } else {
            uint8_t state = __atomic_load_n(&k.live[obj], __ATOMIC_ACQUIRE);
            if (state == SLITTER_FREE)
                kind = SLITTER_ERR_DOUBLE_FREE;     /* in the depot, or twice in this batch */
            else if (state != tag)
                kind = SLITTER_ERR_CORRUPT;         /* live, or cached by another rack */
            else {
                /* Only this rack moves objects out of its tag; it waits for us. */
                __atomic_store_n(&k.live[obj], SLITTER_FREE, __ATOMIC_RELEASE);
            }
        }
        if (kind < 0) {
            accepted[nacc++] = handle;
        } else {
            refused[nref] = handle;
            refused_kind[nref] = (uint8_t)kind;
            nref++;
        }
    }
    *nrefused = nref;
    return nacc;
}

/* The objects of a run a scan looks at: those carved (trusted up to the run's size). */
static inline uint32_t slitter__scanned(const struct slitter_run *run)
{
    return run->carved < run->nobjects ? run->carved : run->nobjects;
}

uint64_t slitter_recover_run(const struct slitter_view *v, const struct slitter_run *run, const uint8_t *adopted,
                             uint64_t *free_out, uint32_t *nfree)
{
    const struct slitter_class *cls = &v->classes[run->class_id];
    uint64_t base = (uint64_t)run->first_span << SLITTER_SPAN_SHIFT;
    uint64_t live = 0;
    uint32_t n = 0;
    /* Highest address first, as slitter_reclaim_run: the depot hands them out rising. */
    for (uint32_t i = slitter__scanned(run); i-- > 0;) {
        uint64_t obj = run->obj_base + i;
        /* One read decides: an adopted client's fast path goes on meanwhile,
         * and what it pops or pushes is LIVE or its own tag, which we keep. */
        uint8_t state = __atomic_load_n(&v->live_map[obj], __ATOMIC_ACQUIRE);
        if (state == SLITTER_LIVE) {
            live++;
        } else if (!(state >= SLITTER_TAG_BASE && adopted[state])) {
            __atomic_store_n(&v->live_map[obj], SLITTER_FREE, __ATOMIC_RELEASE);
            free_out[n++] = base + (uint64_t)i * cls->stride;
        }
    }
    *nfree = n;
    return live;
}

static int slitter__cmp_handles(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Sort `h[0..n)` and drop repeats; returns how many are left. */
static uint32_t slitter__sort_unique(uint64_t *h, uint32_t n)
{
    qsort(h, n, sizeof *h, slitter__cmp_handles);
    uint32_t u = 0;
    for (uint32_t i = 0; i < n; i++)
        if (u == 0 || h[i] != h[u - 1])
            h[u++] = h[i];
    return u;
}

/* The live byte of `handle` if it is an object of `class_id`, else -1. */
static int slitter__byte_of(const struct slitter_view *v, uint64_t handle, uint32_t class_id)
{
    uint32_t owner;
    int64_t obj = slitter__locate(v, handle, &owner);
    return obj >= 0 && owner == class_id ? __atomic_load_n(&v->live_map[obj], __ATOMIC_ACQUIRE) : -1;
}

static inline uint32_t slitter__min(uint32_t a, uint32_t b)
{
    return a < b ? a : b;
}

/* Append `m[from .. from + n)`, cut at the array's end, to `out`; returns the new length. */
static uint32_t slitter__gather(uint64_t *out, uint32_t len, const uint64_t *m, uint32_t from, uint32_t n)
{
    from = slitter__min(from, SLITTER_MAG_CAP);
    n = slitter__min(n, SLITTER_MAG_CAP - from);
    memcpy(out + len, m + from, n * sizeof *m);
    return len + n;
}

uint32_t slitter_settle_counting(const struct slitter_view *v, struct slitter_rack *rack, uint32_t class_id,
                                 uint8_t tag)
{
    if (class_id >= SLITTER_MAX_CLASSES)
        return 0;
    /* The rack is a dead client's, or a detaching live one's: every word of it is untrusted, each count is
     * cut at its array's size where it is used, and the touched bits are read once (they may change). */
    struct slitter_thread_class *tcs[SLITTER_MAX_THREADS];
    uint32_t nt = 0, any_release = 0, any_op = 0;
    uint64_t threads = __atomic_load_n(&rack->threads_touched, __ATOMIC_RELAXED);
    for (uint32_t t = 0; t < SLITTER_MAX_THREADS; t++) {
        struct slitter_thread_slot *slot = &rack->threads[t];
        if (!(threads >> t & 1) || !(__atomic_load_n(&slot->classes_touched, __ATOMIC_RELAXED) >> class_id & 1))
            continue;
        struct slitter_thread_class *tc = &slot->classes[class_id];
        tcs[nt++] = tc;
        any_release |= (tc->counters.releases & SLITTER_COUNTING) != 0;
        any_op |= ((tc->counters.allocations | tc->counters.releases) & SLITTER_COUNTING) != 0;
    }
    if (!any_op)
        return 0;
    /* What the rack caches of the class, for a release under way: every thread's four magazines up to their
     * counts (each gather at most SLITTER_MAG_CAP).  An object with the rack's tag that none of them holds
     * is one the release tagged. */
    uint64_t candidates[2 * SLITTER_MAG_CAP];
    uint64_t *cached = any_release ? malloc((size_t)nt * 4 * SLITTER_MAG_CAP * sizeof *cached) : NULL;
    if (any_release && cached == NULL)
        return UINT32_MAX;
    uint32_t ncached = 0;
    for (uint32_t i = 0; i < nt && any_release; i++) {
        const struct slitter_thread_class *tc = tcs[i];
        ncached = slitter__gather(cached, ncached, tc->alloc, 0, tc->alloc_count);
        ncached = slitter__gather(cached, ncached, tc->release, 0, tc->release_count);
        ncached = slitter__gather(cached, ncached, tc->spare, 0, tc->spare_count);
        ncached = slitter__gather(cached, ncached, tc->outgoing, 0, tc->outgoing_count);
    }
    if (any_release)
        ncached = slitter__sort_unique(cached, ncached);

    /* At most one thread of a client is inside a window when it dies: the fast path runs with the GIL
     * held and calls its hooks with no bit set. */
    uint32_t settled = 0;
    for (uint32_t i = 0; i < nt; i++) {
        struct slitter_thread_class *tc = tcs[i];
        uint32_t pending = tc->pending;   /* 0: a single call, one object */
        uint64_t a = __atomic_load_n(&tc->counters.allocations, __ATOMIC_RELAXED);
        if (a & SLITTER_COUNTING) {
            /* Popped (from alloc_count up) and checked: LIVE means its store happened.  (An entry
             * the batch dropped as corrupt whose byte is LIVE would be counted too: only a rack
             * written by something else than our fast path holds one.) */
            uint32_t span = pending ? (pending & 0xFFFF) : 1;  /* SLITTER_PENDING's low half */
            uint32_t n = slitter__sort_unique(candidates, slitter__gather(candidates, 0, tc->alloc, tc->alloc_count, span));
            a &= ~SLITTER_COUNTING;
            for (uint32_t j = 0; j < n; j++)
                if (slitter__byte_of(v, candidates[j], class_id) == SLITTER_LIVE) {
                    a++;
                    settled++;
                }
            tc->counters.allocations = a;
        }
        uint64_t r = __atomic_load_n(&tc->counters.releases, __ATOMIC_RELAXED);
        if ((r & SLITTER_COUNTING) && any_release) {  /* any_release: as read above, with `cached` */
            /* In the slots it was being pushed into, with our tag, and in no magazine of the rack:
             * its compare-and-swap happened.  A single release's slot is alloc[alloc_count] or
             * release[release_count], by a capacity the daemon may have grown since: both are
             * looked at, and the other holds an older handle, of no object of our tag or of one a
             * magazine caches (so is an object of a refused double free the rack caches). */
            uint32_t into_alloc = pending ? (pending & 0xFFFF) : 1;
            uint32_t into_release = pending ? (pending >> SLITTER_PENDING_SHIFT) : 1;
            uint32_t n = slitter__gather(candidates, 0, tc->alloc, tc->alloc_count, into_alloc);
            n = slitter__sort_unique(candidates, slitter__gather(candidates, n, tc->release, tc->release_count,
                                                                 into_release));
            r &= ~SLITTER_COUNTING;
            for (uint32_t j = 0; j < n; j++)
                if (slitter__byte_of(v, candidates[j], class_id) == tag
                    && !bsearch(&candidates[j], cached, ncached, sizeof *cached, slitter__cmp_handles)) {
                    r++;
                    settled++;
                }
            tc->counters.releases = r;
        }
        tc->pending = 0;
    }
    free(cached);
    return settled;
}

uint32_t slitter_reclaim_run(const struct slitter_view *v, const struct slitter_run *run, const uint8_t *tags,
                             uint64_t *out)
{
    const struct slitter_class *cls = &v->classes[run->class_id];
    uint64_t base = (uint64_t)run->first_span << SLITTER_SPAN_SHIFT;
    uint32_t n = 0;
    /* Highest address first, as slitter_carve: the depot hands them out rising. */
    for (uint32_t i = slitter__scanned(run); i-- > 0;) {
        uint64_t obj = run->obj_base + i;
        uint8_t state = __atomic_load_n(&v->live_map[obj], __ATOMIC_ACQUIRE);
        if (state >= SLITTER_TAG_BASE && tags[state]) {
            __atomic_store_n(&v->live_map[obj], SLITTER_FREE, __ATOMIC_RELEASE);
            out[n++] = base + (uint64_t)i * cls->stride;
        }
    }
    return n;
}

void slitter_shelf_counts(const struct slitter_shelf *shelf, uint64_t *out)
{
    memset(out, 0, SLITTER_MAX_CLASSES * sizeof(uint64_t));
    for (uint32_t i = 0; i < SLITTER_SHELF_SLOTS; i++) {
        const struct slitter_shelf_slot *s = &shelf->slots[i];
        uint32_t state = __atomic_load_n(&s->state, __ATOMIC_ACQUIRE);
        uint32_t class_id = SLITTER_SHELF_WHO(state);
        if (SLITTER_SHELF_KIND(state) == SLITTER_SHELF_FULL && class_id < SLITTER_MAX_CLASSES)
            out[class_id] += slitter__slot_count(s);
    }
}

void slitter_shelf_states(const struct slitter_shelf *shelf, uint32_t *out)
{
    for (uint32_t i = 0; i < SLITTER_SHELF_SLOTS; i++)
        out[i] = __atomic_load_n(&shelf->slots[i].state, __ATOMIC_ACQUIRE);
}

int slitter_shelf_seize(struct slitter_shelf *shelf, uint32_t index, uint32_t seen)
{
    if (index >= SLITTER_SHELF_SLOTS)
        return 0;
    return __atomic_compare_exchange_n(&shelf->slots[index].state, &seen,
                                       SLITTER_SHELF_STATE(SLITTER_SHELF_BUSY, SLITTER_SHELF_DAEMON), 0,
                                       __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
}

uint32_t slitter_shelf_drain(const struct slitter_view *v, struct slitter_shelf *shelf, uint32_t index,
                             uint32_t class_id, uint64_t *out)
{
    if (index >= SLITTER_SHELF_SLOTS || class_id == 0 || class_id >= SLITTER_MAX_CLASSES)
        return 0;
    const struct slitter_shelf_slot *s = &shelf->slots[index];
    uint32_t count = slitter__slot_count(s);
    const uint8_t slot_tag = (uint8_t)SLITTER_SHELF_TAG(index);
    const struct slitter__cursor k = slitter__view_cursor(v, class_id);
    uint32_t n = 0;
    for (uint32_t j = 0; j < count; j++) {
        uint64_t handle = s->handles[j];
        int64_t obj = slitter__check_at(&k, handle);
        /* A compare-and-swap, not the plain store a take makes: the daemon
         * is off the hot path, and so a client that claimed the slot
         * against the rules (a state word written by hand) cannot get an
         * object it took freed under it. */
        uint8_t expected = slot_tag;
        if (obj >= 0 && __atomic_compare_exchange_n(&k.live[obj], &expected, SLITTER_FREE, 0,
                                                    __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
            out[n++] = handle;
        }
    }
    return n;
}

void slitter_shelf_release(struct slitter_shelf *shelf, uint32_t index)
{
    if (index >= SLITTER_SHELF_SLOTS)
        return;
    shelf->slots[index].count = 0;
    __atomic_store_n(&shelf->slots[index].state, SLITTER_SHELF_EMPTY, __ATOMIC_RELEASE);
}

void slitter_hand_out(const struct slitter_view *v, uint32_t class_id, const uint64_t *handles, uint32_t n,
                      uint8_t tag)
{
    const struct slitter__cursor k = slitter__view_cursor(v, class_id);
    for (uint32_t i = 0; i < n; i++) {
        int64_t obj = slitter__check_at(&k, handles[i]);
        if (obj >= 0)
            __atomic_store_n(&k.live[obj], tag, __ATOMIC_RELEASE);
    }
}

void slitter_mark_touched(struct slitter_rack *rack, uint32_t thread, uint32_t class_id)
{
    if (thread >= SLITTER_MAX_THREADS || class_id >= SLITTER_MAX_CLASSES)
        return;
    __atomic_fetch_or(&rack->threads_touched, 1ULL << thread, __ATOMIC_ACQ_REL);
    __atomic_fetch_or(&rack->threads[thread].classes_touched, 1ULL << class_id, __ATOMIC_ACQ_REL);
}

/* Highest address first: a magazine pops from its end, so the objects of a
 * fresh run are handed out in rising order, which the hardware prefetcher
 * follows (a consumer reading 1 KiB records written on the other core took
 * about 9 % longer in falling order). */
void slitter_carve(uint64_t *out, uint64_t base, uint64_t stride, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++)
        out[i] = base + (uint64_t)(n - 1 - i) * stride;
}
