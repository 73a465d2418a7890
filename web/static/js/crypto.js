// cellchat end-to-end crypto for the browser, byte-compatible with the Rust client
// (crates/client/src/crypto.rs and crypto/{body,kdf,record,direct}.rs, identity.rs;
// crates/proto login.rs and types.rs direct_channel_name). The byte layouts are documented
// there; this file follows them and says only where JavaScript needs care. Checked against
// vectors made by the Rust code: web/build/check_vectors.mjs.
//
// API (bytes are Uint8Array everywhere; strings are UTF-8; seqs are number or bigint; every
// function taking a passphrase is async, as Argon2id takes a few hundred ms, and accepts an
// `onProgress(fraction)` option):
//
// Identities and key files
//   newIdentity() -> {seed, publicKey}                 fresh random Ed25519 key (getRandomValues)
//   identityFromSeed(seed) -> {seed, publicKey}
//   sign(seed, message) -> Uint8Array(64)              Ed25519, deterministic
//   verify(publicKey, message, signature) -> bool      ed25519-dalek's verify_strict rules
//   async parseKeyFile(text, {cluster, name, passphrase?}) -> {seed, publicKey, protected}
//       A key file as the CLI keeps it (identities/<cluster>/<name>.key): plain (64 hex digits)
//       or `cellchat-key-v2` (cluster and name are bound into it). Throws CryptoError .kind
//       'needs-passphrase' (protected, none given) | 'wrong-passphrase' | 'malformed' (not a
//       key file, or Argon2 parameters out of bounds) | 'tampered' (the passphrase is right
//       but the sealed seed does not open: changed, or the file of another name or cluster).
//   async exportKeyFile(seed, {cluster, name, passphrase?, params?}) -> text
//       Plain ("<64 hex>\n") without a passphrase, else `cellchat-key-v2` with Argon2id
//       ARGON2_V2_DEFAULT (46 MiB, 1 pass, 1 lane) unless params are given. Throws .kind
//       'empty-passphrase' | 'bad-params'.
//
// Login
//   webBinding(challenge) -> Uint8Array(32)    SHA-256("cellchat-web-login-v1" || challenge)
//   loginMessage(challenge, binding, cluster, name) -> Uint8Array
//   The `login` op sends {name, public_key, signature: sign(seed, loginMessage(challenge,
//   webBinding(challenge), cluster, name))}.
//
// Channel keys (opaque frozen objects {version, cluster, channel}; the key bytes are not on
// them; a key opens bodies of its own cluster and channel only)
//   async makeChannelRecord(passphrase, {cluster, channel, params?}) -> {key, record}
//       record: the 61-byte v2 record for ChannelChange Create/SetCrypto. Argon2id
//       ARGON2_V2_DEFAULT unless params ({memoryKib, passes, lanes}, within the v2 bounds).
//   async unlockChannel(record, passphrase, {cluster, channel}) -> key
//       Argon2 parameters come from the record. Throws .kind 'wrong-passphrase' (also for a
//       record of another channel or cluster) | 'bad-record' | 'empty-passphrase'.
//   async deriveV1Key(passphrase, {cluster, channel}) -> key     legacy 0x01 bodies only
//
// Bodies (SendRequest.body). relation as on the wire, or null: {reply: {to}}, {edit: {of}},
// {delete: {of}}, {react: {to, emoji, on}}. clientId is SendRequest.client_id (16 bytes).
//   signPlain({seed, sender, cluster, channel, relation?, clientId, clientSeq, text})
//       -> Uint8Array      format 0x02, signed plaintext. Throws .kind 'too-long'.
//   sealV2({key, seed, sender, cluster, channel, relation?, clientId, clientSeq, text})
//       -> Uint8Array      format 0x03, signed, padded AES-256-GCM.
//       Throws .kind 'too-long' | 'key-mismatch' (a key of another channel or cluster).
//   openMessage({keys: {v2?, v1?}, cluster, channel, relation?, sender, clientSeq,
//                senderKey?, body}) -> Opened                     never throws on body bytes
//       sender, clientSeq and relation as the WireMessage carries them; senderKey: the
//       sender's pinned public key, or null when none is known. Opened = {
//         status: 'verified' | 'unverified' (readable, no sender key given)
//               | 'forged' (the signature does not verify: never show as the sender's)
//               | 'unsigned' (a v1 encrypted body, decrypted) | 'plaintext' (a v1 0x00 body)
//               | 'unreadable' (see reason),
//         reason: null | 'no-key' | 'wrong-key' | 'empty' | 'too-short' | 'not-utf8'
//               | 'bad-padding' | 'unknown-version'   (why text is null; a forged body
//                 may have one too),
//         text: string | null,
//         display: text, or the CLI's placeholder ('[encrypted]', '[encrypted: wrong key?]',
//                  '[unreadable message]', '[unknown format 0x07]'),
//         author: 'verified' | 'bad-signature' | 'unknown-sender' | 'unsigned',
//         encrypted: bool (format 0x01 or 0x03), session: Uint8Array(16) | null }
//   markers(opened, {encryptedHistory?, replayed?}) -> ['[forged?]', '[unverified]', ...]
//       the marks the CLI prints before a line, in its order
//   sessionOf(clientId) -> Uint8Array(16);  boundChannel(channel, relation) -> string
//   isEncryptedFormat(firstByte) -> bool;  TEXT_BYTES_MAX_ENCRYPTED (16273),
//   TEXT_BYTES_MAX_SIGNED (16303): longest texts, in UTF-8 bytes
//
// Direct conversations (record v3: a random key wrapped to each member's identity key)
//   directChannelName(members) -> 'dm-<40 hex>'     any order, duplicates ignored
//   directMembers(record) -> [names], sorted        throws .kind 'malformed'
//   createDirect({seed, creator, cluster, channel, members: [{name, publicKey}]})
//       -> {key, record}     members include the creator; channel = directChannelName(names)
//   openDirect({seed, reader, cluster, channel, record, creatorKey: name => Uint8Array|null})
//       -> key               creatorKey gives the key pinned for the record's creator
//   Both throw .kind 'malformed' | 'wrong-members' | 'not-a-member' | 'bad-signature'
//       | 'bad-member-key' | 'unwrap'.
//   validUserName(name) -> bool      1..=32 bytes of A-Za-z0-9_-
//
// Errors: what this module throws on purpose is a CryptoError (extends Error) with .kind as
// above and a message fit to show; a TypeError or RangeError means the caller passed
// arguments of the wrong type.

import {
  argon2idAsync,
  ed25519,
  gcm,
  hkdf,
  randomBytes,
  sha256,
  sha512,
  x25519,
} from '../vendor/noble.js';

// ---------------------------------------------------------------------------------------------
// Errors and byte helpers

/** An error this module throws on purpose; `kind` says which (see the API above). */
export class CryptoError extends Error {
  constructor(kind, message) {
    super(message);
    this.name = 'CryptoError';
    this.kind = kind;
  }
}

const encoder = new TextEncoder();
// fatal: invalid UTF-8 is refused, as Rust's from_utf8 does; ignoreBOM: a leading U+FEFF is
// text, not a marker to strip, or JS would show a different string than Rust.
const decoder = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

const utf8 = (text) => encoder.encode(text);

/** The text of `bytes`, or null when they are not UTF-8. */
function fromUtf8(bytes) {
  try {
    return decoder.decode(bytes);
  } catch {
    return null;
  }
}

function bytesArg(value, what, len) {
  if (!(value instanceof Uint8Array)) throw new TypeError(`${what} must be a Uint8Array`);
  if (len !== undefined && value.length !== len) {
    throw new TypeError(`${what} must be ${len} bytes, not ${value.length}`);
  }
  return value;
}

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

const U64_MAX = (1n << 64n) - 1n;

/** A u64 (number or bigint) as 8 little-endian bytes. */
function u64le(value) {
  const n = BigInt(value);
  if (n < 0n || n > U64_MAX) throw new RangeError(`${value} is not a u64`);
  const out = new Uint8Array(8);
  new DataView(out.buffer).setBigUint64(0, n, true);
  return out;
}

function u32le(value) {
  const out = new Uint8Array(4);
  new DataView(out.buffer).setUint32(0, value, true);
  return out;
}

/** `len (u64 LE) || bytes`: adjacent variable-length fields cannot run into each other. */
const field = (bytes) => concat(u64le(bytes.length), bytes);

const toHex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');

/** Hex digits (either case, as Rust's hex::decode) to bytes; null when not hex. */
function fromHex(text) {
  if (text.length % 2 !== 0 || !/^[0-9a-fA-F]*$/.test(text)) return null;
  const out = new Uint8Array(text.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(text.slice(2 * i, 2 * i + 2), 16);
  return out;
}

function bytesEqual(a, b) {
  if (a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff |= a[i] ^ b[i];
  return diff === 0;
}

function bytesToBigLE(bytes) {
  let n = 0n;
  for (let i = bytes.length - 1; i >= 0; i--) n = (n << 8n) | BigInt(bytes[i]);
  return n;
}

/** UTF-8 byte order, as Rust compares strings (JS `<` compares UTF-16 units). */
function compareUtf8(a, b) {
  const x = utf8(a);
  const y = utf8(b);
  for (let i = 0; i < Math.min(x.length, y.length); i++) {
    if (x[i] !== y[i]) return x[i] - y[i];
  }
  return x.length - y.length;
}

// ---------------------------------------------------------------------------------------------
// Key derivation: Argon2id, its bounds, HKDF-SHA256 (crates/client/src/crypto/kdf.rs)

/** The v2 default: OWASP's first choice, 46 MiB, 1 pass, 1 lane. */
export const ARGON2_V2_DEFAULT = Object.freeze({ memoryKib: 47104, passes: 1, lanes: 1 });
/** The fixed parameters of format v1. */
const ARGON2_V1 = Object.freeze({ memoryKib: 19456, passes: 2, lanes: 1 });
/** What a record or key file may ask for: a hostile server must not make a client burn
 * unbounded memory and time, nor talk it into weak parameters. */
const BOUNDS_V2 = Object.freeze({
  memoryKibMin: 19456,
  memoryKibMax: 1 << 20,
  passesMax: 16,
  lanesMax: 4,
  costKibMin: 19456 * 2,
});

/** Why params break the v2 bounds (Rust's ParamsError text), or null when they pass. */
function paramsProblem({ memoryKib, passes, lanes }) {
  const b = BOUNDS_V2;
  const isU32 = (n) => Number.isInteger(n) && n >= 0 && n <= 0xffffffff;
  if (!isU32(memoryKib) || memoryKib < b.memoryKibMin || memoryKib > b.memoryKibMax) {
    return `memory ${memoryKib} KiB outside ${b.memoryKibMin}..=${b.memoryKibMax} KiB`;
  }
  if (!isU32(passes) || passes < 1 || passes > b.passesMax) {
    return `${passes} passes outside 1..=${b.passesMax}`;
  }
  if (!isU32(lanes) || lanes < 1 || lanes > b.lanesMax) {
    return `${lanes} lanes outside 1..=${b.lanesMax}`;
  }
  if (memoryKib * passes < b.costKibMin) {
    return `memory x passes is ${memoryKib * passes} KiB, below the minimum of ${b.costKibMin} KiB`;
  }
  return null;
}

/** Argon2id v0x13 of `passphrase` with `salt`, 32 bytes out. Async so a page stays live. */
async function argon2(params, passphrase, salt, onProgress) {
  if (typeof passphrase !== 'string' || passphrase === '') {
    throw new CryptoError('empty-passphrase', 'empty passphrase: type at least one character');
  }
  return argon2idAsync(utf8(passphrase), salt, {
    t: params.passes,
    m: params.memoryKib,
    p: params.lanes,
    dkLen: 32,
    version: 0x13,
    // The bounds allow 1 GiB of blocks; leave room for noble's own bookkeeping.
    maxmem: 2 ** 31,
    asyncTick: 20,
    onProgress,
  });
}

/** HKDF-SHA256 with an empty salt, 32 bytes of `info`'s output. */
const hkdf32 = (master, info) => hkdf(sha256, master, undefined, utf8(info), 32);

// ---------------------------------------------------------------------------------------------
// Identities, signatures, login (identity.rs, crates/proto/src/login.rs)

const Point = ed25519.Point;
const GROUP_ORDER = Point.Fn.ORDER;

/** A fresh identity from 32 random bytes (crypto.getRandomValues). */
export function newIdentity() {
  return identityFromSeed(randomBytes(32));
}

export function identityFromSeed(seed) {
  bytesArg(seed, 'seed', 32);
  return { seed: Uint8Array.from(seed), publicKey: ed25519.getPublicKey(seed) };
}

/** Ed25519 (RFC 8032) of `message` under the key of `seed`: deterministic. */
export function sign(seed, message) {
  return ed25519.sign(bytesArg(message, 'message'), bytesArg(seed, 'seed', 32));
}

/** Decodes a point as curve25519-dalek's decompress does (a y >= p is reduced, not refused);
 * null when it is not on the curve. */
function decodePoint(bytes) {
  try {
    return Point.fromBytes(bytes, true);
  } catch {
    return null;
  }
}

/**
 * Ed25519 verification with ed25519-dalek's `verify_strict` rules, so a body verifies here
 * exactly when it verifies in the Rust client: s below the group order, neither the key nor R
 * of small order, and R equal byte for byte to [s]B - [k]A (the cofactorless equation).
 */
export function verify(publicKey, message, signature) {
  if (publicKey.length !== 32 || signature.length !== 64) return false;
  const a = decodePoint(publicKey);
  const rBytes = signature.subarray(0, 32);
  const r = decodePoint(rBytes);
  if (a === null || r === null || a.isSmallOrder() || r.isSmallOrder()) return false;
  const s = bytesToBigLE(signature.subarray(32));
  if (s >= GROUP_ORDER) return false;
  const k = bytesToBigLE(sha512(concat(rBytes, publicKey, message))) % GROUP_ORDER;
  const expected = Point.BASE.multiplyUnsafe(s).subtract(a.multiplyUnsafe(k));
  return bytesEqual(expected.toBytes(), rBytes);
}

/** SHA-256("cellchat-web-login-v1" || challenge): what a web login binds in place of the TLS
 * session's exporter, which a browser cannot read. */
export function webBinding(challenge) {
  return sha256(concat(utf8('cellchat-web-login-v1'), bytesArg(challenge, 'challenge', 32)));
}

/** `"cellchat-login-v2" || challenge || binding || len32 cluster || len32 name`. */
export function loginMessage(challenge, binding, cluster, name) {
  const parts = [utf8('cellchat-login-v2'), bytesArg(challenge, 'challenge', 32)];
  parts.push(bytesArg(binding, 'binding', 32));
  for (const part of [utf8(cluster), utf8(name)]) parts.push(u32le(part.length), part);
  return concat(...parts);
}

// ---------------------------------------------------------------------------------------------
// Key files (identity.rs): plain hex, or `cellchat-key-v2` sealed under a passphrase

const KEY_MAGIC = 'cellchat-key-v2';
const KEY_FILE_BYTES_MAX = 4096;

function malformedKey(reason) {
  return new CryptoError('malformed', `key file is malformed (${reason})`);
}

/** Rust's `str::trim`: Unicode White_Space, which (unlike JS's `trim`) has U+0085 and not
 * U+FEFF. */
const RUST_SPACE =
  '[\\t\\n\\v\\f\\r \\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]';
const RUST_TRIM = new RegExp(`^${RUST_SPACE}+|${RUST_SPACE}+$`, 'g');
const rustTrim = (text) => text.replace(RUST_TRIM, '');

/** Rust's `str::lines`: split at "\n", drop one "\r" before it, no empty last line. */
function lines(text) {
  const out = text.split('\n');
  const last = out.pop();
  const trimmed = out.map((line) => (line.endsWith('\r') ? line.slice(0, -1) : line));
  if (last !== '') trimmed.push(last);
  return trimmed;
}

function numberField(text, prefix) {
  const digits = text.startsWith(prefix) ? text.slice(prefix.length) : '';
  const n = /^[0-9]+$/.test(digits) ? Number(digits) : NaN;
  if (!(n <= 0xffffffff)) throw malformedKey(`expected ${prefix}<number>, found "${text}"`);
  return n;
}

function hexField(text, prefix, len) {
  const bytes = text.startsWith(prefix) ? fromHex(text.slice(prefix.length)) : null;
  if (bytes === null || bytes.length !== len) {
    throw malformedKey(`expected ${prefix}<${2 * len} hex digits>`);
  }
  return bytes;
}

/** The parts of a protected file, in the order Rust checks them. */
function parseProtected(text) {
  const all = lines(text);
  const header = all.length > 0 ? all[0] : '';
  if (all.length < 2) throw malformedKey('no sealed key line');
  if (all.slice(2).some((line) => rustTrim(line) !== '')) {
    throw malformedKey('text after the sealed key line');
  }
  const fields = header.split(' ');
  if (fields.length !== 8) throw malformedKey(`header has ${fields.length} fields, not 8`);
  const [, kdf, m, t, p, salt, nonce, check] = fields;
  if (kdf !== 'argon2id') throw malformedKey(`unknown key derivation "${kdf}"`);
  const params = {
    memoryKib: numberField(m, 'm='),
    passes: numberField(t, 't='),
    lanes: numberField(p, 'p='),
  };
  const problem = paramsProblem(params);
  if (problem !== null) throw malformedKey(problem);
  return {
    header,
    params,
    salt: hexField(salt, 'salt=', 16),
    nonce: hexField(nonce, 'nonce=', 12),
    check: hexField(check, 'check=', 32),
    sealed: hexField(rustTrim(all[1]), '', 48),
  };
}

async function keyFileKeys(params, salt, cluster, name, passphrase, onProgress) {
  const saltInput = concat(utf8('cellchat/key/v2/'), salt, field(utf8(cluster)), field(utf8(name)));
  const master = await argon2(params, passphrase, saltInput, onProgress);
  return {
    key: hkdf32(master, 'cellchat v2 key file key'),
    check: hkdf32(master, 'cellchat v2 key file check'),
  };
}

/** The key file cannot move to another name or cluster, nor its header be edited. */
const keyFileAd = (cluster, name, header) =>
  concat(utf8(KEY_MAGIC), field(utf8(cluster)), field(utf8(name)), field(utf8(header)));

/**
 * Reads a key file as the CLI writes it (identities/<cluster>/<name>.key). `cluster` and
 * `name` matter only for a protected file, whose derivation and associated data bind them.
 */
export async function parseKeyFile(text, { cluster, name, passphrase, onProgress } = {}) {
  if (typeof text !== 'string' || utf8(text).length > KEY_FILE_BYTES_MAX) {
    throw malformedKey(`over ${KEY_FILE_BYTES_MAX} bytes`);
  }
  if (!text.startsWith(`${KEY_MAGIC} `)) {
    const seed = fromHex(rustTrim(text));
    if (seed === null || seed.length !== 32) throw malformedKey('it must hold 64 hex digits');
    return { ...identityFromSeed(seed), protected: false };
  }
  const file = parseProtected(text);
  if (typeof passphrase !== 'string' || passphrase === '') {
    throw new CryptoError('needs-passphrase', 'key file is protected by a passphrase');
  }
  if (typeof cluster !== 'string' || typeof name !== 'string') {
    throw new TypeError('a protected key file needs its cluster and name');
  }
  const keys = await keyFileKeys(file.params, file.salt, cluster, name, passphrase, onProgress);
  if (!bytesEqual(keys.check, file.check)) {
    throw new CryptoError('wrong-passphrase', 'wrong passphrase for this key file');
  }
  let seed;
  try {
    seed = gcm(keys.key, file.nonce, keyFileAd(cluster, name, file.header)).decrypt(file.sealed);
  } catch {
    seed = null;
  }
  if (seed === null || seed.length !== 32) {
    throw new CryptoError('tampered', 'key file was changed or belongs to another name or cluster');
  }
  return { ...identityFromSeed(seed), protected: true };
}

/** The text of a key file holding `seed`: plain without a passphrase, else protected. */
export async function exportKeyFile(seed, { cluster, name, passphrase, params, onProgress } = {}) {
  bytesArg(seed, 'seed', 32);
  if (passphrase === undefined || passphrase === null) return `${toHex(seed)}\n`;
  if (typeof cluster !== 'string' || typeof name !== 'string') {
    throw new TypeError('a protected key file needs its cluster and name');
  }
  const p = params ?? ARGON2_V2_DEFAULT;
  const problem = paramsProblem(p);
  if (problem !== null) {
    throw new CryptoError('bad-params', `argon2id parameters refused: ${problem}`);
  }
  const salt = randomBytes(16);
  const nonce = randomBytes(12);
  const keys = await keyFileKeys(p, salt, cluster, name, passphrase, onProgress);
  const header =
    `${KEY_MAGIC} argon2id m=${p.memoryKib} t=${p.passes} p=${p.lanes} ` +
    `salt=${toHex(salt)} nonce=${toHex(nonce)} check=${toHex(keys.check)}`;
  const sealed = gcm(keys.key, nonce, keyFileAd(cluster, name, header)).encrypt(seed);
  return `${header}\n${toHex(sealed)}\n`;
}

// ---------------------------------------------------------------------------------------------
// Channel keys and the v2 channel record (crates/client/src/crypto/record.rs)

// Key bytes live here, not on the key objects, so logging or serializing a key shows no secret.
const keyBytes = new WeakMap();

function channelKey(version, bytes, cluster, channel) {
  const key = Object.freeze({ version, cluster, channel });
  keyBytes.set(key, bytes);
  return key;
}

const RECORD_VERSION_V2 = 0x02;
const RECORD_LEN_V2 = 61;

function badRecord(reason) {
  return new CryptoError('bad-record', `unusable channel crypto record: ${reason}`);
}

/** The record's parameters, salt and key check, refused before any memory is spent when its
 * length, version or parameters are wrong. */
function decodeRecord(record) {
  bytesArg(record, 'record');
  if (record.length === 0) throw badRecord(`record is 0 bytes, a v2 record is ${RECORD_LEN_V2}`);
  if (record[0] !== RECORD_VERSION_V2) {
    throw badRecord(`record version ${record[0]} is unknown to this build (it reads version 2)`);
  }
  if (record.length !== RECORD_LEN_V2) {
    throw badRecord(`record is ${record.length} bytes, a v2 record is ${RECORD_LEN_V2}`);
  }
  const view = new DataView(record.buffer, record.byteOffset, record.length);
  const params = {
    memoryKib: view.getUint32(1, true),
    passes: view.getUint32(5, true),
    lanes: view.getUint32(9, true),
  };
  const problem = paramsProblem(params);
  if (problem !== null) throw badRecord(`argon2id parameters refused: ${problem}`);
  return { params, salt: record.slice(13, 29), keyCheck: record.slice(29, 61) };
}

/** The message key and key check of a passphrase. Cluster and channel are in the Argon2 salt,
 * so a record copied to another channel or cluster fails its key check there. */
async function deriveChannel(params, salt, passphrase, cluster, channel, onProgress) {
  const saltInput = concat(utf8('cellchat/v2/'), salt, field(utf8(cluster)), field(utf8(channel)));
  const master = await argon2(params, passphrase, saltInput, onProgress);
  return {
    messageKey: hkdf32(master, 'cellchat v2 channel message key'),
    keyCheck: hkdf32(master, 'cellchat v2 channel key check'),
  };
}

/** A new v2 key for `channel` of `cluster` and the record to store with the channel. */
export async function makeChannelRecord(passphrase, { cluster, channel, params, onProgress }) {
  const p = params ?? ARGON2_V2_DEFAULT;
  const problem = paramsProblem(p);
  if (problem !== null) throw badRecord(`argon2id parameters refused: ${problem}`);
  // A fresh salt per channel key: the same passphrase set again gives a new key.
  const salt = randomBytes(16);
  const derived = await deriveChannel(p, salt, passphrase, cluster, channel, onProgress);
  const record = concat(
    Uint8Array.of(RECORD_VERSION_V2),
    u32le(p.memoryKib),
    u32le(p.passes),
    u32le(p.lanes),
    salt,
    derived.keyCheck,
  );
  return { key: channelKey(2, derived.messageKey, cluster, channel), record };
}

/** The v2 key of `channel` of `cluster` unlocked from its record with `passphrase`. */
export async function unlockChannel(record, passphrase, { cluster, channel, onProgress }) {
  const { params, salt, keyCheck } = decodeRecord(record);
  const derived = await deriveChannel(params, salt, passphrase, cluster, channel, onProgress);
  if (!bytesEqual(derived.keyCheck, keyCheck)) {
    throw new CryptoError('wrong-passphrase', 'wrong passphrase for this channel');
  }
  return channelKey(2, derived.messageKey, cluster, channel);
}

/** The legacy v1 key of `channel` (opens 0x01 bodies only): Argon2id 19 MiB, 2 passes, salt
 * `"cellchat/v1/" || cluster || "/" || channel`. */
export async function deriveV1Key(passphrase, { cluster, channel, onProgress }) {
  const salt = utf8(`cellchat/v1/${cluster}/${channel}`);
  const key = await argon2(ARGON2_V1, passphrase, salt, onProgress);
  return channelKey(1, key, cluster, channel);
}

// ---------------------------------------------------------------------------------------------
// Message bodies (crates/client/src/crypto/body.rs; layouts in crypto.rs's module doc)

const FORMAT_PLAINTEXT = 0x00;
const FORMAT_AES_GCM_V1 = 0x01;
const FORMAT_SIGNED_V2 = 0x02;
const FORMAT_ENCRYPTED_V2 = 0x03;
const BODY_BYTES_MAX = 16 * 1024;
const SESSION_LEN = 16;
const NONCE_LEN = 12;
const TAG_LEN = 16;
const SIGNATURE_LEN = 64;
const PADDED_LEN_MAX = BODY_BYTES_MAX - (1 + SESSION_LEN + NONCE_LEN + TAG_LEN + SIGNATURE_LEN);
/** The sizes a 0x03 plaintext is padded to; readers refuse any other size. */
const PAD_BUCKETS = [64, 128, 256, 512, 1024, 2048, 4096, 8192, PADDED_LEN_MAX];
export const TEXT_BYTES_MAX_ENCRYPTED = PADDED_LEN_MAX - 2;
export const TEXT_BYTES_MAX_SIGNED = BODY_BYTES_MAX - (1 + SESSION_LEN + SIGNATURE_LEN);
const SIGNED_LEN_MIN = 1 + SESSION_LEN + SIGNATURE_LEN;
const ENCRYPTED_LEN_MIN = 1 + SESSION_LEN + NONCE_LEN + TAG_LEN + SIGNATURE_LEN;

/** Whether a body of this first byte is encrypted (0x01 or 0x03). */
export const isEncryptedFormat = (format) =>
  format === FORMAT_AES_GCM_V1 || format === FORMAT_ENCRYPTED_V2;

/** SHA-256("cellchat session v2" || clientId)[..16]: ties a body to its sender's client
 * session without telling other readers the client id. */
export function sessionOf(clientId) {
  bytesArg(clientId, 'clientId', 16);
  return sha256(concat(utf8('cellchat session v2'), clientId)).slice(0, SESSION_LEN);
}

function seqArg(value, what) {
  const n = typeof value === 'bigint' ? value : Number.isSafeInteger(value) ? BigInt(value) : -1n;
  if (n < 0n || n > U64_MAX) throw new RangeError(`${what} must be a u64, not ${value}`);
  return n;
}

/**
 * The channel as a v2 body binds it: the name, then for a relation a NUL byte and the relation
 * in words (`general\0edit 5`, `general\0react 5 + 👍`), so a node can neither move a signed
 * edit, delete or reaction to another message nor change its kind.
 */
export function boundChannel(channel, relation) {
  if (relation === null || relation === undefined) return channel;
  if (relation.reply) return `${channel}\0reply ${seqArg(relation.reply.to, 'reply.to')}`;
  if (relation.edit) return `${channel}\0edit ${seqArg(relation.edit.of, 'edit.of')}`;
  if (relation.delete) return `${channel}\0delete ${seqArg(relation.delete.of, 'delete.of')}`;
  if (relation.react) {
    const { to, emoji, on } = relation.react;
    return `${channel}\0react ${seqArg(to, 'react.to')} ${on ? '+' : '-'} ${emoji}`;
  }
  throw new TypeError(`unknown relation ${JSON.stringify(relation)}`);
}

function adV2(cluster, bound, sender, session, clientSeq) {
  return concat(
    utf8('cellchat-body-v2'),
    field(utf8(cluster)),
    field(utf8(bound)),
    field(utf8(sender)),
    session,
    u64le(clientSeq),
  );
}

/** What a v2 signature covers: the context the body cannot carry, then the body so far. */
function signedMessage(cluster, bound, sender, session, clientSeq, signedBody) {
  return concat(
    utf8('cellchat-signature-v2'),
    field(utf8(cluster)),
    field(utf8(bound)),
    field(utf8(sender)),
    session,
    u64le(clientSeq),
    field(signedBody),
  );
}

function tooLong(len, max) {
  return new CryptoError('too-long', `message is ${len} bytes, over the limit of ${max}`);
}

/** `len (u16 LE) || text || zeros`, as long as the smallest bucket that holds it. */
function pad(text) {
  const bytes = utf8(text);
  const bucket = PAD_BUCKETS.find((size) => size >= 2 + bytes.length);
  if (bucket === undefined) throw tooLong(bytes.length, TEXT_BYTES_MAX_ENCRYPTED);
  const padded = new Uint8Array(bucket);
  padded[0] = bytes.length & 0xff;
  padded[1] = bytes.length >> 8;
  padded.set(bytes, 2);
  return padded;
}

/** The inverse of pad: a bucket size, a length that fits, zeros after, UTF-8 text. */
function unpad(padded) {
  if (!PAD_BUCKETS.includes(padded.length)) return { reason: 'bad-padding' };
  const len = padded[0] | (padded[1] << 8);
  if (2 + len > padded.length) return { reason: 'bad-padding' };
  if (padded.subarray(2 + len).some((b) => b !== 0)) return { reason: 'bad-padding' };
  const text = fromUtf8(padded.subarray(2, 2 + len));
  return text === null ? { reason: 'not-utf8' } : { text };
}

function withSignature(body, seed, cluster, bound, sender, session, clientSeq) {
  const message = signedMessage(cluster, bound, sender, session, clientSeq, body);
  return concat(body, sign(seed, message));
}

/** A signed plaintext 0x02 body: anyone reads it, nobody without `seed` forges it. */
export function signPlain({ seed, sender, cluster, channel, relation, clientId, clientSeq, text }) {
  const seq = seqArg(clientSeq, 'clientSeq');
  const bound = boundChannel(channel, relation);
  const bytes = utf8(text);
  if (bytes.length > TEXT_BYTES_MAX_SIGNED) throw tooLong(bytes.length, TEXT_BYTES_MAX_SIGNED);
  const session = sessionOf(clientId);
  const body = concat(Uint8Array.of(FORMAT_SIGNED_V2), session, bytes);
  return withSignature(body, seed, cluster, bound, sender, session, seq);
}

/** A signed, padded, AES-256-GCM 0x03 body under a v2 channel key of this cluster and channel. */
export function sealV2(args) {
  const { key, seed, sender, cluster, channel, relation, clientId, clientSeq, text } = args;
  const seq = seqArg(clientSeq, 'clientSeq');
  if (key?.version !== 2 || !keyBytes.has(key)) throw new TypeError('key must be a v2 channel key');
  if (key.cluster !== cluster || key.channel !== channel) {
    throw new CryptoError(
      'key-mismatch',
      `the key given is for channel "${key.channel}" of cluster "${key.cluster}"`,
    );
  }
  const padded = pad(text);
  const bound = boundChannel(channel, relation);
  const session = sessionOf(clientId);
  // 96 random bits per message: a repeat stays negligible far past what one key will see.
  const nonce = randomBytes(NONCE_LEN);
  const ad = adV2(cluster, bound, sender, session, seq);
  const sealed = gcm(keyBytes.get(key), nonce, ad).encrypt(padded);
  const body = concat(Uint8Array.of(FORMAT_ENCRYPTED_V2), session, nonce, sealed);
  const signed = withSignature(body, seed, cluster, bound, sender, session, seq);
  if (signed.length > BODY_BYTES_MAX) throw new Error('padding keeps bodies in bounds');
  return signed;
}

const PLACEHOLDERS = {
  'no-key': '[encrypted]',
  'wrong-key': '[encrypted: wrong key?]',
};

/** The summary status, the order mattering: a failed signature is shown as forged whatever the
 * content; then unreadable content; then who wrote it. */
function opened(content, author, encrypted, session) {
  let status;
  if (author === 'bad-signature') status = 'forged';
  else if (content.text === undefined) status = 'unreadable';
  else if (author === 'verified') status = 'verified';
  else if (author === 'unknown-sender') status = 'unverified';
  else status = encrypted ? 'unsigned' : 'plaintext';
  const text = content.text ?? null;
  let display = text;
  if (text === null) {
    display = content.reason === 'unknown-version'
      ? `[unknown format 0x${content.format.toString(16).padStart(2, '0')}]`
      : PLACEHOLDERS[content.reason] ?? '[unreadable message]';
  }
  return { status, reason: content.reason ?? null, text, display, author, encrypted, session };
}

/** A legacy 0x01 body: nonce (12) then AES-GCM with the v1 associated data (u32 lengths). */
function openV1(key, channel, sender, clientSeq, body) {
  if (!key || key.version !== 1 || key.channel !== channel) return { reason: 'no-key' };
  const rest = body.subarray(1);
  if (rest.length < NONCE_LEN) return { reason: 'wrong-key' };
  const parts = [utf8('cellchat-body-v1')];
  for (const part of [utf8(channel), utf8(sender)]) parts.push(u32le(part.length), part);
  parts.push(u64le(clientSeq));
  try {
    const plain = gcm(keyBytes.get(key), rest.subarray(0, NONCE_LEN), concat(...parts)).decrypt(
      rest.subarray(NONCE_LEN),
    );
    const text = fromUtf8(plain);
    return text === null ? { reason: 'wrong-key' } : { text };
  } catch {
    return { reason: 'wrong-key' };
  }
}

function decryptV2(key, cx, session, rest) {
  if (!key || key.version !== 2 || key.cluster !== cx.cluster || key.channel !== cx.channel) {
    return { reason: 'no-key' };
  }
  const ad = adV2(cx.cluster, cx.bound, cx.sender, session, cx.clientSeq);
  let padded;
  try {
    padded = gcm(keyBytes.get(key), rest.subarray(0, NONCE_LEN), ad).decrypt(
      rest.subarray(NONCE_LEN),
    );
  } catch {
    return { reason: 'wrong-key' };
  }
  return unpad(padded);
}

function openV2(keys, cx, senderKey, body) {
  const encrypted = body[0] === FORMAT_ENCRYPTED_V2;
  if (body.length < (encrypted ? ENCRYPTED_LEN_MIN : SIGNED_LEN_MIN)) {
    return opened({ reason: 'too-short' }, 'unsigned', encrypted, null);
  }
  const signed = body.subarray(0, body.length - SIGNATURE_LEN);
  const signature = body.subarray(body.length - SIGNATURE_LEN);
  const session = signed.slice(1, 1 + SESSION_LEN);
  let author = 'unknown-sender';
  if (senderKey) {
    const message = signedMessage(cx.cluster, cx.bound, cx.sender, session, cx.clientSeq, signed);
    author = verify(senderKey, message, signature) ? 'verified' : 'bad-signature';
  }
  const rest = signed.subarray(1 + SESSION_LEN);
  let content;
  if (encrypted) {
    content = decryptV2(keys.v2, cx, session, rest);
  } else {
    const text = fromUtf8(rest);
    content = text === null ? { reason: 'not-utf8' } : { text };
  }
  return opened(content, author, encrypted, session);
}

/**
 * Reads any body of `channel` in `cluster` from `sender` with `clientSeq` (both as the node
 * stamped them), carrying `relation` as the node says: checks a v2 signature under `senderKey`
 * (the key pinned for the sender, or null) and decrypts with the matching key of `keys`.
 * Never throws on any body bytes.
 */
export function openMessage(args) {
  const { cluster, channel, relation, sender, clientSeq, senderKey, body } = args;
  const keys = args.keys ?? {};
  bytesArg(body, 'body');
  const seq = seqArg(clientSeq, 'clientSeq');
  if (body.length === 0) return opened({ reason: 'empty' }, 'unsigned', false, null);
  const format = body[0];
  if (format === FORMAT_PLAINTEXT) {
    const text = fromUtf8(body.subarray(1));
    return opened(text === null ? { reason: 'not-utf8' } : { text }, 'unsigned', false, null);
  }
  if (format === FORMAT_AES_GCM_V1) {
    return opened(openV1(keys.v1, channel, sender, seq, body), 'unsigned', true, null);
  }
  if (format === FORMAT_SIGNED_V2 || format === FORMAT_ENCRYPTED_V2) {
    const bound = boundChannel(channel, relation);
    const cx = { cluster, channel, bound, sender, clientSeq: seq };
    return openV2(keys, cx, senderKey ?? null, body);
  }
  return opened({ reason: 'unknown-version', format }, 'unsigned', false, null);
}

/**
 * The marks the CLI prints before a line, in its order: `[forged?]`, `[replayed]` (when the
 * caller saw this sender, session and client seq at another channel seq), `[unverified]`,
 * `[unsigned]`, `[plaintext]` (readable plaintext in a channel with encrypted history).
 */
export function markers(message, { encryptedHistory = false, replayed = false } = {}) {
  const out = [];
  if (message.author === 'bad-signature') out.push('[forged?]');
  if (replayed) out.push('[replayed]');
  if (message.text !== null) {
    if (message.author === 'unknown-sender') out.push('[unverified]');
    if (message.author === 'unsigned') out.push('[unsigned]');
    if (encryptedHistory && !message.encrypted) out.push('[plaintext]');
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Direct conversations (crates/client/src/crypto/direct.rs, proto::direct_channel_name)

const DIRECT_RECORD_VERSION = 0x03;
const DIRECT_MEMBERS_MAX = 8;
const WRAP_LEN = 32 + 16;

/** A user name as the state machine accepts it: 1..=32 bytes of `A-Za-z0-9_-`. */
export const validUserName = (name) => /^[A-Za-z0-9_-]{1,32}$/.test(name);

/** `dm-` and the first 20 bytes, in hex, of SHA-256 over a domain tag and each distinct name,
 * sorted (by bytes) and length-prefixed. */
export function directChannelName(members) {
  const names = [...new Set(members)].sort(compareUtf8);
  const parts = [utf8('cellchat direct channel v1')];
  for (const name of names) parts.push(field(utf8(name)));
  return `dm-${toHex(sha256(concat(...parts)).subarray(0, 20))}`;
}

const DIRECT_MESSAGES = {
  'wrong-members': 'the direct conversation\'s record names other members than its channel name',
  'not-a-member': 'you are not a member of this direct conversation',
  unwrap: 'the direct conversation\'s key was not sealed to your identity key',
};

function directError(kind, detail) {
  if (kind === 'malformed') {
    return new CryptoError(kind, `the direct conversation's record is malformed (${detail})`);
  }
  if (kind === 'bad-signature') {
    const message = `the direct conversation's record is not signed by ${detail}'s pinned key`;
    return new CryptoError(kind, message);
  }
  if (kind === 'bad-member-key') {
    const message = `${detail}'s registered key cannot receive a direct conversation key`;
    return new CryptoError(kind, message);
  }
  return new CryptoError(kind, DIRECT_MESSAGES[kind]);
}

function parseDirect(bytes) {
  bytesArg(bytes, 'record');
  const bad = (why) => directError('malformed', why);
  if (bytes.length < 3) throw bad('too short');
  if (bytes[0] !== DIRECT_RECORD_VERSION) throw bad('unknown version');
  const [count, creator] = [bytes[1], bytes[2]];
  if (count < 2 || count > DIRECT_MEMBERS_MAX || creator >= count) throw bad('member count');
  let at = 3;
  const members = [];
  for (let i = 0; i < count; i++) {
    if (at >= bytes.length) throw bad('truncated names');
    const len = bytes[at];
    if (at + 1 + len > bytes.length) throw bad('truncated names');
    const name = fromUtf8(bytes.subarray(at + 1, at + 1 + len));
    if (name === null) throw bad('a name is not UTF-8');
    if (!validUserName(name)) throw bad('a name is not a user name');
    if (members.length > 0 && compareUtf8(members[members.length - 1], name) >= 0) {
      throw bad('names not sorted and distinct');
    }
    members.push(name);
    at += 1 + len;
  }
  const headerLen = at + 32;
  const wrapsEnd = headerLen + count * WRAP_LEN;
  if (bytes.length !== wrapsEnd + SIGNATURE_LEN) throw bad('length');
  return {
    members,
    creator,
    header: bytes.subarray(0, headerLen),
    ephemeral: bytes.subarray(headerLen - 32, headerLen),
    wraps: bytes.subarray(headerLen, wrapsEnd),
    signed: bytes.subarray(0, wrapsEnd),
    signature: bytes.subarray(wrapsEnd),
  };
}

/** The members a direct record names, sorted, without checking anything else. */
export function directMembers(record) {
  return parseDirect(record).members;
}

const directSigned = (cluster, channel, signed) =>
  concat(utf8('cellchat-direct-record-v1'), field(utf8(cluster)), field(utf8(channel)), signed);

const wrapAad = (cluster, channel, header) =>
  concat(field(utf8(cluster)), field(utf8(channel)), header);

/** Wrap i's key: HKDF(X25519 shared, "cellchat direct wrap v1" || E || identity_i || i). */
function wrapKey(shared, ephemeral, identity, index) {
  const info = concat(utf8('cellchat direct wrap v1'), ephemeral, identity, Uint8Array.of(index));
  return hkdf(sha256, shared, undefined, info, 32);
}

/** The Montgomery u of an Ed25519 public key, (1 + y) / (1 - y); null for a key that is not a
 * point or has small order (a DH with it would protect nothing). */
function montgomery(identity) {
  const valid = identity instanceof Uint8Array && identity.length === 32;
  const point = valid ? decodePoint(identity) : null;
  if (point === null || point.isSmallOrder()) return null;
  const Fp = Point.Fp;
  const { y } = point.toAffine();
  return Fp.toBytes(Fp.div(Fp.add(Fp.ONE, y), Fp.sub(Fp.ONE, y)));
}

const directKey = (secret, cluster, channel) =>
  channelKey(2, hkdf32(secret, 'cellchat direct message key v1'), cluster, channel);

/**
 * The record of the direct conversation `channel` between `members` ({name, publicKey}, the
 * creator among them) with a fresh channel secret wrapped to each member's identity key, and
 * signed by `seed` (the creator's key).
 */
export function createDirect({ seed, creator, cluster, channel, members }) {
  // Sorted by name; of two entries with one name, the first given stays (Rust's dedup_by).
  const sorted = members
    .map((m, i) => ({ ...m, i }))
    .sort((a, b) => compareUtf8(a.name, b.name) || a.i - b.i)
    .filter((m, i, all) => i === 0 || all[i - 1].name !== m.name);
  if (sorted.length < 2 || sorted.length > DIRECT_MEMBERS_MAX) {
    throw directError('malformed', 'member count');
  }
  if (sorted.some((m) => !validUserName(m.name))) {
    throw directError('malformed', 'a name is not a user name');
  }
  const names = sorted.map((m) => m.name);
  const creatorIndex = names.indexOf(creator);
  if (creatorIndex < 0 || directChannelName(names) !== channel) throw directError('wrong-members');
  const points = sorted.map((m) => {
    const u = montgomery(m.publicKey);
    if (u === null) throw directError('bad-member-key', m.name);
    return u;
  });
  // A fresh ephemeral key per record: every wrap key then seals once, so a zero nonce is safe.
  const ephemeralSecret = randomBytes(32);
  const ephemeral = x25519.getPublicKey(ephemeralSecret);
  const secret = randomBytes(32);
  const header = [DIRECT_RECORD_VERSION, names.length, creatorIndex];
  for (const name of names) header.push(name.length, ...utf8(name));
  const headerBytes = concat(Uint8Array.from(header), ephemeral);
  const aad = wrapAad(cluster, channel, headerBytes);
  const wraps = sorted.map((m, index) => {
    const shared = x25519.getSharedSecret(ephemeralSecret, points[index]);
    const key = wrapKey(shared, ephemeral, m.publicKey, index);
    return gcm(key, new Uint8Array(12), aad).encrypt(secret);
  });
  const signed = concat(headerBytes, ...wraps);
  const record = concat(signed, sign(seed, directSigned(cluster, channel, signed)));
  return { key: directKey(secret, cluster, channel), record };
}

/**
 * Opens the record of the direct conversation `channel` as `reader` (whose key is `seed`):
 * checks the members against the channel name and the creator's signature under
 * `creatorKey(name)` (the key the reader pinned for them), then unseals the reader's wrap.
 */
export function openDirect({ seed, reader, cluster, channel, record, creatorKey }) {
  const parsed = parseDirect(record);
  if (directChannelName(parsed.members) !== channel) throw directError('wrong-members');
  const index = parsed.members.indexOf(reader);
  if (index < 0) throw directError('not-a-member');
  const creator = parsed.members[parsed.creator];
  const pinned = creatorKey(creator);
  const message = directSigned(cluster, channel, parsed.signed);
  if (!(pinned instanceof Uint8Array) || !verify(pinned, message, parsed.signature)) {
    throw directError('bad-signature', creator);
  }
  let secret;
  try {
    // X25519 with the clamped scalar Ed25519 signs with; noble refuses a small-order E, whose
    // shared secret Rust finds all-zero and refuses the same way.
    const shared = x25519.getSharedSecret(ed25519.utils.toMontgomerySecret(seed), parsed.ephemeral);
    const wrap = parsed.wraps.subarray(index * WRAP_LEN, (index + 1) * WRAP_LEN);
    const own = ed25519.getPublicKey(seed);
    const aad = wrapAad(cluster, channel, parsed.header);
    const key = wrapKey(shared, parsed.ephemeral, own, index);
    secret = gcm(key, new Uint8Array(12), aad).decrypt(wrap);
  } catch {
    throw directError('unwrap');
  }
  return directKey(secret, cluster, channel);
}
