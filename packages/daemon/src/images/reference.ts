import { AegisError } from '@aegis/protocol';

/**
 * An image reference after Docker's normalisation: `alpine` and `docker.io/library/alpine:latest`
 * are the same value. `tag` is absent only when the user pinned a digest without one.
 */
export interface ImageReference {
  registry: string;
  repository: string;
  tag?: string;
  digest?: string;
}

export const DEFAULT_REGISTRY = 'docker.io';
const DEFAULT_TAG = 'latest';

// The grammar of github.com/distribution/reference, one piece at a time so a failure can say which
// piece is wrong instead of "invalid reference format".
const PATH_COMPONENT = /^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$/;
const DOMAIN_LABEL = '(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])';
const DOMAIN = new RegExp(`^(?:${DOMAIN_LABEL}(?:\\.${DOMAIN_LABEL})*|\\[[0-9a-fA-F:.]+\\])(?::[0-9]{1,5})?$`);
const TAG = /^[\w][\w.-]{0,127}$/;
const SHA256_DIGEST = /^sha256:[0-9a-f]{64}$/;
const ANY_DIGEST = /^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$/;
const MAX_NAME_LENGTH = 255;

/**
 * Checks a content digest. We hash with SHA-256 only, so a well-formed digest of another algorithm
 * is UNSUPPORTED rather than invalid: the image may be fine, we just cannot verify it.
 */
export function validateDigest(digest: string, what = 'digest'): string {
  if (SHA256_DIGEST.test(digest)) return digest;
  if (ANY_DIGEST.test(digest) && !digest.startsWith('sha256:')) {
    throw new AegisError(
      'UNSUPPORTED',
      `${what} ${JSON.stringify(digest)} uses an unsupported algorithm; only sha256 digests are supported`,
    );
  }
  throw new AegisError(
    'INVALID_ARGUMENT',
    `${what} ${JSON.stringify(digest)} is malformed; expected sha256: followed by 64 lowercase hex digits`,
  );
}

export function parseReference(input: string): ImageReference {
  const s = input.trim();
  if (s === '') throw new AegisError('INVALID_ARGUMENT', 'image reference is empty');
  const bad = (why: string): AegisError => new AegisError('INVALID_ARGUMENT', `invalid image reference ${JSON.stringify(input)}: ${why}`);

  let rest = s;
  let digest: string | undefined;
  const at = rest.indexOf('@');
  if (at !== -1) {
    digest = rest.slice(at + 1);
    rest = rest.slice(0, at);
    try {
      validateDigest(digest);
    } catch (err) {
      if (err instanceof AegisError && err.code === 'UNSUPPORTED') throw err;
      throw bad('the digest after "@" must be sha256: followed by 64 lowercase hex digits');
    }
  }

  // A colon after the last slash starts the tag; one before it belongs to a registry port.
  let tag: string | undefined;
  const colon = rest.lastIndexOf(':');
  if (colon > rest.lastIndexOf('/')) {
    tag = rest.slice(colon + 1);
    rest = rest.slice(0, colon);
    if (!TAG.test(tag))
      throw bad(
        `tag ${JSON.stringify(tag)} may contain only letters, digits, "_", "." and "-" (at most 128, not starting with "." or "-")`,
      );
  }
  if (rest === '') throw bad('the repository name is missing');

  // Docker's rule: the first component names a registry only if it looks like a host.
  let registry = DEFAULT_REGISTRY;
  let path = rest;
  const slash = rest.indexOf('/');
  if (slash !== -1) {
    const first = rest.slice(0, slash);
    if (first.includes('.') || first.includes(':') || first === 'localhost' || first !== first.toLowerCase()) {
      registry = first;
      path = rest.slice(slash + 1);
      if (!DOMAIN.test(registry)) throw bad(`${JSON.stringify(registry)} is not a valid registry host`);
    }
  }
  if (registry === 'index.docker.io') registry = DEFAULT_REGISTRY;

  if (path === '') throw bad('the repository name is missing');
  for (const component of path.split('/')) {
    if (component === '') throw bad('the repository name has an empty path component');
    if (PATH_COMPONENT.test(component)) continue;
    if (PATH_COMPONENT.test(component.toLowerCase())) throw bad('repository names must be lowercase');
    throw bad(
      `path component ${JSON.stringify(component)} may contain only lowercase letters, digits and single separators (".", "_", "__", "-")`,
    );
  }
  if (registry === DEFAULT_REGISTRY && !path.includes('/')) path = `library/${path}`;
  if (registry.length + 1 + path.length > MAX_NAME_LENGTH) throw bad(`the name is longer than ${MAX_NAME_LENGTH} characters`);

  if (tag === undefined && digest === undefined) tag = DEFAULT_TAG;
  const ref: ImageReference = { registry, repository: path };
  if (tag !== undefined) ref.tag = tag;
  if (digest !== undefined) ref.digest = digest;
  return ref;
}

/** The canonical spelling: always fully qualified, so two spellings of one image compare equal. */
export function formatReference(ref: ImageReference): string {
  let s = `${ref.registry}/${ref.repository}`;
  if (ref.tag !== undefined) s += `:${ref.tag}`;
  if (ref.digest !== undefined) s += `@${ref.digest}`;
  return s;
}

/** The host:port to open connections to; Docker Hub's name for humans is not where its API lives. */
export function registryHost(ref: Pick<ImageReference, 'registry'>): string {
  return ref.registry === DEFAULT_REGISTRY ? 'registry-1.docker.io' : ref.registry;
}
