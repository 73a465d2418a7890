// Browser scenarios against a running cluster, for tests/web.rs:
//
//   node tests/web/scenarios.mjs NAME
//
// Environment (tests/web.rs sets it):
//   CELLCHAT_WEB_URLS   every node's web URL (http://IP:PORT), comma-separated, in node order
//   CELLCHAT_CLI        the `cellchat` binary
//   CELLCHAT_CLI_ARGS   its flags for this cluster, as a JSON array
//   CELLCHAT_TEST_OUT   where screenshots go
//
// The script asks for a node's kill -9 by printing `KILL <web URL>` and waits for a line
// `KILLED` on its stdin. Any other stdout line is a progress note. Exit 0: the scenario passed;
// 1: it failed (the reason on stderr).

import { execFile, spawn } from 'node:child_process';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import WebSocket from 'ws';
import { launch, newUser, sleep, until, within } from './browser.mjs';

const env = {
  urls: (process.env.CELLCHAT_WEB_URLS || '').split(',').filter(Boolean),
  cli: process.env.CELLCHAT_CLI,
  cliArgs: JSON.parse(process.env.CELLCHAT_CLI_ARGS || '[]'),
  out: process.env.CELLCHAT_TEST_OUT || os.tmpdir(),
};

const started = Date.now();
const note = (text) => console.log(`[${((Date.now() - started) / 1000).toFixed(1)} s] ${text}`);

function check(ok, what) {
  if (!ok) throw new Error(what);
}

// ------------------------------------------------------------------------------------------
// Talking to tests/web.rs: KILL requests.

const stdinLines = [];
let stdinWaiter = null;
readline.createInterface({ input: process.stdin }).on('line', (line) => {
  stdinLines.push(line.trim());
  stdinWaiter?.();
});

/** Asks tests/web.rs to kill -9 the node serving `url`; resolves once it is gone. */
async function killNode(url) {
  console.log(`KILL ${url}`);
  await until(30_000, `KILLED for ${url}`, async () => {
    if (!stdinLines.length) await new Promise((r) => { stdinWaiter = r; setTimeout(r, 200); });
    return stdinLines.length && stdinLines.shift() === 'KILLED';
  }, { every: 0 });
}

// ------------------------------------------------------------------------------------------
// The command-line client: one config dir per user.

let cliHome = null;
const configDirs = new Map();
/** Long-running CLI processes, killed (by their pids) when the scenario ends. */
const children = new Set();

async function configDir(user) {
  if (!cliHome) cliHome = await fs.mkdtemp(path.join(os.tmpdir(), 'cellchat-web-cli-'));
  if (!configDirs.has(user)) {
    const dir = path.join(cliHome, user);
    await fs.mkdir(dir, { recursive: true });
    configDirs.set(user, dir);
  }
  return configDirs.get(user);
}

/** Runs `cellchat USER ARGS...`; resolves to {code, stdout, stderr} (code: exit code or signal). */
async function runCli(user, args, timeoutMs = 30_000) {
  const dir = await configDir(user);
  const argv = [...env.cliArgs, '--config-dir', dir, user, ...args];
  return new Promise((resolve) => {
    execFile(env.cli, argv, { timeout: timeoutMs, maxBuffer: 16 << 20, killSignal: 'SIGKILL' }, (err, stdout, stderr) => {
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : `${err.signal || err.code}`) : 0, stdout, stderr });
    });
  });
}

async function cliOk(user, args, timeoutMs) {
  const r = await runCli(user, args, timeoutMs);
  check(r.code === 0, `cellchat ${user} ${args.join(' ')} exited ${r.code}: ${r.stderr.trim()}`);
  return r;
}

/**
 * `cellchat USER --channel CHANNEL --send TEXT` with an idempotency key, tried again while the
 * outcome is unknown (exit 3: e.g. its node died), so it lands exactly once.
 */
async function cliSend(user, channel, text, { key = null, extra = [] } = {}) {
  const args = ['--channel', channel, '--send', text, '--json', ...extra];
  if (key) args.push('--idempotency-key', key);
  let last;
  for (let attempt = 0; attempt < 5; attempt++) {
    last = await runCli(user, args, 40_000);
    if (last.code === 0) return JSON.parse(last.stdout.trim().split('\n').pop());
    if (last.code !== 3 || !key) break;
  }
  throw new Error(`cellchat ${user} --channel ${channel} --send ${JSON.stringify(text)} exited ${last.code}: ${last.stderr.trim()}`);
}

/** The channel's last `n` messages as the CLI reads them (JSON lines). */
async function cliHistory(user, channel, n, extra = []) {
  const r = await cliOk(user, ['--channel', channel, '--history', String(n), '--json', ...extra]);
  return r.stdout.split('\n').filter(Boolean).map((l) => JSON.parse(l));
}

/** Runs `count` jobs `job(i)` (i from 1), `width` at a time. */
async function pool(count, width, job) {
  let next = 1;
  const worker = async () => {
    while (next <= count) await job(next++);
  };
  await Promise.all(Array.from({ length: width }, worker));
}

// ------------------------------------------------------------------------------------------
// The page (its DOM contract: ids and classes the page keeps for tests).

async function login(page, url, name) {
  await page.goto(url);
  await page.locator('#login').waitFor({ state: 'visible' });
  await page.fill('#login-name', name);
  await page.click('#login-go');
  await page.locator('#app').waitFor({ state: 'visible' });
  await within(20_000, `${name}'s page ready`, page.evaluate(() => window.cellchat.ready));
  const state = await pageState(page);
  check(state.user === name && state.connected, `${name} logged in: ${JSON.stringify(state)}`);
  return state;
}

const pageState = (page) => page.evaluate(() => window.cellchat.state());

/** Opens `#name` or `@user` from the join box; resolves to the channel's name. */
async function openChannel(page, text) {
  await page.fill('#join-name', text);
  await page.click('#join-go');
  if (text.startsWith('@')) {
    const label = await until(20_000, `${text} open`, async () => {
      const active = await page.$eval('#channels li.active .label', (e) => e.textContent).catch(() => null);
      return active === text && active;
    }, { describe: () => page.$eval('#notice', (e) => `notice: ${e.textContent}`) });
    check(label === text, `${text} shown`);
  } else {
    await until(20_000, `#${text} open`, async () => (await pageState(page)).channel === text, {
      describe: () => page.$eval('#notice', (e) => `notice: ${e.textContent}`),
    });
  }
  return (await pageState(page)).channel;
}

/** What the page shows of `channel`, in DOM order. */
function shown(page, channel) {
  return page.$$eval(`#messages .msg[data-channel="${channel}"]`, (els) =>
    els.map((e) => ({
      seq: Number(e.dataset.seq),
      sender: e.querySelector('.sender')?.textContent ?? null,
      text: e.querySelector('.text')?.textContent ?? null,
      flags: e.querySelector('.flags')?.textContent ?? null,
      time: e.querySelector('.time')?.textContent ?? null,
    })),
  );
}

/** Waits until the page shows a message of `channel` from `sender` with `text`. */
async function waitMessage(page, channel, sender, text, ms = 20_000) {
  return until(ms, `${channel}: ${sender} says ${JSON.stringify(text)}`, async () =>
    (await shown(page, channel)).find((m) => m.sender === sender && m.text === text), {
    describe: async () => JSON.stringify({
      shown: (await shown(page, channel)).slice(-5),
      notice: await page.$eval('#notice', (e) => e.textContent),
      status: await page.$eval('#status', (e) => e.textContent),
    }),
  });
}

/** Types `text` and presses Enter. */
async function sendFromPage(page, text) {
  await page.fill('#input', text);
  await page.press('#input', 'Enter');
}

function checkVerified(m, who) {
  check(m.flags === '', `${who}: ${m.sender}'s ${JSON.stringify(m.text)} is flagged ${JSON.stringify(m.flags)}`);
}

/** Seqs `from..to`, each once, in order. */
function checkDense(seqs, from, to, what) {
  const want = Array.from({ length: to - from + 1 }, (_, i) => from + i);
  const ok = seqs.length === want.length && seqs.every((s, i) => s === want[i]);
  if (!ok) {
    const missing = want.filter((s) => !seqs.includes(s));
    const twice = seqs.filter((s, i) => seqs.indexOf(s) !== i);
    throw new Error(`${what}: expected seqs ${from}..${to} once each in order; got ${seqs.length} ` +
      `(missing ${JSON.stringify(missing.slice(0, 20))}, twice ${JSON.stringify(twice.slice(0, 20))}, ` +
      `first ${JSON.stringify(seqs.slice(0, 10))}, last ${JSON.stringify(seqs.slice(-10))})`);
  }
}

async function screenshot(page, name) {
  const file = path.join(env.out, name);
  await page.screenshot({ path: file });
  note(`screenshot ${file}`);
  return file;
}

// ------------------------------------------------------------------------------------------
// Scenarios

/** Two browsers and the CLI chat in #lobby; a third page pages back through its history. */
async function twoBrowsersAndACliChat(browser) {
  const [alice, bob] = [await newUser(browser, 'alice'), await newUser(browser, 'bob')];
  await Promise.all([login(alice, env.urls[0], 'alice'), login(bob, env.urls[1], 'bob')]);
  note('alice (node 1) and bob (node 2) logged in');
  await openChannel(alice, 'lobby');
  await openChannel(bob, 'lobby');
  const fromAlice = 'hello from alice, in a browser';
  const fromBob = 'hi alice, bob here ☕';
  await sendFromPage(alice, fromAlice);
  checkVerified(await waitMessage(bob, 'lobby', 'alice', fromAlice), 'bob');
  // Bob uses the button instead of Enter.
  await bob.fill('#input', fromBob);
  await bob.click('#send');
  const bobs = await waitMessage(alice, 'lobby', 'bob', fromBob);
  checkVerified(bobs, 'alice');
  check(bobs.time, `no .time on bob's message: ${JSON.stringify(bobs)}`);
  note('each page shows the other one\'s message, verified');

  const fromCarol = 'carol, from the terminal';
  await cliSend('carol', 'lobby', fromCarol);
  for (const [page, who] of [[alice, 'alice'], [bob, 'bob']]) {
    checkVerified(await waitMessage(page, 'lobby', 'carol', fromCarol), who);
  }
  note('both pages show carol\'s CLI message, verified');
  const read = await until(20_000, 'the CLI reads alice\'s message', async () =>
    (await cliHistory('carol', 'lobby', 20)).find((m) => m.sender === 'alice' && m.text === fromAlice));
  check(read.verified === true, `the CLI does not verify alice's message: ${JSON.stringify(read)}`);
  note(`the CLI reads alice's message back: ${JSON.stringify({ seq: read.seq, verified: read.verified, markers: read.markers })}`);
  await screenshot(alice, 'web-chat.png');

  // Bob looks at another channel while the CLI sends 60 more to #lobby: they count as unread.
  await openChannel(bob, 'elsewhere');
  const bulkStarted = Date.now();
  await pool(60, 3, (i) => cliSend('carol', 'lobby', `bulk message ${i}`, { key: `bulk-${i}` }));
  note(`the CLI sent 60 more in ${((Date.now() - bulkStarted) / 1000).toFixed(1)} s`);
  const head = 63;
  const unread = () => bob.$eval('#channels li[data-channel="lobby"] .unread', (e) => e.textContent);
  await until(30_000, 'bob\'s #lobby counts 60 unread', async () => (await unread()) === '60', { describe: unread });
  await bob.click('#channels li[data-channel="lobby"]');
  await until(10_000, 'bob\'s #lobby unread count clears', async () => (await unread()) === '', { describe: unread });
  await until(20_000, 'bob shows the newest message', async () =>
    (await shown(bob, 'lobby')).some((m) => m.seq === head));
  checkDense((await shown(bob, 'lobby')).map((m) => m.seq), 1, head, 'bob\'s #lobby after coming back to it');
  note('bob saw 60 unread in #lobby from another channel; opening it cleared the count');
  // Alice followed all of it live.
  await until(30_000, 'alice shows every message live', async () => (await shown(alice, 'lobby')).length >= head, {
    describe: async () => JSON.stringify((await shown(alice, 'lobby')).map((m) => m.seq)),
  });
  checkDense((await shown(alice, 'lobby')).map((m) => m.seq), 1, head, 'alice\'s live #lobby');

  const erin = await newUser(browser, 'erin');
  await login(erin, env.urls[2], 'erin');
  await openChannel(erin, 'lobby');
  await until(20_000, 'erin shows the newest message', async () =>
    (await shown(erin, 'lobby')).some((m) => m.seq === head));
  let clicks = 0;
  for (; clicks < 20; clicks++) {
    if (!(await erin.isVisible('#older'))) break;
    const before = (await shown(erin, 'lobby')).length;
    await erin.click('#older');
    const grew = await until(10_000, 'older messages', async () => (await shown(erin, 'lobby')).length > before
      || !(await erin.isVisible('#older'))).catch(() => false);
    if (!grew) break;
  }
  const seqs = (await shown(erin, 'lobby')).map((m) => m.seq);
  checkDense(seqs, 1, head, 'erin\'s #lobby after loading older history');
  const erinMessages = await shown(erin, 'lobby');
  check(erinMessages[0].text === fromAlice && erinMessages[2].sender === 'carol', `erin's first messages: ${JSON.stringify(erinMessages.slice(0, 3))}`);
  note(`erin (node 3) shows seqs 1..${head} after ${clicks} click(s) of #older`);
}

/** An encrypted channel made by the CLI, read and answered in the browser; a direct
 * conversation between a page and the CLI. */
async function encryptedAcrossBrowserAndCli(browser) {
  const dir = await configDir('carol');
  const passFile = path.join(dir, 'vault.passphrase');
  const passphrase = 'correct horse battery staple';
  await fs.writeFile(passFile, `${passphrase}\n`, { mode: 0o600 });
  const fromCarol = 'the vault opens at dawn';
  await cliSend('carol', 'vault', fromCarol, { extra: ['--passphrase-file', passFile] });
  note('carol made #vault with a passphrase and sent');

  const alice = await newUser(browser, 'alice');
  await login(alice, env.urls[1], 'alice');
  await openChannel(alice, 'vault');
  await alice.locator('#unlock').waitFor({ state: 'visible' });
  const locked = await until(10_000, 'the locked message', async () => (await shown(alice, 'vault'))[0]);
  check(locked.text !== fromCarol, `the page shows the text before the passphrase: ${JSON.stringify(locked)}`);
  note(`locked, the page shows ${JSON.stringify(locked.flags)} ${JSON.stringify(locked.text)}`);
  await alice.fill('#passphrase', 'not the passphrase');
  await alice.click('#passphrase-go');
  await until(30_000, 'a wrong passphrase is refused', async () =>
    /wrong passphrase/i.test(await alice.$eval('#notice', (e) => e.textContent)), {
    describe: () => alice.$eval('#notice', (e) => e.textContent),
  });
  check(await alice.isVisible('#unlock'), 'still locked after a wrong passphrase');
  await alice.fill('#passphrase', passphrase);
  await alice.click('#passphrase-go');
  checkVerified(await waitMessage(alice, 'vault', 'carol', fromCarol, 30_000), 'alice');
  await alice.locator('#unlock').waitFor({ state: 'hidden' });
  note('alice unlocked #vault and reads carol\'s message, verified');
  const fromAlice = 'see you at dawn, carol';
  await sendFromPage(alice, fromAlice);
  checkVerified(await waitMessage(alice, 'vault', 'alice', fromAlice), 'alice (own message)');
  const read = await until(20_000, 'the CLI reads alice\'s reply', async () =>
    (await cliHistory('carol', 'vault', 10, ['--passphrase-file', passFile])).find((m) => m.sender === 'alice'), {
    describe: async () => JSON.stringify(await cliHistory('carol', 'vault', 10, ['--passphrase-file', passFile])),
  });
  check(read.text === fromAlice && read.encrypted === true && read.verified === true,
    `the CLI reads alice's reply as ${JSON.stringify(read)}`);
  note('the CLI decrypts and verifies alice\'s reply');

  await cliSend('dave', 'general', 'dave is here');
  let direct = null;
  for (let attempt = 0; attempt < 20 && !direct; attempt++) {
    await alice.$eval('#notice', (e) => { e.textContent = ''; });
    direct = await openChannel(alice, '@dave').catch(async (e) => {
      const notice = await alice.$eval('#notice', (el) => el.textContent);
      if (!/not registered/.test(notice)) throw e;
      note(`@dave: ${notice} (the page's node may not have applied dave's registration yet)`);
      await sleep(500);
      return null;
    });
  }
  check(direct, 'alice could not open @dave');
  note(`alice opened @dave: ${direct}`);
  const toDave = 'psst dave, from the browser';
  await sendFromPage(alice, toDave);
  checkVerified(await waitMessage(alice, direct, 'alice', toDave), 'alice (own direct message)');
  const daveRead = await until(20_000, 'dave reads alice in the CLI', async () =>
    (await cliHistory('dave', '@alice', 10)).find((m) => m.sender === 'alice'));
  check(daveRead.text === toDave && daveRead.encrypted === true && daveRead.verified === true,
    `dave reads ${JSON.stringify(daveRead)}`);
  const fromDave = 'hello alice, dave answers';
  await cliSend('dave', '@alice', fromDave);
  checkVerified(await waitMessage(alice, direct, 'dave', fromDave), 'alice');
  note('alice and dave talk in a direct conversation, both ways, verified');
  await screenshot(alice, 'web-direct.png');
}

/**
 * The CLI's chat in line mode (`--plain`, lines from stdin): one process that sends each line
 * in order, retrying across failover. Resolves to {write(line), end() -> Promise<output>}.
 */
async function cliChat(user, channel) {
  const dir = await configDir(user);
  const child = spawn(env.cli, [...env.cliArgs, '--config-dir', dir, user, '--channel', channel, '--plain'], {
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  let output = '';
  child.stdout.on('data', (d) => { output += d; });
  child.stderr.on('data', (d) => { output += d; });
  const exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve(code ?? signal)));
  let gone = null;
  children.add(child);
  exited.then((code) => {
    gone = code;
    children.delete(child);
  });
  await until(30_000, `${user}'s CLI chat connected`, async () => /connected to cluster/.test(output) || gone !== null, {
    describe: async () => output,
  });
  check(gone === null, `${user}'s CLI chat exited ${gone}: ${output}`);
  return {
    write: (line) => child.stdin.write(`${line}\n`),
    output: () => output,
    async end() {
      child.stdin.end();
      const code = await within(60_000, `${user}'s CLI chat exits after its input ends`, exited);
      return { code, output };
    },
  };
}

/** A page follows #lobby while the CLI sends 150 numbered messages; its node dies midway. */
async function failoverWithoutGapOrDuplicate(browser) {
  const total = 150;
  const killAt = 75;
  const everyMs = 1000 / 15;
  const watcher = await newUser(browser, 'watcher');
  await login(watcher, env.urls[0], 'watcher');
  await openChannel(watcher, 'lobby');
  const before = await pageState(watcher);
  note(`the page follows #lobby on ${before.nodeUrl}`);
  const chat = await cliChat('carol', 'lobby');
  let failoverStatus = null;
  let failoverShot = null;
  const sendStarted = Date.now();
  for (let i = 1; i <= total; i++) {
    const due = sendStarted + i * everyMs;
    if (Date.now() < due) await sleep(due - Date.now());
    chat.write(`message ${i}`);
    if (i === killAt) {
      await killNode(before.nodeUrl);
      note(`killed the page's node after line ${i}`);
    }
    if (i > killAt && !failoverStatus) {
      const status = await watcher.$eval('#status', (e) => e.textContent);
      if (/now on node/.test(status)) {
        failoverStatus = status;
        failoverShot = await watcher.screenshot();
        note(`after line ${i}, #status: ${status}`);
      }
    }
  }
  const ended = await chat.end();
  note(`the CLI wrote ${total} lines in ${((Date.now() - sendStarted) / 1000).toFixed(1)} s and exited ${ended.code}`);
  check(ended.code === 0 && !/not sent|may not have been sent/.test(ended.output), `the CLI chat: exit ${ended.code}; ${ended.output}`);
  const want = Array.from({ length: total }, (_, i) => `message ${i + 1}`);
  // What the cluster holds, as the CLI reads it: the page must show exactly this.
  const stored = (await until(20_000, `the cluster holds all ${total}`, async () => {
    const h = await cliHistory('carol', 'lobby', 300);
    return h.some((m) => m.text === `message ${total}`) && h;
  })).filter((m) => m.sender === 'carol');
  const storedTexts = stored.map((m) => m.text);
  check(storedTexts.length === total && storedTexts.every((t, i) => t === want[i]),
    `the cluster holds ${storedTexts.length} of the CLI's lines (not the page's fault): ${JSON.stringify(storedTexts)}`);
  const texts = async () => (await shown(watcher, 'lobby')).filter((m) => m.sender === 'carol').map((m) => m.text);
  await until(60_000, `the page shows all ${total}`, async () => (await texts()).includes(`message ${total}`) &&
    (await texts()).length >= total, {
    describe: async () => JSON.stringify({ count: (await texts()).length, last: (await texts()).slice(-3), status: await watcher.$eval('#status', (e) => e.textContent) }),
  });
  // Anything late would show up now.
  await sleep(1000);
  const messages = await shown(watcher, 'lobby');
  const got = messages.map((m) => m.text);
  const missing = want.filter((t) => !got.includes(t));
  const twice = got.filter((t, i) => got.indexOf(t) !== i);
  check(missing.length === 0 && twice.length === 0 && got.length === total && got.every((t, i) => t === want[i]),
    `the page shows ${got.length} messages: missing ${JSON.stringify(missing)}, twice ${JSON.stringify(twice)}, ` +
    `out of order at ${got.findIndex((t, i) => t !== want[i])}`);
  checkDense(messages.map((m) => m.seq), stored[0].seq, stored[0].seq + total - 1, 'the page\'s #lobby seqs');
  for (const m of messages) checkVerified(m, 'watcher');
  const after = await pageState(watcher);
  check(after.connected && after.nodeUrl !== before.nodeUrl, `the page's connection after the kill: ${JSON.stringify(after)}`);
  const status = await watcher.$eval('#status', (e) => e.textContent);
  failoverStatus ||= /lost node|now on node/.test(status) ? status : null;
  check(failoverStatus, `#status never mentioned the failover; now: ${status}`);
  note(`the page shows messages 1..${total} once each, in order, now on ${after.nodeUrl}`);
  if (/now on node/.test(status)) await screenshot(watcher, 'web-failover.png');
  else {
    const file = path.join(env.out, 'web-failover.png');
    await fs.writeFile(file, failoverShot);
    note(`screenshot ${file} (taken when #status first told of the failover)`);
  }
}

/** Opens a raw WebSocket; resolves to {ws, welcome, closed} (closed: a promise of {code, reason, at}). */
function rawSocket(url) {
  const ws = new WebSocket(`${url.replace(/^http/, 'ws')}/ws`, { maxPayload: 4 << 20 });
  const frames = [];
  let wake = null;
  const closed = new Promise((resolve) => {
    ws.on('close', (code, reason) => resolve({ code, reason: reason.toString(), at: Date.now() }));
  });
  ws.on('error', () => {});
  ws.on('message', (data, binary) => {
    frames.push(binary ? data : JSON.parse(data.toString()));
    wake?.();
  });
  const next = (ms = 10_000) => until(ms, 'a frame', async () => {
    const i = frames.findIndex((f) => f.ev !== 'ping');
    return i >= 0 ? frames.splice(i, 1)[0] : null;
  }, { every: 20 });
  const welcome = within(15_000, 'welcome', new Promise((resolve, reject) => {
    ws.once('open', () => next(15_000).then(resolve, reject));
    ws.once('close', (code) => reject(new Error(`closed ${code} before the welcome`)));
  }));
  return { ws, welcome, closed, next };
}

async function expectClose(what, socket, code) {
  const c = await within(15_000, `${what}: the close`, socket.closed);
  check(c.code === code, `${what}: closed with ${c.code} ${JSON.stringify(c.reason)}, expected ${code}`);
  note(`${what}: closed ${c.code} ${JSON.stringify(c.reason)}`);
}

/** Bad input on the socket, many sockets at once, an idle socket, a damaged stored key. Each
 * check runs even when one before it failed; the scenario fails naming every failure. */
async function badInput(browser) {
  const url = env.urls[0];
  const failures = [];
  const step = async (what, fn) => {
    try {
      await fn();
    } catch (e) {
      const failure = e.message.startsWith(what) ? e.message : `${what}: ${e.message}`;
      failures.push(failure);
      console.error(`FAIL ${failure}`);
    }
  };
  const idle = rawSocket(url);
  await idle.welcome;
  const idleSince = Date.now();

  await step('a binary frame', async () => {
    const binary = rawSocket(url);
    await binary.welcome;
    binary.ws.send(Buffer.from([1, 2, 3]), { binary: true });
    await expectClose('a binary frame', binary, 1003);
  });
  await step('a text frame that is not JSON', async () => {
    const text = rawSocket(url);
    await text.welcome;
    text.ws.send('this is not JSON');
    await expectClose('a text frame that is not JSON', text, 1008);
  });
  await step('an unknown op', async () => {
    const unknown = rawSocket(url);
    await unknown.welcome;
    unknown.ws.send(JSON.stringify({ id: 1, op: 'frobnicate', args: {} }));
    const answer = await unknown.next();
    check(answer.id === 1 && answer.err?.Rejected?.Malformed !== undefined,
      `an unknown op answered ${JSON.stringify(answer)}`);
    unknown.ws.send(JSON.stringify({ id: 2, op: 'cluster', args: {} }));
    const cluster = await unknown.next();
    check(cluster.id === 2 && cluster.ok, `after an unknown op, cluster answered ${JSON.stringify(cluster)}`);
    note(`an unknown op: ${JSON.stringify(answer)}; the socket still answers`);
    unknown.ws.close();
  });
  const limit = 256 * 1024;
  await step('a frame of exactly 256 KiB', async () => {
    const atLimit = rawSocket(url);
    await atLimit.welcome;
    atLimit.ws.send('x'.repeat(limit));
    await expectClose('a frame of exactly 256 KiB (not JSON)', atLimit, 1008);
  });
  await step('a frame over 256 KiB', async () => {
    const big = rawSocket(url);
    await big.welcome;
    big.ws.send(JSON.stringify({ id: 1, op: 'cluster', args: { pad: 'x'.repeat(limit) } }));
    await expectClose('a frame over 256 KiB', big, 1009);
  });
  await step('300 sockets at once', async () => {
    const many = 300;
    const manyStarted = Date.now();
    const sockets = Array.from({ length: many }, () => rawSocket(url));
    try {
      const welcomed = await Promise.all(sockets.map((s) => s.welcome.then(() => true, (e) => e.message)));
      const refused = welcomed.filter((w) => w !== true);
      note(`${many} sockets at once: ${many - refused.length} welcomed in ${Date.now() - manyStarted} ms`);
      check(refused.length === 0, `${refused.length} of ${many} sockets got no welcome: ${JSON.stringify([...new Set(refused)].slice(0, 5))}`);
      const probe = rawSocket(url);
      sockets.push(probe);
      await probe.welcome;
      probe.ws.send(JSON.stringify({ id: 1, op: 'cluster', args: {} }));
      const info = await probe.next();
      check(info.ok, `with ${many} sockets open, cluster answered ${JSON.stringify(info)}`);
    } finally {
      for (const s of sockets) s.ws.terminate();
    }
  });
  await step('a socket that never logs in', async () => {
    const idleClosed = await within(25_000, 'the idle socket is closed', idle.closed);
    const idleSecs = (idleClosed.at - idleSince) / 1000;
    note(`a socket that never logged in: closed ${idleClosed.code} ${JSON.stringify(idleClosed.reason)} after ${idleSecs.toFixed(1)} s`);
    check(idleSecs >= 10 && idleSecs <= 20, `the idle socket closed after ${idleSecs} s, expected about 15`);
  });

  await step('a page after all that, and a damaged stored key', async () => {
    const tess = await newUser(browser, 'tess');
    await login(tess, url, 'tess');
    note('afterwards a page loads and logs in');
    const stored = await tess.evaluate(() => {
      const key = Object.keys(localStorage).find((k) => k.startsWith('cellchat.identity.'));
      return { key, value: localStorage.getItem(key) };
    });
    check(stored.key, 'the page stored no identity');
    const keyFile = JSON.parse(stored.value).key;
    for (const garbage of [JSON.stringify({ name: 'tess', key: 'garbage' }), 'not even JSON {']) {
      await tess.evaluate(({ key, garbage }) => localStorage.setItem(key, garbage), { key: stored.key, garbage });
      await tess.reload();
      await tess.locator('#login').waitFor({ state: 'visible' });
      const error = await until(10_000, 'a login error', async () => (await tess.$eval('#login-error', (e) => e.textContent)).trim());
      check(!(await tess.isVisible('#app')), 'the app shows with a damaged key');
      note(`stored key ${JSON.stringify(garbage)}: #login-error ${JSON.stringify(error)}`);
    }
    await tess.click('#login summary');
    await tess.fill('#login-name', 'tess');
    await tess.fill('#login-import', keyFile);
    await tess.click('#login-go');
    await tess.locator('#app').waitFor({ state: 'visible' });
    const whoami = await tess.$eval('#whoami', (e) => e.textContent);
    check(whoami === 'tess', `after the import #whoami is ${whoami}`);
    note('the key file imported again: tess is back');
  });
  check(failures.length === 0, `${failures.length} check(s) failed:\n  ${failures.join('\n  ')}`);
}

const SCENARIOS = {
  two_browsers_and_a_cli_chat: twoBrowsersAndACliChat,
  encrypted_across_browser_and_cli: encryptedAcrossBrowserAndCli,
  failover_without_gap_or_duplicate: failoverWithoutGapOrDuplicate,
  bad_input: badInput,
};

async function main(name) {
  const scenario = SCENARIOS[name];
  if (!scenario || !env.urls.length || !env.cli) {
    console.error(`usage: CELLCHAT_WEB_URLS=.. CELLCHAT_CLI=.. CELLCHAT_CLI_ARGS=.. node scenarios.mjs ${Object.keys(SCENARIOS).join('|')}`);
    return 2;
  }
  await fs.mkdir(env.out, { recursive: true });
  const browser = await launch();
  const stop = () => browser.close().finally(() => process.exit(1));
  process.once('SIGTERM', stop);
  const errors = [];
  browser.on('disconnected', () => errors.push('the browser went away'));
  try {
    await within(200_000, name, scenario(browser));
    for (const context of browser.contexts()) {
      for (const page of context.pages()) errors.push(...page.errors);
    }
    check(errors.length === 0, `errors in the pages: ${errors.join('; ')}`);
    note(`${name}: passed`);
    return 0;
  } finally {
    process.off('SIGTERM', stop);
    await browser.close().catch(() => {});
    for (const child of children) child.kill('SIGKILL');
    if (cliHome) await fs.rm(cliHome, { recursive: true, force: true });
  }
}

process.exitCode = await main(process.argv[2]).catch((e) => {
  console.error(`FAIL ${e.stack || e}`);
  return 1;
});
process.exit(process.exitCode);
