/**
 * The harness end of the agent channel: a unix socket (fd 3) that aegis-init relays to the
 * VM's virtio-serial port (or vsock). Because it is a socket, libuv polls it like any other
 * and the process can exit at any time; the device's quirks stay in aegis-init.
 */
import net from 'node:net';

export class Channel {
  private constructor(private readonly socket: net.Socket) {}

  static open(fd: number): Channel {
    const socket = new net.Socket({ fd, readable: true, writable: true });
    socket.setNoDelay?.(true);
    return new Channel(socket);
  }

  onData(handler: (chunk: Buffer) => void): void {
    this.socket.on('data', handler);
  }

  onClose(handler: () => void): void {
    this.socket.on('close', handler);
  }

  /**
   * Queues a line; false once more than `highWaterBytes` wait to reach aegis-init (the host is
   * reading slowly): the caller should stop producing until `onDrain`.
   */
  write(line: string): boolean {
    this.socket.write(line);
    return this.socket.writableLength < Channel.highWaterBytes;
  }

  /** What may wait in the harness for the channel before producers are paused. */
  static readonly highWaterBytes = 1 << 20;

  /** Called each time the queued bytes are handed to aegis-init. */
  onDrain(handler: () => void): void {
    this.socket.on('drain', handler);
  }

  /** Resolves once everything written so far has been handed to aegis-init. */
  drain(): Promise<void> {
    return new Promise((resolve) => {
      if (this.socket.writableLength === 0) return resolve();
      this.socket.write('', () => resolve());
    });
  }
}
