/* faultinject.c: an LD_PRELOAD shim that makes the Nth write-type call on chosen files fail.
 *
 * Built by Tests/diff/test_fault_injection.py with `gcc -shared -fPIC -O2 -o faultinject.so faultinject.c -ldl`.
 * It interposes every libc entry point through which a process changes a file's contents, size or durability:
 * write, pwrite, pwrite64, writev, pwritev, pwritev64, pwritev2, ftruncate, ftruncate64, fallocate,
 * fallocate64, posix_fallocate, posix_fallocate64, fsync, fdatasync, sync_file_range and copy_file_range
 * (its destination). Only calls on a descriptor whose path (readlink of /proc/self/fd/N) contains one of the
 * `|`-separated substrings in FAULTINJ_PATH count; others pass straight through.
 *
 * Environment:
 *   FAULTINJ_PATH   substrings of the paths to watch, separated by '|'; unset: the shim does nothing
 *   FAULTINJ_AT     the 1-based number of the watched call to fail; 0 or unset: count only
 *   FAULTINJ_MODE   eio    the call fails with EIO, later calls succeed (a transient error)
 *                   enospc the call and every later watched call fail with ENOSPC (the disk is full)
 *                   short  a write stops at the last 4 KiB boundary of the file inside its range and returns
 *                          the bytes written before it, and every later watched call fails with ENOSPC (the
 *                          disk filled up in the middle of a write: a filesystem runs out of space a block at
 *                          a time, so a write never stops inside a 4 KiB block); a write within one block, and
 *                          a call that moves no bytes (fsync, ftruncate, ...), fails with ENOSPC
 *   FAULTINJ_COUNT  a file to which the number of watched calls is written at exit
 *   FAULTINJ_LOG    a file to which each watched call is appended ("N name fd offset length")
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static const char *watch;
static long fail_at;
static int mode; /* 0 eio, 1 enospc, 2 short */
static long counter;
static int tripped; /* a sticky failure happened */

__attribute__((constructor)) static void fi_init(void) {
    watch = getenv("FAULTINJ_PATH");
    const char *at = getenv("FAULTINJ_AT");
    fail_at = at ? strtol(at, NULL, 10) : 0;
    const char *m = getenv("FAULTINJ_MODE");
    mode = !m || !strcmp(m, "eio") ? 0 : !strcmp(m, "enospc") ? 1 : 2;
}

static void fi_write_file(const char *env, const char *text) {
    const char *p = getenv(env);
    if (!p) return;
    int (*real_open)(const char *, int, ...) = dlsym(RTLD_NEXT, "open");
    ssize_t (*real_write)(int, const void *, size_t) = dlsym(RTLD_NEXT, "write");
    int fd = real_open(p, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0) return;
    real_write(fd, text, strlen(text));
    close(fd);
}

__attribute__((destructor)) static void fi_fini(void) {
    const char *p = getenv("FAULTINJ_COUNT");
    if (!p || !watch) return;
    char buf[32];
    snprintf(buf, sizeof buf, "%ld\n", __atomic_load_n(&counter, __ATOMIC_SEQ_CST));
    unlink(p);
    fi_write_file("FAULTINJ_COUNT", buf);
}

static int watched(int fd) {
    if (!watch || fd < 0) return 0;
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n <= 0) return 0;
    path[n] = 0;
    const char *s = watch;
    while (*s) {
        const char *e = strchr(s, '|');
        size_t len = e ? (size_t)(e - s) : strlen(s);
        if (len) {
            char pat[1024];
            if (len >= sizeof pat) len = sizeof pat - 1;
            memcpy(pat, s, len);
            pat[len] = 0;
            if (strstr(path, pat)) return 1;
        }
        if (!e) break;
        s = e + 1;
    }
    return 0;
}

/* What a watched call does: 0 proceed, -1 fail with *err, 1 (writes only) write half and stop. */
static int decide(int fd, const char *name, long long off, long long len, int *err) {
    if (!watched(fd)) return 0;
    long n = __atomic_add_fetch(&counter, 1, __ATOMIC_SEQ_CST);
    if (getenv("FAULTINJ_LOG")) {
        char line[160];
        snprintf(line, sizeof line, "%ld %s %d %lld %lld\n", n, name, fd, off, len);
        fi_write_file("FAULTINJ_LOG", line);
    }
    if (__atomic_load_n(&tripped, __ATOMIC_SEQ_CST)) { *err = ENOSPC; return -1; }
    if (fail_at <= 0 || n != fail_at) return 0;
    if (mode == 0) { *err = EIO; return -1; }
    __atomic_store_n(&tripped, 1, __ATOMIC_SEQ_CST);
    *err = ENOSPC;
    return mode == 2 ? 1 : -1;
}

/* How many bytes of a write of `count` bytes at file offset `off` land before the disk fills: up to the last
 * 4 KiB boundary inside the range, 0 when there is none. */
static size_t short_len(int fd, long long off, size_t count) {
    if (off < 0) off = (long long)lseek(fd, 0, SEEK_CUR);
    if (off < 0) return 0;
    unsigned long long end = (unsigned long long)off + count, cut = end & ~4095ULL;
    return cut > (unsigned long long)off ? (size_t)(cut - (unsigned long long)off) : 0;
}

#define REAL(ret, name, ...) \
    static ret (*real_##name)(__VA_ARGS__); \
    if (!real_##name) real_##name = dlsym(RTLD_NEXT, #name)

ssize_t write(int fd, const void *buf, size_t count) {
    REAL(ssize_t, write, int, const void *, size_t);
    int err = 0, d = decide(fd, "write", -1, (long long)count, &err);
    if (d < 0) { errno = err; return -1; }
    if (d > 0) { size_t n = short_len(fd, -1, count); if (!n) { errno = err; return -1; } return real_write(fd, buf, n); }
    return real_write(fd, buf, count);
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t off) {
    REAL(ssize_t, pwrite, int, const void *, size_t, off_t);
    int err = 0, d = decide(fd, "pwrite", (long long)off, (long long)count, &err);
    if (d < 0) { errno = err; return -1; }
    if (d > 0) { size_t n = short_len(fd, off, count); if (!n) { errno = err; return -1; } return real_pwrite(fd, buf, n, off); }
    return real_pwrite(fd, buf, count, off);
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off64_t off) {
    REAL(ssize_t, pwrite64, int, const void *, size_t, off64_t);
    int err = 0, d = decide(fd, "pwrite64", (long long)off, (long long)count, &err);
    if (d < 0) { errno = err; return -1; }
    if (d > 0) { size_t n = short_len(fd, off, count); if (!n) { errno = err; return -1; } return real_pwrite64(fd, buf, n, off); }
    return real_pwrite64(fd, buf, count, off);
}

static size_t iov_total(const struct iovec *iov, int n) {
    size_t t = 0;
    for (int i = 0; i < n; i++) t += iov[i].iov_len;
    return t;
}

/* A short vectored write: the bytes up to the last 4 KiB boundary, written with pwrite/write piecewise. */
static ssize_t short_iov(int fd, const struct iovec *iov, int n, long long off) {
    REAL(ssize_t, pwrite64, int, const void *, size_t, off64_t);
    REAL(ssize_t, write, int, const void *, size_t);
    size_t want = short_len(fd, off, iov_total(iov, n)), done = 0;
    if (!want) { errno = ENOSPC; return -1; }
    for (int i = 0; i < n && done < want; i++) {
        size_t len = iov[i].iov_len < want - done ? iov[i].iov_len : want - done;
        ssize_t r = off >= 0 ? real_pwrite64(fd, iov[i].iov_base, len, off + (long long)done)
                             : real_write(fd, iov[i].iov_base, len);
        if (r < 0) return done ? (ssize_t)done : -1;
        done += (size_t)r;
        if ((size_t)r < len) break;
    }
    return (ssize_t)done;
}

ssize_t writev(int fd, const struct iovec *iov, int n) {
    REAL(ssize_t, writev, int, const struct iovec *, int);
    int err = 0, d = decide(fd, "writev", -1, (long long)iov_total(iov, n), &err);
    if (d < 0) { errno = err; return -1; }
    if (d > 0) return short_iov(fd, iov, n, -1);
    return real_writev(fd, iov, n);
}

ssize_t pwritev(int fd, const struct iovec *iov, int n, off_t off) {
    REAL(ssize_t, pwritev, int, const struct iovec *, int, off_t);
    int err = 0, d = decide(fd, "pwritev", (long long)off, (long long)iov_total(iov, n), &err);
    if (d < 0) { errno = err; return -1; }
    if (d > 0) return short_iov(fd, iov, n, off);
    return real_pwritev(fd, iov, n, off);
}

ssize_t pwritev64(int fd, const struct iovec *iov, int n, off64_t off) {
    REAL(ssize_t, pwritev64, int, const struct iovec *, int, off64_t);
    int err = 0, d = decide(fd, "pwritev64", (long long)off, (long long)iov_total(iov, n), &err);
    if (d < 0) { errno = err; return -1; }
    if (d > 0) return short_iov(fd, iov, n, off);
    return real_pwritev64(fd, iov, n, off);
}

ssize_t pwritev2(int fd, const struct iovec *iov, int n, off_t off, int flags) {
    REAL(ssize_t, pwritev2, int, const struct iovec *, int, off_t, int);
    int err = 0, d = decide(fd, "pwritev2", (long long)off, (long long)iov_total(iov, n), &err);
    if (d < 0) { errno = err; return -1; }
    if (d > 0) return short_iov(fd, iov, n, off);
    return real_pwritev2(fd, iov, n, off, flags);
}

int ftruncate(int fd, off_t len) {
    REAL(int, ftruncate, int, off_t);
    int err = 0;
    if (decide(fd, "ftruncate", -1, (long long)len, &err)) { errno = err; return -1; }
    return real_ftruncate(fd, len);
}

int ftruncate64(int fd, off64_t len) {
    REAL(int, ftruncate64, int, off64_t);
    int err = 0;
    if (decide(fd, "ftruncate64", -1, (long long)len, &err)) { errno = err; return -1; }
    return real_ftruncate64(fd, len);
}

int fallocate(int fd, int m, off_t off, off_t len) {
    REAL(int, fallocate, int, int, off_t, off_t);
    int err = 0;
    if (decide(fd, "fallocate", (long long)off, (long long)len, &err)) { errno = err; return -1; }
    return real_fallocate(fd, m, off, len);
}

int fallocate64(int fd, int m, off64_t off, off64_t len) {
    REAL(int, fallocate64, int, int, off64_t, off64_t);
    int err = 0;
    if (decide(fd, "fallocate64", (long long)off, (long long)len, &err)) { errno = err; return -1; }
    return real_fallocate64(fd, m, off, len);
}

int posix_fallocate(int fd, off_t off, off_t len) {
    REAL(int, posix_fallocate, int, off_t, off_t);
    int err = 0;
    if (decide(fd, "posix_fallocate", (long long)off, (long long)len, &err)) return err;
    return real_posix_fallocate(fd, off, len);
}

int posix_fallocate64(int fd, off64_t off, off64_t len) {
    REAL(int, posix_fallocate64, int, off64_t, off64_t);
    int err = 0;
    if (decide(fd, "posix_fallocate64", (long long)off, (long long)len, &err)) return err;
    return real_posix_fallocate64(fd, off, len);
}

int fsync(int fd) {
    REAL(int, fsync, int);
    int err = 0;
    if (decide(fd, "fsync", -1, 0, &err)) { errno = err; return -1; }
    return real_fsync(fd);
}

int fdatasync(int fd) {
    REAL(int, fdatasync, int);
    int err = 0;
    if (decide(fd, "fdatasync", -1, 0, &err)) { errno = err; return -1; }
    return real_fdatasync(fd);
}

int sync_file_range(int fd, off64_t off, off64_t len, unsigned int flags) {
    REAL(int, sync_file_range, int, off64_t, off64_t, unsigned int);
    int err = 0;
    if (decide(fd, "sync_file_range", (long long)off, (long long)len, &err)) { errno = err; return -1; }
    return real_sync_file_range(fd, off, len, flags);
}

ssize_t copy_file_range(int in, off64_t *in_off, int out, off64_t *out_off, size_t len, unsigned int flags) {
    REAL(ssize_t, copy_file_range, int, off64_t *, int, off64_t *, size_t, unsigned int);
    int err = 0, d = decide(out, "copy_file_range", out_off ? (long long)*out_off : -1, (long long)len, &err);
    if (d < 0) { errno = err; return -1; }
    if (d > 0) {
        size_t n = short_len(out, out_off ? (long long)*out_off : -1, len);
        if (!n) { errno = err; return -1; }
        return real_copy_file_range(in, in_off, out, out_off, n, flags);
    }
    return real_copy_file_range(in, in_off, out, out_off, len, flags);
}
