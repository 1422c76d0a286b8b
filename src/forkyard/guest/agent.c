/*
 * forkyard guest agent: PID 1 of every sandbox.
 *
 * The initramfs mounts the root filesystem, copies this binary into a tmpfs
 * and switch_root's to it, so base images never need to contain forkyard
 * code (their digest depends only on the user's files).
 *
 * It speaks the forkyard agent protocol (see forkyard/guest/protocol.py, the
 * authoritative description) over a virtio-serial port named "agent", which
 * is flow controlled: unlike a 16550 UART it never drops bytes when the host
 * writes faster than a TCG guest reads.
 *
 * Design notes (why, not what):
 *  - A partial request that gets no more bytes for PARTIAL_IDLE_MS is
 *    dropped.  The host writes each request in one go, so a stalled partial
 *    request is debris (a host that went away mid-write); if it stayed, it
 *    would swallow every later request.  We cannot rely on seeing the host
 *    disconnect: a quick close and reconnect can reach us as one event.
 *  - One thread, one poll() loop.  Commands run as children whose pipes sit in
 *    the same poll set, so many execs can run at once and a slow command never
 *    blocks file operations.
 *  - Every request is ACKed as soon as it has been read completely.  The host
 *    waits for all ACKs before pausing the VM for a checkpoint, so a snapshot
 *    never contains half a request in the guest: a fork can start a new
 *    session on the same port without stale input.
 *  - The host may disconnect at any time (checkpoint restored elsewhere,
 *    worker restart).  On POLLHUP we drop buffered input and output; commands
 *    keep running, their replies are simply not sent to the new session.
 *  - An exec reply is sent when the command's main process exits.  We do not
 *    wait for EOF on its pipes: a background child (`sleep 1000 &`) keeps
 *    them open forever.
 *  - As PID 1 we must never exit (the kernel would panic) and must reap every
 *    orphan, so SIGCHLD comes through a signalfd and unknown pids are reaped
 *    silently.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <ftw.h>
#include <limits.h>
#include <net/if.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/sysmacros.h>
#include <sys/vfs.h>
#include <arpa/inet.h>
#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/random.h>
#include <linux/sock_diag.h>
#include <net/route.h>
#include <netinet/in.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define AGENT_VERSION "forkyard-agent 3"
#define MAGIC 0x31594b46u /* "FKY1" little endian */
#define HDR_LEN 16
#define MAX_PAYLOAD (80u * 1024u * 1024u)
#define MAX_EXECS 256
#define DEFAULT_MAX_OUTPUT (16u * 1024u * 1024u)
/* Reply bounds, the same as the host's (client.py): the host refuses a reply
   over them, so a bigger one would only fail there after costing guest memory. */
#define MAX_OUTPUT (64u * 1024u * 1024u)     /* per exec stream */
#define MAX_FILE (64u * 1024u * 1024u)       /* read_file data */
#define DEFAULT_LIST_ENTRIES 10000u
#define MAX_LIST_ENTRIES 100000u
#define PARTIAL_IDLE_MS 5000
/*
 * Reads from one command's pipe per wakeup.  A command that writes as fast
 * as we read (`cat /dev/zero`) refills its pipe between our reads on a
 * one-vCPU guest: draining "until EAGAIN" then never ends and the host's
 * requests starve.  poll() reports the pipe again next round.
 */
#define DRAIN_READS 4
/* after the command exited: enough for a full pipe (1 MiB at most), still bounded
   since a background child may go on writing */
#define FINAL_DRAIN_READS 32
/* The agent outranks the commands it runs, so a CPU-bound guest still answers. */
#define AGENT_NICE (-10)

/* ops */
enum {
    OP_HELLO = 1, OP_EXEC = 2, OP_WRITE_FILE = 3, OP_READ_FILE = 4, OP_STAT = 5,
    OP_LIST = 6, OP_REMOVE = 7, OP_MKDIR = 8, OP_SYNC = 9, OP_KILL = 10,
    OP_POWEROFF = 11, OP_SPAWN = 12, OP_PROC_READ = 13, OP_PROC_INPUT = 14,
    OP_PROC_LIST = 15, OP_PTY_RESIZE = 16, OP_RENAME = 17, OP_SYMLINK = 18,
    OP_READLINK = 19, OP_ACK = 0x7fff,
};
#define FL_RESPONSE 1u
#define FL_ERROR 2u

/* tags */
enum {
    T_ARGV = 1, T_SHELL = 2, T_ENV = 3, T_CWD = 4, T_TIMEOUT_MS = 5, T_STDIN = 6,
    T_PATH = 7, T_DATA = 8, T_MODE = 9, T_EXIT_CODE = 10, T_STDOUT = 11, T_STDERR = 12,
    T_SIGNAL = 13, T_TIMED_OUT = 14, T_ERRNO = 15, T_MESSAGE = 16, T_KIND = 17,
    T_TIME_NS = 18, T_VERSION = 19, T_FLAGS = 20, T_PID = 21, T_ENTRY = 22, T_SIZE = 23,
    T_MAX_OUTPUT = 24, T_UPTIME_MS = 25, T_OFFSET = 26, T_LENGTH = 27, T_TRUNCATED = 28,
    T_NONCE = 29, T_MAX_ENTRIES = 30, T_ERR_OFFSET = 31, T_WAIT_MS = 32, T_EXITED = 33,
    T_PROC = 34, T_ROWS = 35, T_COLS = 36, T_USER = 37, T_TARGET = 38,
};

/* T_FLAGS bits */
#define F_EXEC_BACKGROUND 1u
#define F_WRITE_MKDIRS 1u
#define F_WRITE_APPEND 2u
#define F_WRITE_AT 4u
#define F_REMOVE_RECURSIVE 1u
#define F_MKDIR_PARENTS 1u
#define F_MKDIR_CHMOD 2u
#define F_RENAME_SYNC 1u
#define F_RENAME_NOREPLACE 2u
#define F_SYNC_DROP_CACHES 1u

/* ------------------------------------------------------------------ */
/* growable byte buffer                                               */

typedef struct {
    uint8_t *p;
    size_t len, cap;
} buf_t;

static void die_oom(void)
{
    /* PID 1 cannot exit; an allocation failure means the guest is unusable. */
    static const char m[] = "forkyard-agent: out of memory\n";
    if (write(2, m, sizeof m - 1) < 0) { /* nothing to do */ }
    for (;;) pause();
}

static void buf_reserve(buf_t *b, size_t extra)
{
    if (b->len + extra <= b->cap) return;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra) cap *= 2;
    uint8_t *p = realloc(b->p, cap);
    if (!p) die_oom();
    b->p = p;
    b->cap = cap;
}

static void buf_put(buf_t *b, const void *d, size_t n)
{
    buf_reserve(b, n);
    if (n) memcpy(b->p + b->len, d, n);
    b->len += n;
}

static void buf_free(buf_t *b)
{
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

static void put_u16(buf_t *b, uint16_t v) { uint8_t x[2] = {v, v >> 8}; buf_put(b, x, 2); }
static void put_u32(buf_t *b, uint32_t v)
{
    uint8_t x[4] = {v, v >> 8, v >> 16, v >> 24};
    buf_put(b, x, 4);
}
static void put_u64(buf_t *b, uint64_t v)
{
    uint8_t x[8];
    for (int i = 0; i < 8; i++) x[i] = (uint8_t)(v >> (8 * i));
    buf_put(b, x, 8);
}
static uint16_t get_u16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t get_u64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

/* TLV writers */
static void tlv(buf_t *b, uint16_t tag, const void *d, size_t n)
{
    put_u16(b, tag);
    put_u32(b, (uint32_t)n);
    buf_put(b, d, n);
}
static void tlv_u64(buf_t *b, uint16_t tag, uint64_t v)
{
    put_u16(b, tag);
    put_u32(b, 8);
    put_u64(b, v);
}
static void tlv_str(buf_t *b, uint16_t tag, const char *s) { tlv(b, tag, s, strlen(s)); }

/* ------------------------------------------------------------------ */
/* request parsing                                                    */

typedef struct {
    uint16_t tag;
    uint32_t len;
    const uint8_t *val;
} field_t;

typedef struct {
    field_t *f;
    size_t n;
} fields_t;

static int parse_fields(const uint8_t *p, size_t len, fields_t *out)
{
    size_t cap = 16, off = 0;
    out->n = 0;
    out->f = malloc(cap * sizeof *out->f);
    if (!out->f) die_oom();
    while (off < len) {
        if (len - off < 6) return -1;
        uint16_t tag = get_u16(p + off);
        uint32_t flen = get_u32(p + off + 2);
        off += 6;
        if (flen > len - off) return -1;
        if (out->n == cap) {
            cap *= 2;
            field_t *nf = realloc(out->f, cap * sizeof *out->f);
            if (!nf) die_oom();
            out->f = nf;
        }
        out->f[out->n++] = (field_t){tag, flen, p + off};
        off += flen;
    }
    return 0;
}

static const field_t *field(const fields_t *fs, uint16_t tag)
{
    for (size_t i = 0; i < fs->n; i++)
        if (fs->f[i].tag == tag) return &fs->f[i];
    return NULL;
}

/* NUL-terminated copy of a string field (caller frees); NULL if absent or has NUL */
static char *field_str(const fields_t *fs, uint16_t tag)
{
    const field_t *f = field(fs, tag);
    if (!f || memchr(f->val, 0, f->len)) return NULL;
    char *s = malloc(f->len + 1);
    if (!s) die_oom();
    memcpy(s, f->val, f->len);
    s[f->len] = 0;
    return s;
}

static uint64_t field_u64(const fields_t *fs, uint16_t tag, uint64_t dflt)
{
    const field_t *f = field(fs, tag);
    return (f && f->len == 8) ? get_u64(f->val) : dflt;
}

/* ------------------------------------------------------------------ */
/* port + output queue                                                */

static int port_fd = -1;
static buf_t inbuf;          /* bytes read from the host, not yet parsed */
static struct timespec last_input; /* when bytes last arrived (monotonic) */
static buf_t outbuf;         /* frames waiting to be written             */
static size_t out_off;       /* how much of outbuf has been written      */
static uint32_t session = 1; /* bumped on every host disconnect          */
static int host_up = 1;      /* 0 after POLLHUP until data flows again   */

static void logmsg(const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n >= sizeof line) n = sizeof line - 1;
    int fd = open("/dev/kmsg", O_WRONLY | O_CLOEXEC);
    if (fd >= 0) {
        if (write(fd, line, (size_t)n) < 0) { /* best effort */ }
        close(fd);
    }
}

static void send_frame(uint16_t op, uint16_t flags, uint32_t id, const buf_t *payload)
{
    size_t plen = payload ? payload->len : 0;
    put_u32(&outbuf, MAGIC);
    put_u16(&outbuf, op);
    put_u16(&outbuf, flags);
    put_u32(&outbuf, id);
    put_u32(&outbuf, (uint32_t)plen);
    if (plen) buf_put(&outbuf, payload->p, plen);
}

static const char *errno_kind(int e)
{
    switch (e) {
    case ENOENT: return "not_found";
    case EEXIST: return "exists";
    case EACCES: case EPERM: case EROFS: return "permission";
    case EISDIR: return "is_directory";
    case ENOTDIR: return "not_directory";
    case ENOTEMPTY: return "not_empty";
    case EFBIG: case E2BIG: return "too_large";
    case EINVAL: return "bad_request";
    case ENOSPC: case EDQUOT: return "no_space";
    default: return "io";
    }
}

static void send_error(uint16_t op, uint32_t id, const char *kind, int err, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    buf_t b = {0};
    tlv_str(&b, T_KIND, kind ? kind : errno_kind(err));
    tlv_u64(&b, T_ERRNO, (uint64_t)err);
    tlv_str(&b, T_MESSAGE, msg);
    send_frame(op, FL_RESPONSE | FL_ERROR, id, &b);
    buf_free(&b);
}

static void send_errno(uint16_t op, uint32_t id, const char *what, const char *path)
{
    int e = errno;
    send_error(op, id, NULL, e, "%s %s: %s", what, path ? path : "", strerror(e));
}

static void drop_session(void)
{
    /* The host went away: nothing buffered belongs to the next host. */
    inbuf.len = 0;
    buf_free(&outbuf);
    out_off = 0;
    session++;
    host_up = 0;
}

/* ------------------------------------------------------------------ */
/* users                                                              */

/*
 * /etc/passwd and /etc/group are parsed here rather than with getpwnam():
 * a static glibc's NSS needs shared libraries the image may not have.
 */
typedef struct {
    uid_t uid;
    gid_t gid;
    char name[64], home[256], shell[256];
    gid_t groups[64];
    int ngroups;
} user_t;

static int lookup_user(const char *name, user_t *u)
{
    FILE *f = fopen("/etc/passwd", "re");
    if (!f) return -1;
    char line[1024];
    int found = 0;
    while (!found && fgets(line, sizeof line, f)) {
        char *save = NULL, *fld[7] = {0};
        int k = 0;
        for (char *t = strtok_r(line, ":\n", &save); t && k < 7; t = strtok_r(NULL, ":\n", &save))
            fld[k++] = t;
        /* strtok collapses an empty password field ("user::1000:..."): accept 6 fields */
        if (k < 6 || strcmp(fld[0], name) != 0) continue;
        int off = k == 7 ? 0 : -1;
        char *end;
        unsigned long uid = strtoul(fld[2 + off], &end, 10);
        unsigned long gid = strtoul(fld[3 + off], &end, 10);
        snprintf(u->name, sizeof u->name, "%s", fld[0]);
        u->uid = (uid_t)uid;
        u->gid = (gid_t)gid;
        snprintf(u->home, sizeof u->home, "%s", fld[5 + off] ? fld[5 + off] : "/");
        snprintf(u->shell, sizeof u->shell, "%s", (k == 7 && fld[6]) ? fld[6] : "/bin/sh");
        found = 1;
    }
    fclose(f);
    if (!found) { errno = ENOENT; return -1; }
    u->groups[0] = u->gid;
    u->ngroups = 1;
    FILE *g = fopen("/etc/group", "re");
    while (g && fgets(line, sizeof line, g) && u->ngroups < 64) {
        char *c1 = strchr(line, ':'), *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
        char *c3 = c2 ? strchr(c2 + 1, ':') : NULL;
        if (!c3) continue;
        gid_t gid = (gid_t)strtoul(c2 + 1, NULL, 10);
        char *save = NULL;
        for (char *t = strtok_r(c3 + 1, ",\n", &save); t; t = strtok_r(NULL, ",\n", &save))
            if (strcmp(t, name) == 0 && gid != u->gid) u->groups[u->ngroups++] = gid;
    }
    if (g) fclose(g);
    return 0;
}

/* in the child, after fork: become `u` (groups first, then gid, then uid) */
static int become_user(const user_t *u)
{
    if (setgroups((size_t)u->ngroups, u->groups) != 0) return -1;
    if (setgid(u->gid) != 0) return -1;
    if (setuid(u->uid) != 0) return -1;
    return 0;
}

/* the user's identity in the environment, unless the caller set those names */
static char **user_env(char **uenv, const user_t *u, int pty, char *store[5])
{
    size_t n = 0;
    while (uenv[n]) n++;
    char **v = calloc(n + 6, sizeof *v);
    if (!v) die_oom();
    size_t k = 0;
    for (size_t i = 0; i < n; i++) v[k++] = uenv[i];
    const char *names[5] = {"HOME=", "USER=", "LOGNAME=", "SHELL=", "TERM="};
    const char *vals[5] = {u ? u->home : NULL, u ? u->name : NULL, u ? u->name : NULL,
                           u ? u->shell : NULL, pty ? "xterm-256color" : NULL};
    for (int j = 0; j < 5; j++) {
        store[j] = NULL;
        if (!vals[j]) continue;
        int given = 0;
        for (size_t i = 0; i < n; i++)
            if (strncmp(uenv[i], names[j], strlen(names[j])) == 0) given = 1;
        if (given) continue;
        size_t len = strlen(names[j]) + strlen(vals[j]) + 1;
        store[j] = malloc(len);
        if (!store[j]) die_oom();
        snprintf(store[j], len, "%s%s", names[j], vals[j]);
        v[k++] = store[j];
    }
    v[k] = NULL;
    return v;
}

/* ------------------------------------------------------------------ */
/* exec                                                               */

typedef struct {
    int used;
    pid_t pid;
    uint32_t id, session;
    int out_fd, err_fd, in_fd;
    buf_t out, err, in;
    size_t in_off;
    uint64_t max_output;
    int truncated, timed_out, exited;
    int status;
    struct timespec deadline; /* tv_sec == 0: none */
} exec_t;

static exec_t execs[MAX_EXECS];

/*
 * Pipes of finished commands that a background child still holds open.
 * Closing our end would kill that child with SIGPIPE on its next write
 * (`server &` logging to stdout), so we keep reading and discard.
 */
#define MAX_DISCARD 1024
static int discard_fds[MAX_DISCARD];
static int n_discard;

static void keep_draining(int fd)
{
    if (n_discard < MAX_DISCARD) discard_fds[n_discard++] = fd;
    else close(fd);
}

static void set_nonblock(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

static struct timespec now_mono(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t;
}

static long ms_until(struct timespec t)
{
    struct timespec n = now_mono();
    return (t.tv_sec - n.tv_sec) * 1000 + (t.tv_nsec - n.tv_nsec) / 1000000;
}

static char **collect_strs(const fields_t *fs, uint16_t tag, size_t *count)
{
    size_t n = 0;
    for (size_t i = 0; i < fs->n; i++)
        if (fs->f[i].tag == tag) n++;
    char **v = calloc(n + 1, sizeof *v);
    if (!v) die_oom();
    size_t k = 0;
    for (size_t i = 0; i < fs->n; i++) {
        if (fs->f[i].tag != tag) continue;
        if (memchr(fs->f[i].val, 0, fs->f[i].len)) continue;
        v[k] = malloc(fs->f[i].len + 1);
        if (!v[k]) die_oom();
        memcpy(v[k], fs->f[i].val, fs->f[i].len);
        v[k][fs->f[i].len] = 0;
        k++;
    }
    v[k] = NULL;
    if (count) *count = k;
    return v;
}

static void free_strs(char **v)
{
    if (!v) return;
    for (char **p = v; *p; p++) free(*p);
    free(v);
}

static const char *default_env[] = {
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME=/root", "LANG=C.UTF-8", "TERM=dumb", "USER=root", "LOGNAME=root", NULL,
};

/* default env, with user entries overriding by name */
static char **build_env(char **user)
{
    size_t nu = 0, nd = 0;
    while (user[nu]) nu++;
    while (default_env[nd]) nd++;
    char **env = calloc(nu + nd + 1, sizeof *env);
    if (!env) die_oom();
    size_t k = 0;
    for (size_t i = 0; i < nd; i++) {
        size_t klen = strchr(default_env[i], '=') - default_env[i] + 1;
        int overridden = 0;
        for (size_t j = 0; j < nu; j++)
            if (strncmp(user[j], default_env[i], klen) == 0) overridden = 1;
        if (!overridden) env[k++] = (char *)default_env[i];
    }
    for (size_t j = 0; j < nu; j++) env[k++] = user[j];
    env[k] = NULL;
    return env;
}

static void op_exec(uint32_t id, const fields_t *fs)
{
    int slot = -1;
    for (int i = 0; i < MAX_EXECS; i++)
        if (!execs[i].used) { slot = i; break; }
    if (slot < 0) {
        send_error(OP_EXEC, id, "busy", EAGAIN, "too many running commands (%d)", MAX_EXECS);
        return;
    }
    size_t argc = 0;
    char **argv = collect_strs(fs, T_ARGV, &argc);
    char *shell = field_str(fs, T_SHELL);
    if (shell) {
        free_strs(argv);
        argv = calloc(4, sizeof *argv);
        if (!argv) die_oom();
        argv[0] = strdup("/bin/sh");
        argv[1] = strdup("-c");
        argv[2] = shell;
        argc = 3;
    }
    if (argc == 0) {
        free_strs(argv);
        send_error(OP_EXEC, id, "bad_request", EINVAL, "exec needs argv or a shell command");
        return;
    }
    char *uname = field_str(fs, T_USER);
    user_t user, *u = NULL;
    if (uname) {
        int found = lookup_user(uname, &user) == 0;
        if (!found) send_error(OP_EXEC, id, "not_found", ENOENT, "no user %s in /etc/passwd", uname);
        free(uname);
        if (!found) { free_strs(argv); return; }
        u = &user;
    }
    char **uenv = collect_strs(fs, T_ENV, NULL);
    char *store[5];
    char **wenv = user_env(uenv, u, 0, store);
    char **env = build_env(wenv);
    char *cwd = field_str(fs, T_CWD);
    uint64_t flags = field_u64(fs, T_FLAGS, 0);
    int background = (flags & F_EXEC_BACKGROUND) != 0;
    const field_t *stdin_f = field(fs, T_STDIN);

    int outp[2] = {-1, -1}, errp[2] = {-1, -1}, inp[2] = {-1, -1}, errpipe[2] = {-1, -1};
    int ok = pipe2(errpipe, O_CLOEXEC) == 0;
    if (ok && !background) ok = pipe2(outp, O_CLOEXEC) == 0 && pipe2(errp, O_CLOEXEC) == 0;
    if (ok && stdin_f && !background) ok = pipe2(inp, O_CLOEXEC) == 0;
    if (!ok) {
        send_errno(OP_EXEC, id, "pipe", "");
        goto out;
    }

    pid_t pid = fork();
    if (pid < 0) {
        send_errno(OP_EXEC, id, "fork", "");
        goto out;
    }
    if (pid == 0) {
        sigset_t all;
        sigemptyset(&all);
        sigprocmask(SIG_SETMASK, &all, NULL);
        for (int s = 1; s < NSIG; s++) signal(s, SIG_DFL);
        setpriority(PRIO_PROCESS, 0, 0); /* commands do not inherit the agent's rank */
        setsid();
        int devnull = open("/dev/null", O_RDWR);
        dup2(inp[0] >= 0 ? inp[0] : devnull, 0);
        dup2(background ? devnull : outp[1], 1);
        dup2(background ? devnull : errp[1], 2);
        int report[2] = {1, 0}; /* stage (1 chdir, 2 exec, 3 user), errno */
        if (u && become_user(u) != 0) {
            report[0] = 3;
            report[1] = errno;
            if (write(errpipe[1], report, sizeof report) < 0) { /* parent sees EOF */ }
            _exit(127);
        }
        if (cwd && chdir(cwd) != 0) {
            report[1] = errno;
            if (write(errpipe[1], report, sizeof report) < 0) { /* parent sees EOF */ }
            _exit(127);
        }
        if (!cwd && chdir(u ? u->home : "/root") != 0 && chdir("/") != 0) { /* stay */ }
        execvpe(argv[0], argv, env);
        report[0] = 2;
        report[1] = errno;
        if (write(errpipe[1], report, sizeof report) < 0) { /* parent sees EOF */ }
        _exit(127);
    }
    close(errpipe[1]);
    errpipe[1] = -1;
    int report[2] = {0, 0};
    ssize_t r;
    do r = read(errpipe[0], report, sizeof report);
    while (r < 0 && errno == EINTR);
    if (r == (ssize_t)sizeof report) {
        /* exec (or chdir) failed: a typed error beats a mysterious exit 127 */
        waitpid(pid, NULL, 0);
        errno = report[1];
        if (report[0] == 1) send_errno(OP_EXEC, id, "chdir", cwd);
        else if (report[0] == 3) send_errno(OP_EXEC, id, "become user", "");
        else send_errno(OP_EXEC, id, "exec", argv[0]);
        goto out;
    }
    if (background) {
        buf_t b = {0};
        tlv_u64(&b, T_PID, (uint64_t)pid);
        send_frame(OP_EXEC, FL_RESPONSE, id, &b);
        buf_free(&b);
        goto out; /* reaped later as an orphan */
    }
    exec_t *x = &execs[slot];
    memset(x, 0, sizeof *x);
    x->used = 1;
    x->pid = pid;
    x->id = id;
    x->session = session;
    x->out_fd = outp[0];
    x->err_fd = errp[0];
    x->in_fd = -1;
    outp[0] = errp[0] = -1;
    set_nonblock(x->out_fd);
    set_nonblock(x->err_fd);
    if (inp[1] >= 0) {
        x->in_fd = inp[1];
        inp[1] = -1;
        set_nonblock(x->in_fd);
        buf_put(&x->in, stdin_f->val, stdin_f->len);
    }
    x->max_output = field_u64(fs, T_MAX_OUTPUT, DEFAULT_MAX_OUTPUT);
    if (x->max_output > MAX_OUTPUT) x->max_output = MAX_OUTPUT;
    uint64_t tmo = field_u64(fs, T_TIMEOUT_MS, 0);
    if (tmo) {
        x->deadline = now_mono();
        x->deadline.tv_sec += (time_t)(tmo / 1000);
        x->deadline.tv_nsec += (long)(tmo % 1000) * 1000000L;
        if (x->deadline.tv_nsec >= 1000000000L) {
            x->deadline.tv_sec++;
            x->deadline.tv_nsec -= 1000000000L;
        }
    }
out:
    for (int i = 0; i < 2; i++) {
        if (outp[i] >= 0) close(outp[i]);
        if (errp[i] >= 0) close(errp[i]);
        if (inp[i] >= 0) close(inp[i]);
        if (errpipe[i] >= 0) close(errpipe[i]);
    }
    free_strs(argv);
    free(env); /* entries belong to uenv / default_env */
    free(wenv);
    for (int j = 0; j < 5; j++) free(store[j]);
    free_strs(uenv);
    free(cwd);
}

/* read what is available; returns 1 on EOF/error (fd closed) */
static int drain_fd(int *fd, buf_t *b, exec_t *x, int budget)
{
    uint8_t tmp[65536];
    for (int reads = 0; reads < budget;) {
        ssize_t n = read(*fd, tmp, sizeof tmp);
        if (n > 0) {
            size_t room = b->len < x->max_output ? x->max_output - b->len : 0;
            size_t take = (size_t)n < room ? (size_t)n : room;
            buf_put(b, tmp, take);
            if (take < (size_t)n) x->truncated = 1;
            reads++;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) return 0;
        close(*fd);
        *fd = -1;
        return 1;
    }
    return 0;
}

static void finish_exec(exec_t *x)
{
    if (x->out_fd >= 0) drain_fd(&x->out_fd, &x->out, x, FINAL_DRAIN_READS);
    if (x->err_fd >= 0) drain_fd(&x->err_fd, &x->err, x, FINAL_DRAIN_READS);
    if (x->session == session) {
        buf_t b = {0};
        int code = -1;
        if (WIFEXITED(x->status)) code = WEXITSTATUS(x->status);
        if (WIFSIGNALED(x->status)) {
            code = 128 + WTERMSIG(x->status);
            tlv_u64(&b, T_SIGNAL, (uint64_t)WTERMSIG(x->status));
        }
        tlv_u64(&b, T_EXIT_CODE, (uint64_t)(int64_t)code);
        tlv_u64(&b, T_PID, (uint64_t)x->pid);
        if (x->timed_out) tlv_u64(&b, T_TIMED_OUT, 1);
        if (x->truncated) tlv_u64(&b, T_TRUNCATED, 1);
        tlv(&b, T_STDOUT, x->out.p, x->out.len);
        tlv(&b, T_STDERR, x->err.p, x->err.len);
        send_frame(OP_EXEC, FL_RESPONSE, x->id, &b);
        buf_free(&b);
    }
    if (x->out_fd >= 0) keep_draining(x->out_fd);
    if (x->err_fd >= 0) keep_draining(x->err_fd);
    if (x->in_fd >= 0) close(x->in_fd);
    buf_free(&x->out);
    buf_free(&x->err);
    buf_free(&x->in);
    x->used = 0;
}

static void proc_reaped(pid_t p, int st);

static void reap(void)
{
    for (;;) {
        int st;
        pid_t p = waitpid(-1, &st, WNOHANG);
        if (p <= 0) return;
        for (int i = 0; i < MAX_EXECS; i++) {
            if (execs[i].used && execs[i].pid == p) {
                execs[i].exited = 1;
                execs[i].status = st;
            }
        }
        proc_reaped(p, st);
    }
}

/* ------------------------------------------------------------------ */
/* processes: spawned commands with a scrollback the host reads       */

/*
 * Live output without unbounded replies: a spawned process's stdout and
 * stderr go to two rings of RING_CAP bytes, addressed by absolute offsets.
 * The host pulls with PROC_READ(offsets, max bytes, wait): the reply holds
 * what lies at those offsets, at most PROC_READ_MAX per stream, or waits up
 * to WAIT_MS for some.  So every reply stays bounded and a client that never
 * reads costs nothing on the channel.
 *  - Lossless processes (F_SPAWN_LOSSLESS: a foreground exec) stop being
 *    read once a ring holds RING_CAP bytes the host has not asked past:
 *    the command blocks in write(), as behind a slow terminal.
 *  - Others (background) overwrite their oldest output: the host sees the
 *    gap as a start offset beyond the one it asked for.
 * An exited process stays in the table (exit status + scrollback) until a
 * new one needs its slot, oldest first.
 */
#define MAX_PROCS 64 /* rings are allocated on first output: idle ones cost nothing */
#define RING_CAP (1024u * 1024u)
#define PROC_READ_MAX (1024u * 1024u)
#define PROC_IN_MAX (1u * 1024u * 1024u)
#define MAX_WAITERS 128
#define PROC_CMD_MAX 256
#define PROC_OWNER 100000 /* poll owner ids of process fds start here */

typedef struct {
    uint8_t *p;          /* RING_CAP bytes, allocated on first output */
    uint64_t start, end; /* absolute offsets of the bytes held */
} ring_t;

typedef struct {
    int used, pty, lossless, exited, timed_out, status, keep_stdin, in_eof;
    pid_t pid;
    int out_fd, err_fd, in_fd, master_fd;
    ring_t out, err;
    uint64_t ack_out, ack_err; /* the host has everything before these */
    buf_t in;
    size_t in_off;
    uint64_t seq, start_ns;
    struct timespec deadline;
    char cmd[PROC_CMD_MAX];
} proc_t;

typedef struct {
    int used;
    uint32_t id, session;
    int slot;
    pid_t pid;
    uint64_t out_off, err_off, max;
    struct timespec deadline;
} waiter_t;

static proc_t procs[MAX_PROCS];
static waiter_t waiters[MAX_WAITERS];
static uint64_t proc_seq;

static void ring_put(ring_t *r, const uint8_t *d, size_t n)
{
    if (!r->p) {
        r->p = malloc(RING_CAP);
        if (!r->p) die_oom();
    }
    for (size_t i = 0; i < n; i++) r->p[(r->end + i) % RING_CAP] = d[i];
    r->end += n;
    if (r->end - r->start > RING_CAP) r->start = r->end - RING_CAP;
}

/* bytes of `r` from `*off` (moved up to the ring's start if it was dropped) */
static void ring_get(const ring_t *r, uint64_t *off, uint64_t max, buf_t *b, uint16_t tag)
{
    if (*off < r->start) *off = r->start;
    if (*off > r->end) *off = r->end;
    uint64_t n = r->end - *off;
    if (n > max) n = max;
    put_u16(b, tag);
    put_u32(b, (uint32_t)n);
    buf_reserve(b, n);
    for (uint64_t i = 0; i < n; i++) b->p[b->len + i] = r->p[(*off + i) % RING_CAP];
    b->len += n;
}

static int proc_find(pid_t pid)
{
    for (int i = 0; i < MAX_PROCS; i++)
        if (procs[i].used && procs[i].pid == pid) return i;
    return -1;
}

static void proc_close_fds(proc_t *x)
{
    if (x->out_fd >= 0) { if (x->pty) close(x->out_fd); else keep_draining(x->out_fd); }
    if (x->err_fd >= 0) keep_draining(x->err_fd);
    if (x->in_fd >= 0) close(x->in_fd);
    if (x->master_fd >= 0) close(x->master_fd);
    x->out_fd = x->err_fd = x->in_fd = x->master_fd = -1;
}

static void proc_free(proc_t *x)
{
    proc_close_fds(x);
    free(x->out.p);
    free(x->err.p);
    buf_free(&x->in);
    memset(x, 0, sizeof *x);
}

/* a free slot, evicting the oldest exited process if need be */
static int proc_slot(void)
{
    int oldest = -1;
    for (int i = 0; i < MAX_PROCS; i++) {
        if (!procs[i].used) return i;
        if (procs[i].exited && (oldest < 0 || procs[i].seq < procs[oldest].seq)) oldest = i;
    }
    if (oldest >= 0) {
        for (int w = 0; w < MAX_WAITERS; w++)
            if (waiters[w].used && waiters[w].slot == oldest) waiters[w].slot = -1;
        proc_free(&procs[oldest]);
    }
    return oldest;
}

/* how much more the host may be sent of one stream before a lossless process waits */
static size_t ring_room(const proc_t *x, const ring_t *r, uint64_t ack)
{
    if (!x->lossless) return 65536;
    uint64_t unacked = r->end > ack ? r->end - ack : 0;
    return unacked >= RING_CAP ? 0 : RING_CAP - unacked;
}

/* read what is there (within the room); 1 on EOF/error (fd closed) */
static int proc_drain(proc_t *x, int *fd, ring_t *r, uint64_t ack, int budget)
{
    uint8_t tmp[65536];
    for (int reads = 0; reads < budget;) {
        size_t room = ring_room(x, r, ack);
        if (room == 0) return 0;
        ssize_t n = read(*fd, tmp, room < sizeof tmp ? room : sizeof tmp);
        if (n > 0) { ring_put(r, tmp, (size_t)n); reads++; continue; }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) return 0;
        /* EOF, or EIO from a pty master once the last slave fd closed */
        close(*fd);
        *fd = -1;
        return 1;
    }
    return 0;
}

static void proc_finish(proc_t *x)
{
    /* what the command wrote before it exited is in the pipe already */
    if (x->out_fd >= 0) proc_drain(x, &x->out_fd, &x->out, x->ack_out, FINAL_DRAIN_READS);
    if (x->err_fd >= 0) proc_drain(x, &x->err_fd, &x->err, x->ack_err, FINAL_DRAIN_READS);
    /* a lossless process's unread tail must stay readable: keep fds until
       the host caught up, then drop them (a `sleep &` child may hold them) */
    if (!x->lossless || (x->out.end <= x->ack_out && x->err.end <= x->ack_err)) proc_close_fds(x);
}

/* spawn flags */
#define F_SPAWN_LOSSLESS 1u
#define F_SPAWN_PTY 2u
#define F_SPAWN_KEEP_STDIN 4u
/* proc input flags */
#define F_INPUT_EOF 1u

static int open_pty(int *master, char *slave_name, size_t len, uint16_t rows, uint16_t cols)
{
    int m = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (m < 0) return -1;
    if (grantpt(m) != 0 || unlockpt(m) != 0 || ptsname_r(m, slave_name, len) != 0) {
        close(m);
        return -1;
    }
    struct winsize ws = {.ws_row = rows ? rows : 24, .ws_col = cols ? cols : 80};
    ioctl(m, TIOCSWINSZ, &ws);
    *master = m;
    return 0;
}

static void op_spawn(uint32_t id, const fields_t *fs)
{
    uint64_t flags = field_u64(fs, T_FLAGS, 0);
    int pty = (flags & F_SPAWN_PTY) != 0;
    char *uname = field_str(fs, T_USER);
    user_t user, *u = NULL;
    if (uname) {
        if (lookup_user(uname, &user) != 0) {
            send_error(OP_SPAWN, id, "not_found", ENOENT, "no user %s in /etc/passwd", uname);
            free(uname);
            return;
        }
        u = &user;
    }
    free(uname);
    size_t argc = 0;
    char **argv = collect_strs(fs, T_ARGV, &argc);
    char *shell = field_str(fs, T_SHELL);
    if (shell || (argc == 0 && pty)) {
        free_strs(argv);
        argv = calloc(4, sizeof *argv);
        if (!argv) die_oom();
        /* no command on a terminal: the user's login shell */
        argv[0] = strdup(shell ? "/bin/sh" : (u && u->shell[0] ? u->shell : "/bin/sh"));
        argv[1] = strdup(shell ? "-c" : "-l");
        argv[2] = shell;
        argc = shell ? 3 : 2;
    }
    if (argc == 0) {
        free_strs(argv);
        send_error(OP_SPAWN, id, "bad_request", EINVAL, "spawn needs argv or a shell command");
        return;
    }
    int slot = proc_slot();
    if (slot < 0) {
        free_strs(argv);
        send_error(OP_SPAWN, id, "busy", EAGAIN, "too many running processes (%d)", MAX_PROCS);
        return;
    }
    char **uenv = collect_strs(fs, T_ENV, NULL);
    char *store[5];
    char **wenv = user_env(uenv, u, pty, store);
    char **env = build_env(wenv);
    char *cwd = field_str(fs, T_CWD);
    const field_t *stdin_f = field(fs, T_STDIN);
    int keep_stdin = (flags & F_SPAWN_KEEP_STDIN) != 0;

    int outp[2] = {-1, -1}, errp[2] = {-1, -1}, inp[2] = {-1, -1}, errpipe[2] = {-1, -1};
    int master = -1;
    char slave[128] = {0};
    int ok = pipe2(errpipe, O_CLOEXEC) == 0;
    if (ok && pty)
        ok = open_pty(&master, slave, sizeof slave, (uint16_t)field_u64(fs, T_ROWS, 24),
                      (uint16_t)field_u64(fs, T_COLS, 80)) == 0;
    else if (ok)
        ok = pipe2(outp, O_CLOEXEC) == 0 && pipe2(errp, O_CLOEXEC) == 0 && pipe2(inp, O_CLOEXEC) == 0;
    if (!ok) {
        send_errno(OP_SPAWN, id, pty ? "openpty" : "pipe", "");
        goto out;
    }
    pid_t pid = fork();
    if (pid < 0) {
        send_errno(OP_SPAWN, id, "fork", "");
        goto out;
    }
    if (pid == 0) {
        sigset_t all;
        sigemptyset(&all);
        sigprocmask(SIG_SETMASK, &all, NULL);
        for (int s = 1; s < NSIG; s++) signal(s, SIG_DFL);
        setpriority(PRIO_PROCESS, 0, 0); /* commands do not inherit the agent's rank */
        setsid();
        int report[2] = {1, 0}; /* stage (1 chdir, 2 exec, 3 pty, 4 user), errno */
        if (pty) {
            int s = open(slave, O_RDWR);
            if (s < 0 || ioctl(s, TIOCSCTTY, 0) != 0) { report[0] = 3; goto fail; }
            dup2(s, 0); dup2(s, 1); dup2(s, 2);
            if (s > 2) close(s);
        } else {
            dup2(inp[0], 0);
            dup2(outp[1], 1);
            dup2(errp[1], 2);
        }
        if (u && become_user(u) != 0) { report[0] = 4; goto fail; }
        if (cwd && chdir(cwd) != 0) goto fail;
        if (!cwd && chdir(u ? u->home : "/root") != 0 && chdir("/") != 0) { /* stay */ }
        execvpe(argv[0], argv, env);
        report[0] = 2;
    fail:
        report[1] = errno;
        if (write(errpipe[1], report, sizeof report) < 0) { /* parent sees EOF */ }
        _exit(127);
    }
    close(errpipe[1]);
    errpipe[1] = -1;
    int report[2] = {0, 0};
    ssize_t r;
    do r = read(errpipe[0], report, sizeof report);
    while (r < 0 && errno == EINTR);
    if (r == (ssize_t)sizeof report) {
        waitpid(pid, NULL, 0);
        errno = report[1];
        static const char *what[] = {"?", "chdir", "exec", "pty", "become user"};
        send_errno(OP_SPAWN, id, what[report[0] >= 1 && report[0] <= 4 ? report[0] : 0], report[0] == 2 ? argv[0] : cwd);
        goto out;
    }
    proc_t *x = &procs[slot];
    memset(x, 0, sizeof *x);
    x->used = 1;
    x->pid = pid;
    x->pty = pty;
    x->seq = ++proc_seq;
    x->lossless = (flags & F_SPAWN_LOSSLESS) != 0;
    x->keep_stdin = keep_stdin;
    struct timespec rt;
    clock_gettime(CLOCK_REALTIME, &rt);
    x->start_ns = (uint64_t)rt.tv_sec * 1000000000ULL + (uint64_t)rt.tv_nsec;
    size_t k = 0;
    for (char **a = argv; *a && k + 1 < sizeof x->cmd; a++) {
        int w = snprintf(x->cmd + k, sizeof x->cmd - k, "%s%s", k ? " " : "", *a);
        if (w < 0) break;
        k += (size_t)w;
        if (k >= sizeof x->cmd) { k = sizeof x->cmd - 1; break; }
    }
    if (pty) {
        x->master_fd = master;
        x->out_fd = dup(master);
        x->in_fd = dup(master);
        x->err_fd = -1;
        master = -1;
        set_nonblock(x->out_fd);
        set_nonblock(x->in_fd);
    } else {
        x->master_fd = -1;
        x->out_fd = outp[0];
        x->err_fd = errp[0];
        x->in_fd = inp[1];
        outp[0] = errp[0] = inp[1] = -1;
        set_nonblock(x->out_fd);
        set_nonblock(x->err_fd);
        set_nonblock(x->in_fd);
    }
    if (stdin_f) buf_put(&x->in, stdin_f->val, stdin_f->len);
    if (!keep_stdin) x->in_eof = 1;
    uint64_t tmo = field_u64(fs, T_TIMEOUT_MS, 0);
    if (tmo) {
        x->deadline = now_mono();
        x->deadline.tv_sec += (time_t)(tmo / 1000);
        x->deadline.tv_nsec += (long)(tmo % 1000) * 1000000L;
        if (x->deadline.tv_nsec >= 1000000000L) { x->deadline.tv_sec++; x->deadline.tv_nsec -= 1000000000L; }
    }
    buf_t b = {0};
    tlv_u64(&b, T_PID, (uint64_t)pid);
    send_frame(OP_SPAWN, FL_RESPONSE, id, &b);
    buf_free(&b);
out:
    for (int i = 0; i < 2; i++) {
        if (outp[i] >= 0) close(outp[i]);
        if (errp[i] >= 0) close(errp[i]);
        if (inp[i] >= 0) close(inp[i]);
        if (errpipe[i] >= 0) close(errpipe[i]);
    }
    if (master >= 0) close(master);
    free_strs(argv);
    free(env);
    free(wenv);
    for (int j = 0; j < 5; j++) free(store[j]);
    free_strs(uenv);
    free(cwd);
}

static int proc_status_code(const proc_t *x, int *sig)
{
    *sig = 0;
    if (WIFSIGNALED(x->status)) { *sig = WTERMSIG(x->status); return 128 + *sig; }
    return WIFEXITED(x->status) ? WEXITSTATUS(x->status) : -1;
}

/* has `w` something to send: data at its offsets, or the end of the process? */
static int waiter_ready(const waiter_t *w)
{
    if (w->slot < 0) return 1;
    const proc_t *x = &procs[w->slot];
    if (x->out.end > w->out_off || x->err.end > w->err_off) return 1;
    return x->exited && x->out_fd < 0 && x->err_fd < 0;
}

static void send_proc_read(uint32_t id, int slot, uint64_t out_off, uint64_t err_off, uint64_t max)
{
    if (slot < 0) {
        send_error(OP_PROC_READ, id, "not_found", ESRCH, "no such process (its slot was reused)");
        return;
    }
    proc_t *x = &procs[slot];
    buf_t b = {0};
    tlv_u64(&b, T_PID, (uint64_t)x->pid);
    uint64_t o = out_off, e = err_off;
    ring_get(&x->out, &o, max, &b, T_STDOUT);
    ring_get(&x->err, &e, max, &b, T_STDERR);
    tlv_u64(&b, T_OFFSET, o);
    tlv_u64(&b, T_ERR_OFFSET, e);
    /* the end only once the host has every byte (and the pipes are closed) */
    if (x->exited && x->out_fd < 0 && x->err_fd < 0 && x->out.end - o <= max &&
        x->err.end - e <= max) {
        int sig;
        int code = proc_status_code(x, &sig);
        tlv_u64(&b, T_EXITED, 1);
        tlv_u64(&b, T_EXIT_CODE, (uint64_t)(int64_t)code);
        if (sig) tlv_u64(&b, T_SIGNAL, (uint64_t)sig);
        if (x->timed_out) tlv_u64(&b, T_TIMED_OUT, 1);
    }
    send_frame(OP_PROC_READ, FL_RESPONSE, id, &b);
    buf_free(&b);
}

static void op_proc_read(uint32_t id, const fields_t *fs)
{
    pid_t pid = (pid_t)field_u64(fs, T_PID, 0);
    int slot = proc_find(pid);
    if (slot < 0) {
        send_error(OP_PROC_READ, id, "not_found", ESRCH, "no process %d", (int)pid);
        return;
    }
    proc_t *x = &procs[slot];
    uint64_t o = field_u64(fs, T_OFFSET, 0), e = field_u64(fs, T_ERR_OFFSET, 0);
    uint64_t max = field_u64(fs, T_LENGTH, PROC_READ_MAX);
    if (max > PROC_READ_MAX) max = PROC_READ_MAX;
    /* asking from an offset acknowledges everything before it */
    if (o > x->ack_out) x->ack_out = o < x->out.end ? o : x->out.end;
    if (e > x->ack_err) x->ack_err = e < x->err.end ? e : x->err.end;
    if (x->exited && x->lossless && x->out_fd >= 0) proc_drain(x, &x->out_fd, &x->out, x->ack_out, FINAL_DRAIN_READS);
    if (x->exited && x->lossless && x->err_fd >= 0) proc_drain(x, &x->err_fd, &x->err, x->ack_err, FINAL_DRAIN_READS);
    if (x->exited) proc_finish(x);
    uint64_t wait = field_u64(fs, T_WAIT_MS, 0);
    waiter_t probe = {1, id, session, slot, pid, o, e, max, {0, 0}};
    if (wait == 0 || waiter_ready(&probe)) {
        send_proc_read(id, slot, o, e, max);
        return;
    }
    for (int w = 0; w < MAX_WAITERS; w++) {
        if (waiters[w].used) continue;
        if (wait > 60000) wait = 60000;
        probe.deadline = now_mono();
        probe.deadline.tv_sec += (time_t)(wait / 1000);
        probe.deadline.tv_nsec += (long)(wait % 1000) * 1000000L;
        if (probe.deadline.tv_nsec >= 1000000000L) { probe.deadline.tv_sec++; probe.deadline.tv_nsec -= 1000000000L; }
        waiters[w] = probe;
        return;
    }
    send_proc_read(id, slot, o, e, max); /* no room to wait: an empty reply, the host asks again */
}

static void op_proc_input(uint32_t id, const fields_t *fs)
{
    pid_t pid = (pid_t)field_u64(fs, T_PID, 0);
    int slot = proc_find(pid);
    if (slot < 0) {
        send_error(OP_PROC_INPUT, id, "not_found", ESRCH, "no process %d", (int)pid);
        return;
    }
    proc_t *x = &procs[slot];
    const field_t *d = field(fs, T_DATA);
    size_t pending = x->in.len - x->in_off;
    if (d && d->len) {
        if (x->in_fd < 0 || x->exited) {
            send_error(OP_PROC_INPUT, id, "closed", EPIPE, "the process's stdin is closed");
            return;
        }
        if (pending + d->len > PROC_IN_MAX) {
            send_error(OP_PROC_INPUT, id, "busy", EAGAIN, "stdin buffer full");
            return;
        }
        if (x->in_off) { /* compact: keep the buffer at what is pending */
            memmove(x->in.p, x->in.p + x->in_off, pending);
            x->in.len = pending;
            x->in_off = 0;
        }
        buf_put(&x->in, d->val, d->len);
    }
    if (field_u64(fs, T_FLAGS, 0) & F_INPUT_EOF) x->in_eof = 1;
    buf_t b = {0};
    tlv_u64(&b, T_SIZE, (uint64_t)(x->in.len - x->in_off));
    send_frame(OP_PROC_INPUT, FL_RESPONSE, id, &b);
    buf_free(&b);
}

static void op_proc_list(uint32_t id, const fields_t *fs)
{
    (void)fs;
    buf_t b = {0};
    for (int i = 0; i < MAX_PROCS; i++) {
        proc_t *x = &procs[i];
        if (!x->used) continue;
        int sig;
        int code = x->exited ? proc_status_code(x, &sig) : 0;
        size_t clen = strlen(x->cmd);
        put_u16(&b, T_PROC);
        put_u32(&b, (uint32_t)(24 + clen));
        put_u32(&b, (uint32_t)x->pid);
        put_u32(&b, (uint32_t)((x->exited ? 1 : 0) | (x->pty ? 2 : 0) | (x->timed_out ? 4 : 0)));
        put_u32(&b, (uint32_t)code);
        put_u32(&b, 0);
        put_u64(&b, x->start_ns);
        buf_put(&b, x->cmd, clen);
    }
    send_frame(OP_PROC_LIST, FL_RESPONSE, id, &b);
    buf_free(&b);
}

static void proc_reaped(pid_t p, int st)
{
    for (int i = 0; i < MAX_PROCS; i++) {
        if (procs[i].used && procs[i].pid == p && !procs[i].exited) {
            procs[i].exited = 1;
            procs[i].status = st;
        }
    }
}

static void op_pty_resize(uint32_t id, const fields_t *fs)
{
    pid_t pid = (pid_t)field_u64(fs, T_PID, 0);
    int slot = proc_find(pid);
    if (slot < 0 || procs[slot].master_fd < 0) {
        send_error(OP_PTY_RESIZE, id, "not_found", ESRCH, "no terminal of process %d", (int)pid);
        return;
    }
    struct winsize ws = {.ws_row = (uint16_t)field_u64(fs, T_ROWS, 24),
                         .ws_col = (uint16_t)field_u64(fs, T_COLS, 80)};
    if (ioctl(procs[slot].master_fd, TIOCSWINSZ, &ws) != 0) send_errno(OP_PTY_RESIZE, id, "resize", "");
    else send_frame(OP_PTY_RESIZE, FL_RESPONSE, id, NULL);
}

/* one pass of the main loop: answer waiters that can be answered */
static void serve_waiters(void)
{
    for (int w = 0; w < MAX_WAITERS; w++) {
        waiter_t *q = &waiters[w];
        if (!q->used) continue;
        if (q->session != session) { q->used = 0; continue; }
        if (q->slot >= 0 && q->slot < MAX_PROCS && procs[q->slot].exited) proc_finish(&procs[q->slot]);
        if (waiter_ready(q) || ms_until(q->deadline) <= 0) {
            q->used = 0;
            send_proc_read(q->id, q->slot, q->out_off, q->err_off, q->max);
        }
    }
}

static void proc_write_stdin(proc_t *x)
{
    if (x->in.len > x->in_off) {
        ssize_t w = write(x->in_fd, x->in.p + x->in_off, x->in.len - x->in_off);
        if (w > 0) x->in_off += (size_t)w;
        if (w < 0 && errno != EAGAIN && errno != EINTR) { x->in.len = x->in_off = 0; x->in_eof = 1; }
    }
    if (x->in_off >= x->in.len) {
        x->in.len = x->in_off = 0;
        /* a terminal has no EOF to send (a program sees ^D as input) */
        if (x->in_eof && !x->pty && x->in_fd >= 0) { close(x->in_fd); x->in_fd = -1; }
    }
}

/* ------------------------------------------------------------------ */
/* files                                                              */

static int mkdirs(const char *path, mode_t mode)
{
    char tmp[PATH_MAX];
    if (strlen(path) >= sizeof tmp) { errno = ENAMETOOLONG; return -1; }
    strcpy(tmp, path);
    for (char *p = tmp + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(tmp, mode) != 0 && errno != EEXIST) return -1;
        *p = '/';
    }
    if (mkdir(tmp, mode) != 0 && errno != EEXIST) return -1;
    return 0;
}

static int write_all(int fd, const uint8_t *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int pwrite_all(int fd, const uint8_t *p, size_t n, off_t off)
{
    while (n) {
        ssize_t w = pwrite(fd, p, n, off);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0) return -1;
        p += w;
        off += w;
        n -= (size_t)w;
    }
    return 0;
}

static void op_write_file(uint32_t id, const fields_t *fs)
{
    char *path = field_str(fs, T_PATH);
    const field_t *data = field(fs, T_DATA);
    if (!path || path[0] != '/' || !data) {
        send_error(OP_WRITE_FILE, id, "bad_request", EINVAL, "write_file needs an absolute path and data");
        free(path);
        return;
    }
    mode_t mode = (mode_t)field_u64(fs, T_MODE, 0644) & 07777;
    uint64_t flags = field_u64(fs, T_FLAGS, 0);
    if (flags & F_WRITE_MKDIRS) {
        char *slash = strrchr(path, '/');
        if (slash && slash != path) {
            *slash = 0;
            int rc = mkdirs(path, 0755);
            *slash = '/';
            if (rc != 0) { send_errno(OP_WRITE_FILE, id, "mkdir for", path); free(path); return; }
        }
    }
    int fd;
    if (flags & F_WRITE_AT) {
        /* one chunk of a streamed upload, into the host's temp file: written in
           place, no rename (RENAME commits the whole file); offset 0 starts it */
        uint64_t off = field_u64(fs, T_OFFSET, 0);
        int trunc = off == 0 ? O_TRUNC : 0;
        fd = open(path, O_WRONLY | O_CREAT | O_NOFOLLOW | O_CLOEXEC | trunc, mode);
        if (fd < 0) { send_errno(OP_WRITE_FILE, id, "open", path); free(path); return; }
        if ((off == 0 && fchmod(fd, mode) != 0) || pwrite_all(fd, data->val, data->len, (off_t)off) != 0) {
            send_errno(OP_WRITE_FILE, id, "write", path);
            close(fd);
            free(path);
            return;
        }
        close(fd);
        buf_t b = {0};
        tlv_u64(&b, T_SIZE, off + data->len);
        send_frame(OP_WRITE_FILE, FL_RESPONSE, id, &b);
        buf_free(&b);
        free(path);
        return;
    }
    if (flags & F_WRITE_APPEND) {
        fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, mode);
        if (fd < 0) { send_errno(OP_WRITE_FILE, id, "open", path); free(path); return; }
        if (write_all(fd, data->val, data->len) != 0) {
            send_errno(OP_WRITE_FILE, id, "write", path);
            close(fd);
            free(path);
            return;
        }
        close(fd);
    } else {
        /* temp + rename: a reader (or a checkpoint) never sees half a file */
        char tmp[PATH_MAX];
        if (snprintf(tmp, sizeof tmp, "%s.fy-tmp-%d", path, (int)getpid()) >= (int)sizeof tmp) {
            errno = ENAMETOOLONG;
            send_errno(OP_WRITE_FILE, id, "open", path);
            free(path);
            return;
        }
        fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
        if (fd < 0) { send_errno(OP_WRITE_FILE, id, "open", path); free(path); return; }
        if (write_all(fd, data->val, data->len) != 0 || fchmod(fd, mode) != 0) {
            send_errno(OP_WRITE_FILE, id, "write", path);
            close(fd);
            unlink(tmp);
            free(path);
            return;
        }
        close(fd);
        if (rename(tmp, path) != 0) {
            send_errno(OP_WRITE_FILE, id, "rename to", path);
            unlink(tmp);
            free(path);
            return;
        }
    }
    buf_t b = {0};
    tlv_u64(&b, T_SIZE, data->len);
    send_frame(OP_WRITE_FILE, FL_RESPONSE, id, &b);
    buf_free(&b);
    free(path);
}

static void op_read_file(uint32_t id, const fields_t *fs)
{
    char *path = field_str(fs, T_PATH);
    if (!path) {
        send_error(OP_READ_FILE, id, "bad_request", EINVAL, "read_file needs a path");
        return;
    }
    uint64_t off = field_u64(fs, T_OFFSET, 0);
    uint64_t maxlen = field_u64(fs, T_LENGTH, MAX_FILE);
    if (maxlen > MAX_FILE) maxlen = MAX_FILE;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0) { send_errno(OP_READ_FILE, id, "open", path); free(path); return; }
    if (fstat(fd, &st) != 0) { send_errno(OP_READ_FILE, id, "stat", path); close(fd); free(path); return; }
    if (S_ISDIR(st.st_mode)) {
        errno = EISDIR;
        send_errno(OP_READ_FILE, id, "read", path);
        close(fd);
        free(path);
        return;
    }
    buf_t data = {0};
    uint8_t tmp[65536];
    if (off && lseek(fd, (off_t)off, SEEK_SET) < 0) {
        send_errno(OP_READ_FILE, id, "seek", path);
        close(fd);
        free(path);
        return;
    }
    int truncated = 0;
    for (;;) {
        ssize_t n = read(fd, tmp, sizeof tmp);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            send_errno(OP_READ_FILE, id, "read", path);
            close(fd);
            buf_free(&data);
            free(path);
            return;
        }
        if (n == 0) break;
        size_t room = maxlen - data.len;
        if ((size_t)n > room) { buf_put(&data, tmp, room); truncated = 1; break; }
        buf_put(&data, tmp, (size_t)n);
    }
    close(fd);
    buf_t b = {0};
    tlv_u64(&b, T_SIZE, (uint64_t)st.st_size);
    tlv_u64(&b, T_MODE, (uint64_t)st.st_mode);
    if (truncated) tlv_u64(&b, T_TRUNCATED, 1);
    tlv(&b, T_DATA, data.p, data.len);
    send_frame(OP_READ_FILE, FL_RESPONSE, id, &b);
    buf_free(&b);
    buf_free(&data);
    free(path);
}

/* entry = u32 mode, u64 size, i64 mtime_ns, name bytes */
static void put_entry(buf_t *b, const char *name, const struct stat *st)
{
    buf_t e = {0};
    put_u32(&e, (uint32_t)st->st_mode);
    put_u64(&e, (uint64_t)st->st_size);
    put_u64(&e, (uint64_t)((int64_t)st->st_mtim.tv_sec * 1000000000LL + st->st_mtim.tv_nsec));
    buf_put(&e, name, strlen(name));
    tlv(b, T_ENTRY, e.p, e.len);
    buf_free(&e);
}

static void op_stat(uint32_t id, const fields_t *fs)
{
    char *path = field_str(fs, T_PATH);
    struct stat st;
    if (!path) { send_error(OP_STAT, id, "bad_request", EINVAL, "stat needs a path"); return; }
    if (lstat(path, &st) != 0) { send_errno(OP_STAT, id, "stat", path); free(path); return; }
    buf_t b = {0};
    put_entry(&b, path, &st);
    send_frame(OP_STAT, FL_RESPONSE, id, &b);
    buf_free(&b);
    free(path);
}

static void op_list(uint32_t id, const fields_t *fs)
{
    char *path = field_str(fs, T_PATH);
    if (!path) { send_error(OP_LIST, id, "bad_request", EINVAL, "list needs a path"); return; }
    int dfd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *d = dfd >= 0 ? fdopendir(dfd) : NULL;
    if (!d) {
        send_errno(OP_LIST, id, "list", path);
        if (dfd >= 0) close(dfd);
        free(path);
        return;
    }
    /* capped: a directory of millions of files must not become one reply the
       host cannot take (nor a guest buffer of that size) */
    uint64_t max = field_u64(fs, T_MAX_ENTRIES, DEFAULT_LIST_ENTRIES);
    if (max > MAX_LIST_ENTRIES) max = MAX_LIST_ENTRIES;
    buf_t b = {0};
    struct dirent *de;
    uint64_t count = 0;
    int truncated = 0;
    while ((de = readdir(d))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
        if (count == max) { truncated = 1; break; }
        struct stat st;
        if (fstatat(dfd, de->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0) continue;
        put_entry(&b, de->d_name, &st);
        count++;
    }
    closedir(d);
    if (truncated) tlv_u64(&b, T_TRUNCATED, 1);
    send_frame(OP_LIST, FL_RESPONSE, id, &b);
    buf_free(&b);
    free(path);
}

static int rm_cb(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb; (void)ftw;
    return (flag == FTW_DP ? rmdir(p) : unlink(p)) == 0 ? 0 : -1;
}

static void op_remove(uint32_t id, const fields_t *fs)
{
    char *path = field_str(fs, T_PATH);
    if (!path || path[0] != '/' || !strcmp(path, "/")) {
        send_error(OP_REMOVE, id, "bad_request", EINVAL, "remove needs an absolute path other than /");
        free(path);
        return;
    }
    uint64_t flags = field_u64(fs, T_FLAGS, 0);
    struct stat st;
    int rc;
    if (lstat(path, &st) != 0) rc = -1;
    else if (S_ISDIR(st.st_mode) && (flags & F_REMOVE_RECURSIVE))
        rc = nftw(path, rm_cb, 32, FTW_DEPTH | FTW_PHYS | FTW_MOUNT);
    else if (S_ISDIR(st.st_mode)) rc = rmdir(path);
    else rc = unlink(path);
    if (rc != 0) send_errno(OP_REMOVE, id, "remove", path);
    else send_frame(OP_REMOVE, FL_RESPONSE, id, NULL);
    free(path);
}

static void op_mkdir(uint32_t id, const fields_t *fs)
{
    char *path = field_str(fs, T_PATH);
    if (!path || path[0] != '/') {
        send_error(OP_MKDIR, id, "bad_request", EINVAL, "mkdir needs an absolute path");
        free(path);
        return;
    }
    mode_t mode = (mode_t)field_u64(fs, T_MODE, 0755) & 07777;
    uint64_t flags = field_u64(fs, T_FLAGS, 0);
    int rc = (flags & F_MKDIR_PARENTS) ? mkdirs(path, mode) : mkdir(path, mode);
    /* the exact mode, past the umask (a directory copied in keeps its mode) */
    if (rc == 0 && (flags & F_MKDIR_CHMOD)) rc = chmod(path, mode);
    if (rc != 0) send_errno(OP_MKDIR, id, "mkdir", path);
    else send_frame(OP_MKDIR, FL_RESPONSE, id, NULL);
    free(path);
}

static int fsync_path(const char *path, int flags)
{
    int fd = open(path, flags | O_CLOEXEC);
    if (fd < 0) return -1;
    int rc = fsync(fd);
    int e = errno;
    close(fd);
    errno = e;
    return rc;
}

/* also the commit of a streamed upload: fsync of the temp file, rename over the
   target, fsync of the directory, so a crash leaves the old file or the new one */
static void op_rename(uint32_t id, const fields_t *fs)
{
    char *from = field_str(fs, T_PATH), *to = field_str(fs, T_TARGET);
    if (!from || !to || from[0] != '/' || to[0] != '/' || !strcmp(from, "/") || !strcmp(to, "/")) {
        send_error(OP_RENAME, id, "bad_request", EINVAL, "rename needs two absolute paths other than /");
        free(from); free(to);
        return;
    }
    uint64_t flags = field_u64(fs, T_FLAGS, 0);
    struct stat st;
    if (lstat(from, &st) != 0) { send_errno(OP_RENAME, id, "rename", from); free(from); free(to); return; }
    if ((flags & F_RENAME_SYNC) && S_ISREG(st.st_mode) && fsync_path(from, O_RDONLY | O_NOFOLLOW) != 0) {
        send_errno(OP_RENAME, id, "fsync", from);
        free(from); free(to);
        return;
    }
    int rc = (flags & F_RENAME_NOREPLACE) ? renameat2(AT_FDCWD, from, AT_FDCWD, to, RENAME_NOREPLACE)
                                          : rename(from, to);
    if (rc != 0) { send_errno(OP_RENAME, id, "rename to", to); free(from); free(to); return; }
    if (flags & F_RENAME_SYNC) {
        char *slash = strrchr(to, '/');
        *slash = 0;
        fsync_path(slash == to ? "/" : to, O_RDONLY | O_DIRECTORY);  /* best effort */
    }
    send_frame(OP_RENAME, FL_RESPONSE, id, NULL);
    free(from); free(to);
}

static void op_symlink(uint32_t id, const fields_t *fs)
{
    char *path = field_str(fs, T_PATH), *target = field_str(fs, T_TARGET);
    if (!path || !target || path[0] != '/' || !target[0]) {
        send_error(OP_SYMLINK, id, "bad_request", EINVAL, "symlink needs an absolute path and a target");
        free(path); free(target);
        return;
    }
    if (symlink(target, path) != 0) send_errno(OP_SYMLINK, id, "symlink", path);
    else send_frame(OP_SYMLINK, FL_RESPONSE, id, NULL);
    free(path); free(target);
}

static void op_readlink(uint32_t id, const fields_t *fs)
{
    char *path = field_str(fs, T_PATH);
    if (!path || path[0] != '/') {
        send_error(OP_READLINK, id, "bad_request", EINVAL, "readlink needs an absolute path");
        free(path);
        return;
    }
    char target[PATH_MAX];
    ssize_t n = readlink(path, target, sizeof target);
    if (n < 0) { send_errno(OP_READLINK, id, "readlink", path); free(path); return; }
    if (n >= (ssize_t)sizeof target) { errno = ENAMETOOLONG; send_errno(OP_READLINK, id, "readlink", path); free(path); return; }
    buf_t b = {0};
    tlv(&b, T_TARGET, target, (size_t)n);
    send_frame(OP_READLINK, FL_RESPONSE, id, &b);
    buf_free(&b);
    free(path);
}

/* ------------------------------------------------------------------ */
/* fresh after a restore: entropy, identity, disk size                */
/* Numbers from 64 up, apart from the core protocol's. */
enum { OP_IDENTITY = 64, OP_GROW_FS = 65, OP_NET = 66 };
enum { T_SEED = 64, T_HOSTNAME = 65, T_MACHINE_ID = 66, T_RESEEDED = 67,
       T_NET_ADDRESS = 68, T_NET_PREFIX = 69, T_NET_GATEWAY = 70, T_NET_DNS = 71,
       T_NET_RESET = 72 };
#define F_NET_RESET_TCP 1u
#define MAX_SEED 512
#define F_IDENTITY_MACHINE_ID 1u
#ifndef EXT4_IOC_RESIZE_FS
#define EXT4_IOC_RESIZE_FS _IOW('f', 16, uint64_t)
#endif

/* Every fork of one checkpoint resumes with the same kernel RNG state; the
   host's bytes are credited to the input pool and the crng is rekeyed at once
   (adding entropy alone would only be used at the next periodic reseed). */
static int reseed(const field_t *seed)
{
    if (!seed || seed->len == 0 || seed->len > MAX_SEED) return 0;
    struct { int entropy_count; int buf_size; uint8_t buf[MAX_SEED]; } req;
    req.entropy_count = (int)seed->len * 8;
    req.buf_size = (int)seed->len;
    memcpy(req.buf, seed->val, seed->len);
    int ok = 0;
    int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
    if (fd >= 0) {
        ok = ioctl(fd, RNDADDENTROPY, &req) == 0 && ioctl(fd, RNDRESEEDCRNG) == 0;
        close(fd);
    }
    memset(&req, 0, sizeof req);
    return ok;
}

static int is_hex32(const field_t *f)
{
    if (!f || f->len != 32) return 0;
    for (uint32_t i = 0; i < 32; i++) {
        uint8_t c = f->val[i];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return 0;
    }
    return 1;
}

/* a template's forks must each look like a machine of their own */
static void op_identity(uint32_t id, const fields_t *fs)
{
    const field_t *h = field(fs, T_HOSTNAME);
    const field_t *m = field(fs, T_MACHINE_ID);
    if (h && (h->len == 0 || h->len > 64 || memchr(h->val, 0, h->len))) {
        send_error(OP_IDENTITY, id, "bad_request", EINVAL, "hostname must be 1-64 bytes");
        return;
    }
    if (m && !is_hex32(m)) {
        send_error(OP_IDENTITY, id, "bad_request", EINVAL, "machine-id must be 32 hex digits");
        return;
    }
    if (h && sethostname((const char *)h->val, h->len) != 0) {
        send_errno(OP_IDENTITY, id, "sethostname", "");
        return;
    }
    uint64_t flags = 0;
    /* only where the image has one: an image without systemd has no use for it */
    if (m && access("/etc/machine-id", F_OK) == 0) {
        int fd = open("/etc/machine-id", O_WRONLY | O_TRUNC | O_CLOEXEC | O_NOFOLLOW);
        if (fd < 0) { send_errno(OP_IDENTITY, id, "open", "/etc/machine-id"); return; }
        uint8_t line[33];
        memcpy(line, m->val, 32);
        line[32] = '\n';
        int rc = write_all(fd, line, sizeof line);
        close(fd);
        if (rc != 0) { send_errno(OP_IDENTITY, id, "write", "/etc/machine-id"); return; }
        flags |= F_IDENTITY_MACHINE_ID;
    }
    buf_t b = {0};
    tlv_u64(&b, T_FLAGS, flags);
    send_frame(OP_IDENTITY, FL_RESPONSE, id, &b);
    buf_free(&b);
}

/* Grow the root ext4 online to fill its block device (the host made the
   disk's top layer larger than the image); replies with the new size. */
static void op_grow_fs(uint32_t id, const fields_t *fs)
{
    (void)fs;
    int fd = open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    struct stat st;
    struct statfs sf;
    if (fd < 0 || fstat(fd, &st) != 0 || fstatfs(fd, &sf) != 0 || sf.f_bsize <= 0) {
        send_errno(OP_GROW_FS, id, "stat", "/");
        if (fd >= 0) close(fd);
        return;
    }
    char path[64];
    snprintf(path, sizeof path, "/sys/dev/block/%u:%u/size", major(st.st_dev), minor(st.st_dev));
    FILE *f = fopen(path, "re");
    unsigned long long sectors = 0;
    int got = f ? fscanf(f, "%llu", &sectors) : 0;
    if (f) fclose(f);
    if (got != 1 || sectors == 0) {
        send_error(OP_GROW_FS, id, "io", EIO, "cannot read the size of %s", path);
        close(fd);
        return;
    }
    uint64_t blocks = (uint64_t)sectors * 512u / (uint64_t)sf.f_bsize;
    if (ioctl(fd, EXT4_IOC_RESIZE_FS, &blocks) != 0) {
        send_errno(OP_GROW_FS, id, "resize", "/");
        close(fd);
        return;
    }
    fstatfs(fd, &sf);
    close(fd);
    buf_t b = {0};
    tlv_u64(&b, T_SIZE, (uint64_t)sf.f_blocks * (uint64_t)sf.f_bsize);
    send_frame(OP_GROW_FS, FL_RESPONSE, id, &b);
    buf_free(&b);
}

/* ------------------------------------------------------------------ */
/* the network card: eth0's address, route and resolver (OP_NET)      */

static int ifreq_call(int s, unsigned long req, const char *ifname, struct ifreq *ifr)
{
    snprintf(ifr->ifr_name, IFNAMSIZ, "%s", ifname);
    return ioctl(s, req, ifr);
}

static int link_up(int s, const char *ifname)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    if (ifreq_call(s, SIOCGIFFLAGS, ifname, &ifr) != 0) return -1;
    if (ifr.ifr_flags & IFF_UP) return 0;
    ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
    return ifreq_call(s, SIOCSIFFLAGS, ifname, &ifr);
}

static int get_in(int s, unsigned long req, const char *ifname, in_addr_t *out)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    if (ifreq_call(s, req, ifname, &ifr) != 0) return -1;
    *out = ((struct sockaddr_in *)&ifr.ifr_addr)->sin_addr.s_addr;
    return 0;
}

/* Whether `path` holds exactly `len` bytes of `want`. */
static int file_is(const char *path, const char *want, size_t len)
{
    char got[128];
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) return 0;
    ssize_t n = read(fd, got, sizeof got);
    close(fd);
    return n == (ssize_t)len && memcmp(got, want, len) == 0;
}

static int set_in(int s, unsigned long req, const char *ifname, in_addr_t a)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
    sin->sin_family = AF_INET;
    sin->sin_addr.s_addr = a;
    return ifreq_call(s, req, ifname, &ifr);
}

/* Whether /proc/net/route has a default route via `gw` on `ifname`: read
   first, so that a restore finding its configuration in place changes nothing
   in the kernel (see op_net). */
static int has_default_route(const char *ifname, in_addr_t gw)
{
    FILE *f = fopen("/proc/net/route", "re");
    if (!f) return 0;
    char line[256], dev[IFNAMSIZ + 1];
    unsigned long dst, via, flags;
    int found = 0;
    while (!found && fgets(line, sizeof line, f))
        if (sscanf(line, "%16s %lx %lx %lx", dev, &dst, &via, &flags) == 4)
            found = strcmp(dev, ifname) == 0 && dst == 0 && (in_addr_t)via == gw
                    && (flags & RTF_GATEWAY);
    fclose(f);
    return found;
}

static int default_route(int s, const char *ifname, in_addr_t gw)
{
    if (has_default_route(ifname, gw)) return 0;
    struct rtentry rt;
    memset(&rt, 0, sizeof rt);
    struct sockaddr_in *d = (struct sockaddr_in *)&rt.rt_dst;
    struct sockaddr_in *g = (struct sockaddr_in *)&rt.rt_gateway;
    struct sockaddr_in *m = (struct sockaddr_in *)&rt.rt_genmask;
    d->sin_family = g->sin_family = m->sin_family = AF_INET;
    g->sin_addr.s_addr = gw;
    rt.rt_flags = RTF_UP | RTF_GATEWAY;
    rt.rt_dev = (char *)ifname;
    if (ioctl(s, SIOCADDRT, &rt) != 0 && errno != EEXIST) return -1;
    return 0;
}

/* Abort every TCP connection of `local` (eth0's address) that is not a
   listener: after a restore the host side of each is gone (a new network
   namespace), and a guest program waiting on one would wait forever.  The
   kernel answers its peer with a reset and the program sees ECONNABORTED.
   Loopback connections inside the guest are untouched. */
#define MAX_RESET 4096
static int is_local(const struct inet_diag_msg *m, in_addr_t local)
{
    if (m->idiag_family == AF_INET) return m->id.idiag_src[0] == local;
    /* an IPv6 socket's IPv4 connections: ::ffff:a.b.c.d */
    return m->id.idiag_src[0] == 0 && m->id.idiag_src[1] == 0
        && m->id.idiag_src[2] == htonl(0xFFFF) && m->id.idiag_src[3] == local;
}

static long reset_family(int fd, uint8_t family, in_addr_t local)
{
    struct { struct nlmsghdr nlh; struct inet_diag_req_v2 r; } req;
    memset(&req, 0, sizeof req);
    req.nlh.nlmsg_len = sizeof req;
    req.nlh.nlmsg_type = SOCK_DIAG_BY_FAMILY;
    req.nlh.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
    req.r.sdiag_family = family;
    req.r.sdiag_protocol = IPPROTO_TCP;
    /* every state but LISTEN (10) and TIME_WAIT (6) */
    req.r.idiag_states = 0xFFF & ~(1u << 10) & ~(1u << 6) & ~1u;
    if (send(fd, &req, sizeof req, 0) < 0) return -1;
    static struct inet_diag_sockid ids[MAX_RESET];
    size_t n = 0;
    static uint8_t rbuf[32768];
    int done = 0;
    while (!done) {
        ssize_t got = recv(fd, rbuf, sizeof rbuf, 0);
        if (got <= 0) break;
        for (struct nlmsghdr *h = (struct nlmsghdr *)rbuf; NLMSG_OK(h, (size_t)got);
             h = NLMSG_NEXT(h, got)) {
            if (h->nlmsg_type == NLMSG_DONE || h->nlmsg_type == NLMSG_ERROR) { done = 1; break; }
            struct inet_diag_msg *m = NLMSG_DATA(h);
            if (is_local(m, local) && n < MAX_RESET) ids[n++] = m->id;
        }
    }
    long killed = 0;
    for (size_t i = 0; i < n; i++) {
        memset(&req, 0, sizeof req);
        req.nlh.nlmsg_len = sizeof req;
        req.nlh.nlmsg_type = SOCK_DESTROY;
        req.nlh.nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK;
        req.r.sdiag_family = family;
        req.r.sdiag_protocol = IPPROTO_TCP;
        req.r.idiag_states = 0xFFF;
        req.r.id = ids[i];
        if (send(fd, &req, sizeof req, 0) < 0) continue;
        ssize_t got = recv(fd, rbuf, sizeof rbuf, 0);
        struct nlmsghdr *h = (struct nlmsghdr *)rbuf;
        if (got >= (ssize_t)NLMSG_LENGTH(sizeof(struct nlmsgerr)) && h->nlmsg_type == NLMSG_ERROR
            && ((struct nlmsgerr *)NLMSG_DATA(h))->error == 0)
            killed++;
    }
    return killed;
}

static long reset_tcp(in_addr_t local)
{
    int fd = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
    if (fd < 0) return -1;
    long a = reset_family(fd, AF_INET, local);
    long b = reset_family(fd, AF_INET6, local);
    close(fd);
    return (a > 0 ? a : 0) + (b > 0 ? b : 0);
}

static int parse_in(const fields_t *fs, uint16_t tag, in_addr_t *out)
{
    char *txt = field_str(fs, tag);
    struct in_addr a;
    int ok = txt && inet_pton(AF_INET, txt, &a) == 1;
    free(txt);
    if (ok) *out = a.s_addr;
    return ok;
}

static void op_net(uint32_t id, const fields_t *fs)
{
    in_addr_t addr, gw, dns;
    uint64_t prefix = field_u64(fs, T_NET_PREFIX, 24);
    if (!parse_in(fs, T_NET_ADDRESS, &addr) || !parse_in(fs, T_NET_GATEWAY, &gw)
        || !parse_in(fs, T_NET_DNS, &dns) || prefix < 1 || prefix > 30) {
        send_error(OP_NET, id, "bad_request", EINVAL, "net needs an address, prefix, gateway and dns");
        return;
    }
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) { send_errno(OP_NET, id, "socket", ""); return; }
    link_up(s, "lo");
    in_addr_t mask = htonl(0xFFFFFFFFu << (32 - prefix));
    /* After a restore eth0 already has this configuration (every sandbox
       network gives the same one).  Only what differs is set: setting the
       address again makes the kernel drop and re-add it; skipping that took
       this call just after a restore from ~75 ms to ~45 ms here (TCG). */
    in_addr_t cur_addr = 0, cur_mask = 0;
    int same = get_in(s, SIOCGIFADDR, "eth0", &cur_addr) == 0 && cur_addr == addr
        && get_in(s, SIOCGIFNETMASK, "eth0", &cur_mask) == 0 && cur_mask == mask;
    if ((!same && (set_in(s, SIOCSIFADDR, "eth0", addr) != 0
                   || set_in(s, SIOCSIFNETMASK, "eth0", mask) != 0))
        || link_up(s, "eth0") != 0 || default_route(s, "eth0", gw) != 0) {
        int e = errno;
        close(s);
        errno = e;
        send_errno(OP_NET, id, "configure", "eth0");
        return;
    }
    close(s);
    char line[64];
    char txt[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &dns, txt, sizeof txt);
    int len = snprintf(line, sizeof line, "nameserver %s\n", txt);
    uint64_t flags = 0;
    /* After a restore the guest's files are its checkpoint's, resolv.conf
       included: written at its boot, or the user's own choice since, which a
       restore should not undo (another nameserver is no way around the
       egress rules). */
    int restored = (field_u64(fs, T_FLAGS, 0) & F_NET_RESET_TCP) != 0;
    if (restored || file_is("/etc/resolv.conf", line, (size_t)len)) {
        flags |= 1;
    } else {
        int fd = open("/etc/resolv.conf", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW,
                      0644);
        if (fd >= 0) {
            if (write_all(fd, (const uint8_t *)line, (size_t)len) == 0) flags |= 1;
            close(fd);
        }
    }
    long reset = restored ? reset_tcp(addr) : 0;
    buf_t b = {0};
    tlv_u64(&b, T_FLAGS, flags);
    tlv_u64(&b, T_NET_RESET, reset < 0 ? 0 : (uint64_t)reset);
    send_frame(OP_NET, FL_RESPONSE, id, &b);
    buf_free(&b);
}

static void op_hello(uint32_t id, const fields_t *fs)
{
    uint64_t tns = field_u64(fs, T_TIME_NS, 0);
    if (tns) {
        /* a fork resumes with the checkpoint's clock; the host knows the real time */
        struct timespec ts = {(time_t)(tns / 1000000000ULL), (long)(tns % 1000000000ULL)};
        clock_settime(CLOCK_REALTIME, &ts);
    }
    struct timespec up;
    clock_gettime(CLOCK_BOOTTIME, &up);
    buf_t b = {0};
    tlv_str(&b, T_VERSION, AGENT_VERSION);
    tlv_u64(&b, T_UPTIME_MS, (uint64_t)up.tv_sec * 1000 + (uint64_t)up.tv_nsec / 1000000);
    if (reseed(field(fs, T_SEED))) tlv_u64(&b, T_RESEEDED, 1);
    const field_t *nonce = field(fs, T_NONCE);
    if (nonce) tlv(&b, T_NONCE, nonce->val, nonce->len);
    send_frame(OP_HELLO, FL_RESPONSE, id, &b);
    buf_free(&b);
}

static void op_kill(uint32_t id, const fields_t *fs)
{
    pid_t pid = (pid_t)field_u64(fs, T_PID, 0);
    int sig = (int)field_u64(fs, T_SIGNAL, SIGKILL);
    if (pid <= 1) {
        send_error(OP_KILL, id, "bad_request", EINVAL, "kill needs a pid > 1");
        return;
    }
    /* commands run in their own session: signal the whole group */
    if (kill(-pid, sig) != 0 && kill(pid, sig) != 0) send_errno(OP_KILL, id, "kill", "");
    else send_frame(OP_KILL, FL_RESPONSE, id, NULL);
}

static void op_sync(uint32_t id, const fields_t *fs)
{
    sync();
    if (field_u64(fs, T_FLAGS, 0) & F_SYNC_DROP_CACHES) {
        /* After the sync every cached page is clean: a copy of a disk block the
           host already has.  Dropping them (freed pages are zeroed, see
           init_on_free in the host's kernel command line) keeps a checkpoint's
           memory image from storing that data a second time. */
        int fd = open("/proc/sys/vm/drop_caches", O_WRONLY | O_CLOEXEC);
        if (fd < 0) { send_errno(OP_SYNC, id, "open", "/proc/sys/vm/drop_caches"); return; }
        ssize_t n = write(fd, "1", 1);
        int e = errno;
        close(fd);
        if (n != 1) { errno = n < 0 ? e : EIO; send_errno(OP_SYNC, id, "write", "/proc/sys/vm/drop_caches"); return; }
    }
    send_frame(OP_SYNC, FL_RESPONSE, id, NULL);
}

static void dispatch(uint16_t op, uint32_t id, const uint8_t *payload, size_t len)
{
    fields_t fs = {0};
    if (parse_fields(payload, len, &fs) != 0) {
        send_error(op, id, "bad_request", EINVAL, "malformed request fields");
        free(fs.f);
        return;
    }
    switch (op) {
    case OP_HELLO: op_hello(id, &fs); break;
    case OP_EXEC: op_exec(id, &fs); break;
    case OP_WRITE_FILE: op_write_file(id, &fs); break;
    case OP_READ_FILE: op_read_file(id, &fs); break;
    case OP_STAT: op_stat(id, &fs); break;
    case OP_LIST: op_list(id, &fs); break;
    case OP_REMOVE: op_remove(id, &fs); break;
    case OP_MKDIR: op_mkdir(id, &fs); break;
    case OP_RENAME: op_rename(id, &fs); break;
    case OP_SYMLINK: op_symlink(id, &fs); break;
    case OP_READLINK: op_readlink(id, &fs); break;
    case OP_SYNC: op_sync(id, &fs); break;
    case OP_KILL: op_kill(id, &fs); break;
    case OP_SPAWN: op_spawn(id, &fs); break;
    case OP_PROC_READ: op_proc_read(id, &fs); break;
    case OP_PROC_INPUT: op_proc_input(id, &fs); break;
    case OP_PROC_LIST: op_proc_list(id, &fs); break;
    case OP_PTY_RESIZE: op_pty_resize(id, &fs); break;
    case OP_IDENTITY: op_identity(id, &fs); break;
    case OP_GROW_FS: op_grow_fs(id, &fs); break;
    case OP_NET: op_net(id, &fs); break;
    case OP_POWEROFF:
        sync();
        reboot(RB_POWER_OFF);
        send_errno(OP_POWEROFF, id, "poweroff", "");
        break;
    default: send_error(op, id, "bad_request", EINVAL, "unknown operation %u", op); break;
    }
    free(fs.f);
}

/* parse complete frames out of inbuf */
static void process_input(void)
{
    size_t off = 0;
    while (inbuf.len - off >= HDR_LEN) {
        const uint8_t *h = inbuf.p + off;
        if (get_u32(h) != MAGIC) {
            /* resynchronise on the next magic: garbage must not wedge the channel */
            off++;
            continue;
        }
        uint16_t op = get_u16(h + 4);
        uint32_t id = get_u32(h + 8);
        uint32_t len = get_u32(h + 12);
        if (len > MAX_PAYLOAD) {
            send_error(op, id, "too_large", EFBIG, "request of %u bytes exceeds %u", len, MAX_PAYLOAD);
            off += 4; /* skip the magic; resync on what follows */
            continue;
        }
        if (inbuf.len - off - HDR_LEN < len) break;
        send_frame(OP_ACK, FL_RESPONSE, id, NULL);
        dispatch(op, id, h + HDR_LEN, len);
        off += HDR_LEN + len;
    }
    if (off) {
        memmove(inbuf.p, inbuf.p + off, inbuf.len - off);
        inbuf.len -= off;
    }
}

/* ------------------------------------------------------------------ */
/* boot                                                               */

static void early_setup(void)
{
    mkdir("/proc", 0555);
    mkdir("/sys", 0555);
    mkdir("/dev", 0755);
    mkdir("/tmp", 01777);
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, NULL); /* EBUSY if already there */
    mkdir("/dev/pts", 0755);
    mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=620,ptmxmode=666");
    mkdir("/dev/shm", 01777);
    mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, NULL);
    symlink("/proc/self/fd", "/dev/fd");
    symlink("/proc/self/fd/0", "/dev/stdin");
    symlink("/proc/self/fd/1", "/dev/stdout");
    symlink("/proc/self/fd/2", "/dev/stderr");
    sethostname("forkyard", 8);
    /* loopback up: many programs (and tests of servers) expect 127.0.0.1 */
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s >= 0) {
        struct ifreq ifr;
        memset(&ifr, 0, sizeof ifr);
        strcpy(ifr.ifr_name, "lo");
        if (ioctl(s, SIOCGIFFLAGS, &ifr) == 0) {
            ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
            ioctl(s, SIOCSIFFLAGS, &ifr);
        }
        close(s);
    }
}

/* find /dev/vportNpM whose sysfs name is "agent" */
static int open_port(void)
{
    for (int attempt = 0;; attempt++) {
        DIR *d = opendir("/sys/class/virtio-ports");
        if (d) {
            struct dirent *de;
            while ((de = readdir(d))) {
                if (de->d_name[0] == '.') continue;
                char p[300], name[64] = {0};
                snprintf(p, sizeof p, "/sys/class/virtio-ports/%s/name", de->d_name);
                int fd = open(p, O_RDONLY | O_CLOEXEC);
                if (fd < 0) continue;
                ssize_t n = read(fd, name, sizeof name - 1);
                close(fd);
                if (n > 0 && name[n - 1] == '\n') name[n - 1] = 0;
                if (strcmp(name, "agent") != 0) continue;
                snprintf(p, sizeof p, "/dev/%s", de->d_name);
                int pf = open(p, O_RDWR | O_NONBLOCK | O_CLOEXEC);
                if (pf >= 0) { closedir(d); return pf; }
            }
            closedir(d);
        }
        if (attempt % 100 == 0) logmsg("forkyard-agent: waiting for the agent port\n");
        usleep(20000);
    }
}

/* read from the port; returns bytes read, 0 when the host is not connected */
static ssize_t port_read(void)
{
    buf_reserve(&inbuf, 65536);
    ssize_t r;
    do r = read(port_fd, inbuf.p + inbuf.len, 65536);
    while (r < 0 && errno == EINTR);
    if (r > 0) {
        inbuf.len += (size_t)r;
        clock_gettime(CLOCK_MONOTONIC, &last_input);
    }
    return r;
}

static void port_flush(void)
{
    while (host_up && outbuf.len > out_off) {
        ssize_t w = write(port_fd, outbuf.p + out_off, outbuf.len - out_off);
        if (w <= 0) break;
        out_off += (size_t)w;
    }
    if (out_off && out_off == outbuf.len) { outbuf.len = 0; out_off = 0; }
}

int main(void)
{
    if (getpid() == 1) early_setup();
    setpriority(PRIO_PROCESS, 0, AGENT_NICE);
    signal(SIGPIPE, SIG_IGN);
    struct rlimit nofile = {4096, 4096};
    setrlimit(RLIMIT_NOFILE, &nofile);
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    int sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
    port_fd = open_port();
    /*
     * While the host is away the port polls as HUP|IN forever (level
     * triggered), so we then wait on an edge-triggered epoll instead: it fires
     * only when the port's wait queue is woken, e.g. by the host reconnecting.
     */
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLET};
    epoll_ctl(ep, EPOLL_CTL_ADD, port_fd, &ev);
    logmsg("forkyard-agent: ready\n");

    static struct pollfd pfds[2 + 3 * MAX_EXECS + 3 * MAX_PROCS + MAX_DISCARD];
    /* exec slot * 3 + stream; PROC_OWNER + proc slot * 3 + stream */
    static int owner[2 + 3 * MAX_EXECS + 3 * MAX_PROCS + MAX_DISCARD];
    for (;;) {
        int n = 0;
        if (host_up) {
            pfds[n] = (struct pollfd){port_fd, POLLIN, 0};
            if (outbuf.len > out_off) pfds[n].events |= POLLOUT;
            owner[n++] = -1;
        } else {
            pfds[n] = (struct pollfd){ep, POLLIN, 0};
            owner[n++] = -3;
        }
        pfds[n] = (struct pollfd){sfd, POLLIN, 0};
        owner[n++] = -2;
        long timeout = -1;
        if (host_up && inbuf.len) {
            /* wake up to drop a stalled partial request (see the notes above) */
            struct timespec due = last_input;
            due.tv_sec += PARTIAL_IDLE_MS / 1000;
            long ms = ms_until(due);
            timeout = ms < 0 ? 0 : ms;
        }
        for (int i = 0; i < MAX_EXECS; i++) {
            exec_t *x = &execs[i];
            if (!x->used) continue;
            if (x->out_fd >= 0) { pfds[n] = (struct pollfd){x->out_fd, POLLIN, 0}; owner[n++] = i * 3; }
            if (x->err_fd >= 0) { pfds[n] = (struct pollfd){x->err_fd, POLLIN, 0}; owner[n++] = i * 3 + 1; }
            if (x->in_fd >= 0) { pfds[n] = (struct pollfd){x->in_fd, POLLOUT, 0}; owner[n++] = i * 3 + 2; }
            if (x->deadline.tv_sec && !x->timed_out) {
                long ms = ms_until(x->deadline);
                if (ms < 0) ms = 0;
                if (timeout < 0 || ms < timeout) timeout = ms;
            }
        }
        for (int i = 0; i < MAX_PROCS; i++) {
            proc_t *x = &procs[i];
            if (!x->used) continue;
            if (x->out_fd >= 0 && ring_room(x, &x->out, x->ack_out)) {
                pfds[n] = (struct pollfd){x->out_fd, POLLIN, 0};
                owner[n++] = PROC_OWNER + i * 3;
            }
            if (x->err_fd >= 0 && ring_room(x, &x->err, x->ack_err)) {
                pfds[n] = (struct pollfd){x->err_fd, POLLIN, 0};
                owner[n++] = PROC_OWNER + i * 3 + 1;
            }
            if (x->in_fd >= 0 && (x->in.len > x->in_off || (x->in_eof && !x->pty))) {
                pfds[n] = (struct pollfd){x->in_fd, POLLOUT, 0};
                owner[n++] = PROC_OWNER + i * 3 + 2;
            }
            if (x->deadline.tv_sec && !x->timed_out && !x->exited) {
                long ms = ms_until(x->deadline);
                if (ms < 0) ms = 0;
                if (timeout < 0 || ms < timeout) timeout = ms;
            }
        }
        for (int i = 0; i < MAX_WAITERS; i++) {
            if (!waiters[i].used) continue;
            long ms = ms_until(waiters[i].deadline);
            if (ms < 0) ms = 0;
            if (timeout < 0 || ms < timeout) timeout = ms;
        }
        for (int i = 0; i < n_discard; i++) {
            pfds[n] = (struct pollfd){discard_fds[i], POLLIN, 0};
            owner[n++] = -100 - i;
        }
        int pr = poll(pfds, (nfds_t)n, (int)timeout);
        if (pr < 0 && errno != EINTR) usleep(10000);

        for (int k = 0; pr > 0 && k < n; k++) {
            short re = pfds[k].revents;
            if (!re) continue;
            if (owner[k] == -1) {
                if (re & POLLHUP) {
                    drop_session();
                    continue;
                }
                if ((re & POLLIN) && port_read() == 0) drop_session();
                if (re & POLLOUT) port_flush();
            } else if (owner[k] == -3) {
                struct epoll_event evs[4];
                while (epoll_wait(ep, evs, 4, 0) > 0) { /* consume the edge */ }
                ssize_t r = port_read();
                if (r > 0 || (r < 0 && errno == EAGAIN)) host_up = 1; /* a new session */
            } else if (owner[k] <= -100) {
                int *fd = &discard_fds[-100 - owner[k]];
                char sink[65536];
                ssize_t r = read(*fd, sink, sizeof sink);
                if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
                    close(*fd);
                    *fd = -1;
                }
            } else if (owner[k] == -2) {
                struct signalfd_siginfo si;
                while (read(sfd, &si, sizeof si) > 0) { /* drain */ }
                reap();
            } else if (owner[k] >= PROC_OWNER) {
                proc_t *x = &procs[(owner[k] - PROC_OWNER) / 3];
                int stream = (owner[k] - PROC_OWNER) % 3;
                if (!x->used) continue;
                if (stream == 0 && x->out_fd >= 0) proc_drain(x, &x->out_fd, &x->out, x->ack_out, DRAIN_READS);
                else if (stream == 1 && x->err_fd >= 0) proc_drain(x, &x->err_fd, &x->err, x->ack_err, DRAIN_READS);
                else if (stream == 2 && x->in_fd >= 0) proc_write_stdin(x);
            } else {
                exec_t *x = &execs[owner[k] / 3];
                int stream = owner[k] % 3;
                if (!x->used) continue;
                if (stream == 0 && x->out_fd >= 0) drain_fd(&x->out_fd, &x->out, x, DRAIN_READS);
                else if (stream == 1 && x->err_fd >= 0) drain_fd(&x->err_fd, &x->err, x, DRAIN_READS);
                else if (stream == 2 && x->in_fd >= 0) {
                    ssize_t w = write(x->in_fd, x->in.p + x->in_off, x->in.len - x->in_off);
                    if (w > 0) x->in_off += (size_t)w;
                    if ((w < 0 && errno != EAGAIN) || x->in_off >= x->in.len) {
                        close(x->in_fd);
                        x->in_fd = -1;
                    }
                }
            }
        }
        int kept = 0;
        for (int i = 0; i < n_discard; i++)
            if (discard_fds[i] >= 0) discard_fds[kept++] = discard_fds[i];
        n_discard = kept;
        if (host_up && inbuf.len) process_input();
        if (inbuf.len) {
            struct timespec due = last_input;
            due.tv_sec += PARTIAL_IDLE_MS / 1000;
            if (ms_until(due) <= 0) {
                logmsg("forkyard-agent: dropping %zu bytes of a stalled partial request\n",
                       inbuf.len);
                inbuf.len = 0;
            }
        }
        for (int i = 0; i < MAX_EXECS; i++) {
            exec_t *x = &execs[i];
            if (!x->used) continue;
            if (x->deadline.tv_sec && !x->timed_out && !x->exited && ms_until(x->deadline) <= 0) {
                x->timed_out = 1;
                kill(-x->pid, SIGKILL);
            }
            if (x->exited) finish_exec(x);
        }
        for (int i = 0; i < MAX_PROCS; i++) {
            proc_t *x = &procs[i];
            if (!x->used) continue;
            if (x->deadline.tv_sec && !x->timed_out && !x->exited && ms_until(x->deadline) <= 0) {
                x->timed_out = 1;
                kill(-x->pid, SIGKILL);
            }
            if (x->exited && (x->out_fd >= 0 || x->err_fd >= 0 || x->in_fd >= 0)) proc_finish(x);
        }
        serve_waiters();
        /* write eagerly: most replies fit in the port buffer right away */
        port_flush();
    }
}
