import { describe, expect, it } from 'vitest';
import { parseMetrics } from './metrics-text.js';

describe('parseMetrics', () => {
  it('reads samples with their labels (escapes undone) and skips comments', () => {
    const text = [
      '# HELP aegis_instance_cpu_seconds_total CPU time',
      '# TYPE aegis_instance_cpu_seconds_total counter',
      'aegis_instance_cpu_seconds_total{instance="abc",handle="h\\"1"} 1.5',
      'aegis_instance_memory_bytes{instance="abc",handle="h",kind="host_pss"} 1048576',
      'aegisd_process_start_time_seconds 1700000000',
      '',
    ].join('\n');
    expect(parseMetrics(text)).toEqual([
      { name: 'aegis_instance_cpu_seconds_total', labels: { instance: 'abc', handle: 'h"1' }, value: 1.5 },
      { name: 'aegis_instance_memory_bytes', labels: { instance: 'abc', handle: 'h', kind: 'host_pss' }, value: 1048576 },
      { name: 'aegisd_process_start_time_seconds', labels: {}, value: 1700000000 },
    ]);
  });
});
