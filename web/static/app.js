// cellchat's web client: the page's state and what it shows. The socket and failover are in
// js/conn.js, the end-to-end formats in js/crypto.js (the same bytes as the terminal client).
// Every text from the network reaches the page through textContent, never as markup.

import * as crypto from './js/crypto.js';
import { Conn, CallError, short } from './js/conn.js';
import { relative, dayOf, clock } from './js/timefmt.js';

const $ = (id) => document.getElementById(id);
const PAGE = 50;
const OLDER_PAGE = 100;
const FOLLOW_MAX = 200;
const TYPING_SHOW_MS = 6000;
const TYPING_EVERY_MS = 3000;
const MARK_EVERY_MS = 1000;

const state = {
  cluster: null,
  me: null, // {name, seed, publicKey}
  conn: null,
  channels: new Map(), // name -> Channel
  shown: null,
  pins: {}, // name -> hex key pinned on first sight
  keyChanged: new Set(),
  keysAsked: new Map(), // name -> Promise
  online: new Set(),
  typing: new Map(), // channel -> Map(user -> until)
  clientId: crypto.newIdentity().seed.slice(0, 16),
  clientSeq: 0,
  lastTyping: 0,
};

let readyResolve;
const ready = new Promise((r) => (readyResolve = r));
window.cellchat = {
  ready,
  state: () => ({
    user: state.me?.name ?? null,
    node: state.conn?.welcome?.node_id ?? null,
    nodeUrl: state.conn?.url ?? null,
    channel: state.shown,
    connected: !!state.conn?.connected && !!state.conn?.loggedIn,
  }),
};

// ------------------------------------------------------------------------------------------
// Storage: the identity per cluster, and the senders' pinned keys.

const idKey = () => `cellchat.identity.${state.cluster}`;
const pinKey = () => `cellchat.pins.${state.cluster}`;
const recordKey = () => `cellchat.records.${state.cluster}`;

function loadJson(key, fallback) {
  try {
    const v = JSON.parse(localStorage.getItem(key));
    return v ?? fallback;
  } catch {
    return fallback;
  }
}

const hex = (b) => Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
const bytes = (a) => Uint8Array.from(a);

// ------------------------------------------------------------------------------------------
// Start: connect, then log in with the stored identity or show the login form.

async function start() {
  const conn = new Conn(location.origin, {
    login: async (welcome) => loginArgs(welcome),
    event: onEvent,
    status: setStatus,
    after: (channel) => state.channels.get(channel)?.last ?? 0,
    reconnected: () => watchPresence(),
  });
  state.conn = conn;
  let welcome;
  try {
    welcome = await conn.connect(location.origin);
  } catch (e) {
    showLogin(`cannot reach this node: ${e.message}; reload to try again`);
    return;
  }
  state.cluster = welcome.cluster;
  state.pins = loadJson(pinKey(), {});
  const stored = localStorage.getItem(idKey());
  if (stored === null) {
    showLogin('');
    return;
  }
  let saved;
  try {
    saved = JSON.parse(stored);
    if (!saved || typeof saved.name !== 'string' || typeof saved.key !== 'string') throw new Error('not an identity');
    const id = await crypto.parseKeyFile(saved.key, { cluster: state.cluster, name: saved.name });
    state.me = { name: saved.name, seed: id.seed, publicKey: id.publicKey };
  } catch (e) {
    showLogin(`The key stored in this browser is damaged (${e.message}). Import your key file, or pick a new name.`);
    return;
  }
  await enter();
}

function showLogin(error) {
  $('app').hidden = true;
  $('login').hidden = false;
  $('login-error').textContent = error;
  $('login-name').focus();
}

async function loginArgs(welcome) {
  const challenge = bytes(welcome.challenge);
  const message = crypto.loginMessage(challenge, crypto.webBinding(challenge), welcome.cluster, state.me.name);
  return {
    name: state.me.name,
    public_key: Array.from(state.me.publicKey),
    signature: Array.from(crypto.sign(state.me.seed, message)),
  };
}

/** Logs in on the first socket; on success shows the chat. */
async function enter() {
  try {
    await state.conn.login();
  } catch (e) {
    const why =
      e.reason === 'NameTaken'
        ? `${state.me.name} is registered with another key than the one in this browser: import that key file, or pick another name.`
        : e.reason === 'InvalidName'
          ? 'Names are 1 to 32 letters, digits, - or _.'
          : `login refused: ${e.message}`;
    // A refused login costs this socket its challenge: reconnect for the next try.
    state.me = null;
    try {
      await state.conn.connect(location.origin);
    } catch {
      // Reported when the next login fails.
    }
    showLogin(why);
    return;
  }
  $('login').hidden = true;
  $('app').hidden = false;
  $('whoami').textContent = state.me.name;
  setStatus('', false);
  state.conn.refreshNodes();
  watchPresence();
  await loadChannels();
  const wanted = new URLSearchParams(location.hash.slice(1)).get('channel');
  if (wanted) await openByName(wanted);
  else if (!state.shown && state.channels.size) show([...state.channels.keys()][0]);
  readyResolve();
}

async function onLoginClick() {
  const name = $('login-name').value.trim();
  const imported = $('login-import').value.trim();
  $('login-error').textContent = '';
  if (!crypto.validUserName(name)) {
    $('login-error').textContent = 'Names are 1 to 32 letters, digits, - or _.';
    return;
  }
  try {
    let id;
    if (imported) {
      $('login-error').textContent = 'Reading the key file…';
      id = await crypto.parseKeyFile(imported, {
        cluster: state.cluster,
        name,
        passphrase: $('login-passphrase').value || undefined,
      });
    } else {
      id = crypto.newIdentity();
    }
    state.me = { name, seed: id.seed, publicKey: id.publicKey };
  } catch (e) {
    $('login-error').textContent =
      e.kind === 'needs-passphrase' ? 'This key file is protected: enter its passphrase.' : e.message;
    return;
  }
  const keyFile = await crypto.exportKeyFile(state.me.seed, { cluster: state.cluster, name });
  localStorage.setItem(idKey(), JSON.stringify({ name, key: keyFile }));
  $('login-error').textContent = '';
  await enter();
}

// ------------------------------------------------------------------------------------------
// Channels

class Channel {
  constructor(name) {
    this.name = name;
    this.head = 0;
    this.readTo = 0;
    this.unread = 0;
    this.mentions = 0;
    this.encrypted = false;
    this.direct = [];
    this.key = null;
    this.record = null;
    this.messages = new Map(); // seq -> message
    this.first = null; // lowest seq loaded
    this.last = 0; // highest seq shown with nothing missing below it (since first)
    this.loaded = false;
    this.followed = false;
    this.hasOlder = false;
  }

  get label() {
    if (this.direct.length && crypto.directChannelName(this.direct) === this.name) {
      const others = this.direct.filter((m) => m !== state.me.name);
      return '@' + (others.length ? others : this.direct).join(',');
    }
    return '#' + this.name;
  }
}

function channel(name) {
  let ch = state.channels.get(name);
  if (!ch) {
    ch = new Channel(name);
    state.channels.set(name, ch);
  }
  return ch;
}

function applyInfo(info) {
  const ch = channel(info.name);
  ch.head = Math.max(ch.head, info.head);
  ch.readTo = Math.max(ch.readTo, info.read_to);
  ch.encrypted = info.encrypted;
  ch.direct = info.direct || [];
  if (!ch.loaded) ch.unread = Math.max(0, ch.head - ch.readTo);
  return ch;
}

async function loadChannels() {
  let after = null;
  for (let page = 0; page < 10; page++) {
    const reply = await state.conn.call('channels', { after, limit: 1000, read_token: 0 });
    for (const info of reply.channels) applyInfo(info);
    if (!reply.more || !reply.channels.length) break;
    after = reply.channels[reply.channels.length - 1].name;
  }
  renderChannels();
  // Followed from their heads, so unread counts move live.
  for (const ch of [...state.channels.values()].slice(0, FOLLOW_MAX)) follow(ch);
}

function follow(ch) {
  if (ch.followed) return;
  ch.followed = true;
  if (!ch.loaded) ch.last = ch.head;
  state.conn.follow(ch.name).catch((e) => notice(`cannot follow ${ch.label}: ${e.message}`));
}

function renderChannels() {
  const list = $('channels');
  list.textContent = '';
  const sorted = [...state.channels.values()].sort((a, b) => a.label.localeCompare(b.label));
  for (const ch of sorted) {
    const li = document.createElement('li');
    li.dataset.channel = ch.name;
    li.classList.toggle('active', ch.name === state.shown);
    li.classList.toggle('mention', ch.mentions > 0);
    const label = document.createElement('span');
    label.className = 'label';
    label.textContent = ch.label;
    const unread = document.createElement('span');
    unread.className = 'unread';
    unread.textContent = ch.unread > 0 && ch.name !== state.shown ? String(ch.unread) : '';
    li.append(label, unread);
    li.addEventListener('click', () => show(ch.name));
    list.append(li);
  }
}

/** Opens `name`: `#chan`, `chan`, or `@bob[,carol]` for a direct conversation. */
async function openByName(text) {
  const name = text.trim().replace(/^#/, '');
  if (!name) return;
  if (name.startsWith('@')) {
    const others = name.slice(1).split(/[,\s]+/).map((n) => n.replace(/^@/, '')).filter(Boolean);
    return openDirect(others);
  }
  try {
    const detail = await state.conn.call('channel_info', { channel: name, read_token: 0 });
    applyInfo(detail.info);
    channel(name).record = detail.crypto ? bytes(detail.crypto) : null;
  } catch (e) {
    return notice(`cannot open #${name}: ${e.message}`);
  }
  renderChannels();
  await show(name);
}

async function openDirect(others) {
  for (const n of others) {
    if (!crypto.validUserName(n)) return notice(`not a user name: ${n}`);
  }
  const members = [...new Set([state.me.name, ...others])];
  if (members.length < 2) return notice('a direct conversation needs someone else: @bob');
  const name = crypto.directChannelName(members);
  const keys = await keysOf(members);
  const missing = members.filter((m) => !keys[m]);
  if (missing.length) return notice(`not registered yet: ${missing.join(', ')} (they must send a message first)`);
  let detail = await state.conn.call('channel_info', { channel: name, read_token: 0 }).catch(() => null);
  let token = 0;
  if (!detail?.crypto) {
    const made = crypto.createDirect({
      seed: state.me.seed,
      creator: state.me.name,
      cluster: state.cluster,
      channel: name,
      members: members.map((m) => ({ name: m, publicKey: keys[m] })),
    });
    try {
      token = await state.conn.call('channel', {
        channel: name,
        change: { CreateDirect: { members, crypto: Array.from(made.record) } },
      });
    } catch (e) {
      if (e.reason !== 'ChannelExists') return notice(`cannot start the conversation: ${e.message}`);
    }
    detail = await state.conn.call('channel_info', { channel: name, read_token: token });
  }
  const ch = applyInfo(detail.info);
  await unlockDirect(ch, bytes(detail.crypto));
  renderChannels();
  await show(name);
}

async function unlockDirect(ch, record) {
  const members = crypto.directMembers(record);
  await keysOf(members);
  ch.record = record;
  ch.key = crypto.openDirect({
    seed: state.me.seed,
    reader: state.me.name,
    cluster: state.cluster,
    channel: ch.name,
    record,
    creatorKey: (n) => (state.pins[n] ? hexBytes(state.pins[n]) : null),
  });
}

const hexBytes = (h) => Uint8Array.from(h.match(/../g).map((x) => parseInt(x, 16)));

async function show(name) {
  const ch = channel(name);
  state.shown = name;
  location.hash = `channel=${encodeURIComponent(name)}`;
  $('topic').textContent = ch.label + (ch.encrypted ? ' · end-to-end encrypted' : '');
  ch.mentions = 0;
  renderChannels();
  if (ch.encrypted && !ch.key && ch.direct.length) {
    try {
      const detail = await state.conn.call('channel_info', { channel: name, read_token: 0 });
      await unlockDirect(ch, bytes(detail.crypto));
    } catch (e) {
      notice(`cannot open the conversation's key: ${e.message}`);
    }
  }
  if (ch.encrypted && !ch.record) {
    const detail = await state.conn.call('channel_info', { channel: name, read_token: 0 }).catch(() => null);
    if (detail?.crypto) ch.record = bytes(detail.crypto);
  }
  $('unlock').hidden = !(ch.encrypted && !ch.key);
  if (!ch.loaded) {
    ch.loaded = true;
    const batch = await state.conn.call('history', { channel: name, before_seq: null, from_seq: null, limit: PAGE, read_token: 0 });
    ch.messages.clear();
    ch.first = batch.messages.length ? batch.messages[0].seq : null;
    ch.last = 0;
    for (const m of batch.messages) ch.messages.set(m.seq, m);
    ch.last = batch.messages.length ? batch.messages[batch.messages.length - 1].seq : batch.head;
    ch.hasOlder = ch.first !== null && ch.first > Math.max(1, batch.floor);
    ch.head = Math.max(ch.head, batch.head);
    await keysOf([...new Set(batch.messages.map((m) => m.sender))]);
    if (!ch.followed) follow(ch);
    else state.conn.follow(name).catch(() => {});
  }
  ch.unread = 0;
  renderMessages(true);
  renderChannels();
  markRead(ch);
}

// ------------------------------------------------------------------------------------------
// Senders' keys, pinned on first sight.

async function keysOf(names) {
  const wanted = names.filter((n) => !state.pins[n] && !state.keysAsked.has(n));
  if (wanted.length) {
    const asked = state.conn.call('user_keys', { names: wanted }).then((keys) => {
      for (const k of keys) {
        if (!k.public_key) continue;
        const key = hex(k.public_key);
        if (!state.pins[k.name]) state.pins[k.name] = key;
        else if (state.pins[k.name] !== key) state.keyChanged.add(k.name);
      }
      localStorage.setItem(pinKey(), JSON.stringify(state.pins));
    });
    for (const n of wanted) state.keysAsked.set(n, asked.catch(() => {}));
  }
  await Promise.all(names.map((n) => state.keysAsked.get(n)));
  for (const n of names) if (!state.pins[n]) state.keysAsked.delete(n);
  const out = {};
  for (const n of names) if (state.pins[n]) out[n] = hexBytes(state.pins[n]);
  return out;
}

// ------------------------------------------------------------------------------------------
// Messages

function open(ch, m) {
  const keys = ch.key ? { v2: ch.key } : {};
  const opened = crypto.openMessage({
    keys,
    cluster: state.cluster,
    channel: ch.name,
    relation: m.relation,
    sender: m.sender,
    clientSeq: m.client_seq,
    senderKey: state.pins[m.sender] ? hexBytes(state.pins[m.sender]) : null,
    body: bytes(m.body),
  });
  const flags = crypto.markers(opened, { encryptedHistory: ch.encrypted });
  if (state.keyChanged.has(m.sender)) flags.unshift('[key changed!]');
  return { opened, flags };
}

function render(ch, m) {
  const el = document.createElement('div');
  el.className = 'msg';
  el.dataset.channel = ch.name;
  el.dataset.seq = String(m.seq);
  const seq = span('seq', `#${m.seq}`);
  const sender = span('sender', m.sender);
  const time = span('time', relative(m.at_ms));
  time.dataset.at = String(m.at_ms);
  time.title = new Date(m.at_ms).toLocaleString();
  const body = document.createElement('div');
  body.className = 'body';
  const { opened, flags } = open(ch, m);
  let text = opened.display;
  if (m.deleted) {
    el.classList.add('deleted');
    text = '(deleted)';
  } else if (m.edit && m.edit.sender === m.sender) {
    const edited = open(ch, m.edit);
    if (edited.opened.text !== null) text = edited.opened.text;
  }
  if (m.relation?.reply) text = `↪ #${m.relation.reply.to} ${text}`;
  const meta = [];
  if (m.edits > 0 && !m.deleted) meta.push('(edited)');
  for (const r of m.reactions || []) meta.push(`[${r.emoji} ${r.users.length}]`);
  if (m.replies > 0) meta.push(`[${m.replies} repl${m.replies === 1 ? 'y' : 'ies'}]`);
  body.append(span('flags', flags.join(' ')), span('text', text), span('meta', meta.join(' ')));
  el.append(seq, sender, time, body);
  return el;
}

function span(cls, text) {
  const s = document.createElement('span');
  s.className = cls;
  s.textContent = text;
  return s;
}

/** Relations other than replies change their target and show no line of their own. */
const hiddenRelation = (m) => m.relation && !m.relation.reply;

function renderMessages(toBottom) {
  const ch = state.channels.get(state.shown);
  const box = $('messages');
  const scroll = $('scroll');
  const atBottom = toBottom || scroll.scrollHeight - scroll.scrollTop - scroll.clientHeight < 40;
  const oldHeight = scroll.scrollHeight;
  box.textContent = '';
  let day = null;
  for (const seq of [...ch.messages.keys()].sort((a, b) => a - b)) {
    const m = ch.messages.get(seq);
    if (hiddenRelation(m)) continue;
    const d = dayOf(m.at_ms);
    if (d !== day) {
      day = d;
      const div = document.createElement('div');
      div.className = 'day';
      div.textContent = d;
      box.append(div);
    }
    box.append(render(ch, m));
  }
  $('older').hidden = !ch.hasOlder;
  if (atBottom) scroll.scrollTop = scroll.scrollHeight;
  else if (!toBottom) scroll.scrollTop += scroll.scrollHeight - oldHeight;
}

/** Appends messages to a shown channel without redrawing the rest. */
function appendShown(ch, list) {
  const box = $('messages');
  const scroll = $('scroll');
  const atBottom = scroll.scrollHeight - scroll.scrollTop - scroll.clientHeight < 40;
  for (const m of list) {
    if (hiddenRelation(m)) continue;
    box.append(render(ch, m));
  }
  if (atBottom) scroll.scrollTop = scroll.scrollHeight;
}

async function loadOlder() {
  const ch = state.channels.get(state.shown);
  if (!ch || !ch.hasOlder || ch.loadingOlder) return;
  ch.loadingOlder = true;
  try {
    const batch = await state.conn.call('history', {
      channel: ch.name, before_seq: ch.first, from_seq: null, limit: OLDER_PAGE, read_token: 0,
    });
    await keysOf([...new Set(batch.messages.map((m) => m.sender))]);
    for (const m of batch.messages) ch.messages.set(m.seq, m);
    if (batch.messages.length) ch.first = batch.messages[0].seq;
    ch.hasOlder = batch.messages.length > 0 && ch.first > Math.max(1, batch.floor);
    if (state.shown === ch.name) renderMessages(false);
  } catch (e) {
    notice(`cannot load older messages: ${e.message}`);
  } finally {
    ch.loadingOlder = false;
  }
}

async function onBatch(name, batch) {
  const ch = channel(name);
  ch.head = Math.max(ch.head, batch.head);
  const fresh = [];
  let expected = ch.last + 1;
  for (const m of batch.messages) {
    if (m.seq <= ch.last || ch.messages.has(m.seq)) continue;
    if (m.seq > expected && m.seq - 1 > batch.floor && ch.loaded) {
      // A hole: read it before going on, so nothing is skipped.
      const hole = await state.conn.call('history', {
        channel: name, before_seq: null, from_seq: expected, limit: Math.min(m.seq - expected, 1000), read_token: 0,
      });
      for (const h of hole.messages) if (h.seq < m.seq && !ch.messages.has(h.seq)) fresh.push(h);
    }
    fresh.push(m);
    expected = m.seq + 1;
  }
  if (!fresh.length) return;
  await keysOf([...new Set(fresh.map((m) => m.sender))]);
  fresh.sort((a, b) => a.seq - b.seq);
  for (const m of fresh) {
    ch.last = Math.max(ch.last, m.seq);
    clearTyping(name, m.sender);
    if (!ch.loaded) {
      if (m.sender !== state.me.name && !hiddenRelation(m)) {
        ch.unread += 1;
        if (ch.direct.length || mentions(ch, m)) ch.mentions += 1;
      }
      continue;
    }
    ch.messages.set(m.seq, m);
    if (hiddenRelation(m)) refreshTarget(ch, m.relation);
  }
  if (!ch.loaded) {
    renderChannels();
    return;
  }
  if (state.shown === name) {
    appendShown(ch, fresh);
    markRead(ch);
  } else {
    ch.unread += fresh.filter((m) => m.sender !== state.me.name && !hiddenRelation(m)).length;
    renderChannels();
  }
  renderTyping();
}

function mentions(ch, m) {
  const { opened } = open(ch, m);
  return opened.text !== null && opened.text.includes('@' + state.me.name);
}

/** Reads an edited, deleted or reacted-to message again, with its new meta. */
async function refreshTarget(ch, relation) {
  const target = Object.values(relation)[0];
  const seq = target.to ?? target.of;
  if (!ch.messages.has(seq)) return;
  const batch = await state.conn.call('history', { channel: ch.name, before_seq: null, from_seq: seq, limit: 1, read_token: 0 });
  const m = batch.messages.find((x) => x.seq === seq);
  if (!m) return;
  ch.messages.set(seq, m);
  if (state.shown === ch.name) renderMessages(false);
}

let markTimer = null;
function markRead(ch) {
  if (ch.last <= ch.readTo || document.hidden) return;
  if (markTimer) return;
  markTimer = setTimeout(async () => {
    markTimer = null;
    const seq = ch.last;
    try {
      const reply = await state.conn.call('mark_read', { channel: ch.name, seq });
      ch.readTo = Math.max(ch.readTo, reply.read_to);
    } catch {
      // The next message marks again.
    }
  }, MARK_EVERY_MS);
}

// ------------------------------------------------------------------------------------------
// Events from the node

function onEvent(frame) {
  switch (frame.ev) {
    case 'batch':
      onBatch(frame.channel, frame.batch).catch((e) => notice(`reading ${frame.channel}: ${e.message}`));
      break;
    case 'sub_error':
      notice(`stopped following ${frame.channel}: ${frame.message}`);
      channel(frame.channel).followed = false;
      state.conn.follows.delete(frame.channel);
      break;
    case 'presence':
      if (frame.full) state.online = new Set(frame.online);
      else {
        for (const u of frame.online) state.online.add(u);
        for (const u of frame.offline) state.online.delete(u);
      }
      setStatus(null);
      break;
    case 'marker': {
      const ch = state.channels.get(frame.channel);
      if (ch) {
        ch.readTo = Math.max(ch.readTo, frame.read_to);
        if (state.shown !== ch.name) {
          ch.unread = Math.min(ch.unread, Math.max(0, ch.head - ch.readTo));
          renderChannels();
        }
      }
      break;
    }
    case 'added':
      state.conn.call('channel_info', { channel: frame.channel, read_token: 0 }).then(async (detail) => {
        const ch = applyInfo(detail.info);
        if (detail.crypto && ch.direct.length) await unlockDirect(ch, bytes(detail.crypto)).catch(() => {});
        ch.mentions += 1;
        follow(ch);
        renderChannels();
      }).catch(() => {});
      break;
    case 'typing': {
      if (!state.typing.has(frame.channel)) state.typing.set(frame.channel, new Map());
      state.typing.get(frame.channel).set(frame.user, Date.now() + TYPING_SHOW_MS);
      renderTyping();
      break;
    }
  }
}

function watchPresence() {
  state.conn.call('watch_presence').catch(() => {});
}

function clearTyping(channelName, user) {
  state.typing.get(channelName)?.delete(user);
}

function renderTyping() {
  const now = Date.now();
  const who = [...(state.typing.get(state.shown)?.entries() ?? [])].filter(([, until]) => until > now).map(([u]) => u);
  let text = '';
  if (who.length === 1) text = `${who[0]} is typing…`;
  else if (who.length === 2) text = `${who[0]} and ${who[1]} are typing…`;
  else if (who.length > 2) text = `${who[0]}, ${who[1]} and ${who.length - 2} others are typing…`;
  $('typing').textContent = text;
}

let statusLine = '';
let statusWarn = false;
function setStatus(text, warn, sticky) {
  if (text !== null) {
    statusLine = text;
    statusWarn = !!warn;
    if (sticky) setTimeout(() => { if (statusLine === text) setStatus('', false); }, 30000);
  }
  const conn = state.conn;
  const base = conn?.connected && conn.welcome ? `connected to node ${short(conn.welcome.node_id)} (${conn.url}) as ${state.me?.name ?? '…'}` : 'not connected';
  const online = state.online.size ? ` · ${state.online.size} online` : '';
  $('status').textContent = statusLine ? `${statusLine} · ${base}${online}` : base + online;
  $('status').classList.toggle('warn', statusWarn);
}

function notice(text, info) {
  $('notice').textContent = text;
  $('notice').classList.toggle('info', !!info);
}

// ------------------------------------------------------------------------------------------
// Sending and commands

async function send(text, relation = null) {
  const ch = state.channels.get(state.shown);
  if (!ch) return notice('open a channel first: type its name on the left');
  if (ch.encrypted && !ch.key) return notice('unlock the channel first: its passphrase, above');
  const seq = ++state.clientSeq;
  let body;
  const args = {
    seed: state.me.seed, sender: state.me.name, cluster: state.cluster, channel: ch.name,
    relation, clientId: state.clientId, clientSeq: seq, text,
  };
  try {
    body = ch.key ? crypto.sealV2({ key: ch.key, ...args }) : crypto.signPlain(args);
  } catch (e) {
    return notice(e.message);
  }
  try {
    await state.conn.call('send', {
      channel: ch.name, body: Array.from(body), client_id: Array.from(state.clientId), client_seq: seq, relation,
    });
    notice('');
  } catch (e) {
    notice(`not sent: ${e.message}`);
  }
}

const HELP = `/join NAME  open a channel (#name) or a conversation (@bob, @bob,carol)
/dm NAME...  a direct conversation, end-to-end encrypted
/reply N TEXT, /edit N TEXT, /delete N, /react N EMOJI, /unreact N EMOJI
/search WORDS  search what this node can read (depl* a prefix, from:NAME, in:CHANNEL)
/create NAME [private], /invite NAME, /accept, /topic TEXT
/passphrase SECRET  unlock this channel, or encrypt a new one you own
/key  show your key file (paste it into the terminal client's identity file)
//text  sends /text`;

async function command(line) {
  const [cmd, ...rest] = line.slice(1).split(/\s+/);
  const arg = line.slice(1 + cmd.length).trim();
  const ch = state.channels.get(state.shown);
  const num = (s) => (/^#?\d+$/.test(s || '') ? Number(s.replace('#', '')) : null);
  switch (cmd) {
    case 'join':
      return openByName(arg);
    case 'dm':
      return openDirect(rest.map((n) => n.replace(/^@/, '')).filter(Boolean));
    case 'reply':
    case 'edit': {
      const n = num(rest[0]);
      const text = rest.slice(1).join(' ');
      if (n === null || !text) return notice(`/${cmd} N TEXT: which message (its #N) and what text?`);
      return send(text, cmd === 'reply' ? { reply: { to: n } } : { edit: { of: n } });
    }
    case 'delete': {
      const n = num(rest[0]);
      if (n === null) return notice('/delete N: which message (its #N)?');
      return send('', { delete: { of: n } });
    }
    case 'react':
    case 'unreact': {
      const n = num(rest[0]);
      if (n === null || !rest[1]) return notice(`/${cmd} N EMOJI: which message and which emoji?`);
      return send('', { react: { to: n, emoji: rest[1], on: cmd === 'react' } });
    }
    case 'search': {
      if (!arg) return notice('/search WORDS: what to look for?');
      try {
        const reply = await state.conn.call('search', { query: arg, limit: 20, read_token: 0 });
        await keysOf([...new Set(reply.messages.map((m) => m.sender))]);
        const lines = reply.messages.map((m) => `#${m.channel} #${m.seq} ${m.sender}: ${open(channel(m.channel), m).opened.display}`);
        return notice(lines.length ? lines.join('\n') : `nothing found for ${arg}`, true);
      } catch (e) {
        return notice(`search: ${e.message}`);
      }
    }
    case 'create': {
      const name = (rest[0] || '').replace(/^#/, '');
      if (!name) return notice('/create NAME [private]');
      return change(name, { Create: { private: rest[1] === 'private', crypto: null } }).then(() => openByName(name));
    }
    case 'invite':
      if (!ch || !rest[0]) return notice('/invite NAME');
      return change(ch.name, { Invite: rest[0].replace(/^@/, '') });
    case 'accept':
      if (!ch) return notice('open the channel you were invited to first');
      return change(ch.name, 'Accept');
    case 'topic':
      if (!ch) return notice('open a channel first');
      return change(ch.name, { SetTopic: arg || null });
    case 'passphrase':
      if (!ch || !arg) return notice('/passphrase SECRET');
      return ch.record ? unlock(arg) : encrypt(ch, arg);
    case 'key':
      return exportKey();
    case 'help':
      return notice(HELP, true);
    default:
      return notice(`unknown command /${cmd}; /help lists them`);
  }
}

async function change(name, change) {
  try {
    await state.conn.call('channel', { channel: name, change });
    notice('');
  } catch (e) {
    notice(`${e.message}`);
    throw e;
  }
}

async function unlock(passphrase) {
  const ch = state.channels.get(state.shown);
  if (!ch?.record) return;
  const pinned = loadJson(recordKey(), {});
  const record = hex(ch.record);
  if (pinned[ch.name] && pinned[ch.name] !== record) {
    return notice(`#${ch.name}'s encryption record changed since this browser first saw it: not unlocking (a node may be lying).`);
  }
  try {
    notice('deriving the key…', true);
    ch.key = await crypto.unlockChannel(ch.record, passphrase, { cluster: state.cluster, channel: ch.name });
  } catch (e) {
    return notice(e.kind === 'wrong-passphrase' ? 'wrong passphrase' : e.message);
  }
  pinned[ch.name] = record;
  localStorage.setItem(recordKey(), JSON.stringify(pinned));
  notice('');
  $('unlock').hidden = true;
  $('passphrase').value = '';
  renderMessages(false);
}

async function encrypt(ch, passphrase) {
  notice('deriving the key…', true);
  const made = await crypto.makeChannelRecord(passphrase, { cluster: state.cluster, channel: ch.name });
  const detail = await state.conn.call('channel_info', { channel: ch.name, read_token: 0 });
  const owner = detail.info.owner;
  if (owner && owner !== state.me.name) return notice(`only ${owner} can encrypt #${ch.name}`);
  try {
    await change(ch.name, owner ? { SetCrypto: Array.from(made.record) } : { Create: { private: false, crypto: Array.from(made.record) } });
  } catch {
    return;
  }
  ch.record = made.record;
  ch.key = made.key;
  ch.encrypted = true;
  const pinned = loadJson(recordKey(), {});
  pinned[ch.name] = hex(made.record);
  localStorage.setItem(recordKey(), JSON.stringify(pinned));
  notice(`#${ch.name} is now end-to-end encrypted`, true);
  show(ch.name);
}

async function exportKey() {
  const saved = loadJson(idKey(), null);
  if (!saved) return;
  notice(`Your key file (keep it secret; the terminal client reads it as identities/${state.cluster}/${saved.name}.key):\n${saved.key}`, true);
}

function onInput() {
  const text = $('input').value;
  const now = Date.now();
  if (text && !text.startsWith('/') && state.shown && now - state.lastTyping > TYPING_EVERY_MS) {
    state.lastTyping = now;
    state.conn.call('typing', { channel: state.shown }).catch(() => {});
  }
}

async function submit() {
  const input = $('input');
  const text = input.value;
  if (!text.trim()) return;
  input.value = '';
  state.lastTyping = 0;
  if (text.startsWith('/') && !text.startsWith('//')) await command(text.trim());
  else await send(text.startsWith('//') ? text.slice(1) : text);
}

// ------------------------------------------------------------------------------------------
// Wiring

$('login-go').addEventListener('click', () => onLoginClick());
$('login-name').addEventListener('keydown', (e) => e.key === 'Enter' && onLoginClick());
$('join').addEventListener('submit', (e) => {
  e.preventDefault();
  const v = $('join-name').value;
  $('join-name').value = '';
  openByName(v);
});
$('older').addEventListener('click', () => loadOlder());
$('scroll').addEventListener('scroll', () => {
  if ($('scroll').scrollTop < 20) loadOlder();
});
$('input').addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey) {
    e.preventDefault();
    submit();
  }
});
$('input').addEventListener('input', onInput);
$('send').addEventListener('click', () => submit());
$('passphrase-go').addEventListener('click', () => unlock($('passphrase').value));
$('passphrase').addEventListener('keydown', (e) => e.key === 'Enter' && unlock($('passphrase').value));
$('export').addEventListener('click', () => exportKey());
document.addEventListener('visibilitychange', () => {
  const ch = state.channels.get(state.shown);
  if (ch && !document.hidden) markRead(ch);
});
// Relative times stay current, and typing notes run out.
setInterval(() => {
  for (const el of document.querySelectorAll('.msg .time')) el.textContent = relative(Number(el.dataset.at));
  renderTyping();
}, 20000);
setInterval(renderTyping, 1000);

start().catch((e) => showLogin(`the page failed to start: ${e.message}`));
