/* Runs a command as its only child and writes how it went to a file, for bench/hostile_budget.py:
 *   hostile_budget_spawn RESULT_FILE TIMEOUT_S CPU_GUARD_S CMD [ARGS...]
 * RESULT_FILE gets "<wait status> <ru_maxrss KiB> <wall ns> <user us> <system us>". A small process of its own
 * spawns the command, so the child's peak RSS does not start from the (large) Python parent's. CPU_GUARD_S > 0
 * sets RLIMIT_CPU in the child; past TIMEOUT_S of wall time the child is killed. */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static pid_t child;

static void on_alarm(int sig) {
    (void)sig;
    if (child > 0) kill(child, SIGKILL);
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s RESULT_FILE TIMEOUT_S CPU_GUARD_S CMD [ARGS...]\n", argv[0]);
        return 127;
    }
    long timeout = atol(argv[2]), guard = atol(argv[3]);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    child = fork();
    if (child < 0) return 127;
    if (child == 0) {
        if (guard > 0) {
            struct rlimit r = {(rlim_t)guard, (rlim_t)guard};
            setrlimit(RLIMIT_CPU, &r);
        }
        execvp(argv[4], argv + 4);
        _exit(127);
    }
    signal(SIGALRM, on_alarm);
    if (timeout > 0) alarm((unsigned)timeout);
    int status = 0;
    struct rusage ru;
    while (wait4(child, &status, 0, &ru) < 0) {
        if (errno != EINTR) return 127;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    FILE *f = fopen(argv[1], "w");
    if (!f) return 127;
    long long wall = (long long)(t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec);
    fprintf(f, "%d %ld %lld %lld %lld\n", status, ru.ru_maxrss, wall,
            (long long)ru.ru_utime.tv_sec * 1000000 + ru.ru_utime.tv_usec,
            (long long)ru.ru_stime.tv_sec * 1000000 + ru.ru_stime.tv_usec);
    fclose(f);
    return 0;
}
