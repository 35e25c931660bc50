/* The --expose data plane (dataplane.c), run by aegis-init on a thread of its own. */
#pragma once

#define DATA_PORT_NAME "aegis.data"
#define DATA_VSOCK_PORT 1025
/* OPEN to port 0 connects here: the harness's file service (files.ts). */
#define FILES_SOCKET "/run/aegis-files.sock"

/* The data channel: a virtio-serial port (fd), or a vsock listener whose accepted connection
 * is the channel (listen_fd; fd is -1 until the host connects). Both non-blocking. */
struct dp_port {
  int fd;
  int listen_fd;
  /* With aegis_egress=1 (egress.c): the listener every outgoing TCP connection is redirected
   * to, and the UDP socket DNS queries are; -1 otherwise. */
  int egress_fd;
  int dns_fd;
  /* The packet link's AF_PACKET socket (datalink.c), or -1: host->guest frames as packets. */
  int link_fd;
};

/* The packet link (protocol/data-frames.ts, LINK_*). */
#define DATALINK_IFNAME "aegisdl"
#define DATALINK_ETHERTYPE 0x88b5
#define DATALINK_MTU 65520
/* The host sends at most this much unacknowledged by our credits (LINK_WINDOW_BYTES)... */
#define DATALINK_WINDOW (4 * 1024 * 1024)
/* ...well within what the socket may queue (the kernel counts each packet's whole buffers). */
#define DATALINK_RCVBUF_BYTES (16 * 1024 * 1024)
/* datalink.c: the device named by aegis_datalink=MAC, renamed and up, and our socket on it. */
int datalink_open(const char *mac);

/* Where nftables redirects the guest's outgoing TCP (127.0.0.1; a privileged port no program
 * of the guest's is likely to want). */
#define EGRESS_PORT 1
/* egress.c: dummy0 becomes eth0 (aegis_net= then configures it as a real card would be). */
int egress_rename_dummy(void);
/* egress.c: loads the redirect and reject rules (nft, from our rootfs). */
int egress_rules(const char *guest_addr);
/* egress.c: opens the TCP listener and the DNS socket the rules redirect to. */
int egress_listen(int *tcp_fd, int *dns_fd);

/* Gives a file-service socket a send buffer of FILES_SNDBUF_BYTES, as the kernel counts it
 * (overhead included); anything but a socket is left alone. A unix stream socket queues no
 * more than its sender's buffer, 208 KiB by default, so the sender (sendfile, tar, the data
 * plane) and its reader took turns at every ~200 KiB, and under emulation each turn costs
 * more than the bytes. Measured (BENCH_ONLY=cp, 256 MiB, TCG): `aegis cp` out 2.36 s -> 2.12 s. */
#define FILES_SNDBUF_BYTES (4 * 1024 * 1024)
void widen_send_buffer(int fd);

/* arg: a struct dp_port. Never returns while the VM runs. */
void *dataplane_main(void *arg);
