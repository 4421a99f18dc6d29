/*
 * instar.h - the C API of libinstar, a disk-image engine compatible with qemu-img 7.2.
 *
 * This header is the one copy of the API: the Swift engine fills these very structs.
 *
 * Conventions (see ARCHITECTURE.md):
 *  - Every symbol starts with instar_ / INSTAR_.
 *  - Handles are opaque; the library allocates them and the caller releases them with the matching
 *    instar_*_close / instar_*_free function.
 *  - Option structs begin with `uint32_t struct_size`. Initialise them with the INSTAR_*_OPTIONS_INIT macro or
 *    instar_*_options_init(&opts), then set the fields you need. The library reads only the fields that fit
 *    in struct_size, so a caller built against an older header keeps working with a newer library. The
 *    instar_*_options_init() macros call instar_*_options_init_sized() with the caller's sizeof, which writes
 *    no more than that (the unsized 0.1.0 functions stay exported and write at most 0.1.0's structs).
 *  - Every call returns an int: 0 (INSTAR_OK) on success or a negative INSTAR_E_* code, and fills the optional
 *    instar_error_t (pass NULL if you do not want it). The library never prints anything.
 *  - Strings are NUL-terminated UTF-8. Sizes and offsets are int64_t/uint64_t bytes. Flags are uint32_t bit
 *    sets; yes/no fields are int32_t (0 no, nonzero yes) or the INSTAR_UNSET/FALSE/TRUE tri-state.
 *  - Strings and structs the library returns are malloc'd and owned by the caller, who releases them with the
 *    matching instar_*_free (instar_string_free for char *). Every *_free and instar_close accepts NULL.
 *  - Result structs the caller provides (instar_compare_result_t, instar_measure_result_t,
 *    instar_check_result_t) also begin with struct_size, which the caller sets; the library writes only that
 *    much. Structs the library allocates (instar_info_t, instar_map_t) only grow at their end.
 *  - Every function is thread-safe and the library has no global mutable state. Calls on one instar_image_t
 *    are serialised by the library, so threads may share a handle; instar_close must not race with other
 *    calls on the same handle.
 *  - Encrypted images (LUKS qcow2) are unlocked with the key_secret option fields: the passphrase itself, which
 *    the library hands to the image as qemu's encrypt.key-secret.
 *  - A backing chain whose lower images have a passphrase of their own takes it in the backing_key_secret fields
 *    (open, info, map, compare, convert, commit): the library hands it to every encrypted image below the top one
 *    as its encrypt.key-secret (luks: key-secret), what qemu-img's `--object secret,id=S` with
 *    `backing.encrypt.key-secret=S` on an --image-opts node gives. Where a json: name's backing node names its
 *    own encrypt.key-secret id, that id gets it. One passphrase serves all the images below the top; a chain
 *    whose lower images differ among themselves is not reachable through these fields. Creating an overlay on
 *    an encrypted backing file needs no backing passphrase (the backing file's size is read without it).
 *  - Any call may also fail with INSTAR_E_INVALID for a NULL required argument or a struct_size smaller than
 *    4, and with INSTAR_E_NOMEM.
 */
#ifndef INSTAR_H
#define INSTAR_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define INSTAR_API_VERSION 0

/* ---- Errors ------------------------------------------------------------------------------------------ */

/** Return codes. 0 is success; every error is negative. */
enum {
    INSTAR_OK = 0,
    INSTAR_E_INVALID = -1,      /**< bad argument or option */
    INSTAR_E_IO = -2,           /**< an I/O system call failed (see errno_value) */
    INSTAR_E_NOT_FOUND = -3,    /**< file, snapshot or bitmap not found */
    INSTAR_E_CORRUPT = -4,      /**< the image is malformed or hostile; nothing was written */
    INSTAR_E_UNSUPPORTED = -5,  /**< a feature or format that is not supported */
    INSTAR_E_LOCKED = -6,       /**< another process holds a conflicting image lock */
    INSTAR_E_NOMEM = -7,        /**< an allocation failed or a header asked for too much memory */
    INSTAR_E_CANCELLED = -8,    /**< the progress callback asked to stop */
    INSTAR_E_PERMISSION = -9,   /**< permission denied, or the image is read-only */
    INSTAR_E_ENCRYPTED = -10,   /**< the image is encrypted and no usable secret was given */
    INSTAR_E_CHAIN = -11,       /**< the backing chain is broken, loops or is too deep */
    INSTAR_E_RANGE = -12,       /**< an offset or size is out of range */
    INSTAR_E_LIMIT = -13,       /**< a limit of instar_limits_t was reached (time, CPU, memory) */
    INSTAR_E_POLICY = -14,      /**< instar_inspect: the image violates the policy (the report says how) */
    INSTAR_E_ISOLATION = -15    /**< INSTAR_OPEN_ISOLATED: the helper could not start, crashed or broke its confinement */
};

/** Details of a failure. `message` is what qemu-img would print after "qemu-img: ". */
typedef struct instar_error {
    int32_t code;         /**< INSTAR_E_* */
    int32_t errno_value;  /**< the errno behind the failure, or 0 */
    char message[1024];   /**< NUL-terminated, truncated if longer */
} instar_error_t;

/* ---- Per-call limits ------------------------------------------------------------------------------ */

/**
 * Limits for one call, for images that may be hostile: point an options struct's `limits` at one (NULL: no
 * limits). A call that reaches a limit fails with INSTAR_E_LIMIT. The library checks them before each read of an
 * image and between the steps of an operation, never inside a metadata update: an operation that writes and is
 * stopped leaves its images as a crash at that point would (qemu-img check finds leaks at most).
 */
typedef struct instar_limits {
    uint32_t struct_size;  /**< sizeof(instar_limits_t) */
    uint32_t flags;        /**< reserved, 0 */
    int64_t timeout_ms;    /**< wall-clock time the call may take, from its start; 0 or less: no limit */
    int64_t cpu_ms;        /**< CPU time each thread working for the call may use; 0 or less: no limit */
    /**
     * Bytes of metadata the call may hold at once for its images (tables, caches, descriptors, bitmaps, snapshot
     * tables, key material, decompression buffers); 0 or less: no limit. Counted when allocated, before the
     * allocation: an image whose headers ask for more fails with INSTAR_E_LIMIT naming what it asked for. The
     * metadata of an image opened during the call counts until the call ends (the peak of the call). Guest data
     * buffers of the copy loops are not counted (their size is the library's, not the image's). Callers built
     * with a header older than this member (a smaller struct_size) have no memory limit.
     */
    int64_t memory_bytes;
} instar_limits_t;

#define INSTAR_LIMITS_INIT { sizeof(instar_limits_t), 0, 0, 0, 0 }

/** The library version as "MAJOR.MINOR.PATCH". Static storage; never free it. */
const char *instar_version(void);

/** A short static description of an INSTAR_E_* code. Never free it. */
const char *instar_strerror(int code);

/** Frees a string the library returned (for example from instar_info_json). NULL is allowed. */
void instar_string_free(char *s);

/* ---- Opening images ---------------------------------------------------------------------------------- */

typedef struct instar_image instar_image_t;

/** Open flags. */
enum {
    INSTAR_OPEN_READ_WRITE = 1u << 0,   /**< open for writing (takes QEMU-compatible write locks) */
    INSTAR_OPEN_FORCE_SHARE = 1u << 1,  /**< qemu-img -U: read even if another process holds a write lock */
    INSTAR_OPEN_NO_BACKING = 1u << 2,   /**< do not open the backing chain */
    INSTAR_OPEN_NO_CACHE = 1u << 3,     /**< O_DIRECT on the image files (qemu-img -t/-T none) */
    /**
     * Parse the image in a confined helper process (docs/isolated.md): honoured by instar_info*, instar_check*
     * (without repair) and instar_map through their open_flags. A helper that crashes or is killed fails the call
     * with INSTAR_E_ISOLATION (INSTAR_E_LIMIT when it overran its time or CPU limit); the caller lives on.
     */
    INSTAR_OPEN_ISOLATED = 1u << 4
};

typedef struct instar_open_options {
    uint32_t struct_size;        /**< sizeof(instar_open_options_t) */
    uint32_t flags;              /**< INSTAR_OPEN_* */
    const char *format;          /**< "qcow2", "raw", ...; NULL to probe (like omitting qemu-img -f) */
    const char *key_secret;      /**< the passphrase of the image's encryption (qemu's encrypt.key-secret), NULL for none */
    const instar_limits_t *limits; /**< time and CPU limits of the call, NULL for none */
    const char *backing_key_secret; /**< the passphrase of the encrypted images below the top one (its backing file and
                                      *   theirs), each one's encrypt.key-secret (luks: key-secret), NULL for none */
} instar_open_options_t;

#define INSTAR_OPEN_OPTIONS_INIT { sizeof(instar_open_options_t), 0, NULL, NULL, NULL, NULL }
/**
 * Fills *opts with the defaults (the values of INSTAR_OPEN_OPTIONS_INIT), at most `size` bytes of it, and sets
 * struct_size to the bytes written. Returns INSTAR_OK, or INSTAR_E_INVALID for NULL or a size below 4.
 * Call it through the instar_open_options_init(opts) macro, which passes sizeof(*opts).
 */
int32_t instar_open_options_init_sized(instar_open_options_t *opts, uint32_t size);
/** The 0.1.0 entry point, kept for programs built with that header: writes at most 0.1.0's struct. */
void instar_open_options_init(instar_open_options_t *opts);
#define instar_open_options_init(opts) instar_open_options_init_sized((opts), (uint32_t)sizeof(*(opts)))

/**
 * Opens an image (and its backing chain unless INSTAR_OPEN_NO_BACKING). `filename` may be a path or a
 * qemu-style "json:{...}" string. On success *out is a handle the caller owns and releases with instar_close;
 * on failure *out is NULL. An encrypted image needs opts->key_secret (a json: name that sets encrypt.key-secret
 * to an id gets the passphrase under that id), encrypted images below it opts->backing_key_secret. opts may be
 * NULL for the defaults.
 * Opened with INSTAR_OPEN_READ_WRITE, a qcow2 image is treated as qemu treats it: a dirty image (lazy refcounts,
 * writer killed) is repaired first, and its persistent bitmaps are marked in use until instar_close stores
 * them again with the writes recorded (a handle never closed leaves them in use, as a killed QEMU does).
 * Errors: INSTAR_E_NOT_FOUND, INSTAR_E_IO, INSTAR_E_CORRUPT, INSTAR_E_UNSUPPORTED, INSTAR_E_LOCKED, INSTAR_E_CHAIN,
 * INSTAR_E_ENCRYPTED (no passphrase, or a wrong one: qemu's "Invalid password, cannot unlock any keyslot"),
 * INSTAR_E_PERMISSION.
 */
int instar_open(const char *filename, const instar_open_options_t *opts, instar_image_t **out,
                instar_error_t *err);

/**
 * Closes a handle from instar_open: writes caches back and stores the persistent bitmaps of an image opened
 * for writing. NULL is allowed. Failures here cannot be reported: call instar_flush first to see write errors.
 */
void instar_close(instar_image_t *image);

/** Stores the virtual size in bytes in *size. Errors: INSTAR_E_INVALID (NULL image or size). */
int instar_get_size(instar_image_t *image, uint64_t *size, instar_error_t *err);

/**
 * Reads `count` guest bytes at `offset` into `buf`, through the backing chain (unallocated areas read as
 * zeroes). Errors: INSTAR_E_RANGE when offset+count passes the virtual size, INSTAR_E_IO, INSTAR_E_CORRUPT,
 * INSTAR_E_ENCRYPTED.
 */
int instar_read(instar_image_t *image, void *buf, uint64_t count, uint64_t offset, instar_error_t *err);

/* ---- info -------------------------------------------------------------------------------------------- */

typedef struct instar_snapshot {
    const char *id;
    const char *name;
    uint64_t vm_state_size;
    uint32_t date_sec;
    uint32_t date_nsec;
    uint64_t vm_clock_nsec;
    uint64_t icount;      /**< UINT64_MAX when the image does not record it */
} instar_snapshot_t;

/** Bitmap flags, as in qemu-img info ("in-use", "auto"). */
enum { INSTAR_BITMAP_IN_USE = 1u << 0, INSTAR_BITMAP_AUTO = 1u << 1 };

typedef struct instar_bitmap {
    const char *name;
    uint64_t granularity;
    uint32_t flags;       /**< INSTAR_BITMAP_* */
} instar_bitmap_t;

/** Tri-state for optional booleans. */
enum { INSTAR_UNSET = -1, INSTAR_FALSE = 0, INSTAR_TRUE = 1 };

/** One extent of a vmdk image (instar_info_t.extents), as qemu-img info lists it. */
typedef struct instar_info_extent {
    const char *filename;
    const char *format;              /**< qemu's extent format ("FLAT", "SPARSE", "VMFSSPARSE", "SESPARSE", ... or "") */
    int64_t virtual_size;
    int64_t cluster_size;            /**< -1 when qemu-img gives none */
    int32_t compressed;              /**< INSTAR_UNSET (not printed), INSTAR_FALSE, INSTAR_TRUE */
} instar_info_extent_t;

/** One LUKS key slot (instar_info_t.luks_slots). */
typedef struct instar_info_luks_slot {
    int32_t active;                  /**< nonzero when the slot holds a key */
    int64_t iters;                   /**< PBKDF2 iterations; -1 for an inactive slot */
    int64_t stripes;                 /**< anti-forensic stripes; -1 for an inactive slot */
    int64_t key_offset;              /**< bytes from the start of the LUKS header */
} instar_info_luks_slot_t;

/**
 * What `qemu-img info` reports for one image. Strings are NULL when qemu-img would omit the key; integers
 * use -1 for "omitted". Everything is owned by the enclosing instar_info_t and freed with it.
 */
typedef struct instar_info {
    const char *filename;
    const char *format;
    int64_t virtual_size;
    int64_t actual_size;             /**< bytes allocated on the host, -1 when unavailable */
    int64_t cluster_size;            /**< -1 when the format has none */
    int32_t dirty_flag;              /**< INSTAR_UNSET/FALSE/TRUE */
    int32_t encrypted;               /**< INSTAR_UNSET or INSTAR_TRUE */
    int32_t compressed;              /**< INSTAR_UNSET or a boolean (only some formats report it) */
    const char *backing_filename;
    const char *full_backing_filename;
    const char *backing_format;
    uint32_t snapshot_count;
    const instar_snapshot_t *snapshots;
    /* format-specific (qcow2); `specific_type` is NULL when there is no format-specific block */
    const char *specific_type;       /**< "qcow2", "luks", "vmdk", ... */
    const char *compat;              /**< "0.10" or "1.1" */
    const char *compression_type;    /**< "zlib" or "zstd" */
    int32_t lazy_refcounts;          /**< tri-state */
    int32_t refcount_bits;           /**< -1 when omitted */
    int32_t corrupt;                 /**< tri-state */
    int32_t extended_l2;             /**< tri-state */
    const char *data_file;           /**< external data file name as stored, or NULL */
    int32_t data_file_raw;           /**< tri-state */
    const char *encrypt_format;      /**< "luks" or "aes" for encrypted qcow2, else NULL */
    uint32_t bitmap_count;
    const instar_bitmap_t *bitmaps;  /**< NULL when qemu-img prints no "bitmaps" key */
    int32_t has_bitmaps;             /**< 1 when qemu-img prints the "bitmaps" key */
    /** The next image in the chain (its backing file) when --backing-chain was asked for, else NULL. */
    struct instar_info *backing;
    /**
     * The whole "format-specific" member as qemu-img prints it (compact JSON, qemu's key order), or NULL when
     * qemu-img prints none. It carries what the fields above cannot (luks slots, bitmaps' details, ...).
     */
    const char *format_specific_json;
    /* vmdk (specific_type "vmdk"): qemu-img's cid, parent-cid, create-type and extents */
    int64_t vmdk_cid;                /**< -1 when not vmdk */
    int64_t vmdk_parent_cid;         /**< -1 when not vmdk */
    const char *vmdk_create_type;    /**< "monolithicSparse", "streamOptimized", ...; NULL when not vmdk */
    uint32_t extent_count;
    const instar_info_extent_t *extents; /**< every extent file: a caller can refuse paths it does not trust */
    /* LUKS: a luks image's header, or an encrypted qcow2's encrypt block with format "luks" */
    const char *luks_cipher_alg;     /**< "aes-256", ...; NULL when not LUKS */
    const char *luks_cipher_mode;    /**< "xts", ... */
    const char *luks_ivgen_alg;      /**< "plain64", "essiv", ... */
    const char *luks_ivgen_hash_alg; /**< NULL when the IV generator takes no hash */
    const char *luks_hash_alg;
    const char *luks_uuid;
    int64_t luks_payload_offset;     /**< bytes; -1 when not LUKS */
    int64_t luks_master_key_iters;   /**< -1 when not LUKS */
    uint32_t luks_slot_count;
    const instar_info_luks_slot_t *luks_slots;
} instar_info_t;

typedef struct instar_info_options {
    uint32_t struct_size;
    uint32_t open_flags;             /**< INSTAR_OPEN_FORCE_SHARE is the useful one here */
    const char *format;              /**< NULL to probe */
    int32_t backing_chain;           /**< nonzero: fill ->backing for the whole chain */
    const char *key_secret;      /**< the passphrase of the image's encryption (qemu's encrypt.key-secret), NULL for none */
    const instar_limits_t *limits; /**< time and CPU limits of the call, NULL for none */
    const char *backing_key_secret; /**< the passphrase of the encrypted images below the top one (its backing file and
                                      *   theirs), each one's encrypt.key-secret (luks: key-secret), NULL for none */
} instar_info_options_t;

#define INSTAR_INFO_OPTIONS_INIT { sizeof(instar_info_options_t), 0, NULL, 0, NULL, NULL, NULL }
/**
 * Fills *opts with the defaults (the values of INSTAR_INFO_OPTIONS_INIT), at most `size` bytes of it, and sets
 * struct_size to the bytes written. Returns INSTAR_OK, or INSTAR_E_INVALID for NULL or a size below 4.
 * Call it through the instar_info_options_init(opts) macro, which passes sizeof(*opts).
 */
int32_t instar_info_options_init_sized(instar_info_options_t *opts, uint32_t size);
/** The 0.1.0 entry point, kept for programs built with that header: writes at most 0.1.0's struct. */
void instar_info_options_init(instar_info_options_t *opts);
#define instar_info_options_init(opts) instar_info_options_init_sized((opts), (uint32_t)sizeof(*(opts)))

/**
 * Fills *out with what `qemu-img info` reports (with opts->backing_chain, the whole chain through ->backing).
 * The caller owns *out and frees it with instar_info_free; *out is NULL on failure. Errors: the instar_open
 * errors for the image (qemu-img's "Could not open 'NAME': ..." message), INSTAR_E_CHAIN for a looping chain.
 */
int instar_info(const char *filename, const instar_info_options_t *opts, instar_info_t **out,
                instar_error_t *err);
/** Frees an instar_info_t from instar_info with everything it points to, backing nodes included. NULL is allowed. */
void instar_info_free(instar_info_t *info);

/**
 * The text of `qemu-img info --output=json` (or of `--backing-chain --output=json`, a JSON array), byte for
 * byte, including the trailing newline. Free *json with instar_string_free. Errors: as instar_info.
 */
int instar_info_json(const char *filename, const instar_info_options_t *opts, char **json, instar_error_t *err);

/** The text of human `qemu-img info`. Free *text with instar_string_free. Errors: as instar_info. */
int instar_info_human(const char *filename, const instar_info_options_t *opts, char **text, instar_error_t *err);

/* ---- map --------------------------------------------------------------------------------------------- */

typedef struct instar_map_entry {
    uint64_t start;
    uint64_t length;
    int32_t depth;
    int32_t present;
    int32_t zero;
    int32_t data;
    int32_t has_offset;
    uint64_t offset;             /**< host offset, valid when has_offset */
    const char *filename;        /**< file holding the data when has_offset, else NULL */
} instar_map_entry_t;

typedef struct instar_map {
    uint64_t count;
    instar_map_entry_t *entries;
} instar_map_t;

typedef struct instar_map_options {
    uint32_t struct_size;
    uint32_t open_flags;
    const char *format;
    uint64_t start_offset;       /**< --start-offset */
    int64_t max_length;          /**< --max-length, -1 for to the end */
    const char *key_secret;      /**< the passphrase of the image's encryption (qemu's encrypt.key-secret), NULL for none */
    const instar_limits_t *limits; /**< time and CPU limits of the call, NULL for none */
    const char *backing_key_secret; /**< the passphrase of the encrypted images below the top one (its backing file and
                                      *   theirs), each one's encrypt.key-secret (luks: key-secret), NULL for none */
} instar_map_options_t;

#define INSTAR_MAP_OPTIONS_INIT { sizeof(instar_map_options_t), 0, NULL, 0, -1, NULL, NULL, NULL }
/**
 * Fills *opts with the defaults (the values of INSTAR_MAP_OPTIONS_INIT), at most `size` bytes of it, and sets
 * struct_size to the bytes written. Returns INSTAR_OK, or INSTAR_E_INVALID for NULL or a size below 4.
 * Call it through the instar_map_options_init(opts) macro, which passes sizeof(*opts).
 */
int32_t instar_map_options_init_sized(instar_map_options_t *opts, uint32_t size);
/** The 0.1.0 entry point, kept for programs built with that header: writes at most 0.1.0's struct. */
void instar_map_options_init(instar_map_options_t *opts);
#define instar_map_options_init(opts) instar_map_options_init_sized((opts), (uint32_t)sizeof(*(opts)))

/**
 * What `qemu-img map --output=json` reports, entry for entry. The caller owns *out (NULL on failure) and frees it
 * with instar_map_free. Errors: the instar_open errors, INSTAR_E_RANGE (start_offset above INT64_MAX),
 * INSTAR_E_IO, INSTAR_E_CORRUPT.
 */
int instar_map(const char *filename, const instar_map_options_t *opts, instar_map_t **out, instar_error_t *err);
/** Frees an instar_map_t from instar_map, its entries and their filenames. NULL is allowed. */
void instar_map_free(instar_map_t *map);

/* ---- progress and cancellation ----------------------------------------------------------------------- */

/**
 * Called with the percentage done (0.0 to 100.0). Return 0 to go on, nonzero to cancel: the operation then
 * fails with INSTAR_E_CANCELLED. Called from the thread that called the operation.
 */
typedef int (*instar_progress_fn)(double percent, void *user_data);

/**
 * Receives a warning qemu-img prints on stderr while an operation goes on (for example the probed-raw warning
 * when a write opens a raw image whose format was not given), the text without its final newline (it may hold
 * several lines). Called from the thread that called the operation; the text is valid only during the call.
 */
typedef void (*instar_warning_fn)(const char *message, void *user_data);

/* ---- compare ----------------------------------------------------------------------------------------- */

typedef struct instar_compare_options {
    uint32_t struct_size;
    uint32_t open_flags;
    const char *format1;         /**< -f */
    const char *format2;         /**< -F */
    int32_t strict;              /**< -s */
    instar_progress_fn progress;
    void *progress_data;
    const char *key_secret1;     /**< the passphrase of the first image's encryption (encrypt.key-secret), or NULL */
    const char *key_secret2;     /**< the passphrase of the second image's encryption, or NULL */
    const instar_limits_t *limits; /**< time and CPU limits of the call, NULL for none */
    const char *backing_key_secret1; /**< the passphrase of the encrypted images below the first image, or NULL */
    const char *backing_key_secret2; /**< the passphrase of the encrypted images below the second image, or NULL */
} instar_compare_options_t;

#define INSTAR_COMPARE_OPTIONS_INIT { sizeof(instar_compare_options_t), 0, NULL, NULL, 0, NULL, NULL, NULL, NULL, NULL, \
                                      NULL, NULL }
/**
 * Fills *opts with the defaults (the values of INSTAR_COMPARE_OPTIONS_INIT), at most `size` bytes of it, and sets
 * struct_size to the bytes written. Returns INSTAR_OK, or INSTAR_E_INVALID for NULL or a size below 4.
 * Call it through the instar_compare_options_init(opts) macro, which passes sizeof(*opts).
 */
int32_t instar_compare_options_init_sized(instar_compare_options_t *opts, uint32_t size);
/** The 0.1.0 entry point, kept for programs built with that header: writes at most 0.1.0's struct. */
void instar_compare_options_init(instar_compare_options_t *opts);
#define instar_compare_options_init(opts) instar_compare_options_init_sized((opts), (uint32_t)sizeof(*(opts)))

typedef struct instar_compare_result {
    uint32_t struct_size;
    int32_t identical;           /**< 1 identical, 0 different */
    int32_t size_mismatch;       /**< 1 when the virtual sizes differ */
    int64_t mismatch_offset;     /**< first differing byte offset qemu-img reports, -1 if none */
    /** The message qemu-img prints on stdout (without -q), e.g. "Images are identical.\n". */
    char message[256];
    /**
     * qemu-img compare's exit status for this outcome: 0 identical, 1 different, and, written also when the
     * call fails: 2 an image could not be opened (or a bad argument), 3 a block-status query failed (or the
     * image is corrupt), 4 a read failed.
     */
    int32_t exit_status;
    /** When the call fails: the line qemu-img compare prints on stderr after "qemu-img: " (NUL-terminated). */
    char error_message[512];
} instar_compare_result_t;

/**
 * Compares two images' guest contents like `qemu-img compare`. Images that differ are no error: see
 * result->identical and result->message. Set result->struct_size before the call (0 means the full struct).
 * Errors: the instar_open errors for either image (with qemu-img's "Could not open" message), INSTAR_E_IO,
 * INSTAR_E_CORRUPT, INSTAR_E_CANCELLED (the progress callback returned nonzero). A failed call still writes
 * result->exit_status and result->error_message (when struct_size covers them), so a caller can tell the
 * outcomes qemu-img compare's exit status tells apart.
 */
int instar_compare(const char *filename1, const char *filename2, const instar_compare_options_t *opts,
                   instar_compare_result_t *result, instar_error_t *err);

/* ---- convert ----------------------------------------------------------------------------------------- */

enum {
    INSTAR_CONVERT_NO_CREATE = 1u << 0,        /**< -n: the target exists already */
    INSTAR_CONVERT_TARGET_IS_ZERO = 1u << 1,   /**< --target-is-zero */
    INSTAR_CONVERT_FORCE_SHARE = 1u << 2,      /**< -U */
    INSTAR_CONVERT_COMPRESS = 1u << 3,         /**< -c */
    INSTAR_CONVERT_UNORDERED_WRITES = 1u << 4, /**< -W */
    INSTAR_CONVERT_BITMAPS = 1u << 5,          /**< --bitmaps */
    INSTAR_CONVERT_SKIP_BROKEN_BITMAPS = 1u << 6, /**< --skip-broken-bitmaps */
    /** -C: copy offloading (copy_file_range) of data stored plainly; not with sparse_size >= 0 or SALVAGE. */
    INSTAR_CONVERT_COPY_RANGE = 1u << 7,
    /** --salvage: sectors that cannot be read are written as zeroes instead of failing the copy (qemu's
     *  warnings about them are not reported through this call). */
    INSTAR_CONVERT_SALVAGE = 1u << 8
};

typedef struct instar_convert_options {
    uint32_t struct_size;
    uint32_t flags;              /**< INSTAR_CONVERT_* */
    const char *source_format;   /**< -f, NULL to probe */
    const char *target_format;   /**< -O, NULL means raw */
    const char *source_cache;    /**< -T: "none", "writeback", "unsafe", ...; NULL for qemu-img's default */
    const char *target_cache;    /**< -t; NULL for qemu-img's default (unsafe) */
    int64_t sparse_size;         /**< -S in bytes; -1 for the default (4 KiB); 0 to write every zero */
    instar_progress_fn progress;
    void *progress_data;
    /* Appended in 0.2 (struct_size tells which fields a caller knows). */
    const char *options;         /**< -o: creation options of the target ("cluster_size=4k,compat=1.1"), or NULL */
    const char *backing_file;    /**< -B: the target's backing file (only differences are written), or NULL */
    const char *backing_format;  /**< -F: its format */
    const char *snapshot;        /**< -l: "NAME", "snapshot.name=NAME" or "snapshot.id=ID" of the source, or NULL */
    int32_t coroutines;          /**< -m: 1..16 (8 by default) */
    int64_t rate_limit;          /**< -r: bytes per second, 0 for no limit */
    const char *key_secret;      /**< passphrase of an encrypted source (qemu's encrypt.key-secret), or NULL */
    /** Passphrase of the target: an existing encrypted target (-n), or a new one whose `options` ask for
     *  encrypt.format=luks (it is used as encrypt.key-secret). NULL for none. */
    const char *target_key_secret;
    const instar_limits_t *limits; /**< time and CPU limits of the call, NULL for none */
    const char *backing_key_secret; /**< the passphrase of the encrypted images below the source (its backing file
                                      *   and theirs), each one's encrypt.key-secret, NULL for none */
    /**
     * INSTAR_OPEN_* for the source (`flags` holds INSTAR_CONVERT_*, whose bits differ). INSTAR_OPEN_ISOLATED
     * parses the (untrusted) source in the confined helper process and streams its block status and guest
     * bytes back; the target is written by this process as without it (docs/isolated.md). A helper that
     * crashes or misbehaves fails the call with INSTAR_E_ISOLATION, one past its deadline with INSTAR_E_LIMIT.
     * INSTAR_OPEN_FORCE_SHARE and INSTAR_OPEN_NO_CACHE apply to the source too.
     */
    uint32_t open_flags;
} instar_convert_options_t;

#define INSTAR_CONVERT_OPTIONS_INIT { sizeof(instar_convert_options_t), 0, NULL, NULL, NULL, NULL, -1, NULL, NULL, \
                                      NULL, NULL, NULL, NULL, 8, 0, NULL, NULL, NULL, NULL, 0 }
/**
 * Fills *opts with the defaults (the values of INSTAR_CONVERT_OPTIONS_INIT), at most `size` bytes of it, and sets
 * struct_size to the bytes written. Returns INSTAR_OK, or INSTAR_E_INVALID for NULL or a size below 4.
 * Call it through the instar_convert_options_init(opts) macro, which passes sizeof(*opts).
 */
int32_t instar_convert_options_init_sized(instar_convert_options_t *opts, uint32_t size);
/** The 0.1.0 entry point, kept for programs built with that header: writes at most 0.1.0's struct. */
void instar_convert_options_init(instar_convert_options_t *opts);
#define instar_convert_options_init(opts) instar_convert_options_init_sized((opts), (uint32_t)sizeof(*(opts)))

/**
 * Copies the guest contents of `source` into `target` like `qemu-img convert`. A target the call created is
 * removed again if the call fails or is cancelled.
 */
int instar_convert(const char *source, const char *target, const instar_convert_options_t *opts,
                   instar_error_t *err);

/* ---- create and measure ----------------------------------------------------------------------------- */

enum {
    INSTAR_CREATE_NO_BACKING_OPEN = 1u << 0  /**< qemu-img create -u: do not open the backing file */
};

typedef struct instar_create_options {
    uint32_t struct_size;
    uint32_t flags;              /**< INSTAR_CREATE_* */
    const char *format;          /**< -f; NULL means raw */
    int64_t size;                /**< virtual size in bytes; -1 to take it from the backing file or options */
    const char *backing_file;    /**< -b, or NULL */
    const char *backing_format;  /**< -F, or NULL */
    const char *options;         /**< -o: "key=value,key=value" as qemu-img takes it (",," escapes a comma), or NULL */
    /**
     * The new image's passphrase when `options` ask for encryption (encrypt.format=luks), NULL for none. When
     * `options` name no encrypt.key-secret the library supplies one; when they name an id, this fills it.
     */
    const char *key_secret;
    /**
     * The size operand as qemu-img create takes it on its command line ("1G", "1.5M", "0x10000", "1024"), or
     * NULL. When set it replaces `size`, with qemu-img's messages for a size it rejects (INSTAR_E_INVALID,
     * INSTAR_E_RANGE).
     */
    const char *size_text;
    const instar_limits_t *limits; /**< time and CPU limits of the call, NULL for none */
} instar_create_options_t;

#define INSTAR_CREATE_OPTIONS_INIT { sizeof(instar_create_options_t), 0, NULL, -1, NULL, NULL, NULL, NULL, NULL, NULL }
/**
 * Fills *opts with the defaults (the values of INSTAR_CREATE_OPTIONS_INIT), at most `size` bytes of it, and sets
 * struct_size to the bytes written. Returns INSTAR_OK, or INSTAR_E_INVALID for NULL or a size below 4.
 * Call it through the instar_create_options_init(opts) macro, which passes sizeof(*opts).
 */
int32_t instar_create_options_init_sized(instar_create_options_t *opts, uint32_t size);
/** The 0.1.0 entry point, kept for programs built with that header: writes at most 0.1.0's struct. */
void instar_create_options_init(instar_create_options_t *opts);
#define instar_create_options_init(opts) instar_create_options_init_sized((opts), (uint32_t)sizeof(*(opts)))

/**
 * Creates an image like `qemu-img create` (raw or qcow2; the same bytes qemu-img writes). An existing file is
 * overwritten. Errors carry qemu-img's message, including the "FILENAME: " prefix: INSTAR_E_INVALID (bad
 * option or size, missing backing format), INSTAR_E_UNSUPPORTED (format cannot create, encryption),
 * INSTAR_E_RANGE (image too large), INSTAR_E_IO, INSTAR_E_NOT_FOUND (backing file). Every file it writes
 * (extents, a data file) is flushed to disk before it returns INSTAR_OK.
 */
int instar_create(const char *filename, const instar_create_options_t *opts, instar_error_t *err);

/**
 * instar_create, which also hands back the line `qemu-img create` prints ("Formatting 'NAME', fmt=qcow2
 * cluster_size=65536 ... size=1048576 ...\n", with the newline) in *line: the caller frees it with
 * instar_string_free. *line is NULL when the request fails validation (qemu-img prints nothing then); a failure
 * of the creation itself, which qemu-img reports after printing the line, returns the error with *line set.
 * Errors: as instar_create, and INSTAR_E_INVALID when line is NULL.
 */
int instar_create_formatting(const char *filename, const instar_create_options_t *opts, char **line,
                             instar_error_t *err);

typedef struct instar_measure_options {
    uint32_t struct_size;
    uint32_t open_flags;         /**< INSTAR_OPEN_FORCE_SHARE is honoured */
    const char *source_format;   /**< -f for the source image, NULL to probe */
    const char *output_format;   /**< -O; NULL means raw */
    const char *options;         /**< -o for the output format, or NULL */
    int64_t size;                /**< --size in bytes when no filename is given; -1 otherwise */
    /**
     * The passphrase of the source image's encryption, which is also the passphrase of the measured output
     * when `options` ask for encryption (as for instar_create); NULL for none.
     */
    const char *key_secret;
    const instar_limits_t *limits; /**< time and CPU limits of the call, NULL for none */
} instar_measure_options_t;

#define INSTAR_MEASURE_OPTIONS_INIT { sizeof(instar_measure_options_t), 0, NULL, NULL, NULL, -1, NULL, NULL }
/**
 * Fills *opts with the defaults (the values of INSTAR_MEASURE_OPTIONS_INIT), at most `size` bytes of it, and sets
 * struct_size to the bytes written. Returns INSTAR_OK, or INSTAR_E_INVALID for NULL or a size below 4.
 * Call it through the instar_measure_options_init(opts) macro, which passes sizeof(*opts).
 */
int32_t instar_measure_options_init_sized(instar_measure_options_t *opts, uint32_t size);
/** The 0.1.0 entry point, kept for programs built with that header: writes at most 0.1.0's struct. */
void instar_measure_options_init(instar_measure_options_t *opts);
#define instar_measure_options_init(opts) instar_measure_options_init_sized((opts), (uint32_t)sizeof(*(opts)))

typedef struct instar_measure_result {
    uint32_t struct_size;
    int32_t has_bitmaps;         /**< 1 when qemu-img would print "bitmaps" */
    uint64_t required;           /**< "required size" */
    uint64_t fully_allocated;    /**< "fully allocated size" */
    uint64_t bitmaps;            /**< "bitmaps size", valid when has_bitmaps */
} instar_measure_result_t;

/**
 * Measures the file size a new image needs, like `qemu-img measure`: for `opts->size` when `filename` is NULL,
 * else for the contents of `filename`. Set result->struct_size before the call. Errors: INSTAR_E_INVALID (both
 * or neither of size and filename, bad options), INSTAR_E_UNSUPPORTED (format cannot measure), and the
 * instar_open errors for the source.
 */
int instar_measure(const char *filename, const instar_measure_options_t *opts, instar_measure_result_t *result,
                   instar_error_t *err);

/* ---- Writing (images opened with INSTAR_OPEN_READ_WRITE) ---- */

/** instar_write_zeroes flags. */
enum {
    INSTAR_ZERO_MAY_UNMAP = 1u << 0   /**< the range may be deallocated as long as it reads as zeroes */
};

/**
 * Writes `count` bytes from `buf` at guest `offset` of the top image. Ranges that the write covers only
 * partially are completed from the backing chain (copy-on-write). The range must lie within the image
 * (INSTAR_E_RANGE otherwise); a read-only handle gives INSTAR_E_PERMISSION, formats without write support
 * INSTAR_E_UNSUPPORTED. Data may stay in the library's caches until instar_flush or instar_close.
 */
int instar_write(instar_image_t *image, const void *buf, uint64_t count, uint64_t offset, instar_error_t *err);

/**
 * Makes `count` bytes at `offset` read as zeroes, using the format's zero markers where it can (qcow2 v3 zero
 * clusters) instead of writing zeroes. With INSTAR_ZERO_MAY_UNMAP, storage behind the range may be released.
 * Errors: as instar_write.
 */
int instar_write_zeroes(instar_image_t *image, uint64_t count, uint64_t offset, uint32_t flags,
                        instar_error_t *err);

/**
 * Releases the storage of whole clusters within the range (like qemu-io -d unmap "discard"). What the range
 * reads afterwards is format-defined (zeroes for qcow2 v3, the backing file for qcow2 v2).
 * Errors: as instar_write.
 */
int instar_discard(instar_image_t *image, uint64_t count, uint64_t offset, instar_error_t *err);

/** Writes cached metadata back and syncs the image files to stable storage. Errors: INSTAR_E_IO. */
int instar_flush(instar_image_t *image, instar_error_t *err);

/* ---- Block status of a handle (what an NBD server reports as base:allocation; docs/nbdkit.md) ---- */

/** instar_block_status_t flags, qemu's BDRV_BLOCK_* bits. */
enum {
    INSTAR_STATUS_ALLOCATED = 1u << 0,  /**< a layer of the chain decides the contents (`map`'s "present") */
    INSTAR_STATUS_DATA = 1u << 1,       /**< the range holds data (clear: a hole, NBD_STATE_HOLE) */
    INSTAR_STATUS_ZERO = 1u << 2,       /**< the range reads as zeroes (NBD_STATE_ZERO) */
    INSTAR_STATUS_EOF = 1u << 3         /**< the range reaches the end of the image */
};

/** The status of a guest range; the caller provides it and sets struct_size (the library writes only that much). */
typedef struct instar_block_status {
    uint32_t struct_size;  /**< sizeof(instar_block_status_t) */
    uint32_t flags;        /**< INSTAR_STATUS_* */
    uint64_t length;       /**< bytes from the queried offset that share this status: 1 .. count */
    int32_t depth;         /**< backing links below the top of the layer that decides the range (0: the top) */
    int32_t reserved;      /**< 0 */
} instar_block_status_t;

#define INSTAR_BLOCK_STATUS_INIT { sizeof(instar_block_status_t), 0, 0, 0, 0 }

/**
 * The status of the guest range at `offset` (at most `count` bytes) across the backing chain, as qemu's
 * bdrv_block_status_above(top, NULL) reports it (so as qemu-nbd serves base:allocation): status->length bytes
 * from `offset` share status->flags; call again from offset + length for the rest. Errors: INSTAR_E_RANGE when
 * count is 0 or the range passes the virtual size, INSTAR_E_INVALID (NULL image or status, struct_size below 4),
 * INSTAR_E_IO, INSTAR_E_CORRUPT.
 */
int instar_block_status(instar_image_t *image, uint64_t offset, uint64_t count, instar_block_status_t *status,
                        instar_error_t *err);

/* ---- check ------------------------------------------------------------------------------------------- */

enum {
    INSTAR_CHECK_REPAIR_LEAKS = 1u << 0,   /**< -r leaks: drop leaked references */
    INSTAR_CHECK_REPAIR_ERRORS = 1u << 1,  /**< with LEAKS: -r all */
    INSTAR_CHECK_REPAIR_ALL = 3u           /**< -r all */
};

typedef struct instar_check_options {
    uint32_t struct_size;
    uint32_t open_flags;         /**< INSTAR_OPEN_FORCE_SHARE (-U) and INSTAR_OPEN_NO_CACHE (-T none) are used */
    const char *format;          /**< -f, NULL to probe */
    uint32_t repair;             /**< INSTAR_CHECK_REPAIR_*; nonzero opens the image for writing */
    const char *key_secret;      /**< the passphrase of the image's encryption (qemu's encrypt.key-secret), NULL for none */
    const instar_limits_t *limits; /**< time and CPU limits of the call, NULL for none */
} instar_check_options_t;

#define INSTAR_CHECK_OPTIONS_INIT { sizeof(instar_check_options_t), 0, NULL, 0, NULL, NULL }
/**
 * Fills *opts with the defaults (the values of INSTAR_CHECK_OPTIONS_INIT), at most `size` bytes of it, and sets
 * struct_size to the bytes written. Returns INSTAR_OK, or INSTAR_E_INVALID for NULL or a size below 4.
 * Call it through the instar_check_options_init(opts) macro, which passes sizeof(*opts).
 */
int32_t instar_check_options_init_sized(instar_check_options_t *opts, uint32_t size);
/** The 0.1.0 entry point, kept for programs built with that header: writes at most 0.1.0's struct. */
void instar_check_options_init(instar_check_options_t *opts);
#define instar_check_options_init(opts) instar_check_options_init_sized((opts), (uint32_t)sizeof(*(opts)))

/** What `qemu-img check` reports. Counters qemu-img omits from its JSON (because they are 0) are -1. */
typedef struct instar_check_result {
    uint32_t struct_size;
    int32_t exit_code;           /**< qemu-img check's exit status: 0 clean, 1 internal errors, 2 corrupt, 3 leaks */
    int64_t check_errors;
    int64_t corruptions;
    int64_t leaks;
    int64_t corruptions_fixed;   /**< repairs made by the first pass */
    int64_t leaks_fixed;
    int64_t image_end_offset;
    int64_t total_clusters;
    int64_t allocated_clusters;
    int64_t fragmented_clusters;
    int64_t compressed_clusters;
} instar_check_result_t;

/**
 * Checks (and with opts->repair, repairs and checks again) an image like `qemu-img check`. Fills `result`
 * (whose struct_size the caller sets). Errors: the open errors of instar_open; INSTAR_E_UNSUPPORTED when the
 * format has no check ("This image format does not support checks"); INSTAR_E_IO when the check itself fails
 * ("Check failed: ..."). An image with problems is no error: see result->exit_code.
 */
int instar_check(const char *filename, const instar_check_options_t *opts, instar_check_result_t *result,
                 instar_error_t *err);

/**
 * Like instar_check, but stores the text of `qemu-img check --output=json` in *json; free it with
 * instar_string_free. Errors: as instar_check.
 */
int instar_check_json(const char *filename, const instar_check_options_t *opts, char **json, instar_error_t *err);

/**
 * One check that hands back everything `qemu-img check` reports: the counters in *result (as instar_check; NULL
 * to skip), the text of `--output=json` in *json, and in *messages the lines qemu-img prints on stderr while it
 * checks ("ERROR cluster 3 refcount=0 reference=1\n", "Leaked cluster 9 refcount=1 reference=0\n", each with
 * its newline and with the "qemu-img: " prefix where qemu-img prints one; "" when there are none). json and
 * messages may be NULL; strings are freed with instar_string_free and are NULL on failure. Errors: as
 * instar_check.
 */
int instar_check_report(const char *filename, const instar_check_options_t *opts, instar_check_result_t *result,
                        char **json, char **messages, instar_error_t *err);

/**
 * `check --chain --output=json` (an instar extension): checks every image of filename's backing chain on its own,
 * top first, with opts (its format applies to the top; the images below are opened in the formats the chain
 * names). Stores in *json the array of the per-image objects of `qemu-img check --output=json` (an image whose
 * format has no check, or whose check failed, has none); free it with instar_string_free. *exit_code (if not
 * NULL) receives the worst status of the images: 1 (a check not completed) > 2 (corruptions) > 3 (leaks) >
 * 63 (format without check) > 0. Errors: the open errors of the top's chain.
 */
int instar_check_chain_json(const char *filename, const instar_check_options_t *opts, char **json,
                            int32_t *exit_code, instar_error_t *err);

/* ---- resize and amend -------------------------------------------------------------------------------- */

enum {
    INSTAR_RESIZE_RELATIVE = 1u << 0,  /**< `size` is a signed change of the current size (qemu-img resize +N / -N) */
    INSTAR_RESIZE_SHRINK = 1u << 1     /**< --shrink: allow the image to get smaller */
};

typedef struct instar_resize_options {
    uint32_t struct_size;
    uint32_t open_flags;         /**< INSTAR_OPEN_NO_CACHE is honoured; the image is always opened read/write */
    const char *format;          /**< -f; NULL to probe */
    const char *preallocation;   /**< --preallocation: "off", "metadata", "falloc" or "full"; NULL means off */
    uint32_t flags;              /**< INSTAR_RESIZE_* */
    const char *key_secret;      /**< the passphrase of the image's encryption (qemu's encrypt.key-secret), NULL for none */
    const instar_limits_t *limits; /**< time and CPU limits of the call, NULL for none */
} instar_resize_options_t;

#define INSTAR_RESIZE_OPTIONS_INIT { sizeof(instar_resize_options_t), 0, NULL, NULL, 0, NULL, NULL }
/**
 * Fills *opts with the defaults (the values of INSTAR_RESIZE_OPTIONS_INIT), at most `size` bytes of it, and sets
 * struct_size to the bytes written. Returns INSTAR_OK, or INSTAR_E_INVALID for NULL or a size below 4.
 * Call it through the instar_resize_options_init(opts) macro, which passes sizeof(*opts).
 */
int32_t instar_resize_options_init_sized(instar_resize_options_t *opts, uint32_t size);
/** The 0.1.0 entry point, kept for programs built with that header: writes at most 0.1.0's struct. */
void instar_resize_options_init(instar_resize_options_t *opts);
#define instar_resize_options_init(opts) instar_resize_options_init_sized((opts), (uint32_t)sizeof(*(opts)))

/**
 * Changes an image's virtual size like `qemu-img resize`: to `size` bytes, or by `size` bytes with
 * INSTAR_RESIZE_RELATIVE. Shrinking needs INSTAR_RESIZE_SHRINK. Errors carry qemu-img's messages:
 * INSTAR_E_INVALID (size not positive, not a multiple of 512 for qcow2, shrink without the flag, bad
 * preallocation), INSTAR_E_UNSUPPORTED (format cannot resize), INSTAR_E_LOCKED, INSTAR_E_NOT_FOUND, INSTAR_E_IO.
 */
int instar_resize(const char *filename, int64_t size, const instar_resize_options_t *opts, instar_error_t *err);

typedef struct instar_amend_options {
    uint32_t struct_size;
    uint32_t open_flags;         /**< INSTAR_OPEN_NO_CACHE is honoured; the image is always opened read/write */
    const char *format;          /**< -f; NULL to probe */
    const char *options;         /**< -o: "key=value,..." as qemu-img takes it (",," escapes a comma) */
    uint32_t force;              /**< --force (nonzero) */
    instar_progress_fn progress; /**< called with the percentages `qemu-img amend -p` shows, or NULL */
    void *progress_data;
    const char *key_secret;      /**< the passphrase of the image's encryption (qemu's encrypt.key-secret), NULL for none */
    /**
     * LUKS key slots (luks: new-secret/old-secret, qcow2: encrypt.new-secret/encrypt.old-secret): the passphrase
     * to store in a slot being activated, and the passphrase that selects the slots to erase. When `options`
     * name a secret id for them, these fill that id; otherwise the library adds the option. NULL for none.
     */
    const char *new_secret;
    const char *old_secret;
    const instar_limits_t *limits; /**< time and CPU limits of the call, NULL for none */
} instar_amend_options_t;

#define INSTAR_AMEND_OPTIONS_INIT { sizeof(instar_amend_options_t), 0, NULL, NULL, 0, NULL, NULL, NULL, NULL, NULL, \
                                    NULL }
/**
 * Fills *opts with the defaults (the values of INSTAR_AMEND_OPTIONS_INIT), at most `size` bytes of it, and sets
 * struct_size to the bytes written. Returns INSTAR_OK, or INSTAR_E_INVALID for NULL or a size below 4.
 * Call it through the instar_amend_options_init(opts) macro, which passes sizeof(*opts).
 */
int32_t instar_amend_options_init_sized(instar_amend_options_t *opts, uint32_t size);
/** The 0.1.0 entry point, kept for programs built with that header: writes at most 0.1.0's struct. */
void instar_amend_options_init(instar_amend_options_t *opts);
#define instar_amend_options_init(opts) instar_amend_options_init_sized((opts), (uint32_t)sizeof(*(opts)))

/**
 * Changes creation options of an existing image like `qemu-img amend` (qcow2: compat, lazy_refcounts, size;
 * backing_file/backing_fmt only when unchanged; LUKS key slots of luks and LUKS-encrypted qcow2 images, with
 * key_secret unlocking the image and new_secret/old_secret for the slots). Errors carry qemu-img's messages: INSTAR_E_INVALID (unknown
 * or creation-only option, bad value), INSTAR_E_UNSUPPORTED (format cannot amend, feature v2 cannot hold,
 * refcount width change), INSTAR_E_CANCELLED (the progress callback returned nonzero), INSTAR_E_LOCKED, INSTAR_E_IO.
 */
int instar_amend(const char *filename, const instar_amend_options_t *opts, instar_error_t *err);

/* ---- commit ------------------------------------------------------------------------------------------ */

enum {
    INSTAR_COMMIT_NO_EMPTY = 1u << 0    /**< -d: the top image keeps its contents (implied by a base) */
};

typedef struct instar_commit_options {
    uint32_t struct_size;
    uint32_t flags;              /**< INSTAR_COMMIT_* */
    const char *format;          /**< -f of the top image; NULL to probe */
    const char *base;            /**< -b: the image of the chain to commit into (implies INSTAR_COMMIT_NO_EMPTY);
                                      NULL for the top's backing file */
    const char *cache;           /**< -t: "none", "writeback" (NULL), "writethrough", "directsync", "unsafe" */
    int64_t rate_limit;          /**< -r: bytes per second, 0 for no limit */
    instar_progress_fn progress; /**< called with the percentages `qemu-img commit -p` shows, or NULL */
    void *progress_data;
    const char *key_secret;      /**< the passphrase of the top image's encryption (encrypt.key-secret), or NULL */
    const instar_limits_t *limits; /**< time and CPU limits of the call, NULL for none */
    const char *backing_key_secret; /**< the passphrase of the encrypted images below the top (the base written to
                                      *   among them), each one's encrypt.key-secret, NULL for none */
} instar_commit_options_t;

#define INSTAR_COMMIT_OPTIONS_INIT { sizeof(instar_commit_options_t), 0, NULL, NULL, NULL, 0, NULL, NULL, NULL, NULL, NULL }
/**
 * Fills *opts with the defaults (the values of INSTAR_COMMIT_OPTIONS_INIT), at most `size` bytes of it, and sets
 * struct_size to the bytes written. Returns INSTAR_OK, or INSTAR_E_INVALID for NULL or a size below 4.
 * Call it through the instar_commit_options_init(opts) macro, which passes sizeof(*opts).
 */
int32_t instar_commit_options_init_sized(instar_commit_options_t *opts, uint32_t size);
/** The 0.1.0 entry point, kept for programs built with that header: writes at most 0.1.0's struct. */
void instar_commit_options_init(instar_commit_options_t *opts);
#define instar_commit_options_init(opts) instar_commit_options_init_sized((opts), (uint32_t)sizeof(*(opts)))

/**
 * Copies what the images above the base hold into the base like `qemu-img commit` (an active commit: the base
 * grows to the top's size if smaller, zero ranges become zero writes, enabled bitmaps of the base record the
 * writes, backing links are left as they are), then empties the top image unless INSTAR_COMMIT_NO_EMPTY or a
 * base is given. The top image and the base are opened read/write and locked. Errors carry qemu-img's
 * messages: INSTAR_E_NOT_FOUND (base not in the chain, or a missing file), INSTAR_E_CHAIN (no backing file,
 * a loop in the chain), INSTAR_E_INVALID (bad cache mode or rate limit), INSTAR_E_LOCKED, INSTAR_E_CORRUPT,
 * INSTAR_E_CANCELLED (the progress callback returned nonzero: what was copied stays in the base), INSTAR_E_IO.
 */
int instar_commit(const char *filename, const instar_commit_options_t *opts, instar_error_t *err);

/* ---- rebase ------------------------------------------------------------------------------------------ */

enum {
    INSTAR_REBASE_UNSAFE = 1u << 0,      /**< -u: only the header's backing name and format change */
    INSTAR_REBASE_FORCE_SHARE = 1u << 1  /**< -U: the new backing file is opened sharing every permission */
};

typedef struct instar_rebase_options {
    uint32_t struct_size;
    uint32_t flags;              /**< INSTAR_REBASE_* */
    const char *format;          /**< -f of the image; NULL to probe */
    /**
     * -b: the new backing file name, stored in the header exactly as given (a relative name is read relative to
     * the image's directory). "" makes the image standalone (safe mode copies everything it reads from the
     * old backing chain). NULL is allowed only with INSTAR_REBASE_UNSAFE, where it removes the backing file.
     */
    const char *backing_file;
    const char *backing_format;  /**< -F: required with a non-empty backing_file, as in qemu-img 7.2 */
    const char *cache;           /**< -t for the image ("none", "writeback", ...); NULL for qemu-img's writeback */
    const char *source_cache;    /**< -T for the backing files read in safe mode; NULL for writeback */
    instar_progress_fn progress; /**< called with the percentages `qemu-img rebase -p` shows, or NULL */
    void *progress_data;
    const char *key_secret;      /**< the passphrase of the image's encryption (qemu's encrypt.key-secret), NULL for none */
    instar_warning_fn warning;   /**< gets the warnings qemu-img rebase prints (probed raw), or NULL */
    void *warning_data;
    const instar_limits_t *limits; /**< time and CPU limits of the call, NULL for none */
} instar_rebase_options_t;

#define INSTAR_REBASE_OPTIONS_INIT { sizeof(instar_rebase_options_t), 0, NULL, NULL, NULL, NULL, NULL, NULL, NULL, \
                                     NULL, NULL, NULL, NULL }
/**
 * Fills *opts with the defaults (the values of INSTAR_REBASE_OPTIONS_INIT), at most `size` bytes of it, and sets
 * struct_size to the bytes written. Returns INSTAR_OK, or INSTAR_E_INVALID for NULL or a size below 4.
 * Call it through the instar_rebase_options_init(opts) macro, which passes sizeof(*opts).
 */
int32_t instar_rebase_options_init_sized(instar_rebase_options_t *opts, uint32_t size);
/** The 0.1.0 entry point, kept for programs built with that header: writes at most 0.1.0's struct. */
void instar_rebase_options_init(instar_rebase_options_t *opts);
#define instar_rebase_options_init(opts) instar_rebase_options_init_sized((opts), (uint32_t)sizeof(*(opts)))

/**
 * Changes an image's backing file like `qemu-img rebase`. In safe mode (the default) the guest contents stay
 * the same: every sector the image does not allocate and whose contents differ between the old and the new
 * backing file is written into the image first (a crash or a cancellation meanwhile leaves the image reading
 * what it read before), then the header names the new file. The image is locked for writing as qemu locks it.
 * Errors carry qemu-img's messages: INSTAR_E_INVALID (no backing_file in safe mode, bad cache mode, unknown
 * backing format, "backing format must be specified"), INSTAR_E_UNSUPPORTED (the format cannot name a
 * backing file: raw), INSTAR_E_NOT_FOUND (image or new backing file missing), INSTAR_E_CHAIN, INSTAR_E_CORRUPT,
 * INSTAR_E_LOCKED, INSTAR_E_CANCELLED (the progress callback returned nonzero), INSTAR_E_IO.
 */
int instar_rebase(const char *filename, const instar_rebase_options_t *opts, instar_error_t *err);

/* ---- bitmap ------------------------------------------------------------------------------------------ */

enum {
    INSTAR_BITMAP_ADD = 1,      /**< --add (granularity from the options; enabled) */
    INSTAR_BITMAP_REMOVE = 2,   /**< --remove */
    INSTAR_BITMAP_CLEAR = 3,    /**< --clear */
    INSTAR_BITMAP_ENABLE = 4,   /**< --enable */
    INSTAR_BITMAP_DISABLE = 5,  /**< --disable */
    INSTAR_BITMAP_MERGE = 6     /**< --merge SOURCE: `merge_source` of the source image (or of the image itself) */
};

/** One operation of instar_bitmap. */
typedef struct instar_bitmap_action {
    uint32_t action;             /**< INSTAR_BITMAP_* */
    uint32_t reserved;           /**< 0 */
    const char *merge_source;    /**< INSTAR_BITMAP_MERGE: the bitmap merged from; NULL otherwise */
} instar_bitmap_action_t;

typedef struct instar_bitmap_options {
    uint32_t struct_size;
    uint32_t open_flags;         /**< INSTAR_OPEN_NO_CACHE is honoured; the image is always opened read/write */
    const char *format;          /**< -f; NULL to probe */
    int64_t granularity;         /**< -g in bytes for INSTAR_BITMAP_ADD; 0 for the image's default */
    const char *source_file;     /**< -b: the image merge sources are read from; NULL for the image itself */
    const char *source_format;   /**< -F: its format; NULL to probe */
    const char *key_secret;      /**< the passphrase of the image's encryption, NULL for none */
    instar_warning_fn warning;   /**< gets the warnings qemu-img bitmap prints (probed raw), or NULL */
    void *warning_data;
    const instar_limits_t *limits; /**< time and CPU limits of the call, NULL for none */
} instar_bitmap_options_t;

#define INSTAR_BITMAP_OPTIONS_INIT { sizeof(instar_bitmap_options_t), 0, NULL, 0, NULL, NULL, NULL, NULL, NULL, NULL }
/**
 * Fills *opts with the defaults (the values of INSTAR_BITMAP_OPTIONS_INIT), at most `size` bytes of it, and sets
 * struct_size to the bytes written. Returns INSTAR_OK, or INSTAR_E_INVALID for NULL or a size below 4.
 * Call it through the instar_bitmap_options_init(opts) macro, which passes sizeof(*opts).
 */
int32_t instar_bitmap_options_init_sized(instar_bitmap_options_t *opts, uint32_t size);
/** The 0.1.0 entry point, kept for programs built with that header: writes at most 0.1.0's struct. */
void instar_bitmap_options_init(instar_bitmap_options_t *opts);
#define instar_bitmap_options_init(opts) instar_bitmap_options_init_sized((opts), (uint32_t)sizeof(*(opts)))

/**
 * Runs `count` operations in order on the persistent bitmap `bitmap` of `filename`, like one
 * `qemu-img bitmap` call. The image is closed (and what the operations before a failure did is stored) either
 * way, as qemu-img does. Errors carry qemu-img's messages ("Operation add on bitmap b failed: ..."):
 * INSTAR_E_INVALID (bitmap exists, granularity, inconsistent bitmap, sizes differ), INSTAR_E_NOT_FOUND
 * (no such bitmap), INSTAR_E_UNSUPPORTED (the format cannot store bitmaps), INSTAR_E_LOCKED, INSTAR_E_IO.
 */
int instar_bitmap(const char *filename, const char *bitmap, const instar_bitmap_action_t *actions, uint32_t count,
                  const instar_bitmap_options_t *opts, instar_error_t *err);

/* ---- dd ---------------------------------------------------------------------------------------------- */

enum {
    INSTAR_DD_FORCE_SHARE = 1u << 0,  /**< -U: open the input without taking its lock */
    INSTAR_DD_NO_CREATE = 1u << 1     /**< -n (Proxmox): the output exists and is written, not created */
};

typedef struct instar_dd_options {
    uint32_t struct_size;
    uint32_t flags;              /**< INSTAR_DD_* */
    const char *input_format;    /**< -f; NULL to probe */
    const char *output_format;   /**< -O; NULL means raw */
    int64_t block_size;          /**< bs= (1 .. INT_MAX); 0 means 512 */
    int64_t count;               /**< count= in blocks; -1 for none */
    int64_t skip;                /**< skip= in blocks; -1 for none */
    int64_t output_size;         /**< osize= (Proxmox): the created output's size; -1 for the input's */
    int64_t input_size;          /**< isize= (Proxmox): bytes to read; -1 for all */
    const char *snapshot;        /**< -l (Proxmox): "NAME", "snapshot.name=NAME" or "snapshot.id=ID"; NULL for none */
    instar_progress_fn progress;
    void *progress_data;
    const char *key_secret;      /**< the passphrase of an encrypted input, NULL for none */
    const instar_limits_t *limits; /**< time and CPU limits of the call, NULL for none */
} instar_dd_options_t;

#define INSTAR_DD_OPTIONS_INIT { sizeof(instar_dd_options_t), 0, NULL, NULL, 0, -1, -1, -1, -1, NULL, NULL, NULL, NULL, NULL }
/**
 * Fills *opts with the defaults (the values of INSTAR_DD_OPTIONS_INIT), at most `size` bytes of it, and sets
 * struct_size to the bytes written. Returns INSTAR_OK, or INSTAR_E_INVALID for NULL or a size below 4.
 * Call it through the instar_dd_options_init(opts) macro, which passes sizeof(*opts).
 */
int32_t instar_dd_options_init_sized(instar_dd_options_t *opts, uint32_t size);
/** The 0.1.0 entry point, kept for programs built with that header: writes at most 0.1.0's struct. */
void instar_dd_options_init(instar_dd_options_t *opts);
#define instar_dd_options_init(opts) instar_dd_options_init_sized((opts), (uint32_t)sizeof(*(opts)))

/**
 * Copies `input` into a new image `output` block by block like `qemu-img dd if=INPUT of=OUTPUT`: the output is
 * created with the input's size (less skip=, at most count= blocks; osize= overrides) and every block written.
 * Errors carry qemu-img's messages: INSTAR_E_INVALID (bad bs/format, output creation), INSTAR_E_NOT_FOUND,
 * INSTAR_E_LOCKED, INSTAR_E_IO, INSTAR_E_CANCELLED (the progress callback returned nonzero).
 */
int instar_dd(const char *input, const char *output, const instar_dd_options_t *opts, instar_error_t *err);

/* ---- bench ------------------------------------------------------------------------------------------- */

enum {
    INSTAR_BENCH_WRITE = 1u << 0,        /**< -w: write requests (the image is opened read/write) */
    INSTAR_BENCH_NO_DRAIN = 1u << 1,     /**< --no-drain: flushes do not wait for the requests in flight */
    INSTAR_BENCH_FORCE_SHARE = 1u << 2,  /**< -U */
    INSTAR_BENCH_NATIVE_AIO = 1u << 3    /**< -n: needs cache "none" or "directsync" */
};

typedef struct instar_bench_options {
    uint32_t struct_size;
    uint32_t flags;              /**< INSTAR_BENCH_* */
    const char *format;          /**< -f; NULL to probe */
    const char *cache;           /**< -t: "none", "writeback", ...; NULL for qemu-img bench's default (writeback) */
    int32_t count;               /**< -c: requests (75000 by default) */
    int32_t depth;               /**< -d: requests in flight (64 by default) */
    int64_t offset;              /**< -o: first request's offset */
    int32_t buffer_size;         /**< -s: bytes per request (4096 by default) */
    int32_t step;                /**< -S: offset step; 0 means buffer_size */
    int32_t pattern;             /**< --pattern: 0..255, the byte written */
    int32_t flush_interval;      /**< --flush-interval (write tests), 0 for none */
    instar_progress_fn progress;
    void *progress_data;
    const char *key_secret;      /**< the passphrase of the image's encryption, NULL for none */
    const instar_limits_t *limits; /**< time and CPU limits of the call, NULL for none */
} instar_bench_options_t;

#define INSTAR_BENCH_OPTIONS_INIT { sizeof(instar_bench_options_t), 0, NULL, NULL, 75000, 64, 0, 4096, 0, 0, 0, \
                                    NULL, NULL, NULL, NULL }
/**
 * Fills *opts with the defaults (the values of INSTAR_BENCH_OPTIONS_INIT), at most `size` bytes of it, and sets
 * struct_size to the bytes written. Returns INSTAR_OK, or INSTAR_E_INVALID for NULL or a size below 4.
 * Call it through the instar_bench_options_init(opts) macro, which passes sizeof(*opts).
 */
int32_t instar_bench_options_init_sized(instar_bench_options_t *opts, uint32_t size);
/** The 0.1.0 entry point, kept for programs built with that header: writes at most 0.1.0's struct. */
void instar_bench_options_init(instar_bench_options_t *opts);
#define instar_bench_options_init(opts) instar_bench_options_init_sized((opts), (uint32_t)sizeof(*(opts)))

typedef struct instar_bench_result {
    uint32_t struct_size;        /**< set by the caller; 0 means the full struct */
    uint32_t reserved;
    uint64_t requests;           /**< requests completed */
    uint64_t bytes;              /**< bytes read or written */
    double seconds;              /**< wall-clock time of the run (qemu-img's "Run completed in" figure) */
} instar_bench_result_t;

/**
 * Runs `qemu-img bench` on `filename` and fills *result. Errors carry qemu-img's messages: INSTAR_E_INVALID
 * (options), INSTAR_E_IO ("Failed request: ..."), INSTAR_E_CANCELLED (the progress callback returned nonzero),
 * the instar_open errors.
 */
int instar_bench(const char *filename, const instar_bench_options_t *opts, instar_bench_result_t *result,
                 instar_error_t *err);

/* ---- internal snapshots (qemu-img snapshot) ---------------------------------------------------------- */

typedef struct instar_snapshot_list {
    uint64_t count;
    instar_snapshot_t *snapshots;   /**< in table order (the struct instar_info uses) */
} instar_snapshot_list_t;

typedef struct instar_snapshot_options {
    uint32_t struct_size;
    uint32_t open_flags;         /**< INSTAR_OPEN_NO_CACHE and INSTAR_OPEN_FORCE_SHARE (list only) are honoured */
    const char *key_secret;      /**< the passphrase of the image's encryption (qemu's encrypt.key-secret), NULL for none */
    const instar_limits_t *limits; /**< time and CPU limits of the call, NULL for none */
} instar_snapshot_options_t;

#define INSTAR_SNAPSHOT_OPTIONS_INIT { sizeof(instar_snapshot_options_t), 0, NULL, NULL }
/**
 * Fills *opts with the defaults (the values of INSTAR_SNAPSHOT_OPTIONS_INIT), at most `size` bytes of it, and sets
 * struct_size to the bytes written. Returns INSTAR_OK, or INSTAR_E_INVALID for NULL or a size below 4.
 * Call it through the instar_snapshot_options_init(opts) macro, which passes sizeof(*opts).
 */
int32_t instar_snapshot_options_init_sized(instar_snapshot_options_t *opts, uint32_t size);
/** The 0.1.0 entry point, kept for programs built with that header: writes at most 0.1.0's struct. */
void instar_snapshot_options_init(instar_snapshot_options_t *opts);
#define instar_snapshot_options_init(opts) instar_snapshot_options_init_sized((opts), (uint32_t)sizeof(*(opts)))

/**
 * The internal snapshots of an image (`qemu-img snapshot -l`; the format is probed). A format without internal
 * snapshots gives an empty list. The caller owns *out (NULL on failure) and frees it with
 * instar_snapshot_list_free. Errors: the instar_open errors.
 */
int instar_snapshot_list(const char *filename, const instar_snapshot_options_t *opts, instar_snapshot_list_t **out,
                         instar_error_t *err);
/** Frees an instar_snapshot_list_t from instar_snapshot_list, its entries and their strings. NULL is allowed. */
void instar_snapshot_list_free(instar_snapshot_list_t *list);

/**
 * Creates internal snapshot `name` of the image's current state (`qemu-img snapshot -c`); the id is the next
 * free number. Errors carry qemu-img's message ("Could not create snapshot 'NAME': -95 (Operation not
 * supported)"): INSTAR_E_UNSUPPORTED (format without snapshots, external data file), INSTAR_E_RANGE (table full,
 * refcount overflow), INSTAR_E_LOCKED, INSTAR_E_CORRUPT, INSTAR_E_IO.
 */
int instar_snapshot_create(const char *filename, const char *name, const instar_snapshot_options_t *opts,
                           instar_error_t *err);
/**
 * Reverts the image to the snapshot whose id, else whose name, is `id_or_name` (`qemu-img snapshot -a`).
 * Errors carry qemu-img's message ("Could not apply snapshot 'X': ..."): INSTAR_E_NOT_FOUND, INSTAR_E_UNSUPPORTED,
 * INSTAR_E_LOCKED (persistent bitmaps present, or the image is in use), INSTAR_E_CORRUPT, INSTAR_E_IO.
 */
int instar_snapshot_apply(const char *filename, const char *id_or_name, const instar_snapshot_options_t *opts,
                          instar_error_t *err);
/**
 * Deletes the snapshot named `name` (`qemu-img snapshot -d`: by name only, the first match). Errors carry
 * qemu-img's message ("Could not delete snapshot 'X': snapshot not found"): INSTAR_E_NOT_FOUND, INSTAR_E_LOCKED,
 * INSTAR_E_CORRUPT, INSTAR_E_IO.
 */
int instar_snapshot_delete(const char *filename, const char *name, const instar_snapshot_options_t *opts,
                           instar_error_t *err);

/* ---- probe: formats recognised from content (oslo.utils format_inspector; the seed of instar_inspect) ------ */

/**
 * Bytes of an image the caller has read: `length` bytes found at `offset` in the file. A probe reads its fields
 * only from these; a field outside them is reported as needed (need_offset/need_length), never guessed.
 */
typedef struct instar_probe_region {
    uint64_t offset;
    uint64_t length;
    const void *data;
} instar_probe_region_t;

/** Safety findings of a probe (instar_probe_result_t.violations). */
enum {
    INSTAR_PROBE_V_BACKING_FILE = 1u << 0,        /**< qcow2: the header names a backing file */
    INSTAR_PROBE_V_DATA_FILE = 1u << 1,           /**< qcow2: an external data file (incompatible bit 2) */
    INSTAR_PROBE_V_UNKNOWN_FEATURES = 1u << 2,    /**< qcow2: incompatible feature bits beyond the known ones */
    INSTAR_PROBE_V_UNSUPPORTED_VERSION = 1u << 3, /**< qcow2 other than 2/3, LUKS other than 1 */
    INSTAR_PROBE_V_BANNED = 1u << 4,              /**< a format never accepted (qed) */
    INSTAR_PROBE_V_DESCRIPTOR = 1u << 5,          /**< vmdk: a descriptor line that is not a field, ddb or extent */
    INSTAR_PROBE_V_SUBFORMAT = 1u << 6,           /**< vmdk: createType other than monolithicSparse/streamOptimized */
    INSTAR_PROBE_V_EXTENT_PATH = 1u << 7,         /**< vmdk: an extent naming a path ('/') */
    INSTAR_PROBE_V_NO_EXTENTS = 1u << 8,          /**< vmdk: no extent at all */
    INSTAR_PROBE_V_FOOTER = 1u << 9,              /**< vmdk: the footer or its markers disagree with the header */
    INSTAR_PROBE_V_PARTITIONS = 1u << 10          /**< MBR/protective GPT table that is not plain */
};

typedef struct instar_probe_options {
    uint32_t struct_size;
    uint32_t flags;                 /**< none yet: 0 */
    /** The format whose structure the regions hold: "qcow2", "qed", "vhd", "vhdx", "vmdk", "vdi", "iso", "gpt", "luks". */
    const char *format;
    /**
     * Which structure: "header" (every format; for iso the primary volume descriptor at 32 KiB, for gpt the MBR),
     * vhdx "ident", "header" (region table at 192 KiB), "metadata" (the metadata table), "item" (an item's bytes);
     * vmdk "descriptor" and "footer" (regions[0] the header, regions[1] the last 1536 bytes of the file),
     * luks "payload" (regions: the header, the first active slot's key material, the payload's first sector).
     */
    const char *part;
    /** qcow2: incompatible feature bits numbered at or above this are unknown; 0 for oslo.utils' 4. */
    uint32_t qcow2_known_features;
    /** vhdx "metadata": the 16-byte GUID (as stored) of the item to find; NULL for the virtual disk size. */
    const void *vhdx_item;
    /** luks "payload": the passphrase that unlocks the first active key slot. */
    const char *luks_passphrase;
    /** luks "payload": refuse PBKDF2 iteration counts above this (0: only the library's own cap). */
    uint32_t luks_iter_limit;
    const instar_limits_t *limits; /**< time and CPU limits of the call, NULL for none */
} instar_probe_options_t;

#define INSTAR_PROBE_OPTIONS_INIT { sizeof(instar_probe_options_t), 0, NULL, NULL, 0, NULL, NULL, 0, NULL }
/**
 * Fills *opts with the defaults (the values of INSTAR_PROBE_OPTIONS_INIT), at most `size` bytes of it, and sets
 * struct_size to the bytes written. Returns INSTAR_OK, or INSTAR_E_INVALID for NULL or a size below 4.
 * Call it through the instar_probe_options_init(opts) macro, which passes sizeof(*opts).
 */
int32_t instar_probe_options_init_sized(instar_probe_options_t *opts, uint32_t size);
/** The 0.1.0 entry point, kept for programs built with that header: writes at most 0.1.0's struct. */
void instar_probe_options_init(instar_probe_options_t *opts);
#define instar_probe_options_init(opts) instar_probe_options_init_sized((opts), (uint32_t)sizeof(*(opts)))

typedef struct instar_probe_result {
    uint32_t struct_size;
    int32_t match;                  /**< INSTAR_TRUE/INSTAR_FALSE, INSTAR_UNSET when the bytes given cannot tell yet */
    int64_t virtual_size;           /**< -1 when this part does not give it */
    int32_t version;                /**< the header's version (qcow2, vmdk, luks), -1 when none */
    uint32_t violations;            /**< INSTAR_PROBE_V_* */
    uint64_t need_offset;           /**< the next bytes the format needs read (vmdk descriptor, vhdx tables)... */
    uint64_t need_length;           /**< ...0 when none */
    int32_t footer;                 /**< vmdk: the grain directory is at the end, a footer closes the file */
    int32_t text;                   /**< vmdk: the header bytes are plain text (a descriptor file) */
    uint32_t payload_offset;        /**< luks: where the payload starts, in 512-byte sectors */
    int32_t key_slot;               /**< luks: the first active key slot (its key material is need_*), -1 when none */
    char subformat[64];             /**< vmdk: createType, lower case; "" when none */
    char message[256];              /**< the first violation, as oslo.utils words it; "" when none */
    uint8_t payload[512];           /**< luks "payload": the payload's first sector, decrypted */
    uint64_t sectors;               /**< vmdk: capacity in 512-byte sectors as stored (virtual_size is -1 when
                                         it does not fit in bytes) */
} instar_probe_result_t;

/**
 * Reads one structure of an image from the regions the caller captured (a stream inspector sees the file once,
 * in chunks) and reports whether the bytes are that format, the virtual size, the next region it needs and the
 * safety findings. Nothing is read from disk. Set result->struct_size before the call (0: the full struct).
 * Errors: INSTAR_E_INVALID (unknown format or part), INSTAR_E_CORRUPT (the structure is malformed: a vmdk
 * without its signature, a vhdx region table without its own; message says which), INSTAR_E_ENCRYPTED (luks
 * "payload": the passphrase unlocks no key slot, or the iteration limit is exceeded).
 */
int instar_probe(const instar_probe_region_t *regions, uint32_t count, const instar_probe_options_t *opts,
                 instar_probe_result_t *result, instar_error_t *err);


/* ---- inspect: the format from content alone and every violation of a safety policy (docs/inspect.md) ------- */

/**
 * Violation codes of instar_inspect. A policy's `fatal` mask holds INSTAR_INSPECT_BIT(code) for each code that
 * refuses the image; every violation is reported whether fatal or not.
 */
enum {
    INSTAR_INSPECT_FORMAT_MISMATCH = 0,     /**< the declared format is not what the content is ("raw" holding a qcow2) */
    INSTAR_INSPECT_MULTIPLE_FORMATS = 1,    /**< more than one format matches (polyglot: ISO or GPT disk carrying a qcow2) */
    INSTAR_INSPECT_MALFORMED = 2,           /**< the matched format cannot be checked (truncated, inconsistent) */
    INSTAR_INSPECT_BACKING_FILE = 3,        /**< a backing file: qcow2, qed, a vmdk parentFileNameHint */
    INSTAR_INSPECT_PROTOCOL_NAME = 4,       /**< a backing, data-file, parent or extent name that is json: or protocol: */
    INSTAR_INSPECT_UNSAFE_PATH = 5,         /**< such a name is absolute or has a ".." component */
    INSTAR_INSPECT_DATA_FILE = 6,           /**< qcow2: an external data file */
    INSTAR_INSPECT_VMDK_EXTENTS = 7,        /**< vmdk: more extents than max_vmdk_extents */
    INSTAR_INSPECT_VMDK_EXTENT_PATH = 8,    /**< vmdk: an extent naming a path (outside the image's directory) */
    INSTAR_INSPECT_VMDK_DEVICE = 9,         /**< vmdk: an extent naming a device (/dev/...) */
    INSTAR_INSPECT_VMDK_DESCRIPTOR = 10,    /**< vmdk: createType other than monolithicSparse/streamOptimized,
                                                 a line that is not a field/ddb/extent, no extent, no descriptor */
    INSTAR_INSPECT_VMDK_FOOTER = 11,        /**< vmdk: footer or markers disagreeing with the header */
    INSTAR_INSPECT_UNKNOWN_FEATURES = 12,   /**< qcow2: incompatible feature bits oslo.utils does not know (4 and up) */
    INSTAR_INSPECT_UNSUPPORTED_VERSION = 13,/**< qcow2 other than 2/3, LUKS other than 1 */
    INSTAR_INSPECT_ENCRYPTED = 14,          /**< qcow2 encryption (AES or LUKS), a LUKS image */
    INSTAR_INSPECT_VIRTUAL_SIZE = 15,       /**< the virtual size is above max_virtual_size */
    INSTAR_INSPECT_PARTITIONS = 16,         /**< an MBR / protective GPT table that is not plain (oslo.utils' checks) */
    INSTAR_INSPECT_BANNED_FORMAT = 17       /**< a format never accepted (qed) */
};
#define INSTAR_INSPECT_BIT(code) (1ull << (code))
/** `fatal` value: the preset's fatal set. */
#define INSTAR_INSPECT_FATAL_PRESET 0ull
/** `fatal` value: nothing is fatal (a bit no code uses; the report still lists every violation). */
#define INSTAR_INSPECT_FATAL_NONE (1ull << 63)

/**
 * Policy presets: each chooses the fatal set (and, for pve, the vmdk extent limit) of the platform it names.
 *  - GLANCE (the default; "oslo"): what oslo.utils' format_inspector refuses (detect_file_format: several
 *    formats match, safety_check(): backing file, data file, unknown qcow2 features or version, qed, vmdk
 *    descriptor/extent/footer checks, MBR/GPT tables, LUKS other than 1, a file it cannot check) and Glance's
 *    refusal of content that is not the declared disk_format. A vmdk extent limit and a virtual size limit
 *    are fatal when set.
 *  - NOVA: GLANCE plus protocol/json: names, absolute or ".." names and device extents (Nova checks the same
 *    format_inspector verdict and the disk_format match before it hands an image to qemu-img).
 *  - CINDER: NOVA plus encryption (Cinder refuses encrypted images from Glance).
 *  - VDSM: GLANCE plus protocol/json: names, absolute or ".." names and device extents (VDSM's upload checks).
 *  - PVE: what Proxmox VE's file_size_info() dies on for untrusted images (imports, uploads): a backing file,
 *    a qcow2 data-file, a vmdk with more than one extent (max_vmdk_extents 1), a json:/protocol name, a format
 *    other than the one asked for, an image qemu-img cannot read; nothing of oslo.utils' other checks.
 */
enum {
    INSTAR_INSPECT_PRESET_GLANCE = 0,
    INSTAR_INSPECT_PRESET_VDSM = 1,
    INSTAR_INSPECT_PRESET_NOVA = 2,
    INSTAR_INSPECT_PRESET_CINDER = 3,
    INSTAR_INSPECT_PRESET_PVE = 4
};

typedef struct instar_inspect_policy {
    uint32_t struct_size;
    uint32_t preset;               /**< INSTAR_INSPECT_PRESET_* */
    uint64_t fatal;                /**< INSTAR_INSPECT_BIT()s; INSTAR_INSPECT_FATAL_PRESET, INSTAR_INSPECT_FATAL_NONE */
    uint64_t max_virtual_size;     /**< bytes; 0: no limit */
    uint32_t max_vmdk_extents;     /**< 0: the preset's (1 for pve, none otherwise); UINT32_MAX: no limit */
    uint32_t flags;                /**< none yet: 0 */
    const char *declared_format;   /**< the format the image is declared as ("raw", "qcow2", ...), or NULL */
} instar_inspect_policy_t;

/**
 * Fills the first `struct_size` bytes of *policy with the defaults (GLANCE preset, nothing else set) and sets
 * policy->struct_size to min(struct_size, the library's size): it never writes past the caller's struct, so a
 * caller built against an older, smaller header is safe. Call it through the instar_inspect_policy_init(&p) macro,
 * which passes sizeof(p).
 * Returns INSTAR_E_INVALID for NULL or a struct_size below 4.
 */
int instar_inspect_policy_init_sized(instar_inspect_policy_t *policy, uint32_t struct_size);
#define instar_inspect_policy_init(p) instar_inspect_policy_init_sized((p), (uint32_t)sizeof(*(p)))

typedef struct instar_inspect_violation {
    uint32_t code;                 /**< INSTAR_INSPECT_* */
    int32_t fatal;                 /**< nonzero when the policy makes it fatal */
    uint64_t offset;               /**< where in the file the offending field is (0 when it is the whole file) */
    char *field;                   /**< what: "qcow2.backing_file", "vmdk.extent[0]", "format", ... */
    char *message;                 /**< a sentence (oslo.utils' wording for its own checks) */
} instar_inspect_violation_t;

typedef struct instar_inspect_report {
    uint32_t struct_size;          /**< the library's size of this struct */
    int32_t fatal;                 /**< nonzero when a violation is fatal (the call returned INSTAR_E_POLICY) */
    char *format;                  /**< detected from content: "raw" when nothing matched, the first match when several */
    char *formats;                 /**< every format that matched, comma-separated ("" for raw) */
    int64_t virtual_size;          /**< the detected format's, -1 when it does not fit */
    uint32_t count;                /**< violations */
    instar_inspect_violation_t *violations;
    const char *preset;            /**< static: the preset's name ("glance", "vdsm", "nova", "cinder", "pve") */
} instar_inspect_report_t;

/**
 * Detects the format of `path` from its content alone (never from its name or a caller's claim) and checks it
 * against `policy` (NULL: the defaults). *report receives the full list of violations in both outcomes; free it
 * with instar_inspect_report_free. Returns 0 when no violation is fatal, INSTAR_E_POLICY when one is (err's
 * message is the first fatal one), or another INSTAR_E_* when the file cannot be read (*report is NULL then).
 */
int instar_inspect(const char *path, const instar_inspect_policy_t *policy, instar_inspect_report_t **report,
                   instar_error_t *err);

/** Frees a report from instar_inspect. NULL is allowed. */
void instar_inspect_report_free(instar_inspect_report_t *report);

/** The name of a violation code ("backing-file", ...; the CLI's JSON and --fatal use them), NULL when unknown. */
const char *instar_inspect_code_name(uint32_t code);

/* ---- Objects (qemu's --object) ------------------------------------------------------------------------ */

/**
 * Adds an object to the process's object table, as qemu-img's `--object DEFINITION` does: `definition` is the same
 * text ("secret,id=sec0,data=PASSPHRASE", "secret,id=sec0,file=PATH[,format=base64]",
 * "tls-creds-x509,id=tls0,dir=DIR[,endpoint=client][,verify-peer=on|off]",
 * "tls-creds-psk,id=tls0,dir=DIR[,username=NAME]"), checked as qemu checks it (credential files must exist; a
 * PSK user must be in keys.psk). Every later call of any thread sees the object: an nbd node's tls-creds=ID, and
 * key-secret=ID (luks, rbd) and encrypt.key-secret=ID in a json: name or in option lists, find it (the
 * call's own key_secret fields come first). Errors are qemu's: "Parameter 'qom-type' does not accept value 'X'"
 * for a type it lacks, "attempt to add duplicate property 'ID' to object (type 'container')" for an id already
 * taken. This table is the library's one piece of process-wide state. INSTAR_OPEN_ISOLATED helpers get its
 * secrets with each call; not its TLS credentials (a helper opens no connection).
 */
int instar_object_add(const char *definition, instar_error_t *err);

/** Removes the object `id` added with instar_object_add (qemu's object-del). INSTAR_E_NOT_FOUND with "object 'ID'
 * not found" when there is none. Images already open keep what they took from it. */
int instar_object_del(const char *id, instar_error_t *err);

#ifdef __cplusplus
}
#endif
#endif /* INSTAR_H */
