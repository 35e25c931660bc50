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
};

/* Gives a file-service socket a send buffer of FILES_SNDBUF_BYTES, as the kernel counts it
 * (overhead included); anything but a socket is left alone. A unix stream socket queues no
 * more than its sender's buffer, 208 KiB by default, so the sender (sendfile, tar, the data
 * plane) and its reader took turns at every ~200 KiB, and under emulation each turn costs
 * more than the bytes. Measured (BENCH_ONLY=cp, 256 MiB, TCG): `aegis cp` out 2.36 s -> 2.12 s. */
#define FILES_SNDBUF_BYTES (4 * 1024 * 1024)
void widen_send_buffer(int fd);

/* arg: a struct dp_port. Never returns while the VM runs. */
void *dataplane_main(void *arg);
