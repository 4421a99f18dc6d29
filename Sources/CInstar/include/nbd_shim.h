#include <libnbd.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <poll.h>

/* One request of the NBD backend's connection threads (NbdBackend.swift): what to send, and, filled in by libnbd's
 * callbacks on the connection's thread, whether it is done and its errno. For block status the first extent of
 * `context` is kept as (length, flags). */
enum { INSTAR_NBD_READ, INSTAR_NBD_WRITE, INSTAR_NBD_ZERO, INSTAR_NBD_TRIM, INSTAR_NBD_FLUSH, INSTAR_NBD_STATUS };

struct instar_nbd_req {
    int kind;
    void *buf;
    uint64_t len;
    uint64_t offset;
    uint32_t flags;
    const char *context;
    uint64_t extent_len;
    uint64_t extent_flags;
    int extent_count;
    int done;
    int error;
};

static int instar_nbd_req_done(void *user_data, int *error) {
    struct instar_nbd_req *r = (struct instar_nbd_req *)user_data;
    r->error = *error;
    __atomic_store_n(&r->done, 1, __ATOMIC_RELEASE);
    return 1; /* retire the command: nothing asks libnbd about it later */
}

static int instar_nbd_req_extent(void *user_data, const char *metacontext, uint64_t offset, uint32_t *entries,
                                 size_t nr_entries, int *error) {
    (void)offset;
    (void)error;
    struct instar_nbd_req *r = (struct instar_nbd_req *)user_data;
    if (r->context == NULL || strcmp(metacontext, r->context) != 0) return 0;
    if (r->extent_count == 0 && nr_entries >= 2) {
        r->extent_len = entries[0];
        r->extent_flags = entries[1];
        r->extent_count = 1;
    }
    return 0;
}

static inline int instar_nbd_req_is_done(const struct instar_nbd_req *r) {
    return __atomic_load_n(&r->done, __ATOMIC_ACQUIRE);
}

/* Sends `r` without waiting (libnbd's aio calls); the completion callback marks it done. -1 with libnbd's error
 * set when it could not be queued (no callback is then called). */
static inline int64_t instar_nbd_submit(struct nbd_handle *h, struct instar_nbd_req *r) {
    nbd_completion_callback done = { instar_nbd_req_done, r, NULL };
    switch (r->kind) {
    case INSTAR_NBD_READ: return nbd_aio_pread(h, r->buf, r->len, r->offset, done, 0);
    case INSTAR_NBD_WRITE: return nbd_aio_pwrite(h, r->buf, r->len, r->offset, done, 0);
    case INSTAR_NBD_ZERO: return nbd_aio_zero(h, r->len, r->offset, done, r->flags);
    case INSTAR_NBD_TRIM: return nbd_aio_trim(h, r->len, r->offset, done, 0);
    case INSTAR_NBD_FLUSH: return nbd_aio_flush(h, done, 0);
    default: {
        nbd_extent_callback ext = { instar_nbd_req_extent, r, NULL };
        return nbd_aio_block_status(h, r->len, r->offset, ext, done, LIBNBD_CMD_FLAG_REQ_ONE);
    }
    }
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
