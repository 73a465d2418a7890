#!/bin/sh
# Bundles entry.js (the noble crypto libraries, versions pinned in package-lock.json) into one
# minified ES module, web/static/vendor/noble.js, which the server compiles in and serves.
# Needs node and npm only here; the browser loads the output with no build step of its own.
set -eu
cd "$(dirname "$0")"
# `npm ci` installs exactly the lock file's versions and fails if package.json disagrees.
npm ci --no-audit --no-fund
versions=$(node -p '["curves", "hashes", "ciphers"].map((n) =>
  `@noble/${n} ${require(`./node_modules/@noble/${n}/package.json`).version}`).join(", ")')
mkdir -p ../static/vendor
npx --no-install esbuild entry.js --bundle --format=esm --minify --target=es2020 \
  --legal-comments=eof --banner:js="// Built by web/build/build.sh from ${versions} (MIT)." \
  --outfile=../static/vendor/noble.js
# The bundle is the only output; `npm ci` starts from an empty node_modules anyway, so leave
# nothing untracked in the tree.
rm -rf node_modules
