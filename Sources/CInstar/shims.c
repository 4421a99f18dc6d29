#define _GNU_SOURCE
#include "instar_shims.h"
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>
#include <linux/falloc.h>

int instar_shim_open(const char *path, int flags, unsigned int mode) {
    if (instar_broker_fd >= 0) return instar_broker_open(path, flags);
    return open(path, flags | O_CLOEXEC, (mode_t)mode);
}

int instar_shim_o_direct(void) { return O_DIRECT; }

int instar_shim_ofd_lock(int fd, int64_t start, int64_t len, int type) {
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_whence = SEEK_SET;
    fl.l_start = (off_t)start;
    fl.l_len = (off_t)len;
    fl.l_type = type == 0 ? F_UNLCK : (type == 1 ? F_RDLCK : F_WRLCK);
    if (fcntl(fd, F_OFD_SETLK, &fl) == -1) return -errno;
    return 0;
}

int instar_shim_ofd_test(int fd, int64_t start, int64_t len, int type) {
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_whence = SEEK_SET;
    fl.l_start = (off_t)start;
    fl.l_len = (off_t)len;
    fl.l_type = type == 1 ? F_RDLCK : F_WRLCK;
    if (fcntl(fd, F_OFD_GETLK, &fl) == -1) return -errno;
    return fl.l_type == F_UNLCK ? 0 : 1;
}

int instar_shim_punch_hole(int fd, int64_t offset, int64_t length) {
    if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length) == -1) return -errno;
    return 0;
}

int instar_shim_zero_range(int fd, int64_t offset, int64_t length) {
    if (fallocate(fd, FALLOC_FL_ZERO_RANGE, (off_t)offset, (off_t)length) == -1) return -errno;
    return 0;
}

const char *instar_shim_strerror(int err, char *buf, size_t len) {
    /* The GNU strerror_r (this file defines _GNU_SOURCE): thread-safe, unlike strerror, whose buffer for
     * unknown codes is shared. */
    return strerror_r(err, buf, len);
}

int64_t instar_shim_copy_file_range(int in, int64_t *in_off, int out, int64_t *out_off, int64_t length) {
    loff_t a = *in_off, b = *out_off;
    ssize_t n = copy_file_range(in, &a, out, &b, (size_t)length, 0);
    if (n < 0) return -errno;
    *in_off = a;
    *out_off = b;
    return n;
}

int instar_shim_sync_file_range(int fd, int64_t offset, int64_t length, unsigned int flags) {
    int r;
    do {
        r = sync_file_range(fd, (off64_t)offset, (off64_t)length, flags);
    } while (r != 0 && errno == EINTR);
    return r == 0 ? 0 : -errno;
}
