/*
 * stress.c - the concurrency driver of the C API (issue 14). THREADS threads run ITERS iterations each of mixed
 * calls at once:
 *  - on handles of their own: open/size/read/block_status/close, info (json and struct), map, check, measure,
 *    compare, convert (with -c and -W for some: the engine's own worker threads; then compare of the output
 *    with its source), create + write + resize + read back + check, snapshot list, bench (reads and writes of raw
 *    files, which the engine serves from several threads), on the images of DIR (qcow2 with a backing chain,
 *    compressed qcow2, vmdk, vhdx, luks, qed, vdi, vpc, parallels); and a chain of their own written through create, write, snapshot
 *    create/list/delete, bitmap add, commit, rebase, amend, dd and inspect; info and map in isolated mode (the
 *    helper processes spawned from several threads at once; $INSTAR_HELPER names the helper);
 *  - on ONE shared read-only handle (top.qcow2): reads, block status and size of the same open image;
 *  - on ONE shared writable handle (shared-rw.qcow2; instar.h: "Calls on one instar_image_t are serialised by the
 *    library, so threads may share a handle"): each thread writes its own chunks and reads them back;
 *  - error paths: a missing image, a hostile image, a LUKS image without its passphrase, a memory limit below
 *    what the image's L1 table needs (limit.qcow2: 1 TiB of 4 KiB clusters, a 4 MiB table), and a convert
 *    cancelled through its progress callback by another thread (the canceller).
 * Every result is checked: reads against the guest bytes qemu-img wrote (DIR/NAME.raw, made by qemu-img convert),
 * texts and structs against what the same call returned single-threaded before the threads started, errors
 * against the same error single-threaded. The outputs left in DIR/out are checked by the pytest afterwards
 * (qemu-img compare / check / qemu-io read -P). Prints "FAIL ..." per failure and a last line
 * "ok: THREADS threads, ITERS iterations, CALLS calls, FAILS failed"; exits 1 on any failure.
 * Usage: stress DIR THREADS ITERS       (stress --race-canary: races on purpose, see tsan.sh)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "instar.h"

#define SECRET "stress-secret"
#define MAX_THREADS 64
#define SHARED_CHUNK 65536u    /* one chunk of shared-rw.qcow2 per (thread, slot) */
#define SHARED_SLOTS 4u
#define WAIT_SECONDS 120       /* deadline of every cross-thread wait */

static const char *dir;
static int nthreads, niters;
static long calls, fails;      /* atomics */

static void count(void) { __atomic_add_fetch(&calls, 1, __ATOMIC_RELAXED); }

static void fail(int tid, const char *fmt, ...) {
    char line[1400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    printf("FAIL thread %d: %s\n", tid, line);
    fflush(stdout);
    __atomic_add_fetch(&fails, 1, __ATOMIC_RELAXED);
}

static char *path_of(const char *name) {
    char *p = NULL;
    if (asprintf(&p, "%s/%s", dir, name) < 0) abort();
    return p;
}

static unsigned char *slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) { fprintf(stderr, "stress: cannot open %s: %s\n", path, strerror(errno)); exit(2); }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *buf = malloc(n > 0 ? (size_t)n : 1);
    if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n) { fprintf(stderr, "stress: cannot read %s\n", path); exit(2); }
    fclose(f);
    *len = (size_t)n;
    return buf;
}

/* xorshift: each thread its own sequence */
static uint64_t next_rand(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
    return *s = x;
}

static int deadline_passed(const struct timespec *start) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return now.tv_sec - start->tv_sec > WAIT_SECONDS;
}

static void pause_briefly(void) {
    struct timespec ts = { 0, 1000000 };
    nanosleep(&ts, NULL);
}

/* ---- the images and what single-threaded calls returned for them ---------------------------------------------- */

typedef struct image {
    const char *name, *format, *key, *convert_to;  /* convert_to: the target format of the convert step */
    char *path;
    unsigned char *guest;          /* DIR/NAME.raw: what qemu-img reads from it */
    size_t size;
    char *info_json;               /* baselines */
    char *check_json;
    int check_rc;
    instar_map_t *map;
    instar_measure_result_t measure;
} image_t;

static image_t images[] = {
    { .name = "top.qcow2", .format = "qcow2", .key = NULL, .convert_to = "raw" },
    { .name = "comp.qcow2", .format = "qcow2", .key = NULL, .convert_to = "qcow2" },
    { .name = "d.vmdk", .format = "vmdk", .key = NULL, .convert_to = "qcow2" },
    { .name = "d.vhdx", .format = "vhdx", .key = NULL, .convert_to = "raw" },
    { .name = "d.luks", .format = "luks", .key = SECRET, .convert_to = "raw" },
    { .name = "d.qed", .format = "qed", .key = NULL, .convert_to = "raw" },
    { .name = "d.vdi", .format = "vdi", .key = NULL, .convert_to = "qcow2" },
    { .name = "d.vpc", .format = "vpc", .key = NULL, .convert_to = "raw" },
    { .name = "d.parallels", .format = "parallels", .key = NULL, .convert_to = "raw" },
};
#define NIMAGES (sizeof images / sizeof images[0])

static char *snap_path;
static instar_snapshot_list_t *snap_baseline;
static char *missing_path, *hostile_path, *limit_path, *cancel_src;
static instar_error_t missing_err, hostile_err, nokey_err, limit_err;
static int missing_rc, hostile_rc, nokey_rc, limit_rc;
static instar_image_t *shared_ro, *shared_rw;
static image_t *shared_ro_image;

static char *info_json_of(image_t *im, int tid, instar_error_t *err, int *rc) {
    instar_info_options_t o;
    instar_info_options_init(&o);
    o.format = im->format;
    o.backing_chain = 1;
    o.key_secret = im->key;
    char *json = NULL;
    *rc = instar_info_json(im->path, &o, &json, err);
    count();
    (void)tid;
    return json;
}

static char *check_json_of(image_t *im, instar_error_t *err, int *rc) {
    instar_check_options_t o;
    instar_check_options_init(&o);
    o.format = im->format;
    o.key_secret = im->key;
    char *json = NULL;
    *rc = instar_check_json(im->path, &o, &json, err);
    count();
    return json;
}

static instar_map_t *map_of(image_t *im, instar_error_t *err, int *rc) {
    instar_map_options_t o;
    instar_map_options_init(&o);
    o.format = im->format;
    o.key_secret = im->key;
    instar_map_t *m = NULL;
    *rc = instar_map(im->path, &o, &m, err);
    count();
    return m;
}

static int measure_of(image_t *im, instar_measure_result_t *r, instar_error_t *err) {
    instar_measure_options_t o;
    instar_measure_options_init(&o);
    o.source_format = im->format;
    o.output_format = "qcow2";
    o.key_secret = im->key;
    memset(r, 0, sizeof *r);
    r->struct_size = sizeof *r;
    count();
    return instar_measure(im->path, &o, r, err);
}

/* Two info texts alike but for "actual-size" (st_blocks: the filesystem may change it after the writes that made
 * the file, ext4's delayed allocation, without the file changing). */
static int same_info(const char *a, const char *b) {
    for (;;) {
        const char *na = strstr(a, "\"actual-size\""), *nb = strstr(b, "\"actual-size\"");
        if (!na || !nb) return !na && !nb && strcmp(a, b) == 0;
        if (na - a != nb - b || strncmp(a, b, (size_t)(na - a))) return 0;
        a = strchr(na, '\n');
        b = strchr(nb, '\n');
        if (!a || !b) return 0;
    }
}

static int same_map(const instar_map_t *a, const instar_map_t *b) {
    if (a->count != b->count) return 0;
    for (uint64_t i = 0; i < a->count; i++) {
        const instar_map_entry_t *x = &a->entries[i], *y = &b->entries[i];
        if (x->start != y->start || x->length != y->length || x->depth != y->depth || x->present != y->present ||
            x->zero != y->zero || x->data != y->data || x->has_offset != y->has_offset ||
            (x->has_offset && x->offset != y->offset))
            return 0;
        if ((x->filename == NULL) != (y->filename == NULL) || (x->filename && strcmp(x->filename, y->filename)))
            return 0;
    }
    return 1;
}

static int same_error(int rc, const instar_error_t *e, int want_rc, const instar_error_t *want) {
    return rc == want_rc && e->code == want->code && strcmp(e->message, want->message) == 0;
}

static int open_image(const char *path, const char *format, const char *key, uint32_t flags, instar_image_t **out,
                      instar_error_t *err) {
    instar_open_options_t o;
    instar_open_options_init(&o);
    o.format = format;
    o.key_secret = key;
    o.flags = flags;
    count();
    return instar_open(path, &o, out, err);
}

static void baselines(void) {
    instar_error_t err;
    int rc;
    for (size_t i = 0; i < NIMAGES; i++) {
        image_t *im = &images[i];
        im->path = path_of(im->name);
        char *raw = NULL;
        if (asprintf(&raw, "%s/%s.raw", dir, im->name) < 0) abort();
        im->guest = slurp(raw, &im->size);
        free(raw);
        im->info_json = info_json_of(im, -1, &err, &rc);
        if (rc) { fprintf(stderr, "stress: baseline info of %s: %s\n", im->name, err.message); exit(2); }
        im->check_json = check_json_of(im, &err, &im->check_rc);
        im->map = map_of(im, &err, &rc);
        if (rc) { fprintf(stderr, "stress: baseline map of %s: %s\n", im->name, err.message); exit(2); }
        if (measure_of(im, &im->measure, &err)) {
            fprintf(stderr, "stress: baseline measure of %s: %s\n", im->name, err.message); exit(2);
        }
    }
    shared_ro_image = &images[0];
    snap_path = path_of("snap.qcow2");
    instar_snapshot_options_t so;
    instar_snapshot_options_init(&so);
    if (instar_snapshot_list(snap_path, &so, &snap_baseline, &err) || snap_baseline->count == 0) {
        fprintf(stderr, "stress: baseline snapshot list: %s\n", err.message); exit(2);
    }
    instar_image_t *img = NULL;
    missing_path = path_of("missing.qcow2");
    missing_rc = open_image(missing_path, NULL, NULL, 0, &img, &missing_err);
    hostile_path = path_of("hostile.qcow2");
    hostile_rc = open_image(hostile_path, "qcow2", NULL, 0, &img, &hostile_err);
    nokey_rc = open_image(images[4].path, "luks", NULL, 0, &img, &nokey_err);
    limit_path = path_of("limit.qcow2");
    instar_limits_t lim = INSTAR_LIMITS_INIT;
    lim.memory_bytes = 1 << 20;
    instar_info_options_t io;
    instar_info_options_init(&io);
    io.limits = &lim;
    instar_info_t *info = NULL;
    limit_rc = instar_info(limit_path, &io, &info, &limit_err);
    if (missing_rc != INSTAR_E_NOT_FOUND || hostile_rc >= 0 || nokey_rc != INSTAR_E_ENCRYPTED ||
        limit_rc != INSTAR_E_LIMIT) {
        fprintf(stderr, "stress: baseline errors: missing %d, hostile %d, no key %d, limit %d\n", missing_rc,
                hostile_rc, nokey_rc, limit_rc);
        exit(2);
    }
    cancel_src = path_of("cancel.qcow2");
    char *p = path_of("top.qcow2");
    if (open_image(p, "qcow2", NULL, 0, &shared_ro, &err)) { fprintf(stderr, "stress: %s\n", err.message); exit(2); }
    free(p);
    p = path_of("shared-rw.qcow2");
    if (open_image(p, "qcow2", NULL, INSTAR_OPEN_READ_WRITE, &shared_rw, &err)) {
        fprintf(stderr, "stress: %s\n", err.message); exit(2);
    }
    free(p);
}

/* ---- the operations ------------------------------------------------------------------------------------------------ */

/* Reads random ranges of `img` and compares them with `guest`; walks its block status over a random range. */
static void read_and_status(int tid, uint64_t *rng, instar_image_t *img, const image_t *im, const char *what) {
    instar_error_t err;
    uint64_t size = 0;
    count();
    if (instar_get_size(img, &size, &err) || size != im->size) {
        fail(tid, "%s %s: size %llu, want %zu", what, im->name, (unsigned long long)size, im->size);
        return;
    }
    unsigned char *buf = malloc(256 * 1024);
    for (int k = 0; k < 4; k++) {
        uint64_t off = next_rand(rng) % size;
        uint64_t n = 1 + next_rand(rng) % (size - off < 256 * 1024 ? size - off : 256 * 1024);
        count();
        int rc = instar_read(img, buf, n, off, &err);
        if (rc) fail(tid, "%s %s: read %llu at %llu: %d %s", what, im->name, (unsigned long long)n,
                     (unsigned long long)off, rc, err.message);
        else if (memcmp(buf, im->guest + off, n))
            fail(tid, "%s %s: read %llu at %llu differs from qemu's", what, im->name, (unsigned long long)n,
                 (unsigned long long)off);
    }
    free(buf);
    /* Block status from a random offset to the end: lengths add up, and a ZERO range reads as zeroes. */
    uint64_t off = next_rand(rng) % size;
    while (off < size) {
        instar_block_status_t st = INSTAR_BLOCK_STATUS_INIT;
        count();
        int rc = instar_block_status(img, off, size - off, &st, &err);
        if (rc || st.length == 0 || st.length > size - off) {
            fail(tid, "%s %s: block status at %llu: %d %s", what, im->name, (unsigned long long)off, rc, err.message);
            return;
        }
        if (st.flags & INSTAR_STATUS_ZERO) {
            for (uint64_t i = off; i < off + st.length; i++)
                if (im->guest[i]) {
                    fail(tid, "%s %s: block status says zero at %llu", what, im->name, (unsigned long long)i);
                    return;
                }
        }
        off += st.length;
    }
}

static void op_own_handle(int tid, uint64_t *rng, image_t *im) {
    instar_image_t *img = NULL;
    instar_error_t err;
    int rc = open_image(im->path, im->format, im->key, 0, &img, &err);
    if (rc) { fail(tid, "open %s: %d %s", im->name, rc, err.message); return; }
    read_and_status(tid, rng, img, im, "own handle");
    instar_close(img);
    count();
}

static void op_info(int tid, image_t *im) {
    instar_error_t err;
    int rc;
    char *json = info_json_of(im, tid, &err, &rc);
    if (rc || !same_info(json, im->info_json)) fail(tid, "info json %s: %d %s", im->name, rc, err.message);
    instar_string_free(json);
    instar_info_options_t o;
    instar_info_options_init(&o);
    o.format = im->format;
    o.key_secret = im->key;
    instar_info_t *info = NULL;
    count();
    rc = instar_info(im->path, &o, &info, &err);
    if (rc || info->virtual_size != (int64_t)im->size || strcmp(info->format, im->format))
        fail(tid, "info %s: %d %s", im->name, rc, err.message);
    instar_info_free(info);
}

/* INSTAR_OPEN_ISOLATED: the same info and map, parsed in helper processes the library spawns from this thread. */
static void op_isolated(int tid, image_t *im) {
    instar_info_options_t o;
    instar_info_options_init(&o);
    o.open_flags = INSTAR_OPEN_ISOLATED;
    o.format = im->format;
    o.backing_chain = 1;
    o.key_secret = im->key;
    char *json = NULL;
    instar_error_t err;
    count();
    int rc = instar_info_json(im->path, &o, &json, &err);
    if (rc || !same_info(json, im->info_json)) fail(tid, "isolated info json %s: %d %s", im->name, rc, err.message);
    instar_string_free(json);
    instar_map_options_t mo;
    instar_map_options_init(&mo);
    mo.open_flags = INSTAR_OPEN_ISOLATED;
    mo.format = im->format;
    mo.key_secret = im->key;
    instar_map_t *m = NULL;
    count();
    rc = instar_map(im->path, &mo, &m, &err);
    if (rc || !same_map(m, im->map)) fail(tid, "isolated map %s: %d %s", im->name, rc, err.message);
    instar_map_free(m);
}

static void op_map_check_measure(int tid, image_t *im) {
    instar_error_t err;
    int rc;
    instar_map_t *m = map_of(im, &err, &rc);
    if (rc || !same_map(m, im->map)) fail(tid, "map %s: %d %s", im->name, rc, err.message);
    instar_map_free(m);
    char *json = check_json_of(im, &err, &rc);
    if (rc != im->check_rc || (rc == 0 && strcmp(json, im->check_json)))
        fail(tid, "check %s: %d (want %d) %s", im->name, rc, im->check_rc, err.message);
    instar_string_free(json);
    instar_measure_result_t r;
    rc = measure_of(im, &r, &err);
    if (rc || r.required != im->measure.required || r.fully_allocated != im->measure.fully_allocated)
        fail(tid, "measure %s: %d %s", im->name, rc, err.message);
}

static int compare_files(const char *a, const char *fa, const char *ka, const char *b, const char *fb) {
    instar_compare_options_t o;
    instar_compare_options_init(&o);
    o.format1 = fa;
    o.format2 = fb;
    o.key_secret1 = ka;
    instar_compare_result_t r;
    memset(&r, 0, sizeof r);
    r.struct_size = sizeof r;
    instar_error_t err;
    count();
    int rc = instar_compare(a, b, &o, &r, &err);
    return rc == 0 && r.identical == 1 && r.exit_status == 0;
}

static void op_compare_convert(int tid, image_t *im) {
    char *raw = NULL, *out = NULL;
    if (asprintf(&raw, "%s.raw", im->path) < 0 || asprintf(&out, "%s/out/t%d-%s.%s", dir, tid, im->name,
                                                            im->convert_to) < 0)
        abort();
    if (!compare_files(im->path, im->format, im->key, raw, "raw")) fail(tid, "compare %s with its raw", im->name);
    instar_convert_options_t o;
    instar_convert_options_init(&o);
    o.source_format = im->format;
    o.target_format = im->convert_to;
    o.key_secret = im->key;
    /* the compressing writer threads (-c) for the compressed source, unordered writes (-W) for the vmdk */
    if (strcmp(im->name, "comp.qcow2") == 0) o.flags |= INSTAR_CONVERT_COMPRESS;
    if (strcmp(im->name, "d.vmdk") == 0) o.flags |= INSTAR_CONVERT_UNORDERED_WRITES;
    instar_error_t err;
    count();
    int rc = instar_convert(im->path, out, &o, &err);
    if (rc) fail(tid, "convert %s: %d %s", im->name, rc, err.message);
    else if (!compare_files(out, im->convert_to, NULL, raw, "raw")) fail(tid, "convert %s: output differs", im->name);
    free(raw);
    free(out);
}

/* create, write, resize, read back, check: an image of this thread's own */
static void op_create_resize(int tid, int iter) {
    char *p = NULL;
    if (asprintf(&p, "%s/out/t%d-new.qcow2", dir, tid) < 0) abort();
    instar_create_options_t co;
    instar_create_options_init(&co);
    co.format = "qcow2";
    co.size = 1 << 20;
    co.options = "cluster_size=4096";
    instar_error_t err;
    count();
    int rc = instar_create(p, &co, &err);
    if (rc) { fail(tid, "create: %d %s", rc, err.message); free(p); return; }
    unsigned char buf[8192];
    memset(buf, 0x10 + tid, sizeof buf);
    instar_image_t *img = NULL;
    rc = open_image(p, "qcow2", NULL, INSTAR_OPEN_READ_WRITE, &img, &err);
    if (rc) { fail(tid, "open new: %d %s", rc, err.message); free(p); return; }
    count();
    rc = instar_write(img, buf, sizeof buf, (uint64_t)(iter % 16) * 8192, &err);
    if (rc) fail(tid, "write new: %d %s", rc, err.message);
    count();
    if (instar_flush(img, &err)) fail(tid, "flush new: %s", err.message);
    instar_close(img);
    count();
    instar_resize_options_t ro;
    instar_resize_options_init(&ro);
    ro.format = "qcow2";
    count();
    rc = instar_resize(p, 2 << 20, &ro, &err);
    if (rc) fail(tid, "resize: %d %s", rc, err.message);
    rc = open_image(p, "qcow2", NULL, 0, &img, &err);
    if (rc) { fail(tid, "open resized: %d %s", rc, err.message); free(p); return; }
    uint64_t size = 0;
    unsigned char back[8192];
    count();
    count();
    if (instar_get_size(img, &size, &err) || size != 2u << 20) fail(tid, "resized size %llu", (unsigned long long)size);
    else if (instar_read(img, back, sizeof back, (uint64_t)(iter % 16) * 8192, &err) || memcmp(back, buf, sizeof back))
        fail(tid, "read back of the new image differs");
    instar_close(img);
    count();
    instar_check_options_t ko;
    instar_check_options_init(&ko);
    ko.format = "qcow2";
    instar_check_result_t kr;
    memset(&kr, 0, sizeof kr);
    kr.struct_size = sizeof kr;
    count();
    rc = instar_check(p, &ko, &kr, &err);
    if (rc || kr.exit_code != 0) fail(tid, "check new: %d exit %d %s", rc, kr.exit_code, err.message);
    free(p);
}

/* qemu-img bench on raw files, whose format does guest I/O from several threads at once (ConcurrentGuestIO): reads
 * of a shared raw file, then writes of this thread's own one, read back afterwards. */
static void op_bench(int tid, image_t *im) {
    char *raw = NULL, *own = NULL;
    if (asprintf(&raw, "%s.raw", im->path) < 0 || asprintf(&own, "%s/out/t%d-bench.raw", dir, tid) < 0) abort();
    instar_bench_options_t o;
    instar_bench_options_init(&o);
    o.format = "raw";
    o.count = 64;
    o.depth = 4;
    o.step = 65536;
    instar_bench_result_t r;
    memset(&r, 0, sizeof r);
    r.struct_size = sizeof r;
    instar_error_t err;
    count();
    int rc = instar_bench(raw, &o, &r, &err);
    if (rc || r.requests != 64) fail(tid, "bench read %s: %d %s", im->name, rc, err.message);
    instar_create_options_t co;
    instar_create_options_init(&co);
    co.size = 1 << 20;
    count();
    rc = instar_create(own, &co, &err);
    if (rc) { fail(tid, "create bench target: %d %s", rc, err.message); goto out; }
    o.flags = INSTAR_BENCH_WRITE;
    o.step = 0;
    o.pattern = 0x20 + tid;
    o.flush_interval = 16;
    memset(&r, 0, sizeof r);
    r.struct_size = sizeof r;
    count();
    rc = instar_bench(own, &o, &r, &err);
    if (rc || r.requests != 64) { fail(tid, "bench write: %d %s", rc, err.message); goto out; }
    instar_image_t *img = NULL;
    rc = open_image(own, "raw", NULL, 0, &img, &err);
    if (rc) { fail(tid, "open bench target: %d %s", rc, err.message); goto out; }
    unsigned char *back = malloc(64 * 4096);
    count();
    if (instar_read(img, back, 64 * 4096, 0, &err)) fail(tid, "read bench target: %s", err.message);
    else
        for (unsigned i = 0; i < 64 * 4096; i++)
            if (back[i] != (unsigned char)(0x20 + tid)) { fail(tid, "bench wrote %u wrong", i); break; }
    free(back);
    instar_close(img);
    count();
out:
    free(raw);
    free(own);
}

static int write_pattern(const char *path, int byte, uint64_t off, uint64_t n, instar_error_t *err) {
    instar_image_t *img = NULL;
    int rc = open_image(path, "qcow2", NULL, INSTAR_OPEN_READ_WRITE, &img, err);
    if (rc) return rc;
    unsigned char *buf = malloc(n);
    memset(buf, byte, n);
    count();
    rc = instar_write(img, buf, n, off, err);
    free(buf);
    instar_close(img);
    count();
    return rc;
}

/* The write-path operations on a chain of this thread's own: create base + top, write both, snapshot create /
 * list / delete, bitmap add, commit, rebase, amend, dd, inspect; then the bytes dd copied out are checked. */
static void op_own_chain(int tid) {
    char *base = NULL, *top = NULL, *dd = NULL;
    if (asprintf(&base, "%s/out/t%d-base.qcow2", dir, tid) < 0 || asprintf(&top, "%s/out/t%d-top.qcow2", dir, tid) < 0 ||
        asprintf(&dd, "%s/out/t%d-dd.raw", dir, tid) < 0)
        abort();
    instar_error_t err;
    int rc;
    instar_create_options_t co;
    instar_create_options_init(&co);
    co.format = "qcow2";
    co.size = 1 << 20;
    co.options = "cluster_size=4096";
    count();
    if ((rc = instar_create(base, &co, &err))) { fail(tid, "create base: %d %s", rc, err.message); goto out; }
    if ((rc = write_pattern(base, 0xa0 + tid, 0, 65536, &err))) { fail(tid, "write base: %d %s", rc, err.message); goto out; }
    co.size = -1;
    co.backing_file = base;
    co.backing_format = "qcow2";
    count();
    if ((rc = instar_create(top, &co, &err))) { fail(tid, "create top: %d %s", rc, err.message); goto out; }
    if ((rc = write_pattern(top, 0xc0 + tid, 131072, 65536, &err))) { fail(tid, "write top: %d %s", rc, err.message); goto out; }

    instar_snapshot_options_t so;
    instar_snapshot_options_init(&so);
    instar_snapshot_list_t *l = NULL;
    count();
    if ((rc = instar_snapshot_create(top, "s", &so, &err))) fail(tid, "snapshot create: %d %s", rc, err.message);
    count();
    if ((rc = instar_snapshot_list(top, &so, &l, &err)) || l->count != 1 || strcmp(l->snapshots[0].name, "s"))
        fail(tid, "snapshot list of the new snapshot: %d %s", rc, err.message);
    instar_snapshot_list_free(l);
    count();
    if ((rc = instar_snapshot_delete(top, "s", &so, &err))) fail(tid, "snapshot delete: %d %s", rc, err.message);

    instar_bitmap_options_t bo;
    instar_bitmap_options_init(&bo);
    bo.format = "qcow2";
    instar_bitmap_action_t add = { INSTAR_BITMAP_ADD, 0, NULL };
    count();
    if ((rc = instar_bitmap(top, "b0", &add, 1, &bo, &err))) fail(tid, "bitmap add: %d %s", rc, err.message);

    instar_commit_options_t cm;
    instar_commit_options_init(&cm);
    cm.format = "qcow2";
    count();
    if ((rc = instar_commit(top, &cm, &err))) fail(tid, "commit: %d %s", rc, err.message);

    instar_rebase_options_t rb;
    instar_rebase_options_init(&rb);
    rb.format = "qcow2";
    rb.backing_file = "";
    count();
    if ((rc = instar_rebase(top, &rb, &err))) fail(tid, "rebase: %d %s", rc, err.message);

    instar_amend_options_t am;
    instar_amend_options_init(&am);
    am.format = "qcow2";
    am.options = "lazy_refcounts=on";
    count();
    if ((rc = instar_amend(base, &am, &err))) fail(tid, "amend: %d %s", rc, err.message);

    instar_dd_options_t dop;
    instar_dd_options_init(&dop);
    dop.input_format = "qcow2";
    dop.block_size = 65536;
    count();
    if ((rc = instar_dd(base, dd, &dop, &err))) { fail(tid, "dd: %d %s", rc, err.message); goto out; }
    size_t n;
    unsigned char *bytes = slurp(dd, &n);
    if (n != 1 << 20) fail(tid, "dd wrote %zu bytes", n);
    else
        for (size_t i = 0; i < n; i++) {
            int want = i < 65536 ? 0xa0 + tid : i >= 131072 && i < 196608 ? 0xc0 + tid : 0;
            if (bytes[i] != (unsigned char)want) { fail(tid, "committed byte %zu is %d, not %d", i, bytes[i], want); break; }
        }
    free(bytes);

    instar_inspect_policy_t pol;
    instar_inspect_policy_init(&pol);
    instar_inspect_report_t *rep = NULL;
    count();
    rc = instar_inspect(base, &pol, &rep, &err);
    if (rc || strcmp(rep->format, "qcow2") || rep->count != 0) fail(tid, "inspect base: %d %s", rc, err.message);
    instar_inspect_report_free(rep);
    rep = NULL;
    count();
    rc = instar_inspect(top, &pol, &rep, &err);  /* rebased onto nothing: no backing file to report */
    if (rc || rep->count != 0) fail(tid, "inspect top: %d %s", rc, err.message);
    instar_inspect_report_free(rep);
out:
    free(base);
    free(top);
    free(dd);
}

static void op_snapshots(int tid) {
    instar_snapshot_options_t so;
    instar_snapshot_options_init(&so);
    instar_snapshot_list_t *l = NULL;
    instar_error_t err;
    count();
    int rc = instar_snapshot_list(snap_path, &so, &l, &err);
    if (rc || l->count != snap_baseline->count) { fail(tid, "snapshot list: %d %s", rc, err.message); goto out; }
    for (uint64_t i = 0; i < l->count; i++)
        if (strcmp(l->snapshots[i].name, snap_baseline->snapshots[i].name) ||
            strcmp(l->snapshots[i].id, snap_baseline->snapshots[i].id) ||
            l->snapshots[i].date_sec != snap_baseline->snapshots[i].date_sec)
            fail(tid, "snapshot %llu differs", (unsigned long long)i);
out:
    instar_snapshot_list_free(l);
}

static void op_shared_ro(int tid, uint64_t *rng) { read_and_status(tid, rng, shared_ro, shared_ro_image, "shared"); }

/* This thread's chunks of the shared writable handle: chunk (tid, slot) always holds byte 0x80 + tid*4 + slot. */
static void op_shared_rw(int tid, int iter) {
    unsigned slot = (unsigned)iter % SHARED_SLOTS;
    uint64_t off = ((uint64_t)tid * SHARED_SLOTS + slot) * SHARED_CHUNK;
    static __thread unsigned char buf[SHARED_CHUNK], back[SHARED_CHUNK];
    memset(buf, 0x80 + tid * 4 + (int)slot, sizeof buf);
    instar_error_t err;
    count();
    int rc = (iter / SHARED_SLOTS) % 2 ? instar_write_zeroes(shared_rw, SHARED_CHUNK, off, 0, &err)
                                       : instar_write(shared_rw, buf, SHARED_CHUNK, off, &err);
    if (rc) { fail(tid, "shared write: %d %s", rc, err.message); return; }
    if ((iter / SHARED_SLOTS) % 2) {
        count();
        if (instar_read(shared_rw, back, SHARED_CHUNK, off, &err)) fail(tid, "shared read: %s", err.message);
        for (unsigned i = 0; i < SHARED_CHUNK; i++) if (back[i]) { fail(tid, "shared zeroes read back data"); break; }
        count();
        rc = instar_write(shared_rw, buf, SHARED_CHUNK, off, &err);  /* the final contents are the pattern */
        if (rc) { fail(tid, "shared write: %d %s", rc, err.message); return; }
    }
    count();
    if (instar_read(shared_rw, back, SHARED_CHUNK, off, &err) || memcmp(back, buf, SHARED_CHUNK))
        fail(tid, "shared read back of chunk %llu differs", (unsigned long long)off);
    if (iter % 5 == 0) {
        count();
        if (instar_flush(shared_rw, &err)) fail(tid, "shared flush: %s", err.message);
    }
}

static void op_errors(int tid) {
    instar_image_t *img = NULL;
    instar_error_t err;
    int rc = open_image(missing_path, NULL, NULL, 0, &img, &err);
    if (!same_error(rc, &err, missing_rc, &missing_err) || img) fail(tid, "missing: %d %s", rc, err.message);
    rc = open_image(hostile_path, "qcow2", NULL, 0, &img, &err);
    if (!same_error(rc, &err, hostile_rc, &hostile_err) || img) fail(tid, "hostile: %d %s", rc, err.message);
    rc = open_image(images[4].path, "luks", NULL, 0, &img, &err);
    if (!same_error(rc, &err, nokey_rc, &nokey_err) || img) fail(tid, "no key: %d %s", rc, err.message);
    instar_limits_t lim = INSTAR_LIMITS_INIT;
    lim.memory_bytes = 1 << 20;
    instar_info_options_t io;
    instar_info_options_init(&io);
    io.limits = &lim;
    instar_info_t *info = NULL;
    count();
    rc = instar_info(limit_path, &io, &info, &err);
    if (!same_error(rc, &err, limit_rc, &limit_err) || info) fail(tid, "limit: %d %s", rc, err.message);
}

/* ---- cancellation from another thread ------------------------------------------------------------------------- */

/* A worker's convert reports progress; past 0% its callback posts a request and waits until the canceller thread
 * answers it, then returns nonzero: the convert must fail with INSTAR_E_CANCELLED and remove its target. */
typedef struct cancel_slot {
    int requested;   /* atomics */
    int answered;
    int timed_out;
} cancel_slot_t;
static cancel_slot_t cancel_slots[MAX_THREADS];
static int workers_done;

static int cancel_progress(double percent, void *data) {
    cancel_slot_t *s = data;
    if (percent <= 0) return 0;
    __atomic_store_n(&s->requested, 1, __ATOMIC_RELEASE);
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    while (!__atomic_load_n(&s->answered, __ATOMIC_ACQUIRE)) {
        if (deadline_passed(&start)) { s->timed_out = 1; return 1; }
        pause_briefly();
    }
    return 1;
}

static void *canceller(void *unused) {
    (void)unused;
    while (!__atomic_load_n(&workers_done, __ATOMIC_ACQUIRE)) {
        for (int t = 0; t < nthreads; t++)
            if (__atomic_load_n(&cancel_slots[t].requested, __ATOMIC_ACQUIRE) &&
                !__atomic_load_n(&cancel_slots[t].answered, __ATOMIC_ACQUIRE))
                __atomic_store_n(&cancel_slots[t].answered, 1, __ATOMIC_RELEASE);
        pause_briefly();
    }
    return NULL;
}

static void op_cancel(int tid) {
    cancel_slot_t *s = &cancel_slots[tid];
    __atomic_store_n(&s->requested, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&s->answered, 0, __ATOMIC_RELEASE);
    s->timed_out = 0;
    char *out = NULL;
    if (asprintf(&out, "%s/out/t%d-cancelled.qcow2", dir, tid) < 0) abort();
    instar_convert_options_t o;
    instar_convert_options_init(&o);
    o.source_format = "qcow2";
    o.target_format = "qcow2";
    o.progress = cancel_progress;
    o.progress_data = s;
    instar_error_t err;
    count();
    int rc = instar_convert(cancel_src, out, &o, &err);
    if (rc != INSTAR_E_CANCELLED || s->timed_out) fail(tid, "cancel: %d %s (timed out %d)", rc, err.message, s->timed_out);
    if (access(out, F_OK) == 0) fail(tid, "cancelled convert left %s", out);
    free(out);
}

/* ---- the threads ------------------------------------------------------------------------------------------------ */

static pthread_barrier_t start_line;

static void *worker(void *arg) {
    int tid = (int)(intptr_t)arg;
    uint64_t rng = 0x9e3779b97f4a7c15ull * (uint64_t)(tid + 1);
    pthread_barrier_wait(&start_line);
    for (int it = 0; it < niters; it++) {
        /* not (tid + it): every kind of call meets every image (all 81 pairs with 8 threads of 18 iterations) */
        image_t *im = &images[(size_t)(tid * 2 + it + it / 9) % NIMAGES];
        /* Every thread writes the shared handle each iteration (so its chunks hold their patterns at the end),
         * and reads the shared read-only one; the rest rotates, offset per thread, so all kinds overlap. */
        op_shared_rw(tid, it);
        switch ((tid + it) % 9) {
        case 0: op_own_handle(tid, &rng, im); break;
        case 1: op_info(tid, im); if (it % 2) op_isolated(tid, im); break;
        case 2: op_map_check_measure(tid, im); break;
        case 3: op_compare_convert(tid, im); break;
        case 4: if (it % 2 == 0) op_create_resize(tid, it); else op_own_chain(tid); break;
        case 5: op_snapshots(tid); op_errors(tid); break;
        case 6: op_shared_ro(tid, &rng); op_bench(tid, im); break;
        case 7: if (it % 2 == 0) op_cancel(tid); else op_shared_ro(tid, &rng); break;
        default: op_own_handle(tid, &rng, im); op_shared_ro(tid, &rng); break;
        }
    }
    return NULL;
}

/* `stress --race-canary`: a deliberate data race, so tsan.sh can prove the sanitizer it built reports one. */
static long canary;
static void *race(void *unused) {
    (void)unused;
    for (int i = 0; i < 1000; i++) canary++;
    return NULL;
}

int main(int argc, char **argv) {
    if (argc == 2 && strcmp(argv[1], "--race-canary") == 0) {
        pthread_t a, b;
        pthread_create(&a, NULL, race, NULL);
        pthread_create(&b, NULL, race, NULL);
        pthread_join(a, NULL);
        pthread_join(b, NULL);
        printf("canary %ld\n", canary);
        return 0;
    }
    if (argc != 4) { fprintf(stderr, "usage: stress DIR THREADS ITERS\n"); return 2; }
    dir = argv[1];
    nthreads = atoi(argv[2]);
    niters = atoi(argv[3]);
    if (nthreads < 1 || nthreads > MAX_THREADS || niters < 1) { fprintf(stderr, "stress: bad arguments\n"); return 2; }
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    baselines();
    long baseline_calls = calls;
    pthread_t threads[MAX_THREADS], cancel_thread;
    pthread_barrier_init(&start_line, NULL, (unsigned)nthreads);
    if (pthread_create(&cancel_thread, NULL, canceller, NULL)) return 2;
    for (int t = 0; t < nthreads; t++)
        if (pthread_create(&threads[t], NULL, worker, (void *)(intptr_t)t)) return 2;
    for (int t = 0; t < nthreads; t++) pthread_join(threads[t], NULL);
    __atomic_store_n(&workers_done, 1, __ATOMIC_RELEASE);
    pthread_join(cancel_thread, NULL);
    instar_error_t err;
    count();
    if (instar_flush(shared_rw, &err)) fail(-1, "final flush: %s", err.message);
    instar_close(shared_rw);
    instar_close(shared_ro);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    for (size_t i = 0; i < NIMAGES; i++) {
        free(images[i].path); free(images[i].guest);
        instar_string_free(images[i].info_json); instar_string_free(images[i].check_json);
        instar_map_free(images[i].map);
    }
    instar_snapshot_list_free(snap_baseline);
    printf("ok: %d threads, %d iterations, %ld calls (%ld in the threads), %.1f s, %ld failed\n", nthreads, niters,
           calls, calls - baseline_calls, (double)(t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9, fails);
    return fails ? 1 : 0;
}
