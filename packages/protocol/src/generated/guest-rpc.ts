/**
 * This file was generated from spec/guest-rpc.schema.json by scripts/guest-rpc.mjs
 * (`npm run generate -w @aegis/protocol`). Do not make direct changes to the file.
 */

/** The schema itself: the parsers in guest.ts are driven by it. */
export const guestRpcSchema = {
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "$id": "https://aegis.dev/spec/guest-rpc.schema.json",
  "title": "Aegis guest RPC",
  "description": "Every method and notification on the agent channel between aegisd and aegis-harness: newline-delimited JSON-RPC 2.0, the host calls, the guest answers and notifies. The types (packages/protocol/src/generated/guest-rpc.ts), the parsers both ends use (packages/protocol/src/guest.ts) and the reference in spec/guest-rpc.md come from this file. Each params, result and event schema is closed (unknown fields refused); what the guest sends is bounded (every string has a maxLength or a pattern, every array a maxItems). `x-message` is the error for a failed pattern, range or array size.",
  "version": 1,
  "$defs": {
    "Stream": {
      "enum": [
        "stdout",
        "stderr"
      ]
    },
    "Pid": {
      "description": "On Linux pid_max is at most 2^22.",
      "type": "integer",
      "minimum": 1,
      "maximum": 4194304
    },
    "ExecId": {
      "description": "Chosen by the host; names the exec in `output` and `execExit`.",
      "type": "string",
      "maxLength": 128
    },
    "TtySize": {
      "type": "object",
      "properties": {
        "rows": {
          "type": "integer",
          "minimum": 1,
          "maximum": 1000,
          "x-message": "tty size must be 1..1000 rows and columns"
        },
        "cols": {
          "type": "integer",
          "minimum": 1,
          "maximum": 1000,
          "x-message": "tty size must be 1..1000 rows and columns"
        }
      },
      "required": [
        "rows",
        "cols"
      ]
    },
    "ImageContext": {
      "description": "How a process runs in the image: as its config's `User` (`name`, `uid`, `uid:gid`, `name:group`).",
      "type": "object",
      "properties": {
        "user": {
          "type": "string",
          "maxLength": 256
        }
      },
      "additionalProperties": false
    },
    "ProcessParams": {
      "description": "What `run` (the workload) and `exec` share: the process to start and how.",
      "type": "object",
      "properties": {
        "command": {
          "description": "argv; argv[0] is looked up on PATH.",
          "type": "array",
          "minItems": 1,
          "items": {
            "type": "string",
            "maxLength": 1048576
          },
          "x-message": "{path} must be a non-empty array of strings"
        },
        "env": {
          "type": "object",
          "additionalProperties": {
            "type": "string",
            "maxLength": 1048576
          },
          "default": {}
        },
        "workdir": {
          "description": "Created when missing, as Docker's `-w`.",
          "type": "string",
          "maxLength": 4096
        },
        "user": {
          "description": "Who the process runs as (`name`, `uid`, `name:group`, `uid:gid`), resolved in the root it runs in (the image's /etc/passwd, or ours). Default: the image's `User`, else root.",
          "type": "string",
          "maxLength": 256
        },
        "stdin": {
          "description": "Give the process a stdin pipe fed by `stdin` requests (otherwise /dev/null).",
          "type": "boolean"
        },
        "tty": {
          "description": "Run on a new pseudo-terminal of this size; output then arrives as one stream, `stdout`.",
          "allOf": [
            {
              "$ref": "#/$defs/TtySize"
            }
          ],
          "unevaluatedProperties": false
        },
        "image": {
          "description": "Run inside the instance's OCI image root (mounted by aegis-init), not the base root.",
          "$ref": "#/$defs/ImageContext"
        }
      },
      "required": [
        "command"
      ]
    },
    "ProcessInfo": {
      "description": "One guest process, as `docker top` shows it (from /proc).",
      "type": "object",
      "properties": {
        "pid": {
          "$ref": "#/$defs/Pid"
        },
        "ppid": {
          "type": "integer",
          "minimum": 0,
          "maximum": 4194304
        },
        "uid": {
          "type": "integer",
          "minimum": 0,
          "maximum": 4294967295
        },
        "state": {
          "description": "/proc/PID/stat's state letter (R, S, D, Z, T...).",
          "type": "string",
          "maxLength": 1,
          "pattern": "^[A-Za-z]$",
          "x-message": "{path} must be one letter"
        },
        "rssKiB": {
          "description": "Resident memory.",
          "type": "integer",
          "minimum": 0
        },
        "cpuMs": {
          "description": "User + system CPU time used so far.",
          "type": "integer",
          "minimum": 0
        },
        "startedAfterBootMs": {
          "description": "Since the VM booted.",
          "type": "integer",
          "minimum": 0
        },
        "command": {
          "description": "The command line, arguments joined by spaces (cut at 4096 characters).",
          "type": "string",
          "maxLength": 4096
        }
      },
      "required": [
        "pid",
        "ppid",
        "uid",
        "state",
        "rssKiB",
        "cpuMs",
        "startedAfterBootMs",
        "command"
      ],
      "additionalProperties": false
    },
    "ExitEvent": {
      "type": "object",
      "properties": {
        "exitCode": {
          "type": [
            "integer",
            "null"
          ],
          "minimum": 0,
          "maximum": 255
        },
        "signal": {
          "description": "A signal's name as Node reports it (SIGKILL, SIGRTMIN+3...).",
          "type": [
            "string",
            "null"
          ],
          "pattern": "^SIG[A-Z0-9+-]{1,29}$",
          "x-message": "{path} must be a signal name (SIG..., at most 32 characters) or null"
        },
        "bytes": {
          "description": "Output bytes the process wrote, per stream, as the harness counted them.",
          "type": "object",
          "properties": {
            "stdout": {
              "type": "integer",
              "minimum": 0
            },
            "stderr": {
              "type": "integer",
              "minimum": 0
            }
          },
          "required": [
            "stdout",
            "stderr"
          ],
          "additionalProperties": false
        },
        "truncated": {
          "description": "The pipes were closed before EOF (a background child held them open): output may be cut.",
          "type": "boolean"
        }
      },
      "required": [
        "exitCode",
        "signal"
      ]
    },
    "Empty": {
      "type": "object",
      "additionalProperties": false
    }
  },
  "methods": {
    "run": {
      "description": "Starts the workload.",
      "params": {
        "allOf": [
          {
            "$ref": "#/$defs/ProcessParams"
          }
        ],
        "unevaluatedProperties": false
      },
      "result": {
        "type": "object",
        "properties": {
          "pid": {
            "$ref": "#/$defs/Pid"
          },
          "startedAtMs": {
            "type": "integer",
            "minimum": 0
          }
        },
        "required": [
          "pid",
          "startedAtMs"
        ],
        "additionalProperties": false
      },
      "errors": [
        [
          "ALREADY_EXISTS",
          "one workload per VM"
        ],
        [
          "NOT_FOUND",
          "command"
        ],
        [
          "INVALID_ARGUMENT",
          "unknown user, workdir not a directory"
        ],
        [
          "FAILED_PRECONDITION",
          "a volume of the `aegis_volN=` words could not be mounted: `volume PATH: reason (not mounted)`"
        ]
      ]
    },
    "exec": {
      "description": "Starts a command beside the workload.",
      "params": {
        "allOf": [
          {
            "$ref": "#/$defs/ProcessParams"
          }
        ],
        "properties": {
          "execId": {
            "$ref": "#/$defs/ExecId"
          }
        },
        "required": [
          "execId"
        ],
        "unevaluatedProperties": false
      },
      "result": {
        "type": "object",
        "properties": {
          "pid": {
            "$ref": "#/$defs/Pid"
          }
        },
        "required": [
          "pid"
        ],
        "additionalProperties": false
      },
      "errors": [
        [
          "ALREADY_EXISTS",
          "execId"
        ],
        [
          "NOT_FOUND",
          ""
        ],
        [
          "FAILED_PRECONDITION",
          "shutting down"
        ]
      ]
    },
    "signal": {
      "description": "Sends a signal to the workload or an exec.",
      "params": {
        "type": "object",
        "properties": {
          "execId": {
            "description": "Omitted: the workload.",
            "type": "string",
            "maxLength": 4096
          },
          "signal": {
            "type": "string",
            "maxLength": 16
          },
          "group": {
            "description": "To the process's whole group (what it started too), not the process alone.",
            "type": "boolean"
          }
        },
        "required": [
          "signal"
        ],
        "additionalProperties": false
      },
      "result": {
        "$ref": "#/$defs/Empty"
      },
      "errors": [
        [
          "NOT_FOUND",
          ""
        ],
        [
          "INVALID_ARGUMENT",
          "unknown signal"
        ]
      ]
    },
    "stdin": {
      "description": "Feeds a process's stdin.",
      "params": {
        "type": "object",
        "properties": {
          "execId": {
            "description": "Omitted: the workload.",
            "type": "string",
            "maxLength": 4096
          },
          "data": {
            "description": "base64",
            "type": "string",
            "maxLength": 16777216
          },
          "eof": {
            "description": "Close the process's stdin after `data`.",
            "type": "boolean"
          }
        },
        "additionalProperties": false
      },
      "result": {
        "$ref": "#/$defs/Empty"
      },
      "errors": [
        [
          "NOT_FOUND",
          ""
        ],
        [
          "FAILED_PRECONDITION",
          "started without stdin"
        ]
      ]
    },
    "resize": {
      "description": "Resizes a process's terminal.",
      "params": {
        "allOf": [
          {
            "$ref": "#/$defs/TtySize"
          }
        ],
        "properties": {
          "execId": {
            "description": "Omitted: the workload.",
            "type": "string",
            "maxLength": 128
          }
        },
        "unevaluatedProperties": false
      },
      "result": {
        "$ref": "#/$defs/Empty"
      },
      "errors": [
        [
          "NOT_FOUND",
          ""
        ],
        [
          "FAILED_PRECONDITION",
          "no terminal"
        ]
      ]
    },
    "ps": {
      "description": "The guest's processes, from /proc, kernel threads left out.",
      "params": {
        "$ref": "#/$defs/Empty"
      },
      "result": {
        "type": "object",
        "properties": {
          "processes": {
            "type": "array",
            "maxItems": 4096,
            "items": {
              "$ref": "#/$defs/ProcessInfo"
            },
            "x-message": "{path} must be an array of at most 4096"
          },
          "truncated": {
            "description": "There were more than 4096: the list is cut.",
            "type": "boolean"
          }
        },
        "required": [
          "processes"
        ],
        "additionalProperties": false
      },
      "errors": []
    },
    "stats": {
      "description": "The guest's own view of its resources (`aegis stats`), from /proc/meminfo and /proc.",
      "params": {
        "$ref": "#/$defs/Empty"
      },
      "result": {
        "type": "object",
        "properties": {
          "memTotalKiB": {
            "type": "integer",
            "minimum": 0,
            "maximum": 1099511627776
          },
          "memAvailableKiB": {
            "description": "At most memTotalKiB.",
            "type": "integer",
            "minimum": 0
          },
          "processes": {
            "type": "integer",
            "minimum": 0,
            "maximum": 4194304
          }
        },
        "required": [
          "memTotalKiB",
          "memAvailableKiB",
          "processes"
        ],
        "additionalProperties": false
      },
      "errors": []
    },
    "fresh": {
      "description": "Makes a VM restored from a snapshot its own: clock set, hostname set, kernel RNG reseeded (with keepIdentity, a machine waking from hibernation: clock and RNG only).",
      "params": {
        "type": "object",
        "properties": {
          "timeMs": {
            "type": "integer"
          },
          "hostname": {
            "type": "string",
            "maxLength": 64,
            "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]*$",
            "x-message": "hostname has characters a hostname cannot"
          },
          "entropy": {
            "description": "base64, at least 32 bytes, from the host's CSPRNG",
            "type": "string",
            "maxLength": 1024
          },
          "keepIdentity": {
            "description": "The same machine waking from hibernation: the clock and the RNG only; its hostname and machine-id are kept",
            "type": "boolean"
          }
        },
        "required": [
          "timeMs",
          "hostname",
          "entropy"
        ],
        "additionalProperties": false
      },
      "result": {
        "$ref": "#/$defs/Empty"
      },
      "errors": [
        [
          "INTERNAL",
          ""
        ]
      ]
    },
    "trust": {
      "description": "Makes a CA certificate trusted in the guest's roots (ours and the image's) before the workload starts: written to /etc/aegis/egress-ca.pem, appended to the system bundles found (Debian's, RHEL's, Alpine's), and a full bundle written to /etc/aegis/ca-bundle.pem for SSL_CERT_FILE and its kin. The egress broker's per-instance CA (secrets brokered at egress).",
      "params": {
        "type": "object",
        "properties": {
          "caPem": {
            "description": "One PEM certificate.",
            "type": "string",
            "maxLength": 16384,
            "pattern": "^-----BEGIN CERTIFICATE-----\\n[A-Za-z0-9+/=\\n]+-----END CERTIFICATE-----\\n?$",
            "x-message": "caPem must be one PEM certificate"
          }
        },
        "required": [
          "caPem"
        ],
        "additionalProperties": false
      },
      "result": {
        "$ref": "#/$defs/Empty"
      },
      "errors": [
        [
          "INTERNAL",
          "a bundle could not be written"
        ]
      ]
    },
    "health": {
      "description": "Whether the harness answers, and its workload.",
      "params": {
        "$ref": "#/$defs/Empty"
      },
      "result": {
        "type": "object",
        "properties": {
          "version": {
            "type": "integer",
            "minimum": 0
          },
          "uptimeMs": {
            "type": "integer",
            "minimum": 0
          },
          "workload": {
            "type": [
              "object",
              "null"
            ],
            "properties": {
              "pid": {
                "$ref": "#/$defs/Pid"
              },
              "running": {
                "type": "boolean"
              }
            },
            "required": [
              "pid",
              "running"
            ],
            "additionalProperties": false
          }
        },
        "required": [
          "version",
          "uptimeMs",
          "workload"
        ],
        "additionalProperties": false
      },
      "errors": []
    },
    "shutdown": {
      "description": "Stops the workload, then the VM powers off.",
      "params": {
        "type": "object",
        "properties": {
          "timeoutMs": {
            "description": "How long the workload gets after SIGTERM before SIGKILL.",
            "type": "integer"
          }
        },
        "additionalProperties": false
      },
      "result": {
        "type": "object",
        "properties": {
          "workloadExitStatus": {
            "description": "How the workload ended when this call ended it, as a shell reports it (its code, or 128 + the signal: 143 after SIGTERM, 137 after SIGKILL); absent when it had ended before.",
            "type": "integer",
            "minimum": 0,
            "maximum": 255
          }
        },
        "additionalProperties": false
      },
      "errors": []
    }
  },
  "events": {
    "ready": {
      "description": "The harness opened the channel.",
      "params": {
        "type": "object",
        "properties": {
          "version": {
            "type": "integer",
            "minimum": 0
          }
        },
        "required": [
          "version"
        ],
        "additionalProperties": false
      }
    },
    "output": {
      "description": "A chunk of output (no `execId`: the workload's).",
      "params": {
        "type": "object",
        "properties": {
          "execId": {
            "description": "Omitted: output of the workload.",
            "$ref": "#/$defs/ExecId"
          },
          "stream": {
            "$ref": "#/$defs/Stream"
          },
          "data": {
            "description": "The harness sends pipe reads (at most 64 KiB each).",
            "type": "string",
            "maxLength": 16777216,
            "contentEncoding": "base64"
          }
        },
        "required": [
          "stream",
          "data"
        ],
        "additionalProperties": false
      }
    },
    "exit": {
      "description": "The workload ended and its output was read to EOF (`bytes`: what the harness sent per stream, checked by the host; `truncated`: a background process held the pipes past the grace); the host answers with `shutdown` (else the VM powers off after 60 s).",
      "params": {
        "allOf": [
          {
            "$ref": "#/$defs/ExitEvent"
          }
        ],
        "unevaluatedProperties": false
      }
    },
    "execExit": {
      "description": "An exec ended, as `exit` (`durationMs`: the guest's own measure from request to exit).",
      "params": {
        "allOf": [
          {
            "$ref": "#/$defs/ExitEvent"
          }
        ],
        "properties": {
          "execId": {
            "$ref": "#/$defs/ExecId"
          },
          "durationMs": {
            "description": "Guest-measured time from receiving `exec` to the process's exit (for benchmarks).",
            "type": "integer",
            "minimum": 0
          }
        },
        "required": [
          "execId"
        ],
        "unevaluatedProperties": false
      }
    }
  }
} as const;

export type Stream = "stdout" | "stderr";

export interface TtySize {
  rows: number;
  cols: number;
}

/** How a process runs in the image: as its config's `User` (`name`, `uid`, `uid:gid`, `name:group`). */
export interface ImageContext {
  user?: string;
}

/** What `run` (the workload) and `exec` share: the process to start and how. */
export interface ProcessParams {
  /** argv; argv[0] is looked up on PATH. */
  command: string[];
  env: Record<string, string>;
  /** Created when missing, as Docker's `-w`. */
  workdir?: string;
  /** Who the process runs as (`name`, `uid`, `name:group`, `uid:gid`), resolved in the root it runs in (the image's /etc/passwd, or ours). Default: the image's `User`, else root. */
  user?: string;
  /** Give the process a stdin pipe fed by `stdin` requests (otherwise /dev/null). */
  stdin?: boolean;
  /** Run on a new pseudo-terminal of this size; output then arrives as one stream, `stdout`. */
  tty?: TtySize;
  /** Run inside the instance's OCI image root (mounted by aegis-init), not the base root. */
  image?: ImageContext;
}

/** One guest process, as `docker top` shows it (from /proc). */
export interface ProcessInfo {
  /** On Linux pid_max is at most 2^22. */
  pid: number;
  ppid: number;
  uid: number;
  /** /proc/PID/stat's state letter (R, S, D, Z, T...). */
  state: string;
  /** Resident memory. */
  rssKiB: number;
  /** User + system CPU time used so far. */
  cpuMs: number;
  /** Since the VM booted. */
  startedAfterBootMs: number;
  /** The command line, arguments joined by spaces (cut at 4096 characters). */
  command: string;
}

export interface ExitEvent {
  exitCode: number | null;
  /** A signal's name as Node reports it (SIGKILL, SIGRTMIN+3...). */
  signal: string | null;
  /** Output bytes the process wrote, per stream, as the harness counted them. */
  bytes?: {
    stdout: number;
    stderr: number;
  };
  /** The pipes were closed before EOF (a background child held them open): output may be cut. */
  truncated?: boolean;
}

/** Starts the workload. */
export type RunParams = ProcessParams;
export interface RunResult {
  /** On Linux pid_max is at most 2^22. */
  pid: number;
  startedAtMs: number;
}

/** Starts a command beside the workload. */
export interface ExecParams extends ProcessParams {
  /** Chosen by the host; names the exec in `output` and `execExit`. */
  execId: string;
}
export interface ExecResult {
  /** On Linux pid_max is at most 2^22. */
  pid: number;
}

/** Sends a signal to the workload or an exec. */
export interface SignalParams {
  /** Omitted: the workload. */
  execId?: string;
  signal: string;
  /** To the process's whole group (what it started too), not the process alone. */
  group?: boolean;
}
export type SignalResult = Record<string, never>;

/** Feeds a process's stdin. */
export interface StdinParams {
  /** Omitted: the workload. */
  execId?: string;
  /** base64 */
  data?: string;
  /** Close the process's stdin after `data`. */
  eof?: boolean;
}
export type StdinResult = Record<string, never>;

/** Resizes a process's terminal. */
export interface ResizeParams extends TtySize {
  /** Omitted: the workload. */
  execId?: string;
}
export type ResizeResult = Record<string, never>;

/** The guest's processes, from /proc, kernel threads left out. */
export type PsParams = Record<string, never>;
export interface PsResult {
  processes: ProcessInfo[];
  /** There were more than 4096: the list is cut. */
  truncated?: boolean;
}

/** The guest's own view of its resources (`aegis stats`), from /proc/meminfo and /proc. */
export type StatsParams = Record<string, never>;
export interface StatsResult {
  memTotalKiB: number;
  /** At most memTotalKiB. */
  memAvailableKiB: number;
  processes: number;
}

/** Makes a VM restored from a snapshot its own: clock set, hostname set, kernel RNG reseeded (with keepIdentity, a machine waking from hibernation: clock and RNG only). */
export interface FreshParams {
  timeMs: number;
  hostname: string;
  /** base64, at least 32 bytes, from the host's CSPRNG */
  entropy: string;
  /** The same machine waking from hibernation: the clock and the RNG only; its hostname and machine-id are kept */
  keepIdentity?: boolean;
}
export type FreshResult = Record<string, never>;

/** Makes a CA certificate trusted in the guest's roots (ours and the image's) before the workload starts: written to /etc/aegis/egress-ca.pem, appended to the system bundles found (Debian's, RHEL's, Alpine's), and a full bundle written to /etc/aegis/ca-bundle.pem for SSL_CERT_FILE and its kin. The egress broker's per-instance CA (secrets brokered at egress). */
export interface TrustParams {
  /** One PEM certificate. */
  caPem: string;
}
export type TrustResult = Record<string, never>;

/** Whether the harness answers, and its workload. */
export type HealthParams = Record<string, never>;
export interface HealthResult {
  version: number;
  uptimeMs: number;
  workload: {
    /** On Linux pid_max is at most 2^22. */
    pid: number;
    running: boolean;
  } | null;
}

/** Stops the workload, then the VM powers off. */
export interface ShutdownParams {
  /** How long the workload gets after SIGTERM before SIGKILL. */
  timeoutMs?: number;
}
export interface ShutdownResult {
  /** How the workload ended when this call ended it, as a shell reports it (its code, or 128 + the signal: 143 after SIGTERM, 137 after SIGKILL); absent when it had ended before. */
  workloadExitStatus?: number;
}

/** The harness opened the channel. */
export interface ReadyEvent {
  version: number;
}

/** A chunk of output (no `execId`: the workload's). */
export interface OutputEvent {
  /** Omitted: output of the workload. */
  execId?: string;
  stream: Stream;
  /** The harness sends pipe reads (at most 64 KiB each). */
  data: string;
}

/** An exec ended, as `exit` (`durationMs`: the guest's own measure from request to exit). */
export interface ExecExitEvent extends ExitEvent {
  /** Chosen by the host; names the exec in `output` and `execExit`. */
  execId: string;
  /** Guest-measured time from receiving `exec` to the process's exit (for benchmarks). */
  durationMs?: number;
}

/** Every request the host sends, with what the guest answers. */
export interface GuestMethods {
  run: { params: RunParams; result: RunResult };
  exec: { params: ExecParams; result: ExecResult };
  signal: { params: SignalParams; result: SignalResult };
  stdin: { params: StdinParams; result: StdinResult };
  resize: { params: ResizeParams; result: ResizeResult };
  ps: { params: PsParams; result: PsResult };
  stats: { params: StatsParams; result: StatsResult };
  fresh: { params: FreshParams; result: FreshResult };
  trust: { params: TrustParams; result: TrustResult };
  health: { params: HealthParams; result: HealthResult };
  shutdown: { params: ShutdownParams; result: ShutdownResult };
}

/** Every notification the guest sends. */
export interface GuestEvents {
  ready: ReadyEvent;
  output: OutputEvent;
  exit: ExitEvent;
  execExit: ExecExitEvent;
}
