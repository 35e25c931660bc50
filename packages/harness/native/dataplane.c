/*
 * The --expose data plane, guest side: a second virtio-serial port ("aegis.data", or vsock port
 * 1025 where the backend has no virtio-serial) carrying
 * forwarded TCP connections as binary frames, spliced here in C to sockets on the guest's
 * loopback. It is separate from the agent channel (JSON-RPC through the Node harness) because
 * under emulation every byte Node touches is expensive: here bytes are copied, not encoded.
 *
 * Frame: u32 connection id, u8 type, u32 payload length (big-endian), then the payload.
 *   OPEN   host->guest  payload u16 guest port: connect to 127.0.0.1 (then ::1) on it; port 0
 *                       is the harness's file service (FILES_SOCKET, a unix socket no network
 *                       reaches), which moves `aegis cp` bytes over this channel, not base64 JSON
 *   OPENED guest->host  connected
 *   DATA   both         bytes for the other end's socket
 *   ACK    both         u32 count: that many DATA bytes were written to the socket
 *   FIN    both         the sender's socket will send no more (a half-close)
 *   RST    both         the connection is gone (refused, reset, or aborted)
 *   CONNECT guest->host payload u8 4, 4-byte IPv4 address, u16 port: a connection of the
 *                       guest's own (egress.c redirected it here) to that destination; the
 *                       host answers OPENED or RST. Its id has the top bit set (the host's do not)
 *   DNS    both         a DNS query (guest->host, from a program of the guest's) or its
 *                       answer (host->guest, same id)
 *   LINK   both         id 0: the packet link (datalink.c). host->guest u8 1 + u32 epoch: an
 *                       offer; u8 2: every later frame comes as packets, not on the port.
 *                       guest->host u32: credit for that many more bytes as packets (the
 *                       first accepts the offer)
 * Each side keeps at most DP_WINDOW unacknowledged bytes in flight per connection, so a slow
 * reader never makes the other side buffer without bound. The host end (aegisd) is trusted
 * no more than it must be: malformed or oversized frames end the connection they name.
 */
#define _GNU_SOURCE
#include "dataplane.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define DP_MAX_CONNS 1024
#define DP_WINDOW (1024 * 1024)
/* The host pauses its reader at DP_WINDOW unacknowledged, so one more read may land past it. */
#define DP_RECV_CAP (2 * DP_WINDOW)
#define DP_CHUNK (256 * 1024)
#define DP_HDR 9
#define DP_PORT_BUF (4 * 1024 * 1024)

enum { F_OPEN = 1, F_OPENED = 2, F_DATA = 3, F_ACK = 4, F_FIN = 5, F_RST = 6, F_CONNECT = 7, F_DNS = 8, F_LINK = 9 };
enum { LINK_OFFER = 1, LINK_SWITCHED = 2 };

/*
 * We acknowledge what we wrote to a socket once this much has gathered, not after every frame:
 * each write to the port costs an exit to the VMM, and downloads spent 8-17% of the guest's
 * time there. The host pauses at DP_WINDOW unacknowledged and resumes below half of it, so
 * holding back less than a quarter never stalls it.
 */
#define DP_ACK_BYTES (DP_WINDOW / 4)

/* Connections the guest opens (egress) are numbered from here; the host numbers below it. */
#define DP_GUEST_IDS 0x80000000u
/* A DNS message over UDP (EDNS allows 4096). */
#define DP_DNS_MAX 4096
/* Queries waiting for the host's answer; a slot unanswered this long is reused. */
#define DP_DNS_SLOTS 64
#define DP_DNS_WAIT_MS 10000
/* connecting: 4 = a guest connection waiting for the host's OPENED or RST. */
#define WAITING_HOST 4

struct conn {
  uint32_t id;
  int fd;
  uint16_t port;
  int connecting; /* 1: to 127.0.0.1, 2: to ::1, 3: the file service, WAITING_HOST */
  long long retry_at_ms;
  long long give_up_ms;
  int backoff_ms;
  int read_done;  /* our socket hit EOF and FIN went out */
  int peer_fin;   /* the host's side will send no more */
  size_t unacked; /* DATA bytes sent to the host and not yet acknowledged */
  size_t acked_pending;
  char *out; /* bytes from the host not yet written to the socket */
  size_t out_len;
};

/*
 * A server whose accept queue is full (python's http.server listens with a backlog of 5) makes
 * the kernel drop our SYN and retry it after 1, 3, 7, 15, 31 s... On loopback a handshake that
 * has not completed in a few milliseconds was dropped, so we start over with a fresh SYN,
 * backing off from DP_RETRY_MIN_MS to DP_RETRY_MAX_MS, for as long as a TCP connect would wait.
 */
#define DP_RETRY_MIN_MS 20
#define DP_RETRY_MAX_MS 500
#define DP_CONNECT_TIMEOUT_MS 75000

static long long now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/*
 * The packet link (datalink.c): off; accepted (our first credit sent, the host's frames still
 * come on the port until its LINK_SWITCHED); on (they come as packets, in the host's epoch and
 * numbered from 0). Credits for what we took from the socket go back in quarters of the window.
 */
static int link_state, link_fd = -1;
static uint32_t link_epoch, link_seq;
static size_t link_unreported;
enum { LINK_OFF, LINK_ACCEPTED, LINK_ON };

static struct conn *conns[DP_MAX_CONNS];
static int nconns;
static char *inb, *outb; /* from / to the port */
/* outb holds bytes [out_off, out_len): the port takes at most 32 KiB per write, and moving
 * the rest down after each one cost more than the copy itself under emulation. */
static size_t in_len, out_len, out_off;

static void put_frame(uint32_t id, uint8_t type, const void *payload, uint32_t len) {
  unsigned char h[DP_HDR];
  h[0] = id >> 24, h[1] = id >> 16, h[2] = id >> 8, h[3] = id;
  h[4] = type;
  h[5] = len >> 24, h[6] = len >> 16, h[7] = len >> 8, h[8] = len;
  memcpy(outb + out_len, h, DP_HDR);
  if (len) memcpy(outb + out_len + DP_HDR, payload, len);
  out_len += DP_HDR + len;
}

/* Control frames are tiny and always fit: reads stop well before the buffer fills. */
static int room_for(size_t payload) {
  if (out_len + DP_HDR + payload > DP_PORT_BUF && out_off > 0) {
    memmove(outb, outb + out_off, out_len - out_off);
    out_len -= out_off;
    out_off = 0;
  }
  return out_len + DP_HDR + payload <= DP_PORT_BUF;
}

static struct conn *find(uint32_t id) {
  for (int i = 0; i < nconns; i++)
    if (conns[i]->id == id) return conns[i];
  return NULL;
}

static void drop(struct conn *c, int send_rst) {
  if (send_rst && room_for(0)) put_frame(c->id, F_RST, NULL, 0);
  if (c->fd >= 0) close(c->fd);
  free(c->out);
  for (int i = 0; i < nconns; i++)
    if (conns[i] == c) {
      conns[i] = conns[--nconns];
      break;
    }
  free(c);
}

void widen_send_buffer(int fd) {
  /* setsockopt doubles what it is given; FORCE passes net.core.wmem_max (we are root). */
  int half = FILES_SNDBUF_BYTES / 2;
  if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &half, sizeof half) != 0) setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &half, sizeof half);
}

static int start_connect(struct conn *c) {
  if (c->port == 0) {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    widen_send_buffer(fd); /* host -> guest: `aegis cp` in, written here into the socket */
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strncpy(a.sun_path, FILES_SOCKET, sizeof a.sun_path - 1);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0 && errno != EINPROGRESS) {
      close(fd);
      return -1;
    }
    c->fd = fd;
    c->connecting = 3; /* no IPv6 fallback, no SYN retries */
    c->retry_at_ms = now_ms() + DP_CONNECT_TIMEOUT_MS;
    return 0;
  }
  int v6 = c->connecting == 2;
  int fd = socket(v6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  int r;
  if (v6) {
    struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons(c->port), .sin6_addr = IN6ADDR_LOOPBACK_INIT};
    r = connect(fd, (struct sockaddr *)&a, sizeof a);
  } else {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(c->port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    r = connect(fd, (struct sockaddr *)&a, sizeof a);
  }
  if (r != 0 && errno != EINPROGRESS) {
    close(fd);
    return -1;
  }
  c->fd = fd;
  c->retry_at_ms = now_ms() + c->backoff_ms;
  return 0;
}

/* A connect that failed on 127.0.0.1 is tried on ::1 (a server may listen on IPv6 only). */
static void connect_failed(struct conn *c) {
  if (c->fd >= 0) close(c->fd);
  c->fd = -1;
  if (c->connecting == 1) {
    c->connecting = 2;
    if (start_connect(c) == 0) return;
  }
  drop(c, 1);
}

/* A handshake still pending at its retry time: its SYN was dropped. Try again, or give up. */
static void retry_connect(struct conn *c) {
  close(c->fd);
  c->fd = -1;
  if (now_ms() >= c->give_up_ms) {
    drop(c, 1);
    return;
  }
  c->backoff_ms = c->backoff_ms * 2 > DP_RETRY_MAX_MS ? DP_RETRY_MAX_MS : c->backoff_ms * 2;
  if (start_connect(c) != 0) connect_failed(c);
}

static void flush_acks(struct conn *c) {
  if (c->acked_pending < DP_ACK_BYTES || !room_for(4)) return;
  unsigned char n[4] = {c->acked_pending >> 24, c->acked_pending >> 16, c->acked_pending >> 8, c->acked_pending};
  put_frame(c->id, F_ACK, n, 4);
  c->acked_pending = 0;
}

/* Writes what the host sent to the socket; returns -1 when the connection was dropped. */
static int drain_out(struct conn *c) {
  while (c->out_len > 0) {
    ssize_t k = write(c->fd, c->out, c->out_len);
    if (k < 0) {
      if (errno == EAGAIN || errno == EINTR) break;
      drop(c, 1);
      return -1;
    }
    memmove(c->out, c->out + k, c->out_len - (size_t)k);
    c->out_len -= (size_t)k;
    c->acked_pending += (size_t)k;
  }
  flush_acks(c);
  if (c->out_len == 0 && c->peer_fin) shutdown(c->fd, SHUT_WR);
  if (c->read_done && c->peer_fin && c->out_len == 0) {
    drop(c, 0);
    return -1;
  }
  return 0;
}

struct dns_slot {
  int used;
  long long sent_ms;
  struct sockaddr_in from;
};
static struct dns_slot dns_slots[DP_DNS_SLOTS];
static int dns_fd = -1;
static uint32_t next_guest_id;

/* A query from a program of the guest's: to the host, which resolves it under the policy. */
static void dns_query(void) {
  static unsigned char q[DP_DNS_MAX];
  struct sockaddr_in from;
  socklen_t fl = sizeof from;
  ssize_t k = recvfrom(dns_fd, q, sizeof q, 0, (struct sockaddr *)&from, &fl);
  if (k < 12 || fl != sizeof from || !room_for((size_t)k)) return;
  long long now = now_ms();
  for (uint32_t i = 0; i < DP_DNS_SLOTS; i++) {
    struct dns_slot *s = &dns_slots[i];
    if (s->used && now - s->sent_ms < DP_DNS_WAIT_MS) continue;
    s->used = 1;
    s->sent_ms = now;
    s->from = from;
    put_frame(DP_GUEST_IDS | i, F_DNS, q, (uint32_t)k);
    return;
  }
  /* Every slot is waiting: the query is dropped and its program retries, as over a real link. */
}

static void dns_answer(uint32_t id, const unsigned char *p, uint32_t len) {
  uint32_t i = id & ~DP_GUEST_IDS;
  if (!(id & DP_GUEST_IDS) || i >= DP_DNS_SLOTS || !dns_slots[i].used || len > DP_DNS_MAX) return;
  dns_slots[i].used = 0;
  sendto(dns_fd, p, len, MSG_DONTWAIT, (struct sockaddr *)&dns_slots[i].from, sizeof dns_slots[i].from);
}

/* A program of the guest's connected somewhere: ask the host to connect it there. */
static void egress_accept(int listen_fd) {
  for (;;) {
    int fd = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) return;
    struct sockaddr_in dst;
    socklen_t dl = sizeof dst;
    /* SO_ORIGINAL_DST (80): where the program meant to go, before the redirect. */
    if (nconns >= DP_MAX_CONNS || !room_for(7) || getsockopt(fd, SOL_IP, 80, &dst, &dl) != 0 || dst.sin_family != AF_INET) {
      struct linger l = {1, 0}; /* refused at once: a reset, not a hang */
      setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
      close(fd);
      continue;
    }
    struct conn *c = calloc(1, sizeof *c);
    if (!c) {
      close(fd);
      continue;
    }
    do c->id = DP_GUEST_IDS | (next_guest_id++ & ~DP_GUEST_IDS);
    while (find(c->id));
    c->fd = fd;
    c->connecting = WAITING_HOST;
    /* As long as the host may take to connect (it gives up sooner). */
    c->give_up_ms = c->retry_at_ms = now_ms() + DP_CONNECT_TIMEOUT_MS;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    conns[nconns++] = c;
    unsigned char dest[7];
    dest[0] = 4;
    memcpy(dest + 1, &dst.sin_addr, 4);
    memcpy(dest + 5, &dst.sin_port, 2); /* both already in network order */
    put_frame(c->id, F_CONNECT, dest, 7);
  }
}

static uint32_t be32(const unsigned char *p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]; }

static void handle_frame(uint32_t id, uint8_t type, const unsigned char *p, uint32_t len) {
  struct conn *c = find(id);
  switch (type) {
    case F_OPEN: {
      if (c || len != 2) return;
      if (nconns >= DP_MAX_CONNS) {
        if (room_for(0)) put_frame(id, F_RST, NULL, 0);
        return;
      }
      c = calloc(1, sizeof *c);
      if (!c) return;
      c->id = id;
      c->fd = -1;
      c->port = (uint16_t)(p[0] << 8 | p[1]);
      c->connecting = 1;
      c->backoff_ms = DP_RETRY_MIN_MS;
      c->give_up_ms = now_ms() + DP_CONNECT_TIMEOUT_MS;
      conns[nconns++] = c;
      if (start_connect(c) != 0) connect_failed(c);
      return;
    }
    case F_DATA:
      if (!c) return;
      if (c->connecting || c->peer_fin || c->out_len + len > DP_RECV_CAP) {
        drop(c, 1); /* the host broke the window or sent after FIN */
        return;
      }
      if (c->out_len == 0) {
        /* Straight to the socket; only what it does not take is copied aside. */
        ssize_t k = write(c->fd, p, len);
        if (k < 0 && errno != EAGAIN && errno != EINTR) {
          drop(c, 1);
          return;
        }
        if (k > 0) {
          p += k;
          len -= (uint32_t)k;
          c->acked_pending += (size_t)k;
          flush_acks(c);
        }
        if (len == 0) return;
      }
      if (!c->out && !(c->out = malloc(DP_RECV_CAP))) {
        drop(c, 1);
        return;
      }
      memcpy(c->out + c->out_len, p, len);
      c->out_len += len;
      drain_out(c);
      return;
    case F_ACK:
      if (c && len == 4) {
        uint32_t n = be32(p);
        c->unacked = n > c->unacked ? 0 : c->unacked - n;
      }
      return;
    case F_FIN:
      if (c && !c->connecting) {
        c->peer_fin = 1;
        drain_out(c);
      }
      return;
    case F_RST:
      if (c) drop(c, 0);
      return;
    case F_OPENED:
      if (c && c->connecting == WAITING_HOST && len == 0) c->connecting = 0;
      return;
    case F_DNS:
      dns_answer(id, p, len);
      return;
    case F_LINK:
      if (id != 0 || len < 1) return;
      if (p[0] == LINK_OFFER && len == 5 && link_fd >= 0 && room_for(4)) {
        /* Whatever an earlier host left queued is not this one's: emptied before we accept. */
        char junk[64];
        while (recv(link_fd, junk, sizeof junk, MSG_DONTWAIT | MSG_TRUNC) >= 0) continue;
        link_epoch = be32(p + 1);
        link_seq = 0;
        link_unreported = 0;
        link_state = LINK_ACCEPTED;
        uint32_t w = DATALINK_WINDOW;
        unsigned char n[4] = {w >> 24, w >> 16, w >> 8, w};
        put_frame(0, F_LINK, n, 4);
      } else if (p[0] == LINK_SWITCHED && len == 1 && link_state == LINK_ACCEPTED) {
        link_state = LINK_ON;
      }
      return;
  }
}

static void parse_input(void) {
  size_t off = 0;
  while (in_len - off >= DP_HDR) {
    const unsigned char *h = (const unsigned char *)inb + off;
    uint32_t len = be32(h + 5);
    if (len > DP_CHUNK) {
      /* Framing is lost; nothing after this can be trusted. Drop everything. */
      while (nconns > 0) drop(conns[0], 1);
      in_len = 0;
      return;
    }
    if (in_len - off < DP_HDR + len) break;
    /* Frames that would need output room wait until the port has drained some. */
    if (!room_for(DP_CHUNK)) break;
    handle_frame(be32(h), h[4], h + DP_HDR, len);
    off += DP_HDR + len;
  }
  memmove(inb, inb + off, in_len - off);
  in_len -= off;
}

static void host_gone(void) {
  link_state = LINK_OFF;
  while (nconns > 0) drop(conns[0], 0);
  memset(dns_slots, 0, sizeof dns_slots);
  in_len = out_len = out_off = 0;
}

/*
 * Frames the host sent as packets: appended to inb as if read from the port (each packet holds
 * whole frames). A packet of another epoch is an earlier host's and is dropped; a gap in the
 * numbering means packets were lost (only a full socket does that), so no connection's bytes
 * can be trusted any more: every one is reset, and the link goes on from this packet.
 */
static void link_read(void) {
  while (in_len + DATALINK_MTU <= DP_PORT_BUF) {
    unsigned char h[8];
    struct iovec iov[2] = {{h, sizeof h}, {inb + in_len, DATALINK_MTU - sizeof h}};
    struct msghdr m = {.msg_iov = iov, .msg_iovlen = 2};
    ssize_t k = recvmsg(link_fd, &m, MSG_DONTWAIT);
    if (k < 0) return;
    if (k < (ssize_t)sizeof h || (m.msg_flags & MSG_TRUNC) || be32(h) != link_epoch) continue;
    if (be32(h + 4) != link_seq) {
      while (nconns > 0) drop(conns[0], 1);
      in_len = 0;
      memmove(inb, iov[1].iov_base, (size_t)k - sizeof h);
    }
    link_seq = be32(h + 4) + 1;
    in_len += (size_t)k - sizeof h;
    link_unreported += (size_t)k - sizeof h;
  }
}

static void link_credit(void) {
  if (link_unreported < DATALINK_WINDOW / 4 || !room_for(4)) return;
  size_t n = link_unreported;
  unsigned char b[4] = {n >> 24, n >> 16, n >> 8, n};
  put_frame(0, F_LINK, b, 4);
  link_unreported = 0;
}

void *dataplane_main(void *arg) {
  const struct dp_port *dp = arg;
  int port = dp->fd;
  inb = malloc(DP_PORT_BUF);
  outb = malloc(DP_PORT_BUF);
  if (!inb || !outb) return NULL;
  link_fd = dp->link_fd;
  /* pfd[0]: the port; [1]: the egress listener; [2]: the DNS socket; [3]: the packet link;
   * then the connections. */
  enum { FIXED = 4 };
  static struct pollfd pfd[DP_MAX_CONNS + FIXED];
  dns_fd = dp->dns_fd;
  static struct conn *polled[DP_MAX_CONNS];
  int host_away = 0;
  for (;;) {
    int accepting = port < 0 && dp->listen_fd >= 0; /* vsock: waiting for the host to connect */
    pfd[0].fd = accepting ? dp->listen_fd : host_away ? -1 : port;
    pfd[0].events = accepting ? POLLIN : (in_len < DP_PORT_BUF ? POLLIN : 0) | (out_len > out_off ? POLLOUT : 0);
    /* New guest connections and queries only while the host is there to take them. */
    int egress_open = !accepting && !host_away && room_for(DP_DNS_MAX);
    pfd[1].fd = egress_open && nconns < DP_MAX_CONNS ? dp->egress_fd : -1;
    pfd[1].events = POLLIN;
    pfd[2].fd = egress_open ? dp->dns_fd : -1;
    pfd[2].events = POLLIN;
    pfd[3].fd = link_state == LINK_ON && in_len + DATALINK_MTU <= DP_PORT_BUF ? link_fd : -1;
    pfd[3].events = POLLIN;
    int n = 0;
    long long now = now_ms(), next_retry = -1;
    for (int i = 0; i < nconns; i++) {
      struct conn *c = conns[i];
      if (c->connecting && c->fd >= 0 && now >= c->retry_at_ms) {
        retry_connect(c);
        i = -1, n = 0, next_retry = -1; /* the list may have changed: build it again */
        continue;
      }
      if (c->fd < 0) continue;
      if (c->connecting && (next_retry < 0 || c->retry_at_ms < next_retry)) next_retry = c->retry_at_ms;
      short ev = 0;
      if ((c->connecting && c->connecting != WAITING_HOST) || c->out_len > 0) ev |= POLLOUT;
      if (!c->connecting && !c->read_done && c->unacked < DP_WINDOW && room_for(DP_CHUNK)) ev |= POLLIN;
      polled[n] = c;
      /* Nothing wanted now (a full window, EOF already read): not polled at all, or a peer that
       * hung up would report POLLHUP on every pass and spin this loop until the host catches up. */
      pfd[n + FIXED].fd = ev ? c->fd : -1;
      pfd[n + FIXED].events = ev;
      pfd[n + FIXED].revents = 0;
      n++;
    }
    /* With the host away the port reports POLLHUP continuously; look again in a while. */
    int timeout = host_away ? 20 : next_retry < 0 ? -1 : (int)(next_retry - now > 0 ? next_retry - now : 0);
    int r = poll(pfd, (nfds_t)n + FIXED, timeout);
    if (r < 0) {
      if (errno == EINTR) continue;
      return NULL;
    }
    if (host_away) {
      host_away = 0;
      continue;
    }
    if (accepting) {
      if (pfd[0].revents & POLLIN) port = accept4(dp->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
      continue;
    }
    int gone = 0;
    if (pfd[0].revents & POLLIN) {
      ssize_t k = read(port, inb + in_len, DP_PORT_BUF - in_len);
      if (k > 0) in_len += (size_t)k;
      else if (k == 0) gone = 1;
    } else if (pfd[0].revents & (POLLHUP | POLLERR)) {
      gone = 1;
    }
    if (gone) {
      host_gone();
      if (dp->listen_fd >= 0) {
        close(port);
        port = -1;
      } else {
        host_away = 1;
      }
      continue;
    }
    while ((pfd[0].revents & POLLOUT) && out_len > out_off) {
      ssize_t k = write(port, outb + out_off, out_len - out_off);
      if (k <= 0) break;
      out_off += (size_t)k;
      if (out_off == out_len) out_off = out_len = 0;
    }
    /* Sockets before new frames: the frames may drop connections polled[] still names. */
    for (int i = 0; i < n; i++) {
      struct conn *c = polled[i];
      short re = pfd[i + FIXED].revents;
      if (!re) continue;
      if (c->connecting) {
        int err = 0;
        socklen_t l = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
        if (err != 0 || (re & (POLLERR | POLLHUP))) {
          connect_failed(c);
          continue;
        }
        if (!(re & POLLOUT)) continue;
        c->connecting = 0;
        put_frame(c->id, F_OPENED, NULL, 0);
        continue;
      }
      if ((re & POLLOUT) && drain_out(c) < 0) continue;
      if (re & (POLLIN | POLLHUP | POLLERR)) {
        if (c->read_done || !room_for(DP_CHUNK)) continue;
        size_t want = DP_CHUNK;
        if (DP_WINDOW - c->unacked < want) want = DP_WINDOW - c->unacked;
        /* A full window with the peer gone (POLLHUP comes unasked): a read of 0 bytes would
         * return 0 and look like EOF, dropping what is still queued. Wait for an ACK. */
        if (want == 0) continue;
        ssize_t k = read(c->fd, outb + out_len + DP_HDR, want);
        if (k > 0) {
          /* The payload is already in place behind its header. */
          unsigned char *h = (unsigned char *)outb + out_len;
          h[0] = c->id >> 24, h[1] = c->id >> 16, h[2] = c->id >> 8, h[3] = c->id;
          h[4] = F_DATA;
          h[5] = 0, h[6] = (unsigned char)(k >> 16), h[7] = (unsigned char)(k >> 8), h[8] = (unsigned char)k;
          out_len += DP_HDR + (size_t)k;
          c->unacked += (size_t)k;
        } else if (k == 0) {
          c->read_done = 1;
          put_frame(c->id, F_FIN, NULL, 0);
          if (c->peer_fin && c->out_len == 0) drop(c, 0);
        } else if (errno != EAGAIN && errno != EINTR) {
          drop(c, 1);
        }
      }
    }
    if (pfd[3].fd >= 0 && (pfd[3].revents & POLLIN)) link_read();
    parse_input();
    link_credit();
    /* After the sockets: a new connection is appended to conns[], which polled[] mirrors. */
    if (pfd[1].fd >= 0 && (pfd[1].revents & POLLIN)) egress_accept(dp->egress_fd);
    if (pfd[2].fd >= 0 && (pfd[2].revents & POLLIN)) dns_query();
  }
}
