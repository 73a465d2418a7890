// The crypto vectors in Chromium: serves web/static and web/build/check_vectors.mjs from
// loopback, runs checkVectors(crypto, vectors) inside a page (Rust-made vectors opened by the
// browser's crypto.js), then makeJsSamples(crypto, vectors) there and writes them to OUT for
// `web_vectors --verify OUT` (tests/web.rs runs both).
//
//   node tests/web/vectors.mjs VECTORS.json OUT.json
//
// Exit 0: every check passed and OUT was written; 1: a check failed; 2: usage.

import fs from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { launch, newUser, serveStatic, within } from './browser.mjs';

const root = fileURLToPath(new URL('../../', import.meta.url));

async function main([vectorsFile, outFile]) {
  if (!vectorsFile || !outFile) {
    console.error('usage: node tests/web/vectors.mjs VECTORS.json OUT.json');
    return 2;
  }
  const vectors = JSON.parse(await fs.readFile(vectorsFile, 'utf8'));
  const { server, url } = await serveStatic({
    '/check_vectors.mjs': `${root}web/build/check_vectors.mjs`,
    // A page of the same origin with nothing of the app in it: only the modules under test.
    '/blank.html': { type: 'text/html; charset=utf-8', text: '<!doctype html><link rel="icon" href="data:,"><title>vectors</title>' },
    '/': `${root}web/static`,
  });
  const browser = await launch();
  try {
    const page = await newUser(browser, 'vectors');
    await page.goto(`${url}/blank.html`);
    const checked = await within(120_000, 'checkVectors in the page', page.evaluate(async (vectors) => {
      const crypto = await import('/js/crypto.js');
      const { checkVectors } = await import('/check_vectors.mjs');
      const started = performance.now();
      const result = await checkVectors(crypto, vectors);
      return { ...result, ms: Math.round(performance.now() - started), agent: navigator.userAgent };
    }, vectors));
    for (const failure of checked.failures) console.log(`FAIL ${failure}`);
    console.log(`in Chromium (${checked.agent}): ${checked.passed} checks passed, ${checked.failures.length} failed, in ${checked.ms} ms`);
    const samples = await within(120_000, 'makeJsSamples in the page', page.evaluate(async (vectors) => {
      const crypto = await import('/js/crypto.js');
      const { makeJsSamples } = await import('/check_vectors.mjs');
      return makeJsSamples(crypto, vectors);
    }, vectors));
    await fs.writeFile(outFile, `${JSON.stringify(samples, null, 1)}\n`);
    console.log(`wrote ${samples.bodies.length} bodies and more to ${outFile}`);
    if (page.errors.length) {
      console.log(`FAIL page errors: ${page.errors.join('; ')}`);
      return 1;
    }
    return checked.failures.length === 0 && checked.passed > 0 ? 0 : 1;
  } finally {
    await browser.close().catch(() => {});
    server.close();
  }
}

process.exitCode = await main(process.argv.slice(2)).catch((e) => {
  console.error(`FAIL ${e.stack || e}`);
  return 1;
});
