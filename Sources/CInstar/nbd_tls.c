/* Why a server's x509 certificate was refused, in qemu's words (crypto/tlssession.c's checks), for the NBD over
 * TLS client (Sources/Instar/IO/Nbd/NbdTls.swift). libnbd reports only gnutls' "Error in the certificate
 * verification"; after such a failure instar opens one more connection, negotiates NBD up to STARTTLS, and runs
 * the TLS handshake with gnutls itself to learn the reason. The check decides nothing: libnbd already refused the
 * server. gnutls is the copy libnbd loaded (dlopen, no link), so a process without NBD never loads it. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

#define HIDDEN __attribute__((visibility("hidden")))

static struct {
    int (*init)(gnutls_session_t *, unsigned int);
    void (*deinit)(gnutls_session_t);
    int (*set_default_priority)(gnutls_session_t);
    int (*cred_alloc)(gnutls_certificate_credentials_t *);
    void (*cred_free)(gnutls_certificate_credentials_t);
    int (*trust_file)(gnutls_certificate_credentials_t, const char *, gnutls_x509_crt_fmt_t);
    int (*crl_file)(gnutls_certificate_credentials_t, const char *, gnutls_x509_crt_fmt_t);
    int (*key_file)(gnutls_certificate_credentials_t, const char *, const char *, gnutls_x509_crt_fmt_t);
    void (*set_verify_function)(gnutls_certificate_credentials_t, gnutls_certificate_verify_function *);
    int (*credentials_set)(gnutls_session_t, gnutls_credentials_type_t, void *);
    int (*server_name_set)(gnutls_session_t, gnutls_server_name_type_t, const void *, size_t);
    void (*transport_set_int2)(gnutls_session_t, int, int);
    void (*session_set_ptr)(gnutls_session_t, void *);
    void *(*session_get_ptr)(gnutls_session_t);
    int (*handshake)(gnutls_session_t);
    int (*error_is_fatal)(int);
    const char *(*strerror)(int);
    int (*verify_peers2)(gnutls_session_t, unsigned int *);
    const gnutls_datum_t *(*get_peers)(gnutls_session_t, unsigned int *);
    int (*crt_init)(gnutls_x509_crt_t *);
    void (*crt_deinit)(gnutls_x509_crt_t);
    int (*crt_import)(gnutls_x509_crt_t, const gnutls_datum_t *, gnutls_x509_crt_fmt_t);
    time_t (*crt_expiration)(gnutls_x509_crt_t);
    time_t (*crt_activation)(gnutls_x509_crt_t);
    unsigned (*crt_check_hostname)(gnutls_x509_crt_t, const char *);
} g;
static int g_ready;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static void load(void) {
    void *lib = dlopen("libgnutls.so.30", RTLD_NOW | RTLD_LOCAL);
    if (!lib) return;
#define SYM(field, name) if (!(*(void **)&g.field = dlsym(lib, name))) return
    SYM(init, "gnutls_init"); SYM(deinit, "gnutls_deinit"); SYM(set_default_priority, "gnutls_set_default_priority");
    SYM(cred_alloc, "gnutls_certificate_allocate_credentials");
    SYM(cred_free, "gnutls_certificate_free_credentials");
    SYM(trust_file, "gnutls_certificate_set_x509_trust_file");
    SYM(crl_file, "gnutls_certificate_set_x509_crl_file");
    SYM(key_file, "gnutls_certificate_set_x509_key_file");
    SYM(set_verify_function, "gnutls_certificate_set_verify_function");
    SYM(credentials_set, "gnutls_credentials_set"); SYM(server_name_set, "gnutls_server_name_set");
    SYM(transport_set_int2, "gnutls_transport_set_int2");
    SYM(session_set_ptr, "gnutls_session_set_ptr"); SYM(session_get_ptr, "gnutls_session_get_ptr");
    SYM(handshake, "gnutls_handshake"); SYM(error_is_fatal, "gnutls_error_is_fatal");
    SYM(strerror, "gnutls_strerror"); SYM(verify_peers2, "gnutls_certificate_verify_peers2");
    SYM(get_peers, "gnutls_certificate_get_peers"); SYM(crt_init, "gnutls_x509_crt_init");
    SYM(crt_deinit, "gnutls_x509_crt_deinit"); SYM(crt_import, "gnutls_x509_crt_import");
    SYM(crt_expiration, "gnutls_x509_crt_get_expiration_time");
    SYM(crt_activation, "gnutls_x509_crt_get_activation_time");
    SYM(crt_check_hostname, "gnutls_x509_crt_check_hostname");
#undef SYM
    g_ready = 1;
}

struct diag {
    const char *hostname;
    char *reason;
    size_t len;
};

/* qcrypto_tls_session_check_certificate's checks, in its order; sets the reason of the first that fails. */
static int verify_cb(gnutls_session_t s) {
    struct diag *d = g.session_get_ptr(s);
    unsigned int status = 0, n = 0;
    time_t now = time(NULL);
    int ret = g.verify_peers2(s, &status);
    if (ret < 0) {
        snprintf(d->reason, d->len, "Verify failed: %s", g.strerror(ret));
        return -1;
    }
    if (status != 0) {
        const char *r = "Invalid certificate";
        if (status & GNUTLS_CERT_INVALID) r = "The certificate is not trusted";
        if (status & GNUTLS_CERT_SIGNER_NOT_FOUND) r = "The certificate hasn't got a known issuer";
        if (status & GNUTLS_CERT_REVOKED) r = "The certificate has been revoked";
        if (status & GNUTLS_CERT_INSECURE_ALGORITHM) r = "The certificate uses an insecure algorithm";
        snprintf(d->reason, d->len, "%s", r);
        return -1;
    }
    const gnutls_datum_t *certs = g.get_peers(s, &n);
    if (!certs) {
        snprintf(d->reason, d->len, "No certificate peers");
        return -1;
    }
    for (unsigned int i = 0; i < n && i < 64; i++) {
        gnutls_x509_crt_t c;
        if (g.crt_init(&c) < 0) return -1;
        if (g.crt_import(c, &certs[i], GNUTLS_X509_FMT_DER) < 0) {
            g.crt_deinit(c);
            return -1;
        }
        const char *r = NULL;
        if (g.crt_expiration(c) < now) r = "The certificate has expired";
        else if (g.crt_activation(c) > now) r = "The certificate is not yet activated";
        if (r) snprintf(d->reason, d->len, "%s", r);
        else if (i == 0 && d->hostname && !g.crt_check_hostname(c, d->hostname))
            snprintf(d->reason, d->len, "Certificate does not match the hostname %s", d->hostname);
        g.crt_deinit(c);
        if (d->reason[0]) return -1;
    }
    return -1; /* nothing more to learn: end the handshake */
}

static int read_all(int fd, void *buf, size_t n) {
    size_t done = 0;
    while (done < n) {
        ssize_t r = read(fd, (char *)buf + done, n - done);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        done += (size_t)r;
    }
    return 0;
}

static int write_all(int fd, const void *buf, size_t n) {
    size_t done = 0;
    while (done < n) {
        ssize_t r = write(fd, (const char *)buf + done, n - done);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        done += (size_t)r;
    }
    return 0;
}

static uint64_t be64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = v << 8 | p[i];
    return v;
}

/* Takes `fd` (a fresh connection to the server, closed here). The newstyle handshake up to NBD_OPT_STARTTLS, then
 * a TLS handshake trusting `cadir`/ca-cert.pem (with its CRL and client certificate when present). Returns 0 with
 * the reason in `reason` (qemu's message), or -1 when none was learnt. */
HIDDEN int instar_nbd_tls_diagnose(int fd, const char *cadir, const char *hostname, char *reason, size_t len) {
    int rc = -1;
    char path[4096], key[4096];
    unsigned char greet[18], reply[20];
    gnutls_certificate_credentials_t cred = NULL;
    gnutls_session_t s = NULL;
    struct diag d = { hostname, reason, len };
    struct timeval tv = { 10, 0 };
    if (len == 0) goto out;
    reason[0] = '\0';
    pthread_once(&g_once, load);
    if (!g_ready) goto out;
    /* a silent server must not hang the error path */
    (void)setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    (void)setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (read_all(fd, greet, sizeof greet) < 0) goto out;
    if (memcmp(greet, "NBDMAGIC", 8) != 0 || be64(greet + 8) != 0x49484156454F5054ULL) goto out;
    {
        unsigned char cflags[4] = { 0, 0, 0, (unsigned char)(1 | (greet[17] & 2)) };
        unsigned char opt[16] = { 'I', 'H', 'A', 'V', 'E', 'O', 'P', 'T', 0, 0, 0, 5, 0, 0, 0, 0 };
        if (write_all(fd, cflags, 4) < 0 || write_all(fd, opt, 16) < 0) goto out;
    }
    if (read_all(fd, reply, sizeof reply) < 0 || be64(reply) != 0x3e889045565a9ULL) goto out;
    /* NBD_REP_ACK with no payload */
    if ((reply[12] | reply[13] | reply[14]) != 0 || reply[15] != 1) goto out;
    if ((reply[16] | reply[17] | reply[18] | reply[19]) != 0) goto out;
    if (g.cred_alloc(&cred) < 0) goto out;
    snprintf(path, sizeof path, "%s/ca-cert.pem", cadir);
    if (g.trust_file(cred, path, GNUTLS_X509_FMT_PEM) < 0) goto out;
    snprintf(path, sizeof path, "%s/ca-crl.pem", cadir);
    if (access(path, R_OK) == 0) (void)g.crl_file(cred, path, GNUTLS_X509_FMT_PEM);
    snprintf(path, sizeof path, "%s/client-cert.pem", cadir);
    snprintf(key, sizeof key, "%s/client-key.pem", cadir);
    if (access(path, R_OK) == 0 && access(key, R_OK) == 0) (void)g.key_file(cred, path, key, GNUTLS_X509_FMT_PEM);
    g.set_verify_function(cred, verify_cb);
    if (g.init(&s, GNUTLS_CLIENT) < 0) { s = NULL; goto out; }
    if (g.set_default_priority(s) < 0 || g.credentials_set(s, GNUTLS_CRD_CERTIFICATE, cred) < 0) goto out;
    if (hostname) (void)g.server_name_set(s, GNUTLS_NAME_DNS, hostname, strlen(hostname));
    g.session_set_ptr(s, &d);
    g.transport_set_int2(s, fd, fd);
    for (int i = 0; i < 1000; i++) {
        int r = g.handshake(s);
        if (r == 0 || g.error_is_fatal(r)) break;
    }
    rc = reason[0] ? 0 : -1;
out:
    if (s) g.deinit(s);
    if (cred) g.cred_free(cred);
    close(fd);
    return rc;
}
