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

int64_t slitter_bench_malloc_pairs(size_t size, uint64_t n)
{
    int64_t start = slitter__now_ns();
    for (uint64_t i = 0; i < n; i++) {
        void *volatile p = malloc(size);
        free(p);
    }
    return slitter__now_ns() - start;
}
