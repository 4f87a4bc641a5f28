// Writes the SHA-256 of the extension's sources next to the build, so that a test can
// tell when jupyter_ext/labextension was not rebuilt after a change (tests/test_labextension.py
// computes the same digest: each file's path relative to here, a NUL, its bytes, a NUL).
import { createHash } from 'node:crypto';
import { readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

const SOURCES = ['package.json', 'tsconfig.json', 'src', 'style'];

function files(path) {
  if (!statSync(path).isDirectory()) {
    return [path];
  }
  return readdirSync(path).flatMap(name => files(join(path, name)));
}

const hash = createHash('sha256');
for (const path of SOURCES.flatMap(files).sort()) {
  hash.update(path + '\0');
  hash.update(readFileSync(path));
  hash.update('\0');
}
writeFileSync('../jupyter_ext/labextension/sources.sha256', hash.digest('hex') + '\n');
