/*
 * Loops for bench/: the fast path called from C, next to glibc malloc, so
 * both are timed by the same clock in the same process.  Not used by the
 * allocator itself.
 */
#include <stdlib.h>
#include <time.h>

#include "slitter_fast.h"

static int64_t slitter__now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

void slitter_noop(void)
{
}

int64_t slitter_bench_pairs(struct slitter_client *c, uint32_t class_id, uint64_t n)
{
    int64_t start = slitter__now_ns();
    for (uint64_t i = 0; i < n; i++) {
        uint64_t handle = slitter_allocate(c, class_id);
        if (handle == 0 || slitter_release(c, class_id, handle) != SLITTER_OK)
            return -1;
    }
    return slitter__now_ns() - start;
}

int64_t slitter_bench_live_byte_pairs(uint64_t n)
{
    /* The live-map traffic of one pair and nothing else: release's lock
     * cmpxchg LIVE -> tag, then allocate's plain store back to LIVE. */
    static uint8_t live = SLITTER_LIVE;
    int64_t start = slitter__now_ns();
    for (uint64_t i = 0; i < n; i++) {
        uint8_t expected = SLITTER_LIVE;
        if (!__atomic_compare_exchange_n(&live, &expected, SLITTER_TAG(0), 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            return -1;
        __atomic_store_n(&live, SLITTER_LIVE, __ATOMIC_RELEASE);
    }
    return slitter__now_ns() - start;
}

int64_t slitter_bench_malloc_pairs(size_t size, uint64_t n)
{
    int64_t start = slitter__now_ns();
    for (uint64_t i = 0; i < n; i++) {
        void *volatile p = malloc(size);
        free(p);
    }
    return slitter__now_ns() - start;
}
