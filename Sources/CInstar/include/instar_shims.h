/* Small C helpers the Swift engine calls where Swift cannot call libc directly (variadic fcntl/open). */
#ifndef INSTAR_SHIMS_H
#define INSTAR_SHIMS_H
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <getopt.h>

/** open(2) with a mode; returns the fd or -1 with errno set. */
int instar_shim_open(const char *path, int flags, unsigned int mode);
/** The O_DIRECT flag value of this platform. */
int instar_shim_o_direct(void);
/**
 * OFD byte-range lock on one byte: type 0 unlock, 1 shared (F_RDLCK), 2 exclusive (F_WRLCK).
 * Non-blocking (F_OFD_SETLK). Returns 0 or -errno.
 */
int instar_shim_ofd_lock(int fd, int64_t start, int64_t len, int type);
/**
 * Tests whether an OFD lock of `type` (1 shared, 2 exclusive) on the range would conflict with a lock held
 * through another open file description. Returns 0 when free, 1 when it conflicts, or -errno.
 */
int instar_shim_ofd_test(int fd, int64_t start, int64_t len, int type);
/** fallocate(PUNCH_HOLE|KEEP_SIZE); returns 0 or -errno. */
int instar_shim_punch_hole(int fd, int64_t offset, int64_t length);
/* strerror(3) text for `err`, thread-safely: the result points into `buf` or at static text. */
const char *instar_shim_strerror(int err, char *buf, size_t len);
/** fallocate(ZERO_RANGE), which qemu uses for write-zeroes on local files; returns 0 or -errno. */
int instar_shim_zero_range(int fd, int64_t offset, int64_t length);
/** copy_file_range(2) from `in` at *in_off to `out` at *out_off (both advanced); returns bytes copied or -errno. */
int64_t instar_shim_copy_file_range(int in, int64_t *in_off, int out, int64_t *out_off, int64_t length);

/** sync_file_range(2) of [offset, offset + length) with `flags` (SYNC_FILE_RANGE_* bits); returns 0 or -errno. */
int instar_shim_sync_file_range(int fd, int64_t offset, int64_t length, unsigned int flags);

/* ---- isolated mode (isolate.c, docs/isolated.md) ---- */
/** The helper's end of its socket is this descriptor in the helper process. */
#define INSTAR_ISOLATE_SOCK_FD 3
/** In the helper: the broker socket instar_shim_open asks for files through; -1 (the default) opens directly. */
extern int instar_broker_fd;
/** A connected AF_UNIX stream pair (close-on-exec); 0 or -errno. */
int instar_isolate_socketpair(int fds[2]);
/** posix_spawn of `helper` with `child_sock` as its fd 3, stdio on /dev/null, nothing else, empty environment. */
int instar_isolate_spawn(const char *helper, int child_sock, int *pid_out);
/** sendmsg of `len` bytes, with `fd` as SCM_RIGHTS when >= 0; bytes sent or -errno. */
ssize_t instar_isolate_send(int sock, const void *buf, size_t len, int fd);
/** recvmsg of up to `cap` bytes; a passed descriptor lands in *fd_out when it is -1 (else it is closed). */
ssize_t instar_isolate_recv(int sock, void *buf, size_t cap, int *fd_out);
/** The helper's open through the broker socket; the fd or -1 with errno set. */
int instar_broker_open(const char *path, int flags);
/** In the helper: rlimits (AS, CPU, no core, no file growth, descriptors), no new privileges, seccomp filter. */
int instar_isolate_lockdown(uint64_t address_space, uint64_t cpu_seconds);
/** In the helper: SIGKILL when the parent dies. */
void instar_isolate_die_at_parent_exit(void);
/** The file this code was loaded from (dladdr), NULL when unknown. Static storage of the loader. */
const char *instar_isolate_own_path(void);
/** Test hook: a plain open(2), which the helper's filter must kill. */
int instar_isolate_test_open(const char *path);

/** A 64-bit word read and changed from several threads (sequentially consistent). */
static inline void instar_atomic_add_u64(uint64_t *word, uint64_t n) { __atomic_fetch_add(word, n, __ATOMIC_SEQ_CST); }
static inline uint64_t instar_atomic_load_u64(const uint64_t *word) { return __atomic_load_n(word, __ATOMIC_SEQ_CST); }
static inline void instar_atomic_store_u64(uint64_t *word, uint64_t v) { __atomic_store_n(word, v, __ATOMIC_SEQ_CST); }
static inline uint64_t instar_atomic_exchange_u64(uint64_t *word, uint64_t v) { return __atomic_exchange_n(word, v, __ATOMIC_SEQ_CST); }
#endif
