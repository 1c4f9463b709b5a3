/**
 * The page's websocket to the tower-progress server: framing, liveness and reconnects.
 *
 * Contract with the caller: `onMessage(msg)` receives every server message in order, starting
 * with a `snapshot` on every connection, so the caller rebuilds its state from that snapshot and
 * never has to guess what it missed. `onStatus(status)` reports
 * `{state: "connecting" | "live" | "reconnecting" | "offline", retryAt}`; "live" is reported only
 * after the snapshot has been delivered.
 *
 * A connection is dropped (and a fresh snapshot fetched by reconnecting) when the first frame is
 * not a snapshot, a `seq` is not the previous one plus one, a frame is not JSON, or nothing at
 * all arrives within `pongTimeoutMs` of a ping. Reconnects wait a random time in
 * [0, min(capMs, baseMs * 2^attempt)] (full jitter); the attempt count resets once a connection
 * has stayed live for `stableMs`.
 */

export const DEFAULTS = Object.freeze({
  baseMs: 500,
  capMs: 30_000,
  stableMs: 10_000,
  pingMs: 20_000,
  pongTimeoutMs: 10_000,
});

const CLOSE_PROTOCOL = 4000;
const MAX_EXPONENT = 16;

export class Connection {
  #url;
  #onMessage;
  #onStatus;
  #opt;
  #ws = null;
  #attempt = 0;
  #expectedSeq = null;
  #lastRxAt = 0;
  #pingSentAt = 0;
  #retryTimer = null;
  #stableTimer = null;
  #pingTimer = null;
  #pongTimer = null;
  #running = false;
  #listeners = [];

  /**
   * @param {string} url absolute ws:// or wss:// URL
   * @param {{onMessage: (msg: object) => void, onStatus: (status: object) => void}} handlers
   * @param {Partial<typeof DEFAULTS>} [options]
   */
  constructor(url, { onMessage, onStatus }, options = {}) {
    this.#url = url;
    this.#onMessage = onMessage;
    this.#onStatus = onStatus;
    this.#opt = { ...DEFAULTS, ...options };
  }

  start() {
    if (this.#running) return;
    this.#running = true;
    this.#listen(window, "online", () => this.retryNow());
    this.#listen(window, "offline", () => {
      if (this.#ws === null) this.#goOffline();
    });
    this.#listen(document, "visibilitychange", () => {
      if (document.visibilityState === "visible" && this.#retryTimer !== null) this.retryNow();
    });
    this.#connect();
  }

  stop() {
    this.#running = false;
    for (const [target, type, fn] of this.#listeners) target.removeEventListener(type, fn);
    this.#listeners = [];
    clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    this.#detach(1000, "page closed");
  }

  /** Skip the remaining backoff wait; does nothing while a socket is open or opening. */
  retryNow() {
    if (!this.#running || this.#ws !== null) return;
    clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    this.#connect();
  }

  #listen(target, type, fn) {
    target.addEventListener(type, fn);
    this.#listeners.push([target, type, fn]);
  }

  #status(state, retryAt = null) {
    this.#onStatus({ state, retryAt });
  }

  #connect() {
    this.#retryTimer = null;
    if (!navigator.onLine) {
      this.#goOffline();
      return;
    }
    this.#status("connecting");
    let ws;
    try {
      ws = new WebSocket(this.#url);
    } catch (err) {
      console.error("tower-progress: cannot open websocket", this.#url, err);
      this.#scheduleRetry();
      return;
    }
    this.#ws = ws;
    this.#expectedSeq = null;
    ws.onmessage = (ev) => this.#receive(ev.data);
    ws.onclose = (ev) => this.#closed(ev);
  }

  #receive(data) {
    this.#lastRxAt = performance.now();
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      this.#drop(`frame is not JSON: ${String(data).slice(0, 80)}`);
      return;
    }
    if (msg === null || typeof msg !== "object" || !Number.isInteger(msg.seq)) {
      this.#drop(`frame without a seq: ${String(data).slice(0, 80)}`);
      return;
    }
    if (this.#expectedSeq === null) {
      if (msg.type !== "snapshot") {
        this.#drop(`first frame is ${msg.type}, not a snapshot`);
        return;
      }
    } else if (msg.seq !== this.#expectedSeq) {
      this.#drop(`seq gap: expected ${this.#expectedSeq}, got ${msg.seq}`);
      return;
    }
    this.#expectedSeq = msg.seq + 1;
    if (msg.type === "pong") return;
    if (msg.type === "error") console.warn("tower-progress: server rejected a frame:", msg.message);
    this.#onMessage(msg);
    if (msg.type === "snapshot") this.#becameLive();
  }

  #becameLive() {
    this.#status("live");
    this.#stableTimer = setTimeout(() => {
      this.#attempt = 0;
    }, this.#opt.stableMs);
    this.#pingTimer = setInterval(() => this.#ping(), this.#opt.pingMs);
  }

  #ping() {
    if (this.#ws === null || this.#ws.readyState !== WebSocket.OPEN) return;
    this.#ws.send(JSON.stringify({ type: "ping" }));
    this.#pingSentAt = performance.now();
    clearTimeout(this.#pongTimer);
    this.#pongTimer = setTimeout(() => {
      if (this.#lastRxAt < this.#pingSentAt) {
        this.#drop(`no answer within ${this.#opt.pongTimeoutMs / 1000} s of a ping`);
      }
    }, this.#opt.pongTimeoutMs);
  }

  #closed(ev) {
    if (ev.code !== 1000 && ev.code !== 1001) {
      console.info(`tower-progress: connection closed (code ${ev.code}${ev.reason ? `, ${ev.reason}` : ""})`);
    }
    this.#detach();
    this.#scheduleRetry();
  }

  /** Abandon the current socket because what it sent cannot be trusted, then reconnect. */
  #drop(reason) {
    console.warn(`tower-progress: resyncing: ${reason}`);
    this.#detach(CLOSE_PROTOCOL, reason.slice(0, 100));
    this.#scheduleRetry();
  }

  #detach(code, reason) {
    clearTimeout(this.#stableTimer);
    clearInterval(this.#pingTimer);
    clearTimeout(this.#pongTimer);
    this.#stableTimer = this.#pingTimer = this.#pongTimer = null;
    const ws = this.#ws;
    this.#ws = null;
    if (ws === null) return;
    ws.onmessage = ws.onclose = null;
    if (code !== undefined && ws.readyState < WebSocket.CLOSING) ws.close(code, reason);
  }

  #scheduleRetry() {
    if (!this.#running) return;
    if (!navigator.onLine) {
      this.#goOffline();
      return;
    }
    const ceiling = Math.min(this.#opt.capMs, this.#opt.baseMs * 2 ** Math.min(this.#attempt, MAX_EXPONENT));
    const delay = Math.random() * ceiling;
    this.#attempt += 1;
    this.#retryTimer = setTimeout(() => this.#connect(), delay);
    this.#status("reconnecting", Date.now() + delay);
  }

  #goOffline() {
    clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    this.#attempt = 0;
    this.#status("offline");
  }
}
