/*
 * The shared-memory layout of one slitter instance: the one source of truth.
 *
 * Python (daemon and client) never re-declares an offset: it reads these
 * structs through cffi (`ffi.sizeof`, `ffi.offsetof`, `ffi.cast`).
 *
 * An instance owns two POSIX shared-memory segments:
 *
 *   data  /slitter.NAME.data   the arena: a fixed sparse size mapped
 *                              MAP_NORESERVE, never moved, never shrunk.
 *                              Span 0 is a guard span; every run of spans
 *                              ends in a guard page.  No allocator metadata.
 *   meta  /slitter.NAME.meta   header | span table | run table | class table
 *                              (clients map these read-only) | live map,
 *                              one byte per object (clients map read-write)
 *                              | rack owners (daemon only)
 *                              | racks (each client maps its own)
 *                              | the shelf (every client maps it read-write).
 *
 * A handle is a u64: segment index in the top 16 bits (0: the data segment),
 * byte offset of the object inside that segment below.  Handle 0 is never an
 * object, because offset 0 lies in the guard span.
 */
#ifndef SLITTER_LAYOUT_H
#define SLITTER_LAYOUT_H

#include <stdint.h>

#define SLITTER_LAYOUT_MAGIC   0x2152455454494C53ULL /* "SLITTER!" little-endian */
#define SLITTER_LAYOUT_VERSION 5

#define SLITTER_PAGE_SIZE      4096
#define SLITTER_SPAN_SHIFT     16          /* 64 KiB spans */
#define SLITTER_SPAN_SIZE      (1ULL << SLITTER_SPAN_SHIFT)
#define SLITTER_HANDLE_SEG_SHIFT 48
#define SLITTER_HANDLE_OFFSET_MASK ((1ULL << SLITTER_HANDLE_SEG_SHIFT) - 1)
#define SLITTER_MIN_STRIDE     16          /* objects are 16-byte aligned */
#define SLITTER_MAX_OBJECT     (64ULL << 20)
#define SLITTER_MAX_RUN        (1ULL << 31) /* run offsets fit 32-bit fastdiv */

#define SLITTER_MAX_CLASSES    64          /* class ids 1..63; 0 = no class */
#define SLITTER_MAX_THREADS    32          /* thread slots per rack */
#define SLITTER_MAG_CAP        16384       /* handles per magazine, at most; a class starts at 4096 or fewer */
#define SLITTER_CLASS_NAME_MAX 48          /* including the NUL */
#define SLITTER_CLIENT_NAME_MAX 32         /* client names as kept, including the NUL */
#define SLITTER_DEPARTED_MAX   128         /* departed clients remembered */
#define SLITTER_KEY_BITS       16          /* release_key packs handle << 16 | key */
#define SLITTER_MAX_KEYS       (1u << SLITTER_KEY_BITS)

/* Error kinds, counted per class in every rack.  Keep in step with
 * slitter.protocol.ErrorCode (tests/test_layout.py checks). */
#define SLITTER_ERR_CLASS_MISMATCH   0
#define SLITTER_ERR_INTERIOR_POINTER 1
#define SLITTER_ERR_FOREIGN_ADDRESS  2
#define SLITTER_ERR_DOUBLE_FREE      3
#define SLITTER_ERR_CORRUPT          4   /* a magazine held a live object */
#define SLITTER_ERR_KINDS            5

/* slitter_release() results: >= 0 done (or retry after slow path), < 0 refused. */
#define SLITTER_OK           0
#define SLITTER_NEED_FLUSH   1   /* released; the release magazine is now full */
#define SLITTER_NEED_SLOW    2   /* nothing done: thread/class not bound or no room */
#define SLITTER_VIEW_GUARDS  (-100) /* slitter_object_size_key: protect new guard pages first */
#define SLITTER_VIEW_DETACHED (-101) /* slitter_object_size_key: closed, or forked and not re-attached */
#define SLITTER_E_CLASS_MISMATCH   (-1 - SLITTER_ERR_CLASS_MISMATCH)
#define SLITTER_E_INTERIOR_POINTER (-1 - SLITTER_ERR_INTERIOR_POINTER)
#define SLITTER_E_FOREIGN_ADDRESS  (-1 - SLITTER_ERR_FOREIGN_ADDRESS)
#define SLITTER_E_DOUBLE_FREE      (-1 - SLITTER_ERR_DOUBLE_FREE)

#define SLITTER_CLASS_ZERO_INIT 1u

/* Live-map states.  A byte says where its object is: in no magazine
 * (SLITTER_FREE: in the depot, or never handed out), in a user's hands
 * (SLITTER_LIVE), or cached in the magazines of rack r (SLITTER_TAG(r)).
 * Only the owner of a state moves an object out of it, so a flush can take
 * back only what its own rack caches. */
#define SLITTER_FREE 0
#define SLITTER_LIVE 1
#define SLITTER_TAG_BASE 2
#define SLITTER_TAG(rack) (SLITTER_TAG_BASE + (rack))
/* Tags of the shelf's slots: above every rack's (SLITTER_TAG(63) is 65). */
#define SLITTER_SHELF_TAG_BASE 128
#define SLITTER_SHELF_TAG(slot) (SLITTER_SHELF_TAG_BASE + (slot))
#define SLITTER_CLASS_POLICY_SHIFT 4   /* flags bits 4-5: 0 unset (raise), 1 raise, 2 log, 3 abort */
#define SLITTER_CLASS_POLICY_MASK  (3u << SLITTER_CLASS_POLICY_SHIFT)

/**
 * The layout header, at offset 0 of the meta segment.  Written once by the
 * daemon that creates the instance, except the fields after `nruns`, which
 * only the daemon updates, and clients only read.
 */
struct slitter_header {
    uint64_t magic;            /* SLITTER_LAYOUT_MAGIC */
    uint32_t version;          /* SLITTER_LAYOUT_VERSION */
    uint32_t header_size;      /* sizeof(struct slitter_header) */
    uint64_t arena_size;       /* bytes in the data segment */
    uint64_t nspans;           /* arena_size >> SLITTER_SPAN_SHIFT */
    uint64_t meta_size;        /* bytes in the meta segment */
    uint64_t span_table_off;   /* struct slitter_span[nspans] */
    uint64_t run_table_off;    /* struct slitter_run[nspans] */
    uint64_t class_table_off;  /* struct slitter_class[SLITTER_MAX_CLASSES] */
    uint64_t totals_off;       /* struct slitter_class_totals[SLITTER_MAX_CLASSES] */
    uint64_t tables_end;       /* end of the read-only part (page aligned) */
    uint64_t live_map_off;     /* one byte per object: SLITTER_FREE, SLITTER_LIVE or a cache tag */
    uint64_t live_map_bytes;
    uint64_t owners_off;       /* struct slitter_rack_owner[max_racks]: daemon only */
    uint64_t departed_off;     /* struct slitter_departed_log: daemon only */
    uint64_t rack_area_off;    /* struct slitter_rack, max_racks of them */
    uint64_t rack_size;        /* bytes per rack, page aligned */
    uint32_t max_racks;
    uint32_t max_classes;
    uint32_t max_threads;
    uint32_t mag_cap;
    /* Mutable, written by the daemon only. */
    uint64_t nruns;            /* runs carved so far (grows only) */
    uint64_t next_span;        /* first span not yet in a run */
    uint64_t objects_mapped;   /* live-map entries handed to runs so far */
    uint32_t nclasses;         /* highest class id in use */
    uint32_t daemon_pid;
    uint64_t generation;       /* daemon starts over these segments, 1 for the creator */
    /* Since version 3 (version 4 dropped the depot bitmap's two fields
     * before these). */
    uint64_t shelf_off;        /* struct slitter_shelf: every client maps it read-write */
    uint64_t shelf_bytes;
};

/**
 * One entry per span of the arena.  `class_id` 0 means no class owns the
 * span.  Once set, an entry never changes (type stability).
 */
struct slitter_span {
    uint32_t class_id;
    uint32_t run_first_span;   /* first span of the run this span belongs to */
    uint64_t obj_base;         /* live-map index of the run's first object */
};

/** One entry per run, in carving order; a run is followed by a guard page. */
struct slitter_run {
    uint32_t first_span;
    uint32_t nspans;
    uint32_t class_id;
    uint32_t nobjects;
    uint64_t obj_base;
    uint32_t carved;           /* objects handed out of the run so far (bump pointer) */
    uint32_t reserved;
};

/**
 * An allocation class.  Immutable once `id` is set, so the fast path reads
 * it without synchronisation.
 */
struct slitter_class {
    char name[SLITTER_CLASS_NAME_MAX];
    uint32_t id;               /* 0: slot unused */
    uint32_t flags;            /* SLITTER_CLASS_* */
    uint64_t size;             /* bytes the user may touch */
    uint64_t stride;           /* size rounded up to SLITTER_MIN_STRIDE */
    uint64_t div_magic;        /* UINT64_MAX / stride + 1: offset / stride by multiply */
    uint32_t objects_per_run;
    uint32_t spans_per_run;
    uint32_t mag_capacity;     /* handles per magazine for this class */
    uint32_t reserved;
    uint64_t cap;              /* most objects ever carved; 0: no cap (daemon-written) */
};

/**
 * What the daemon counts per class, kept in the segment so a restarted
 * daemon goes on from the same figures: the fast-path counters of clients
 * that left (`retired`), the audit's refusals, and the slow-path trips.
 */
struct slitter_class_totals {
    uint64_t retired_allocations;
    uint64_t retired_releases;
    uint64_t retired_errors[SLITTER_ERR_KINDS];
    uint64_t audit_errors[SLITTER_ERR_KINDS];
    uint64_t refills;
    uint64_t flushes;
};

/**
 * Who holds rack i: written by the daemon in its own region, which clients
 * never map, so a restarted daemon trusts it over anything a rack says of
 * itself.  `client_id` 0: the rack is free.
 */
struct slitter_rack_owner {
    uint32_t client_id;
    uint32_t pid;
    uint64_t token;
    uint64_t nonce;                       /* the attach's nonce: an `abandon` after a restart still finds it */
    char name[SLITTER_CLIENT_NAME_MAX];   /* the name the client attached with (stats) */
};

/**
 * Clients that left with objects still live (another process may own them
 * now), newest last: a ring of the last SLITTER_DEPARTED_MAX, kept in the
 * segment so the figures outlive the daemon.  Daemon only.
 */
struct slitter_departed {
    uint32_t pid;
    uint32_t reserved;
    char name[SLITTER_CLIENT_NAME_MAX];
    int64_t live[SLITTER_MAX_CLASSES];    /* by class id: allocations - releases of that client */
};

struct slitter_departed_log {
    uint64_t count;                        /* entries ever written; entry i is at i % SLITTER_DEPARTED_MAX */
    struct slitter_departed entries[SLITTER_DEPARTED_MAX];
};

/** Fast-path counters of one thread for one class.  Only that thread writes. */
struct slitter_counters {
    uint64_t allocations;
    uint64_t releases;
    uint64_t errors[SLITTER_ERR_KINDS];
};

/*
 * Set in `allocations` or `releases` while that operation is between its
 * live-byte changes and its count: the fast path sets it, changes the
 * bytes, then stores the new count, which clears it in the same store.  So
 * a client killed in between leaves it set, and the handles where the
 * daemon can find them, and the reclaim counts each one whose byte says it
 * happened (slitter_settle_counting).  Where the handles are:
 *
 * - allocate: popped first, so at alloc[alloc_count ..): `pending` of them
 *   for a batch, one for a single allocate;
 * - release: written to the slots they will be pushed into first, so at
 *   alloc[alloc_count ..) and release[release_count ..): for a batch,
 *   `pending & 0xFFFF` and `pending >> 16` of them; for a single release,
 *   the one slot of the two it chose.
 *
 * Readers mask it.
 */
#define SLITTER_COUNTING (1ULL << 63)
/* A thread_class's `pending`: how many of a batch's handles are in the allocation magazine's slots (low
 * half), and in the release magazine's (high half).  0: a single call, one handle. */
#define SLITTER_PENDING_SHIFT 16
#define SLITTER_PENDING(into_alloc, into_release) ((uint32_t)(into_alloc) | (uint32_t)(into_release) << SLITTER_PENDING_SHIFT)

/**
 * One thread's magazines for one class.
 *
 * Invariants: alloc_count <= capacity and release_count <= capacity; every
 * handle in `alloc[0..alloc_count)` and `release[0..release_count)` is an
 * object of this class whose live byte is this rack's tag (cached: not live, not in the
 * depot).  `capacity` is 0 until the thread binds the class (slow path), so
 * an unbound slot always sends the fast path to the slow path.  The daemon
 * writes `alloc` (refill) and drains `release` (flush) only while the owning
 * thread waits for its reply.
 *
 * `spare` is the prefetched next magazine: the daemon fills it while the
 * thread goes on, and publishes it last by storing `spare_count` (release);
 * the thread takes it only when `spare_count` (acquire) is non-zero, then
 * stores 0.  So each side writes `spare` only while the other cannot read it.
 * `outgoing` is the mirror image for flushes: the thread moves a full release
 * magazine there and publishes `outgoing_count`; the daemon audits it while
 * the thread goes on, and stores 0 when done.
 *
 * `releases_only` and `allocations_seen` are the thread's own: a thread that
 * allocates nothing of the class while a whole release magazine fills is a
 * consumer, whose releases skip the allocation magazine (capacity masked by
 * `releases_only`) and which hands back what that magazine held
 * (slitter__hand_back_unused).  Only the thread reads or writes them.
 */
struct slitter_thread_class {
    uint32_t alloc_count;
    uint32_t release_count;
    uint32_t capacity;
    uint32_t spare_count;
    uint32_t outgoing_count;
    uint32_t pending;          /* while a batch's counting bit is set, where its handles are; else 0 (SLITTER_COUNTING) */
    uint32_t releases_only;    /* all ones while the thread releases the class and allocates none of it (a consumer) */
    uint32_t reserved0;
    struct slitter_counters counters;
    uint64_t allocations_seen; /* counters.allocations when the release magazine last went out */
    uint64_t alloc[SLITTER_MAG_CAP];
    uint64_t release[SLITTER_MAG_CAP];
    uint64_t spare[SLITTER_MAG_CAP];
    uint64_t outgoing[SLITTER_MAG_CAP];
};

/** One thread of a client.  `classes_touched` bit i: classes[i] was bound. */
struct slitter_thread_slot {
    uint64_t classes_touched;
    uint32_t owner_tid;        /* 0: free; a dying thread frees its slot */
    uint32_t reserved[13];
    struct slitter_thread_class classes[SLITTER_MAX_CLASSES];
};

/**
 * A client's rack: its per-thread magazines and counters, in shared memory
 * so the daemon can sum them for stats and reclaim them when the client
 * goes away.  `threads_claimed` bit i: threads[i] is owned by a live thread;
 * `threads_touched` bit i: threads[i] may hold magazines (never cleared by
 * the client, so the daemon reads only slots that were used).
 */
struct slitter_rack {
    uint64_t threads_claimed;
    uint64_t threads_touched;
    uint32_t pid;              /* informational: the owner table is the truth */
    uint32_t client_id;
    uint32_t reserved[10];
    struct slitter_thread_slot threads[SLITTER_MAX_THREADS];
};

/*
 * The shelf: full magazines passed between clients without the daemon.
 *
 * A thread whose release magazine is full puts it on an empty slot; a
 * thread of any client whose allocation magazine is empty takes a full slot
 * of its class.  A stream from one process to another thus never sends a
 * refill or a flush.  The daemon is not on that path: it counts what is on
 * the shelf, takes back a slot's objects when the client holding the slot dies,
 * and takes back the full slots of a class nobody has taken from for a
 * while (slitterd's shelf_idle option; slitter_shelf_drain), so that they
 * do not fill the shelf.
 *
 * Slot i has its own live-map tag, SLITTER_SHELF_TAG(i).  The rule of the
 * racks holds: only the holder of slot i (the client that marked it BUSY)
 * moves objects into or out of that tag, so a putter re-checks every handle
 * against its own rack's tag and a taker against the slot's, and a handle
 * written into a slot by anyone else is refused, never handed out.
 *
 * `state` is the only word written by compare-and-swap:
 *   EMPTY                 nobody's: a putter may claim it
 *   FULL | class_id << 8  handles[0..count) are objects of that class, all
 *                         tagged SLITTER_SHELF_TAG(i): a taker may claim it
 *   BUSY | rack << 8      rack is filling or emptying it; if that client
 *                         dies, the daemon takes back the slot's tag
 *   BUSY | 255 << 8       the daemon holds it while it scans the live map
 *                         for the slot's tag (SLITTER_SHELF_DAEMON)
 * The daemon, too, scans for a slot's tag only while it or a dead client
 * holds the slot: a live client could otherwise claim it mid-scan.
 */
#define SLITTER_SHELF_SLOTS     32     /* tags 128..159 */
#define SLITTER_SHELF_PER_CLASS 4      /* full slots of one class at most: the rest goes to the daemon */
#define SLITTER_SHELF_EMPTY     0u
#define SLITTER_SHELF_FULL      1u
#define SLITTER_SHELF_BUSY      2u
#define SLITTER_SHELF_KIND_MASK 0xffu  /* a state is kind | who << SLITTER_SHELF_WHO_SHIFT */
#define SLITTER_SHELF_WHO_SHIFT 8
#define SLITTER_SHELF_STATE(kind, who) ((uint32_t)(kind) | ((uint32_t)(who) << SLITTER_SHELF_WHO_SHIFT))
#define SLITTER_SHELF_KIND(state) ((state) & SLITTER_SHELF_KIND_MASK)
#define SLITTER_SHELF_WHO(state) ((state) >> SLITTER_SHELF_WHO_SHIFT)
#define SLITTER_SHELF_DAEMON    255    /* BUSY | 255 << 8: the daemon holds the slot (no rack has that index) */

struct slitter_shelf_slot {
    uint32_t state;
    uint32_t count;            /* handles in the slot; written by its holder */
    uint32_t reserved[14];     /* the state word alone on its cache line */
    uint64_t handles[SLITTER_MAG_CAP];
};

struct slitter_shelf {
    uint64_t puts[SLITTER_MAX_CLASSES];    /* magazines put on the shelf, by class (clients count: figures only) */
    uint64_t takes[SLITTER_MAX_CLASSES];   /* magazines (or parts of one) taken off it */
    struct slitter_shelf_slot slots[SLITTER_SHELF_SLOTS];
};

#endif /* SLITTER_LAYOUT_H */
