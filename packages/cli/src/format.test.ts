import { describe, expect, it } from 'vitest';
import { parseTemplate } from './format.js';

const inst = {
  handle: 'web',
  exitCode: null,
  labels: { team: 'a', 'app.kind': 'x' },
  command: ['sleep', '60'],
  State: { Status: 'running', ExitCode: 0 },
};

describe('docker --format templates', () => {
  it('fills fields, nested fields, json, index and join', () => {
    expect(parseTemplate('{{.handle}} {{.State.Status}}/{{.State.ExitCode}}').render(inst)).toBe('web running/0');
    expect(parseTemplate('{{json .labels}}').render(inst)).toBe('{"team":"a","app.kind":"x"}');
    expect(parseTemplate('{{index .labels "app.kind"}}').render(inst)).toBe('x');
    expect(parseTemplate('{{join .command " "}}').render(inst)).toBe('sleep 60');
    expect(parseTemplate('{{json .}}').render({ a: 1 })).toBe('{"a":1}');
  });

  it("prints values as Go's %v does", () => {
    expect(parseTemplate('{{.command}} {{.labels}} {{.exitCode}} {{.nope}} {{.State.Nope.Deeper}}').render(inst)).toBe(
      '[sleep 60] map[app.kind:x team:a] <nil> <no value> <no value>',
    );
  });

  it('turns \\t and \\n into tabs and newlines, and "table" into a header', () => {
    const t = parseTemplate('table {{.handle}}\\t{{.State.Status}}', { HANDLE: 'NAME' });
    expect(t.header).toBe('NAME\tSTATE.STATUS');
    expect(t.render(inst)).toBe('web\trunning');
    expect(parseTemplate('{{.handle}}\\n').header).toBeUndefined();
  });

  it('refuses what it does not do instead of printing it wrong', () => {
    for (const bad of [
      '{{if .handle}}x{{end}}',
      '{{.handle | upper}}',
      '{{printf "%s" .handle}}',
      '{{handle}}',
      '{{.handle',
      'a}}b',
      '{{}}',
      '{{index .labels team}}',
    ]) {
      expect(() => parseTemplate(bad), bad).toThrow(/supported|unclosed|unbalanced|empty|quoted/);
    }
  });
});
