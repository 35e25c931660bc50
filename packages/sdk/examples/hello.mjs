// node examples/hello.mjs — needs a running aegisd (`aegis up`).
import { Sandbox } from '@aegis/sdk';

const sbx = await Sandbox.create({ env: { GREETING: 'hello' } });
try {
  const r = await sbx.commands.run('echo "$GREETING from $(uname -sr)"');
  process.stdout.write(r.stdout);
  await sbx.files.write('/tmp/note.txt', 'written by the host\n');
  process.stdout.write(await sbx.files.read('/tmp/note.txt'));
} finally {
  await sbx.kill();
}
