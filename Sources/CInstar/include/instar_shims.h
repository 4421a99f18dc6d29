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
#endif
