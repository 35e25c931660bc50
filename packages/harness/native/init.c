/*
 * aegis-init: the first instruction of PID 1 in every Aegis VM.
 *
 * It does in C what Node cannot: mount the filesystems, switch to an overlay root whose upper
 * layer is this VM's own scratch disk, bring up loopback, and, above all, reap every orphaned
 * process (only PID 1 inherits orphans, and Node has no waitpid(-1)). It then runs the Node
 * harness as its one supervised child and stays in a wait() loop. When the harness exits
 * (workload done, or a `shutdown` request), it syncs and resets the VM; with QEMU's
 * -no-reboot (and reboot=t on the kernel command line) that ends the VMM process.
 *
 * A second port carries --expose connections; dataplane.c splices them to guest sockets.
 *
 * It also owns the agent channel device and relays it to the harness over a socketpair
 * (the harness's fd 3). Node cannot use a virtio-serial port well itself: libuv treats a
 * character device as a file, so reads block a thread-pool thread, and a thread blocked in
 * read() keeps Node from ever exiting. A unix socket is something libuv polls natively; the
 * port's quirks (EOF and POLLHUP while the host is away, writes that block until it returns)
 * are handled here, once.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <arpa/inet.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/fs.h>
#include <linux/vm_sockets.h>
#include <linux/random.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <grp.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "dataplane.h"

#define AGENT_PORT_NAME "aegis.agent"
#define AGENT_VSOCK_PORT 1024
#define SCRATCH_DEV "/dev/vdb"
/* An OCI image's prepared filesystem (ext4, read-only, shared by every instance of it) is the
 * disk named by aegis_image= (the backend's word, /dev/vdc): named, not guessed from vdc
 * existing, since a named volume is vdc when there is no image. */
#define IMAGE_ROOT "/aegis/image"

static void image_names(const char *hostname);
static void machine_id(void);
#define HARNESS "/aegis/harness.mjs"

static void say(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fputs("aegis-init: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
}

static int debug_timing;

/* With aegis_debug=1 on the kernel command line (dotted names would be taken as module parameters and never reach init): when each boot phase ended. */
static void mark(const char *phase) {
  if (!debug_timing) return;
  struct timespec ts;
  clock_gettime(CLOCK_BOOTTIME, &ts);
  say("%s at %ld.%03ld s", phase, (long)ts.tv_sec, ts.tv_nsec / 1000000);
}

static void end_vm(void) {
  sync();
  reboot(RB_AUTOBOOT);
  for (;;) pause();
}

static void die(const char *what) {
  say("%s: %s", what, strerror(errno));
  end_vm();
}

static void must_mount(const char *src, const char *dst, const char *type, unsigned long flags, const char *data) {
  mkdir(dst, 0755);
  if (mount(src, dst, type, flags, data) != 0 && errno != EBUSY) {
    say("mount %s on %s", type, dst);
    die("mount");
  }
}

/* Overlay the read-only root with this VM's scratch disk, then make the overlay the root. */
static void enter_overlay_root(void) {
  struct stat st;
  if (stat(SCRATCH_DEV, &st) != 0) {
    say("no scratch disk: root stays read-only");
    return;
  }
  must_mount(SCRATCH_DEV, "/aegis/scratch", "ext4", MS_NOATIME, "");
  mkdir("/aegis/scratch/upper", 0755);
  mkdir("/aegis/scratch/work", 0755);
  must_mount("overlay", "/aegis/newroot", "overlay", MS_NOATIME,
             "lowerdir=/,upperdir=/aegis/scratch/upper,workdir=/aegis/scratch/work");
  /* The image's root: its read-only filesystem under this instance's own writable layer, on
   * the same scratch disk. Mounted inside the new root so that pivot_root carries it along. */
  const char *image_dev = getenv("aegis_image");
  if (image_dev && stat(image_dev, &st) == 0) {
    mkdir("/aegis/newroot/aegis/image-lower", 0755);
    mkdir("/aegis/newroot" IMAGE_ROOT, 0755);
    mkdir("/aegis/scratch/image-upper", 0755);
    mkdir("/aegis/scratch/image-work", 0755);
    must_mount(image_dev, "/aegis/newroot/aegis/image-lower", "ext4", MS_RDONLY | MS_NOATIME, "");
    must_mount("overlay", "/aegis/newroot" IMAGE_ROOT, "overlay", MS_NOATIME,
               "lowerdir=/aegis/newroot/aegis/image-lower,upperdir=/aegis/scratch/image-upper,workdir=/aegis/scratch/image-work");
  }
  if (chdir("/aegis/newroot") != 0) die("chdir newroot");
  /* pivot_root(".", ".") stacks the old root under the new one; detaching it leaves the new. */
  if (syscall(SYS_pivot_root, ".", ".") != 0) die("pivot_root");
  if (umount2(".", MNT_DETACH) != 0) die("umount old root");
  if (chdir("/") != 0) die("chdir /");
}

static void loopback_up(void) {
  int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return;
  struct ifreq ifr;
  memset(&ifr, 0, sizeof ifr);
  strncpy(ifr.ifr_name, "lo", IFNAMSIZ - 1);
  if (ioctl(fd, SIOCGIFFLAGS, &ifr) == 0) {
    ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
    if (ioctl(fd, SIOCSIFFLAGS, &ifr) != 0) say("loopback up: %s", strerror(errno));
  }
  close(fd);
}

static int set_in_addr(int fd, unsigned long req, const char *ifname, in_addr_t addr) {
  struct ifreq ifr;
  memset(&ifr, 0, sizeof ifr);
  strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
  struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
  sin->sin_family = AF_INET;
  sin->sin_addr.s_addr = addr;
  return ioctl(fd, req, &ifr);
}

/*
 * aegis_net=ADDR/PREFIX,GATEWAY,DNS (set by the VMM backend, which knows what its user-mode
 * network stack answers to): configure eth0 statically. No DHCP client in the guest keeps boot
 * fast and the image free of network tools. Without the parameter the VM has no network
 * device and nothing is configured.
 */
static void network_up(const char *spec) {
  char buf[128];
  snprintf(buf, sizeof buf, "%s", spec);
  char *addr_s = buf, *gw_s = NULL, *dns_s = NULL, *slash = NULL;
  if ((gw_s = strchr(addr_s, ',')) != NULL) *gw_s++ = '\0';
  if (gw_s && (dns_s = strchr(gw_s, ',')) != NULL) *dns_s++ = '\0';
  if ((slash = strchr(addr_s, '/')) != NULL) *slash++ = '\0';
  int prefix = slash ? atoi(slash) : 24;
  struct in_addr addr, gw;
  if (!gw_s || prefix < 1 || prefix > 32 || inet_pton(AF_INET, addr_s, &addr) != 1 || inet_pton(AF_INET, gw_s, &gw) != 1) {
    say("aegis_net=%s: expected ADDR/PREFIX,GATEWAY[,DNS]", spec);
    return;
  }
  int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return;
  in_addr_t mask = htonl(prefix == 32 ? 0xffffffffu : ~(0xffffffffu >> prefix));
  if (set_in_addr(fd, SIOCSIFADDR, "eth0", addr.s_addr) != 0) say("eth0 address: %s", strerror(errno));
  if (set_in_addr(fd, SIOCSIFNETMASK, "eth0", mask) != 0) say("eth0 netmask: %s", strerror(errno));
  struct ifreq ifr;
  memset(&ifr, 0, sizeof ifr);
  strncpy(ifr.ifr_name, "eth0", IFNAMSIZ - 1);
  if (ioctl(fd, SIOCGIFFLAGS, &ifr) == 0) {
    ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
    if (ioctl(fd, SIOCSIFFLAGS, &ifr) != 0) say("eth0 up: %s", strerror(errno));
  }
  struct rtentry rt;
  memset(&rt, 0, sizeof rt);
  struct sockaddr_in *dst = (struct sockaddr_in *)&rt.rt_dst, *gwa = (struct sockaddr_in *)&rt.rt_gateway,
                     *msk = (struct sockaddr_in *)&rt.rt_genmask;
  dst->sin_family = gwa->sin_family = msk->sin_family = AF_INET;
  gwa->sin_addr = gw;
  rt.rt_flags = RTF_UP | RTF_GATEWAY;
  rt.rt_dev = "eth0";
  if (ioctl(fd, SIOCADDRT, &rt) != 0) say("default route: %s", strerror(errno));
  close(fd);
  struct in_addr dns;
  if (dns_s && inet_pton(AF_INET, dns_s, &dns) == 1) {
    FILE *f = fopen("/etc/resolv.conf", "w");
    if (f) {
      fprintf(f, "nameserver %s\n", dns_s);
      fclose(f);
    }
  }
}

/* Finds /dev/vportNpM whose name is `want`; virtio probing may lag init slightly. */
static int find_port(const char *want, char *out, size_t outlen, int attempts) {
  for (int attempt = 0; attempt < attempts; attempt++) {
    DIR *d = opendir("/sys/class/virtio-ports");
    if (d) {
      struct dirent *e;
      while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        char p[512], name[128] = {0};
        snprintf(p, sizeof p, "/sys/class/virtio-ports/%s/name", e->d_name);
        int fd = open(p, O_RDONLY | O_CLOEXEC);
        if (fd < 0) continue;
        ssize_t n = read(fd, name, sizeof name - 1);
        close(fd);
        if (n > 0 && name[n - 1] == '\n') name[n - 1] = 0;
        if (strcmp(name, want) == 0) {
          snprintf(out, outlen, "/dev/%s", e->d_name);
          closedir(d);
          return 0;
        }
      }
      closedir(d);
    }
    struct timespec ts = {0, 10 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
  return -1;
}

/* ---- agent channel relay: port <-> socketpair -------------------------------------------- */

#define RELAY_BUF (256 * 1024)

struct relay {
  int port;      /* the virtio-serial port, or the host's vsock connection (-1: none yet); non-blocking */
  int listen_fd; /* vsock: where the host's next connection comes from; -1 with virtio-serial */
  int sock;      /* our end of the socketpair */
  volatile int done;
};

struct buf {
  char data[RELAY_BUF];
  size_t len;
};

static void consume(struct buf *b, size_t n) {
  memmove(b->data, b->data + n, b->len - n);
  b->len -= n;
}

static void *relay_main(void *arg) {
  struct relay *r = arg;
  static struct buf to_host, to_harness;
  int harness_open = 1, host_away = 0;
  for (;;) {
    /* With the host away a virtio-serial port reports POLLHUP continuously; leave it out and
     * look again in a while, rather than spin. Over vsock the host's going closes our
     * connection and the next one is accepted. Data for the host stays buffered meanwhile
     * (the harness is throttled). */
    int connected = r->port >= 0 && !host_away;
    struct pollfd p[3] = {
        {.fd = connected ? r->port : -1,
         .events = (to_harness.len < RELAY_BUF ? POLLIN : 0) | (to_host.len > 0 ? POLLOUT : 0)},
        {.fd = harness_open ? r->sock : -1,
         .events = (to_host.len < RELAY_BUF ? POLLIN : 0) | (to_harness.len > 0 ? POLLOUT : 0)},
        {.fd = r->listen_fd >= 0 && r->port < 0 ? r->listen_fd : -1, .events = POLLIN},
    };
    if (!harness_open && to_host.len == 0) break;
    int n = poll(p, 3, host_away ? 20 : -1);
    if (n < 0 && errno != EINTR) break;
    host_away = 0;
    int gone = 0;
    if (p[2].revents & POLLIN) {
      int c = accept4(r->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (c >= 0) r->port = c;
    }
    if (p[0].revents & POLLIN) {
      ssize_t k = read(r->port, to_harness.data + to_harness.len, RELAY_BUF - to_harness.len);
      if (k > 0) to_harness.len += (size_t)k;
      else if (k == 0) gone = 1;
    } else if (p[0].revents & (POLLHUP | POLLERR)) {
      gone = 1;
    }
    if (!gone && (p[0].revents & POLLOUT) && to_host.len > 0) {
      ssize_t k = write(r->port, to_host.data, to_host.len);
      if (k > 0) consume(&to_host, (size_t)k);
    }
    if (gone) {
      if (r->listen_fd >= 0) {
        close(r->port);
        r->port = -1;
      } else {
        host_away = 1;
      }
    }
    if (p[1].revents & (POLLIN | POLLHUP)) {
      ssize_t k = read(r->sock, to_host.data + to_host.len, RELAY_BUF - to_host.len);
      if (k > 0) to_host.len += (size_t)k;
      else if (k == 0 || (k < 0 && errno != EAGAIN && errno != EINTR)) harness_open = 0;
    }
    if ((p[1].revents & POLLOUT) && to_harness.len > 0) {
      ssize_t k = write(r->sock, to_harness.data, to_harness.len);
      if (k > 0) consume(&to_harness, (size_t)k);
    }
  }
  r->done = 1;
  return NULL;
}

/* A vsock listener for the host's connections (Firecracker, libkrun: host-initiated). */
static int vsock_listen(unsigned int port) {
  int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port};
  if (bind(fd, (struct sockaddr *)&a, sizeof a) != 0 || listen(fd, 4) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

/* ---- `aegis-init pty ROWS COLS -- CMD...`: a command on a new pseudo-terminal ------------
 * Run by the harness for `exec -t` (Node cannot allocate a PTY). fd 0 feeds the terminal,
 * fd 1 receives what it prints, fd 3 takes "ROWS COLS\n" lines to resize it (the kernel then
 * sends SIGWINCH). Ctrl-C arrives as a 0x03 byte and the terminal turns it into SIGINT for
 * the foreground process group, as on any terminal. Exits with the command's status
 * (128 + N when killed by signal N). */

static int write_all(int fd, const char *p, size_t n) {
  while (n > 0) {
    ssize_t k = write(fd, p, n);
    if (k < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) {
        struct pollfd w = {.fd = fd, .events = POLLOUT};
        poll(&w, 1, 100);
        continue;
      }
      return -1;
    }
    p += k;
    n -= (size_t)k;
  }
  return 0;
}

static int pty_main(int argc, char **argv) {
  if (argc < 6 || strcmp(argv[4], "--") != 0) {
    say("usage: aegis-init pty ROWS COLS -- CMD [ARG...]");
    return 2;
  }
  struct winsize ws = {.ws_row = (unsigned short)atoi(argv[2]), .ws_col = (unsigned short)atoi(argv[3])};
  int master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
  if (master < 0 || grantpt(master) != 0 || unlockpt(master) != 0) {
    say("cannot allocate a pty: %s", strerror(errno));
    return 126;
  }
  char slave_name[128];
  if (ptsname_r(master, slave_name, sizeof slave_name) != 0) return 126;
  ioctl(master, TIOCSWINSZ, &ws);
  pid_t child = fork();
  if (child < 0) return 126;
  if (child == 0) {
    setsid();
    int slave = open(slave_name, O_RDWR);
    if (slave < 0) _exit(126);
    ioctl(slave, TIOCSCTTY, 0);
    dup2(slave, 0);
    dup2(slave, 1);
    dup2(slave, 2);
    if (slave > 2) close(slave);
    close(3);
    if (!getenv("TERM")) setenv("TERM", "xterm", 1);
    execvp(argv[5], &argv[5]);
    fprintf(stderr, "%s: %s\n", argv[5], strerror(errno));
    _exit(errno == ENOENT ? 127 : 126);
  }
  fcntl(master, F_SETFL, O_NONBLOCK);
  char buf[16384], ctl[128];
  size_t ctl_len = 0;
  int in_open = 1, ctl_open = 1, status = 0, exited = 0;
  for (;;) {
    struct pollfd p[3] = {
        {.fd = master, .events = POLLIN},
        {.fd = in_open ? 0 : -1, .events = POLLIN},
        {.fd = ctl_open ? 3 : -1, .events = POLLIN},
    };
    int n = poll(p, 3, exited ? 0 : 100);
    if (n < 0 && errno != EINTR) break;
    if (p[0].revents & (POLLIN | POLLHUP | POLLERR)) {
      ssize_t k = read(master, buf, sizeof buf);
      if (k > 0) {
        if (write_all(1, buf, (size_t)k) != 0) break;
        continue; /* drain before looking at anything else */
      }
      if (k < 0 && errno != EAGAIN && errno != EINTR) break; /* EIO: every slave fd closed */
    }
    if (p[1].revents & (POLLIN | POLLHUP)) {
      ssize_t k = read(0, buf, sizeof buf);
      if (k > 0) write_all(master, buf, (size_t)k);
      else if (k == 0 || errno != EINTR) in_open = 0;
    }
    if (p[2].revents & (POLLIN | POLLHUP)) {
      ssize_t k = read(3, ctl + ctl_len, sizeof ctl - 1 - ctl_len);
      if (k <= 0) ctl_open = 0;
      else {
        ctl_len += (size_t)k;
        char *nl;
        while ((nl = memchr(ctl, '\n', ctl_len)) != NULL) {
          *nl = 0;
          unsigned rows = 0, cols = 0;
          if (sscanf(ctl, "%u %u", &rows, &cols) == 2) {
            struct winsize w = {.ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols};
            ioctl(master, TIOCSWINSZ, &w);
          }
          size_t used = (size_t)(nl - ctl) + 1;
          memmove(ctl, nl + 1, ctl_len - used);
          ctl_len -= used;
        }
        if (ctl_len == sizeof ctl - 1) ctl_len = 0; /* a line too long: drop it */
      }
    }
    if (exited) break; /* one last pass drained what the command left */
    if (waitpid(child, &status, WNOHANG) == child) exited = 1;
  }
  if (!exited) waitpid(child, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

/* ---- `aegis-init fresh`: make a restored VM its own ------------------------------------
 * A VM restored from a snapshot wakes with the snapshot's clock, hostname and random-number
 * state, shared with every other clone. The host sends the time, the instance's name and
 * fresh entropy; this credits the entropy and forces the kernel's CRNG to reseed from it
 * (RNDRESEEDCRNG), so no two clones produce the same random numbers.
 * Input on stdin: "EPOCH_MS HOSTNAME\n" then 32..256 bytes of entropy, then EOF. The harness
 * starts this process at boot, so a template's snapshot already holds it waiting: a clone
 * pays no fork of the (large) Node process for it. */
static int fresh_main(void) {
  char head[128];
  size_t h = 0;
  while (h < sizeof head - 1) {
    ssize_t k = read(0, head + h, 1);
    if (k <= 0) return 2;
    if (head[h] == '\n') break;
    h++;
  }
  head[h] = 0;
  long long ms = 0;
  char hostname[65] = {0};
  if (sscanf(head, "%lld %64s", &ms, hostname) != 2) {
    say("fresh: bad header");
    return 2;
  }
  struct {
    int entropy_count;
    int buf_size;
    unsigned char buf[256];
  } e;
  ssize_t n = 0, k;
  while (n < (ssize_t)sizeof e.buf && (k = read(0, e.buf + n, sizeof e.buf - (size_t)n)) > 0) n += k;
  if (n < 32) {
    say("fresh: need at least 32 bytes of entropy, got %zd", n);
    return 2;
  }
  e.entropy_count = (int)n * 8;
  e.buf_size = (int)n;
  int rnd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
  if (rnd < 0 || ioctl(rnd, RNDADDENTROPY, &e) != 0 || ioctl(rnd, RNDRESEEDCRNG) != 0) {
    say("fresh: reseeding the kernel RNG failed: %s", strerror(errno));
    return 1;
  }
  close(rnd);
  struct timespec now = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000};
  if (clock_settime(CLOCK_REALTIME, &now) != 0) say("fresh: setting the clock failed: %s", strerror(errno));
  if (sethostname(hostname, strlen(hostname)) != 0) say("fresh: sethostname failed: %s", strerror(errno));
  image_names(hostname);
  machine_id();
  return 0;
}

/* ---- the image root --------------------------------------------------------------------
 * What a container runtime gives a container: the kernel's filesystems, and the VM's own
 * name resolution files (written into the instance's layer, as Docker bind-mounts them). */

static void mount_into_image(const char *src, const char *rel, const char *type, unsigned long flags, const char *data) {
  char dst[256];
  snprintf(dst, sizeof dst, IMAGE_ROOT "%s", rel);
  struct stat st;
  /* A symlink here would point the mount anywhere in our own root: refuse it. */
  if (lstat(dst, &st) == 0 && !S_ISDIR(st.st_mode)) {
    say("image root: %s is not a directory; not mounting it", rel);
    return;
  }
  mkdir(dst, 0755);
  if (mount(src, dst, type, flags, data) != 0) say("image root: mount %s: %s", rel, strerror(errno));
}

static void write_image_file(const char *rel, const char *content) {
  char dir[256], path[256];
  snprintf(dir, sizeof dir, IMAGE_ROOT "/etc");
  struct stat st;
  if (lstat(dir, &st) != 0) mkdir(dir, 0755);
  else if (!S_ISDIR(st.st_mode)) return;
  snprintf(path, sizeof path, IMAGE_ROOT "%s", rel);
  unlink(path); /* often a symlink (to systemd-resolved's file, say): replace, never follow */
  int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
  if (fd < 0) return;
  if (write(fd, content, strlen(content)) < 0) say("image root: write %s: %s", rel, strerror(errno));
  close(fd);
}

/* The VM's name in the image's /etc/hostname and /etc/hosts; again after `fresh` renames a clone. */
static void image_names(const char *hostname) {
  struct stat st;
  if (stat("/aegis/image-lower", &st) != 0) return;
  char line[512];
  snprintf(line, sizeof line, "127.0.0.1 localhost %s\n::1 localhost\n", hostname);
  write_image_file("/etc/hosts", line);
  snprintf(line, sizeof line, "%s\n", hostname);
  write_image_file("/etc/hostname", line);
}

/* A new /etc/machine-id (ours, and the image's) from the kernel RNG: at boot, and again after
 * `fresh` has reseeded it, so every clone of a snapshot (or VM taken from the pool) has its own. */
static void machine_id(void) {
  unsigned char b[16];
  int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
  if (fd < 0 || read(fd, b, sizeof b) != (ssize_t)sizeof b) {
    say("machine-id: %s", strerror(errno));
    if (fd >= 0) close(fd);
    return;
  }
  close(fd);
  char line[34];
  for (size_t i = 0; i < sizeof b; i++) snprintf(line + 2 * i, 3, "%02x", b[i]);
  line[32] = '\n';
  line[33] = 0;
  unlink("/etc/machine-id");
  fd = open("/etc/machine-id", O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0444);
  if (fd >= 0) {
    if (write(fd, line, 33) < 0) say("machine-id: %s", strerror(errno));
    close(fd);
  }
  struct stat st;
  if (stat("/aegis/image-lower", &st) == 0) write_image_file("/etc/machine-id", line);
}

static void prepare_image_root(const char *hostname) {
  struct stat st;
  if (stat(IMAGE_ROOT "/.", &st) != 0 || stat("/aegis/image-lower", &st) != 0) return;
  mount_into_image("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
  mount_into_image("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, NULL);
  mount_into_image("/dev", "/dev", NULL, MS_BIND | MS_REC, NULL);
  image_names(hostname);
  char line[512];
  int fd = open("/etc/resolv.conf", O_RDONLY | O_CLOEXEC);
  if (fd >= 0) {
    ssize_t n = read(fd, line, sizeof line - 1);
    close(fd);
    if (n > 0) {
      line[n] = 0;
      write_image_file("/etc/resolv.conf", line);
    }
  }
}

/* ---- volumes ---------------------------------------------------------------------------
 * aegis_volN=FSTYPE,SOURCE,MODE,PATH (N from 0; PATH percent-encoded), put on the kernel
 * command line by the VMM backend: a named volume (ext4 on a block device) or a host
 * directory (9p) to mount at PATH in the workload's root before anything runs. With an image,
 * PATH is in the image's root, and the mount is made by a child chrooted there, so the
 * image's own symlinks resolve inside it, as they will for the workload. A volume that cannot
 * be mounted is not skipped: the harness refuses to run the workload and says why
 * (AEGIS_VOLUME_ERROR), so nothing writes to the scratch disk thinking it is persisted. */
#define MAX_VOLUMES 32
/* 9p over virtio: the largest message the guest's transport takes (512 KiB less headers);
 * cache=mmap: reads and writes go to the host at once (the host sees every write, and host
 * edits are seen), page cache only for mmap()ed files (which cache=none cannot map shared).
 * docs/design.md, "Volumes", has the measurements. */
#define SHARE_OPTIONS "trans=virtio,version=9p2000.L,msize=512000,cache=mmap"
static char volume_error[512];

static int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

static int percent_decode(const char *in, char *out, size_t outlen) {
  size_t n = 0;
  for (const char *p = in; *p; p++) {
    int c = (unsigned char)*p;
    if (c == '%') {
      int hi = hexval(p[1]), lo = hi < 0 ? -1 : hexval(p[2]);
      if (lo < 0) return -1;
      c = hi * 16 + lo;
      p += 2;
    }
    if (c == 0 || n + 1 >= outlen) return -1;
    out[n++] = (char)c;
  }
  out[n] = 0;
  return 0;
}

/* mkdir -p, in whatever root we are in now. */
static int make_parents(const char *path) {
  char buf[4096];
  snprintf(buf, sizeof buf, "%s", path);
  for (char *p = buf + 1;; p++) {
    if (*p == '/' || *p == 0) {
      char saved = *p;
      *p = 0;
      if (mkdir(buf, 0755) != 0 && errno != EEXIST) return errno;
      *p = saved;
      if (saved == 0) return 0;
    }
  }
}

/* Returns 0 or an errno. */
static int mount_volume_here(const char *fstype, const char *source, int readonly, const char *path) {
  int err = make_parents(path);
  if (err) return err;
  unsigned long flags = readonly ? MS_RDONLY : 0;
  if (strcmp(fstype, "9p") == 0) {
    /* Host files are data here: no device nodes or setuid programs taken from them. */
    return mount(source, path, "9p", flags | MS_NOSUID | MS_NODEV, SHARE_OPTIONS) == 0 ? 0 : errno;
  }
  if (strcmp(fstype, "ext4") != 0) return EINVAL;
  if (mount(source, path, "ext4", flags, "") == 0) return 0;
  err = errno;
  /* A volume whose last writer was killed has a journal to replay, which a read-only
   * device cannot do: read it as it is instead. */
  if (readonly && mount(source, path, "ext4", flags, "noload") == 0) {
    say("volume %s: mounted without replaying its journal (its last writer did not unmount it)", path);
    return 0;
  }
  return err;
}

static void mount_volumes(void) {
  struct stat st;
  int in_image = stat("/aegis/image-lower", &st) == 0;
  for (int i = 0; i < MAX_VOLUMES; i++) {
    char name[32];
    snprintf(name, sizeof name, "aegis_vol%d", i);
    const char *spec = getenv(name);
    if (!spec) continue;
    char buf[2048], path[1024];
    snprintf(buf, sizeof buf, "%s", spec);
    char *fields[4] = {buf, NULL, NULL, NULL};
    for (int f = 1; f < 4; f++) {
      char *comma = fields[f - 1] ? strchr(fields[f - 1], ',') : NULL;
      if (comma) *comma = 0;
      fields[f] = comma ? comma + 1 : NULL;
    }
    int err = 0;
    if (!fields[3] || percent_decode(fields[3], path, sizeof path) != 0 || path[0] != '/') {
      say("%s=%s: expected FSTYPE,SOURCE,ro|rw,PATH", name, spec);
      err = EINVAL;
      snprintf(path, sizeof path, "(volume %d)", i);
    } else if (in_image) {
      pid_t child = fork();
      if (child == 0) {
        if (chroot(IMAGE_ROOT) != 0 || chdir("/") != 0) _exit(errno ? errno : EIO);
        _exit(mount_volume_here(fields[0], fields[1], strcmp(fields[2], "ro") == 0, path));
      }
      int status = 0;
      if (child < 0 || waitpid(child, &status, 0) != child) err = child < 0 ? errno : ECHILD;
      else err = WIFEXITED(status) ? WEXITSTATUS(status) : EIO;
    } else {
      err = mount_volume_here(fields[0], fields[1], strcmp(fields[2], "ro") == 0, path);
    }
    if (err) {
      say("volume %s: %s", path, strerror(err));
      if (!volume_error[0]) snprintf(volume_error, sizeof volume_error, "AEGIS_VOLUME_ERROR=%.400s: %.80s", path, strerror(err));
    }
  }
}

/* `aegis-init blocking -- CMD...`: CMD with its stdin and stdout in blocking mode. The harness
 * hands file-service sockets to cat and tar this way (bytes then never pass through Node);
 * Node keeps its sockets non-blocking, a flag the child shares, and cat or tar would stop at
 * the first EAGAIN. The harness only writes its last short reply line afterwards. */
static int blocking_main(int argc, char **argv) {
  if (argc < 4 || strcmp(argv[2], "--") != 0) {
    fprintf(stderr, "usage: aegis-init blocking -- CMD...\n");
    return 2;
  }
  for (int fd = 0; fd <= 1; fd++) {
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0) fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
  }
  widen_send_buffer(1); /* a tar or a listing out to the file service's socket */
  execvp(argv[3], &argv[3]);
  fprintf(stderr, "aegis-init blocking: %s: %s\n", argv[3], strerror(errno));
  return 127;
}

/* `aegis-init sendfile`: copies stdin (a regular file) to stdout (the file service's socket)
 * with sendfile(2). Under emulation every copy of a byte is costly: read() + write() (cat) made
 * `aegis cp` out of a guest ~40% slower than the same bytes sent by sendfile. Where sendfile
 * cannot serve (an fs without it), the rest goes by read() and write(). */
static int sendfile_main(void) {
  for (int fd = 0; fd <= 1; fd++) {
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0) fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
  }
  widen_send_buffer(1);
  for (;;) {
    ssize_t n = sendfile(1, 0, NULL, 1 << 30);
    if (n > 0) continue;
    if (n == 0) return 0;
    if (errno == EINTR) continue;
    if (errno == EINVAL || errno == ENOSYS) break;
    fprintf(stderr, "sendfile: %s\n", strerror(errno));
    return 1;
  }
  static char buf[128 * 1024];
  for (;;) {
    ssize_t n = read(0, buf, sizeof buf);
    if (n == 0) return 0;
    if (n < 0) {
      if (errno == EINTR) continue;
      fprintf(stderr, "read: %s\n", strerror(errno));
      return 1;
    }
    for (ssize_t off = 0; off < n;) {
      ssize_t w = write(1, buf + off, (size_t)(n - off));
      if (w < 0) {
        if (errno == EINTR) continue;
        fprintf(stderr, "write: %s\n", strerror(errno));
        return 1;
      }
      off += w;
    }
  }
}

/* ---- `aegis-init chroot ROOT UID GID GROUPS CWD -- CMD...`: a command in the image root ---
 * Run by the harness for every workload and exec of an instance with an image. GROUPS is a
 * comma-separated list of supplementary gids ("-" for none). The command is looked up on the
 * PATH of its environment inside the image, as a container runtime does. */
static int chroot_main(int argc, char **argv) {
  if (argc < 9 || strcmp(argv[7], "--") != 0) {
    say("usage: aegis-init chroot ROOT UID GID GROUPS CWD -- CMD...");
    return 125;
  }
  uid_t uid = (uid_t)strtoul(argv[3], NULL, 10);
  gid_t gid = (gid_t)strtoul(argv[4], NULL, 10);
  gid_t groups[64];
  size_t ngroups = 0;
  if (strcmp(argv[5], "-") != 0) {
    for (char *tok = strtok(argv[5], ","); tok && ngroups < 64; tok = strtok(NULL, ",")) groups[ngroups++] = (gid_t)strtoul(tok, NULL, 10);
  }
  if (chroot(argv[2]) != 0 || chdir("/") != 0) {
    fprintf(stderr, "aegis: cannot enter the image root: %s\n", strerror(errno));
    return 125;
  }
  if (chdir(argv[6]) != 0) {
    fprintf(stderr, "aegis: working directory %s: %s\n", argv[6], strerror(errno));
    return 125;
  }
  if (setgroups(ngroups, groups) != 0 || setgid(gid) != 0 || setuid(uid) != 0) {
    fprintf(stderr, "aegis: cannot switch to user %u:%u: %s\n", (unsigned)uid, (unsigned)gid, strerror(errno));
    return 125;
  }
  execvp(argv[8], argv + 8);
  int err = errno;
  fprintf(stderr, "aegis: cannot run %s: %s\n", argv[8], strerror(err));
  return err == ENOENT ? 127 : 126;
}

/* ---- The workload's cgroup --------------------------------------------------------------
 * The guest's own plumbing must survive whatever its workload does. aegis-init and the
 * harness live in /sys/fs/cgroup/agent (a high CPU weight); the workload and every exec run
 * in /sys/fs/cgroup/workload, under a memory limit below the VM's RAM and a process limit,
 * so a memory hog or a fork bomb is killed or stopped inside its cgroup (and reported with
 * its status) while the harness keeps answering. The harness is also exempt from the OOM
 * killer (oom_score_adj -1000; PID 1 always is); `aegis-init cg` puts the score back to 0
 * for what it runs. */
#define CGROUP_ROOT "/sys/fs/cgroup"
#define WORKLOAD_CGROUP CGROUP_ROOT "/workload"
#define AGENT_CGROUP CGROUP_ROOT "/agent"
/* What the kernel, aegis-init and the harness keep for themselves. */
#define AGENT_RESERVE_KIB (128L * 1024)
/* One process per MiB of RAM (at least 128): a fork bomb then runs out of processes before
 * it runs the workload's memory into reclaim thrash, which under emulation froze everything
 * in the cgroup for minutes (measured: 7 min for an `echo` beside a bomb in 256 MiB). */
#define WORKLOAD_PIDS_MIN 128L

static int write_text(const char *file, const char *text) {
  int fd = open(file, O_WRONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  ssize_t n = write(fd, text, strlen(text));
  close(fd);
  return n == (ssize_t)strlen(text) ? 0 : -1;
}

static long mem_total_kib(void) {
  FILE *f = fopen("/proc/meminfo", "re");
  if (!f) return 0;
  long kib = 0;
  char line[128];
  while (fgets(line, sizeof line, f)) {
    if (sscanf(line, "MemTotal: %ld kB", &kib) == 1) break;
  }
  fclose(f);
  return kib;
}

static void setup_cgroups(void) {
  if (write_text(CGROUP_ROOT "/cgroup.subtree_control", "+memory +pids +cpu") != 0 &&
      write_text(CGROUP_ROOT "/cgroup.subtree_control", "+memory +pids") != 0) {
    say("cgroup controllers: %s (the workload runs without limits)", strerror(errno));
    return;
  }
  if (mkdir(AGENT_CGROUP, 0755) != 0 && errno != EEXIST) return;
  if (mkdir(WORKLOAD_CGROUP, 0755) != 0 && errno != EEXIST) return;
  /* Equal CPU weights at the top: the agent gets at least half the CPU whatever the workload
   * runs (a fork bomb is one sibling, not a thousand), and the workload at least half whatever
   * the agent does. A 100:1 weight for the agent starved a starting workload for a minute. */
  long total = mem_total_kib();
  long limit = total - AGENT_RESERVE_KIB;
  if (limit < total / 2) limit = total / 2;
  char buf[64];
  snprintf(buf, sizeof buf, "%ld", limit * 1024);
  if (total > 0 && write_text(WORKLOAD_CGROUP "/memory.max", buf) != 0) say("workload memory.max: %s", strerror(errno));
  /* Keep swapping out of it (there is no swap; this only states it) and the OOM kill local. */
  write_text(WORKLOAD_CGROUP "/memory.swap.max", "0");
  long pids = total / 1024;
  if (pids < WORKLOAD_PIDS_MIN) pids = WORKLOAD_PIDS_MIN;
  snprintf(buf, sizeof buf, "%ld", pids);
  if (write_text(WORKLOAD_CGROUP "/pids.max", buf) != 0) say("workload pids.max: %s", strerror(errno));
  /* Each process the harness starts gets a child of `workload` (`aegis-init cg` makes it), and
   * the CPU is shared between those children: a new exec next to a fork bomb gets its fair
   * share instead of one slot among a thousand. `workload` itself then holds no process. */
  write_text(WORKLOAD_CGROUP "/cgroup.subtree_control", "+cpu +memory");
  /* PID 1 itself moves to the agent cgroup (the harness follows when it is forked). */
  write_text(AGENT_CGROUP "/cgroup.procs", "0");
}

/* `aegis-init cg DIR -- CMD [ARG...]`: joins the cgroup DIR (made if missing), takes an ordinary OOM score
 * (the harness it comes from is exempt), then runs CMD. Joining before exec means nothing the
 * command forks can be outside the cgroup. */
static int cg_main(int argc, char **argv) {
  if (argc < 5 || strcmp(argv[3], "--") != 0) {
    say("usage: aegis-init cg DIR -- CMD [ARG...]");
    return 125;
  }
  char procs[512];
  snprintf(procs, sizeof procs, "%s/cgroup.procs", argv[2]);
  if (mkdir(argv[2], 0755) != 0 && errno != EEXIST) say("cannot make %s: %s", argv[2], strerror(errno));
  /* When the workload's memory runs out and the OOM killer picks a process of this group, it
   * takes the whole group: a fork bomb or a runaway build dies at once instead of thrashing,
   * and the other execs and the workload keep running. */
  char oom_group[512];
  snprintf(oom_group, sizeof oom_group, "%s/memory.oom.group", argv[2]);
  write_text(oom_group, "1");
  if (write_text(procs, "0") != 0) say("cannot join %s: %s", argv[2], strerror(errno));
  write_text("/proc/self/oom_score_adj", "0");
  execvp(argv[4], argv + 4);
  int err = errno;
  fprintf(stderr, "aegis: cannot run %s: %s\n", argv[4], strerror(err));
  return err == ENOENT ? 127 : 126;
}

int main(int argc, char **argv) {
  if (argc > 1 && strcmp(argv[1], "pty") == 0) return pty_main(argc, argv);
  if (argc > 1 && strcmp(argv[1], "fresh") == 0) return fresh_main();
  if (argc > 1 && strcmp(argv[1], "chroot") == 0) return chroot_main(argc, argv);
  if (argc > 1 && strcmp(argv[1], "cg") == 0) return cg_main(argc, argv);
  if (argc > 1 && strcmp(argv[1], "blocking") == 0) return blocking_main(argc, argv);
  if (argc > 1 && strcmp(argv[1], "sendfile") == 0) return sendfile_main();
  if (getpid() != 1) {
    say("must run as PID 1");
    return 2;
  }
  umask(022);
  debug_timing = getenv("aegis_debug") != NULL;
  mark("init started");
  /* Node's start reads scattered pages of a ~95 MB binary; under emulation each disk request
   * is costly, so read ahead in big steps. */
  int root_dev = open("/dev/vda", O_RDONLY | O_CLOEXEC);
  if (root_dev >= 0) {
    if (ioctl(root_dev, BLKRASET, 8192UL) != 0) say("read-ahead: %s", strerror(errno)); /* 4 MiB */
    close(root_dev);
  }
  enter_overlay_root();
  mark("overlay root ready");
  must_mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
  must_mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
  must_mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
  must_mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "mode=0620,ptmxmode=0666");
  must_mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
  must_mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
  must_mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
  must_mount("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
  setup_cgroups();
  loopback_up();
  const char *net = getenv("aegis_net");
  /* aegis_egress=1: no network card; the host carries each connection (egress.c). */
  const char *egress = getenv("aegis_egress");
  int egress_on = net && egress && strcmp(egress, "1") == 0;
  static struct dp_port data = {.fd = -1, .listen_fd = -1, .egress_fd = -1, .dns_fd = -1, .link_fd = -1};
  /* aegis_datalink=MAC: the data channel's packet link. First: the device may hold eth0's name. */
  const char *datalink = getenv("aegis_datalink");
  if (datalink && (data.link_fd = datalink_open(datalink)) < 0) say("data link %s: %s", datalink, strerror(errno));
  if (egress_on && egress_rename_dummy() != 0) say("egress: dummy0 -> eth0: %s", strerror(errno));
  if (net) network_up(net);
  if (egress_on) {
    char addr[64];
    snprintf(addr, sizeof addr, "%s", net);
    addr[strcspn(addr, "/,")] = '\0';
    /* Without its rules or listeners the guest is offline, never unfiltered: the host only
     * carries what the data plane asks it to. */
    if (egress_rules(addr) != 0) say("egress: nft rules: %s", strerror(errno));
    else if (egress_listen(&data.egress_fd, &data.dns_fd) != 0) say("egress: listen: %s", strerror(errno));
  }
  const char *hostname = getenv("aegis_hostname");
  if (!hostname) hostname = "aegis";
  sethostname(hostname, strlen(hostname));
  prepare_image_root(hostname);
  machine_id();
  mount_volumes();

  mark("filesystems mounted");
  static struct relay relay;
  int sv[2];
  relay.listen_fd = -1;
  /* aegis_agent=vsock: the backend carries both channels over vsock (ports 1024 and 1025);
   * otherwise they are virtio-serial ports found by name. */
  const char *agent = getenv("aegis_agent");
  if (agent && strcmp(agent, "vsock") == 0) {
    relay.port = -1;
    relay.listen_fd = vsock_listen(AGENT_VSOCK_PORT);
    if (relay.listen_fd < 0) {
      say("vsock listen on %d: %s", AGENT_VSOCK_PORT, strerror(errno));
      end_vm();
    }
    data.listen_fd = vsock_listen(DATA_VSOCK_PORT);
  } else {
    char port[300];
    if (find_port(AGENT_PORT_NAME, port, sizeof port, 200) != 0) {
      say("no virtio-serial port named %s", AGENT_PORT_NAME);
      end_vm();
    }
    relay.port = open(port, O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (relay.port < 0) die("open agent port");
    /* The agent port was found, so every port is probed by now: no need to wait for this one. */
    char data_path[300];
    if (find_port(DATA_PORT_NAME, data_path, sizeof data_path, 1) == 0) data.fd = open(data_path, O_RDWR | O_NONBLOCK | O_CLOEXEC);
  }
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) die("socketpair");
  relay.sock = sv[0];
  fcntl(relay.sock, F_SETFL, O_NONBLOCK);

  pid_t harness = fork();
  if (harness < 0) die("fork");
  if (harness == 0) {
    setsid();
    /* The OOM killer must pick the workload, never the agent that reports on it. */
    write_text("/proc/self/oom_score_adj", "-1000");
    if (dup2(sv[1], 3) != 3) _exit(127); /* dup2 clears close-on-exec */
    char *const argv[] = {"node", "--max-old-space-size=96", HARNESS, NULL};
    char *const envp[] = {
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME=/root",
        "LANG=C.UTF-8",
        "AEGIS_AGENT_FD=3",
        volume_error[0] ? volume_error : NULL,
        NULL,
    };
    execve("/aegis/node", argv, envp);
    say("exec node: %s", strerror(errno));
    _exit(127);
  }

  mark("harness started");
  close(sv[1]);
  pthread_t relay_thread;
  if (pthread_create(&relay_thread, NULL, relay_main, &relay) != 0) die("relay thread");
  if (data.fd >= 0 || data.listen_fd >= 0) {
    pthread_t data_thread;
    if (pthread_create(&data_thread, NULL, dataplane_main, &data) != 0) say("data plane thread failed");
  }

  /* Reap everything; the VM's life is the harness's life. */
  for (;;) {
    int status;
    pid_t pid = wait(&status);
    if (pid == harness) {
      if (WIFSIGNALED(status)) say("harness killed by signal %d", WTERMSIG(status));
      else if (WEXITSTATUS(status) != 0) say("harness exited with %d", WEXITSTATUS(status));
      break;
    }
    if (pid < 0 && errno == ECHILD) break;
  }
  kill(-1, SIGKILL);
  /* Let the relay hand the harness's last words (its final replies) to the host. */
  for (int i = 0; i < 300 && !relay.done; i++) {
    struct timespec ts = {0, 10 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
  end_vm();
  return 0;
}
