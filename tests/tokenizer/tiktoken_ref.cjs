// Reference encoder/decoder: OpenAI's tiktoken (the npm package, a WASM
// build of the original Rust code), for tests and benchmarks.
//   node tiktoken_ref.cjs encode ENCODER.json IN OUT [IN OUT ...]
//       writes encode_ordinary(IN as UTF-8) to OUT as uint32 little-endian
//   node tiktoken_ref.cjs bench ENCODER.json TEXT ROUNDS
//       prints "load S encode S decode S bytes N tokens M" per round, timed
//       inside this warm process around the calls only
// The package is found through MOE_TIKTOKEN_DIR (its directory) or NODE_PATH.
'use strict';
const fs = require('fs');
const path = require('path');

function loadTiktoken() {
  const dir = process.env.MOE_TIKTOKEN_DIR;
  try {
    return dir ? require(path.join(dir, 'lite', 'tiktoken.cjs')) : require('tiktoken/lite');
  } catch (e) {
    process.stderr.write(
      `tiktoken_ref: cannot load the npm package tiktoken (${dir || 'NODE_PATH'}): ${e.message}\n` +
      'install it with launch/install-deps (npm install tiktoken into build-deps/node)\n');
    process.exit(3);
  }
}

const { Tiktoken } = loadTiktoken();
const [mode, encPath, ...rest] = process.argv.slice(2);
const t0 = process.hrtime.bigint();
const spec = JSON.parse(fs.readFileSync(encPath, 'utf8'));
const enc = new Tiktoken(spec.bpe_ranks, spec.special_tokens, spec.pat_str);
const loadS = Number(process.hrtime.bigint() - t0) / 1e9;

if (mode === 'encode') {
  for (let i = 0; i + 1 < rest.length; i += 2) {
    const text = fs.readFileSync(rest[i], 'utf8');
    const ids = enc.encode_ordinary(text);
    fs.writeFileSync(rest[i + 1], Buffer.from(new Uint32Array(ids).buffer));
  }
} else if (mode === 'bench') {
  const text = fs.readFileSync(rest[0], 'utf8');
  const bytes = Buffer.byteLength(text, 'utf8');
  const rounds = parseInt(rest[1] || '3', 10);
  for (let r = 0; r < rounds; r++) {
    let a = process.hrtime.bigint();
    const ids = enc.encode_ordinary(text);
    const encS = Number(process.hrtime.bigint() - a) / 1e9;
    a = process.hrtime.bigint();
    const out = enc.decode(ids);
    const decS = Number(process.hrtime.bigint() - a) / 1e9;
    if (out.length !== bytes) throw new Error('decode length mismatch');
    process.stdout.write(`load ${loadS} encode ${encS} decode ${decS} bytes ${bytes} tokens ${ids.length}\n`);
  }
} else {
  process.stderr.write('usage: tiktoken_ref.cjs encode|bench ENCODER.json ...\n');
  process.exit(2);
}
enc.free();
