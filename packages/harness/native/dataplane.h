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

/* arg: a struct dp_port. Never returns while the VM runs. */
void *dataplane_main(void *arg);
