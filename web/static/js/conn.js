// The socket to a node (web/PROTOCOL.md): calls with ids, retries of retryable errors with
// the same arguments (a send keeps its client id and seq, so a retry is never a second
// message), followed channels, and failover to another member's web address.

const SILENCE_MS = 12000;
const RETRIES = 30;
const NODES_EVERY_MS = 30000;

/** The kind of an ApiError as JSON: "Timeout", "NotLeader", "Rejected", ... */
export function errorKind(err) {
  if (err == null) return 'Unknown';
  return typeof err === 'string' ? err : Object.keys(err)[0];
}

/** The reason of a Rejected ApiError ("NotMember", "Malformed", ...), else null. */
export function rejectReason(err) {
  if (errorKind(err) !== 'Rejected') return null;
  const r = err.Rejected;
  return typeof r === 'string' ? r : Object.keys(r)[0];
}

const RETRYABLE = new Set(['NotLeader', 'Unavailable', 'Aborted', 'Timeout', 'RateLimited']);

/** An answer that is an ApiError. */
export class CallError extends Error {
  constructor(err, message) {
    super(message || errorKind(err));
    this.err = err;
    this.kind = errorKind(err);
    this.reason = rejectReason(err);
  }
}

export class Conn {
  /**
   * handlers: login(welcome) -> Promise<Login args>; event(frame); status(text, warn);
   * after(channel) -> the last seq shown there (where a follow resumes).
   */
  constructor(url, handlers) {
    this.url = url;
    this.handlers = handlers;
    this.nodes = [];
    this.ws = null;
    this.welcome = null;
    this.nextId = 1;
    this.pending = new Map(); // id -> {op, args, resolve, reject, tries}
    this.follows = new Set();
    this.connected = false;
    this.heard = 0;
    this.lost = null; // {node, url} of the node we lost, until reconnected
    this.loggedIn = false;
    setInterval(() => this.watch(), 2000);
    setInterval(() => this.refreshNodes(), NODES_EVERY_MS);
  }

  /** Connects to `url`; resolves with the welcome once logged in. */
  async connect(url) {
    const ws = new WebSocket(url.replace(/^http/, 'ws') + '/ws');
    this.ws = ws;
    const welcome = await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('no welcome')), 5000);
      ws.onmessage = (e) => {
        clearTimeout(timer);
        resolve(JSON.parse(e.data));
      };
      ws.onerror = () => {
        clearTimeout(timer);
        reject(new Error('cannot connect'));
      };
      ws.onclose = () => {
        clearTimeout(timer);
        reject(new Error('closed'));
      };
    });
    if (welcome.ev !== 'welcome') throw new Error('not a cellchat node');
    this.url = url;
    this.welcome = welcome;
    this.heard = Date.now();
    ws.onmessage = (e) => this.onFrame(e.data);
    ws.onclose = (e) => this.onDead(ws, e.reason || `closed (${e.code})`);
    ws.onerror = () => this.onDead(ws, 'socket error');
    this.connected = true;
    return welcome;
  }

  /** Logs in on the current socket with the handler's signature. */
  async login() {
    const args = await this.handlers.login(this.welcome);
    const session = await this.raw('login', args);
    this.loggedIn = true;
    return session;
  }

  onFrame(text) {
    this.heard = Date.now();
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return;
    }
    if (frame.id !== undefined) {
      const call = this.pending.get(frame.id);
      if (!call || call.ws !== this.ws) return;
      this.pending.delete(frame.id);
      if ('ok' in frame) call.resolve(frame.ok);
      else this.failed(call, frame.err, frame.message);
      return;
    }
    if (frame.ev === 'ping') return;
    this.handlers.event(frame);
  }

  failed(call, err, message) {
    const kind = errorKind(err);
    if (RETRYABLE.has(kind) && call.tries < RETRIES && call.retry) {
      call.tries += 1;
      const wait = kind === 'RateLimited' ? Math.min(err.RateLimited.retry_after_ms, 5000) : 200 * call.tries;
      setTimeout(() => this.resend(call), Math.min(wait, 3000));
      return;
    }
    call.reject(new CallError(err, message));
  }

  /** Sends a call on the current socket, or keeps it for the next one. */
  resend(call) {
    const id = this.nextId++;
    call.ws = this.ws;
    this.pending.set(id, call);
    if (this.connected && (this.loggedIn || call.op === 'login')) {
      this.ws.send(JSON.stringify({ id, op: call.op, args: call.args }));
    }
  }

  /** A call that is not retried (login). */
  raw(op, args) {
    return new Promise((resolve, reject) => {
      this.resend({ op, args, resolve, reject, tries: 0, retry: false });
    });
  }

  /** A call, retried on retryable errors and across failover with the same arguments. */
  call(op, args = {}) {
    return new Promise((resolve, reject) => {
      this.resend({ op, args, resolve, reject, tries: 0, retry: true });
    });
  }

  /** Follows `channel` after the seq the page shows there. */
  follow(channel) {
    this.follows.add(channel);
    return this.call('subscribe', { channel, after_seq: this.handlers.after(channel), read_token: 0 });
  }

  watch() {
    if (this.connected && Date.now() - this.heard > SILENCE_MS) {
      this.onDead(this.ws, `no word for ${SILENCE_MS / 1000} s`);
    }
  }

  async refreshNodes() {
    if (!this.connected || !this.loggedIn) return;
    try {
      const nodes = await this.call('nodes');
      if (nodes.length) this.nodes = nodes;
    } catch {
      // Kept from before; the next round tries again.
    }
  }

  onDead(ws, why) {
    if (ws !== this.ws || !this.connected) return;
    this.connected = false;
    this.loggedIn = false;
    try {
      ws.close();
    } catch {
      // Already closed.
    }
    const node = this.welcome ? this.welcome.node_id : '?';
    this.lost = { node, url: this.url };
    this.handlers.status(`lost node ${short(node)} (${why}); looking for another node…`, true);
    this.failover();
  }

  /** Tries every known node, the lost one last, until one takes a login; backs off. */
  async failover() {
    const lost = this.lost;
    for (let round = 0; ; round++) {
      const urls = this.nodes.map((n) => n.web).filter((u) => u !== lost.url);
      urls.push(lost.url);
      for (const url of urls) {
        try {
          await this.connect(url);
          await this.login();
        } catch (e) {
          this.connected = false;
          continue;
        }
        this.lost = null;
        // Calls in flight go again with the same arguments; follows resume after what is shown.
        const calls = [...this.pending.values()];
        this.pending.clear();
        for (const call of calls) if (call.op !== 'subscribe') this.resend(call);
        const resumed = [];
        for (const channel of this.follows) {
          resumed.push(`${channel} after #${this.handlers.after(channel)}`);
          this.call('subscribe', { channel, after_seq: this.handlers.after(channel), read_token: 0 }).catch(() => {});
        }
        this.handlers.status(
          `lost node ${short(lost.node)}; now on node ${short(this.welcome.node_id)} (${url}), resumed ${resumed.join(', ') || 'nothing'}`,
          true,
          true,
        );
        this.handlers.reconnected?.();
        this.refreshNodes();
        return;
      }
      await new Promise((r) => setTimeout(r, Math.min(250 * 2 ** round, 5000)));
    }
  }
}

/** A node id as the status line shows it. */
export function short(id) {
  const s = String(id);
  return s.length > 6 ? s.slice(0, 6) : s;
}
