#!/usr/bin/env node
import { AegisError } from '@aegis/protocol';
import { loadConfig } from './config.js';
import { startDaemon } from './daemon.js';
import { stderrLogger } from './log.js';

const log = stderrLogger();
try {
  const { ctx, closed } = await startDaemon(loadConfig(), log);
  for (const sig of ['SIGINT', 'SIGTERM'] as const) process.once(sig, () => void ctx.shutdown());
  await closed;
  process.exit(0);
} catch (err) {
  const e = AegisError.from(err);
  log.warn(`aegisd: ${e.message}`);
  process.exit(1);
}
