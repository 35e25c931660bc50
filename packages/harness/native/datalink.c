/*
 * The data channel's packet link, guest side (protocol/data-frames.ts, LINK_*): the network
 * device the backend named with aegis_datalink=MAC is renamed "aegisdl", kept out of IP (no
 * address, no IPv6, no ARP), and an AF_PACKET socket of our ethertype receives the host's
 * frames on it. The data plane (dataplane.c) reads it once the host has switched to it.
 */
#define _GNU_SOURCE
#include "dataplane.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <dirent.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

/* The interface whose address is `mac` (lower-case, colon-separated), into `name`. */
static int find_by_mac(const char *mac, char *name, size_t len) {
  DIR *d = opendir("/sys/class/net");
  if (!d) return -1;
  struct dirent *e;
  int found = -1;
  while (found != 0 && (e = readdir(d))) {
    if (e->d_name[0] == '.') continue;
    char path[300], addr[64] = "";
    snprintf(path, sizeof path, "/sys/class/net/%s/address", e->d_name);
    FILE *f = fopen(path, "r");
    if (!f) continue;
    if (fgets(addr, sizeof addr, f)) addr[strcspn(addr, "\n")] = '\0';
    fclose(f);
    if (strcasecmp(addr, mac) == 0 && strlen(e->d_name) < len) {
      strcpy(name, e->d_name);
      found = 0;
    }
  }
  closedir(d);
  return found;
}

int datalink_open(const char *mac) {
  char name[IFNAMSIZ];
  if (find_by_mac(mac, name, sizeof name) != 0) {
    errno = ENODEV;
    return -1;
  }
  int ctl = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (ctl < 0) return -1;
  struct ifreq ifr;
  memset(&ifr, 0, sizeof ifr);
  /* Renamed while down (as probed): it must not take eth0, which the guest's network uses. */
  strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
  strncpy(ifr.ifr_newname, DATALINK_IFNAME, IFNAMSIZ - 1);
  if (ioctl(ctl, SIOCSIFNAME, &ifr) != 0) {
    int saved = errno;
    close(ctl);
    errno = saved;
    return -1;
  }
  int v6 = open("/proc/sys/net/ipv6/conf/" DATALINK_IFNAME "/disable_ipv6", O_WRONLY | O_CLOEXEC);
  if (v6 >= 0) {
    (void)!write(v6, "1", 1); /* no router solicitations or DAD on a link that is not IP */
    close(v6);
  }
  memset(&ifr, 0, sizeof ifr);
  strncpy(ifr.ifr_name, DATALINK_IFNAME, IFNAMSIZ - 1);
  int r = ioctl(ctl, SIOCGIFINDEX, &ifr);
  int index = ifr.ifr_ifindex;
  if (r == 0) {
    ifr.ifr_flags = IFF_UP | IFF_NOARP;
    r = ioctl(ctl, SIOCSIFFLAGS, &ifr);
  }
  close(ctl);
  if (r != 0) return -1;
  int fd = socket(AF_PACKET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, htons(DATALINK_ETHERTYPE));
  if (fd < 0) return -1;
  /* Well above the host's credit window: packets are only dropped when this is full. FORCE
   * passes net.core.rmem_max (we are root); the kernel doubles what it is given. */
  int half = DATALINK_RCVBUF_BYTES / 2;
  if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &half, sizeof half) != 0) setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &half, sizeof half);
  struct sockaddr_ll sll = {.sll_family = AF_PACKET, .sll_protocol = htons(DATALINK_ETHERTYPE), .sll_ifindex = index};
  if (bind(fd, (struct sockaddr *)&sll, sizeof sll) != 0) {
    int saved = errno;
    close(fd);
    errno = saved;
    return -1;
  }
  return fd;
}
