/*
 * The guest's half of the egress policy (aegis_egress=1; docs/design.md, "Egress"). The guest
 * has no network card: its eth0 is the kernel's dummy device, holding the address and the
 * default route that programs expect. An nftables rule sends every outgoing TCP connection to
 * EGRESS_PORT on loopback and every DNS query to 127.0.0.1:53, where the data plane
 * (dataplane.c) picks them up and asks the host to carry them. Anything else leaving the
 * guest is rejected at once, so it fails fast instead of vanishing into the dummy device.
 *
 * Nothing here is a security boundary: the guest is root and may undo all of it. It only
 * makes ordinary programs work unchanged. The host decides every connection and every name.
 */
#define _GNU_SOURCE
#include "dataplane.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#define NFT "/usr/sbin/nft"

/* The guest's own address (aegis_net=) is local, as is loopback: neither is redirected. */
static const char RULES_FMT[] =
    "table ip aegis {\n"
    "  chain nat_out {\n"
    "    type nat hook output priority -100; policy accept;\n"
    "    ip daddr 127.0.0.0/8 return\n"
    "    ip daddr %s return\n"
    "    meta l4proto tcp redirect to :%d\n"
    "    udp dport 53 redirect to :53\n"
    "  }\n"
    "  chain filter_out {\n"
    "    type filter hook output priority 0; policy accept;\n"
    "    ip daddr 127.0.0.0/8 accept\n"
    "    ip daddr %s accept\n"
    "    reject with icmp type admin-prohibited\n"
    "  }\n"
    "}\n";

int egress_rename_dummy(void) {
  int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  struct ifreq ifr;
  memset(&ifr, 0, sizeof ifr);
  strncpy(ifr.ifr_name, "dummy0", IFNAMSIZ - 1);
  strncpy(ifr.ifr_newname, "eth0", IFNAMSIZ - 1);
  int r = ioctl(fd, SIOCSIFNAME, &ifr);
  int saved = errno;
  close(fd);
  errno = saved;
  return r;
}

int egress_rules(const char *guest_addr) {
  char rules[2048];
  int n = snprintf(rules, sizeof rules, RULES_FMT, guest_addr, EGRESS_PORT, guest_addr);
  if (n < 0 || (size_t)n >= sizeof rules) return -1;
  int in[2];
  if (pipe2(in, O_CLOEXEC) != 0) return -1;
  pid_t pid = fork();
  if (pid < 0) {
    close(in[0]);
    close(in[1]);
    return -1;
  }
  if (pid == 0) {
    dup2(in[0], 0);
    char *const argv[] = {"nft", "-f", "-", NULL};
    char *const envp[] = {NULL};
    execve(NFT, argv, envp);
    _exit(127);
  }
  close(in[0]);
  ssize_t w = write(in[1], rules, (size_t)n);
  close(in[1]);
  int status;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (w != n || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    errno = EPROTO;
    return -1;
  }
  return 0;
}

int egress_listen(int *tcp_fd, int *dns_fd) {
  *tcp_fd = *dns_fd = -1;
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  int one = 1;
  int t = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (t < 0) return -1;
  setsockopt(t, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  a.sin_port = htons(EGRESS_PORT);
  if (bind(t, (struct sockaddr *)&a, sizeof a) != 0 || listen(t, 512) != 0) {
    close(t);
    return -1;
  }
  int d = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (d < 0) {
    close(t);
    return -1;
  }
  a.sin_port = htons(53);
  if (bind(d, (struct sockaddr *)&a, sizeof a) != 0) {
    close(t);
    close(d);
    return -1;
  }
  *tcp_fd = t;
  *dns_fd = d;
  return 0;
}
