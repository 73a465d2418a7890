// Debian's Chromium driven by playwright-core (which downloads no browser of its own), and
// small helpers the browser tests share: a static file server on loopback, bounded waits,
// and one browser context per user (each with its own localStorage).

import http from 'node:http';
import fs from 'node:fs/promises';
import path from 'node:path';
import { chromium } from 'playwright-core';

/** Where Debian's `chromium` package puts the browser (.ci/run installs it). */
export const CHROMIUM = process.env.CELLCHAT_CHROMIUM || '/usr/bin/chromium';

/** Every test page is this size, screenshots too. */
export const VIEWPORT = { width: 1280, height: 800 };

/** Launches headless Chromium; nothing in it reaches past loopback on its own. */
export async function launch() {
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    timeout: 60_000,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
}

/**
 * A page in a context of its own (a browser user: own localStorage), with the page's console
 * errors and uncaught exceptions echoed on stderr under `label` and kept in `page.errors`.
 */
export async function newUser(browser, label) {
  const context = await browser.newContext({ viewport: VIEWPORT });
  context.setDefaultTimeout(20_000);
  const page = await context.newPage();
  page.errors = [];
  page.on('pageerror', (e) => {
    page.errors.push(String(e));
    console.error(`[${label}] page error: ${e.stack || e}`);
  });
  page.on('console', (m) => {
    if (m.type() === 'error') console.error(`[${label}] console: ${m.text()}`);
  });
  return page;
}

const MIME = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.json': 'application/json',
  '.png': 'image/png',
  '.svg': 'image/svg+xml',
};

/**
 * Serves `routes` on 127.0.0.1 at a free port; resolves to {server, url}. A route maps a URL
 * path to a file, a path ending in `/` to a directory, or a path to `{type, text}` to serve
 * as it is. Paths that climb out of their directory are refused.
 */
export async function serveStatic(routes) {
  const server = http.createServer(async (req, res) => {
    const urlPath = decodeURIComponent(new URL(req.url, 'http://x').pathname);
    for (const [prefix, target] of Object.entries(routes)) {
      if (urlPath !== prefix && !(prefix.endsWith('/') && urlPath.startsWith(prefix))) continue;
      if (typeof target === 'object') {
        res.writeHead(200, { 'content-type': target.type, 'cache-control': 'no-store' });
        res.end(target.text);
        return;
      }
      const file = prefix.endsWith('/') ? path.join(target, urlPath.slice(prefix.length) || 'index.html') : target;
      if (prefix.endsWith('/') && !file.startsWith(path.resolve(target) + path.sep)) break;
      try {
        const body = await fs.readFile(file);
        res.writeHead(200, {
          'content-type': MIME[path.extname(file)] || 'application/octet-stream',
          'cache-control': 'no-store',
        });
        res.end(body);
      } catch {
        break;
      }
      return;
    }
    res.writeHead(404, { 'content-type': 'text/plain' });
    res.end('not found');
  });
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  return { server, url: `http://127.0.0.1:${server.address().port}` };
}

/** Rejects after `ms` with `what` unless `promise` settles first. */
export function within(ms, what, promise) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * Polls `probe` (async, returns a truthy value when done) every `every` ms until `ms` passed;
 * resolves to the value, or rejects naming `what` and the last value `describe` gives.
 */
export async function until(ms, what, probe, { every = 100, describe } = {}) {
  const deadline = Date.now() + ms;
  let last;
  for (let round = 0; round < 1_000_000; round++) {
    last = await probe();
    if (last) return last;
    if (Date.now() > deadline) break;
    await sleep(every);
  }
  const seen = describe ? await describe().catch((e) => `(${e.message})`) : JSON.stringify(last);
  throw new Error(`timed out after ${ms} ms: ${what}; last: ${seen}`);
}
