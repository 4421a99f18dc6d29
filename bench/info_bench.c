/* Times instar_info_json called N times in one process (the library path, no process start).
 * Usage: info_bench IMAGE [N]. Prints "calls=N total_s=... per_call_us=...". */
#include <instar.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s IMAGE [N]\n", argv[0]);
        return 2;
    }
    int n = argc > 2 ? atoi(argv[2]) : 1000;
    instar_info_options_t opts = INSTAR_INFO_OPTIONS_INIT;
    instar_error_t err;
    char *json = NULL;
    /* One warm-up call, which also checks that the call works at all. */
    if (instar_info_json(argv[1], &opts, &json, &err) != 0) {
        fprintf(stderr, "instar_info_json: %s\n", err.message);
        return 1;
    }
    instar_string_free(json);
    double t0 = now();
    for (int i = 0; i < n; i++) {
        if (instar_info_json(argv[1], &opts, &json, &err) != 0) {
            fprintf(stderr, "instar_info_json: %s\n", err.message);
            return 1;
        }
        instar_string_free(json);
    }
    double t = now() - t0;
    printf("calls=%d total_s=%.6f per_call_us=%.2f\n", n, t, t / n * 1e6);
    return 0;
}
