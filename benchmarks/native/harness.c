/*
 * harness.c - a native fake upstream and load generator for chatsite's benchmarks.
 *
 * `make bench` runs the fake OpenAI-compatible upstream and the load generator on
 * the same core as (in the two-process level) one of the servers under test. The
 * Python versions (chat/llm/fake_upstream.py, benchmarks/loadgen.py) cost some
 * 20 + 10 us of CPU per token, which at tens of thousands of tokens per second is
 * a whole core. This program does the same work for a small fraction of that:
 * one epoll loop, no threads, no timer per stream, one write() per token.
 *
 *   harness upstream --host 127.0.0.1 --port P --tokens N --gap-ms G
 *       Speaks what fake_upstream.py's `fake-count` model speaks, byte for byte
 *       apart from ids and timestamps: POST /v1/chat/completions (streamed or
 *       not), GET /v1/models, GET /stats, GET /stats/abandoned, POST /stats/reset.
 *       Any other model is a 404 (model_not_found).
 *
 *   harness load --target HOST:PORT[,HOST:PORT...] -c C -n R --tokens N
 *                [--api-key KEY] [--path P] [--model M] [--max-tokens K] [--timeout S]
 *       Like loadgen.py's openai mode: C streams in flight until R are done, each
 *       on a new connection, round-robin over the targets; every token checked;
 *       prints loadgen.summarise()'s JSON summary (plus a few extra keys).
 *
 * Where it differs from the Python versions, on purpose:
 *   - upstream: only fake-count (no --stall-seconds); a client that leaves is counted
 *     abandoned as soon as its EOF/reset is seen, not at the next token; the first write
 *     carries head + role chunk + first token, the last one the last token + finish +
 *     usage + [DONE] + terminator (the bytes are the same, the TCP segments fewer).
 *   - load: --timeout is one deadline for the whole run (loadgen.py: per stream); a
 *     body that ends cleanly without "data: [DONE]" is an error (loadgen.py accepts it);
 *     ttft/total count from the request's write, as loadgen.py does, and the extra
 *     ttft_from_connect_* from the start of connect().
 *
 * Build: cc -O2 -Wall -Wextra -o harness harness.c   (C + POSIX/glibc + Linux epoll)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

/* ============================================================================================
 * Shared helpers
 * ========================================================================================== */

__attribute__((noreturn, format(printf, 1, 2))) static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("harness: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

/* CLOCK_MONOTONIC seconds: the same clock as Python's time.monotonic() on Linux, so
 * timestamps compare across processes. */
static double mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* A growable byte buffer. */
typedef struct {
    char *p;
    size_t len, cap;
} buf_t;

static void buf_reserve(buf_t *b, size_t extra)
{
    if (b->len + extra <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p)
        die("out of memory");
    b->p = p;
    b->cap = cap;
}

static void buf_add(buf_t *b, const void *d, size_t n)
{
    buf_reserve(b, n);
    memcpy(b->p + b->len, d, n);
    b->len += n;
}

static void buf_str(buf_t *b, const char *s) { buf_add(b, s, strlen(s)); }

__attribute__((format(printf, 2, 3))) static void buf_printf(buf_t *b, const char *fmt, ...)
{
    char tmp[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n < sizeof tmp) {
        buf_add(b, tmp, (size_t)n);
        return;
    }
    buf_reserve(b, (size_t)n + 1);
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

static void buf_free(buf_t *b)
{
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

/* Decimal digits of v at p (no NUL); returns the count. Cheaper than snprintf per token. */
static size_t put_u64(char *p, unsigned long long v)
{
    char tmp[24];
    size_t n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    for (size_t i = 0; i < n; i++)
        p[i] = tmp[n - 1 - i];
    return n;
}

/* One UTF-8 sequence at p: its code point in *cp and its length, or 0 if malformed.
 * Surrogates are accepted, as Python's json.loads(bytes) does ('surrogatepass'). */
static int utf8_decode(const unsigned char *p, const unsigned char *e, uint32_t *cp)
{
    unsigned c = p[0];
    int n;
    uint32_t v, min;
    if (c < 0x80) {
        *cp = c;
        return 1;
    } else if ((c & 0xE0) == 0xC0) {
        n = 2, v = c & 0x1F, min = 0x80;
    } else if ((c & 0xF0) == 0xE0) {
        n = 3, v = c & 0x0F, min = 0x800;
    } else if ((c & 0xF8) == 0xF0) {
        n = 4, v = c & 0x07, min = 0x10000;
    } else {
        return 0;
    }
    if (e - p < n)
        return 0;
    for (int i = 1; i < n; i++) {
        if ((p[i] & 0xC0) != 0x80)
            return 0;
        v = (v << 6) | (p[i] & 0x3F);
    }
    if (v < min || v > 0x10FFFF)
        return 0;
    *cp = v;
    return n;
}

static size_t utf8_encode(char *out, uint32_t cp)
{
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    } else if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    } else if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Append s[0:n] as the inside of a JSON string, the way Python's json.dumps with
 * ensure_ascii=False writes it; bytes that are not UTF-8 become U+FFFD. */
static void json_escape(buf_t *b, const char *s, size_t n)
{
    const unsigned char *p = (const unsigned char *)s, *e = p + n;
    while (p < e) {
        unsigned c = *p;
        if (c == '"' || c == '\\') {
            char esc[2] = {'\\', (char)c};
            buf_add(b, esc, 2);
            p++;
        } else if (c < 0x20) {
            switch (c) {
            case '\n': buf_str(b, "\\n"); break;
            case '\r': buf_str(b, "\\r"); break;
            case '\t': buf_str(b, "\\t"); break;
            case '\b': buf_str(b, "\\b"); break;
            case '\f': buf_str(b, "\\f"); break;
            default: buf_printf(b, "\\u%04x", c);
            }
            p++;
        } else if (c < 0x80) {
            buf_add(b, p, 1);
            p++;
        } else {
            uint32_t cp;
            int k = utf8_decode(p, e, &cp);
            if (k) {
                buf_add(b, p, (size_t)k);
                p += k;
            } else {
                buf_str(b, "\xEF\xBF\xBD");
                p++;
            }
        }
    }
}

/* Let a few thousand sockets be open at once: the soft limit is often 1024. */
static void raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static long parse_long(const char *s, const char *what, long lo, long hi)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi)
        die("bad %s: %s", what, s);
    return v;
}

static double parse_double(const char *s, const char *what)
{
    char *end;
    double v = strtod(s, &end);
    if (end == s || *end || !(v >= 0))
        die("bad %s: %s", what, s);
    return v;
}

/* ============================================================================================
 * A small JSON reader (upstream side): validates a document the way Python's json.loads
 * accepts it, then looks up the few fields fake_upstream.py reads.
 * ========================================================================================== */

typedef void (*cp_fn)(void *ctx, uint32_t cp);

static const char *json_ws(const char *p, const char *e)
{
    while (p < e && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    return p;
}

static int hex4(const char *p, uint32_t *out)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p[i];
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= (uint32_t)(c - '0');
        else if (c >= 'a' && c <= 'f')
            v |= (uint32_t)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            v |= (uint32_t)(c - 'A' + 10);
        else
            return 0;
    }
    *out = v;
    return 1;
}

/* The JSON string at p (at its opening quote): returns the position after the closing
 * quote, or NULL if malformed. Each decoded code point goes to fn, if given. */
static const char *json_string(const char *p, const char *e, cp_fn fn, void *ctx)
{
    p++;
    while (p < e) {
        unsigned char c = (unsigned char)*p;
        uint32_t cp;
        if (c == '"')
            return p + 1;
        if (c < 0x20) /* json.loads(strict=True) refuses raw control characters */
            return NULL;
        if (c == '\\') {
            if (++p >= e)
                return NULL;
            switch (*p) {
            case '"': cp = '"'; break;
            case '\\': cp = '\\'; break;
            case '/': cp = '/'; break;
            case 'b': cp = 8; break;
            case 'f': cp = 12; break;
            case 'n': cp = 10; break;
            case 'r': cp = 13; break;
            case 't': cp = 9; break;
            case 'u':
                if (e - p < 5 || !hex4(p + 1, &cp))
                    return NULL;
                p += 4;
                if (cp >= 0xD800 && cp < 0xDC00 && e - p >= 7 && p[1] == '\\' && p[2] == 'u') {
                    uint32_t lo;
                    if (hex4(p + 3, &lo) && lo >= 0xDC00 && lo < 0xE000) {
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                        p += 6;
                    }
                }
                break;
            default:
                return NULL;
            }
            p++;
        } else {
            int k = utf8_decode((const unsigned char *)p, (const unsigned char *)e, &cp);
            if (!k)
                return NULL;
            p += k;
        }
        if (fn)
            fn(ctx, cp);
    }
    return NULL;
}

static const char *json_lit(const char *p, const char *e, const char *lit)
{
    size_t n = strlen(lit);
    return (size_t)(e - p) >= n && memcmp(p, lit, n) == 0 ? p + n : NULL;
}

static const char *json_number(const char *p, const char *e)
{
    if (p < e && *p == '-')
        p++;
    if (p < e && *p == 'I') /* -Infinity */
        return json_lit(p, e, "Infinity");
    if (p >= e || *p < '0' || *p > '9')
        return NULL;
    if (*p == '0')
        p++;
    else
        while (p < e && *p >= '0' && *p <= '9')
            p++;
    if (p < e && *p == '.') {
        p++;
        if (p >= e || *p < '0' || *p > '9')
            return NULL;
        while (p < e && *p >= '0' && *p <= '9')
            p++;
    }
    if (p < e && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < e && (*p == '+' || *p == '-'))
            p++;
        if (p >= e || *p < '0' || *p > '9')
            return NULL;
        while (p < e && *p >= '0' && *p <= '9')
            p++;
    }
    return p;
}

/* Validate the value at p (after whitespace); returns its end or NULL. */
static const char *json_value(const char *p, const char *e, int depth)
{
    p = json_ws(p, e);
    if (p >= e || depth > 500) /* Python would hit its recursion limit */
        return NULL;
    switch (*p) {
    case '{':
    case '[': {
        char close = *p == '{' ? '}' : ']';
        p = json_ws(p + 1, e);
        if (p < e && *p == close)
            return p + 1;
        for (;;) {
            if (close == '}') {
                if (p >= e || *p != '"' || !(p = json_string(p, e, NULL, NULL)))
                    return NULL;
                p = json_ws(p, e);
                if (p >= e || *p != ':')
                    return NULL;
                p++;
            }
            if (!(p = json_value(p, e, depth + 1)))
                return NULL;
            p = json_ws(p, e);
            if (p >= e)
                return NULL;
            if (*p == close)
                return p + 1;
            if (*p != ',')
                return NULL;
            p = json_ws(p + 1, e);
        }
    }
    case '"': return json_string(p, e, NULL, NULL);
    case 't': return json_lit(p, e, "true");
    case 'f': return json_lit(p, e, "false");
    case 'n': return json_lit(p, e, "null");
    case 'N': return json_lit(p, e, "NaN");
    case 'I': return json_lit(p, e, "Infinity");
    default: return json_number(p, e);
    }
}

/* Decoded string into a fixed buffer (for keys and the model id). */
typedef struct {
    char *p;
    size_t len, cap;
    int overflow;
} sbuf_t;

static void cp_to_sbuf(void *ctx, uint32_t cp)
{
    sbuf_t *s = ctx;
    char tmp[4];
    size_t n = utf8_encode(tmp, cp);
    if (s->len + n >= s->cap) {
        s->overflow = 1;
        return;
    }
    memcpy(s->p + s->len, tmp, n);
    s->len += n;
    s->p[s->len] = 0;
}

/* The value of the last member `key` of the (validated) object at obj, or NULL: Python's
 * dict keeps the last of duplicate keys. */
static const char *json_get(const char *obj, const char *e, const char *key)
{
    const char *found = NULL, *p = json_ws(obj + 1, e);
    if (p < e && *p == '}')
        return NULL;
    for (;;) {
        char kb[64];
        sbuf_t k = {kb, 0, sizeof kb, 0};
        kb[0] = 0;
        p = json_string(p, e, cp_to_sbuf, &k);
        p = json_ws(p, e) + 1; /* ':' */
        p = json_ws(p, e);
        if (!k.overflow && strcmp(kb, key) == 0)
            found = p;
        p = json_ws(json_value(p, e, 0), e);
        if (*p != ',')
            return found;
        p = json_ws(p + 1, e);
    }
}

/* Array iteration over a validated array: first element (or NULL), then the next one. */
static const char *json_first(const char *arr, const char *e)
{
    const char *p = json_ws(arr + 1, e);
    return *p == ']' ? NULL : p;
}

static const char *json_next(const char *elem, const char *e)
{
    const char *p = json_ws(json_value(elem, e, 0), e);
    return *p == ',' ? json_ws(p + 1, e) : NULL;
}

/* Python's bool() of a validated value. */
static int json_truthy(const char *v, const char *e)
{
    switch (*v) {
    case 't': return 1;
    case 'f':
    case 'n': return 0;
    case '"': return v[1] != '"';
    case '[': return *json_ws(v + 1, e) != ']';
    case '{': return *json_ws(v + 1, e) != '}';
    case 'N':
    case 'I': return 1;
    default:
        if (v[0] == '-' && v[1] == 'I')
            return 1;
        return strtod(v, NULL) != 0.0; /* a validated number always ends at a delimiter */
    }
}

/* isinstance(x, int) and not bool and x >= 1: the value, else -1. */
static long long json_posint(const char *v, const char *e)
{
    const char *p = v;
    long long n = 0;
    if (*p == '-' || *p < '0' || *p > '9')
        return -1;
    while (p < e && *p >= '0' && *p <= '9') {
        if (n < 1000000000000000LL)
            n = n * 10 + (*p - '0');
        p++;
    }
    if (p < e && (*p == '.' || *p == 'e' || *p == 'E')) /* a float in Python */
        return -1;
    return n >= 1 ? n : -1;
}

/* Words as Python's str.split() sees them: runs of non-whitespace code points. */
typedef struct {
    long words;
    int in_word;
} words_t;

static int py_isspace(uint32_t c)
{
    return (c >= 9 && c <= 13) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 ||
           c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
           c == 0x202F || c == 0x205F || c == 0x3000;
}

static void cp_words(void *ctx, uint32_t cp)
{
    words_t *w = ctx;
    if (py_isspace(cp)) {
        w->in_word = 0;
    } else if (!w->in_word) {
        w->in_word = 1;
        w->words++;
    }
}

static long string_words(const char *v, const char *e)
{
    words_t w = {0, 0};
    json_string(v, e, cp_words, &w);
    return w.words;
}

/* fake_upstream._Script.prompt_tokens: the words of every message's text. Content parts
 * are joined with a space, so their words simply add up. */
static long prompt_words(const char *req, const char *e)
{
    const char *msgs = json_get(req, e, "messages");
    long n = 0;
    if (!msgs || *msgs != '[')
        return 0;
    for (const char *m = json_first(msgs, e); m; m = json_next(m, e)) {
        if (*m != '{')
            continue;
        const char *content = json_get(m, e, "content");
        if (!content)
            continue;
        if (*content == '"') {
            n += string_words(content, e);
        } else if (*content == '[') {
            for (const char *part = json_first(content, e); part; part = json_next(part, e)) {
                if (*part != '{')
                    continue;
                const char *type = json_get(part, e, "type");
                const char *text = json_get(part, e, "text");
                char tb[8];
                sbuf_t t = {tb, 0, sizeof tb, 0};
                tb[0] = 0;
                if (!type || *type != '"' || !text || *text != '"')
                    continue;
                json_string(type, e, cp_to_sbuf, &t);
                if (!t.overflow && strcmp(tb, "text") == 0)
                    n += string_words(text, e);
            }
        }
    }
    return n;
}

/* ============================================================================================
 * upstream: the fake-count model of chat/llm/fake_upstream.py
 * ========================================================================================== */

#define MAX_HEADER_BYTES (64 * 1024)
#define MAX_BODY_BYTES (16 * 1024 * 1024)
#define OUT_HIGH_WATER (64 * 1024) /* asyncio's defaults: drain() waits above this... */
#define OUT_LOW_WATER (16 * 1024)  /* ...until the buffer is back below this */
#define MAX_ABANDONED_RECORDS 100000

static const char MODEL[] = "fake-count";

typedef struct conn conn_t;
struct conn {
    int fd;
    int want_out;   /* EPOLLOUT registered */
    int keep_alive; /* of the current/last request */
    int closing;    /* close once the output is flushed */
    buf_t in;       /* bytes read, not yet parsed */
    buf_t out;      /* bytes that would have blocked */
    size_t out_off;

    /* The chat completion in flight, if `active`. */
    int active, stream, include_usage, blocked;
    long ntok, next;   /* tokens in the script; tokens sent */
    long prompt_words; /* usage.prompt_tokens */
    const char *finish;
    double eof_at;
    char prefix[192]; /* "data: {"id":...,"choices":" of this stream's events */
    size_t prefix_len;
    unsigned long long cid;
    long long created;

    /* The timer FIFO (doubly linked so that a closing stream leaves in O(1)). */
    double due;
    conn_t *qprev, *qnext;
    int queued;
};

static struct {
    int ep;
    long tokens;
    double gap; /* seconds */
    double now; /* mono() at the last wake-up: the one clock every due time derives from */
    unsigned long long ids;
    long started, completed, abandoned, active;
    struct abandoned_rec {
        double at, eof_at;
        long sent;
    } *aband;
    size_t naband;
    conn_t *qhead, *qtail;
    buf_t scratch; /* the bytes of one write */
    int reserve_fd; /* closed and reopened to shed a connection when out of descriptors */
} U;

static void q_push(conn_t *c, double due)
{
    /* Every stream waits the same gap after its last write, so appending keeps the FIFO
     * ordered by due time. */
    c->due = due;
    c->qnext = NULL;
    c->qprev = U.qtail;
    if (U.qtail)
        U.qtail->qnext = c;
    else
        U.qhead = c;
    U.qtail = c;
    c->queued = 1;
}

static void q_remove(conn_t *c)
{
    if (!c->queued)
        return;
    if (c->qprev)
        c->qprev->qnext = c->qnext;
    else
        U.qhead = c->qnext;
    if (c->qnext)
        c->qnext->qprev = c->qprev;
    else
        U.qtail = c->qprev;
    c->qprev = c->qnext = NULL;
    c->queued = 0;
}

static void conn_events(conn_t *c, int want_out)
{
    if (c->want_out == want_out)
        return;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP | (want_out ? EPOLLOUT : 0),
                             .data.ptr = c};
    epoll_ctl(U.ep, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = want_out;
}

/* Close and free; a chat completion still in flight counts as abandoned. */
static void conn_close(conn_t *c)
{
    if (c->active) {
        double now = mono();
        U.active--;
        U.abandoned++;
        if (U.naband < MAX_ABANDONED_RECORDS) {
            struct abandoned_rec *r = &U.aband[U.naband++];
            r->at = now;
            r->eof_at = c->eof_at > 0 ? c->eof_at : now;
            r->sent = c->next;
        }
    }
    q_remove(c);
    close(c->fd);
    buf_free(&c->in);
    buf_free(&c->out);
    free(c);
}

static size_t out_pending(const conn_t *c) { return c->out.len - c->out_off; }

/* Write now what the socket takes, buffer the rest for EPOLLOUT. -1: the peer is gone. */
static int conn_write(conn_t *c, const char *d, size_t n)
{
    if (!out_pending(c)) {
        while (n) {
            ssize_t w = write(c->fd, d, n);
            if (w > 0) {
                d += w;
                n -= (size_t)w;
            } else if (w < 0 && errno == EINTR) {
                continue;
            } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                break;
            } else {
                return -1; /* EPIPE, ECONNRESET, ... */
            }
        }
        if (!n)
            return 0;
    }
    buf_add(&c->out, d, n);
    conn_events(c, 1);
    return 0;
}

static const char *reason(int status)
{
    switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 413: return "Request Entity Too Large";
    default: return "Unknown";
    }
}

/* fake_upstream._send: a whole response with a Content-Length. Like every function below
 * that returns int, -1 means the connection is closed (and freed). */
static int send_response(conn_t *c, int status, const char *body, size_t blen)
{
    buf_t *b = &U.scratch;
    b->len = 0;
    buf_printf(b,
               "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n"
               "Connection: %s\r\n\r\n",
               status, reason(status), blen, c->keep_alive ? "keep-alive" : "close");
    buf_add(b, body, blen);
    if (conn_write(c, b->p, b->len) < 0) {
        conn_close(c);
        return -1;
    }
    return 0;
}

/* fake_upstream._error_body; `code` is a JSON literal ("null" or a quoted string). */
static int send_error(conn_t *c, int status, const char *msg, size_t mlen, const char *type,
                      const char *code)
{
    buf_t body = {0};
    buf_str(&body, "{\"error\":{\"message\":\"");
    json_escape(&body, msg, mlen);
    buf_printf(&body, "\",\"type\":\"%s\",\"param\":null,\"code\":%s}}", type, code);
    int r = send_response(c, status, body.p, body.len);
    buf_free(&body);
    return r;
}

/* An error that ends the connection (malformed framing), as the Python fake does. */
static int reply_and_close(conn_t *c, int status, const char *msg, size_t mlen, const char *type)
{
    c->keep_alive = 0;
    c->closing = 1;
    if (send_error(c, status, msg, mlen, type, "null") < 0)
        return -1;
    if (!out_pending(c)) {
        conn_close(c);
        return -1;
    }
    return 0;
}

static int send_stats(conn_t *c)
{
    char body[160];
    int n = snprintf(body, sizeof body,
                     "{\"started\":%ld,\"completed\":%ld,\"abandoned\":%ld,\"active\":%ld}",
                     U.started, U.completed, U.abandoned, U.active);
    return send_response(c, 200, body, (size_t)n);
}

static int send_abandoned(conn_t *c)
{
    buf_t body = {0};
    buf_str(&body, "[");
    for (size_t i = 0; i < U.naband; i++)
        buf_printf(&body, "%s{\"at\":%.9f,\"eof_at\":%.9f,\"sent\":%ld}", i ? "," : "",
                   U.aband[i].at, U.aband[i].eof_at, U.aband[i].sent);
    buf_str(&body, "]");
    int r = send_response(c, 200, body.p, body.len);
    buf_free(&body);
    return r;
}

/* One SSE event as one chunk of the chunked body:
 * "<hex>\r\n" "data: {...,"choices":" CHOICES TAIL "}\n\n" "\r\n" */
static void add_event(buf_t *b, const conn_t *c, const char *choices, size_t clen,
                      const char *tail, size_t tlen)
{
    size_t dlen = c->prefix_len + clen + tlen + 3;
    char hex[24];
    int hl = snprintf(hex, sizeof hex, "%zx\r\n", dlen);
    buf_reserve(b, (size_t)hl + dlen + 2);
    char *p = b->p + b->len;
    memcpy(p, hex, (size_t)hl), p += hl;
    memcpy(p, c->prefix, c->prefix_len), p += c->prefix_len;
    memcpy(p, choices, clen), p += clen;
    memcpy(p, tail, tlen), p += tlen;
    memcpy(p, "}\n\n\r\n", 5), p += 5;
    b->len = (size_t)(p - b->p);
}

#define USAGE_NULL ",\"usage\":null"
#define LIT(s) s, sizeof(s) - 1

static void add_token_event(buf_t *b, const conn_t *c, long i)
{
    static const char head[] = "[{\"index\":0,\"delta\":{\"content\":\"tok";
    static const char tail[] = " \"},\"logprobs\":null,\"finish_reason\":null}]";
    char choices[sizeof head + sizeof tail + 24];
    char *p = choices;
    memcpy(p, head, sizeof head - 1), p += sizeof head - 1;
    p += put_u64(p, (unsigned long long)i);
    memcpy(p, tail, sizeof tail - 1), p += sizeof tail - 1;
    const char *ut = c->include_usage ? USAGE_NULL : "";
    add_event(b, c, choices, (size_t)(p - choices), ut, strlen(ut));
}

/* After the last token: the finish chunk, the usage chunk, [DONE], the last chunk. */
static void add_stream_end(buf_t *b, const conn_t *c)
{
    char choices[128], usage[160];
    int n = snprintf(choices, sizeof choices,
                     "[{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"%s\"}]",
                     c->finish);
    const char *ut = c->include_usage ? USAGE_NULL : "";
    add_event(b, c, choices, (size_t)n, ut, strlen(ut));
    if (c->include_usage) {
        n = snprintf(usage, sizeof usage,
                     ",\"usage\":{\"prompt_tokens\":%ld,\"completion_tokens\":%ld,"
                     "\"total_tokens\":%ld}",
                     c->prompt_words, c->next, c->prompt_words + c->next);
        add_event(b, c, LIT("[]"), usage, (size_t)n);
    }
    buf_add(b, LIT("e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"));
}

/* fake_upstream._complete's body (stream false), with its Content-Length head. */
static void add_completion(buf_t *b, const conn_t *c)
{
    buf_t body = {0};
    buf_printf(&body,
               "{\"id\":\"chatcmpl-fake%llu\",\"object\":\"chat.completion\",\"created\":%lld,"
               "\"model\":\"%s\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\","
               "\"content\":\"",
               c->cid, c->created, MODEL);
    for (long i = 0; i < c->next; i++)
        buf_printf(&body, "tok%ld ", i);
    buf_printf(&body,
               "\",\"refusal\":null},\"logprobs\":null,\"finish_reason\":\"%s\"}],"
               "\"usage\":{\"prompt_tokens\":%ld,\"completion_tokens\":%ld,\"total_tokens\":%ld},"
               "\"system_fingerprint\":\"fp_fake\"}",
               c->finish, c->prompt_words, c->next, c->prompt_words + c->next);
    buf_printf(b,
               "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n"
               "Connection: %s\r\n\r\n",
               body.len, c->keep_alive ? "keep-alive" : "close");
    buf_add(b, body.p, body.len);
    buf_free(&body);
}

static int conn_process(conn_t *c);

/* The chat completion's next step: on `begin` the head, the role chunk and the first token
 * (which, as in the Python fake, is not delayed); later one token per call, the last one
 * with the end of the stream. Returns -1 if the connection was closed. */
static int chat_step(conn_t *c, int begin, double now)
{
    buf_t *b = &U.scratch;
    b->len = 0;
    if (begin && c->stream) {
        buf_str(b, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
                   "Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n");
        buf_str(b, c->keep_alive ? "Connection: keep-alive\r\n\r\n" : "Connection: close\r\n\r\n");
        const char *ut = c->include_usage ? USAGE_NULL : "";
        add_event(b, c,
                  LIT("[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\","
                      "\"refusal\":null},\"logprobs\":null,\"finish_reason\":null}]"),
                  ut, strlen(ut));
    }
    if (c->next < c->ntok) {
        if (c->stream)
            add_token_event(b, c, c->next);
        c->next++;
    }
    int last = c->next >= c->ntok;
    if (last) {
        if (c->stream)
            add_stream_end(b, c);
        else
            add_completion(b, c);
    }
    if (b->len && conn_write(c, b->p, b->len) < 0) {
        conn_close(c);
        return -1;
    }
    if (!last) {
        /* As drain() does, wait for a slow reader only once its backlog is large. */
        if (out_pending(c) > OUT_HIGH_WATER)
            c->blocked = 1;
        else
            q_push(c, now + U.gap);
        return 0;
    }
    c->active = 0;
    U.active--;
    U.completed++;
    if (!c->keep_alive) {
        c->closing = 1;
        if (!out_pending(c)) {
            conn_close(c);
            return -1;
        }
        return 0;
    }
    /* Called from conn_process (begin) it goes on parsing by itself; from the timer, look
     * for a pipelined request now. */
    return begin ? 0 : conn_process(c);
}

static int start_chat(conn_t *c, const char *body, size_t blen, double now)
{
    const char *e = body + blen, *req = json_ws(body, e);
    const char *end = json_value(req, e, 0);
    if (!end || json_ws(end, e) != e || *req != '{') {
        static const char msg[] = "We could not parse the JSON body of your request.";
        return send_error(c, 400, LIT(msg), "invalid_request_error", "null");
    }
    const char *model = json_get(req, e, "model");
    char mb[256];
    sbuf_t m = {mb, 0, sizeof mb, 0};
    mb[0] = 0;
    if (model && *model == '"')
        json_string(model, e, cp_to_sbuf, &m);
    if (!model || *model != '"' || m.overflow || strcmp(mb, MODEL) != 0) {
        buf_t msg = {0};
        buf_str(&msg, "The model `");
        if (!model || *model == 'n')
            buf_str(&msg, "None");
        else if (*model == '"')
            buf_add(&msg, mb, m.len);
        else if (*model == 't' || *model == 'f')
            buf_str(&msg, *model == 't' ? "True" : "False");
        else /* Python would show repr(); the JSON text is close enough */
            buf_add(&msg, model, (size_t)(json_value(model, e, 0) - model));
        buf_str(&msg, "` does not exist or you do not have access to it.");
        int r = send_error(c, 404, msg.p, msg.len, "invalid_request_error", "\"model_not_found\"");
        buf_free(&msg);
        return r;
    }
    const char *v = json_get(req, e, "stream");
    c->stream = v && json_truthy(v, e);
    c->include_usage = 0;
    if (c->stream && (v = json_get(req, e, "stream_options")) && *v == '{' &&
        (v = json_get(v, e, "include_usage")))
        c->include_usage = json_truthy(v, e);
    v = json_get(req, e, "max_completion_tokens");
    if (!v)
        v = json_get(req, e, "max_tokens");
    long long max_tokens = v ? json_posint(v, e) : -1;
    c->prompt_words = prompt_words(req, e);

    U.started++;
    U.active++;
    c->active = 1;
    c->blocked = 0;
    c->eof_at = 0;
    c->next = 0;
    c->ntok = U.tokens;
    c->finish = "stop";
    if (max_tokens > 0 && max_tokens < c->ntok) {
        c->ntok = (long)max_tokens;
        c->finish = "length";
    }
    c->cid = ++U.ids;
    c->created = (long long)time(NULL);
    c->prefix_len = (size_t)snprintf(
        c->prefix, sizeof c->prefix,
        "data: {\"id\":\"chatcmpl-fake%llu\",\"object\":\"chat.completion.chunk\",\"created\":%lld,"
        "\"model\":\"%s\",\"system_fingerprint\":\"fp_fake\",\"choices\":",
        c->cid, c->created, MODEL);
    return chat_step(c, 1, now);
}

/* A chunked request body, decoded into out, if all of it is there: 1 done (*used bytes),
 * 0 need more, -1 malformed. */
static int dechunk_request(const char *p, const char *e, buf_t *out, size_t *used)
{
    const char *s = p;
    out->len = 0;
    for (;;) {
        const char *nl = memmem(p, (size_t)(e - p), "\r\n", 2);
        if (!nl)
            return (e - p) > 1024 ? -1 : 0;
        char *endp;
        errno = 0;
        unsigned long long size = strtoull(p, &endp, 16);
        if (endp == p || errno || (endp < nl && *endp != ';' && *endp != ' '))
            return -1;
        p = nl + 2;
        if (size == 0) {
            for (;;) { /* trailers, up to an empty line */
                nl = memmem(p, (size_t)(e - p), "\r\n", 2);
                if (!nl)
                    return 0;
                int empty = nl == p;
                p = nl + 2;
                if (empty) {
                    *used = (size_t)(p - s);
                    return 1;
                }
            }
        }
        if (size > MAX_BODY_BYTES || out->len + size > MAX_BODY_BYTES)
            return -1;
        if ((size_t)(e - p) < size + 2)
            return 0;
        buf_add(out, p, size);
        p += size + 2;
    }
}

static int contains_ci(const char *s, size_t n, const char *needle)
{
    size_t k = strlen(needle);
    for (size_t i = 0; i + k <= n; i++)
        if (strncasecmp(s + i, needle, k) == 0)
            return 1;
    return 0;
}

/* Parse and answer the requests in c->in until one is incomplete or a chat completion is
 * in flight. Returns -1 if the connection was closed. */
static int conn_process(conn_t *c)
{
    while (!c->active && !c->closing) {
        char *in = c->in.p;
        size_t inlen = c->in.len;
        if (!in || !inlen)
            return 0;
        char *hend = memmem(in, inlen, "\r\n\r\n", 4);
        if (!hend) {
            if (inlen > MAX_HEADER_BYTES)
                return reply_and_close(c, 400, LIT("Malformed HTTP request"),
                                       "invalid_request_error");
            return 0;
        }
        const char *he = hend;
        /* The request line: METHOD SP TARGET SP VERSION */
        const char *le = memmem(in, (size_t)(he - in), "\r\n", 2);
        if (!le)
            le = he;
        const char *sp1 = memchr(in, ' ', (size_t)(le - in));
        const char *sp2 = sp1 ? memchr(sp1 + 1, ' ', (size_t)(le - sp1 - 1)) : NULL;
        if (!sp2)
            return reply_and_close(c, 400, LIT("Bad request line"), "invalid_request");
        size_t mlen = (size_t)(sp1 - in);
        const char *target = sp1 + 1;
        size_t tlen = (size_t)(sp2 - target);
        const char *version = sp2 + 1;
        size_t vlen = (size_t)(le - version);

        /* Headers: the last of each wins, names case-insensitive, values trimmed. */
        const char *connv = "", *tev = "", *clv = NULL;
        size_t connl = 0, tel = 0, cll = 0;
        for (const char *l = le; l < he;) {
            l += 2;
            const char *lend = memmem(l, (size_t)(he - l), "\r\n", 2);
            if (!lend)
                lend = he;
            const char *colon = memchr(l, ':', (size_t)(lend - l));
            if (colon) {
                const char *ns = l, *ne = colon, *vs = colon + 1, *ve = lend;
                while (ns < ne && (*ns == ' ' || *ns == '\t'))
                    ns++;
                while (ne > ns && (ne[-1] == ' ' || ne[-1] == '\t'))
                    ne--;
                while (vs < ve && (*vs == ' ' || *vs == '\t'))
                    vs++;
                while (ve > vs && (ve[-1] == ' ' || ve[-1] == '\t'))
                    ve--;
                size_t nl = (size_t)(ne - ns), vl = (size_t)(ve - vs);
                if (nl == 10 && strncasecmp(ns, "connection", 10) == 0)
                    connv = vs, connl = vl;
                else if (nl == 17 && strncasecmp(ns, "transfer-encoding", 17) == 0)
                    tev = vs, tel = vl;
                else if (nl == 14 && strncasecmp(ns, "content-length", 14) == 0)
                    clv = vs, cll = vl;
            }
            l = lend;
        }
        c->keep_alive = (vlen == 8 && memcmp(version, "HTTP/1.1", 8) == 0 &&
                         !contains_ci(connv, connl, "close")) ||
                        (vlen == 8 && memcmp(version, "HTTP/1.0", 8) == 0 &&
                         contains_ci(connv, connl, "keep-alive"));

        const char *bstart = he + 4, *ine = in + inlen;
        const char *body = bstart;
        size_t blen = 0, consumed;
        buf_t chunked = {0};
        int bad = 0, too_large = 0;
        if (contains_ci(tev, tel, "chunked")) {
            size_t used = 0;
            int r = dechunk_request(bstart, ine, &chunked, &used);
            if (r == 0) {
                buf_free(&chunked);
                return 0;
            }
            bad = r < 0;
            body = chunked.p ? chunked.p : "";
            blen = chunked.len;
            consumed = (size_t)(bstart - in) + used;
        } else if (clv && cll) {
            unsigned long long n = 0;
            for (size_t i = 0; i < cll && !bad; i++) {
                if (clv[i] < '0' || clv[i] > '9')
                    bad = 1;
                else if ((n = n * 10 + (unsigned)(clv[i] - '0')) > MAX_BODY_BYTES)
                    too_large = 1;
            }
            if (!bad && !too_large) {
                if ((size_t)(ine - bstart) < n)
                    return 0;
                blen = (size_t)n;
            }
            consumed = (size_t)(bstart - in) + blen;
        } else {
            consumed = (size_t)(bstart - in);
        }
        if (bad || too_large) {
            buf_free(&chunked);
            if (too_large)
                return reply_and_close(c, 413, LIT("Body too large"), "invalid_request");
            return reply_and_close(c, 400, LIT("Malformed HTTP request"), "invalid_request_error");
        }

        /* path = target.split("?")[0].rstrip("/") */
        const char *q = memchr(target, '?', tlen);
        size_t plen = q ? (size_t)(q - target) : tlen;
        while (plen && target[plen - 1] == '/')
            plen--;
#define IS(s) (plen == sizeof(s) - 1 && memcmp(target, s, plen) == 0)
#define METHOD(s) (mlen == sizeof(s) - 1 && memcmp(in, s, mlen) == 0)
        int r;
        double now = U.now;
        /* The body may still be in c->in: answer before dropping the request's bytes. */
        if ((IS("/v1/models") || IS("/models")) && METHOD("GET")) {
            static const char models[] =
                "{\"object\":\"list\",\"data\":[{\"id\":\"fake-count\",\"object\":\"model\","
                "\"created\":1700000000,\"owned_by\":\"fake\"}]}";
            r = send_response(c, 200, LIT(models));
        } else if ((IS("/v1/chat/completions") || IS("/chat/completions")) && METHOD("POST")) {
            r = start_chat(c, body, blen, now);
        } else if (IS("/stats") && METHOD("GET")) {
            r = send_stats(c);
        } else if (IS("/stats/abandoned") && METHOD("GET")) {
            r = send_abandoned(c);
        } else if (IS("/stats/reset") && METHOD("POST")) {
            U.started = U.completed = U.abandoned = 0;
            U.naband = 0;
            r = send_stats(c);
        } else if (IS("/v1/models") || IS("/v1/chat/completions") || IS("/stats") ||
                   IS("/stats/reset")) {
            r = send_error(c, 405, LIT("Method not allowed"), "invalid_request_error", "null");
        } else {
            buf_t msg = {0};
            buf_str(&msg, "Unknown path ");
            buf_add(&msg, target, plen);
            r = send_error(c, 404, msg.p, msg.len, "invalid_request_error", "null");
            buf_free(&msg);
        }
#undef IS
#undef METHOD
        buf_free(&chunked);
        if (r < 0)
            return -1;
        /* Drop the request's bytes (the connection is still open here). */
        memmove(c->in.p, c->in.p + consumed, c->in.len - consumed);
        c->in.len -= consumed;
        if (!c->active && !c->keep_alive) {
            c->closing = 1;
            if (!out_pending(c)) {
                conn_close(c);
                return -1;
            }
        }
    }
    return 0;
}

/* Read what is there; on EOF or a reset, a chat completion in flight is abandoned. */
static int conn_readable(conn_t *c)
{
    for (;;) {
        buf_reserve(&c->in, 16384);
        size_t room = c->in.cap - c->in.len;
        ssize_t r = read(c->fd, c->in.p + c->in.len, room);
        if (r > 0) {
            c->in.len += (size_t)r;
            if (c->in.len > MAX_BODY_BYTES + MAX_HEADER_BYTES) { /* as the Python fake's cap */
                conn_close(c);
                return -1;
            }
            if ((size_t)r < room)
                break;
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        /* EOF (or ECONNRESET): requests already read are still answered, as the Python
         * fake reads them before it notices; then the connection goes. */
        if (r == 0 && !c->active && !c->closing && conn_process(c) < 0)
            return -1;
        c->eof_at = mono();
        conn_close(c);
        return -1;
    }
    if (c->closing) {
        c->in.len = 0; /* the connection ends after this response: nothing more to parse */
        return 0;
    }
    return c->active ? 0 : conn_process(c);
}

static void conn_writable(conn_t *c)
{
    while (out_pending(c)) {
        ssize_t w = write(c->fd, c->out.p + c->out_off, out_pending(c));
        if (w > 0) {
            c->out_off += (size_t)w;
        } else if (w < 0 && errno == EINTR) {
            continue;
        } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            break;
        } else {
            c->eof_at = mono();
            conn_close(c);
            return;
        }
    }
    if (!out_pending(c)) {
        c->out.len = c->out_off = 0;
        conn_events(c, 0);
        if (c->closing) {
            conn_close(c);
            return;
        }
    } else if (c->out_off > c->out.len / 2) {
        memmove(c->out.p, c->out.p + c->out_off, out_pending(c));
        c->out.len -= c->out_off;
        c->out_off = 0;
    }
    if (c->blocked && out_pending(c) <= OUT_LOW_WATER) {
        c->blocked = 0;
        q_push(c, U.now + U.gap);
    }
}

static char LISTENER; /* epoll data.ptr of the listening socket */

static void accept_all(int lfd)
{
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if ((errno == EMFILE || errno == ENFILE) && U.reserve_fd >= 0) {
                /* Out of descriptors: refuse one connection rather than spin on the
                 * level-triggered listener. */
                close(U.reserve_fd);
                fd = accept(lfd, NULL, NULL);
                if (fd >= 0)
                    close(fd);
                U.reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
                fprintf(stderr, "harness upstream: out of file descriptors\n");
            }
            return;
        }
        int one = 1; /* as asyncio does: no Nagle delay on small SSE writes */
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        conn_t *c = calloc(1, sizeof *c);
        if (!c)
            die("out of memory");
        c->fd = fd;
        struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = c};
        if (epoll_ctl(U.ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
            close(fd);
            free(c);
        }
    }
}

/* Milliseconds for epoll_wait until t, rounded up (never early). */
static int ms_until(double t, double now)
{
    double d = (t - now) * 1000.0;
    if (d <= 0)
        return 0;
    if (d > 1e6)
        return 1000000;
    int ms = (int)d;
    return ms < d ? ms + 1 : ms;
}

static int upstream_main(int argc, char **argv)
{
    const char *host = "127.0.0.1";
    long port = 8100;
    double gap_ms = 0;
    U.tokens = 20;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc)
            die("upstream: %s needs a value", a);
        const char *v = argv[++i];
        if (!strcmp(a, "--host"))
            host = v;
        else if (!strcmp(a, "--port"))
            port = parse_long(v, "--port", 0, 65535);
        else if (!strcmp(a, "--tokens"))
            U.tokens = parse_long(v, "--tokens", 0, 100000000);
        else if (!strcmp(a, "--gap-ms"))
            gap_ms = parse_double(v, "--gap-ms");
        else
            die("upstream: unknown option %s", a);
    }
    U.gap = gap_ms / 1000.0;
    signal(SIGPIPE, SIG_IGN);
    raise_nofile();

    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV},
                    *ai;
    char ps[16];
    snprintf(ps, sizeof ps, "%ld", port);
    int rc = getaddrinfo(host, ps, &hints, &ai);
    if (rc)
        die("upstream: %s: %s", host, gai_strerror(rc));
    int lfd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    if (lfd < 0 || setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
        bind(lfd, ai->ai_addr, ai->ai_addrlen) < 0 || listen(lfd, 4096) < 0)
        die("upstream: cannot listen on %s:%ld: %s", host, port, strerror(errno));
    freeaddrinfo(ai);
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    getsockname(lfd, (struct sockaddr *)&ss, &sl);
    port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                          : ((struct sockaddr_in *)&ss)->sin_port);

    U.ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = &LISTENER};
    if (U.ep < 0 || epoll_ctl(U.ep, EPOLL_CTL_ADD, lfd, &lev) < 0)
        die("upstream: epoll: %s", strerror(errno));
    U.aband = malloc(MAX_ABANDONED_RECORDS * sizeof *U.aband);
    if (!U.aband)
        die("out of memory");
    U.reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    printf("listening on http://%s:%ld/v1\n", host, port);
    fflush(stdout);

    struct epoll_event evs[512];
    for (;;) {
        int timeout = U.qhead ? ms_until(U.qhead->due, mono()) : -1;
        int n = epoll_wait(U.ep, evs, 512, timeout);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("upstream: epoll_wait: %s", strerror(errno));
        }
        U.now = mono();
        for (int i = 0; i < n; i++) {
            if (evs[i].data.ptr == &LISTENER) {
                accept_all(lfd);
                continue;
            }
            conn_t *c = evs[i].data.ptr;
            uint32_t e = evs[i].events;
            /* conn_readable may close (free) c: then nothing else may touch it. */
            if ((e & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) && conn_readable(c) < 0)
                continue;
            if (e & EPOLLOUT)
                conn_writable(c);
        }
        /* The streams whose gap is over. Only those queued before this pass: with
         * --gap-ms 0 a stream goes back in at once and waits for the next pass. */
        U.now = mono();
        conn_t *last = U.qtail;
        while (U.qhead && U.qhead->due <= U.now) {
            conn_t *c = U.qhead;
            int stop = c == last;
            q_remove(c);
            chat_step(c, 0, U.now);
            if (stop)
                break;
        }
    }
    return 0;
}

/* ============================================================================================
 * load: benchmarks/loadgen.py's openai mode
 * ========================================================================================== */

typedef struct {
    double *v;
    size_t n, cap;
} dbl_t;

static void dbl_push(dbl_t *a, double x)
{
    if (a->n == a->cap) {
        a->cap = a->cap ? a->cap * 2 : 1024;
        a->v = realloc(a->v, a->cap * sizeof *a->v);
        if (!a->v)
            die("out of memory");
    }
    a->v[a->n++] = x;
}

typedef struct {
    struct sockaddr_storage addr;
    socklen_t alen;
    buf_t req;
} target_t;

enum { BODY_CLOSE, BODY_LENGTH, BODY_CHUNKED };
enum { CK_SIZE, CK_DATA, CK_CRLF };

typedef struct {
    int fd, slot;
    target_t *t;
    int connecting, sending;
    size_t req_off;
    double t_conn, t_sent, t_last;
    int headers_done, status, body_mode;
    unsigned long long remain; /* BODY_LENGTH: bytes still to come */
    int ck_state;
    unsigned long long ck_need;
    char ck_line[80];
    size_t ck_line_len;
    buf_t head, sse, errbody;
    long tokens, frames;
    int have_ttft, finished;
} lstream_t;

#define MAX_KINDS 64
#define MAX_SAMPLES 5

static struct {
    int ep;
    target_t *targets;
    int ntargets;
    long expect; /* tokens every stream must deliver; -1: any */
    long C, R, started, done, inflight;
    double timeout;
    lstream_t **slots;
    dbl_t ttfts, ttfts_conn, gaps, totals, connects;
    long complete, errors, tokens, frames;
    struct {
        char key[101];
        long n;
    } kinds[MAX_KINDS];
    int nkinds;
    char samples[MAX_SAMPLES][240];
    int nsamples;
    buf_t scratch;
} L;

static void record_error(const char *err)
{
    L.errors++;
    char key[101]; /* loadgen.summarise groups errors by their first 100 characters */
    snprintf(key, sizeof key, "%s", err);
    int i;
    for (i = 0; i < L.nkinds; i++)
        if (!strcmp(L.kinds[i].key, key))
            break;
    if (i == L.nkinds) {
        if (L.nkinds == MAX_KINDS) {
            i = MAX_KINDS - 1;
            snprintf(L.kinds[i].key, sizeof L.kinds[i].key, "(other errors)");
        } else {
            L.nkinds++;
            memcpy(L.kinds[i].key, key, sizeof key);
            L.kinds[i].n = 0;
        }
    }
    L.kinds[i].n++;
    if (L.nsamples < MAX_SAMPLES)
        snprintf(L.samples[L.nsamples++], sizeof L.samples[0], "%s", err);
}

/* Report the stream's result and free it. Always returns -1 (the stream is gone). */
static int ls_end(lstream_t *s, const char *err)
{
    double t = mono();
    char ebuf[96];
    if (!err && L.expect >= 0 && s->tokens != L.expect) {
        snprintf(ebuf, sizeof ebuf, "incomplete: %ld of %ld tokens", s->tokens, L.expect);
        err = ebuf;
    }
    if (err) {
        record_error(err);
    } else {
        L.complete++;
        dbl_push(&L.totals, t - s->t_sent);
    }
    L.tokens += s->tokens;
    L.frames += s->frames;
    if (s->fd >= 0)
        close(s->fd);
    buf_free(&s->head);
    buf_free(&s->sse);
    buf_free(&s->errbody);
    L.slots[s->slot] = NULL;
    L.inflight--;
    L.done++;
    free(s);
    return -1;
}

/* Python's repr() of a short bytes value, roughly: b'tok2'. */
static void bytes_repr(char *out, size_t cap, const char *p, size_t n)
{
    size_t o = 0;
    o += (size_t)snprintf(out + o, cap - o, "b'");
    for (size_t i = 0; i < n && o + 6 < cap; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c == '\\' || c == '\'')
            o += (size_t)snprintf(out + o, cap - o, "\\%c", c);
        else if (c >= 0x20 && c < 0x7F)
            out[o++] = (char)c;
        else
            o += (size_t)snprintf(out + o, cap - o, "\\x%02x", c);
    }
    snprintf(out + o, cap - o, "'");
}

static int ls_http_error(lstream_t *s)
{
    char ebuf[200];
    int n = snprintf(ebuf, sizeof ebuf, "HTTP %d: ", s->status);
    size_t bl = s->errbody.len < 120 ? s->errbody.len : 120;
    memcpy(ebuf + n, s->errbody.p ? s->errbody.p : "", bl);
    ebuf[(size_t)n + bl] = 0;
    return ls_end(s, ebuf);
}

static int is_ascii_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

/* Decode the inside of a JSON string (escapes) into out; 0 if malformed. */
static int json_unescape(const char *p, size_t n, buf_t *out)
{
    const char *e = p + n;
    out->len = 0;
    while (p < e) {
        if (*p != '\\') {
            buf_add(out, p++, 1);
            continue;
        }
        if (++p >= e)
            return 0;
        char c = *p++, u8[4];
        uint32_t cp;
        switch (c) {
        case 'b': c = '\b'; break;
        case 'f': c = '\f'; break;
        case 'n': c = '\n'; break;
        case 'r': c = '\r'; break;
        case 't': c = '\t'; break;
        case '"':
        case '\\':
        case '/': break;
        case 'u':
            if (e - p < 4 || !hex4(p, &cp))
                return 0;
            p += 4;
            if (cp >= 0xD800 && cp < 0xDC00 && e - p >= 6 && p[0] == '\\' && p[1] == 'u') {
                uint32_t lo;
                if (hex4(p + 2, &lo) && lo >= 0xDC00 && lo < 0xE000) {
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                    p += 6;
                }
            }
            buf_add(out, u8, utf8_encode(u8, cp));
            continue;
        default: return 0;
        }
        buf_add(out, &c, 1);
    }
    return 1;
}

/* One SSE event (without its "\n\n"): loadgen._StreamProtocol._event, openai mode. */
static int ls_event(lstream_t *s, const char *ev, size_t len)
{
    if (len && ev[0] == ':') /* a comment: stream open, ping */
        return 0;
    const char *i = memmem(ev, len, "\"content\":\"", 11);
    if (!i) {
        if (len >= 12 && memcmp(ev, "data: [DONE]", 12) == 0) {
            s->finished = 1;
            return ls_end(s, NULL);
        }
        if (memmem(ev, len, "\"error\"", 7)) {
            char ebuf[200];
            snprintf(ebuf, sizeof ebuf, "error frame: %.*s", (int)(len < 160 ? len : 160), ev);
            return ls_end(s, ebuf);
        }
        return 0;
    }
    const char *c0 = i + 11, *e = ev + len, *j = c0;
    int escaped = 0;
    while (j < e && *j != '"') {
        if (*j == '\\') {
            escaped = 1;
            j++;
        }
        j++;
    }
    if (j >= e)
        return ls_end(s, "malformed event: unterminated content string");
    const char *content = c0;
    size_t clen = (size_t)(j - c0);
    if (escaped) { /* not the fake's tokens, but decode properly */
        if (!json_unescape(c0, clen, &L.scratch))
            return ls_end(s, "malformed event: bad escape in content");
        content = L.scratch.p;
        clen = L.scratch.len;
    }
    if (!clen)
        return 0;
    double t = mono();
    long n = s->tokens;
    const char *p = content, *ce = content + clen;
    while (p < ce) { /* the words, each of which must be the next "tok<n>" */
        while (p < ce && is_ascii_space(*p))
            p++;
        if (p >= ce)
            break;
        const char *w = p;
        while (p < ce && !is_ascii_space(*p))
            p++;
        char want[32] = "tok";
        size_t wl = (size_t)(p - w), el = 3 + put_u64(want + 3, (unsigned long long)n);
        if (wl != el || memcmp(w, want, el) != 0) {
            char rep[100], ebuf[140];
            bytes_repr(rep, sizeof rep, w, wl < 20 ? wl : 20);
            snprintf(ebuf, sizeof ebuf, "token %ld: got %s", n, rep);
            return ls_end(s, ebuf);
        }
        n++;
    }
    s->tokens = n;
    if (!s->have_ttft) {
        s->have_ttft = 1;
        dbl_push(&L.ttfts, t - s->t_sent);
        dbl_push(&L.ttfts_conn, t - s->t_conn);
    } else {
        dbl_push(&L.gaps, t - s->t_last);
    }
    s->frames++;
    s->t_last = t;
    return 0;
}

/* Body bytes (de-chunked): error bodies are kept for the message, SSE is split on "\n\n". */
static int ls_body(lstream_t *s, const char *d, size_t n)
{
    if (s->status != 200) {
        size_t keep = s->errbody.len < 240 ? 240 - s->errbody.len : 0;
        buf_add(&s->errbody, d, n < keep ? n : keep);
        return 0;
    }
    const char *base = d, *end = d + n, *from = d;
    int buffered = s->sse.len > 0;
    if (buffered) { /* an event that began in an earlier read */
        size_t old = s->sse.len;
        buf_add(&s->sse, d, n);
        base = s->sse.p;
        end = base + s->sse.len;
        from = base + old - 1; /* its "\n\n" may straddle the two reads */
    }
    const char *start = base;
    for (;;) {
        const char *i = memmem(from, (size_t)(end - from), "\n\n", 2);
        if (!i)
            break;
        if (ls_event(s, start, (size_t)(i - start)) < 0)
            return -1;
        start = from = i + 2;
    }
    size_t rest = (size_t)(end - start);
    if (buffered) {
        memmove(s->sse.p, start, rest);
        s->sse.len = rest;
    } else if (rest) {
        buf_add(&s->sse, start, rest);
    }
    if (s->sse.len > 1024 * 1024)
        return ls_end(s, "an SSE event larger than 1 MiB");
    return 0;
}

/* The body ended cleanly (last chunk, or Content-Length reached). */
static int ls_body_end(lstream_t *s)
{
    if (s->status != 200)
        return ls_http_error(s);
    /* loadgen.py accepts a clean end without [DONE]; an OpenAI stream always sends it. */
    return ls_end(s, "body ended without data: [DONE]");
}

static int ls_dechunk(lstream_t *s, const char *d, size_t n)
{
    while (n) {
        if (s->ck_state == CK_SIZE) {
            const char *nl = memchr(d, '\n', n);
            size_t take = nl ? (size_t)(nl - d) + 1 : n;
            if (s->ck_line_len + take >= sizeof s->ck_line)
                return ls_end(s, "bad chunk size line");
            memcpy(s->ck_line + s->ck_line_len, d, take);
            s->ck_line_len += take;
            d += take;
            n -= take;
            if (!nl)
                return 0;
            s->ck_line[s->ck_line_len] = 0;
            char *endp;
            unsigned long long size = strtoull(s->ck_line, &endp, 16);
            if (endp == s->ck_line || !((s->ck_line[0] >= '0' && s->ck_line[0] <= '9') ||
                                        (s->ck_line[0] | 0x20) >= 'a') ||
                (*endp != ';' && *endp != '\r' && *endp != '\n' && *endp != ' '))
                return ls_end(s, "bad chunk size line");
            s->ck_line_len = 0;
            if (size == 0)
                return ls_body_end(s);
            s->ck_need = size;
            s->ck_state = CK_DATA;
        } else {
            size_t take = n < s->ck_need ? n : (size_t)s->ck_need;
            if (s->ck_state == CK_DATA && ls_body(s, d, take) < 0)
                return -1;
            d += take;
            n -= take;
            s->ck_need -= take;
            if (!s->ck_need) {
                /* After the payload, its CRLF: skipped unchecked, as loadgen.py does. */
                s->ck_need = s->ck_state == CK_DATA ? 2 : 0;
                s->ck_state = s->ck_state == CK_DATA ? CK_CRLF : CK_SIZE;
            }
        }
    }
    return 0;
}

static int ls_payload(lstream_t *s, const char *d, size_t n)
{
    if (s->body_mode == BODY_CHUNKED)
        return ls_dechunk(s, d, n);
    if (s->body_mode == BODY_LENGTH) {
        size_t take = n < s->remain ? n : (size_t)s->remain;
        if (ls_body(s, d, take) < 0)
            return -1;
        s->remain -= take;
        return s->remain ? 0 : ls_body_end(s);
    }
    return ls_body(s, d, n);
}

/* The response head: status line and the framing headers. */
static int ls_head(lstream_t *s, const char *h, size_t n)
{
    const char *le = memmem(h, n, "\r\n", 2);
    if (!le)
        le = h + n;
    const char *sp = memchr(h, ' ', (size_t)(le - h));
    int status = 0, digits = 0;
    if (sp)
        for (const char *p = sp + 1; p < le && *p >= '0' && *p <= '9' && digits < 4; p++, digits++)
            status = status * 10 + (*p - '0');
    if (!sp || !digits || digits > 3 || (sp + 1 + digits < le && sp[1 + digits] != ' ')) {
        char rep[100], ebuf[140];
        size_t fl = (size_t)(le - h);
        bytes_repr(rep, sizeof rep, h, fl < 60 ? fl : 60);
        snprintf(ebuf, sizeof ebuf, "bad status line %s", rep);
        return ls_end(s, ebuf);
    }
    s->status = status;
    s->body_mode = BODY_CLOSE;
    int chunked = 0, has_length = 0;
    unsigned long long length = 0;
    for (const char *l = le; l < h + n;) {
        l += 2;
        const char *lend = memmem(l, (size_t)(h + n - l), "\r\n", 2);
        if (!lend)
            lend = h + n;
        const char *colon = memchr(l, ':', (size_t)(lend - l));
        if (colon) {
            const char *v = colon + 1;
            size_t nl = (size_t)(colon - l);
            while (v < lend && (*v == ' ' || *v == '\t'))
                v++;
            if (nl == 17 && !strncasecmp(l, "transfer-encoding", 17) &&
                contains_ci(v, (size_t)(lend - v), "chunked")) {
                chunked = 1;
            } else if (nl == 14 && !strncasecmp(l, "content-length", 14)) {
                has_length = 1;
                length = strtoull(v, NULL, 10);
            }
        }
        l = lend;
    }
    if (chunked) {
        s->body_mode = BODY_CHUNKED;
        s->ck_state = CK_SIZE;
    } else if (has_length) {
        s->body_mode = BODY_LENGTH;
        s->remain = length;
        if (!length)
            return ls_body_end(s);
    }
    s->headers_done = 1;
    return 0;
}

static int ls_data(lstream_t *s, const char *d, size_t n)
{
    if (!s->headers_done) {
        const char *hend;
        if (!s->head.len && (hend = memmem(d, n, "\r\n\r\n", 4))) { /* the usual case */
            if (ls_head(s, d, (size_t)(hend - d)) < 0)
                return -1;
            n -= (size_t)(hend + 4 - d);
            d = hend + 4;
        } else {
            size_t old = s->head.len;
            buf_add(&s->head, d, n);
            size_t from = old > 3 ? old - 3 : 0;
            hend = memmem(s->head.p + from, s->head.len - from, "\r\n\r\n", 4);
            if (!hend) {
                if (s->head.len > 64 * 1024)
                    return ls_end(s, "response head larger than 64 KiB");
                return 0;
            }
            if (ls_head(s, s->head.p, (size_t)(hend - s->head.p)) < 0)
                return -1;
            size_t off = (size_t)(hend + 4 - s->head.p);
            /* The rest of the bytes, from the head buffer: freed only after use. */
            int r = s->head.len > off ? ls_payload(s, s->head.p + off, s->head.len - off) : 0;
            if (r < 0)
                return -1;
            buf_free(&s->head);
            return 0;
        }
        if (!n)
            return 0;
    }
    return ls_payload(s, d, n);
}

static int ls_eof(lstream_t *s, const char *why)
{
    if (s->finished)
        return ls_end(s, NULL);
    if (s->status && s->status != 200)
        return ls_http_error(s);
    char ebuf[160];
    snprintf(ebuf, sizeof ebuf, "connection closed before the end%s%s%s", why ? " (" : "",
             why ? why : "", why ? ")" : "");
    return ls_end(s, ebuf);
}

static int ls_readable(lstream_t *s)
{
    static char rbuf[256 * 1024];
    for (;;) {
        ssize_t r = read(s->fd, rbuf, sizeof rbuf);
        if (r > 0)
            return ls_data(s, rbuf, (size_t)r);
        if (r == 0)
            return ls_eof(s, NULL);
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return 0;
        return ls_eof(s, strerror(errno));
    }
}

/* Connected (or failed to): send the request, then wait for the response. */
static int ls_writable(lstream_t *s)
{
    if (s->connecting) {
        int err = 0;
        socklen_t el = sizeof err;
        getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &el);
        if (err) {
            char ebuf[120];
            snprintf(ebuf, sizeof ebuf, "connect: %s", strerror(err));
            return ls_end(s, ebuf);
        }
        s->connecting = 0;
        s->t_sent = s->t_last = mono(); /* loadgen.py's clock starts at the request */
        dbl_push(&L.connects, s->t_sent - s->t_conn);
    }
    const buf_t *req = &s->t->req;
    while (s->req_off < req->len) {
        ssize_t w = write(s->fd, req->p + s->req_off, req->len - s->req_off);
        if (w > 0) {
            s->req_off += (size_t)w;
        } else if (w < 0 && errno == EINTR) {
            continue;
        } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            return 0;
        } else {
            return ls_eof(s, strerror(errno));
        }
    }
    s->sending = 0;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = s};
    epoll_ctl(L.ep, EPOLL_CTL_MOD, s->fd, &ev);
    return 0;
}

static void ls_start(void)
{
    long i = L.started++;
    int slot = 0;
    while (L.slots[slot])
        slot++;
    lstream_t *s = calloc(1, sizeof *s);
    if (!s)
        die("out of memory");
    s->slot = slot;
    s->t = &L.targets[i % L.ntargets];
    s->connecting = s->sending = 1;
    L.slots[slot] = s;
    L.inflight++;
    s->t_conn = s->t_sent = s->t_last = mono();
    s->fd = socket(s->t->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s->fd < 0) {
        char ebuf[120];
        snprintf(ebuf, sizeof ebuf, "connect: socket: %s", strerror(errno));
        ls_end(s, ebuf);
        return;
    }
    int one = 1;
    setsockopt(s->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    int rc;
    do
        rc = connect(s->fd, (struct sockaddr *)&s->t->addr, s->t->alen);
    while (rc < 0 && errno == EINTR);
    if (rc < 0 && errno != EINPROGRESS) {
        char ebuf[120];
        snprintf(ebuf, sizeof ebuf, "connect: %s", strerror(errno));
        ls_end(s, ebuf);
        return;
    }
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP, .data.ptr = s};
    if (epoll_ctl(L.ep, EPOLL_CTL_ADD, s->fd, &ev) < 0) {
        char ebuf[120];
        snprintf(ebuf, sizeof ebuf, "epoll_ctl: %s", strerror(errno));
        ls_end(s, ebuf);
    }
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void dbl_sort(dbl_t *a)
{
    if (a->n)
        qsort(a->v, a->n, sizeof *a->v, cmp_double);
}

/* loadgen.percentile: sorted[max(0, min(n-1, int(round(p/100*n + 0.5)) - 1))], where
 * Python's round() rounds halves to even. The array must be sorted. */
static double percentile(const dbl_t *a, double p)
{
    double x = p / 100 * (double)a->n + 0.5;
    long long f = (long long)x; /* x >= 0: truncation is floor */
    double frac = x - (double)f;
    long long r = frac > 0.5 ? f + 1 : frac < 0.5 ? f : (f % 2 ? f + 1 : f);
    long long k = r - 1;
    if (k > (long long)a->n - 1)
        k = (long long)a->n - 1;
    if (k < 0)
        k = 0;
    return a->v[k];
}

static void put_ms(const char *key, const dbl_t *a, double p, int max)
{
    if (!a->n) {
        printf("  \"%s\": null,\n", key);
        return;
    }
    double v = max ? a->v[a->n - 1] : percentile(a, p);
    printf("  \"%s\": %.2f,\n", key, v * 1000);
}

static void put_json_str(const char *s)
{
    L.scratch.len = 0;
    json_escape(&L.scratch, s, strlen(s));
    printf("\"%.*s\"", (int)L.scratch.len, L.scratch.p);
}

static double cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec * 1e-6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec * 1e-6;
}

static void add_target(const char *spec, const char *path, const char *api_key,
                       const char *model, long max_tokens)
{
    const char *colon = strrchr(spec, ':');
    if (!colon || colon == spec || !colon[1])
        die("load: bad target %s (want HOST:PORT)", spec);
    char host[256];
    snprintf(host, sizeof host, "%.*s", (int)(colon - spec), spec);
    long port = parse_long(colon + 1, "port", 1, 65535);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_NUMERICSERV},
                    *ai;
    int rc = getaddrinfo(host, colon + 1, &hints, &ai);
    if (rc)
        die("load: %s: %s", host, gai_strerror(rc));
    L.targets = realloc(L.targets, (size_t)(L.ntargets + 1) * sizeof *L.targets);
    if (!L.targets)
        die("out of memory");
    target_t *t = &L.targets[L.ntargets++];
    memset(t, 0, sizeof *t);
    memcpy(&t->addr, ai->ai_addr, ai->ai_addrlen);
    t->alen = ai->ai_addrlen;
    freeaddrinfo(ai);

    /* Byte for byte loadgen.openai_request: json.dumps()'s default separators. */
    buf_t body = {0};
    buf_str(&body, "{\"model\": \"");
    json_escape(&body, model, strlen(model));
    buf_str(&body, "\", \"messages\": [{\"role\": \"user\", \"content\": \"Count for me.\"}], "
                   "\"stream\": true");
    if (max_tokens >= 0)
        buf_printf(&body, ", \"max_tokens\": %ld", max_tokens);
    buf_str(&body, "}");
    buf_printf(&t->req, "POST %s HTTP/1.1\r\nHost: %s:%ld\r\n", path, host, port);
    if (api_key && *api_key)
        buf_printf(&t->req, "Authorization: Bearer %s\r\n", api_key);
    buf_printf(&t->req,
               "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
               "Content-Length: %zu\r\nConnection: close\r\n\r\n",
               body.len);
    buf_add(&t->req, body.p, body.len);
    buf_free(&body);
}

static int load_main(int argc, char **argv)
{
    const char *targets = NULL, *api_key = NULL, *path = "/v1/chat/completions";
    const char *model = "fake-count";
    long max_tokens = -1;
    L.C = 1, L.R = 1, L.expect = -1, L.timeout = 120;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc)
            die("load: %s needs a value", a);
        const char *v = argv[++i];
        if (!strcmp(a, "--target"))
            targets = v;
        else if (!strcmp(a, "--api-key"))
            api_key = v;
        else if (!strcmp(a, "--path"))
            path = v;
        else if (!strcmp(a, "--model"))
            model = v;
        else if (!strcmp(a, "-c") || !strcmp(a, "--concurrency"))
            L.C = parse_long(v, "-c", 1, 1000000);
        else if (!strcmp(a, "-n") || !strcmp(a, "--requests"))
            L.R = parse_long(v, "-n", 0, 100000000);
        else if (!strcmp(a, "--tokens"))
            L.expect = parse_long(v, "--tokens", 0, 100000000);
        else if (!strcmp(a, "--max-tokens"))
            max_tokens = parse_long(v, "--max-tokens", 0, 100000000);
        else if (!strcmp(a, "--timeout"))
            L.timeout = parse_double(v, "--timeout");
        else
            die("load: unknown option %s", a);
    }
    if (!targets)
        die("load: --target HOST:PORT[,HOST:PORT...] is required");
    char *list = strdup(targets), *save = NULL;
    for (char *t = strtok_r(list, ",", &save); t; t = strtok_r(NULL, ",", &save))
        add_target(t, path, api_key, model, max_tokens);
    free(list);
    if (!L.ntargets)
        die("load: no targets");
    signal(SIGPIPE, SIG_IGN);
    raise_nofile();
    L.ep = epoll_create1(EPOLL_CLOEXEC);
    if (L.ep < 0)
        die("load: epoll: %s", strerror(errno));
    if (L.C > L.R)
        L.C = L.R > 0 ? L.R : 1;
    L.slots = calloc((size_t)L.C, sizeof *L.slots);
    if (!L.slots)
        die("out of memory");

    struct epoll_event evs[1024];
    double cpu0 = cpu_seconds(), t0 = mono(), deadline = t0 + L.timeout;
    for (;;) {
        while (L.inflight < L.C && L.started < L.R)
            ls_start();
        if (L.done >= L.R)
            break;
        double now = mono();
        if (now >= deadline) { /* whatever is left counts as an error */
            char ebuf[96];
            for (long k = 0; k < L.C; k++) {
                lstream_t *s = L.slots[k];
                if (s) {
                    snprintf(ebuf, sizeof ebuf, "timeout after %.0f s (%ld tokens)", L.timeout,
                             s->tokens);
                    ls_end(s, ebuf);
                }
            }
            snprintf(ebuf, sizeof ebuf, "timeout after %.0f s (not started)", L.timeout);
            for (; L.started < L.R; L.started++, L.done++)
                record_error(ebuf);
            break;
        }
        int n = epoll_wait(L.ep, evs, 1024, ms_until(deadline, now));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("load: epoll_wait: %s", strerror(errno));
        }
        for (int i = 0; i < n; i++) {
            lstream_t *s = evs[i].data.ptr;
            uint32_t e = evs[i].events;
            /* Each returns -1 once the stream has ended (and is freed). */
            if (s->sending) {
                if ((e & (EPOLLOUT | EPOLLERR | EPOLLHUP)) && ls_writable(s) < 0)
                    continue;
                if (s->sending)
                    continue;
            }
            if (e & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
                ls_readable(s);
        }
    }
    double wall = mono() - t0, cpu = cpu_seconds() - cpu0;

    dbl_sort(&L.ttfts);
    dbl_sort(&L.ttfts_conn);
    dbl_sort(&L.gaps);
    dbl_sort(&L.totals);
    dbl_sort(&L.connects);

    /* loadgen.summarise()'s keys first, in its order; then this program's own. */
    printf("{\n  \"requests\": %ld,\n  \"complete\": %ld,\n  \"errors\": %ld,\n", L.done,
           L.complete, L.errors);
    printf("  \"error_kinds\": {");
    for (int k = 0; k < L.nkinds; k++) {
        printf("%s", k ? ", " : "");
        put_json_str(L.kinds[k].key);
        printf(": %ld", L.kinds[k].n);
    }
    printf("},\n  \"tokens\": %ld,\n", L.tokens);
    if (L.frames)
        printf("  \"tokens_per_frame\": %.2f,\n", (double)L.tokens / (double)L.frames);
    else
        printf("  \"tokens_per_frame\": null,\n");
    printf("  \"wall_s\": %.3f,\n", wall);
    if (wall > 0)
        printf("  \"tokens_per_s\": %.1f,\n", (double)L.tokens / wall);
    else
        printf("  \"tokens_per_s\": null,\n");
    put_ms("ttft_p50_ms", &L.ttfts, 50, 0);
    put_ms("ttft_p99_ms", &L.ttfts, 99, 0);
    put_ms("gap_p50_ms", &L.gaps, 50, 0);
    put_ms("gap_p99_ms", &L.gaps, 99, 0);
    put_ms("gap_max_ms", &L.gaps, 0, 1);
    put_ms("total_p50_ms", &L.totals, 50, 0);
    put_ms("total_p99_ms", &L.totals, 99, 0);
    printf("  \"loadgen_cpu_s\": %.3f,\n", cpu);
    if (L.tokens)
        printf("  \"loadgen_cpu_us_per_token\": %.2f,\n", cpu / (double)L.tokens * 1e6);
    else
        printf("  \"loadgen_cpu_us_per_token\": null,\n");
    printf("  \"error_samples\": [");
    for (int k = 0; k < L.nsamples; k++) {
        printf("%s", k ? ", " : "");
        put_json_str(L.samples[k]);
    }
    printf("],\n  \"frames\": %ld,\n", L.frames);
    put_ms("connect_p50_ms", &L.connects, 50, 0);
    put_ms("connect_p99_ms", &L.connects, 99, 0);
    put_ms("ttft_from_connect_p50_ms", &L.ttfts_conn, 50, 0);
    put_ms("ttft_from_connect_p99_ms", &L.ttfts_conn, 99, 0);
    printf("  \"concurrency\": %ld,\n  \"elapsed_s\": %.3f,\n  \"cpu_s\": %.3f\n}\n", L.C, wall,
           cpu);
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 2 && !strcmp(argv[1], "upstream"))
        return upstream_main(argc - 2, argv + 2);
    if (argc >= 2 && !strcmp(argv[1], "load"))
        return load_main(argc - 2, argv + 2);
    fprintf(stderr,
            "usage: %s upstream [--host H] [--port P] [--tokens N] [--gap-ms G]\n"
            "       %s load --target HOST:PORT[,HOST:PORT...] [-c C] [-n R] [--tokens N]\n"
            "            [--api-key KEY] [--path P] [--model M] [--max-tokens K] [--timeout S]\n",
            argv[0], argv[0]);
    return 2;
}
