/*
 * What Python calls in the native module.  Every declaration here is also
 * handed to cffi's cdef by build_ffi.py; the struct layouts live in layout.h.
 *
 * Conventions (mimalloc prim.h style): functions that can fail return an int,
 * 0 or positive for success, negative for a refusal; out-parameters are
 * never NULL.  Nothing here makes a system call on the fast path, takes a
 * lock, or calls back into Python.
 */
#ifndef SLITTER_FAST_H
#define SLITTER_FAST_H

#include <stddef.h>
#include <stdint.h>
#include "layout.h"

/** Pointers into one process's mappings of an instance (the daemon's and every client's alike). */
struct slitter_view {
    const struct slitter_header *header;
    const struct slitter_span *spans;
    const struct slitter_class *classes;
    uint8_t *live_map;
    unsigned char *data;
};

/** A client's connection to an instance, as the fast path sees it. */
struct slitter_client {
    struct slitter_view view;
    struct slitter_rack *rack;
    uint64_t epoch;            /* unique per open; 0 once closed or forked */
    unsigned int thread_key;   /* pthread_key_t: this thread's slot */
    int has_key;
    uint64_t guards_applied;   /* runs whose guard page this process has protected */
    uint8_t cache_tag;         /* SLITTER_TAG(rack index): the live byte of our cached objects */
    struct slitter_shelf *shelf;   /* NULL: magazines go through the daemon only (last: the hot fields keep their offsets) */
    /* Threads inside slitter_spare_taken or slitter_outgoing_ready, which run
     * Python and may let other threads run: their native frame still uses
     * the rack when the hook returns, so Heap.close() unmaps nothing until
     * this is 0.  Changed and read with the GIL held. */
    uint32_t in_hook;
};

/**
 * Implemented in Python (cffi `extern "Python+C"`): the thread took its
 * spare magazine, so a new one should be prefetched.  Called at most once
 * per magazine, from slitter_allocate's rare path; it must not block.
 */
void slitter_spare_taken(struct slitter_client *c, uint32_t thread, uint32_t class_id);

/**
 * Implemented in Python, like slitter_spare_taken: the thread moved a full
 * release magazine to its outgoing one, which should be flushed without
 * waiting.  Called at most once per magazine; it must not block.
 */
void slitter_outgoing_ready(struct slitter_client *c, uint32_t thread, uint32_t class_id);

/** Fill `v` from a mapping of the meta segment's tables (read-only is enough). */
void slitter_view_init(struct slitter_view *v, const void *meta_tables, void *live_map, void *data);

/**
 * Open a client over its mappings (`shelf` may be NULL: no shelf).
 * Returns 0, or an errno value when no pthread key is left.
 */
int slitter_client_open(struct slitter_client *c, const void *meta_tables, void *live_map,
                        struct slitter_rack *rack, uint32_t rack_index, void *data, struct slitter_shelf *shelf);

/** Forget the client: its threads' slots stop resolving.  Idempotent. */
void slitter_client_close(struct slitter_client *c);

/**
 * In a forked child: drop the parent's rack without touching it, so no
 * object the parent caches is ever used twice.  Call before anything else.
 */
void slitter_client_forked(struct slitter_client *c);

/**
 * Bind the calling thread (claiming a slot in the rack on first use) and the
 * class (setting its magazine capacity).  Returns the thread slot index, or
 * -1 when all SLITTER_MAX_THREADS slots are owned by live threads, or -2
 * when the client is closed or the class is unknown.
 */
int slitter_bind(struct slitter_client *c, uint32_t class_id);

/**
 * Pop an object of `class_id` from this thread's magazines and mark it live.
 * Returns its handle, or 0 when the slow path must run first (thread or
 * class unbound, or both magazines empty).
 */
uint64_t slitter_allocate(struct slitter_client *c, uint32_t class_id);

/**
 * Check `handle` (foreign, class, interior, double free), mark it not live and
 * push it.  Returns SLITTER_OK, SLITTER_NEED_FLUSH (released, and the release
 * magazine is full), SLITTER_NEED_SLOW (nothing done), or SLITTER_E_* (the
 * release was refused and nothing changed).
 */
int slitter_release(struct slitter_client *c, uint32_t class_id, uint64_t handle);

/**
 * A per-process key for (client, class), for the single-argument calls
 * below.  Returns the key (>= 1), or -1 when SLITTER_MAX_KEYS were made.
 */
int slitter_key_new(struct slitter_client *c, uint32_t class_id);

/** slitter_allocate() for the class behind `key`, what `Class.allocate` calls; 0 means take the slow path. */
uint64_t slitter_allocate_key(uint32_t key);

/**
 * slitter_release() of `handle` as the class behind `key`: what
 * `Class.release` calls (slitter._entry, native/entry_ext.c).
 */
int slitter_release_as(uint32_t key, uint64_t handle);

/**
 * slitter_release_as() of `packed >> SLITTER_KEY_BITS` as the key
 * `packed & (SLITTER_MAX_KEYS - 1)`: one integer for callers that have only
 * one to pass (bench/overhead.py times it against its unchecked twin,
 * slitter_bench_bare_release_key).  Handles are below 2**48, so the packed
 * value of a handle that is not fits no uint64_t: cffi refuses it before C.
 */
int slitter_release_key(uint64_t packed);

/**
 * Allocate up to `n` objects of the class behind `key` into `out`, from the
 * thread's magazines only.  Returns how many (0 when the slow path must run).
 */
uint32_t slitter_allocate_many_key(uint32_t key, uint64_t *out, uint32_t n);

/**
 * Check `n` handles for a release as the class behind `key` without
 * changing anything (not even the error counters): foreign, class,
 * interior, and not live (double free).
 * Returns SLITTER_OK, SLITTER_NEED_SLOW (thread or class unbound), or
 * SLITTER_E_* with the first bad handle's index in `*bad`.
 */
int slitter_check_many_key(uint32_t key, const uint64_t *handles, uint32_t n, uint32_t *bad);

/**
 * Release as many of `n` handles as fit in the thread's magazines, all or
 * none: `*done` gets how many were released.  On a refusal (a duplicate in
 * the batch, or a release racing with another thread) the ones already
 * marked are restored, `*done` gets the bad handle's index and SLITTER_E_*
 * is returned.  SLITTER_NEED_FLUSH: the release magazine is full.
 */
int slitter_release_many_key(uint32_t key, const uint64_t *handles, uint32_t n, uint32_t *done);

/**
 * slitter_release_many_key() of all `n` handles at once, or of none:
 * SLITTER_NEED_SLOW, with nothing done, when they do not all fit the room
 * left in the thread's magazines.  Its first pass makes every check and is
 * undone on a refusal, so a batch that fits needs no separate check.
 */
int slitter_release_whole_key(uint32_t key, const uint64_t *handles, uint32_t n, uint32_t *done);

/**
 * The batch calls with the batch in one integer:
 * `address << SLITTER_BATCH_COUNT_BITS | n`, where `address` is that of a
 * uint64_t[n] and 0 < n < 2**SLITTER_BATCH_COUNT_BITS.  slitter._batch
 * (native/batch_ext.c) packs it from an array('Q') and calls these through
 * pointers; an array it cannot pack (empty, too long, or at an address of
 * 2**48 or more, which user space on x86-64 does not have unless a program
 * maps there on purpose) takes the client's general path.
 *
 * slitter_allocate_batch(): slitter_allocate_many_key().
 * slitter_check_batch(): slitter_check_many_key(), and SLITTER_NEED_SLOW as
 *   well when runs were carved whose guard pages this process has not
 *   protected yet (the check comes before touching the objects).
 * slitter_release_batch(): slitter_release_whole_key().
 * A refusal of handle i with SLITTER_ERR_* kind k returns
 * SLITTER_BATCH_REFUSED(i, k), which is negative (-1 for handle 0 of
 * another class); other results are as the calls', never negative.
 * The array must not change during the call: slitter._batch keeps the
 * GIL and holds a buffer export of the array (which forbids resizing it)
 * until the call returns.
 */
#define SLITTER_BATCH_COUNT_BITS 16
#define SLITTER_BATCH_KIND_BITS 8
#define SLITTER_BATCH_REFUSED(index, kind) (-1 - (((int64_t)(index) << SLITTER_BATCH_KIND_BITS) | (kind)))
uint32_t slitter_allocate_batch(uint32_t key, uint64_t batch);
int64_t slitter_check_batch(uint32_t key, uint64_t batch);
int64_t slitter_release_batch(uint32_t key, uint64_t batch);

/**
 * The size of the object at `packed >> SLITTER_KEY_BITS`, for a view of it,
 * with the client behind the low bits' key (any key of that client).
 * Returns the size (> 0), SLITTER_VIEW_GUARDS when runs were carved whose
 * guard pages this process has not protected yet (apply them, then ask
 * again), SLITTER_VIEW_DETACHED when the client is closed or forked and
 * not re-attached, or -1 - SLITTER_ERR_* when the handle is not an object start.
 */
int64_t slitter_object_size_key(uint64_t packed);

/** 1 when the calling thread is inside one of `c`'s Python hooks (Heap.close() cannot wait for itself). */
int slitter_hooked_here(const struct slitter_client *c);

/**
 * 1 when `c` is open and this process has protected the guard page of
 * every run carved so far: Heap.arena may be handed out without the slow
 * path.  Native, so it cannot interleave with Heap.close().
 */
int slitter_arena_ready(const struct slitter_client *c);

/**
 * Count a refusal that never reached slitter_release() (a handle that is
 * not even a u64) against the calling thread's counters.  The thread must
 * be bound (slitter_bind); otherwise nothing is counted and -1 returned.
 */
int slitter_count_error(struct slitter_client *c, uint32_t class_id, int kind);

/**
 * Resolve a handle to its object.  Returns a pointer to the object and sets
 * `*class_out`, or returns NULL and sets `*kind_out` to SLITTER_ERR_* (and
 * `*class_out` to the owning class when one owns the span, else 0).
 */
void *slitter_object(const struct slitter_view *v, uint64_t handle,
                     uint32_t *class_out, int *kind_out);

/**
 * Daemon: audit `n` handles the rack tagged `tag` flushed as `class_id`.
 * Each must be an object start of that class whose live byte is `tag` (so
 * cached by that very rack: not live, not in the depot, not in another
 * rack, not repeated in the batch).  Accepted ones become SLITTER_FREE and
 * are written to `accepted`; refused ones go to
 * `refused` with their SLITTER_ERR_* kind in `refused_kind`.  Returns the
 * number accepted; `*nrefused` gets the rest.
 */
uint32_t slitter_audit_flush(const struct slitter_view *v, uint32_t class_id, uint8_t tag,
                             const uint64_t *handles, uint32_t n,
                             uint64_t *accepted, uint64_t *refused,
                             uint8_t *refused_kind, uint32_t *nrefused);

/**
 * Daemon recovery: every carved object of `run` that is neither live nor
 * cached by a rack with `adopted[tag]` set becomes SLITTER_FREE and its
 * handle is written to `free_out` (room for run->carved, at most
 * run->nobjects), highest address first; `*nfree` gets how many.  Each
 * live byte is read once, and what is written to `free_out` is decided by
 * that one read.  Returns how many are live.
 */
uint64_t slitter_recover_run(const struct slitter_view *v, const struct slitter_run *run, const uint8_t *adopted,
                             uint64_t *free_out, uint32_t *nfree);

/*
 * Daemon: the operations of a dead client's threads on `class_id` caught
 * between their counting bit and their count (SLITTER_COUNTING), a single
 * call or a batch: count each object whose live byte says its change
 * happened, and clear the bits.  Call before the reclaim frees the rack's
 * objects (it reads their bytes).  Returns how many it counted, or
 * UINT32_MAX when it could not allocate its scratch (nothing changed).
 */
uint32_t slitter_settle_counting(const struct slitter_view *v, struct slitter_rack *rack, uint32_t class_id,
                                 uint8_t tag);

/**
 * Daemon: every object of `run` whose live byte is a tag with `tags[tag]`
 * set (a rack's, or a shelf slot's) becomes SLITTER_FREE and is written to
 * `out`; returns how many.  The live map is the
 * truth, so whatever the rack or the slot says, nothing of a reclaimed
 * rack or slot stays cached.
 */
uint32_t slitter_reclaim_run(const struct slitter_view *v, const struct slitter_run *run, const uint8_t *tags,
                             uint64_t *out);

/**
 * Daemon: the objects on the shelf, per class (`out[class_id]`, zeroed
 * first), from the FULL slots, each count clamped to SLITTER_MAG_CAP.
 */
void slitter_shelf_counts(const struct slitter_shelf *shelf, uint64_t *out);

/**
 * Daemon: the state of every slot of the shelf (`out`: SLITTER_SHELF_SLOTS
 * words), in one call: one cffi attribute read a slot would cost the
 * daemon's tick microseconds.
 */
void slitter_shelf_states(const struct slitter_shelf *shelf, uint32_t *out);

/**
 * Daemon: take slot `index` of the shelf if its state is still `seen`
 * (compare-and-swap to BUSY | SLITTER_SHELF_DAEMON << 8).  Returns 1 when
 * the daemon now holds it, 0 when a client changed it first.
 */
int slitter_shelf_seize(struct slitter_shelf *shelf, uint32_t index, uint32_t seen);

/**
 * Daemon: the objects of slot `index`, which the daemon holds (seized from
 * FULL | class_id), back to the depot: each handle that is an object start
 * of `class_id` under the slot's tag becomes SLITTER_FREE and is written to
 * `out` (SLITTER_MAG_CAP entries).  Others are
 * skipped, as a take would.  Returns how many.
 */
uint32_t slitter_shelf_drain(const struct slitter_view *v, struct slitter_shelf *shelf, uint32_t index,
                             uint32_t class_id, uint64_t *out);

/** Daemon: empty slot `index`, which it or a dead client holds (count 0, then state EMPTY, release). */
void slitter_shelf_release(struct slitter_shelf *shelf, uint32_t index);

/** Daemon: `n` handles of class `class_id` leave the depot for the rack tagged `tag` (live byte = tag). */
void slitter_hand_out(const struct slitter_view *v, uint32_t class_id, const uint64_t *handles, uint32_t n,
                      uint8_t tag);

/**
 * Daemon: mark a thread slot and class of a rack as holding magazines (the
 * client marks them when it binds; a refill into a slot it never bound must
 * be seen too).  Atomic, as the client may be binding another thread.
 */
void slitter_mark_touched(struct slitter_rack *rack, uint32_t thread, uint32_t class_id);

/** Daemon: write the `n` handles base, base+stride, ... into `out`, highest first (bump carving: a
 *  magazine pops from its end, so the run is handed out in rising order). */
void slitter_carve(uint64_t *out, uint64_t base, uint64_t stride, uint32_t n);

/**
 * bench/ baselines: the same magazine pop and push as slitter_allocate_key()
 * and slitter_release_key(), with no check, no live map and no counter, to
 * measure what the checks and counters cost.  Never use them on a real heap.
 */
uint64_t slitter_bench_bare_allocate_key(uint32_t key);
int slitter_bench_bare_release_key(uint64_t packed);

/** bench/: `n` bare pop+push pairs from C; returns elapsed nanoseconds, or -1. */
int64_t slitter_bench_bare_pairs(struct slitter_client *c, uint32_t class_id, uint64_t n);

/** An empty call: the floor of a call into this module, for bench/. */
void slitter_noop(void);

/**
 * An empty call as cffi makes it by default, for bench/: it drops and
 * re-takes the GIL as every standard cffi wrapper does (this module's
 * wrappers keep it; see build_ffi.py).  Defined in build_ffi.py, where
 * Python.h is included.
 */
void slitter_noop_standard(void);

/** bench/: `n` allocate+release pairs from C; returns elapsed nanoseconds, or -1. */
int64_t slitter_bench_pairs(struct slitter_client *c, uint32_t class_id, uint64_t n);

/**
 * bench/: `n` times the live-map traffic of one pair alone (a lock cmpxchg
 * of one byte, then a release store to it): the floor of a checked pair.
 * Returns elapsed nanoseconds.
 */
int64_t slitter_bench_live_byte_pairs(uint64_t n);

/** bench/: `n` glibc malloc(size)+free pairs; returns elapsed nanoseconds. */
int64_t slitter_bench_malloc_pairs(size_t size, uint64_t n);

#endif /* SLITTER_FAST_H */
