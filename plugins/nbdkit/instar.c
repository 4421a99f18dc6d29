/*
 * nbdkit-instar-plugin: serves any image libinstar reads (raw, qcow2 chains, vmdk, vhdx, vpc, ...) over NBD.
 *
 *   nbdkit instar IMAGE [format=FMT] [readonly=true] [backing=false] [password=SECRET]
 *
 * A thin layer over the public C API (include/instar.h): nbdkit speaks the protocol, libinstar reads and writes
 * the image. Every connection shares one handle, opened when the first connection arrives and closed when the
 * last one goes (so a client's writes are on disk, caches written back, once it disconnects). The library
 * serialises calls on a handle, so requests may arrive from parallel threads; and since every connection sees
 * the same handle and its caches, a flush on one covers the writes of all: multi-conn is safe.
 * See docs/nbdkit.md.
 */
#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <instar.h>

static char *filename;         /* the image: a path (made absolute) or any name instar_open takes */
static char *format;           /* format=, NULL to probe */
static char *password;         /* password=, the key of an encrypted image */
static int readonly_param;     /* readonly=true: never open for writing */
static int backing = 1;        /* backing=false: INSTAR_OPEN_NO_BACKING */

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static instar_image_t *image;  /* shared by every connection, guarded by `lock` for open/close only */
static int image_writable;
static unsigned connections;

/* Reports a failed call to nbdkit: the library's message and an errno for the NBD reply. */
static void report(const char *what, int rc, const instar_error_t *err) {
    int e;
    switch (rc) {
    case INSTAR_E_INVALID: e = EINVAL; break;
    case INSTAR_E_NOT_FOUND: e = ENOENT; break;
    case INSTAR_E_UNSUPPORTED: e = ENOTSUP; break;
    case INSTAR_E_NOMEM: e = ENOMEM; break;
    case INSTAR_E_PERMISSION: e = EPERM; break;
    case INSTAR_E_RANGE: e = EINVAL; break;
    case INSTAR_E_LOCKED: e = EAGAIN; break;
    default: e = err->errno_value > 0 ? err->errno_value : EIO; break;
    }
    if (rc == INSTAR_E_IO && err->errno_value == ENOSPC) e = ENOSPC;
    nbdkit_error("%s: %s", what, err->message[0] ? err->message : instar_strerror(rc));
    nbdkit_set_error(e);
}

static void instar_unload(void) {
    instar_close(image);
    image = NULL;
    free(filename);
    free(format);
    free(password);
}

static void instar_dump_plugin(void) { printf("instar_version=%s\n", instar_version()); }

static int instar_config(const char *key, const char *value) {
    if (strcmp(key, "file") == 0) {
        char *abs;
        free(filename);
        /* nbdkit changes to / when it forks into the background: make an existing path absolute; other names
         * (json:, nbd://, rbd:) go to the library as they are. */
        abs = access(value, F_OK) == 0 ? realpath(value, NULL) : NULL;
        filename = abs ? abs : strdup(value);
        if (!filename) {
            nbdkit_error("strdup: %m");
            return -1;
        }
    } else if (strcmp(key, "format") == 0) {
        free(format);
        format = strdup(value);
        if (!format) {
            nbdkit_error("strdup: %m");
            return -1;
        }
    } else if (strcmp(key, "readonly") == 0) {
        int r = nbdkit_parse_bool(value);
        if (r == -1) return -1;
        readonly_param = r;
    } else if (strcmp(key, "backing") == 0) {
        int r = nbdkit_parse_bool(value);
        if (r == -1) return -1;
        backing = r;
    } else if (strcmp(key, "password") == 0) {
        free(password);
        password = NULL;
        if (nbdkit_read_password(value, &password) == -1) return -1;
    } else {
        nbdkit_error("unknown parameter '%s'", key);
        return -1;
    }
    return 0;
}

static int instar_config_complete(void) {
    if (!filename) {
        nbdkit_error("you must supply the file=<IMAGE> parameter after the plugin name on the command line");
        return -1;
    }
    return 0;
}

#define instar_config_help                                                                                     \
    "[file=]<IMAGE>      (required) The image: any format and name instar reads.\n"                            \
    "format=<FORMAT>     The image format (raw, qcow2, vmdk, ...); probed when omitted.\n"                     \
    "readonly=true       Open the image read-only (no write locks), whatever the clients ask.\n"               \
    "backing=false       Do not open the backing chain (unallocated ranges read as zeroes).\n"                 \
    "password=<SECRET>   The passphrase of an encrypted image (- to prompt, +FILE, -FD)."

static int open_image(int writable, instar_image_t **out, instar_error_t *err) {
    instar_open_options_t oo;
    instar_open_options_init(&oo);
    oo.format = format;
    oo.key_secret = password;
    if (writable) oo.flags |= INSTAR_OPEN_READ_WRITE;
    if (!backing) oo.flags |= INSTAR_OPEN_NO_BACKING;
    return instar_open(filename, &oo, out, err);
}

/* Before serving: the image opens (read-only, sharing locks), so a bad name fails at start-up, not at the
 * first connection. */
static int instar_get_ready(void) {
    instar_error_t err;
    instar_image_t *probe = NULL;
    instar_open_options_t oo;
    int rc;
    instar_open_options_init(&oo);
    oo.format = format;
    oo.key_secret = password;
    oo.flags = INSTAR_OPEN_FORCE_SHARE | (backing ? 0 : INSTAR_OPEN_NO_BACKING);
    rc = instar_open(filename, &oo, &probe, &err);
    if (rc != INSTAR_OK) {
        report("instar_open", rc, &err);
        return -1;
    }
    instar_close(probe);
    return 0;
}

static void *instar_open_connection(int readonly) {
    instar_error_t err;
    int rc = INSTAR_OK;
    pthread_mutex_lock(&lock);
    if (!image) {
        /* nbdkit -r makes every connection read-only; a format the library cannot write (dmg, ...) or a file
         * without write permission is served read-only. */
        int want_write = !readonly && !readonly_param;
        rc = open_image(want_write, &image, &err);
        image_writable = want_write && rc == INSTAR_OK;
        if (want_write && rc == INSTAR_E_PERMISSION) {
            nbdkit_debug("instar: %s, serving read-only", err.message);
            rc = open_image(0, &image, &err);
        }
    }
    if (rc == INSTAR_OK) connections++;
    pthread_mutex_unlock(&lock);
    if (rc != INSTAR_OK) {
        report("instar_open", rc, &err);
        return NULL;
    }
    return &image;
}

static void instar_close_connection(void *handle) {
    (void)handle;
    pthread_mutex_lock(&lock);
    if (connections > 0 && --connections == 0) {
        instar_error_t err;
        int rc = instar_flush(image, &err);
        if (rc != INSTAR_OK) report("instar_flush", rc, &err);
        instar_close(image);
        image = NULL;
    }
    pthread_mutex_unlock(&lock);
}

static int64_t instar_get_size_cb(void *handle) {
    instar_error_t err;
    uint64_t size = 0;
    int rc;
    (void)handle;
    rc = instar_get_size(image, &size, &err);
    if (rc != INSTAR_OK) {
        report("instar_get_size", rc, &err);
        return -1;
    }
    if (size > INT64_MAX) {
        nbdkit_error("the image is too large for NBD");
        nbdkit_set_error(EFBIG);
        return -1;
    }
    return (int64_t)size;
}

static int instar_can_write(void *handle) {
    (void)handle;
    return image_writable;
}

static int instar_can_flush(void *handle) {
    (void)handle;
    return 1;
}

static int instar_can_multi_conn(void *handle) {
    (void)handle;
    return 1;  /* one handle for every connection: a flush anywhere covers every write */
}

static int instar_can_extents(void *handle) {
    (void)handle;
    return 1;
}

static int instar_can_fua(void *handle) {
    (void)handle;
    return NBDKIT_FUA_EMULATE;  /* nbdkit flushes after a FUA write */
}

static int instar_pread(void *handle, void *buf, uint32_t count, uint64_t offset, uint32_t flags) {
    instar_error_t err;
    int rc;
    (void)handle;
    (void)flags;
    rc = instar_read(image, buf, count, offset, &err);
    if (rc != INSTAR_OK) {
        report("instar_read", rc, &err);
        return -1;
    }
    return 0;
}

static int instar_pwrite(void *handle, const void *buf, uint32_t count, uint64_t offset, uint32_t flags) {
    instar_error_t err;
    int rc;
    (void)handle;
    (void)flags;
    rc = instar_write(image, buf, count, offset, &err);
    if (rc != INSTAR_OK) {
        report("instar_write", rc, &err);
        return -1;
    }
    return 0;
}

static int instar_zero(void *handle, uint32_t count, uint64_t offset, uint32_t flags) {
    instar_error_t err;
    int rc;
    (void)handle;
    rc = instar_write_zeroes(image, count, offset, (flags & NBDKIT_FLAG_MAY_TRIM) ? INSTAR_ZERO_MAY_UNMAP : 0, &err);
    if (rc == INSTAR_E_UNSUPPORTED) {
        nbdkit_set_error(ENOTSUP);  /* nbdkit writes zeroes itself then */
        return -1;
    }
    if (rc != INSTAR_OK) {
        report("instar_write_zeroes", rc, &err);
        return -1;
    }
    return 0;
}

static int instar_trim(void *handle, uint32_t count, uint64_t offset, uint32_t flags) {
    instar_error_t err;
    int rc;
    (void)handle;
    (void)flags;
    rc = instar_discard(image, count, offset, &err);
    if (rc != INSTAR_OK) {
        report("instar_discard", rc, &err);
        return -1;
    }
    return 0;
}

static int instar_flush_cb(void *handle, uint32_t flags) {
    instar_error_t err;
    int rc;
    (void)handle;
    (void)flags;
    rc = instar_flush(image, &err);
    if (rc != INSTAR_OK) {
        report("instar_flush", rc, &err);
        return -1;
    }
    return 0;
}

#define MAX_EXTENTS_PER_REPLY 65536

/* base:allocation from the chain's block status, as qemu-nbd reports it: no data is a hole, zero is zero. */
static int instar_extents(void *handle, uint32_t count, uint64_t offset, uint32_t flags,
                          struct nbdkit_extents *extents) {
    uint64_t end = offset + count;
    unsigned n;
    (void)handle;
    /* nbdkit merges neighbours of one type; a reply may cover less than asked, so a fragmented image answers
     * in bounded steps and the client asks again from where it ends. */
    for (n = 0; offset < end && n < MAX_EXTENTS_PER_REPLY; n++) {
        instar_error_t err;
        instar_block_status_t st = INSTAR_BLOCK_STATUS_INIT;
        uint32_t type = 0;
        int rc = instar_block_status(image, offset, end - offset, &st, &err);
        if (rc != INSTAR_OK) {
            report("instar_block_status", rc, &err);
            return -1;
        }
        if (!(st.flags & INSTAR_STATUS_DATA)) type |= NBDKIT_EXTENT_HOLE;
        if (st.flags & INSTAR_STATUS_ZERO) type |= NBDKIT_EXTENT_ZERO;
        if (nbdkit_add_extent(extents, offset, st.length, type) == -1) return -1;
        offset += st.length;
        if (flags & NBDKIT_FLAG_REQ_ONE) break;
    }
    return 0;
}

static struct nbdkit_plugin plugin = {
    .name = "instar",
    .longname = "nbdkit instar plugin (disk images through libinstar)",
    .unload = instar_unload,
    .dump_plugin = instar_dump_plugin,
    .config = instar_config,
    .config_complete = instar_config_complete,
    .config_help = instar_config_help,
    .magic_config_key = "file",
    .get_ready = instar_get_ready,
    .open = instar_open_connection,
    .close = instar_close_connection,
    .get_size = instar_get_size_cb,
    .can_write = instar_can_write,
    .can_flush = instar_can_flush,
    .can_multi_conn = instar_can_multi_conn,
    .can_extents = instar_can_extents,
    .can_fua = instar_can_fua,
    .pread = instar_pread,
    .pwrite = instar_pwrite,
    .zero = instar_zero,
    .trim = instar_trim,
    .flush = instar_flush_cb,
    .extents = instar_extents,
    .errno_is_preserved = 0,
};

/* The library serialises the calls on a handle (include/instar.h), so parallel requests are safe. */
#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

NBDKIT_REGISTER_PLUGIN(plugin)
