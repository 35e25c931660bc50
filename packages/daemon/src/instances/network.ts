/**
 * An instance's network mode as the backend sees it. `user`, the default, is the egress policy:
 * the VM gets no network card from the backend at all; aegis-init's rules send each of the
 * guest's TCP connections and DNS queries over the data channel, and aegisd decides and
 * carries them (egress/egress.ts). `unfiltered` is the backend's own user-mode network (passt),
 * with no policy. `none`: nothing but lo (the kernel's dummy device is not even made).
 */
import type { NetworkMode } from '@aegis/protocol/api';
import { guestNetKernelArg, type NetworkMode as VmNetwork } from '@aegis/vmm';

export function vmNetwork(mode: NetworkMode): { network: VmNetwork; kernelArgs: string[]; dataLink: boolean } {
  // The egress policy's downloads come over the data channel: it gets its packet link (where
  // the backend has one), bulk bytes to the guest at a packet, not 4 KiB, per interrupt.
  if (mode === 'user') return { network: 'none', kernelArgs: [guestNetKernelArg(), 'aegis_egress=1'], dataLink: true };
  return { network: mode === 'unfiltered' ? 'user' : 'none', kernelArgs: ['dummy.numdummies=0'], dataLink: false };
}

/** The modes an instance can have on a backend with these (its own user-mode network or not). */
export function networkModes(backendModes: readonly VmNetwork[]): NetworkMode[] {
  return backendModes.includes('user') ? ['user', 'none', 'unfiltered'] : ['user', 'none'];
}
