/*
 * Instar.xs - Perl bindings over libinstar's C API (include/instar.h).
 *
 * Every function takes its options as a hash reference whose keys are the C option fields (plus named
 * booleans for the flag bits) and returns Perl data built from the C result structs. Failures croak with an
 * Instar::Error object. 64-bit sizes become IVs/UVs, never NVs.
 */
#define PERL_NO_GET_CONTEXT
#include "EXTERN.h"
#include "perl.h"
#include "XSUB.h"

#include <pthread.h>
#include <string.h>
#include <instar.h>

/* ---- errors ---- */

/* Croaks with an Instar::Error; `output` (may be NULL) is what qemu-img printed on stdout before failing. */
static void
instar_croak_output(pTHX_ int rc, const instar_error_t *e, const char *output)
{
    HV *hv = newHV();
    SV *ref;
    int code = (e && e->code) ? e->code : rc;
    (void)hv_stores(hv, "code", newSViv(code));
    (void)hv_stores(hv, "errno", newSViv(e ? e->errno_value : 0));
    if (e && e->message[0])  /* bytes, as qemu-img writes them to stderr */
        (void)hv_stores(hv, "message", newSVpvn(e->message, strnlen(e->message, sizeof e->message)));
    else
        (void)hv_stores(hv, "message", newSVpv(instar_strerror(code), 0));
    if (output)
        (void)hv_stores(hv, "output", newSVpv(output, 0));
    ref = sv_bless(newRV_noinc((SV *)hv), gv_stashpvs("Instar::Error", GV_ADD));
    croak_sv(sv_2mortal(ref));
}

static void
instar_croak(pTHX_ int rc, const instar_error_t *e)
{
    instar_croak_output(aTHX_ rc, e, NULL);
}

#define CHECK(rc, err) do { if ((rc) != INSTAR_OK) instar_croak(aTHX_ (rc), &(err)); } while (0)

/* ---- options ---- */

static HV *
opts_hv(pTHX_ SV *sv)
{
    if (!sv || !SvOK(sv))
        return NULL;
    if (!SvROK(sv) || SvTYPE(SvRV(sv)) != SVt_PVHV)
        croak("Instar: options must be a hash reference");
    return (HV *)SvRV(sv);
}

static SV *
opt_sv(pTHX_ HV *hv, const char *key)
{
    SV **p;
    if (!hv)
        return NULL;
    p = hv_fetch(hv, key, (I32)strlen(key), 0);
    if (!p || !SvOK(*p))
        return NULL;
    return *p;
}

/* The string stays valid as long as the hash entry does (the whole call). */
/* Bytes as perl holds them (a file name is bytes; a character string gives its UTF-8 form), like the
 * positional const char * arguments. */
static const char *
opt_str(pTHX_ HV *hv, const char *key, const char *dflt)
{
    SV *sv = opt_sv(aTHX_ hv, key);
    return sv ? SvPV_nolen(sv) : dflt;
}

static int64_t
opt_i64(pTHX_ HV *hv, const char *key, int64_t dflt)
{
    SV *sv = opt_sv(aTHX_ hv, key);
    if (!sv)
        return dflt;
    if (SvIOK(sv) && SvIsUV(sv) && SvUVX(sv) > (UV)INT64_MAX)
        croak("Instar: option '%s' is out of range", key);
    if (!SvIOK(sv) && !looks_like_number(sv))
        croak("Instar: option '%s' must be an integer", key);
    return (int64_t)SvIV(sv);
}

static int
opt_bool(pTHX_ HV *hv, const char *key)
{
    SV *sv = opt_sv(aTHX_ hv, key);
    return sv ? (SvTRUE(sv) ? 1 : 0) : 0;
}

typedef struct { const char *key; uint32_t bit; } flag_name_t;

static uint32_t
opt_flags(pTHX_ HV *hv, const char *key, const flag_name_t *names)
{
    uint32_t f = (uint32_t)opt_i64(aTHX_ hv, key, 0);
    for (; names && names->key; names++)
        if (opt_bool(aTHX_ hv, names->key))
            f |= names->bit;
    return f;
}

/* Seconds (a Perl number, fractions allowed) as whole milliseconds; a positive value below 1 ms is 1 ms. */
static int64_t
opt_ms(pTHX_ HV *hv, const char *key)
{
    SV *sv = opt_sv(aTHX_ hv, key);
    NV sec;
    if (!sv)
        return 0;
    if (!looks_like_number(sv))
        croak("Instar: option '%s' must be a number of seconds", key);
    sec = SvNV(sv);
    if (!(sec > 0))
        return 0;
    if (sec > 9.0e12)
        return INT64_MAX;
    return sec * 1000.0 < 1.0 ? 1 : (int64_t)(sec * 1000.0);
}

/* The call's limits from `timeout` and `cpu_limit` (seconds) and `memory_limit` (bytes), in *lim; NULL when
 * none is set. */
static const instar_limits_t *
opt_limits(pTHX_ HV *hv, instar_limits_t *lim)
{
    instar_limits_t l = INSTAR_LIMITS_INIT;
    l.timeout_ms = opt_ms(aTHX_ hv, "timeout");
    l.cpu_ms = opt_ms(aTHX_ hv, "cpu_limit");
    l.memory_bytes = opt_i64(aTHX_ hv, "memory_limit", 0);
    if (l.memory_bytes < 0)
        croak("Instar: option 'memory_limit' must be a positive number of bytes");
    *lim = l;
    return l.timeout_ms > 0 || l.cpu_ms > 0 || l.memory_bytes > 0 ? lim : NULL;
}

static const flag_name_t open_flag_names[] = {
    { "read_write", INSTAR_OPEN_READ_WRITE }, { "force_share", INSTAR_OPEN_FORCE_SHARE },
    { "no_backing", INSTAR_OPEN_NO_BACKING }, { "no_cache", INSTAR_OPEN_NO_CACHE },
    { "isolated", INSTAR_OPEN_ISOLATED }, { NULL, 0 }
};

/* ---- progress: Perl code refs called on the calling thread only ---- */

typedef struct {
    SV *cb;                 /* the code ref, or NULL */
    pthread_t thread;       /* the thread that called the operation (and owns the interpreter) */
#ifdef MULTIPLICITY
    PerlInterpreter *perl;
#endif
    SV *error;              /* the exception the callback died with, or NULL */
    int cancelled;
    /* reports from another thread (the C API promises there are none) wait here for the calling thread */
    pthread_mutex_t lock;
    int has_pending;
    double pending;
} progress_t;

static int
progress_deliver(progress_t *p, double percent)
{
    int stop = 0;
    dTHXa(p->perl);
    dSP;
    int n;
    ENTER;
    SAVETMPS;
    PUSHMARK(SP);
    mXPUSHn(percent);
    PUTBACK;
    n = call_sv(p->cb, G_SCALAR | G_EVAL);
    SPAGAIN;
    if (SvTRUE(ERRSV)) {
        p->error = newSVsv(ERRSV);
        stop = 1;
    } else if (n > 0) {
        SV *r = POPs;
        stop = SvTRUE(r) ? 1 : 0;
    }
    PUTBACK;
    FREETMPS;
    LEAVE;
    return stop;
}

static int
progress_trampoline(double percent, void *data)
{
    progress_t *p = (progress_t *)data;
    double pending = 0;
    int has_pending;
    if (p->error || p->cancelled)
        return 1;
    if (!pthread_equal(pthread_self(), p->thread)) {
        /* Never enter Perl from a foreign thread: keep the latest value for the calling thread. */
        pthread_mutex_lock(&p->lock);
        p->has_pending = 1;
        p->pending = percent;
        pthread_mutex_unlock(&p->lock);
        return 0;
    }
    pthread_mutex_lock(&p->lock);
    has_pending = p->has_pending;
    pending = p->pending;
    p->has_pending = 0;
    pthread_mutex_unlock(&p->lock);
    if (has_pending && pending < percent && progress_deliver(p, pending)) {
        p->cancelled = 1;
        return 1;
    }
    if (progress_deliver(p, percent)) {
        p->cancelled = 1;
        return 1;
    }
    return 0;
}

static void
progress_init(pTHX_ progress_t *p, HV *hv)
{
    SV *cb = opt_sv(aTHX_ hv, "progress");
    memset(p, 0, sizeof *p);
    if (cb && !(SvROK(cb) && SvTYPE(SvRV(cb)) == SVt_PVCV))
        croak("Instar: option 'progress' must be a code reference");
    p->cb = cb;
    p->thread = pthread_self();
#ifdef MULTIPLICITY
    p->perl = aTHX;
#endif
    pthread_mutex_init(&p->lock, NULL);
}

/* After the C call: rethrow a callback's exception, deliver a last queued report, then the C result. */
static void
progress_finish(pTHX_ progress_t *p, int rc, const instar_error_t *err)
{
    pthread_mutex_destroy(&p->lock);
    if (p->error) {
        SV *e = sv_2mortal(p->error);
        p->error = NULL;
        croak_sv(e);
    }
    if (rc == INSTAR_OK && p->cb && p->has_pending)
        (void)progress_deliver(p, p->pending);
    if (p->error) {
        SV *e = sv_2mortal(p->error);
        p->error = NULL;
        croak_sv(e);
    }
    if (rc != INSTAR_OK)
        instar_croak(aTHX_ rc, err);
}

#define PROGRESS_FN(p) ((p)->cb ? progress_trampoline : NULL)

/* ---- result builders ---- */

static SV *
boolsv(pTHX_ int v)
{
    return newSVsv(get_sv(v ? "Instar::_TRUE" : "Instar::_FALSE", GV_ADD));
}

static SV *
u64sv(pTHX_ uint64_t v)
{
    return newSVuv((UV)v);
}

/* A string of a result struct: characters when it is valid UTF-8 (what decode_json of qemu-img's output gives),
 * else the bytes. */
static SV *
strsv(pTHX_ const char *s)
{
    SV *sv;
    STRLEN len;
    if (!s)
        return newSV(0);
    len = strlen(s);
    sv = newSVpvn(s, len);
    if (!is_ascii_string((const U8 *)s, len) && is_utf8_string((const U8 *)s, len))
        SvUTF8_on(sv);
    return sv;
}

#define PUT(hv, key, sv) (void)hv_stores((hv), key, (sv))

static SV *
snapshot_hv(pTHX_ const instar_snapshot_t *s)
{
    HV *h = newHV();
    PUT(h, "id", strsv(aTHX_ s->id));
    PUT(h, "name", strsv(aTHX_ s->name));
    PUT(h, "vm-state-size", u64sv(aTHX_ s->vm_state_size));
    PUT(h, "date-sec", newSVuv(s->date_sec));
    PUT(h, "date-nsec", newSVuv(s->date_nsec));
    PUT(h, "vm-clock-sec", newSVuv((UV)(s->vm_clock_nsec / 1000000000u)));
    PUT(h, "vm-clock-nsec", newSVuv((UV)(s->vm_clock_nsec % 1000000000u)));
    if (s->icount != UINT64_MAX)
        PUT(h, "icount", u64sv(aTHX_ s->icount));
    return newRV_noinc((SV *)h);
}

/* One image of `qemu-img info --output=json`, with its keys; "format-specific" is left as JSON text under
 * "_format_specific_json" for lib/Instar.pm to decode (qemu's own text, so nothing is lost). */
static SV *
info_hv(pTHX_ const instar_info_t *in)
{
    HV *h = newHV();
    uint32_t i;
    if (in->snapshot_count && in->snapshots) {
        AV *av = newAV();
        for (i = 0; i < in->snapshot_count; i++)
            av_push(av, snapshot_hv(aTHX_ &in->snapshots[i]));
        PUT(h, "snapshots", newRV_noinc((SV *)av));
    }
    PUT(h, "virtual-size", newSViv((IV)in->virtual_size));
    PUT(h, "filename", strsv(aTHX_ in->filename));
    if (in->cluster_size >= 0)
        PUT(h, "cluster-size", newSViv((IV)in->cluster_size));
    PUT(h, "format", strsv(aTHX_ in->format));
    if (in->actual_size >= 0)
        PUT(h, "actual-size", newSViv((IV)in->actual_size));
    if (in->encrypted != INSTAR_UNSET)
        PUT(h, "encrypted", boolsv(aTHX_ in->encrypted));
    if (in->compressed != INSTAR_UNSET)
        PUT(h, "compressed", boolsv(aTHX_ in->compressed));
    if (in->dirty_flag != INSTAR_UNSET)
        PUT(h, "dirty-flag", boolsv(aTHX_ in->dirty_flag));
    if (in->backing_filename)
        PUT(h, "backing-filename", strsv(aTHX_ in->backing_filename));
    if (in->full_backing_filename)
        PUT(h, "full-backing-filename", strsv(aTHX_ in->full_backing_filename));
    if (in->backing_format)
        PUT(h, "backing-filename-format", strsv(aTHX_ in->backing_format));
    if (in->format_specific_json)
        PUT(h, "_format_specific_json", strsv(aTHX_ in->format_specific_json));
    return newRV_noinc((SV *)h);
}

static void
info_options(pTHX_ HV *hv, instar_info_options_t *o, instar_limits_t *lim)
{
    instar_info_options_init(o);
    o->limits = opt_limits(aTHX_ hv, lim);
    o->open_flags = opt_flags(aTHX_ hv, "open_flags", open_flag_names);
    o->format = opt_str(aTHX_ hv, "format", NULL);
    o->backing_chain = opt_bool(aTHX_ hv, "backing_chain");
    o->key_secret = opt_str(aTHX_ hv, "key_secret", NULL);
}

static void
create_options(pTHX_ HV *hv, instar_create_options_t *o, instar_limits_t *lim)
{
    static const flag_name_t names[] = { { "no_backing_open", INSTAR_CREATE_NO_BACKING_OPEN }, { NULL, 0 } };
    instar_create_options_init(o);
    o->limits = opt_limits(aTHX_ hv, lim);
    o->flags = opt_flags(aTHX_ hv, "flags", names);
    o->format = opt_str(aTHX_ hv, "format", NULL);
    o->size = opt_i64(aTHX_ hv, "size", -1);
    o->backing_file = opt_str(aTHX_ hv, "backing_file", NULL);
    o->backing_format = opt_str(aTHX_ hv, "backing_format", NULL);
    o->options = opt_str(aTHX_ hv, "options", NULL);
    o->key_secret = opt_str(aTHX_ hv, "key_secret", NULL);
}

static void
check_options(pTHX_ HV *hv, instar_check_options_t *o, instar_limits_t *lim)
{
    instar_check_options_init(o);
    o->limits = opt_limits(aTHX_ hv, lim);
    o->open_flags = opt_flags(aTHX_ hv, "open_flags", open_flag_names);
    o->format = opt_str(aTHX_ hv, "format", NULL);
    o->repair = (uint32_t)opt_i64(aTHX_ hv, "repair", 0);
    o->key_secret = opt_str(aTHX_ hv, "key_secret", NULL);
}

/* The counters of a check as qemu-img's JSON names them (those the format reports), and exit_code. */
static SV *
check_hv(pTHX_ const instar_check_result_t *r)
{
    HV *h = newHV();
    (void)hv_stores(h, "exit_code", newSViv(r->exit_code));
#define CPUT(k, f) if (r->f >= 0) (void)hv_stores(h, k, newSViv((IV)r->f))
    CPUT("check-errors", check_errors);
    CPUT("corruptions", corruptions);
    CPUT("leaks", leaks);
    CPUT("corruptions-fixed", corruptions_fixed);
    CPUT("leaks-fixed", leaks_fixed);
    CPUT("image-end-offset", image_end_offset);
    CPUT("total-clusters", total_clusters);
    CPUT("allocated-clusters", allocated_clusters);
    CPUT("fragmented-clusters", fragmented_clusters);
    CPUT("compressed-clusters", compressed_clusters);
#undef CPUT
    return newRV_noinc((SV *)h);
}

/* Text the library returns (JSON, human output): bytes, as qemu-img writes them to stdout (PVE hands them to
 * decode_json, which wants bytes). */
static SV *
take_string(pTHX_ char *s)
{
    SV *sv = newSVpvn(s ? s : "", s ? strlen(s) : 0);
    instar_string_free(s);
    return sv;
}

MODULE = Instar    PACKAGE = Instar    PREFIX = instarxs_

PROTOTYPES: DISABLE

const char *
version()
  CODE:
    RETVAL = instar_version();
  OUTPUT:
    RETVAL

const char *
strerror(code)
    int code
  CODE:
    RETVAL = instar_strerror(code);
  OUTPUT:
    RETVAL

void
object_add(definition)
    const char *definition
  PREINIT:
    instar_error_t err;
    int rc;
  CODE:
    rc = instar_object_add(definition, &err);
    CHECK(rc, err);

void
object_del(id)
    const char *id
  PREINIT:
    instar_error_t err;
    int rc;
  CODE:
    rc = instar_object_del(id, &err);
    CHECK(rc, err);

SV *
_info(filename, opts = &PL_sv_undef)
    const char *filename
    SV *opts
  PREINIT:
    instar_info_options_t o;
    instar_limits_t lim;
    instar_error_t err;
    instar_info_t *out = NULL, *node;
    int rc;
    HV *hv;
  CODE:
    hv = opts_hv(aTHX_ opts);
    info_options(aTHX_ hv, &o, &lim);
    rc = instar_info(filename, &o, &out, &err);
    CHECK(rc, err);
    if (o.backing_chain) {
        AV *av = newAV();
        for (node = out; node; node = node->backing)
            av_push(av, info_hv(aTHX_ node));
        RETVAL = newRV_noinc((SV *)av);
    } else {
        RETVAL = info_hv(aTHX_ out);
    }
    instar_info_free(out);
  OUTPUT:
    RETVAL

SV *
info_json(filename, opts = &PL_sv_undef)
    const char *filename
    SV *opts
  PREINIT:
    instar_info_options_t o;
    instar_limits_t lim;
    instar_error_t err;
    char *json = NULL;
    int rc;
  CODE:
    info_options(aTHX_ opts_hv(aTHX_ opts), &o, &lim);
    rc = instar_info_json(filename, &o, &json, &err);
    CHECK(rc, err);
    RETVAL = take_string(aTHX_ json);
  OUTPUT:
    RETVAL

SV *
info_human(filename, opts = &PL_sv_undef)
    const char *filename
    SV *opts
  PREINIT:
    instar_info_options_t o;
    instar_limits_t lim;
    instar_error_t err;
    char *text = NULL;
    int rc;
  CODE:
    info_options(aTHX_ opts_hv(aTHX_ opts), &o, &lim);
    rc = instar_info_human(filename, &o, &text, &err);
    CHECK(rc, err);
    RETVAL = take_string(aTHX_ text);
  OUTPUT:
    RETVAL

SV *
map(filename, opts = &PL_sv_undef)
    const char *filename
    SV *opts
  PREINIT:
    instar_map_options_t o;
    instar_limits_t lim;
    instar_error_t err;
    instar_map_t *m = NULL;
    int rc;
    uint64_t i;
    HV *hv;
    AV *av;
  CODE:
    hv = opts_hv(aTHX_ opts);
    instar_map_options_init(&o);
    o.limits = opt_limits(aTHX_ hv, &lim);
    o.open_flags = opt_flags(aTHX_ hv, "open_flags", open_flag_names);
    o.format = opt_str(aTHX_ hv, "format", NULL);
    o.start_offset = (uint64_t)opt_i64(aTHX_ hv, "start_offset", 0);
    o.max_length = opt_i64(aTHX_ hv, "max_length", -1);
    o.key_secret = opt_str(aTHX_ hv, "key_secret", NULL);
    rc = instar_map(filename, &o, &m, &err);
    CHECK(rc, err);
    av = newAV();
    for (i = 0; i < m->count; i++) {
        const instar_map_entry_t *e = &m->entries[i];
        HV *h = newHV();
        PUT(h, "start", u64sv(aTHX_ e->start));
        PUT(h, "length", u64sv(aTHX_ e->length));
        PUT(h, "depth", newSViv(e->depth));
        PUT(h, "present", boolsv(aTHX_ e->present));
        PUT(h, "zero", boolsv(aTHX_ e->zero));
        PUT(h, "data", boolsv(aTHX_ e->data));
        if (e->has_offset) {
            PUT(h, "offset", u64sv(aTHX_ e->offset));
            if (e->filename)
                PUT(h, "filename", strsv(aTHX_ e->filename));
        }
        av_push(av, newRV_noinc((SV *)h));
    }
    instar_map_free(m);
    RETVAL = newRV_noinc((SV *)av);
  OUTPUT:
    RETVAL

SV *
compare(filename1, filename2, opts = &PL_sv_undef)
    const char *filename1
    const char *filename2
    SV *opts
  PREINIT:
    instar_compare_options_t o;
    instar_limits_t lim;
    instar_compare_result_t r;
    instar_error_t err;
    progress_t p;
    int rc;
    HV *hv, *h;
  CODE:
    hv = opts_hv(aTHX_ opts);
    instar_compare_options_init(&o);
    o.limits = opt_limits(aTHX_ hv, &lim);
    o.open_flags = opt_flags(aTHX_ hv, "open_flags", open_flag_names);
    o.format1 = opt_str(aTHX_ hv, "format1", NULL);
    o.format2 = opt_str(aTHX_ hv, "format2", NULL);
    o.strict = opt_bool(aTHX_ hv, "strict");
    o.key_secret1 = opt_str(aTHX_ hv, "key_secret1", NULL);
    o.key_secret2 = opt_str(aTHX_ hv, "key_secret2", NULL);
    progress_init(aTHX_ &p, hv);
    o.progress = PROGRESS_FN(&p);
    o.progress_data = &p;
    memset(&r, 0, sizeof r);
    r.struct_size = sizeof r;
    rc = instar_compare(filename1, filename2, &o, &r, &err);
    progress_finish(aTHX_ &p, rc, &err);
    h = newHV();
    PUT(h, "identical", newSViv(r.identical));
    PUT(h, "size_mismatch", newSViv(r.size_mismatch));
    PUT(h, "mismatch_offset", newSViv((IV)r.mismatch_offset));
    PUT(h, "message", newSVpv(r.message, strnlen(r.message, sizeof r.message)));
    RETVAL = newRV_noinc((SV *)h);
  OUTPUT:
    RETVAL

void
convert(source, target, opts = &PL_sv_undef)
    const char *source
    const char *target
    SV *opts
  PREINIT:
    static const flag_name_t names[] = {
        { "no_create", INSTAR_CONVERT_NO_CREATE }, { "target_is_zero", INSTAR_CONVERT_TARGET_IS_ZERO },
        { "force_share", INSTAR_CONVERT_FORCE_SHARE }, { "compress", INSTAR_CONVERT_COMPRESS },
        { "unordered_writes", INSTAR_CONVERT_UNORDERED_WRITES }, { "bitmaps", INSTAR_CONVERT_BITMAPS },
        { "skip_broken_bitmaps", INSTAR_CONVERT_SKIP_BROKEN_BITMAPS }, { NULL, 0 }
    };
    instar_convert_options_t o;
    instar_limits_t lim;
    instar_error_t err;
    progress_t p;
    int rc;
    HV *hv;
  CODE:
    hv = opts_hv(aTHX_ opts);
    instar_convert_options_init(&o);
    o.limits = opt_limits(aTHX_ hv, &lim);
    o.flags = opt_flags(aTHX_ hv, "flags", names);
    o.source_format = opt_str(aTHX_ hv, "source_format", NULL);
    o.target_format = opt_str(aTHX_ hv, "target_format", NULL);
    o.source_cache = opt_str(aTHX_ hv, "source_cache", NULL);
    o.target_cache = opt_str(aTHX_ hv, "target_cache", NULL);
    o.sparse_size = opt_i64(aTHX_ hv, "sparse_size", -1);
    o.options = opt_str(aTHX_ hv, "options", NULL);
    o.backing_file = opt_str(aTHX_ hv, "backing_file", NULL);
    o.backing_format = opt_str(aTHX_ hv, "backing_format", NULL);
    o.snapshot = opt_str(aTHX_ hv, "snapshot", NULL);
    o.coroutines = (int32_t)opt_i64(aTHX_ hv, "coroutines", 8);
    o.rate_limit = opt_i64(aTHX_ hv, "rate_limit", 0);
    o.key_secret = opt_str(aTHX_ hv, "key_secret", NULL);
    o.target_key_secret = opt_str(aTHX_ hv, "target_key_secret", NULL);
    o.open_flags = opt_flags(aTHX_ hv, "open_flags", open_flag_names);
    progress_init(aTHX_ &p, hv);
    o.progress = PROGRESS_FN(&p);
    o.progress_data = &p;
    rc = instar_convert(source, target, &o, &err);
    progress_finish(aTHX_ &p, rc, &err);

void
create(filename, opts = &PL_sv_undef)
    const char *filename
    SV *opts
  PREINIT:
    instar_create_options_t o;
    instar_limits_t lim;
    instar_error_t err;
    int rc;
  CODE:
    create_options(aTHX_ opts_hv(aTHX_ opts), &o, &lim);
    rc = instar_create(filename, &o, &err);
    CHECK(rc, err);

SV *
create_formatting(filename, opts = &PL_sv_undef)
    const char *filename
    SV *opts
  PREINIT:
    instar_create_options_t o;
    instar_limits_t lim;
    instar_error_t err;
    char *line = NULL;
    int rc;
  CODE:
    create_options(aTHX_ opts_hv(aTHX_ opts), &o, &lim);
    rc = instar_create_formatting(filename, &o, &line, &err);
    if (rc != INSTAR_OK) {
        SV *printed = line ? sv_2mortal(newSVpv(line, 0)) : NULL;
        instar_string_free(line);
        instar_croak_output(aTHX_ rc, &err, printed ? SvPV_nolen(printed) : NULL);
    }
    RETVAL = take_string(aTHX_ line);
  OUTPUT:
    RETVAL

SV *
measure(filename, opts = &PL_sv_undef)
    SV *filename
    SV *opts
  PREINIT:
    instar_measure_options_t o;
    instar_limits_t lim;
    instar_measure_result_t r;
    instar_error_t err;
    int rc;
    HV *hv, *h;
  CODE:
    hv = opts_hv(aTHX_ opts);
    instar_measure_options_init(&o);
    o.limits = opt_limits(aTHX_ hv, &lim);
    o.open_flags = opt_flags(aTHX_ hv, "open_flags", open_flag_names);
    o.source_format = opt_str(aTHX_ hv, "source_format", NULL);
    o.output_format = opt_str(aTHX_ hv, "output_format", NULL);
    o.options = opt_str(aTHX_ hv, "options", NULL);
    o.size = opt_i64(aTHX_ hv, "size", -1);
    o.key_secret = opt_str(aTHX_ hv, "key_secret", NULL);
    memset(&r, 0, sizeof r);
    r.struct_size = sizeof r;
    rc = instar_measure(SvOK(filename) ? SvPV_nolen(filename) : NULL, &o, &r, &err);
    CHECK(rc, err);
    h = newHV();
    if (r.has_bitmaps)
        PUT(h, "bitmaps", u64sv(aTHX_ r.bitmaps));
    PUT(h, "required", u64sv(aTHX_ r.required));
    PUT(h, "fully-allocated", u64sv(aTHX_ r.fully_allocated));
    RETVAL = newRV_noinc((SV *)h);
  OUTPUT:
    RETVAL

SV *
check(filename, opts = &PL_sv_undef)
    const char *filename
    SV *opts
  PREINIT:
    instar_check_options_t o;
    instar_limits_t lim;
    instar_check_result_t r;
    instar_error_t err;
    int rc;
  CODE:
    check_options(aTHX_ opts_hv(aTHX_ opts), &o, &lim);
    memset(&r, 0, sizeof r);
    r.struct_size = sizeof r;
    rc = instar_check(filename, &o, &r, &err);
    CHECK(rc, err);
    RETVAL = check_hv(aTHX_ &r);
  OUTPUT:
    RETVAL

SV *
check_report(filename, opts = &PL_sv_undef)
    const char *filename
    SV *opts
  PREINIT:
    instar_check_options_t o;
    instar_limits_t lim;
    instar_check_result_t r;
    instar_error_t err;
    char *json = NULL, *messages = NULL;
    int rc;
    HV *h;
  CODE:
    check_options(aTHX_ opts_hv(aTHX_ opts), &o, &lim);
    memset(&r, 0, sizeof r);
    r.struct_size = sizeof r;
    rc = instar_check_report(filename, &o, &r, &json, &messages, &err);
    CHECK(rc, err);
    h = newHV();
    PUT(h, "result", check_hv(aTHX_ &r));
    PUT(h, "json", take_string(aTHX_ json));
    PUT(h, "messages", take_string(aTHX_ messages));
    RETVAL = newRV_noinc((SV *)h);
  OUTPUT:
    RETVAL

SV *
inspect(path, opts = &PL_sv_undef)
    const char *path
    SV *opts
  PREINIT:
    instar_inspect_policy_t po;
    instar_inspect_report_t *rep = NULL;
    instar_error_t err;
    int rc;
    uint32_t k;
    HV *hv, *h;
    AV *vs, *fs;
    SV *sv;
    const char *preset;
  CODE:
    hv = opts_hv(aTHX_ opts);
    instar_inspect_policy_init(&po);
    preset = opt_str(aTHX_ hv, "preset", "glance");
    if (strcmp(preset, "glance") == 0 || strcmp(preset, "oslo") == 0)
        po.preset = INSTAR_INSPECT_PRESET_GLANCE;
    else if (strcmp(preset, "vdsm") == 0)
        po.preset = INSTAR_INSPECT_PRESET_VDSM;
    else if (strcmp(preset, "nova") == 0)
        po.preset = INSTAR_INSPECT_PRESET_NOVA;
    else if (strcmp(preset, "cinder") == 0)
        po.preset = INSTAR_INSPECT_PRESET_CINDER;
    else if (strcmp(preset, "pve") == 0)
        po.preset = INSTAR_INSPECT_PRESET_PVE;
    else
        croak("Instar: unknown inspect preset '%s'", preset);
    po.declared_format = opt_str(aTHX_ hv, "declared_format", NULL);
    po.max_virtual_size = (uint64_t)opt_i64(aTHX_ hv, "max_virtual_size", 0);
    po.max_vmdk_extents = (uint32_t)opt_i64(aTHX_ hv, "max_vmdk_extents", 0);
    sv = opt_sv(aTHX_ hv, "fatal");
    if (sv) {
        /* An array of code names (empty: nothing fatal) instead of the preset's choice. */
        AV *names;
        SSize_t i;
        if (!SvROK(sv) || SvTYPE(SvRV(sv)) != SVt_PVAV)
            croak("Instar: fatal must be an array reference of violation code names");
        names = (AV *)SvRV(sv);
        po.fatal = INSTAR_INSPECT_FATAL_NONE;
        for (i = 0; i <= av_len(names); i++) {
            SV **e = av_fetch(names, i, 0);
            const char *want = e ? SvPV_nolen(*e) : "";
            int found = 0;
            for (k = 0; k < 63; k++) {
                const char *n = instar_inspect_code_name(k);
                if (n && strcmp(n, want) == 0) {
                    po.fatal |= INSTAR_INSPECT_BIT(k);
                    found = 1;
                }
            }
            if (!found)
                croak("Instar: unknown violation code '%s'", want);
        }
        if (po.fatal != INSTAR_INSPECT_FATAL_NONE)
            po.fatal &= ~INSTAR_INSPECT_FATAL_NONE;
    }
    rc = instar_inspect(path, &po, &rep, &err);
    if (rc != INSTAR_OK && rc != INSTAR_E_POLICY)
        instar_croak(aTHX_ rc, &err);
    h = newHV();
    PUT(h, "fatal", boolsv(aTHX_ rep->fatal));
    PUT(h, "format", newSVpv(rep->format ? rep->format : "", 0));
    fs = newAV();
    if (rep->formats && rep->formats[0]) {
        const char *p = rep->formats;
        while (*p) {
            const char *c = strchr(p, ',');
            size_t n = c ? (size_t)(c - p) : strlen(p);
            av_push(fs, newSVpvn(p, n));
            p += n + (c ? 1 : 0);
        }
    }
    PUT(h, "formats", newRV_noinc((SV *)fs));
    if (rep->virtual_size >= 0)
        PUT(h, "virtual_size", newSViv((IV)rep->virtual_size));
    PUT(h, "preset", newSVpv(rep->preset ? rep->preset : "", 0));
    vs = newAV();
    for (k = 0; k < rep->count; k++) {
        const instar_inspect_violation_t *v = &rep->violations[k];
        HV *vh = newHV();
        const char *name = instar_inspect_code_name(v->code);
        PUT(vh, "code", newSVpv(name ? name : "", 0));
        PUT(vh, "fatal", boolsv(aTHX_ v->fatal));
        PUT(vh, "offset", newSVuv((UV)v->offset));
        PUT(vh, "field", newSVpv(v->field ? v->field : "", 0));
        PUT(vh, "message", newSVpv(v->message ? v->message : "", 0));
        av_push(vs, newRV_noinc((SV *)vh));
    }
    PUT(h, "violations", newRV_noinc((SV *)vs));
    instar_inspect_report_free(rep);
    RETVAL = newRV_noinc((SV *)h);
  OUTPUT:
    RETVAL

SV *
probe(regions, opts = &PL_sv_undef)
    SV *regions
    SV *opts
  PREINIT:
    instar_probe_options_t o;
    instar_limits_t lim;
    instar_probe_result_t r;
    instar_probe_region_t reg[16];
    instar_error_t err;
    AV *av;
    SSize_t n, i;
    int rc;
    HV *hv, *h;
    SV *item;
    STRLEN len;
  CODE:
    if (!SvROK(regions) || SvTYPE(SvRV(regions)) != SVt_PVAV)
        croak("Instar: regions must be an array reference of [offset, bytes] pairs");
    av = (AV *)SvRV(regions);
    n = av_len(av) + 1;
    if (n > (SSize_t)(sizeof reg / sizeof reg[0]))
        croak("Instar: at most %d regions", (int)(sizeof reg / sizeof reg[0]));
    for (i = 0; i < n; i++) {
        SV **e = av_fetch(av, i, 0);
        AV *pair;
        SV **off, **data;
        if (!e || !SvROK(*e) || SvTYPE(SvRV(*e)) != SVt_PVAV)
            croak("Instar: region %d must be an [offset, bytes] pair", (int)i);
        pair = (AV *)SvRV(*e);
        off = av_fetch(pair, 0, 0);
        data = av_fetch(pair, 1, 0);
        if (!off || !data)
            croak("Instar: region %d must be an [offset, bytes] pair", (int)i);
        reg[i].offset = (uint64_t)SvUV(*off);
        reg[i].data = SvPVbyte(*data, len);
        reg[i].length = (uint64_t)len;
    }
    hv = opts_hv(aTHX_ opts);
    instar_probe_options_init(&o);
    o.limits = opt_limits(aTHX_ hv, &lim);
    o.format = opt_str(aTHX_ hv, "format", NULL);
    o.part = opt_str(aTHX_ hv, "part", "header");
    o.qcow2_known_features = (uint32_t)opt_i64(aTHX_ hv, "qcow2_known_features", 0);
    item = opt_sv(aTHX_ hv, "vhdx_item");
    if (item) {
        o.vhdx_item = SvPVbyte(item, len);
        if (len != 16)
            croak("Instar: vhdx_item must be 16 bytes");
    }
    o.luks_passphrase = opt_str(aTHX_ hv, "luks_passphrase", NULL);
    o.luks_iter_limit = (uint32_t)opt_i64(aTHX_ hv, "luks_iter_limit", 0);
    memset(&r, 0, sizeof r);
    r.struct_size = sizeof r;
    rc = instar_probe(reg, (uint32_t)n, &o, &r, &err);
    CHECK(rc, err);
    h = newHV();
    PUT(h, "match", r.match == INSTAR_UNSET ? newSV(0) : boolsv(aTHX_ r.match));
    if (r.virtual_size >= 0)
        PUT(h, "virtual_size", newSViv((IV)r.virtual_size));
    if (r.version >= 0)
        PUT(h, "version", newSViv(r.version));
    PUT(h, "violations", newSVuv(r.violations));
    PUT(h, "need_offset", newSVuv((UV)r.need_offset));
    PUT(h, "need_length", newSVuv((UV)r.need_length));
    PUT(h, "footer", boolsv(aTHX_ r.footer > 0));
    PUT(h, "text", boolsv(aTHX_ r.text > 0));
    PUT(h, "payload_offset", newSVuv(r.payload_offset));
    PUT(h, "key_slot", newSViv(r.key_slot));
    PUT(h, "subformat", newSVpv(r.subformat, strnlen(r.subformat, sizeof r.subformat)));
    PUT(h, "message", newSVpv(r.message, strnlen(r.message, sizeof r.message)));
    if (o.part && strcmp(o.part, "payload") == 0)
        PUT(h, "payload", newSVpvn((const char *)r.payload, sizeof r.payload));
    PUT(h, "sectors", newSVuv((UV)r.sectors));
    RETVAL = newRV_noinc((SV *)h);
  OUTPUT:
    RETVAL

SV *
check_json(filename, opts = &PL_sv_undef)
    const char *filename
    SV *opts
  PREINIT:
    instar_check_options_t o;
    instar_limits_t lim;
    instar_error_t err;
    char *json = NULL;
    int rc;
    HV *hv;
  CODE:
    hv = opts_hv(aTHX_ opts);
    check_options(aTHX_ hv, &o, &lim);
    rc = instar_check_json(filename, &o, &json, &err);
    CHECK(rc, err);
    RETVAL = take_string(aTHX_ json);
  OUTPUT:
    RETVAL

void
check_chain_json(filename, opts = &PL_sv_undef)
    const char *filename
    SV *opts
  PREINIT:
    instar_check_options_t o;
    instar_limits_t lim;
    instar_error_t err;
    char *json = NULL;
    int32_t exit_code = 0;
    int rc;
    HV *hv;
  PPCODE:
    hv = opts_hv(aTHX_ opts);
    check_options(aTHX_ hv, &o, &lim);
    rc = instar_check_chain_json(filename, &o, &json, &exit_code, &err);
    CHECK(rc, err);
    mXPUSHs(take_string(aTHX_ json));
    mXPUSHi(exit_code);

void
resize(filename, size, opts = &PL_sv_undef)
    const char *filename
    IV size
    SV *opts
  PREINIT:
    static const flag_name_t names[] = {
        { "relative", INSTAR_RESIZE_RELATIVE }, { "shrink", INSTAR_RESIZE_SHRINK }, { NULL, 0 }
    };
    instar_resize_options_t o;
    instar_limits_t lim;
    instar_error_t err;
    int rc;
    HV *hv;
  CODE:
    hv = opts_hv(aTHX_ opts);
    instar_resize_options_init(&o);
    o.limits = opt_limits(aTHX_ hv, &lim);
    o.open_flags = opt_flags(aTHX_ hv, "open_flags", open_flag_names);
    o.format = opt_str(aTHX_ hv, "format", NULL);
    o.preallocation = opt_str(aTHX_ hv, "preallocation", NULL);
    o.flags = opt_flags(aTHX_ hv, "flags", names);
    o.key_secret = opt_str(aTHX_ hv, "key_secret", NULL);
    rc = instar_resize(filename, (int64_t)size, &o, &err);
    CHECK(rc, err);

void
amend(filename, opts = &PL_sv_undef)
    const char *filename
    SV *opts
  PREINIT:
    instar_amend_options_t o;
    instar_limits_t lim;
    instar_error_t err;
    progress_t p;
    int rc;
    HV *hv;
  CODE:
    hv = opts_hv(aTHX_ opts);
    instar_amend_options_init(&o);
    o.limits = opt_limits(aTHX_ hv, &lim);
    o.open_flags = opt_flags(aTHX_ hv, "open_flags", open_flag_names);
    o.format = opt_str(aTHX_ hv, "format", NULL);
    o.options = opt_str(aTHX_ hv, "options", NULL);
    o.force = (uint32_t)opt_bool(aTHX_ hv, "force");
    o.new_secret = opt_str(aTHX_ hv, "new_secret", NULL);
    o.old_secret = opt_str(aTHX_ hv, "old_secret", NULL);
    o.key_secret = opt_str(aTHX_ hv, "key_secret", NULL);
    progress_init(aTHX_ &p, hv);
    o.progress = PROGRESS_FN(&p);
    o.progress_data = &p;
    rc = instar_amend(filename, &o, &err);
    progress_finish(aTHX_ &p, rc, &err);

void
commit(filename, opts = &PL_sv_undef)
    const char *filename
    SV *opts
  PREINIT:
    static const flag_name_t names[] = { { "no_empty", INSTAR_COMMIT_NO_EMPTY }, { NULL, 0 } };
    instar_commit_options_t o;
    instar_limits_t lim;
    instar_error_t err;
    progress_t p;
    int rc;
    HV *hv;
  CODE:
    hv = opts_hv(aTHX_ opts);
    instar_commit_options_init(&o);
    o.limits = opt_limits(aTHX_ hv, &lim);
    o.flags = opt_flags(aTHX_ hv, "flags", names);
    o.format = opt_str(aTHX_ hv, "format", NULL);
    o.base = opt_str(aTHX_ hv, "base", NULL);
    o.cache = opt_str(aTHX_ hv, "cache", NULL);
    o.rate_limit = opt_i64(aTHX_ hv, "rate_limit", 0);
    o.key_secret = opt_str(aTHX_ hv, "key_secret", NULL);
    progress_init(aTHX_ &p, hv);
    o.progress = PROGRESS_FN(&p);
    o.progress_data = &p;
    rc = instar_commit(filename, &o, &err);
    progress_finish(aTHX_ &p, rc, &err);

void
rebase(filename, opts = &PL_sv_undef)
    const char *filename
    SV *opts
  PREINIT:
    static const flag_name_t names[] = {
        { "unsafe", INSTAR_REBASE_UNSAFE }, { "force_share", INSTAR_REBASE_FORCE_SHARE }, { NULL, 0 }
    };
    instar_rebase_options_t o;
    instar_limits_t lim;
    instar_error_t err;
    progress_t p;
    int rc;
    HV *hv;
  CODE:
    hv = opts_hv(aTHX_ opts);
    instar_rebase_options_init(&o);
    o.limits = opt_limits(aTHX_ hv, &lim);
    o.flags = opt_flags(aTHX_ hv, "flags", names);
    o.format = opt_str(aTHX_ hv, "format", NULL);
    o.backing_file = opt_str(aTHX_ hv, "backing_file", NULL);
    o.backing_format = opt_str(aTHX_ hv, "backing_format", NULL);
    o.cache = opt_str(aTHX_ hv, "cache", NULL);
    o.source_cache = opt_str(aTHX_ hv, "source_cache", NULL);
    o.key_secret = opt_str(aTHX_ hv, "key_secret", NULL);
    progress_init(aTHX_ &p, hv);
    o.progress = PROGRESS_FN(&p);
    o.progress_data = &p;
    rc = instar_rebase(filename, &o, &err);
    progress_finish(aTHX_ &p, rc, &err);

void
_bitmap(filename, bitmap, actions, opts = &PL_sv_undef)
    const char *filename
    const char *bitmap
    SV *actions
    SV *opts
  PREINIT:
    instar_bitmap_options_t o;
    instar_limits_t lim;
    instar_bitmap_action_t acts[64];
    instar_error_t err;
    int rc;
    HV *hv;
    AV *av;
    SSize_t i, n;
  CODE:
    hv = opts_hv(aTHX_ opts);
    if (!SvROK(actions) || SvTYPE(SvRV(actions)) != SVt_PVAV)
        croak("Instar::bitmap: actions must be an array reference");
    av = (AV *)SvRV(actions);
    n = av_top_index(av) + 1;
    if (n > 64)
        croak("Instar::bitmap: at most 64 actions");
    for (i = 0; i < n; i++) {
        SV **e = av_fetch(av, i, 0);
        AV *pair;
        SV **a, **m;
        if (!e || !SvROK(*e) || SvTYPE(SvRV(*e)) != SVt_PVAV)
            croak("Instar::bitmap: each action must be [ACTION, MERGE_SOURCE]");
        pair = (AV *)SvRV(*e);
        a = av_fetch(pair, 0, 0);
        m = av_fetch(pair, 1, 0);
        acts[i].action = a ? (uint32_t)SvUV(*a) : 0;
        acts[i].reserved = 0;
        acts[i].merge_source = (m && SvOK(*m)) ? SvPV_nolen(*m) : NULL;
    }
    instar_bitmap_options_init(&o);
    o.limits = opt_limits(aTHX_ hv, &lim);
    o.open_flags = opt_flags(aTHX_ hv, "open_flags", open_flag_names);
    o.format = opt_str(aTHX_ hv, "format", NULL);
    o.granularity = opt_i64(aTHX_ hv, "granularity", 0);
    o.source_file = opt_str(aTHX_ hv, "source_file", NULL);
    o.source_format = opt_str(aTHX_ hv, "source_format", NULL);
    o.key_secret = opt_str(aTHX_ hv, "key_secret", NULL);
    rc = instar_bitmap(filename, bitmap, acts, (uint32_t)n, &o, &err);
    CHECK(rc, err);

void
dd(input, output, opts = &PL_sv_undef)
    const char *input
    const char *output
    SV *opts
  PREINIT:
    static const flag_name_t names[] = {
        { "force_share", INSTAR_DD_FORCE_SHARE }, { "no_create", INSTAR_DD_NO_CREATE }, { NULL, 0 }
    };
    instar_dd_options_t o;
    instar_limits_t lim;
    instar_error_t err;
    progress_t p;
    int rc;
    HV *hv;
  CODE:
    hv = opts_hv(aTHX_ opts);
    instar_dd_options_init(&o);
    o.limits = opt_limits(aTHX_ hv, &lim);
    o.flags = opt_flags(aTHX_ hv, "flags", names);
    o.input_format = opt_str(aTHX_ hv, "input_format", NULL);
    o.output_format = opt_str(aTHX_ hv, "output_format", NULL);
    o.block_size = opt_i64(aTHX_ hv, "block_size", 0);
    o.count = opt_i64(aTHX_ hv, "count", -1);
    o.skip = opt_i64(aTHX_ hv, "skip", -1);
    o.output_size = opt_i64(aTHX_ hv, "output_size", -1);
    o.input_size = opt_i64(aTHX_ hv, "input_size", -1);
    o.snapshot = opt_str(aTHX_ hv, "snapshot", NULL);
    o.key_secret = opt_str(aTHX_ hv, "key_secret", NULL);
    progress_init(aTHX_ &p, hv);
    o.progress = PROGRESS_FN(&p);
    o.progress_data = &p;
    rc = instar_dd(input, output, &o, &err);
    progress_finish(aTHX_ &p, rc, &err);

SV *
bench(filename, opts = &PL_sv_undef)
    const char *filename
    SV *opts
  PREINIT:
    static const flag_name_t names[] = {
        { "write", INSTAR_BENCH_WRITE }, { "no_drain", INSTAR_BENCH_NO_DRAIN },
        { "force_share", INSTAR_BENCH_FORCE_SHARE }, { "native_aio", INSTAR_BENCH_NATIVE_AIO }, { NULL, 0 }
    };
    instar_bench_options_t o;
    instar_limits_t lim;
    instar_bench_result_t r;
    instar_error_t err;
    progress_t p;
    int rc;
    HV *hv, *h;
  CODE:
    hv = opts_hv(aTHX_ opts);
    instar_bench_options_init(&o);
    o.limits = opt_limits(aTHX_ hv, &lim);
    o.flags = opt_flags(aTHX_ hv, "flags", names);
    o.format = opt_str(aTHX_ hv, "format", NULL);
    o.cache = opt_str(aTHX_ hv, "cache", NULL);
    o.count = (int32_t)opt_i64(aTHX_ hv, "count", 75000);
    o.depth = (int32_t)opt_i64(aTHX_ hv, "depth", 64);
    o.offset = opt_i64(aTHX_ hv, "offset", 0);
    o.buffer_size = (int32_t)opt_i64(aTHX_ hv, "buffer_size", 4096);
    o.step = (int32_t)opt_i64(aTHX_ hv, "step", 0);
    o.pattern = (int32_t)opt_i64(aTHX_ hv, "pattern", 0);
    o.flush_interval = (int32_t)opt_i64(aTHX_ hv, "flush_interval", 0);
    o.key_secret = opt_str(aTHX_ hv, "key_secret", NULL);
    progress_init(aTHX_ &p, hv);
    o.progress = PROGRESS_FN(&p);
    o.progress_data = &p;
    memset(&r, 0, sizeof r);
    r.struct_size = sizeof r;
    rc = instar_bench(filename, &o, &r, &err);
    progress_finish(aTHX_ &p, rc, &err);
    h = newHV();
    PUT(h, "requests", u64sv(aTHX_ r.requests));
    PUT(h, "bytes", u64sv(aTHX_ r.bytes));
    PUT(h, "seconds", newSVnv(r.seconds));
    RETVAL = newRV_noinc((SV *)h);
  OUTPUT:
    RETVAL

SV *
snapshot_list(filename, opts = &PL_sv_undef)
    const char *filename
    SV *opts
  PREINIT:
    instar_snapshot_options_t o;
    instar_limits_t lim;
    instar_snapshot_list_t *l = NULL;
    instar_error_t err;
    int rc;
    uint64_t i;
    HV *hv;
    AV *av;
  CODE:
    hv = opts_hv(aTHX_ opts);
    instar_snapshot_options_init(&o);
    o.limits = opt_limits(aTHX_ hv, &lim);
    o.open_flags = opt_flags(aTHX_ hv, "open_flags", open_flag_names);
    o.key_secret = opt_str(aTHX_ hv, "key_secret", NULL);
    rc = instar_snapshot_list(filename, &o, &l, &err);
    CHECK(rc, err);
    av = newAV();
    for (i = 0; i < l->count; i++)
        av_push(av, snapshot_hv(aTHX_ &l->snapshots[i]));
    instar_snapshot_list_free(l);
    RETVAL = newRV_noinc((SV *)av);
  OUTPUT:
    RETVAL

void
_snapshot(op, filename, name, opts = &PL_sv_undef)
    int op
    const char *filename
    const char *name
    SV *opts
  PREINIT:
    instar_snapshot_options_t o;
    instar_limits_t lim;
    instar_error_t err;
    int rc;
    HV *hv;
  CODE:
    hv = opts_hv(aTHX_ opts);
    instar_snapshot_options_init(&o);
    o.limits = opt_limits(aTHX_ hv, &lim);
    o.open_flags = opt_flags(aTHX_ hv, "open_flags", open_flag_names);
    o.key_secret = opt_str(aTHX_ hv, "key_secret", NULL);
    if (op == 0)
        rc = instar_snapshot_create(filename, name, &o, &err);
    else if (op == 1)
        rc = instar_snapshot_apply(filename, name, &o, &err);
    else
        rc = instar_snapshot_delete(filename, name, &o, &err);
    CHECK(rc, err);

MODULE = Instar    PACKAGE = Instar::Image

PROTOTYPES: DISABLE

UV
_open(filename, opts = &PL_sv_undef)
    const char *filename
    SV *opts
  PREINIT:
    instar_open_options_t o;
    instar_limits_t lim;
    instar_image_t *img = NULL;
    instar_error_t err;
    int rc;
    HV *hv;
  CODE:
    hv = opts_hv(aTHX_ opts);
    instar_open_options_init(&o);
    o.limits = opt_limits(aTHX_ hv, &lim);
    o.flags = opt_flags(aTHX_ hv, "flags", open_flag_names);
    o.format = opt_str(aTHX_ hv, "format", NULL);
    o.key_secret = opt_str(aTHX_ hv, "key_secret", NULL);
    rc = instar_open(filename, &o, &img, &err);
    CHECK(rc, err);
    RETVAL = PTR2UV(img);
  OUTPUT:
    RETVAL

void
_close(handle)
    UV handle
  CODE:
    instar_close(INT2PTR(instar_image_t *, handle));

UV
_size(handle)
    UV handle
  PREINIT:
    uint64_t size = 0;
    instar_error_t err;
    int rc;
  CODE:
    rc = instar_get_size(INT2PTR(instar_image_t *, handle), &size, &err);
    CHECK(rc, err);
    RETVAL = (UV)size;
  OUTPUT:
    RETVAL

SV *
_read(handle, count, offset)
    UV handle
    UV count
    UV offset
  PREINIT:
    instar_error_t err;
    int rc;
    SV *buf;
  CODE:
    if (count > (UV)1 << 31)
        croak("Instar::Image::read: count %" UVuf " is larger than 2 GiB", count);
    buf = newSV(count ? count : 1);
    rc = instar_read(INT2PTR(instar_image_t *, handle), SvPVX(buf), count, offset, &err);
    if (rc != INSTAR_OK) {
        SvREFCNT_dec(buf);
        instar_croak(aTHX_ rc, &err);
    }
    SvPOK_only(buf);
    SvCUR_set(buf, count);
    *SvEND(buf) = '\0';
    RETVAL = buf;
  OUTPUT:
    RETVAL

void
_write(handle, data, offset)
    UV handle
    SV *data
    UV offset
  PREINIT:
    instar_error_t err;
    STRLEN len;
    const char *p;
    int rc;
  CODE:
    p = SvPVbyte(data, len);
    rc = instar_write(INT2PTR(instar_image_t *, handle), p, (uint64_t)len, offset, &err);
    CHECK(rc, err);

void
_write_zeroes(handle, count, offset, flags)
    UV handle
    UV count
    UV offset
    UV flags
  PREINIT:
    instar_error_t err;
    int rc;
  CODE:
    rc = instar_write_zeroes(INT2PTR(instar_image_t *, handle), count, offset, (uint32_t)flags, &err);
    CHECK(rc, err);

void
_discard(handle, count, offset)
    UV handle
    UV count
    UV offset
  PREINIT:
    instar_error_t err;
    int rc;
  CODE:
    rc = instar_discard(INT2PTR(instar_image_t *, handle), count, offset, &err);
    CHECK(rc, err);

void
_flush(handle)
    UV handle
  PREINIT:
    instar_error_t err;
    int rc;
  CODE:
    rc = instar_flush(INT2PTR(instar_image_t *, handle), &err);
    CHECK(rc, err);

SV *
_block_status(handle, offset, count)
    UV handle
    UV offset
    UV count
  PREINIT:
    instar_block_status_t st = INSTAR_BLOCK_STATUS_INIT;
    instar_error_t err;
    int rc;
    HV *hv;
  CODE:
    rc = instar_block_status(INT2PTR(instar_image_t *, handle), offset, count, &st, &err);
    CHECK(rc, err);
    hv = newHV();
    PUT(hv, "length", u64sv(aTHX_ st.length));
    PUT(hv, "flags", newSVuv((UV)st.flags));
    PUT(hv, "depth", newSViv((IV)st.depth));
    PUT(hv, "allocated", boolsv(aTHX_ (st.flags & INSTAR_STATUS_ALLOCATED) != 0));
    PUT(hv, "data", boolsv(aTHX_ (st.flags & INSTAR_STATUS_DATA) != 0));
    PUT(hv, "zero", boolsv(aTHX_ (st.flags & INSTAR_STATUS_ZERO) != 0));
    PUT(hv, "eof", boolsv(aTHX_ (st.flags & INSTAR_STATUS_EOF) != 0));
    RETVAL = newRV_noinc((SV *)hv);
  OUTPUT:
    RETVAL
