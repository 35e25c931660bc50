/**
 * The daemon's own log (stderr; `aegis up` sends it to $AEGIS_HOME/aegisd.log). It records
 * lifecycle events with ids and handles only: never environment values or workload output.
 */
export interface Logger {
  info(msg: string): void;
  warn(msg: string): void;
}

export function stderrLogger(): Logger {
  const line = (level: string, msg: string): void => {
    process.stderr.write(`${new Date().toISOString()} ${level} ${msg}\n`);
  };
  return { info: (m) => line('info', m), warn: (m) => line('warn', m) };
}
