/**
 * Types of the daemon's HTTP API, derived from spec/openapi.json (the contract) through
 * generated/openapi.ts, which `npm run generate -w @aegis/protocol` writes with
 * openapi-typescript and `npm run lint` verifies is current. The daemon answers with these
 * types and the client reads them: a change to the spec shows up on both sides at once, or
 * fails to compile where it is used. Imported as `@aegis/protocol/api` (its names, such as
 * `ProcessInfo`, are the API's, not the guest contract's).
 */
import type { components, operations } from './generated/openapi.js';

/** Every schema of the OpenAPI document, by its component name. */
export type ApiSchemas = components['schemas'];
export type ApiSchemaName = keyof ApiSchemas;
export type ApiOperations = operations;

export type InstanceState = ApiSchemas['InstanceState'];
export type Instance = ApiSchemas['Instance'];
export type Image = ApiSchemas['Image'];
export type PullEvent = ApiSchemas['PullEvent'];
/** `user`: outbound network, host loopback unreachable. `none`: no network device. */
export type NetworkMode = NonNullable<ApiSchemas['CreateInstanceRequest']['network']>;
export type PortMapping = ApiSchemas['PortMapping'];
export type EgressPolicy = ApiSchemas['EgressPolicy'];
export type EgressView = ApiSchemas['EgressView'];
export type CreateInstanceRequest = ApiSchemas['CreateInstanceRequest'];
export type ExecRequest = ApiSchemas['ExecRequest'];
export type Status = ApiSchemas['Status'];
export type Stream = 'stdout' | 'stderr';
export type ExecEvent = ApiSchemas['ExecEvent'];
export type LogEvent = ApiSchemas['LogEvent'];
export type LifecycleEvent = ApiSchemas['LifecycleEvent'];
export type RunEvent = ApiSchemas['RunEvent'];
export type WaitResult = ApiSchemas['WaitResult'];
export type InstanceStats = ApiSchemas['InstanceStats'];
export type ProcessInfo = ApiSchemas['ProcessInfo'];
export type TopResult = ApiSchemas['TopResult'];
/** What is at a guest path (files API). */
export type FileStat = ApiSchemas['FileStat'];
export type SecretMeta = ApiSchemas['Secret'];
/** A host directory (`bind`) or a named volume (`volume`) of an instance (docker -v). */
export type VolumeMount = ApiSchemas['VolumeMount'];
/** A named volume: an ext4 file system in a file of the daemon's, attached to VMs as a disk. */
export type Volume = ApiSchemas['Volume'];
export type SnapshotView = ApiSchemas['Snapshot'];
export type ForkResult = ApiSchemas['ForkResult'];
export type ForkRequest = ApiSchemas['ForkRequest'];
