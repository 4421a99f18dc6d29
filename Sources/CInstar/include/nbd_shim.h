#include <libnbd.h>
#include <stdint.h>
#include <string.h>

/* libnbd's block status hands extents to a C callback; Swift gets them as an array instead. The extents of
 * `context` (e.g. "base:allocation") starting at the request's offset are copied as (length, flags) pairs into
 * `out` (at most `max` pairs); `*count` is how many were stored. Extents of other contexts are ignored. */
struct instar_nbd_extents {
    const char *context;
    uint64_t *out;
    size_t max;
    size_t count;
};

static int instar_nbd_extent_cb(void *user_data, const char *metacontext, uint64_t offset, uint32_t *entries,
                                size_t nr_entries, int *error) {
    (void)offset;
    (void)error;
    struct instar_nbd_extents *x = (struct instar_nbd_extents *)user_data;
    if (strcmp(metacontext, x->context) != 0) return 0;
    for (size_t i = 0; i + 1 < nr_entries && x->count < x->max; i += 2) {
        x->out[2 * x->count] = entries[i];
        x->out[2 * x->count + 1] = entries[i + 1];
        x->count++;
    }
    return 0;
}

static inline int instar_nbd_block_status(struct nbd_handle *h, uint64_t length, uint64_t offset,
                                          const char *context, uint64_t *out, size_t max, size_t *count) {
    struct instar_nbd_extents x = { context, out, max, 0 };
    nbd_extent_callback cb = { instar_nbd_extent_cb, &x, NULL };
    int r = nbd_block_status(h, length, offset, cb, 0);
    *count = x.count;
    return r;
}
