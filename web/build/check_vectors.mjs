// Checks web/static/js/crypto.js against test vectors made by the Rust client
// (crates/client/examples/web_vectors.rs), in both directions:
//
// - checkVectors(crypto, vectors): JavaScript opens everything Rust made and must find what
//   Rust found (text, author, reason), sees any flipped byte of a verified body as forged, and
//   reproduces what must be deterministic byte for byte (public keys, login messages and
//   signatures, session tags, bound channels, signed bodies, plain key files, direct names).
// - makeJsSamples(crypto, vectors): bodies, records, key files, a direct record and login
//   signatures made by JavaScript, for `web_vectors --verify FILE` to check with the Rust API.
//
// Both run in a browser as well as in node: they use no node API. From a shell:
//
//   cargo run --release -p cellchat-client --example web_vectors > /tmp/vectors.json
//   node web/build/check_vectors.mjs /tmp/vectors.json --emit /tmp/js.json
//   cargo run --release -p cellchat-client --example web_vectors -- --verify /tmp/js.json

const CHEAP = { memoryKib: 19456, passes: 2, lanes: 1 };

function fromHex(text) {
  const out = new Uint8Array(text.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(text.slice(2 * i, 2 * i + 2), 16);
  return out;
}

const toHex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');

const sameBytes = (a, b) => a instanceof Uint8Array && toHex(a) === toHex(b);

/** The status crypto.js must report for what Rust found (see its API comment). */
function expectedStatus(expect, encrypted) {
  if (expect.author === 'bad-signature') return 'forged';
  if (expect.text === null) return 'unreadable';
  if (expect.author === 'verified') return 'verified';
  if (expect.author === 'unknown-sender') return 'unverified';
  return encrypted ? 'unsigned' : 'plaintext';
}

/** A tally of checks: each failure is one line naming the check. */
function tally() {
  const t = { passed: 0, failures: [] };
  t.check = (name, ok, detail = '') => {
    if (ok) t.passed += 1;
    else t.failures.push(detail ? `${name}: ${detail}` : name);
  };
  // Runs `fn`, recording a throw as a failure (checks inside still count on their own).
  t.attempt = async (name, fn) => {
    try {
      await fn();
    } catch (e) {
      t.failures.push(`${name}: threw ${e?.kind ? `[${e.kind}] ` : ''}${e?.message ?? e}`);
    }
  };
  // Expects `fn` to throw a CryptoError of `kind`.
  t.rejects = async (name, kind, fn) => {
    try {
      await fn();
      t.failures.push(`${name}: expected [${kind}], it succeeded`);
    } catch (e) {
      t.check(name, e?.kind === kind, `expected [${kind}], threw [${e?.kind}] ${e?.message}`);
    }
  };
  return t;
}

function identities(vectors) {
  const out = {};
  for (const [name, v] of Object.entries(vectors.identities)) {
    out[name] = { seed: fromHex(v.seed), publicKey: fromHex(v.public_key) };
  }
  return out;
}

/** Checks the vectors; resolves to {passed, failures}. */
export async function checkVectors(crypto, vectors) {
  const t = tally();
  if (vectors?.format !== 'cellchat-web-vectors-v1') {
    return { passed: 0, failures: ['not a cellchat-web-vectors-v1 document'] };
  }
  const ids = identities(vectors);
  checkDeterministic(t, crypto, vectors, ids);
  const keys = await unlockKeys(t, crypto, vectors, ids);
  for (const [i, c] of vectors.open_cases.entries()) {
    const name = `open_cases[${i}] ${c.note}`;
    await t.attempt(name, () => checkOpenCase(t, crypto, vectors, keys, c, i));
  }
  for (const [i, c] of vectors.direct_cases.entries()) {
    await t.attempt(`direct_cases[${i}]`, () => checkDirectCase(t, crypto, ids, c, i));
  }
  for (const [i, c] of vectors.key_files.entries()) {
    await t.attempt(`key_files[${i}]`, () => checkKeyFile(t, crypto, c, i));
  }
  await t.attempt('round trip', () => checkRoundTrip(t, crypto, vectors, ids, keys));
  return { passed: t.passed, failures: t.failures };
}

/** What JavaScript must reproduce byte for byte. */
function checkDeterministic(t, crypto, vectors, ids) {
  const { cluster } = vectors;
  for (const [name, id] of Object.entries(ids)) {
    const { publicKey } = crypto.identityFromSeed(id.seed);
    t.check(`public key of ${name}`, sameBytes(publicKey, id.publicKey));
  }
  for (const [i, v] of vectors.logins.entries()) {
    const challenge = fromHex(v.challenge);
    const binding = crypto.webBinding(challenge);
    t.check(`logins[${i}] binding`, sameBytes(binding, fromHex(v.binding)));
    const message = crypto.loginMessage(challenge, binding, v.cluster, v.name);
    t.check(`logins[${i}] message`, sameBytes(message, fromHex(v.message)));
    const signature = crypto.sign(ids[v.name].seed, message);
    t.check(`logins[${i}] signature`, sameBytes(signature, fromHex(v.signature)));
    t.check(`logins[${i}] verifies`, crypto.verify(ids[v.name].publicKey, message, signature));
    const other = Uint8Array.from(message);
    other[other.length - 1] ^= 1;
    const forged = crypto.verify(ids[v.name].publicKey, other, signature);
    t.check(`logins[${i}] changed message fails`, !forged);
  }
  for (const [i, v] of vectors.sessions.entries()) {
    const session = crypto.sessionOf(fromHex(v.client_id));
    t.check(`sessions[${i}]`, sameBytes(session, fromHex(v.session)));
  }
  for (const [i, v] of vectors.bound_channels.entries()) {
    const bound = crypto.boundChannel(v.channel, v.relation);
    t.check(`bound_channels[${i}]`, bound === v.bound, JSON.stringify(bound));
  }
  for (const [i, v] of vectors.signed.entries()) {
    const body = crypto.signPlain({
      seed: ids[v.sender].seed,
      sender: v.sender,
      cluster,
      channel: v.channel,
      relation: v.relation,
      clientId: fromHex(v.client_id),
      clientSeq: BigInt(v.client_seq),
      text: v.text,
    });
    t.check(`signed[${i}] body`, toHex(body) === v.body);
    const opened = crypto.openMessage({
      cluster,
      channel: v.channel,
      relation: v.relation,
      sender: v.sender,
      clientSeq: BigInt(v.client_seq),
      senderKey: ids[v.sender].publicKey,
      body: fromHex(v.body),
    });
    const readable = opened.status === 'verified' && opened.text === v.text;
    t.check(`signed[${i}] opens`, readable && !opened.encrypted, opened.status);
  }
  for (const [i, v] of vectors.signatures.entries()) {
    const [key, message, signature] = [v.public_key, v.message, v.signature].map(fromHex);
    const valid = crypto.verify(key, message, signature);
    t.check(`signatures[${i}] ${v.note}`, valid === v.valid, `valid: ${valid}`);
  }
  for (const [i, v] of vectors.direct_names.entries()) {
    const name = crypto.directChannelName(v.members);
    t.check(`direct_names[${i}]`, name === v.name, `${name} for ${JSON.stringify(v.members)}`);
  }
}

/** Every key the open cases name: records unlocked, the v1 key, the direct record opened by
 * each member (`direct` is alice's; `direct:<name>` each member's). */
async function unlockKeys(t, crypto, vectors, ids) {
  const { cluster } = vectors;
  const keys = {};
  for (const r of vectors.records) {
    const record = fromHex(r.record);
    const where = { cluster, channel: r.channel };
    await t.attempt(`records ${r.id} unlock`, async () => {
      keys[r.id] = await crypto.unlockChannel(record, r.passphrase, where);
      t.check(`records ${r.id} unlocked`, keys[r.id] !== undefined);
    });
    if (r.id !== 'cheap') continue;
    await t.rejects(`records ${r.id} wrong passphrase`, 'wrong-passphrase', () =>
      crypto.unlockChannel(record, r.wrong_passphrase, where),
    );
    await t.rejects(`records ${r.id} cut short`, 'bad-record', () =>
      crypto.unlockChannel(record.subarray(0, 60), r.passphrase, where),
    );
    const weak = Uint8Array.from(record);
    weak[5] = 1; // one pass at 19 MiB: below the minimum cost
    await t.rejects(`records ${r.id} weak parameters`, 'bad-record', () =>
      crypto.unlockChannel(weak, r.passphrase, where),
    );
    await t.rejects(`records ${r.id} empty passphrase`, 'empty-passphrase', () =>
      crypto.unlockChannel(record, '', where),
    );
  }
  for (const v of vectors.v1_keys) {
    await t.attempt(`v1_keys ${v.id}`, async () => {
      keys[v.id] = await crypto.deriveV1Key(v.passphrase, { cluster, channel: v.channel });
    });
  }
  const d = vectors.direct;
  const record = fromHex(d.record);
  const found = crypto.directMembers(record);
  t.check('direct members', JSON.stringify(found) === JSON.stringify(d.members));
  for (const reader of d.members) {
    await t.attempt(`direct opened by ${reader}`, () => {
      keys[`direct:${reader}`] = crypto.openDirect({
        seed: ids[reader].seed,
        reader,
        cluster,
        channel: d.channel,
        record,
        creatorKey: (name) => ids[name]?.publicKey ?? null,
      });
    });
  }
  keys.direct = keys[`direct:${d.creator}`];
  return keys;
}

function openCase(crypto, vectors, keys, c, v2Id, body) {
  return crypto.openMessage({
    keys: { v2: keys[v2Id] ?? null, v1: keys[c.keys.v1] ?? null },
    cluster: vectors.cluster,
    channel: c.channel,
    relation: c.relation,
    sender: c.sender,
    clientSeq: BigInt(c.client_seq),
    senderKey: c.sender_key === null ? null : fromHex(c.sender_key),
    body,
  });
}

/** One body as Rust opened it; a verified one also with bytes flipped, and a direct one with
 * every member's copy of the key. */
function checkOpenCase(t, crypto, vectors, keys, c, i) {
  const name = `open_cases[${i}] ${c.note}`;
  const body = fromHex(c.body);
  const got = openCase(crypto, vectors, keys, c, c.keys.v2, body);
  const e = c.expect;
  const status = expectedStatus(e, got.encrypted);
  const same = got.author === e.author && got.text === e.text && got.reason === e.reason;
  t.check(name, same && got.status === status, `got ${JSON.stringify({ ...got, session: null })}`);
  t.check(`${name} encrypted flag`, got.encrypted === crypto.isEncryptedFormat(body[0] ?? -1));
  for (const encryptedHistory of [false, true]) {
    const line = [...crypto.markers(got, { encryptedHistory }), got.display].join(' ');
    const expected = encryptedHistory ? e.line_encrypted : e.line_plain;
    t.check(`${name} line (encrypted history: ${encryptedHistory})`, line === expected, line);
  }
  if (c.keys.v2 === 'direct') {
    for (const reader of vectors.direct.members) {
      const again = openCase(crypto, vectors, keys, c, `direct:${reader}`, body);
      t.check(`${name} with ${reader}'s key`, again.text === e.text && again.author === e.author);
    }
  }
  if (e.author !== 'verified' || body.length < 2) return;
  for (const at of new Set([1, 17, 30, body.length >> 1, body.length - 65, body.length - 1])) {
    const flipped = Uint8Array.from(body);
    flipped[at] ^= 0x01;
    const opened = openCase(crypto, vectors, keys, c, c.keys.v2, flipped);
    t.check(`${name} byte ${at} flipped`, opened.status === 'forged', `status ${opened.status}`);
  }
}

function checkDirectCase(t, crypto, ids, c, i) {
  const name = `direct_cases[${i}] ${c.note}, ${c.reader} in ${c.cluster}`;
  let outcome = 'ok';
  try {
    const key = crypto.openDirect({
      seed: ids[c.reader].seed,
      reader: c.reader,
      cluster: c.cluster,
      channel: c.channel,
      record: fromHex(c.record),
      creatorKey: (who) => (c.creator_known ? ids[who]?.publicKey ?? null : null),
    });
    if (key?.channel !== c.channel) outcome = 'no key';
  } catch (e) {
    outcome = e?.kind ?? `untyped error ${e?.message}`;
  }
  t.check(name, outcome === c.expect, `got ${outcome}, Rust says ${c.expect}`);
}

async function checkKeyFile(t, crypto, c, i) {
  const name = `key_files[${i}] ${c.note}`;
  const options = { cluster: c.cluster, name: c.name, passphrase: c.passphrase ?? undefined };
  let outcome = 'ok';
  try {
    const id = await crypto.parseKeyFile(c.text, options);
    if (toHex(id.seed) !== c.seed) outcome = 'another seed';
  } catch (e) {
    outcome = e?.kind ?? `untyped error ${e?.message}`;
  }
  t.check(name, outcome === c.expect, `got ${outcome}, Rust says ${c.expect}`);
  if (c.note === 'plain') {
    const text = await crypto.exportKeyFile(fromHex(c.seed));
    t.check(`${name} written as the CLI writes it`, text === c.text);
  }
}

/** JavaScript seals under a Rust-made key and opens its own body (Rust checks these too,
 * through makeJsSamples). */
function checkRoundTrip(t, crypto, vectors, ids, keys) {
  const text = 'round trip ☕ 𝄞';
  const common = {
    seed: ids.carol.seed,
    sender: 'carol',
    cluster: vectors.cluster,
    channel: 'general',
    relation: { react: { to: 3, emoji: '🎉', on: true } },
    clientId: new Uint8Array(16).fill(9),
    clientSeq: 77,
  };
  const body = crypto.sealV2({ ...common, key: keys.cheap, text });
  const opened = crypto.openMessage({
    ...common,
    keys: { v2: keys.cheap },
    senderKey: ids.carol.publicKey,
    body,
  });
  t.check('round trip', opened.status === 'verified' && opened.text === text, opened.status);
}

/** Outputs of JavaScript for `web_vectors --verify` (a JSON-ready object): Rust must read
 * them as JavaScript meant them. */
export async function makeJsSamples(crypto, vectors) {
  const { cluster } = vectors;
  const ids = identities(vectors);
  const cheap = vectors.records.find((r) => r.id === 'cheap');
  const where = { cluster, channel: cheap.channel };
  const rustKey = await crypto.unlockChannel(fromHex(cheap.record), cheap.passphrase, where);
  const passphrase = 'js passphrase ☕';
  const mine = await crypto.makeChannelRecord(passphrase, {
    cluster,
    channel: 'js-room',
    params: CHEAP,
  });
  const members = ['alice', 'bob', 'carol'];
  const directChannel = crypto.directChannelName(members);
  const direct = crypto.createDirect({
    seed: ids.bob.seed,
    creator: 'bob',
    cluster,
    channel: directChannel,
    members: members.map((name) => ({ name, publicKey: ids[name].publicKey })),
  });
  const bodies = [];
  const add = (note, keyId, key, { sender, channel, relation = null, text }) => {
    const args = {
      seed: ids[sender].seed,
      sender,
      cluster,
      channel,
      relation,
      clientId: Uint8Array.from({ length: 16 }, (_, i) => i * 3),
      clientSeq: BigInt(bodies.length + 1),
      text,
    };
    const body = key === null ? crypto.signPlain(args) : crypto.sealV2({ ...args, key });
    bodies.push({
      note,
      channel,
      relation,
      sender,
      client_id: toHex(args.clientId),
      client_seq: String(args.clientSeq),
      text,
      key: keyId,
      body: toHex(body),
    });
  };
  const texts = ['', 'js hello', 'é☕𝄞👩‍👩‍👧 日本語', 'x'.repeat(62), 'x'.repeat(63), 'y'.repeat(5000)];
  for (const text of texts) {
    add('sealed, JS record', 'js', mine.key, { sender: 'alice', channel: 'js-room', text });
  }
  const relations = [
    null,
    { reply: { to: 4 } },
    { edit: { of: 2 } },
    { delete: { of: 8 } },
    { react: { to: 1, emoji: '👍', on: false } },
  ];
  for (const relation of relations) {
    const related = { sender: 'bob', channel: cheap.channel, relation, text: 'related ☕' };
    add('sealed, Rust record', 'cheap', rustKey, related);
    add('signed', null, null, { sender: 'carol', channel: 'café-☕', relation, text: 'signed ✓' });
  }
  const inDirect = { channel: directChannel, text: 'to you all' };
  add('sealed, JS direct', 'js-direct', direct.key, { ...inDirect, sender: 'carol' });
  const reply = { ...inDirect, sender: 'alice', relation: { reply: { to: 1 } } };
  add('sealed, JS direct', 'js-direct', direct.key, reply);
  const logins = vectors.logins.map((v) => {
    const challenge = fromHex(v.challenge);
    const message = crypto.loginMessage(challenge, crypto.webBinding(challenge), cluster, v.name);
    return {
      challenge: v.challenge,
      name: v.name,
      public_key: toHex(ids[v.name].publicKey),
      signature: toHex(crypto.sign(ids[v.name].seed, message)),
    };
  });
  const keyFile = { cluster, name: 'carol', passphrase: 'carol ☕', params: CHEAP };
  const protectedText = await crypto.exportKeyFile(ids.carol.seed, keyFile);
  const plainText = await crypto.exportKeyFile(ids.alice.seed);
  const nameLists = [...vectors.direct_names.map((v) => v.members), ['zoë', 'Zoe', 'zoe']];
  return {
    format: 'cellchat-web-js-samples-v1',
    cluster,
    logins,
    records: [
      { id: 'js', channel: 'js-room', passphrase, record: toHex(mine.record) },
      { id: 'cheap', channel: cheap.channel, passphrase: cheap.passphrase, record: cheap.record },
    ],
    directs: [{ id: 'js-direct', channel: directChannel, record: toHex(direct.record) }],
    bodies,
    key_files: [
      { note: 'protected', cluster, name: 'carol', passphrase: 'carol ☕', text: protectedText },
      { note: 'plain', cluster, name: 'alice', passphrase: null, text: plainText },
    ],
    direct_names: nameLists.map((m) => ({ members: m, name: crypto.directChannelName(m) })),
  };
}

// --- node command line (never runs in a browser) ------------------------------------------------

async function main(argv) {
  const fs = await import('node:fs/promises');
  const [file, flag, out] = argv;
  if (!file || (flag !== undefined && (flag !== '--emit' || !out))) {
    console.error('usage: node check_vectors.mjs VECTORS.json [--emit JS_SAMPLES.json]');
    return 2;
  }
  const crypto = await import(new URL('../static/js/crypto.js', import.meta.url).href);
  const vectors = JSON.parse(await fs.readFile(file, 'utf8'));
  const started = performance.now();
  const { passed, failures } = await checkVectors(crypto, vectors);
  const ms = Math.round(performance.now() - started);
  for (const failure of failures) console.error(`FAIL ${failure}`);
  console.log(`${passed} checks passed, ${failures.length} failed, in ${ms} ms`);
  if (out) {
    const samples = await makeJsSamples(crypto, vectors);
    await fs.writeFile(out, `${JSON.stringify(samples, null, 1)}\n`);
    console.log(`wrote ${samples.bodies.length} bodies and more to ${out}`);
  }
  return failures.length === 0 ? 0 : 1;
}

if (typeof process !== 'undefined' && process.versions?.node && process.argv[1]) {
  const { pathToFileURL } = await import('node:url');
  if (import.meta.url === pathToFileURL(process.argv[1]).href) {
    process.exitCode = await main(process.argv.slice(2));
  }
}
