/**
 * The certificates of the egress broker (broker.ts): one CA per instance, its key derived from
 * a seed (so a restarted aegisd signs with the same key and nothing is stored), and the leaves
 * it issues for the names it terminates TLS for. ECDSA P-256 throughout (WebCrypto through
 * @peculiar/x509, which builds the certificates).
 */
// @peculiar/x509 wires its parts with tsyringe, which needs the Reflect metadata polyfill
// loaded before it.
import 'reflect-metadata';
import crypto, { webcrypto } from 'node:crypto';
import * as x509 from '@peculiar/x509';
import { AegisError } from '@aegis/protocol';

x509.cryptoProvider.set(webcrypto as unknown as Parameters<typeof x509.cryptoProvider.set>[0]);

/** An instance's CA, as PEM: what signs its leaves, and what its guest trusts. */
export interface InstanceCa {
  keyPem: string;
  certPem: string;
}

/** The CA loaded for signing. */
export interface LoadedCa {
  signingKey: webcrypto.CryptoKey;
  cert: x509.X509Certificate;
}

const DAY_MS = 24 * 3600_000;
const EC_P256 = { name: 'ECDSA', namedCurve: 'P-256' } as const;
const SIGNING = { name: 'ECDSA', hash: 'SHA-256' } as const;
/** The order n of P-256's base point: a private key is an integer in [1, n-1]. */
const P256_ORDER = BigInt('0xffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551');

/** The P-256 key pair (as a JWK) that `seed` determines: HKDF-SHA256, retried with a counter while out of range. */
function deriveP256(seed: Buffer): { kty: 'EC'; crv: 'P-256'; d: string; x: string; y: string } {
  for (let counter = 0; ; counter++) {
    const d = Buffer.from(crypto.hkdfSync('sha256', seed, 'aegis egress CA', `P-256 private key ${counter}`, 32));
    const k = BigInt(`0x${d.toString('hex')}`);
    if (k === 0n || k >= P256_ORDER) continue; // about 2^-32 likely: the next counter is as good
    const ecdh = crypto.createECDH('prime256v1');
    ecdh.setPrivateKey(d);
    const point = ecdh.getPublicKey(); // uncompressed: 0x04 || x || y
    return {
      kty: 'EC',
      crv: 'P-256',
      d: d.toString('base64url'),
      x: point.subarray(1, 33).toString('base64url'),
      y: point.subarray(33, 65).toString('base64url'),
    };
  }
}

function randomSerial(): string {
  const b = crypto.randomBytes(16);
  b[0] = (b[0] as number) & 0x7f; // a positive INTEGER in DER
  return b.toString('hex');
}

/**
 * The CA of one instance: an ECDSA P-256 key derived from `seed` (32 bytes or more, e.g. HKDF
 * of the daemon's secret key and the instance id) and a self-signed certificate for it. The
 * certificate is made anew each call (its serial and dates differ) but its name and key do not,
 * so a leaf signed after a daemon restart verifies against the certificate the guest installed.
 */
export async function instanceCa(seed: Buffer, label: string): Promise<InstanceCa> {
  if (!Buffer.isBuffer(seed) || seed.length < 32)
    throw new AegisError('INVALID_ARGUMENT', 'an instance CA needs a seed of at least 32 bytes (derive it from the daemon key)');
  const jwk = deriveP256(seed);
  const privateKey = await webcrypto.subtle.importKey('jwk', jwk, EC_P256, true, ['sign']);
  const publicKey = await webcrypto.subtle.importKey('jwk', { kty: 'EC', crv: 'P-256', x: jwk.x, y: jwk.y }, EC_P256, true, ['verify']);
  const now = Date.now();
  const cert = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: randomSerial(),
    // A CN is at most 64 characters (RFC 5280 ub-common-name).
    name: [{ CN: [`Aegis egress CA ${label}`.slice(0, 64)] }],
    keys: { privateKey, publicKey } as webcrypto.CryptoKeyPair,
    // A day early: a guest clock a little behind the host's still accepts it.
    notBefore: new Date(now - DAY_MS),
    notAfter: new Date(now + 3650 * DAY_MS),
    signingAlgorithm: SIGNING,
    extensions: [
      // pathLength 0: it signs leaves, never another CA.
      new x509.BasicConstraintsExtension(true, 0, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
      await x509.SubjectKeyIdentifierExtension.create(publicKey),
    ],
  });
  const keyPem = crypto.createPrivateKey({ key: jwk, format: 'jwk' }).export({ type: 'pkcs8', format: 'pem' }) as string;
  return { keyPem, certPem: cert.toString('pem') };
}

export async function loadCa(ca: InstanceCa): Promise<LoadedCa> {
  try {
    const der = crypto.createPrivateKey(ca.keyPem).export({ type: 'pkcs8', format: 'der' });
    const signingKey = await webcrypto.subtle.importKey('pkcs8', der, EC_P256, false, ['sign']);
    return { signingKey, cert: new x509.X509Certificate(ca.certPem) };
  } catch (err) {
    throw new AegisError('INVALID_ARGUMENT', `the instance CA is not a P-256 key and certificate in PEM (${(err as Error).message})`);
  }
}

/** A key pair for leaves (one per broker: a certificate per name is cheap, a key pair less so). */
export async function leafKeyPair(): Promise<webcrypto.CryptoKeyPair> {
  return (await webcrypto.subtle.generateKey(EC_P256, true, ['sign', 'verify'])) as webcrypto.CryptoKeyPair;
}

/** A leaf for `name`, signed by `ca`, valid from a day back to `validityMs` ahead; PEM. */
export async function issueLeaf(
  ca: LoadedCa,
  publicKey: webcrypto.CryptoKey,
  name: string,
  now: number,
  validityMs: number,
): Promise<string> {
  const cert = await x509.X509CertificateGenerator.create({
    serialNumber: randomSerial(),
    subject: [{ CN: [name.slice(0, 64)] }],
    // The CA's own encoded name, so that chain building matches it byte for byte.
    issuer: ca.cert.subjectName,
    notBefore: new Date(now - DAY_MS),
    notAfter: new Date(now + validityMs),
    publicKey,
    signingKey: ca.signingKey,
    signingAlgorithm: SIGNING,
    extensions: [
      new x509.BasicConstraintsExtension(false, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
      new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.serverAuth]),
      new x509.SubjectAlternativeNameExtension([{ type: 'dns', value: name }]),
      await x509.AuthorityKeyIdentifierExtension.create(ca.cert.publicKey),
    ],
  });
  // The leaf alone: the guest has the CA certificate installed, and sending one made after a
  // restart (same key, other serial) could only confuse chain building.
  return cert.toString('pem');
}
