/**
 * Types of the daemon API, derived from spec/openapi.json (the contract) through
 * generated/openapi.ts, which `npm run generate -w @aegis/client` writes with
 * openapi-typescript and `npm run check` verifies is current. Nothing here is copied by hand:
 * a change to the API shows up here, or fails to compile where it is used.
 */
import type { components } from './generated/openapi.js';

type Schemas = components['schemas'];

export type InstanceState = Schemas['InstanceState'];
export type Instance = Schemas['Instance'];
export type Image = Schemas['Image'];
export type PullEvent = Schemas['PullEvent'];
/** `user`: outbound network, host loopback unreachable. `none`: no network device. */
export type NetworkMode = NonNullable<Schemas['CreateInstanceRequest']['network']>;
export type PortMapping = Schemas['PortMapping'];
export type CreateInstanceRequest = Schemas['CreateInstanceRequest'];
export type ExecRequest = Schemas['ExecRequest'];
export type Status = Schemas['Status'];
export type Stream = 'stdout' | 'stderr';
export type ExecEvent = Schemas['ExecEvent'];
export type LogEvent = Schemas['LogEvent'];
export type RunEvent = Schemas['RunEvent'];
export type WaitResult = Schemas['WaitResult'];
export type InstanceStats = Schemas['InstanceStats'];
export type ProcessInfo = Schemas['ProcessInfo'];
/** What is at a guest path (files API). */
export type FileStat = Schemas['FileStat'];
export type SecretMeta = Schemas['Secret'];
/** A host directory (`bind`) or a named volume (`volume`) of an instance (docker -v). */
export type VolumeMount = Schemas['VolumeMount'];
/** A named volume: an ext4 file system in a file of the daemon's, attached to VMs as a disk. */
export type Volume = Schemas['Volume'];
