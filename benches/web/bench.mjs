// The web client against the issue's targets, on a running local cluster (run.sh starts one):
//
//   1. page load: a returning user (identity already in the browser's storage) opens a node's
//      URL with `#channel=NAME` of a channel holding 50 messages; time from navigation start to
//      the messages in the DOM, and to the frame after (on screen). Target: p99 at most 1 s.
//   2. send to delivery: page A puts a message into `#input` and presses Enter there (a keydown
//      its own handler takes: the page's signing and send path) at a steady rate; page B, in
//      another browser context, records when each one enters its DOM. Both clocks are
//      `performance.timeOrigin + performance.now()` on one machine. Twice: A on the leader's
//      node and on a follower's. Then, against the same cluster and in the same round, two
//      WebSocket clients in this process (the page's protocol and crypto.js, no browser), and
//      the load harness's `fanout` with one publisher and one subscriber at the same rate: the
//      terminal clients' send to delivery through the Rust client library.
//      Target: the browser's p99 within 2 ms of the terminal clients'.
//      After the timed rounds, one untimed browser round under Chrome's tracing says where the
//      pages' time goes.
//   3. page assets: every file under web/static, raw, gzip -9 and brotli, and what the node
//      sends when asked for gzip and br. Target: at most 300 KiB compressed.
//
//   node benches/web/bench.mjs --web URL,URL,URL --cluster NAME --discovery-port P \
//        --bench PATH/bench --out DIR [--pids PID,PID,PID] [--metrics HOST:PORT,...] \
//        [--rounds 2] [--loads 20] [--messages 300] [--rate 20]
//
// --pids and --metrics (each node's, in --web order) add the nodes' CPU and their own timings
// (send RPC, fdatasync, apply) per phase to the report.
//
// Prints a Markdown report on stdout; every sample goes to DIR/web-bench.json. Progress notes
// go to stderr. Every wait is bounded; the only processes it starts are the browser (closed at
// the end) and the harness (killed by its pid if it overruns).

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import zlib from 'node:zlib';
import { chromium } from '../../tests/web/node_modules/playwright-core/index.mjs';
import WebSocket from '../../tests/web/node_modules/ws/wrapper.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, '../..');
const STATIC = path.join(ROOT, 'web/static');
const CHROMIUM = process.env.CELLCHAT_CHROMIUM || '/usr/bin/chromium';
const CHROMIUM_ARGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];
const VIEWPORT = { width: 1280, height: 800 };
/** Messages in the page-load channel: the page's first history page (PAGE in app.js). */
const LOAD_MESSAGES = 50;
/** Bytes of each timed message's text, as the harness's bodies (`--body` 100). */
const TEXT_BYTES = 100;
/** Sends before the timed ones, not counted (the harness has its own 2 s warm-up). */
const WARMUP_SENDS = 20;
const TARGET_LOAD_MS = 1000;
const TARGET_P99_GAP_MS = 2;
const TARGET_ASSETS_KIB = 300;

// ------------------------------------------------------------------------------------------
// Arguments and small helpers

function parseArgs(argv) {
  const opts = { rounds: 2, loads: 20, messages: 300, rate: 20, pids: [], metrics: [] };
  for (let i = 0; i < argv.length; i += 2) {
    const [key, value] = [argv[i], argv[i + 1]];
    if (value === undefined) throw new Error(`${key} needs a value`);
    switch (key) {
      case '--web': opts.web = value.split(',').filter(Boolean); break;
      case '--cluster': opts.cluster = value; break;
      case '--discovery-port': opts.discoveryPort = Number(value); break;
      case '--bench': opts.bench = value; break;
      case '--out': opts.out = value; break;
      case '--pids': opts.pids = value.split(',').filter(Boolean).map(Number); break;
      case '--metrics': opts.metrics = value.split(',').filter(Boolean); break;
      case '--rounds': opts.rounds = Number(value); break;
      case '--loads': opts.loads = Number(value); break;
      case '--messages': opts.messages = Number(value); break;
      case '--rate': opts.rate = Number(value); break;
      default: throw new Error(`unknown option ${key}`);
    }
  }
  for (const k of ['web', 'cluster', 'discoveryPort', 'bench', 'out']) {
    if (!opts[k]) throw new Error(`--${k.replace(/[A-Z]/g, (c) => '-' + c.toLowerCase())} is required`);
  }
  if (opts.web.length < 2) throw new Error('--web needs at least two node URLs');
  const bounded = (v, lo, hi, what) => {
    if (!(Number.isFinite(v) && v >= lo && v <= hi)) throw new Error(`${what} must be in [${lo}, ${hi}]`);
  };
  bounded(opts.rounds, 1, 10, '--rounds');
  bounded(opts.loads, 1, 500, '--loads');
  bounded(opts.messages, 10, 10_000, '--messages');
  bounded(opts.rate, 1, 200, '--rate');
  return opts;
}

const started = Date.now();
const note = (text) => process.stderr.write(`[${((Date.now() - started) / 1000).toFixed(1)} s] ${text}\n`);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Rejects after `ms` naming `what` unless `promise` settles first. */
function within(ms, what, promise) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** Polls `probe` every `every` ms for at most `ms`; resolves to its first truthy value. */
async function until(ms, what, probe, every = 50) {
  const deadline = Date.now() + ms;
  for (let round = 0; round < 100_000; round++) {
    const v = await probe();
    if (v) return v;
    if (Date.now() > deadline) break;
    await sleep(every);
  }
  throw new Error(`timed out after ${ms} ms: ${what}`);
}

/** Nearest-rank percentiles of `values` (ms). With 20 samples p99 is the maximum. */
function summary(values) {
  const v = values.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (!v.length) return { n: 0 };
  const at = (q) => v[Math.min(v.length - 1, Math.max(0, Math.ceil(q * v.length) - 1))];
  const mean = v.reduce((a, b) => a + b, 0) / v.length;
  return { n: v.length, p50: at(0.5), p90: at(0.9), p99: at(0.99), max: v[v.length - 1], min: v[0], mean };
}

const f = (x, d = 2) => (x === undefined || x === null || !Number.isFinite(x) ? '–' : x.toFixed(d));

/** Machine-wide CPU ticks (busy, total) from /proc/stat, and each pid's utime+stime. */
function cpuSnapshot(pids) {
  const cpu = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).slice(1).map(Number);
  const idle = cpu[3] + (cpu[4] || 0);
  const total = cpu.reduce((a, b) => a + b, 0);
  const procs = {};
  for (const pid of pids) {
    try {
      const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      procs[pid] = Number(fields[11]) + Number(fields[12]);
    } catch {
      procs[pid] = null;
    }
  }
  return { at: Date.now(), busy: total - idle, total, procs, byName: ticksByName() };
}

/** CPU ticks of every process on the machine, summed by command name (bounded by /proc). */
function ticksByName() {
  const out = {};
  let entries = [];
  try {
    entries = fs.readdirSync('/proc').filter((e) => /^\d+$/.test(e)).slice(0, 100_000);
  } catch {
    return out;
  }
  for (const pid of entries) {
    try {
      const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
      let name = stat.slice(stat.indexOf('(') + 1, stat.lastIndexOf(')'));
      if (name.startsWith('chrom')) {
        // Chromium's processes by their role: browser, renderer, gpu-process, utility.
        const cmdline = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8');
        name = `chromium ${/--type=([\w-]+)/.exec(cmdline)?.[1] ?? 'browser'}`;
      }
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      const key = `${pid}:${name}`;
      out[key] = Number(fields[11]) + Number(fields[12]);
    } catch {
      // The process ended meanwhile.
    }
  }
  return out;
}

/** CPU use between two snapshots: the machine's busy share, and the nodes' in % of one core. */
function cpuBetween(a, b) {
  const ticksPerS = 100; // USER_HZ on Linux
  const seconds = (b.at - a.at) / 1000;
  let nodes = 0;
  for (const pid of Object.keys(a.procs)) {
    if (a.procs[pid] !== null && b.procs[pid] !== null) nodes += b.procs[pid] - a.procs[pid];
  }
  // By command name, in % of one core; a process that started meanwhile counts from zero.
  const byName = {};
  for (const [key, ticks] of Object.entries(b.byName)) {
    // Only processes alive at both ends (kernel threads rename themselves: new keys).
    if (!(key in a.byName)) continue;
    const name = key.slice(key.indexOf(':') + 1);
    byName[name] = (byName[name] || 0) + ticks - (a.byName[key] ?? 0);
  }
  const top = Object.entries(byName)
    .filter(([, t]) => t > 0)
    .sort((x, y) => y[1] - x[1])
    .slice(0, 8)
    .map(([name, t]) => [name, Number(((100 * t) / ticksPerS / Math.max(0.001, seconds)).toFixed(1))]);
  return {
    seconds,
    top,
    machine_busy_pct: (100 * (b.busy - a.busy)) / Math.max(1, b.total - a.total),
    nodes_pct_of_core: (100 * nodes) / ticksPerS / Math.max(0.001, seconds),
    loadavg: os.loadavg().map((x) => Number(x.toFixed(2))),
  };
}

/** The series of one node's /metrics this report reads, as {name{labels}: value}. */
function scrapeMetrics(addr) {
  return within(5_000, `metrics of ${addr}`, new Promise((resolve, reject) => {
    http.get(`http://${addr}/metrics`, (res) => {
      let text = '';
      res.on('data', (d) => (text += d));
      res.on('end', () => {
        const out = {};
        for (const line of text.split('\n')) {
          const m = /^(cellchat_(?:rpc_seconds|wal_fsync_seconds|apply_seconds)_(?:sum|count)(?:\{[^}]*\})?|cellchat_(?:sends|deliveries)_total)\s+(\S+)/.exec(line);
          if (m) out[m[1]] = Number(m[2]);
        }
        resolve(out);
      });
      res.on('error', reject);
    }).on('error', reject);
  }));
}

async function metricsSnapshot(addrs) {
  return Promise.all(addrs.map((a) => scrapeMetrics(a).catch(() => ({}))));
}

/** Per node between two snapshots: mean ms of the send RPC, fdatasync and apply, and counts. */
function metricsBetween(a, b, view) {
  return b.map((after, i) => {
    const before = a[i] || {};
    const d = (k) => (after[k] ?? 0) - (before[k] ?? 0);
    const mean = (base) => {
      const n = d(`${base}_count`);
      return n > 0 ? { mean_ms: (1000 * d(`${base}_sum`)) / n, count: n } : { mean_ms: null, count: 0 };
    };
    return {
      node: `n${i + 1}${view.nodes[i]?.leader ? ' (leader)' : ''}`,
      send: (() => {
        const n = d('cellchat_rpc_seconds_count{method="send"}');
        return n > 0 ? { mean_ms: (1000 * d('cellchat_rpc_seconds_sum{method="send"}')) / n, count: n } : { mean_ms: null, count: 0 };
      })(),
      fsync: mean('cellchat_wal_fsync_seconds'),
      apply: mean('cellchat_apply_seconds'),
      sends: d('cellchat_sends_total'),
      deliveries: d('cellchat_deliveries_total'),
    };
  });
}

// ------------------------------------------------------------------------------------------
// The cluster, through the web socket: node ids and the leader

/** Opens a socket to `url`, makes one call, and resolves to {welcome, answer text}. */
function webCall(url, op, args = {}) {
  return within(10_000, `${op} on ${url}`, new Promise((resolve, reject) => {
    const ws = new WebSocket(url.replace(/^http/, 'ws') + '/ws');
    let welcome = null;
    ws.on('error', reject);
    ws.on('message', (data) => {
      const text = data.toString();
      if (!welcome) {
        welcome = JSON.parse(text);
        ws.send(JSON.stringify({ id: 1, op, args }));
        return;
      }
      if (!/"id":1[,}]/.test(text)) return;
      ws.close();
      resolve({ welcome, text });
    });
  }));
}

/** Waits until every node names the same leader and it has `urls.length` voters. */
async function clusterView(urls) {
  return until(60_000, 'the cluster formed with a leader', async () => {
    const nodes = [];
    for (const url of urls) {
      const { welcome, text } = await webCall(url, 'cluster').catch(() => ({}));
      if (!welcome) return null;
      // Ids past 2^53 lose digits as JSON numbers: read the leader's digits from the text.
      const leader = /"leader":(\d+)/.exec(text)?.[1] ?? null;
      const voters = (text.match(/"voter":true/g) || []).length;
      nodes.push({ url, id: welcome.node_id, leader, voters });
    }
    const leader = nodes[0].leader;
    const agreed = leader && nodes.every((n) => n.leader === leader && n.voters === urls.length);
    if (!agreed) return null;
    return { leader, nodes: nodes.map((n) => ({ url: n.url, id: n.id, leader: n.id === leader })) };
  }, 250);
}

// ------------------------------------------------------------------------------------------
// 3. Page assets

function walk(dir) {
  const out = [];
  for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
    const full = path.join(dir, entry.name);
    if (entry.isDirectory()) out.push(...walk(full));
    else if (entry.isFile()) out.push(full);
  }
  return out.sort();
}

/** GETs `url` with `accept-encoding` and resolves to {status, encoding, wireBytes, body}. */
function getRaw(url, acceptEncoding) {
  return within(10_000, `GET ${url}`, new Promise((resolve, reject) => {
    const req = http.get(url, { headers: { 'accept-encoding': acceptEncoding } }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => {
        const body = Buffer.concat(chunks);
        resolve({
          status: res.statusCode,
          encoding: res.headers['content-encoding'] || 'identity',
          cache: res.headers['cache-control'] || '',
          validators: ['etag', 'last-modified'].filter((h) => res.headers[h]).join(',') || 'none',
          wireBytes: body.length,
          body,
        });
      });
      res.on('error', reject);
    });
    req.on('error', reject);
  }));
}

async function measureAssets(nodeUrl) {
  const files = walk(STATIC);
  const rows = [];
  for (const file of files) {
    const rel = path.relative(STATIC, file).split(path.sep).join('/');
    const raw = fs.readFileSync(file);
    const gzip9 = zlib.gzipSync(raw, { level: 9 }).length;
    const brotli = zlib.brotliCompressSync(raw, {
      params: { [zlib.constants.BROTLI_PARAM_QUALITY]: 11, [zlib.constants.BROTLI_PARAM_SIZE_HINT]: raw.length },
    }).length;
    const served = await getRaw(`${nodeUrl}/${rel === 'index.html' ? '' : rel}`, 'gzip, deflate, br');
    let servedBody = served.body;
    if (served.encoding === 'gzip') servedBody = zlib.gunzipSync(served.body);
    else if (served.encoding === 'br') servedBody = zlib.brotliDecompressSync(served.body);
    rows.push({
      file: rel,
      raw: raw.length,
      gzip9,
      brotli,
      served_status: served.status,
      served_encoding: served.encoding,
      served_wire_bytes: served.wireBytes,
      served_cache_control: served.cache,
      served_validators: served.validators,
      served_matches_file: served.status === 200 && Buffer.compare(servedBody, raw) === 0,
    });
  }
  const sum = (k) => rows.reduce((a, r) => a + r[k], 0);
  return {
    files: rows,
    total: { raw: sum('raw'), gzip9: sum('gzip9'), brotli: sum('brotli'), served_wire_bytes: sum('served_wire_bytes') },
  };
}

// ------------------------------------------------------------------------------------------
// Browser users: identities made once by the login form, then reused through storage

async function launch() {
  return chromium.launch({ executablePath: CHROMIUM, headless: true, timeout: 60_000, args: CHROMIUM_ARGS });
}

async function newContext(browser, label, storageState) {
  const context = await browser.newContext({ viewport: VIEWPORT, storageState });
  context.setDefaultTimeout(20_000);
  context.errors = [];
  context.on('weberror', (e) => {
    context.errors.push(String(e.error()));
    note(`[${label}] page error: ${e.error()}`);
  });
  return context;
}

const pageState = (page) => page.evaluate(() => window.cellchat?.state?.() ?? null);

/**
 * Logs `name` in through the login form on `url` (a new key, kept by the page in
 * localStorage), optionally opens `channel` so the sender keys get pinned, and returns the
 * context's storage with the same localStorage copied to every node's origin (so a page of
 * this user logs in at once on any node).
 */
async function makeUser(browser, urls, url, name, channel = null) {
  const context = await newContext(browser, name);
  try {
    const page = await context.newPage();
    await page.goto(url);
    await page.locator('#login').waitFor({ state: 'visible' });
    await page.fill('#login-name', name);
    await page.click('#login-go');
    await within(20_000, `${name} logged in`, page.evaluate(() => window.cellchat.ready));
    if (channel) {
      await page.goto(`${url}/#channel=${encodeURIComponent(channel)}`);
      await page.reload();
      await within(20_000, `${name} ready again`, page.evaluate(() => window.cellchat.ready));
      await until(20_000, `${name} shows #${channel}`, async () =>
        (await page.locator('#messages .msg').count()) >= LOAD_MESSAGES);
      // Pins are written when the senders' keys arrive, before the messages render.
    }
    const state = await context.storageState();
    const origin = new URL(url).origin;
    const mine = state.origins.find((o) => o.origin === origin);
    if (!mine || !mine.localStorage.some((e) => e.name.startsWith('cellchat.identity.'))) {
      throw new Error(`${name}: no identity in the page's storage after logging in`);
    }
    state.origins = urls.map((u) => ({ origin: new URL(u).origin, localStorage: mine.localStorage }));
    return state;
  } finally {
    await context.close();
  }
}

/** A page of a stored user on `url`, `probe` installed before any script, opened on `channel`. */
async function openAs(browser, label, storage, url, channel, probe, probeArg) {
  const context = await newContext(browser, label, storage);
  await context.addInitScript(probe, probeArg);
  const page = await context.newPage();
  await page.goto(`${url}/#channel=${encodeURIComponent(channel)}`);
  await within(20_000, `${label} ready`, page.evaluate(() => window.cellchat.ready));
  await until(20_000, `${label} shows #${channel}`, async () => (await pageState(page))?.channel === channel);
  return { context, page };
}

/** Types `text` into the compose box and presses Enter, as a user does. */
async function typeAndSend(page, text) {
  await page.fill('#input', text);
  await page.press('#input', 'Enter');
}

/** A message text of TEXT_BYTES bytes that names itself. */
const messageText = (tag, i) => `${tag}-${String(i).padStart(5, '0')} `.padEnd(TEXT_BYTES, 'x');

// ------------------------------------------------------------------------------------------
// 1. Page load

/**
 * Installed before the page's scripts: times the first `.msg` in `#messages` and the
 * `want`-th, the frame after them, and each socket call (op, id) and answer, relative to
 * navigation start (performance.now()). It reads frames with string scans only, so it adds
 * next to nothing to the page's own work.
 */
function loadProbe(want) {
  const w = (window.__wb = { want, first: null, all: null, frame: null, calls: [], events: [] });
  w.done = new Promise((resolve) => (w.resolveDone = resolve));
  const Native = window.WebSocket;
  window.WebSocket = class extends Native {
    constructor(...args) {
      super(...args);
      w.events.push({ k: 'ws-new', t: performance.now() });
      this.addEventListener('open', () => w.events.push({ k: 'ws-open', t: performance.now() }));
      this.addEventListener('message', (e) => {
        const t = performance.now();
        if (w.events.length > 400 || typeof e.data !== 'string') return;
        const s = e.data;
        const ev = /"ev":"(\w+)"/.exec(s.length > 4096 ? s.slice(-64) : s)?.[1];
        if (ev) {
          if (ev !== 'ping') w.events.push({ k: `ev:${ev}`, t, bytes: s.length });
          return;
        }
        const id = Number(/"id":(\d+)/.exec(s)?.[1]);
        const call = w.calls.find((c) => c.id === id && c.answered === undefined);
        if (call) {
          call.answered = t;
          call.bytes = s.length;
          call.err = s.startsWith('{"err"');
        }
      });
    }

    send(data) {
      if (typeof data === 'string' && w.calls.length < 400) {
        const id = Number(/"id":(\d+)/.exec(data)?.[1]);
        const op = /"op":"(\w+)"/.exec(data)?.[1];
        w.calls.push({ id, op, sent: performance.now() });
      }
      return super.send(data);
    }
  };
  const seen = () => {
    const box = document.getElementById('messages');
    return box ? box.getElementsByClassName('msg').length : 0;
  };
  const observer = new MutationObserver(() => {
    const n = seen();
    if (n > 0 && w.first === null) w.first = performance.now();
    if (n >= w.want && w.all === null) {
      w.all = performance.now();
      // The frame that shows them: the next animation frame, then the task after its paint.
      requestAnimationFrame(() => {
        w.rafAt = performance.now();
        const channel = new MessageChannel();
        channel.port1.onmessage = () => {
          w.frame = performance.now();
          observer.disconnect();
          w.resolveDone();
        };
        channel.port2.postMessage(0);
      });
    }
  });
  observer.observe(document, { childList: true, subtree: true });
}

/** What one load's probe saw, with the navigation and resource timings. */
async function readLoad(page) {
  return page.evaluate(() => {
    const w = window.__wb;
    const nav = performance.getEntriesByType('navigation')[0];
    const paints = Object.fromEntries(performance.getEntriesByType('paint').map((p) => [p.name, p.startTime]));
    const resources = performance.getEntriesByType('resource').map((r) => ({
      name: new URL(r.name).pathname,
      start: r.startTime,
      end: r.responseEnd,
      transfer: r.transferSize,
      encoded: r.encodedBodySize,
      decoded: r.decodedBodySize,
    }));
    return {
      first: w.first,
      all: w.all,
      raf: w.rafAt ?? null,
      frame: w.frame,
      nav: nav && {
        responseEnd: nav.responseEnd,
        domInteractive: nav.domInteractive,
        domContentLoaded: nav.domContentLoadedEventEnd,
        load: nav.loadEventEnd,
        transfer: nav.transferSize,
      },
      paints,
      resources,
      calls: w.calls,
      events: w.events,
      count: document.querySelectorAll('#messages .msg').length,
    };
  });
}

/** One load of `url#channel=…` in a fresh context (`context` null) or a reload in `context`. */
async function oneLoad(browser, storage, url, channel, reuse) {
  let context = reuse?.context;
  let page = reuse?.page;
  if (!context) {
    context = await newContext(browser, 'load', storage);
    await context.addInitScript(loadProbe, LOAD_MESSAGES);
    page = await context.newPage();
  }
  if (reuse) await page.reload({ waitUntil: 'commit' });
  else await page.goto(`${url}/#channel=${encodeURIComponent(channel)}`, { waitUntil: 'commit' });
  // One call that waits in the page (no polling beside the load it measures).
  await within(20_000, `${LOAD_MESSAGES} messages on screen at ${url}`, page.evaluate(() => window.__wb.done));
  const seen = await readLoad(page);
  return { url, seen, context, page };
}

async function measureLoads(browser, storage, urls, channel, count) {
  const fresh = [];
  const reload = [];
  // One load first, not counted: the browser's first renderer after launch.
  const first = await oneLoad(browser, storage, urls[0], channel, null);
  await first.context.close();
  note(`page load: first after browser start ${f(first.seen.frame, 0)} ms (not counted)`);
  for (let i = 0; i < count; i++) {
    const url = urls[i % urls.length];
    const run = await oneLoad(browser, storage, url, channel, null);
    fresh.push({ url, ...run.seen });
    // The same user reloading the tab: same context, page and socket history.
    const again = await oneLoad(browser, storage, url, channel, run);
    reload.push({ url, ...again.seen });
    await run.context.close();
    // Close the socket before the next run, so runs do not overlap on the node.
    await sleep(100);
  }
  return { first: first.seen, fresh, reload };
}

// ------------------------------------------------------------------------------------------
// 2. Send to delivery between two pages

/**
 * Installed in both pages: on the sender, the Enter keydown in `#input` (captured before the
 * page's own handler), the socket send of that message and its answer (with the channel seq);
 * on the reader, each batch frame's arrival and seqs, and each `.msg` entering `#messages`,
 * with the frame that shows it. Times are `performance.timeOrigin + performance.now()`.
 */
function liveProbe() {
  const now = () => performance.timeOrigin + performance.now();
  const w = (window.__wb = { keys: [], sends: new Map(), acks: [], frames: [], dom: [], current: null });
  document.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && e.target && e.target.id === 'input') {
      w.current = e.target.value;
      w.keys.push([now(), e.target.value]);
    }
  }, true);
  const Native = window.WebSocket;
  window.WebSocket = class extends Native {
    constructor(...args) {
      super(...args);
      this.addEventListener('message', (e) => {
        const t = now();
        if (typeof e.data !== 'string') return;
        const s = e.data;
        if (s.endsWith('"ev":"batch"}')) {
          const seqs = [...s.matchAll(/"seq":(\d+)/g)].map((m) => Number(m[1]));
          w.frames.push([t, seqs]);
          return;
        }
        const id = Number(/"id":(\d+)/.exec(s)?.[1]);
        const text = w.sends.get(id);
        if (text !== undefined) {
          w.sends.delete(id);
          w.acks.push([t, text, Number(/"seq":(\d+)/.exec(s)?.[1])]);
        }
      });
    }

    send(data) {
      if (typeof data === 'string' && w.current !== null && data.includes('"op":"send"')) {
        const id = Number(/"id":(\d+)/.exec(data)?.[1]);
        w.sends.set(id, w.current);
        w.keys[w.keys.length - 1].push(now());
        w.current = null;
      }
      return super.send(data);
    }
  };
  const observer = new MutationObserver((records) => {
    const t = now();
    const added = [];
    for (const r of records) {
      for (const n of r.addedNodes) {
        if (n.nodeType === 1 && n.classList.contains('msg') && n.parentElement?.id === 'messages') {
          added.push([t, Number(n.dataset.seq), n.querySelector('.text')?.textContent ?? null]);
        }
      }
    }
    if (!added.length) return;
    const row = { added, frame: null };
    w.dom.push(row);
    requestAnimationFrame(() => {
      const channel = new MessageChannel();
      channel.port1.onmessage = () => { row.frame = now(); };
      channel.port2.postMessage(0);
    });
  });
  observer.observe(document, { childList: true, subtree: true });
}

async function readLive(page) {
  return page.evaluate(() => {
    const w = window.__wb;
    return { keys: w.keys, acks: w.acks, frames: w.frames, dom: w.dom };
  });
}

/**
 * A's keydown to B's DOM for each timed message, with the parts: A's own work (keydown to
 * socket send: signing, encoding), the cluster (A's socket send to the batch frame at B), B's
 * own work (frame to DOM: verifying, rendering), and B's frame after.
 */
function joinLive(a, b, tag, timed) {
  const keyOf = new Map(a.keys.map(([t, text, sent]) => [text, { key: t, sent }]));
  const ackOf = new Map(a.acks.map(([t, text, seq]) => [text, { ack: t, seq }]));
  const frameOf = new Map();
  for (const [t, seqs] of b.frames) for (const s of seqs) if (!frameOf.has(s)) frameOf.set(s, t);
  const domOf = new Map();
  for (const row of b.dom) {
    for (const [t, seq, text] of row.added) {
      if (text && !domOf.has(text)) domOf.set(text, { dom: t, seq, frame: row.frame });
    }
  }
  const rows = [];
  let missing = 0;
  for (let i = WARMUP_SENDS; i < WARMUP_SENDS + timed; i++) {
    const text = messageText(tag, i);
    const k = keyOf.get(text);
    const d = domOf.get(text);
    if (!k || !d) {
      missing++;
      continue;
    }
    const ack = ackOf.get(text);
    const frameAt = frameOf.get(d.seq);
    rows.push({
      i,
      seq: d.seq,
      total: d.dom - k.key,
      shown: d.frame !== null ? d.frame - k.key : null,
      sender_page: k.sent !== undefined ? k.sent - k.key : null,
      cluster: frameAt !== undefined && k.sent !== undefined ? frameAt - k.sent : null,
      reader_page: frameAt !== undefined ? d.dom - frameAt : null,
      ack: ack && k.sent !== undefined ? ack.ack - k.sent : null,
    });
  }
  return { rows, missing };
}

/**
 * Runs in page A: puts each text into `#input` and presses Enter there (a keydown the page's
 * own handler takes: its send path, signing included) on a fixed schedule. Typing is left
 * out: no `input` events, so no typing notes, as the harness's clients send none. Playwright's
 * own typing (`fill` + `press`) was tried first and cost about 40 % of a core in the driver,
 * the browser process and the renderer at 20 messages/s on this 2-core machine, next to the
 * system being measured. Resolves to how far behind schedule a timed send started, at worst.
 */
async function sendPaced({ texts, interval, warmup }) {
  const input = document.getElementById('input');
  const start = performance.now() + 200;
  let behind = 0;
  for (let i = 0; i < texts.length; i++) {
    const due = start + i * interval;
    const wait = due - performance.now();
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
    else if (i >= warmup) behind = Math.max(behind, -wait);
    input.value = texts[i];
    input.dispatchEvent(new KeyboardEvent('keydown', { key: 'Enter', bubbles: true, cancelable: true }));
  }
  return behind;
}

/**
 * Chrome's own counters of a page's main thread (CDP Performance.getMetrics: time in tasks,
 * script, layout and style recalculation, seconds since the page started), read before and
 * after a window.
 */
async function pageMetrics({ context, page }) {
  const cdp = await context.newCDPSession(page);
  await cdp.send('Performance.enable');
  const read = async () => Object.fromEntries((await cdp.send('Performance.getMetrics')).metrics.map((m) => [m.name, m.value]));
  return { read, before: await read() };
}

async function browserRound(browser, users, view, label, aUrl, bUrl, opts, round) {
  const channel = `live-${users.tag}-${round}-${label}`;
  const tag = `${label}${round}`;
  const a = await openAs(browser, 'A', users.writer, aUrl, channel, liveProbe);
  const b = await openAs(browser, 'B', users.reader, bUrl, channel, liveProbe);
  const interval = 1000 / opts.rate;
  const total = WARMUP_SENDS + opts.messages;
  const texts = Array.from({ length: total }, (_, i) => messageText(tag, i));
  const perf = await Promise.all([a, b].map((p) => pageMetrics(p)));
  const cpu0 = cpuSnapshot(opts.pids);
  const metrics0 = await metricsSnapshot(opts.metrics);
  const behindMax = await within(total * interval + 60_000, 'A sends', a.page.evaluate(sendPaced, { texts, interval, warmup: WARMUP_SENDS }));
  await until(30_000, `B shows all ${total} messages`, async () =>
    (await b.page.locator('#messages .msg').count()) >= total, 100).catch((e) => note(e.message));
  await sleep(300); // the last frames' paint marks
  const cpu = cpuBetween(cpu0, cpuSnapshot(opts.pids));
  const node = metricsBetween(metrics0, await metricsSnapshot(opts.metrics), view);
  const mainThread = {};
  for (const [i, who] of [[0, 'a'], [1, 'b']]) {
    const after = await perf[i].read();
    mainThread[who] = Object.fromEntries(['TaskDuration', 'ScriptDuration', 'LayoutDuration', 'RecalcStyleDuration', 'LayoutCount']
      .map((k) => [k, k.endsWith('Count') ? (after[k] - perf[i].before[k]) / total : (1000 * (after[k] - perf[i].before[k])) / total]));
  }
  const [sa, sb] = [await readLive(a.page), await readLive(b.page)];
  const errors = [...a.context.errors, ...b.context.errors];
  const notices = await b.page.$eval('#notice', (e) => e.textContent).catch(() => '');
  await a.context.close();
  await b.context.close();
  const joined = joinLive(sa, sb, tag, opts.messages);
  const pick = (k) => summary(joined.rows.map((r) => r[k]).filter((x) => x !== null));
  return {
    kind: 'browser',
    label,
    round,
    a_node: nodeName(view, aUrl),
    b_node: nodeName(view, bUrl),
    timed: opts.messages,
    delivered: joined.rows.length,
    missing: joined.missing,
    sender_behind_ms_max: behindMax,
    latency: pick('total'),
    shown: pick('shown'),
    parts: {
      sender_page: pick('sender_page'),
      cluster: pick('cluster'),
      reader_page: pick('reader_page'),
      ack: pick('ack'),
    },
    cpu,
    node,
    main_thread_per_message: mainThread,
    errors,
    notice: notices,
    rows: joined.rows,
  };
}

/**
 * The page's own signing and checking of one 100 B message in this Chromium, alone: the
 * page's js/crypto.js `signPlain` (what a send does) and `openMessage` with the sender's key
 * (what showing a message does). Means over `count` calls after as many to warm up.
 */
async function cryptoMicro(browser, url, count = 200) {
  const context = await newContext(browser, 'micro');
  try {
    const page = await context.newPage();
    await page.goto(url);
    return await page.evaluate(async (n) => {
      const c = await import('/js/crypto.js');
      const id = c.newIdentity();
      const clientId = c.newIdentity().seed.slice(0, 16);
      const base = { seed: id.seed, sender: 'micro', cluster: 'bench', channel: 'bench', relation: null, clientId };
      const text = 'x'.repeat(100);
      const bodies = [];
      const time = (fn) => {
        for (let i = 0; i < n; i++) fn(i);
        const t0 = performance.now();
        for (let i = 0; i < n; i++) fn(i);
        return (performance.now() - t0) / n;
      };
      const sign = time((i) => { bodies[i] = c.signPlain({ ...base, clientSeq: i + 1, text }); });
      const open = time((i) => {
        const o = c.openMessage({ cluster: 'bench', channel: 'bench', relation: null, sender: 'micro', clientSeq: i + 1, senderKey: id.publicKey, body: bodies[i] });
        if (o.text !== text) throw new Error('did not open');
      });
      // The browser's own Ed25519 (WebCrypto), where it has one: what signing and checking
      // would cost through it instead.
      let subtle = null;
      try {
        const pkcs8 = new Uint8Array([0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20, ...id.seed]);
        const priv = await crypto.subtle.importKey('pkcs8', pkcs8, { name: 'Ed25519' }, false, ['sign']);
        const pub = await crypto.subtle.importKey('raw', id.publicKey, { name: 'Ed25519' }, false, ['verify']);
        const data = new Uint8Array(200);
        const sig = new Uint8Array(await crypto.subtle.sign('Ed25519', priv, data));
        const timeAsync = async (fn) => {
          for (let i = 0; i < n; i++) await fn();
          const t0 = performance.now();
          for (let i = 0; i < n; i++) await fn();
          return (performance.now() - t0) / n;
        };
        subtle = {
          sign_ms: await timeAsync(() => crypto.subtle.sign('Ed25519', priv, data)),
          verify_ms: await timeAsync(async () => {
            if (!(await crypto.subtle.verify('Ed25519', pub, sig, data))) throw new Error('bad signature');
          }),
        };
      } catch (e) {
        subtle = { error: String(e) };
      }
      return { count: n, sign_ms: sign, open_ms: open, subtle };
    }, count);
  } finally {
    await context.close();
  }
}

/**
 * Not timed: one more browser round with Chrome's tracing on (the DevTools timeline
 * categories), to say where the pages' time goes. Returns, per thread of interest, its busy
 * time per message and the event names with the most self time per message.
 */
async function profileRound(browser, users, view, aUrl, bUrl, opts) {
  const channel = `prof-${users.tag}`;
  const a = await openAs(browser, 'A', users.writer, aUrl, channel, liveProbe);
  const b = await openAs(browser, 'B', users.reader, bUrl, channel, liveProbe);
  const count = Math.min(100, opts.messages);
  const texts = Array.from({ length: WARMUP_SENDS + count }, (_, i) => messageText('prof', i));
  // The warm-up first, outside the trace.
  await a.page.evaluate(sendPaced, { texts: texts.slice(0, WARMUP_SENDS), interval: 1000 / opts.rate, warmup: WARMUP_SENDS });
  await sleep(500);
  // Traced with page B named, so the trace says which renderer is B's; the other one is A's.
  await browser.startTracing(b.page, {
    categories: ['devtools.timeline', 'disabled-by-default-devtools.timeline', 'toplevel', 'v8.execute', '__metadata'],
  });
  const started = performance.now();
  await a.page.evaluate(sendPaced, { texts: texts.slice(WARMUP_SENDS), interval: 1000 / opts.rate, warmup: 0 });
  await until(30_000, 'B shows the profiled messages', async () =>
    (await b.page.locator('#messages .msg').count()) >= texts.length, 100).catch((e) => note(e.message));
  const seconds = (performance.now() - started) / 1000;
  const trace = JSON.parse((await browser.stopTracing()).toString());
  await a.context.close();
  await b.context.close();
  return summarizeTrace(trace.traceEvents || trace, count, seconds, { [new URL(bUrl).origin]: 'page B' }, 'page A');
}

function summarizeTrace(events, count, seconds, roleByOrigin, otherRenderer) {
  const threadName = new Map();
  const processName = new Map();
  const role = new Map();
  for (const e of events) {
    if (e.ph === 'M' && e.name === 'thread_name') threadName.set(`${e.pid}:${e.tid}`, e.args?.name);
    if (e.ph === 'M' && e.name === 'process_name') processName.set(e.pid, e.args?.name);
    const frames = e.args?.data?.frames;
    if (Array.isArray(frames)) {
      for (const fr of frames) {
        try {
          const r = roleByOrigin[new URL(fr.url).origin];
          if (r && fr.processId) role.set(fr.processId, `${r} (renderer)`);
        } catch {
          // Not a URL (about:blank).
        }
      }
    }
  }
  // Self time per (thread, event name), from complete events nested on each thread.
  const byThread = new Map();
  for (const e of events) {
    if (e.ph !== 'X' || typeof e.dur !== 'number') continue;
    const key = `${e.pid}:${e.tid}`;
    if (!byThread.has(key)) byThread.set(key, []);
    byThread.get(key).push(e);
  }
  const threads = [];
  for (const [key, list] of byThread) {
    list.sort((x, y) => x.ts - y.ts || y.dur - x.dur);
    // Each event's self time is its duration less its children's; `open` holds the events
    // enclosing the current one.
    const nodes = list.map((e) => ({ name: e.name, start: e.ts, end: e.ts + e.dur, self: e.dur }));
    const open = [];
    let busy = 0;
    for (const n of nodes) {
      while (open.length && open[open.length - 1].end <= n.start) open.pop();
      if (open.length) open[open.length - 1].self -= n.end - n.start;
      else busy += n.end - n.start;
      open.push(n);
    }
    const self = new Map();
    for (const n of nodes) self.set(n.name, (self.get(n.name) || 0) + n.self);
    const pid = Number(key.split(':')[0]);
    const thread = threadName.get(key) || key;
    const name = processName.get(pid);
    const proc = role.get(pid) || (name === 'Renderer' ? `${otherRenderer} (renderer)` : name) || `pid ${pid}`;
    const top = [...self.entries()].sort((x, y) => y[1] - x[1]).slice(0, 8)
      .map(([event, us]) => [event, Number((us / 1000 / count).toFixed(3))]);
    threads.push({ process: proc, thread, busy_ms_per_message: busy / 1000 / count, busy_pct: busy / 1e4 / seconds, top });
  }
  threads.sort((x, y) => y.busy_ms_per_message - x.busy_ms_per_message);
  return { messages: count, seconds, threads: threads.slice(0, 12) };
}

// ------------------------------------------------------------------------------------------
// 2a. The node's web path without a browser: two WebSocket clients in this process

/** A logged-in socket speaking web/PROTOCOL.md, signing with the page's own js/crypto.js. */
async function rawClient(url, name, crypto, onBatch) {
  const ws = new WebSocket(url.replace(/^http/, 'ws') + '/ws');
  const pending = new Map();
  let nextId = 1;
  const welcome = await within(10_000, `welcome from ${url}`, new Promise((resolve, reject) => {
    ws.once('error', reject);
    ws.once('message', (d) => resolve(JSON.parse(d.toString())));
  }));
  ws.on('message', (d) => {
    const t = performance.timeOrigin + performance.now();
    const s = d.toString();
    if (s.endsWith('"ev":"batch"}')) {
      onBatch?.(t, s);
      return;
    }
    const id = Number(/"id":(\d+)/.exec(s)?.[1]);
    const call = pending.get(id);
    if (!call) return;
    pending.delete(id);
    const frame = JSON.parse(s);
    if ('ok' in frame) call.resolve({ ok: frame.ok, at: t });
    else call.reject(new Error(`${call.op}: ${s.slice(0, 300)}`));
  });
  const call = (op, args = {}) => new Promise((resolve, reject) => {
    const id = nextId++;
    pending.set(id, { op, resolve, reject });
    ws.send(JSON.stringify({ id, op, args }));
  });
  const id = crypto.newIdentity();
  const challenge = Uint8Array.from(welcome.challenge);
  const message = crypto.loginMessage(challenge, crypto.webBinding(challenge), welcome.cluster, name);
  await within(10_000, `${name} login`, call('login', {
    name, public_key: Array.from(id.publicKey), signature: Array.from(crypto.sign(id.seed, message)),
  }));
  return { ws, call, id, name, cluster: welcome.cluster, clientId: crypto.newIdentity().seed.slice(0, 16), seq: 0 };
}

/**
 * As a browser round, with the pages replaced by sockets in this process (same frames, same
 * signing code, both following the channel): what the node's web path costs on its own.
 * Latency runs from just before signing to the batch frame's arrival at B.
 */
async function rawRound(opts, view, aUrl, bUrl, round, tag) {
  const crypto = await import(path.join(STATIC, 'js/crypto.js'));
  const channel = `raw-${tag}-${round}`;
  const arrived = new Map();
  const a = await rawClient(aUrl, `wb-${tag}-ra${round}`, crypto, null);
  const b = await rawClient(bUrl, `wb-${tag}-rb${round}`, crypto, (t, s) => {
    for (const m of s.matchAll(/"seq":(\d+)/g)) if (!arrived.has(Number(m[1]))) arrived.set(Number(m[1]), t);
  });
  const interval = 1000 / opts.rate;
  const total = WARMUP_SENDS + opts.messages;
  const sendOne = async (i) => {
    const seq = ++a.seq;
    const sentAt = performance.timeOrigin + performance.now();
    const body = crypto.signPlain({
      seed: a.id.seed, sender: a.name, cluster: a.cluster, channel, relation: null,
      clientId: a.clientId, clientSeq: seq, text: messageText(`raw${round}`, i),
    });
    const wireAt = performance.timeOrigin + performance.now();
    const reply = await a.call('send', {
      channel, body: Array.from(body), client_id: Array.from(a.clientId), client_seq: seq, relation: null,
    });
    return { i, sentAt, wireAt, ackAt: reply.at, seq: reply.ok.seq };
  };
  // The channel exists once A has sent; both follow it from there, as the pages do.
  const first = await sendOne(-1);
  await a.call('subscribe', { channel, after_seq: first.seq, read_token: 0 });
  await b.call('subscribe', { channel, after_seq: first.seq, read_token: 0 });
  const cpu0 = cpuSnapshot(opts.pids);
  const metrics0 = await metricsSnapshot(opts.metrics);
  const sends = [];
  const start = performance.now() + 200;
  let behind = 0;
  for (let i = 0; i < total; i++) {
    const wait = start + i * interval - performance.now();
    if (wait > 0) await sleep(wait);
    else if (i >= WARMUP_SENDS) behind = Math.max(behind, -wait);
    sends.push(sendOne(i));
  }
  const done = await within(60_000, 'raw sends answered', Promise.all(sends));
  await until(30_000, 'B got every raw message', () => done.every((d) => arrived.has(d.seq)), 50).catch((e) => note(e.message));
  const cpu = cpuBetween(cpu0, cpuSnapshot(opts.pids));
  const node = metricsBetween(metrics0, await metricsSnapshot(opts.metrics), view);
  a.ws.close();
  b.ws.close();
  const timed = done.filter((d) => d.i >= WARMUP_SENDS);
  const delivered = timed.filter((d) => arrived.has(d.seq));
  return {
    kind: 'socket',
    label: 'raw',
    round,
    a_node: nodeName(view, aUrl),
    b_node: nodeName(view, bUrl),
    timed: timed.length,
    delivered: delivered.length,
    missing: timed.length - delivered.length,
    sender_behind_ms_max: behind,
    latency: summary(delivered.map((d) => arrived.get(d.seq) - d.sentAt)),
    // Without the signing in JavaScript: from the socket send, as the harness's unsigned sends.
    from_socket_send: summary(delivered.map((d) => arrived.get(d.seq) - d.wireAt)),
    signing: summary(timed.map((d) => d.wireAt - d.sentAt)),
    ack: summary(timed.map((d) => d.ackAt - d.wireAt)),
    cpu,
    node,
  };
}

// ------------------------------------------------------------------------------------------
// 2b. The terminal clients: the load harness's fanout, one publisher, one subscriber

async function terminalRound(opts, view, round) {
  const metrics0 = await metricsSnapshot(opts.metrics);
  const result = await runHarness(opts, round);
  result.node = metricsBetween(metrics0, await metricsSnapshot(opts.metrics), view);
  return result;
}

/** The harness while it runs, so a signal to this process stops it too (by its pid). */
let harness = null;
for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => {
    if (harness && harness.exitCode === null) process.kill(harness.pid, 'SIGTERM');
    // Playwright kills the browser it launched when this process exits.
    process.exit(130);
  });
}

function runHarness(opts, round) {
  const warmup = 2;
  const duration = warmup + opts.messages / opts.rate;
  const out = path.join(opts.out, `harness-${round}`);
  fs.mkdirSync(out, { recursive: true });
  const args = [
    '--join', `127.0.0.1:${opts.discoveryPort}`,
    '--cluster', opts.cluster,
    '--discovery-port', String(opts.discoveryPort),
    '--system', 'cellchat',
    '--out', out,
    '--json',
    '--duration', String(duration),
    '--warmup', String(warmup),
    'fanout', '--subscribers', '1', '--publishers', '1', '--rate', String(opts.rate),
  ];
  const cpu0 = cpuSnapshot(opts.pids);
  return within(duration * 1000 + 120_000, 'the load harness', new Promise((resolve, reject) => {
    const child = spawn(opts.bench, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    harness = child;
    const timer = setTimeout(() => {
      note(`the harness (pid ${child.pid}) overran: killing it`);
      process.kill(child.pid, 'SIGKILL');
    }, duration * 1000 + 90_000);
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      harness = null;
      const line = stdout.split('\n').filter((l) => l.startsWith('{')).pop();
      if (code !== 0 || !line) {
        reject(new Error(`bench ${args.join(' ')} exited ${code}: ${stderr.slice(-2000)}`));
        return;
      }
      const r = JSON.parse(line);
      resolve({
        kind: 'terminal',
        label: 'harness fanout, 1 publisher, 1 subscriber',
        round,
        command: `bench ${args.join(' ')}`,
        sent: r.extra.sent,
        missing: r.missing,
        errors: r.errors,
        latency: { n: r.ops, ...r.latency_ms },
        ack: { p50: r.extra.ack_p50_ms, p99: r.extra.ack_p99_ms, max: r.extra.ack_max_ms },
        sent_per_s: r.extra.sent_per_s,
        cpu: cpuBetween(cpu0, cpuSnapshot(opts.pids)),
        raw: r,
      });
    });
  }));
}

// ------------------------------------------------------------------------------------------
// Report

function nodeName(view, url) {
  const i = view.nodes.findIndex((n) => n.url === url);
  return `n${i + 1}${view.nodes[i]?.leader ? ' (leader)' : ''}`;
}

function report(result) {
  const lines = [];
  const push = (s = '') => lines.push(s);
  const { loads, live, assets, view } = result;
  push(`Cluster: ${view.nodes.map((n, i) => `n${i + 1} ${n.url}${n.leader ? ' (leader)' : ''}`).join(', ')}.`);
  const leaderBefore = view.nodes.find((n) => n.leader)?.url;
  if (result.leader_after && result.leader_after !== leaderBefore) {
    push(`**The leader moved during the run** (${leaderBefore} → ${result.leader_after}): rounds after the move ran with another leader than their labels say.`);
  }
  push(`Machine: ${os.cpus().length} cores (${os.cpus()[0]?.model.trim()}), load average before ${result.loadavg_before.join(' ')}, after ${os.loadavg().map((x) => x.toFixed(2)).join(' ')}.`);
  push();
  push('#### 1. Page load to the first messages on screen');
  push();
  push(`${LOAD_MESSAGES} messages in the channel; a stored identity; \`${'{node}'}/#channel=NAME\`; times from navigation start. Nodes in turn.`);
  push();
  push('| load | runs | to the messages in the DOM: p50 / p99 / max ms | to the frame after: p50 / p99 / max ms | target (≤ 1,000 ms) |');
  push('| --- | ---: | --- | --- | --- |');
  for (const [name, runs] of [['fresh browser context', loads.fresh], ['reload, same context', loads.reload]]) {
    const dom = summary(runs.map((r) => r.all));
    const frame = summary(runs.map((r) => r.frame));
    const verdict = frame.p99 <= TARGET_LOAD_MS ? `met (${f(TARGET_LOAD_MS - frame.p99, 0)} ms to spare)` : `missed by ${f(frame.p99 - TARGET_LOAD_MS, 0)} ms`;
    push(`| ${name} | ${dom.n} | ${f(dom.p50, 0)} / ${f(dom.p99, 0)} / ${f(dom.max, 0)} | ${f(frame.p50, 0)} / ${f(frame.p99, 0)} / ${f(frame.max, 0)} | ${verdict} |`);
  }
  push();
  push('Where a fresh load spends its time (medians over the runs, ms from navigation start):');
  push();
  push('| step | at (p50) | took (p50) |');
  push('| --- | ---: | ---: |');
  for (const step of loadSteps(loads.fresh)) push(`| ${step.name} | ${f(step.at, 1)} | ${f(step.took, 1)} |`);
  push();
  push('#### 2. Send to delivery, browser to browser and terminal to terminal (same cluster, same run)');
  push();
  push(`${result.opts.messages} timed messages of ${TEXT_BYTES} B at ${result.opts.rate}/s (after ${WARMUP_SENDS} untimed). Browser: A's Enter keydown to the message in B's DOM. WebSocket, no browser: two sockets in the benchmark's Node process speaking the page's protocol with the page's crypto.js, from before signing to the batch frame's arrival. Terminal: the harness's send call (unsigned body) to the subscriber's delivery.`);
  push();
  push('| round | clients | A → B nodes | delivered | p50 ms | p90 ms | p99 ms | max ms | machine busy | nodes\' CPU (% of a core) |');
  push('| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |');
  for (const r of live) {
    const who = { browser: 'browser', socket: 'WebSocket, no browser', terminal: 'terminal (bench fanout)' }[r.kind];
    const nodes = r.kind === 'terminal' ? 'leader → nearest' : `${r.a_node} → ${r.b_node}`;
    const l = r.latency;
    const count = r.kind === 'terminal' ? `${r.sent} sent, ${r.missing} missing` : `${r.delivered}/${r.timed}`;
    push(`| ${r.round} | ${who} | ${nodes} | ${count} | ${f(l.p50)} | ${f(l.p90)} | ${f(l.p99)} | ${f(l.max)} | ${f(r.cpu.machine_busy_pct, 0)} % | ${f(r.cpu.nodes_pct_of_core, 0)} |`);
    if (r.kind === 'socket') {
      const w = r.from_socket_send;
      push(`| ${r.round} | the same, from the socket send (signing ${f(r.signing.p50)} ms left out) | ${nodes} | | ${f(w.p50)} | ${f(w.p90)} | ${f(w.p99)} | ${f(w.max)} | | |`);
    }
  }
  push();
  push('CPU by process in each window (% of one core; the machine has 2):');
  push();
  for (const r of live) {
    const who = r.kind === 'terminal' ? 'terminal' : `${r.kind} ${r.a_node} → ${r.b_node}`;
    const behind = r.kind !== 'terminal' ? `; A's sends at worst ${f(r.sender_behind_ms_max, 1)} ms behind schedule` : `; the harness's publisher at worst ${f(r.raw.extra.publisher_behind_ms_max, 1)} ms behind`;
    push(`- round ${r.round}, ${who}: ${r.cpu.top.map(([n, p]) => `${n} ${p}`).join(', ')}; load average ${r.cpu.loadavg.join(' ')}${behind}`);
  }
  push();
  push('Browser rounds, the parts (p50 / p99 ms): A\'s page from Enter to its socket send (signing, encoding); the cluster from that send to the batch frame at B; B\'s page from the frame to the DOM (verifying, rendering); B\'s frame after the DOM change; A\'s send to its answer.');
  push();
  push('| round | A → B | A\'s page | cluster | B\'s page | Enter to B\'s next frame | A\'s ack |');
  push('| ---: | --- | --- | --- | --- | --- | --- |');
  for (const r of live.filter((x) => x.kind === 'browser')) {
    const p = r.parts;
    push(`| ${r.round} | ${r.a_node} → ${r.b_node} | ${f(p.sender_page.p50)} / ${f(p.sender_page.p99)} | ${f(p.cluster.p50)} / ${f(p.cluster.p99)} | ${f(p.reader_page.p50)} / ${f(p.reader_page.p99)} | ${f(r.shown.p50)} / ${f(r.shown.p99)} | ${f(p.ack.p50)} / ${f(p.ack.p99)} |`);
  }
  push();
  push('Each page\'s main thread per message sent, from Chrome\'s counters (CDP Performance.getMetrics), ms: all tasks / script / layout / style; layouts per message:');
  push();
  push('| round | A → B | page A (sends, and shows its own) | page B (shows) |');
  push('| ---: | --- | --- | --- |');
  for (const r of live.filter((x) => x.kind === 'browser')) {
    const m = (x) => `${f(x.TaskDuration)} / ${f(x.ScriptDuration)} / ${f(x.LayoutDuration)} / ${f(x.RecalcStyleDuration)}; ${f(x.LayoutCount, 1)}`;
    push(`| ${r.round} | ${r.a_node} → ${r.b_node} | ${m(r.main_thread_per_message.a)} | ${m(r.main_thread_per_message.b)} |`);
  }
  push();
  if (live.some((r) => r.node?.length)) {
    push('The nodes\' own timings in each window (means from their /metrics: the send RPC from arrival to answer, as the node times it; fdatasync of the Raft log; apply):');
    push();
    push('| round | clients | send RPC, leader: mean ms (count) | fdatasync mean ms per node | apply mean ms per node |');
    push('| ---: | --- | --- | --- | --- |');
    for (const r of live.filter((x) => x.node?.length)) {
      const leader = r.node.find((n) => n.node.includes('leader'));
      const who = r.kind === 'terminal' ? 'terminal' : `${r.kind} ${r.a_node} → ${r.b_node}`;
      push(`| ${r.round} | ${who} | ${f(leader?.send.mean_ms)} (${leader?.send.count ?? 0}) | ${r.node.map((n) => f(n.fsync.mean_ms)).join(' / ')} | ${r.node.map((n) => f(n.apply.mean_ms, 3)).join(' / ')} |`);
    }
    push();
  }
  if (result.profile) {
    const p = result.profile;
    push(`Chrome's trace of one more round (not timed; ${p.messages} messages, A on the leader, B on a follower): the busiest threads, busy ms per message (share of one core), and the events with the most self time per message:`);
    push();
    for (const t of p.threads.slice(0, 8)) {
      push(`- ${t.process}, ${t.thread}: ${f(t.busy_ms_per_message)} ms (${f(t.busy_pct, 1)} %); ${t.top.slice(0, 6).map(([n, ms]) => `${n} ${f(ms)}`).join(', ')}`);
    }
    push();
  }
  if (result.micro) {
    const sub = result.micro.subtle;
    const webcrypto = sub && !sub.error
      ? ` The browser's own Ed25519 (WebCrypto \`crypto.subtle\`, awaited one at a time): sign ${f(sub.sign_ms, 3)} ms, verify ${f(sub.verify_ms, 3)} ms.`
      : ` WebCrypto Ed25519: not available here (${sub?.error}).`;
    push(`The page's crypto alone in this Chromium (js/crypto.js, mean of ${result.micro.count} calls): \`signPlain\` of a ${TEXT_BYTES} B text ${f(result.micro.sign_ms, 3)} ms, \`openMessage\` (Ed25519 verify) ${f(result.micro.open_ms, 3)} ms.${webcrypto}`);
    push();
  }
  push('Against the target (browser p99 within 2 ms of the terminal clients\' in the same round):');
  push();
  for (const round of [...new Set(live.map((r) => r.round))]) {
    const term = live.find((r) => r.round === round && r.kind === 'terminal');
    for (const r of live.filter((x) => x.round === round && x.kind === 'browser')) {
      if (!term) continue;
      const gap = r.latency.p99 - term.latency.p99;
      push(`- round ${round}, ${r.a_node} → ${r.b_node}: browser p99 ${f(r.latency.p99)} ms vs terminal ${f(term.latency.p99)} ms: ${gap <= TARGET_P99_GAP_MS ? 'met' : 'missed'} (gap ${f(gap)} ms, allowed ${TARGET_P99_GAP_MS})`);
    }
  }
  push();
  push('#### 3. Page assets');
  push();
  push('| file | raw B | gzip -9 B | brotli 11 B | the node sends (asked for gzip, br) |');
  push('| --- | ---: | ---: | ---: | --- |');
  for (const a of assets.files) {
    push(`| ${a.file} | ${a.raw} | ${a.gzip9} | ${a.brotli} | ${a.served_wire_bytes} B, ${a.served_encoding}${a.served_matches_file ? '' : ', DIFFERS from the file'} |`);
  }
  const t = assets.total;
  push(`| **all** | **${t.raw}** (${f(t.raw / 1024, 1)} KiB) | **${t.gzip9}** (${f(t.gzip9 / 1024, 1)} KiB) | **${t.brotli}** (${f(t.brotli / 1024, 1)} KiB) | ${t.served_wire_bytes} B (${f(t.served_wire_bytes / 1024, 1)} KiB) |`);
  push();
  const sent = t.served_wire_bytes / 1024;
  push(`Target (≤ ${TARGET_ASSETS_KIB} KiB compressed): gzip -9 ${f(t.gzip9 / 1024, 1)} KiB, ${t.gzip9 / 1024 <= TARGET_ASSETS_KIB ? 'met' : 'missed'}; as the node sends them (${assets.files[0]?.served_encoding}) ${f(sent, 1)} KiB, ${sent <= TARGET_ASSETS_KIB ? 'also under it' : 'over it'}. Cache-Control \`${assets.files[0]?.served_cache_control}\`, validators: ${assets.files[0]?.served_validators}.`);
  return lines.join('\n');
}

/** Median time of each step of a fresh load, from the probes' call logs. */
function loadSteps(runs) {
  const med = (xs) => summary(xs).p50;
  const steps = [];
  const navStep = (name, pick) => steps.push({ name, at: med(runs.map(pick)), took: null });
  navStep('HTML received (responseEnd)', (r) => r.nav?.responseEnd);
  for (const file of ['/app.js', '/js/crypto.js', '/vendor/noble.js', '/js/conn.js', '/style.css']) {
    steps.push({
      name: `${file} received`,
      at: med(runs.map((r) => r.resources.find((x) => x.name === file)?.end)),
      took: med(runs.map((r) => { const x = r.resources.find((y) => y.name === file); return x ? x.end - x.start : null; })),
    });
  }
  navStep('DOMContentLoaded (modules run)', (r) => r.nav?.domContentLoaded);
  steps.push({
    name: 'socket opened',
    at: med(runs.map((r) => r.events.find((e) => e.k === 'ws-open')?.t)),
    took: med(runs.map((r) => {
      const a = r.events.find((e) => e.k === 'ws-new');
      const b = r.events.find((e) => e.k === 'ws-open');
      return a && b ? b.t - a.t : null;
    })),
  });
  steps.push({ name: 'welcome frame', at: med(runs.map((r) => r.events.find((e) => e.k === 'ev:welcome')?.t)), took: null });
  const seenOps = [];
  for (const r of runs) for (const c of r.calls) if (!seenOps.includes(c.op)) seenOps.push(c.op);
  for (const op of seenOps) {
    const first = (r) => r.calls.find((c) => c.op === op);
    steps.push({
      name: `call \`${op}\` answered (sent → answer)`,
      at: med(runs.map((r) => first(r)?.answered)),
      took: med(runs.map((r) => { const c = first(r); return c && c.answered ? c.answered - c.sent : null; })),
    });
  }
  steps.push({
    name: `history answered → ${LOAD_MESSAGES} messages in the DOM (open + verify + render)`,
    at: med(runs.map((r) => r.all)),
    took: med(runs.map((r) => { const h = r.calls.find((c) => c.op === 'history'); return h?.answered ? r.all - h.answered : null; })),
  });
  steps.push({ name: 'frame after (on screen)', at: med(runs.map((r) => r.frame)), took: med(runs.map((r) => r.frame - r.all)) });
  return steps.sort((a, b) => (a.at ?? 1e9) - (b.at ?? 1e9));
}

// ------------------------------------------------------------------------------------------
// Main

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  fs.mkdirSync(opts.out, { recursive: true });
  const loadavgBefore = os.loadavg().map((x) => Number(x.toFixed(2)));
  const view = await clusterView(opts.web);
  const leaderUrl = view.nodes.find((n) => n.leader).url;
  const followers = view.nodes.filter((n) => !n.leader).map((n) => n.url);
  note(`cluster ${opts.cluster}: leader ${leaderUrl}, followers ${followers.join(' ')}`);

  note('assets');
  const assets = await measureAssets(opts.web[0]);

  const browser = await launch();
  note(`chromium ${browser.version()}`);
  const result = { opts, view, loadavg_before: loadavgBefore, chromium: browser.version(), assets };
  try {
    const tag = Math.random().toString(36).slice(2, 8);
    const loadChannel = `load-${tag}`;
    note('users: first visits through the login form');
    const writer = await makeUser(browser, opts.web, followers[0], `wb-${tag}-a`);
    const reader = await makeUser(browser, opts.web, followers[1] ?? followers[0], `wb-${tag}-b`);

    note(`seeding #${loadChannel} with ${LOAD_MESSAGES} messages from a page`);
    {
      const a = await openAs(browser, 'seed', writer, followers[0], loadChannel, () => {});
      for (let i = 0; i < LOAD_MESSAGES; i++) await typeAndSend(a.page, messageText('seed', i));
      await until(30_000, `#${loadChannel} holds ${LOAD_MESSAGES} messages`, async () =>
        (await a.page.locator('#messages .msg').count()) >= LOAD_MESSAGES, 100);
      await a.context.close();
    }
    const loader = await makeUser(browser, opts.web, followers[0], `wb-${tag}-l`, loadChannel);

    note(`page load: ${opts.loads} fresh loads and ${opts.loads} reloads, nodes in turn`);
    const cpu0 = cpuSnapshot(opts.pids);
    const loads = await measureLoads(browser, loader, opts.web, loadChannel, opts.loads);
    loads.cpu = cpuBetween(cpu0, cpuSnapshot(opts.pids));
    result.loads = loads;
    result.micro = await cryptoMicro(browser, opts.web[0]);
    note(`crypto in the page: sign ${f(result.micro.sign_ms, 3)} ms, open ${f(result.micro.open_ms, 3)} ms`);

    result.live = [];
    const users = { writer, reader, tag };
    for (let round = 1; round <= opts.rounds; round++) {
      note(`round ${round}: browser A on the leader, B on a follower`);
      result.live.push(await browserRound(browser, users, view, 'lf', leaderUrl, followers[0], opts, round));
      note(`round ${round}: browser A and B on two followers`);
      result.live.push(await browserRound(browser, users, view, 'ff', followers[0], followers[1] ?? followers[0], opts, round));
      note(`round ${round}: two WebSocket clients in Node (no browser), A on the leader, B on a follower`);
      result.live.push(await rawRound(opts, view, leaderUrl, followers[0], round, tag));
      note(`round ${round}: terminal clients (bench fanout)`);
      result.live.push(await terminalRound(opts, view, round));
      const last = result.live.slice(-4).map((r) => `${r.kind} p50 ${f(r.latency.p50)} p99 ${f(r.latency.p99)}`);
      note(`round ${round}: ${last.join('; ')}`);
    }
    note('profile: one untimed browser round with Chrome tracing on');
    result.profile = await profileRound(browser, users, view, leaderUrl, followers[0], opts).catch((e) => {
      note(`profile failed: ${e.message}`);
      return null;
    });
    const leaderNow = await clusterView(opts.web).catch(() => null);
    result.leader_after = leaderNow?.nodes.find((n) => n.leader)?.url ?? null;
    if (result.leader_after !== leaderUrl) note(`the leader moved during the run: ${leaderUrl} → ${result.leader_after}`);
  } finally {
    await browser.close();
  }
  fs.writeFileSync(path.join(opts.out, 'web-bench.json'), JSON.stringify(result, null, 1));
  process.stdout.write(report(result) + '\n');
}

main().catch((e) => {
  process.stderr.write(`bench.mjs: ${e.stack || e}\n`);
  process.exit(1);
});
