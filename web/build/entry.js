// The one entry point of web/static/vendor/noble.js: exactly what web/static/js/crypto.js
// imports, so esbuild can drop the rest of the noble libraries from the bundle.
export { ed25519, x25519 } from '@noble/curves/ed25519.js';
export { sha256, sha512 } from '@noble/hashes/sha2.js';
export { hkdf } from '@noble/hashes/hkdf.js';
export { argon2idAsync } from '@noble/hashes/argon2.js';
export { gcm } from '@noble/ciphers/aes.js';
export { randomBytes } from '@noble/hashes/utils.js';
