/* The --expose data plane (dataplane.c), run by aegis-init on a thread of its own. */
#pragma once

#define DATA_PORT_NAME "aegis.data"

/* arg: pointer to the non-blocking fd of the data port. Never returns while the VM runs. */
void *dataplane_main(void *arg);
