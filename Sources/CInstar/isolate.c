/* The process side of isolated mode (INSTAR_OPEN_ISOLATED): spawning the helper, passing descriptors over its
 * socket, and the helper's lockdown (rlimits, no new privileges, a seccomp-BPF allowlist). docs/isolated.md. */
#define _GNU_SOURCE
#include "instar_shims.h"
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stddef.h>
#include <string.h>
#include <unistd.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>

int instar_broker_fd = -1;

int instar_isolate_socketpair(int fds[2]) {
    return socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) == 0 ? 0 : -errno;
}

int instar_isolate_spawn(const char *helper, int child_sock, int *pid_out) {
    posix_spawn_file_actions_t fa;
    posix_spawnattr_t attr;
    int rc = posix_spawn_file_actions_init(&fa);
    if (rc != 0) return -rc;
    rc = posix_spawnattr_init(&attr);
    if (rc != 0) { posix_spawn_file_actions_destroy(&fa); return -rc; }
    /* The helper's socket becomes fd 3; nothing else of the host's is inherited. */
    rc = posix_spawn_file_actions_adddup2(&fa, child_sock, INSTAR_ISOLATE_SOCK_FD);
    if (rc == 0) rc = posix_spawn_file_actions_addclosefrom_np(&fa, INSTAR_ISOLATE_SOCK_FD + 1);
    int devnull_flags = O_RDWR;
    if (rc == 0) rc = posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", devnull_flags, 0);
    if (rc == 0) rc = posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", devnull_flags, 0);
    if (rc == 0) rc = posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", devnull_flags, 0);
    sigset_t none, all;
    sigemptyset(&none);
    sigfillset(&all);
    if (rc == 0) rc = posix_spawnattr_setsigmask(&attr, &none);
    if (rc == 0) rc = posix_spawnattr_setsigdefault(&attr, &all);
    if (rc == 0) rc = posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
    if (rc == 0) {
        char *argv[] = { (char *)helper, NULL };
        char *envp[] = { NULL };
        pid_t pid = 0;
        rc = posix_spawn(&pid, helper, &fa, &attr, argv, envp);
        if (rc == 0) *pid_out = (int)pid;
    }
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&attr);
    return rc == 0 ? 0 : -rc;
}

ssize_t instar_isolate_send(int sock, const void *buf, size_t len, int fd) {
    struct iovec iov = { (void *)buf, len };
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } ctl;
    if (fd >= 0) {
        memset(&ctl, 0, sizeof ctl);
        msg.msg_control = ctl.buf;
        msg.msg_controllen = sizeof ctl.buf;
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof(int));
    }
    ssize_t n;
    do { n = sendmsg(sock, &msg, MSG_NOSIGNAL); } while (n < 0 && errno == EINTR);
    return n < 0 ? -errno : n;
}

ssize_t instar_isolate_recv(int sock, void *buf, size_t cap, int *fd_out) {
    struct iovec iov = { buf, cap };
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    union { char buf[CMSG_SPACE(sizeof(int) * 4)]; struct cmsghdr align; } ctl;
    msg.msg_control = ctl.buf;
    msg.msg_controllen = sizeof ctl.buf;
    ssize_t n;
    do { n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC); } while (n < 0 && errno == EINTR);
    if (n < 0) return -errno;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < count; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
            if (fd_out && *fd_out < 0) *fd_out = fd; else close(fd);
        }
    }
    return n;
}

/* Sends and receives exactly len bytes on the broker socket (the helper side; blocking). */
static int send_all(int sock, const void *buf, size_t len) {
    const char *p = buf;
    while (len > 0) {
        ssize_t n = instar_isolate_send(sock, p, len, -1);
        if (n <= 0) return n < 0 ? (int)n : -EPIPE;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* The helper's open(): the parent opens the file read-only (or refuses) and passes the descriptor back.
 * Request frame: type 1, u64 length, then u32 flags and the path. Reply: i32 result (0 or -errno), the fd as
 * SCM_RIGHTS data on that message. */
int instar_broker_open(const char *path, int flags) {
    int sock = instar_broker_fd;
    size_t plen = strlen(path);
    unsigned char head[13];
    uint32_t type = 1;
    uint64_t len = 4 + plen;
    uint32_t f = (uint32_t)flags;
    memcpy(head, &type, 4);
    memcpy(head + 4, &len, 8);
    if (send_all(sock, head, 12) != 0 || send_all(sock, &f, 4) != 0 || send_all(sock, path, plen) != 0) {
        errno = EIO;
        return -1;
    }
    int32_t result = 0;
    size_t got = 0;
    int fd = -1;
    while (got < sizeof result) {
        ssize_t n = instar_isolate_recv(sock, (char *)&result + got, sizeof result - got, &fd);
        if (n <= 0) { if (fd >= 0) close(fd); errno = EIO; return -1; }
        got += (size_t)n;
    }
    if (result < 0) { if (fd >= 0) close(fd); errno = -result; return -1; }
    if (fd < 0) { errno = EIO; return -1; }
    return fd;
}

#if defined(__x86_64__)
#define INSTAR_AUDIT_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define INSTAR_AUDIT_ARCH AUDIT_ARCH_AARCH64
#endif

#define ALLOW(nr) BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (nr), 0, 1), BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)
#define DENY(nr, e) BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (nr), 0, 1), \
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ((e) & SECCOMP_RET_DATA))
#define ARG_LO(i) offsetof(struct seccomp_data, args[i])

int instar_isolate_lockdown(uint64_t address_space, uint64_t cpu_seconds) {
#ifndef INSTAR_AUDIT_ARCH
    (void)address_space; (void)cpu_seconds;
    return -ENOSYS; /* no filter for this architecture: refuse to run unconfined */
#else
    struct rlimit r;
    r.rlim_cur = r.rlim_max = 0;
    if (setrlimit(RLIMIT_CORE, &r) != 0) return -errno;
    if (setrlimit(RLIMIT_FSIZE, &r) != 0) return -errno;
    r.rlim_cur = r.rlim_max = 8192; /* the image files of a chain and a vmdk's extents (at most 4096) */
    if (setrlimit(RLIMIT_NOFILE, &r) != 0) return -errno;
    if (address_space) {
        r.rlim_cur = r.rlim_max = address_space;
        if (setrlimit(RLIMIT_AS, &r) != 0) return -errno;
    }
    if (cpu_seconds) {
        r.rlim_cur = cpu_seconds;
        r.rlim_max = cpu_seconds + 1;
        if (setrlimit(RLIMIT_CPU, &r) != 0) return -errno;
    }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return -errno;
    pid_t self = getpid();
    struct sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, INSTAR_AUDIT_ARCH, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        /* stat by descriptor only: glibc's fstat is newfstatat(fd, "", AT_EMPTY_PATH); a lookup by path fails */
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_newfstatat, 0, 4),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ARG_LO(3)),
        BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, AT_EMPTY_PATH, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EACCES),
        /* sendmsg/recvmsg only on the broker socket */
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_sendmsg, 1, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_recvmsg, 0, 4),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ARG_LO(0)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, INSTAR_ISOLATE_SOCK_FD, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
        /* signals only to itself (abort(3) raises SIGABRT with tgkill) */
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_tgkill, 0, 4),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ARG_LO(0)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (uint32_t)self, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        ALLOW(__NR_read), ALLOW(__NR_rt_sigaction), ALLOW(__NR_pread64), ALLOW(__NR_preadv), ALLOW(__NR_readv),
        ALLOW(__NR_write),
        ALLOW(__NR_lseek), ALLOW(__NR_close), ALLOW(__NR_fstat), ALLOW(__NR_fstatfs), ALLOW(__NR_fcntl),
        ALLOW(__NR_mmap), ALLOW(__NR_munmap), ALLOW(__NR_mremap), ALLOW(__NR_mprotect), ALLOW(__NR_madvise),
        ALLOW(__NR_brk), ALLOW(__NR_futex), ALLOW(__NR_exit), ALLOW(__NR_exit_group), ALLOW(__NR_rt_sigprocmask),
        ALLOW(__NR_rt_sigreturn), ALLOW(__NR_sigaltstack), ALLOW(__NR_clock_gettime), ALLOW(__NR_clock_getres),
        ALLOW(__NR_gettimeofday), ALLOW(__NR_getrusage), ALLOW(__NR_getrandom), ALLOW(__NR_sched_yield),
        ALLOW(__NR_getpid), ALLOW(__NR_gettid), ALLOW(__NR_fadvise64), ALLOW(__NR_restart_syscall),
        DENY(__NR_ioctl, ENOTTY), DENY(__NR_sched_getaffinity, ENOSYS), DENY(__NR_sysinfo, ENOSYS),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
    };
    struct sock_fprog prog = { (unsigned short)(sizeof filter / sizeof filter[0]), filter };
    if (syscall(__NR_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) != 0) return -errno;
    return 0;
#endif
}

void instar_isolate_die_at_parent_exit(void) { prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0); }

int instar_isolate_test_open(const char *path) { return open(path, O_RDONLY | O_CLOEXEC); }

#include <dlfcn.h>
/* The file this code was loaded from (libinstar.so, or the program it is linked into); NULL when unknown. */
const char *instar_isolate_own_path(void) {
    Dl_info info;
    if (dladdr((void *)&instar_isolate_own_path, &info) == 0 || info.dli_fname == NULL) return NULL;
    return info.dli_fname;
}
