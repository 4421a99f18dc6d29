/*
 * abi_test.c - calls every function of include/instar.h at least once, from C (c99 -pedantic) and from C++.
 *
 * Usage: abi_test DIR
 * Makes its images in DIR with the library itself and leaves files there that Tests/diff/test_capi_c.py
 * compares with qemu-img: info.json (instar_info_json), info.txt (instar_info_human), check.json
 * (instar_check_json), map.txt (instar_map, one "start length depth present zero data offset" line per
 * entry), a.qcow2 / b.raw (written and converted through the library), measure.txt, compare.txt, r.raw
 * (created at 1 MiB, grown by 1 MiB) and c.qcow2 (amended to lazy_refcounts=on).
 * Prints "version V", then "ok N checks, 0 failed" and exits 0 when every check passed; prints "FAIL ..." lines and exits 1 otherwise.
 */
#include <instar.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int checks;
static int failures;

#define CHECK(cond)                                                                                    \
    do {                                                                                               \
        checks++;                                                                                      \
        if (!(cond)) {                                                                                 \
            failures++;                                                                                \
            printf("FAIL %s:%d: %s (last error: %d %s)\n", __FILE__, __LINE__, #cond, (int)err.code,  \
                   err.message);                                                                       \
        }                                                                                              \
    } while (0)

static instar_error_t err;

static char dir[3000];

static const char *path(const char *name) {
    static char buf[4][4096];
    static int next;
    char *p = buf[next++ % 4];
    snprintf(p, sizeof buf[0], "%s/%s", dir, name);
    return p;
}

static int write_file(const char *name, const char *text) {
    FILE *f = fopen(path(name), "w");
    if (!f) return -1;
    fputs(text, f);
    return fclose(f);
}

static int cancel_progress(double percent, void *data) {
    (void)percent;
    ++*(int *)data;
    return 1;
}

static void count_warning(const char *message, void *data) {
    if (strncmp(message, "WARNING: Image format was not specified for ", 44) == 0) ++*(int *)data;
}

static int count_progress(double percent, void *data) {
    (void)percent;
    ++*(int *)data;
    return 0;
}

int main(int argc, char **argv) {
    const uint64_t size = 4u << 20;
    static unsigned char buf[65536];
    instar_image_t *img = NULL;
    uint64_t got = 0;
    size_t i;
    FILE *f;

    if (argc != 2 || strlen(argv[1]) >= sizeof dir) {
        fprintf(stderr, "usage: abi_test DIR\n");
        return 2;
    }
    strcpy(dir, argv[1]);

    printf("version %s\n", instar_version());

    /* ---- version, strerror, frees with NULL ---- */
    CHECK(instar_version() != NULL && strchr(instar_version(), '.') != NULL);
    CHECK(strcmp(instar_strerror(INSTAR_OK), "success") == 0);
    CHECK(strlen(instar_strerror(INSTAR_E_ENCRYPTED)) > 0);
    CHECK(strcmp(instar_strerror(12345), "unknown error") == 0);
    instar_string_free(NULL);
    instar_close(NULL);
    instar_info_free(NULL);
    instar_map_free(NULL);

    /* ---- the init functions agree with the INIT macros ---- */
    {
        instar_open_options_t m = INSTAR_OPEN_OPTIONS_INIT, o;
        memset(&o, 0xff, sizeof o);
        instar_open_options_init(&o);
        CHECK(o.struct_size == m.struct_size && o.struct_size == sizeof o && o.flags == 0 && o.format == NULL
              && o.key_secret == NULL && o.backing_key_secret == NULL);
    }
    {
        instar_info_options_t m = INSTAR_INFO_OPTIONS_INIT, o;
        memset(&o, 0xff, sizeof o);
        instar_info_options_init(&o);
        CHECK(o.struct_size == m.struct_size && o.open_flags == 0 && o.format == NULL && o.backing_chain == 0
              && o.key_secret == NULL && o.backing_key_secret == NULL);
    }
    {
        instar_map_options_t m = INSTAR_MAP_OPTIONS_INIT, o;
        memset(&o, 0xff, sizeof o);
        instar_map_options_init(&o);
        CHECK(o.struct_size == m.struct_size && o.start_offset == 0 && o.max_length == m.max_length
              && o.max_length == -1 && o.key_secret == NULL && o.backing_key_secret == NULL);
    }
    {
        instar_compare_options_t m = INSTAR_COMPARE_OPTIONS_INIT, o;
        memset(&o, 0xff, sizeof o);
        instar_compare_options_init(&o);
        CHECK(o.struct_size == m.struct_size && o.strict == 0 && o.progress == NULL && o.key_secret1 == NULL
              && o.key_secret2 == NULL && o.backing_key_secret1 == NULL && o.backing_key_secret2 == NULL);
    }
    {
        instar_convert_options_t m = INSTAR_CONVERT_OPTIONS_INIT, o;
        memset(&o, 0xff, sizeof o);
        instar_convert_options_init(&o);
        CHECK(o.struct_size == m.struct_size && o.flags == 0 && o.sparse_size == m.sparse_size
              && o.target_format == NULL && o.progress == NULL && o.backing_key_secret == NULL);
    }
    {
        instar_create_options_t m = INSTAR_CREATE_OPTIONS_INIT, o;
        memset(&o, 0xff, sizeof o);
        instar_create_options_init(&o);
        CHECK(o.struct_size == m.struct_size && o.size == -1 && o.options == NULL && o.key_secret == NULL);
    }
    {
        instar_measure_options_t m = INSTAR_MEASURE_OPTIONS_INIT, o;
        memset(&o, 0xff, sizeof o);
        instar_measure_options_init(&o);
        CHECK(o.struct_size == m.struct_size && o.size == -1 && o.output_format == NULL && o.key_secret == NULL);
    }
    {
        instar_check_options_t m = INSTAR_CHECK_OPTIONS_INIT, o;
        memset(&o, 0xff, sizeof o);
        instar_check_options_init(&o);
        CHECK(o.struct_size == m.struct_size && o.repair == 0 && o.key_secret == NULL);
    }
    {
        instar_resize_options_t m = INSTAR_RESIZE_OPTIONS_INIT, o;
        memset(&o, 0xff, sizeof o);
        instar_resize_options_init(&o);
        CHECK(o.struct_size == m.struct_size && o.flags == 0 && o.preallocation == NULL && o.key_secret == NULL);
    }
    {
        instar_amend_options_t m = INSTAR_AMEND_OPTIONS_INIT, o;
        memset(&o, 0xff, sizeof o);
        instar_amend_options_init(&o);
        CHECK(o.struct_size == m.struct_size && o.force == 0 && o.options == NULL && o.key_secret == NULL);
    }

    /* ---- an older, smaller struct: init writes only the caller's size (sized entry) or 0.1.0's (legacy) ---- */
#define OLDER_CALLER(name)                                                                                 \
    do {                                                                                                   \
        union { unsigned char b[512]; uint64_t align; } u;                                                 \
        size_t k, untouched = 1;                                                                           \
        memset(u.b, 0xab, sizeof u.b);                                                                     \
        CHECK(instar_##name##_options_init_sized((instar_##name##_options_t *)(void *)u.b, 8) == INSTAR_OK); \
        for (k = 8; k < sizeof u.b; k++) untouched &= u.b[k] == 0xab;                                      \
        CHECK(untouched && ((instar_##name##_options_t *)(void *)u.b)->struct_size == 8);                  \
        memset(u.b, 0xab, sizeof u.b);                                                                     \
        CHECK(instar_##name##_options_init_sized((instar_##name##_options_t *)(void *)u.b, 3) == INSTAR_E_INVALID); \
        CHECK(instar_##name##_options_init_sized(NULL, 64) == INSTAR_E_INVALID);                           \
        CHECK(instar_##name##_options_init_sized((instar_##name##_options_t *)(void *)u.b, 500) == INSTAR_OK); \
        for (k = sizeof(instar_##name##_options_t), untouched = 1; k < sizeof u.b; k++)                     \
            untouched &= u.b[k] == 0xab;                                                                   \
        CHECK(untouched && ((instar_##name##_options_t *)(void *)u.b)->struct_size                         \
                               == sizeof(instar_##name##_options_t));                                      \
        memset(u.b, 0xab, sizeof u.b);                                                                     \
        (instar_##name##_options_init)((instar_##name##_options_t *)(void *)u.b);                          \
        for (k = sizeof(instar_##name##_options_t), untouched = 1; k < sizeof u.b; k++)                     \
            untouched &= u.b[k] == 0xab;                                                                   \
        CHECK(untouched && ((instar_##name##_options_t *)(void *)u.b)->struct_size                         \
                               <= sizeof(instar_##name##_options_t));                                      \
    } while (0)
    OLDER_CALLER(open);
    OLDER_CALLER(info);
    OLDER_CALLER(map);
    OLDER_CALLER(compare);
    OLDER_CALLER(convert);
    OLDER_CALLER(create);
    OLDER_CALLER(measure);
    OLDER_CALLER(check);
    OLDER_CALLER(resize);
    OLDER_CALLER(amend);
    OLDER_CALLER(commit);
    OLDER_CALLER(rebase);
    OLDER_CALLER(bitmap);
    OLDER_CALLER(dd);
    OLDER_CALLER(bench);
    OLDER_CALLER(snapshot);
    OLDER_CALLER(probe);
#undef OLDER_CALLER

    /* ---- create (NULL error struct), then write through a read/write handle ---- */
    {
        instar_create_options_t co = INSTAR_CREATE_OPTIONS_INIT;
        co.format = "qcow2";
        co.size = (int64_t)size;
        CHECK(instar_create(path("a.qcow2"), &co, NULL) == INSTAR_OK);
        co.format = "no-such-format";
        CHECK(instar_create(path("bad.img"), &co, &err) == INSTAR_E_INVALID);
        CHECK(strstr(err.message, "Unknown file format 'no-such-format'") != NULL);
        CHECK(instar_create(NULL, &co, &err) == INSTAR_E_INVALID);
    }
    /* ---- create_formatting: the same creation, and the line qemu-img create prints ---- */
    {
        instar_create_options_t co = INSTAR_CREATE_OPTIONS_INIT;
        char *line = NULL;
        co.format = "qcow2";
        co.size = (int64_t)size;
        CHECK(instar_create_formatting(path("f.qcow2"), &co, &line, &err) == INSTAR_OK);
        CHECK(line != NULL && strncmp(line, "Formatting '", 12) == 0 && strstr(line, "fmt=qcow2 ") != NULL &&
              line[strlen(line) - 1] == '\n');
        instar_string_free(line);
        CHECK(instar_create_formatting(path("f.qcow2"), &co, NULL, &err) == INSTAR_E_INVALID);
        co.format = "no-such-format";
        line = NULL;
        CHECK(instar_create_formatting(path("bad.img"), &co, &line, &err) == INSTAR_E_INVALID && line == NULL);
    }
    {
        instar_open_options_t oo = INSTAR_OPEN_OPTIONS_INIT;
        oo.flags = INSTAR_OPEN_READ_WRITE;
        CHECK(instar_open(path("a.qcow2"), &oo, &img, &err) == INSTAR_OK);
        CHECK(instar_get_size(img, &got, &err) == INSTAR_OK && got == size);
        memset(buf, 0x5a, sizeof buf);
        CHECK(instar_write(img, buf, sizeof buf, 0, &err) == INSTAR_OK);
        memset(buf, 0xa5, 4096);
        CHECK(instar_write(img, buf, 4096, 1u << 20, &err) == INSTAR_OK);
        CHECK(instar_write(img, buf, 4096, size - 512, &err) == INSTAR_E_RANGE);
        CHECK(instar_write_zeroes(img, 65536, 2u << 20, 0, &err) == INSTAR_OK);
        CHECK(instar_write(img, buf, 65536, 3u << 20, &err) == INSTAR_OK);
        CHECK(instar_discard(img, 65536, 3u << 20, &err) == INSTAR_OK);
        CHECK(instar_write_zeroes(img, 65536, 0, INSTAR_ZERO_MAY_UNMAP, NULL) == INSTAR_OK);
        memset(buf, 0x5a, sizeof buf);
        CHECK(instar_write(img, buf, sizeof buf, 0, NULL) == INSTAR_OK);
        CHECK(instar_flush(img, &err) == INSTAR_OK);
        instar_close(img);
        img = NULL;
    }

    /* ---- open errors, reading ---- */
    {
        instar_open_options_t oo = INSTAR_OPEN_OPTIONS_INIT;
        CHECK(instar_open(NULL, &oo, &img, &err) == INSTAR_E_INVALID);
        CHECK(instar_open(path("a.qcow2"), &oo, NULL, &err) == INSTAR_E_INVALID);
        CHECK(instar_open(path("missing.qcow2"), &oo, &img, &err) == INSTAR_E_NOT_FOUND && img == NULL);
        CHECK(strstr(err.message, "No such file or directory") != NULL && err.errno_value != 0);
        CHECK(instar_open(path("missing.qcow2"), NULL, &img, NULL) == INSTAR_E_NOT_FOUND);
        oo.struct_size = 0;
        CHECK(instar_open(path("a.qcow2"), &oo, &img, &err) == INSTAR_E_INVALID);
        oo.struct_size = sizeof oo;
        oo.format = "raw";
        CHECK(instar_open(path("a.qcow2"), &oo, &img, &err) == INSTAR_OK);
        CHECK(instar_get_size(img, &got, &err) == INSTAR_OK && got < size);
        instar_close(img);
        oo.format = NULL;
        CHECK(instar_open(path("a.qcow2"), NULL, &img, &err) == INSTAR_OK);
        CHECK(instar_read(img, buf, sizeof buf, 0, &err) == INSTAR_OK);
        for (i = 0; i < sizeof buf && buf[i] == 0x5a; i++) {
        }
        CHECK(i == sizeof buf);
        CHECK(instar_read(img, buf, 4096, 1u << 20, &err) == INSTAR_OK && buf[0] == 0xa5 && buf[4095] == 0xa5);
        CHECK(instar_read(img, buf, 4096, size - 512, &err) == INSTAR_E_RANGE);
        CHECK(instar_read(img, NULL, 1, 0, &err) == INSTAR_E_INVALID);
        CHECK(instar_write(img, buf, 512, 0, &err) == INSTAR_E_PERMISSION);
        CHECK(instar_write_zeroes(img, 512, 0, 0, &err) == INSTAR_E_PERMISSION);
        CHECK(instar_discard(img, 65536, 0, &err) == INSTAR_E_PERMISSION);
        CHECK(instar_get_size(img, NULL, &err) == INSTAR_E_INVALID);
        {
            /* a.qcow2: 0x5a data from 0, a written 4 KiB at 1 MiB, zero clusters at 2 MiB, the rest unallocated */
            instar_block_status_t st = INSTAR_BLOCK_STATUS_INIT;
            instar_block_status_t small = INSTAR_BLOCK_STATUS_INIT;
            CHECK(instar_block_status(img, 0, size, &st, &err) == INSTAR_OK);
            CHECK(st.struct_size == sizeof st && st.length >= sizeof buf && st.length <= size && st.depth == 0);
            CHECK(st.flags == (INSTAR_STATUS_ALLOCATED | INSTAR_STATUS_DATA));
            CHECK(instar_block_status(img, 2u << 20, 65536, &st, NULL) == INSTAR_OK);
            CHECK(st.length == 65536 && (st.flags & INSTAR_STATUS_ZERO) && !(st.flags & INSTAR_STATUS_DATA));
            CHECK(instar_block_status(img, size - 512, 512, &st, &err) == INSTAR_OK);
            CHECK(st.length == 512 && (st.flags & INSTAR_STATUS_EOF) && (st.flags & INSTAR_STATUS_ZERO));
            small.struct_size = 8;
            small.length = 7;
            CHECK(instar_block_status(img, 0, 512, &small, &err) == INSTAR_OK);
            CHECK(small.struct_size == 8 && small.flags != 0 && small.length == 7);
            CHECK(instar_block_status(img, 0, 0, &st, &err) == INSTAR_E_RANGE);
            CHECK(instar_block_status(img, size - 512, 1024, &st, &err) == INSTAR_E_RANGE);
            CHECK(instar_block_status(img, 0, 512, NULL, &err) == INSTAR_E_INVALID);
            small.struct_size = 0;
            CHECK(instar_block_status(img, 0, 512, &small, &err) == INSTAR_E_INVALID);
            CHECK(instar_block_status(NULL, 0, 512, &st, &err) == INSTAR_E_INVALID);
        }
        instar_close(img);
        img = NULL;
        CHECK(instar_read(NULL, buf, 1, 0, &err) == INSTAR_E_INVALID);
        CHECK(instar_get_size(NULL, &got, &err) == INSTAR_E_INVALID);
        CHECK(instar_flush(NULL, &err) == INSTAR_E_INVALID);
    }

    /* ---- info ---- */
    {
        instar_info_options_t io = INSTAR_INFO_OPTIONS_INIT;
        instar_info_t *info = NULL;
        char *text = NULL;
        CHECK(instar_info(path("a.qcow2"), &io, &info, &err) == INSTAR_OK && info != NULL);
        if (info) {
            CHECK(strcmp(info->format, "qcow2") == 0 && info->virtual_size == (int64_t)size);
            CHECK(info->cluster_size == 65536 && info->backing == NULL && info->encrypted == INSTAR_UNSET);
            CHECK(info->specific_type && strcmp(info->specific_type, "qcow2") == 0 && strcmp(info->compat, "1.1") == 0);
        }
        instar_info_free(info);
        CHECK(instar_info(path("missing"), NULL, &info, NULL) == INSTAR_E_NOT_FOUND);
        CHECK(instar_info(path("a.qcow2"), &io, NULL, &err) == INSTAR_E_INVALID);
        CHECK(instar_info_json(path("a.qcow2"), &io, &text, &err) == INSTAR_OK && text != NULL);
        if (text) CHECK(write_file("info.json", text) == 0);
        instar_string_free(text);
        text = NULL;
        CHECK(instar_info_human(path("a.qcow2"), NULL, &text, &err) == INSTAR_OK && text != NULL);
        if (text) CHECK(write_file("info.txt", text) == 0);
        instar_string_free(text);
        CHECK(instar_info_json(path("missing"), &io, &text, &err) == INSTAR_E_NOT_FOUND);
    }

    /* ---- map ---- */
    {
        instar_map_options_t mo = INSTAR_MAP_OPTIONS_INIT;
        instar_map_t *map = NULL;
        CHECK(instar_map(path("a.qcow2"), &mo, &map, &err) == INSTAR_OK && map != NULL && map->count > 0);
        f = fopen(path("map.txt"), "w");
        CHECK(f != NULL);
        if (map && f) {
            for (i = 0; i < map->count; i++) {
                const instar_map_entry_t *e = &map->entries[i];
                fprintf(f, "%llu %llu %d %d %d %d %lld\n", (unsigned long long)e->start, (unsigned long long)e->length,
                        (int)e->depth, (int)e->present, (int)e->zero, (int)e->data,
                        e->has_offset ? (long long)e->offset : -1LL);
                CHECK(!e->has_offset || (e->filename != NULL && strstr(e->filename, "a.qcow2") != NULL));
            }
        }
        if (f) fclose(f);
        instar_map_free(map);
        map = NULL;
        mo.max_length = 65536;
        mo.start_offset = 1u << 20;
        CHECK(instar_map(path("a.qcow2"), &mo, &map, NULL) == INSTAR_OK && map && map->count == 1
              && map->entries[0].start == (1u << 20) && map->entries[0].length == 65536);
        instar_map_free(map);
        map = NULL;
        CHECK(instar_map(path("missing"), &mo, &map, &err) == INSTAR_E_NOT_FOUND && map == NULL);
    }

    /* ---- convert and compare ---- */
    {
        instar_convert_options_t vo = INSTAR_CONVERT_OPTIONS_INIT;
        instar_compare_options_t cmp = INSTAR_COMPARE_OPTIONS_INIT;
        instar_compare_result_t res;
        int calls = 0;
        CHECK(instar_convert(path("a.qcow2"), path("b.raw"), &vo, &err) == INSTAR_OK);
        vo.target_format = "nope";
        CHECK(instar_convert(path("a.qcow2"), path("c.img"), &vo, &err) == INSTAR_E_INVALID);
        vo.target_format = NULL;
        vo.progress = cancel_progress;
        vo.progress_data = &calls;
        CHECK(instar_convert(path("a.qcow2"), path("d.raw"), &vo, &err) == INSTAR_E_CANCELLED && calls > 0);
        CHECK(instar_convert(path("missing"), path("e.raw"), NULL, &err) == INSTAR_E_NOT_FOUND);

        memset(&res, 0, sizeof res);
        res.struct_size = sizeof res;
        calls = 0;
        cmp.progress = count_progress;
        cmp.progress_data = &calls;
        CHECK(instar_compare(path("a.qcow2"), path("b.raw"), &cmp, &res, &err) == INSTAR_OK);
        CHECK(res.identical == 1 && res.size_mismatch == 0 && res.mismatch_offset == -1 && calls > 0);
        CHECK(write_file("compare.txt", res.message) == 0);
        cmp.strict = 1;
        CHECK(instar_compare(path("a.qcow2"), path("b.raw"), &cmp, &res, NULL) == INSTAR_OK);
        CHECK(instar_compare(path("a.qcow2"), path("b.raw"), &cmp, NULL, &err) == INSTAR_E_INVALID);
        CHECK(instar_compare(path("a.qcow2"), path("missing"), NULL, &res, &err) == INSTAR_E_NOT_FOUND);
        /* a failed compare still reports qemu-img compare's exit status and stderr line */
        CHECK(res.exit_status == 2 && strcmp(res.error_message, err.message) == 0);
        cmp.strict = 0;
        CHECK(instar_compare(path("a.qcow2"), path("b.raw"), &cmp, &res, &err) == INSTAR_OK);
        CHECK(res.exit_status == 0 && res.error_message[0] == '\0');
    }

    /* ---- warnings: rebase and bitmap hand back the probed-raw warning, then fail on raw ---- */
    {
        instar_rebase_options_t ro = INSTAR_REBASE_OPTIONS_INIT;
        instar_bitmap_options_t bo = INSTAR_BITMAP_OPTIONS_INIT;
        instar_bitmap_action_t add = { INSTAR_BITMAP_ADD, 0, NULL };
        int warnings = 0;
        ro.flags = INSTAR_REBASE_UNSAFE;
        ro.backing_file = "x.qcow2";
        ro.backing_format = "qcow2";
        ro.warning = count_warning;
        ro.warning_data = &warnings;
        CHECK(instar_rebase(path("b.raw"), &ro, &err) == INSTAR_E_UNSUPPORTED && warnings == 1);
        bo.warning = count_warning;
        bo.warning_data = &warnings;
        CHECK(instar_bitmap(path("b.raw"), "b0", &add, 1, &bo, &err) != INSTAR_OK && warnings == 2);
    }

    /* ---- create: size_text, the size operand as qemu-img create takes it ---- */
    {
        instar_create_options_t co = INSTAR_CREATE_OPTIONS_INIT;
        char *line = NULL;
        co.format = "raw";
        co.size_text = "1k";
        CHECK(instar_create_formatting(path("fmt.raw"), &co, &line, &err) == INSTAR_OK && line != NULL);
        if (line) CHECK(write_file("formatting.txt", line) == 0);
        instar_string_free(line);
        line = NULL;
        co.size_text = "1Q";
        CHECK(instar_create_formatting(path("nosize.raw"), &co, &line, &err) == INSTAR_E_INVALID && line == NULL);
    }

    /* ---- measure ---- */
    {
        instar_measure_options_t mo = INSTAR_MEASURE_OPTIONS_INIT;
        instar_measure_result_t mr;
        memset(&mr, 0, sizeof mr);
        mr.struct_size = sizeof mr;
        mo.output_format = "qcow2";
        CHECK(instar_measure(path("a.qcow2"), &mo, &mr, &err) == INSTAR_OK && mr.required > 0);
        f = fopen(path("measure.txt"), "w");
        CHECK(f != NULL);
        if (f) {
            fprintf(f, "%llu %llu\n", (unsigned long long)mr.required, (unsigned long long)mr.fully_allocated);
            fclose(f);
        }
        mo.size = 1;
        CHECK(instar_measure(path("a.qcow2"), &mo, &mr, &err) == INSTAR_E_INVALID);
        CHECK(instar_measure(NULL, NULL, &mr, &err) == INSTAR_E_INVALID);
        CHECK(instar_measure(path("a.qcow2"), &mo, NULL, &err) == INSTAR_E_INVALID);
    }

    /* ---- check ---- */
    {
        instar_check_options_t ko = INSTAR_CHECK_OPTIONS_INIT;
        instar_check_result_t kr;
        char *json = NULL;
        memset(&kr, 0, sizeof kr);
        kr.struct_size = sizeof kr;
        CHECK(instar_check(path("a.qcow2"), &ko, &kr, &err) == INSTAR_OK && kr.exit_code == 0 && kr.corruptions == -1);
        CHECK(kr.total_clusters == (int64_t)(size / 65536) && kr.allocated_clusters > 0);
        CHECK(instar_check_json(path("a.qcow2"), &ko, &json, &err) == INSTAR_OK && json != NULL);
        if (json) CHECK(write_file("check.json", json) == 0);
        instar_string_free(json);
        CHECK(instar_check(path("b.raw"), &ko, &kr, &err) == INSTAR_E_UNSUPPORTED);
        CHECK(instar_check(path("a.qcow2"), &ko, NULL, &err) == INSTAR_E_INVALID);
        CHECK(instar_check_json(path("missing"), NULL, &json, NULL) == INSTAR_E_NOT_FOUND);
    }
    /* ---- check_report: counters, JSON and stderr lines of one check ---- */
    {
        instar_check_options_t ko = INSTAR_CHECK_OPTIONS_INIT;
        instar_check_result_t kr;
        char *json = NULL, *messages = NULL;
        memset(&kr, 0, sizeof kr);
        kr.struct_size = sizeof kr;
        CHECK(instar_check_report(path("a.qcow2"), &ko, &kr, &json, &messages, &err) == INSTAR_OK);
        CHECK(kr.exit_code == 0 && json != NULL && json[0] == '{' && messages != NULL && messages[0] == 0);
        instar_string_free(json);
        instar_string_free(messages);
        CHECK(instar_check_report(path("a.qcow2"), &ko, NULL, NULL, NULL, &err) == INSTAR_OK);
        json = messages = NULL;
        CHECK(instar_check_report(path("missing"), &ko, &kr, &json, &messages, &err) == INSTAR_E_NOT_FOUND);
        CHECK(json == NULL && messages == NULL);
    }

    /* ---- resize and amend ---- */
    {
        instar_resize_options_t ro = INSTAR_RESIZE_OPTIONS_INIT;
        instar_amend_options_t ao = INSTAR_AMEND_OPTIONS_INIT;
        instar_create_options_t co = INSTAR_CREATE_OPTIONS_INIT;
        int calls = 0;
        co.size = 1 << 20;
        CHECK(instar_create(path("r.raw"), &co, &err) == INSTAR_OK);
        co.format = "qcow2";
        co.options = "compat=1.1,cluster_size=4096";
        CHECK(instar_create(path("c.qcow2"), &co, &err) == INSTAR_OK);
        ro.format = "raw";
        ro.flags = INSTAR_RESIZE_RELATIVE;
        CHECK(instar_resize(path("r.raw"), 1 << 20, &ro, &err) == INSTAR_OK);
        ro.flags = 0;
        CHECK(instar_resize(path("r.raw"), 1 << 20, &ro, &err) == INSTAR_E_INVALID);
        CHECK(strstr(err.message, "--shrink") != NULL);
        ro.format = NULL;
        CHECK(instar_resize(path("a.qcow2"), 1000, &ro, &err) == INSTAR_E_INVALID);
        CHECK(instar_resize(path("missing"), 1 << 20, NULL, &err) == INSTAR_E_NOT_FOUND);

        CHECK(instar_amend(path("c.qcow2"), &ao, &err) == INSTAR_E_INVALID);
        ao.options = "lazy_refcounts=on";
        ao.progress = count_progress;
        ao.progress_data = &calls;
        CHECK(instar_amend(path("c.qcow2"), &ao, &err) == INSTAR_OK);
        ao.options = "no_such_option=1";
        CHECK(instar_amend(path("c.qcow2"), &ao, NULL) == INSTAR_E_INVALID);
    }

    /* ---- commit ---- */
    {
        instar_create_options_t co = INSTAR_CREATE_OPTIONS_INIT;
        instar_commit_options_t mo = INSTAR_COMMIT_OPTIONS_INIT;
        int calls = 0;
        co.format = "qcow2";
        co.size = 1 << 20;
        CHECK(instar_create(path("cb.qcow2"), &co, &err) == INSTAR_OK);
        co.size = -1;
        co.backing_file = "cb.qcow2";
        co.backing_format = "qcow2";
        CHECK(instar_create(path("ct.qcow2"), &co, &err) == INSTAR_OK);
        mo.progress = count_progress;
        mo.progress_data = &calls;
        CHECK(instar_commit(path("ct.qcow2"), &mo, &err) == INSTAR_OK && calls > 0);
        mo.base = "nothere";
        CHECK(instar_commit(path("ct.qcow2"), &mo, &err) == INSTAR_E_NOT_FOUND);
        instar_commit_options_init(&mo);
        CHECK(instar_commit(path("cb.qcow2"), &mo, &err) == INSTAR_E_CHAIN);
        CHECK(instar_commit(NULL, NULL, NULL) == INSTAR_E_INVALID);
    }

    /* ---- inspect: the format from content and the policy's violations ---- */
    {
        instar_inspect_policy_t po;
        instar_inspect_report_t *rep = NULL;
        unsigned char small[16];
        memset(small, 0xab, sizeof small);
        CHECK(instar_inspect_policy_init_sized((instar_inspect_policy_t *)(void *)small, 8) == INSTAR_OK);
        CHECK(small[0] == 8 && small[4] == 0 && small[8] == 0xab && small[15] == 0xab);
        CHECK(instar_inspect_policy_init(&po) == INSTAR_OK);
        CHECK(po.struct_size == sizeof po && po.preset == INSTAR_INSPECT_PRESET_GLANCE && po.fatal == 0
              && po.max_virtual_size == 0 && po.max_vmdk_extents == 0 && po.declared_format == NULL);
        CHECK(instar_inspect(path("ct.qcow2"), &po, &rep, &err) == INSTAR_E_POLICY && rep != NULL);
        if (rep) {
            CHECK(strcmp(rep->format, "qcow2") == 0 && rep->fatal && rep->count >= 1 && rep->virtual_size == 1 << 20);
            CHECK(rep->violations[0].code == INSTAR_INSPECT_BACKING_FILE && rep->violations[0].fatal
                  && rep->violations[0].offset == 8);
            CHECK(strcmp(err.message, rep->violations[0].message) == 0);
        }
        instar_inspect_report_free(rep);
        rep = NULL;
        po.fatal = INSTAR_INSPECT_FATAL_NONE;
        CHECK(instar_inspect(path("ct.qcow2"), &po, &rep, &err) == INSTAR_OK && rep != NULL && !rep->fatal);
        instar_inspect_report_free(rep);
        rep = NULL;
        po.fatal = INSTAR_INSPECT_FATAL_PRESET;
        po.preset = INSTAR_INSPECT_PRESET_PVE;
        po.declared_format = "raw";
        CHECK(instar_inspect(path("cb.qcow2"), &po, &rep, &err) == INSTAR_E_POLICY && rep != NULL);
        if (rep) CHECK(rep->count == 1 && rep->violations[0].code == INSTAR_INSPECT_FORMAT_MISMATCH
                       && strcmp(rep->preset, "pve") == 0);
        instar_inspect_report_free(rep);
        rep = NULL;
        CHECK(instar_inspect(path("nothere"), NULL, &rep, &err) == INSTAR_E_NOT_FOUND && rep == NULL);
        CHECK(instar_inspect(NULL, NULL, &rep, NULL) == INSTAR_E_INVALID);
        CHECK(strcmp(instar_inspect_code_name(INSTAR_INSPECT_VMDK_DEVICE), "vmdk-device") == 0);
        CHECK(instar_inspect_code_name(999) == NULL);
        CHECK(strlen(instar_strerror(INSTAR_E_POLICY)) > 0);
    }

    /* qemu's --object for library callers: add, a duplicate id, an unknown type, delete. */
    {
        CHECK(instar_object_add("secret,id=abisec,data=pw", &err) == INSTAR_OK);
        CHECK(instar_object_add("secret,id=abisec,data=pw", &err) == INSTAR_E_INVALID
              && strcmp(err.message, "attempt to add duplicate property 'abisec' to object (type 'container')") == 0);
        CHECK(instar_object_add("nosuchtype,id=x", &err) == INSTAR_E_INVALID
              && strcmp(err.message, "Parameter 'qom-type' does not accept value 'nosuchtype'") == 0);
        CHECK(instar_object_add(NULL, NULL) == INSTAR_E_INVALID);
        CHECK(instar_object_del("abisec", &err) == INSTAR_OK);
        CHECK(instar_object_del("abisec", &err) == INSTAR_E_NOT_FOUND);
    }

    printf("%s %d checks, %d failed\n", failures ? "FAIL" : "ok", checks, failures);
    return failures ? 1 : 0;
}
