import path from 'node:path';
import { InvalidArgumentError } from 'commander';
import type { VolumeMount } from '@aegis/client';

/** Docker's rule for a local volume name (the daemon checks it too; here the error names the flag). */
const VOLUME_NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;

/**
 * Docker's `-v`: `HOST:GUEST[:ro|rw]` for a host directory (absolute, or relative when it
 * starts with `.`, resolved here against our working directory, as Docker allows), and
 * `NAME:GUEST[:ro|rw]` for a named volume (created when missing, by the daemon).
 */
export function parseVolume(v: string, previous: VolumeMount[] = []): VolumeMount[] {
  const parts = v.split(':');
  if (parts.length < 2) {
    throw new InvalidArgumentError(`"${v}": give HOST:GUEST or NAME:GUEST (anonymous volumes are not supported)`);
  }
  if (parts.length > 3) throw new InvalidArgumentError(`"${v}": expected SOURCE:GUEST[:ro|rw] (paths with ':' cannot be given to -v)`);
  const [source = '', target = '', mode = 'rw'] = parts;
  let readOnly: boolean;
  const modes = mode.split(',');
  if (modes.length === 1 && (mode === 'ro' || mode === 'rw')) readOnly = mode === 'ro';
  else throw new InvalidArgumentError(`"${v}": the mode must be ro or rw, not "${mode}"`);
  if (!target.startsWith('/')) throw new InvalidArgumentError(`"${v}": the guest path must be absolute`);
  if (source.startsWith('/') || source === '.' || source.startsWith('./') || source === '..' || source.startsWith('../')) {
    return [...previous, { type: 'bind', source: path.resolve(source), target, readOnly }];
  }
  if (!VOLUME_NAME.test(source)) {
    throw new InvalidArgumentError(
      `"${source}" is not a volume name (letters, digits, _ . -, at most 64); a host directory must be an absolute path or start with ./`,
    );
  }
  return [...previous, { type: 'volume', source, target, readOnly }];
}

/** `/home/me/src:/src:ro, cache:/root/.cache` (Docker's own spelling of the same mounts). */
export function formatVolumes(volumes: readonly VolumeMount[]): string {
  return volumes.map((m) => `${m.source}:${m.target}${m.readOnly ? ':ro' : ''}`).join(', ');
}
