/* instar_bitmap and instar_dd from C: argv[1] is a folder holding x.qcow2 (bitmaps b1, b2), s.qcow2 (bitmap
 * sb) and in.qcow2. Prints one line per call: "name rc code message". */
#include <stdio.h>
#include <string.h>

#include "instar.h"

static int calls;

static int cancel_at_half(double percent, void *data) {
    (void)data;
    calls++;
    return percent >= 50.0;
}

static void report(const char *what, int rc, const instar_error_t *err) {
    printf("%s %d %d %s\n", what, rc, rc ? (int)err->code : 0, rc ? err->message : "");
}

int main(int argc, char **argv) {
    char x[4096], s[4096], in[4096], out[4096], out2[4096], out3[4096];
    instar_error_t err;
    int rc;
    if (argc < 2) return 2;
    snprintf(x, sizeof x, "%s/x.qcow2", argv[1]);
    snprintf(s, sizeof s, "%s/s.qcow2", argv[1]);
    snprintf(in, sizeof in, "%s/in.qcow2", argv[1]);
    snprintf(out, sizeof out, "%s/dd.qcow2", argv[1]);
    snprintf(out2, sizeof out2, "%s/dd.raw", argv[1]);
    snprintf(out3, sizeof out3, "%s/cancel.raw", argv[1]);

    {
        /* --add -g 4k --merge b1 on "nb", then --merge sb -b s.qcow2, then --disable. */
        instar_bitmap_options_t o = INSTAR_BITMAP_OPTIONS_INIT;
        instar_bitmap_action_t acts[3];
        memset(acts, 0, sizeof acts);
        acts[0].action = INSTAR_BITMAP_ADD;
        acts[1].action = INSTAR_BITMAP_MERGE;
        acts[1].merge_source = "b1";
        acts[2].action = INSTAR_BITMAP_DISABLE;
        o.granularity = 4096;
        rc = instar_bitmap(x, "nb", acts, 3, &o, &err);
        report("bitmap-add-merge", rc, &err);
        instar_bitmap_options_init(&o);
        o.source_file = s;
        o.source_format = "qcow2";
        acts[0].action = INSTAR_BITMAP_MERGE;
        acts[0].merge_source = "sb";
        rc = instar_bitmap(x, "nb", acts, 1, &o, &err);
        report("bitmap-merge-source", rc, &err);
        acts[0].action = INSTAR_BITMAP_REMOVE;
        rc = instar_bitmap(x, "b2", acts, 1, NULL, &err);
        report("bitmap-remove", rc, &err);
        rc = instar_bitmap(x, "b2", acts, 1, NULL, &err);
        report("bitmap-remove-again", rc, &err);
        acts[0].action = INSTAR_BITMAP_ADD;
        rc = instar_bitmap(x, "b1", acts, 1, NULL, &err);
        report("bitmap-add-exists", rc, &err);
        rc = instar_bitmap(x, "b1", acts, 0, NULL, &err);
        report("bitmap-none", rc, &err);
    }
    {
        instar_dd_options_t o = INSTAR_DD_OPTIONS_INIT;
        o.output_format = "qcow2";
        o.block_size = 65536;
        o.count = 100;
        rc = instar_dd(in, out, &o, &err);
        report("dd-qcow2", rc, &err);
        instar_dd_options_init(&o);
        o.skip = 3;
        o.block_size = 1 << 20;
        rc = instar_dd(in, out2, &o, &err);
        report("dd-raw-skip", rc, &err);
        instar_dd_options_init(&o);
        o.progress = cancel_at_half;
        o.block_size = 4096;
        rc = instar_dd(in, out3, &o, &err);
        report("dd-cancel", rc, &err);
        o.progress = NULL;
        o.block_size = 0x80000000LL;
        rc = instar_dd(in, out3, &o, &err);
        report("dd-bad-bs", rc, &err);
    }
    printf("progress-calls %d\n", calls > 1);
    return 0;
}
