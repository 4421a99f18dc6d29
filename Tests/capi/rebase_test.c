/* instar_rebase from C: argv[1] is a directory holding base.qcow2 <- top.qcow2, a copy top2.qcow2, new.qcow2
 * and top3.qcow2 (same chain). Prints one line per step; the Python side compares the files with qemu-img. */
#include <instar.h>
#include <stdio.h>
#include <string.h>

static int calls;
static double last;

static int on_progress(double percent, void *data) {
    (void)data;
    calls++;
    last = percent;
    return 0;
}

static int cancel_at_half(double percent, void *data) {
    (void)data;
    return percent >= 50.0;
}

int main(int argc, char **argv) {
    char top[4096], top2[4096], top3[4096], missing[4096];
    instar_error_t err;
    int rc;
    if (argc != 2) return 2;
    snprintf(top, sizeof top, "%s/top.qcow2", argv[1]);
    snprintf(top2, sizeof top2, "%s/top2.qcow2", argv[1]);
    snprintf(top3, sizeof top3, "%s/top3.qcow2", argv[1]);
    snprintf(missing, sizeof missing, "%s/missing.qcow2", argv[1]);

    {   /* safe rebase with the INIT macro, progress reported */
        instar_rebase_options_t o = INSTAR_REBASE_OPTIONS_INIT;
        o.backing_file = "new.qcow2";
        o.backing_format = "qcow2";
        o.progress = on_progress;
        rc = instar_rebase(top, &o, &err);
        printf("safe rc=%d calls=%d last=%.2f\n", rc, calls, last);
    }
    {   /* options_init, an older caller's struct_size (no progress, no key_secret): unsafe removal */
        instar_rebase_options_t o;
        instar_rebase_options_init(&o);
        o.struct_size = (uint32_t)offsetof(instar_rebase_options_t, progress);
        o.flags = INSTAR_REBASE_UNSAFE;
        o.backing_file = "";
        rc = instar_rebase(top2, &o, &err);
        printf("unsafe rc=%d\n", rc);
    }
    {   /* cancellation: the image keeps its old backing file and contents */
        instar_rebase_options_t o = INSTAR_REBASE_OPTIONS_INIT;
        o.backing_file = "";
        o.progress = cancel_at_half;
        rc = instar_rebase(top3, &o, &err);
        printf("cancel rc=%d code=%d msg=%s\n", rc, err.code, err.message);
    }
    {   /* errors carry qemu-img's messages */
        instar_rebase_options_t o = INSTAR_REBASE_OPTIONS_INIT;
        rc = instar_rebase(top, &o, &err);
        printf("nob rc=%d msg=%s\n", rc, err.message);
        o.backing_file = "nothere.qcow2";
        o.backing_format = "qcow2";
        rc = instar_rebase(top, &o, &err);
        printf("missing-backing rc=%d msg=%s\n", rc, err.message);
        rc = instar_rebase(missing, &o, &err);
        printf("missing-image rc=%d\n", rc);
        o.backing_format = NULL;
        o.flags = INSTAR_REBASE_UNSAFE;
        rc = instar_rebase(top, &o, &err);
        printf("nofmt rc=%d msg=%s\n", rc, err.message);
        rc = instar_rebase(top, NULL, NULL);
        printf("null rc=%d\n", rc);
    }
    return 0;
}
