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
    int r = nbd_block_status(h, length, offset, cb, LIBNBD_CMD_FLAG_REQ_ONE);
    *count = x.count;
    return r;
}

/* One read or write of `count` bytes split into requests of at most `piece` bytes, all sent before the first
 * reply is awaited (libnbd's aio calls), so the server works on several at once over the one connection.
 * Returns 0, or -1 with libnbd's error set (after every request sent has retired, so `buf` is no longer used). */
static inline int instar_nbd_rw_pipelined(struct nbd_handle *h, void *buf, size_t count, uint64_t offset,
                                          size_t piece, int is_write) {
    enum { MAX_IN_FLIGHT = 64 };
    int64_t cookies[MAX_IN_FLIGHT];
    size_t done = 0;
    int failed = 0;
    if (piece == 0) piece = count;
    while (done < count && !failed) {
        int n = 0;
        while (done < count && n < MAX_IN_FLIGHT) {
            size_t len = count - done < piece ? count - done : piece;
            nbd_completion_callback none = { NULL, NULL, NULL };
            int64_t c = is_write
                ? nbd_aio_pwrite(h, (const char *)buf + done, len, offset + done, none, 0)
                : nbd_aio_pread(h, (char *)buf + done, len, offset + done, none, 0);
            if (c == -1) { failed = 1; break; }
            cookies[n++] = c;
            done += len;
        }
        for (int i = 0; i < n; i++) {
            int r;
            while ((r = nbd_aio_command_completed(h, cookies[i])) == 0) {
                if (nbd_poll(h, -1) == -1) { failed = 1; break; }
            }
            if (r == -1) failed = 1;
            /* a dead connection retires nothing more: stop waiting (libnbd no longer touches the buffer) */
            if (failed && nbd_aio_is_dead(h)) return -1;
        }
    }
    return failed ? -1 : 0;
}

/* nbd_set_tls_hostname (newer libnbd than 1.14): the name a server's certificate is checked against when libnbd did not
 * make the TCP connection itself. Looked up at run time, since older libnbd (Debian 12 has 1.14) lacks it: returns
 * 0 when set, -1 with libnbd's error when the call failed, and -2 when this libnbd has no such call. */
#include <dlfcn.h>
static inline int instar_nbd_set_tls_hostname(struct nbd_handle *h, const char *hostname) {
    void *lib = dlopen("libnbd.so.0", RTLD_NOW | RTLD_NOLOAD);
    if (!lib) return -2;
    int (*fn)(struct nbd_handle *, const char *) =
        (int (*)(struct nbd_handle *, const char *))dlsym(lib, "nbd_set_tls_hostname");
    dlclose(lib);
    if (!fn) return -2;
    return fn(h, hostname);
}

/* Whether the loaded libnbd has nbd_set_tls_hostname (call after libnbd is loaded, e.g. after nbd_create). */
static inline int instar_nbd_has_tls_hostname(void) {
    void *lib = dlopen("libnbd.so.0", RTLD_NOW | RTLD_NOLOAD);
    if (!lib) return 0;
    int found = dlsym(lib, "nbd_set_tls_hostname") != NULL;
    dlclose(lib);
    return found;
}

/* Sources/CInstar/nbd_tls.c: after libnbd refused a server's x509 certificate, the reason in qemu's words, learnt
 * over `fd` (a new connection to the server, closed by the call). 0 with the reason in `reason`, or -1. */
int instar_nbd_tls_diagnose(int fd, const char *cadir, const char *hostname, char *reason, size_t len);
