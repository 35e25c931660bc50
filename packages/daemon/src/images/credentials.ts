/**
 * Who we are to a registry when a pull names no credentials: what `docker login` left in the user's
 * Docker config, so an image the user can pull with Docker pulls here without more setup.
 */
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { AegisError } from '@aegis/protocol';
import { isObject } from './manifest.js';
import { DEFAULT_REGISTRY } from './reference.js';

export interface Credentials {
  username: string;
  password: string;
}

const DOCKER_HUB_ALIASES = new Set([DEFAULT_REGISTRY, 'index.docker.io', 'registry-1.docker.io']);

/** Looks up `auths[registry].auth` in a Docker config. Credential helpers are not consulted. */
export async function loadDockerCredentials(registry: string, configPath?: string): Promise<Credentials | undefined> {
  const file = configPath ?? path.join(process.env['DOCKER_CONFIG'] ?? path.join(os.homedir(), '.docker'), 'config.json');
  let text: string;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch {
    return undefined;
  }
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch {
    throw new AegisError('FAILED_PRECONDITION', `the Docker config ${file} is not valid JSON; fix or remove it`);
  }
  const auths = isObject(doc) ? doc['auths'] : undefined;
  if (!isObject(auths)) return undefined;
  const hub = DOCKER_HUB_ALIASES.has(registry);
  for (const [key, entry] of Object.entries(auths)) {
    const name = key.replace(/^[a-z]+:\/\//, '').replace(/\/.*$/, '');
    if (!(name === registry || (hub && DOCKER_HUB_ALIASES.has(name)))) continue;
    if (!isObject(entry)) continue;
    const auth = entry['auth'];
    if (typeof auth === 'string' && auth !== '') {
      const decoded = Buffer.from(auth, 'base64').toString('utf8');
      const colon = decoded.indexOf(':');
      if (colon > 0) return { username: decoded.slice(0, colon), password: decoded.slice(colon + 1) };
    }
    const username = entry['username'];
    const password = entry['password'];
    if (typeof username === 'string' && typeof password === 'string' && username !== '') return { username, password };
  }
  return undefined;
}
