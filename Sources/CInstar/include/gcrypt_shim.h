#include <gcrypt.h>

/* gcry_control is variadic, which Swift cannot call: libgcrypt's one-time setup (version check, then
 * "initialization finished") lives here. Skipped when the host program has already set libgcrypt up. */
static inline void instar_gcry_init(void) {
    if (gcry_control(GCRYCTL_INITIALIZATION_FINISHED_P)) return;
    gcry_check_version(NULL);
    gcry_control(GCRYCTL_INITIALIZATION_FINISHED, 0);
}
