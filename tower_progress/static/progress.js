/**
 * The progress page: one store fed by the websocket, one view rendered from the store.
 *
 * Data flow: Connection (socket.js) -> Store.apply*() -> View.render(store). The store is the
 * only place that holds state; the view never keeps data of its own beyond the DOM nodes it
 * reuses, and writes text only through `textContent`. While the connection is not live every
 * number is frozen at the last message and the page is greyed with "last update N ago", so a
 * stale figure is never shown as a live one.
 */

import { Connection } from "./socket.js";

const TERMINAL = new Set(["completed", "failed", "canceled", "lost"]);
const FILTERS = ["all", "completed", "failed", "canceled", "lost"];
const STATE_LABEL = {
  pending: "Pending",
  queued: "Queued",
  running: "Running",
  completed: "Completed",
  failed: "Failed",
  canceled: "Canceled",
  lost: "Lost",
};
const VISIBILITY_HINT = {
  full: "Every ComfyUI event of this prompt is visible.",
  partial: "Steps and current node are visible; start and outcome come from the queue and history.",
  coarse: "Another client's prompt: only queue position and outcome are visible.",
};
const CANCEL_RESULT = {
  interrupted: "Interrupt sent: stops at the next step.",
  deleted: "Removed from the queue.",
};
const MAX_POINTS = 720;
const MAX_FINISHED_SHOWN = 100;
const RENDER_EVERY_MS = 1000;
const NOTIFY_KEY = "tower-progress.notify";
const SVG_NS = "http://www.w3.org/2000/svg";
const GIB = 2 ** 30;
const CLOCK = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
const DAY_CLOCK = new Intl.DateTimeFormat(undefined, {
  weekday: "short",
  hour: "2-digit",
  minute: "2-digit",
});

// --- values and formatting --------------------------------------------------------------------

/** Milliseconds since the epoch from an ISO-8601 string or epoch seconds; null when unusable. */
function parseTime(value) {
  if (typeof value === "number" && Number.isFinite(value)) return value * 1000;
  if (typeof value === "string") {
    const ms = Date.parse(value);
    return Number.isNaN(ms) ? null : ms;
  }
  return null;
}

function num(value) {
  return typeof value === "number" && Number.isFinite(value) ? value : null;
}

/** "45 s", "4 min 12 s", "2 h 05 min": a duration that reads well at a glance. */
function fmtDuration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`;
  return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")} min`;
}

/** "in 40 s", "in 4 min", "in 1 h 12 min": how far away a moment is. */
function fmtIn(seconds) {
  if (seconds <= 0) return "any moment";
  if (seconds < 60) return `in ${Math.ceil(seconds)} s`;
  const minutes = Math.round(seconds / 60);
  if (minutes < 60) return `in ${minutes} min`;
  return `in ${Math.floor(minutes / 60)} h ${String(minutes % 60).padStart(2, "0")} min`;
}

/** "12 s", "4 min", "2 h": how long ago something happened. */
function fmtAgo(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  return `${Math.floor(s / 3600)} h`;
}

function fmtClock(ms, nowMs) {
  const sameDay = new Date(ms).toDateString() === new Date(nowMs).toDateString();
  return (sameDay ? CLOCK : DAY_CLOCK).format(ms);
}

function fmtGiB(bytes) {
  const g = bytes / GIB;
  return g >= 100 ? g.toFixed(0) : g.toFixed(1);
}

function fmtPercent(value) {
  return `${Math.round(value)}%`;
}

function fmtVelocity(velocity) {
  if (!velocity) return null;
  const steps = num(velocity.steps_per_s);
  const frames = num(velocity.frames_per_s);
  const pct = num(velocity.percent_per_min);
  if (steps !== null && steps > 0) {
    return steps >= 1 ? `${steps.toFixed(2)} steps/s` : `${(1 / steps).toFixed(1)} s/step`;
  }
  if (frames !== null && frames > 0) {
    return frames >= 1 ? `${frames.toFixed(1)} frames/s` : `${(1 / frames).toFixed(1)} s/frame`;
  }
  if (pct !== null) return `${pct.toFixed(1)} %/min`;
  return null;
}

function fmtNode(node) {
  if (typeof node === "string") return node;
  if (node && typeof node === "object") return node.title || node.class_type || "";
  return "";
}

function titleOf(job) {
  return job.title || job.prompt_id || job.id;
}

function stageLabel(job) {
  if (job.stage_label) return job.stage_label;
  if (!job.stage) return STATE_LABEL[job.state] ?? job.state;
  return job.stage.charAt(0).toUpperCase() + job.stage.slice(1);
}

function errorHead(error) {
  const parts = [error.exception_type, error.node_type && `in ${error.node_type}`].filter(Boolean);
  return parts.join(" ");
}

function byStart(a, b) {
  return (parseTime(a.started_at) ?? Infinity) - (parseTime(b.started_at) ?? Infinity)
    || String(a.id).localeCompare(String(b.id));
}

function byQueue(a, b) {
  const pa = num(a.queue_position) ?? Infinity;
  const pb = num(b.queue_position) ?? Infinity;
  return pa - pb
    || (parseTime(a.created_at) ?? Infinity) - (parseTime(b.created_at) ?? Infinity)
    || String(a.id).localeCompare(String(b.id));
}

function byFinishedDesc(a, b) {
  return (parseTime(b.finished_at) ?? 0) - (parseTime(a.finished_at) ?? 0)
    || String(b.id).localeCompare(String(a.id));
}

/** Keep at most MAX_POINTS by halving the density of the older half; recent detail survives. */
function thin(points) {
  if (points.length <= MAX_POINTS) return points;
  const half = points.length >> 1;
  return points.slice(0, half).filter((_, i) => i % 2 === 0).concat(points.slice(half));
}

/** `[[ms, percent], ...]` from a samples answer: `{"samples": [{"t", "percent"}, ...]}`. */
function parseSamples(body) {
  const rows = Array.isArray(body?.samples) ? body.samples : [];
  const points = [];
  for (const row of rows) {
    const t = parseTime(row?.t);
    const pct = num(row?.percent);
    if (t !== null && pct !== null) points.push([t, pct]);
  }
  points.sort((a, b) => a[0] - b[0]);
  return points;
}

/** The sample in a resources message: its fields sit beside `type` and `seq` (DESIGN §6). */
function resourcesOf(msg) {
  const { type: _type, seq: _seq, ...flat } = msg;
  return flat;
}

// --- state ------------------------------------------------------------------------------------

/** All page state. Times are client milliseconds unless named for the server. */
class Store {
  jobs = new Map();
  etaAt = new Map();
  samples = new Map();
  resources = null;
  sources = new Map();
  conn = { state: "connecting", retryAt: null };
  lastMessageAt = null;
  clockOffsetMs = 0;
  filter = "all";
  notify = false;
  cancels = new Map();

  get live() {
    return this.conn.state === "live";
  }

  /** The server-clock instant the page shows: now while live, the last message otherwise. */
  viewTime(clientNow) {
    const at = this.live || this.lastMessageAt === null ? clientNow : this.lastMessageAt;
    return at + this.clockOffsetMs;
  }

  /** Rebuild everything from a snapshot; returns the jobs that finished while we were away. */
  applySnapshot(msg, clientNow) {
    const serverMs = parseTime(msg.server_time);
    if (serverMs !== null) this.clockOffsetMs = serverMs - clientNow;
    const before = this.jobs;
    this.jobs = new Map();
    this.etaAt = new Map();
    const finished = [];
    for (const job of Array.isArray(msg.jobs) ? msg.jobs : []) {
      const prev = this.#put(job, clientNow);
      if (prev === undefined) continue;
      const was = before.get(job.id);
      if (was && !TERMINAL.has(was.state) && TERMINAL.has(job.state)) finished.push(job);
    }
    for (const id of [...this.samples.keys()]) {
      if (!this.jobs.has(id)) this.samples.delete(id);
      else this.samples.get(id).requested = false;
    }
    for (const id of [...this.cancels.keys()]) if (!this.jobs.has(id)) this.cancels.delete(id);
    this.resources = msg.resources ?? null;
    this.sources = new Map(Object.entries(msg.sources ?? {}).map(([name, src]) => [
      name, { up: Boolean(src?.up), detail: src?.detail ?? null, since: parseTime(src?.since) },
    ]));
    return finished;
  }

  /** Apply one job update; returns the job when this update finished it, else null. */
  applyJob(job, clientNow) {
    const prev = this.#put(job, clientNow);
    if (prev === undefined) return null;
    if (TERMINAL.has(job.state)) {
      this.cancels.delete(job.id);
      this.samples.delete(job.id);
    }
    return prev && !TERMINAL.has(prev.state) && TERMINAL.has(job.state) ? job : null;
  }

  applyRemoved(id) {
    this.jobs.delete(id);
    this.etaAt.delete(id);
    this.samples.delete(id);
    this.cancels.delete(id);
  }

  applySource(msg, clientNow) {
    const prev = this.sources.get(msg.name);
    const kept = prev && prev.up === Boolean(msg.up) ? prev.since : clientNow + this.clockOffsetMs;
    this.sources.set(msg.name, { up: Boolean(msg.up), detail: msg.detail ?? null, since: parseTime(msg.since) ?? kept });
  }

  /** Merge a fetched history in front of the points that arrived live meanwhile. */
  mergeSamples(id, fetched) {
    const entry = this.samples.get(id);
    if (!entry) return;
    const lastFetched = fetched.length ? fetched[fetched.length - 1][0] : -Infinity;
    entry.points = thin(fetched.concat(entry.points.filter((p) => p[0] > lastFetched)));
  }

  /** Store a job; returns its previous version, null if new, undefined if it was unusable. */
  #put(job, clientNow) {
    if (!job || typeof job !== "object" || typeof job.id !== "string" || typeof job.state !== "string") {
      console.warn("tower-progress: ignoring a job without id/state", job);
      return undefined;
    }
    const prev = this.jobs.get(job.id) ?? null;
    this.jobs.set(job.id, job);
    const serverNow = clientNow + this.clockOffsetMs;
    const eta = num(job.eta_s);
    this.etaAt.set(job.id, parseTime(job.eta_at) ?? (eta !== null ? serverNow + eta * 1000 : null));
    this.#extendSamples(job, serverNow);
    return prev;
  }

  #extendSamples(job, serverNow) {
    const pct = num(job.percent);
    if (job.state !== "running" || job.visibility === "coarse" || pct === null) return;
    let entry = this.samples.get(job.id);
    if (!entry) {
      entry = { points: [], requested: false };
      this.samples.set(job.id, entry);
    }
    const t = parseTime(job.updated_at) ?? serverNow;
    const last = entry.points[entry.points.length - 1];
    if (!last || t > last[0]) {
      entry.points.push([t, pct]);
      entry.points = thin(entry.points);
    } else if (t === last[0]) {
      last[1] = pct;
    }
  }
}

// --- DOM helpers ------------------------------------------------------------------------------

function h(tag, className, attrs = {}) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function setText(node, text) {
  const value = text ?? "";
  if (node.textContent !== value) node.textContent = value;
}

function setAttr(node, name, value) {
  if (value === null || value === undefined) {
    if (node.hasAttribute(name)) node.removeAttribute(name);
  } else if (node.getAttribute(name) !== String(value)) {
    node.setAttribute(name, String(value));
  }
}

/** Toggle the `hidden` attribute (works for SVG too, which has no `hidden` property). */
function show(node, visible) {
  if (node.hasAttribute("hidden") === visible) node.toggleAttribute("hidden", !visible);
}

/** Put `nodes` into `container` in this order, moving only what is out of place (keeps focus). */
function placeInOrder(container, nodes) {
  nodes.forEach((node, i) => {
    const at = container.children[i] ?? null;
    if (at !== node) container.insertBefore(node, at);
  });
}

// --- job card ---------------------------------------------------------------------------------

class Fact {
  constructor(parent, key, label) {
    this.root = h("div", "fact", { "data-fact": key });
    const dt = h("dt");
    dt.textContent = label;
    this.value = h("dd");
    this.root.append(dt, this.value);
    parent.append(this.root);
  }

  set(text) {
    show(this.root, text !== null);
    if (text !== null) setText(this.value, text);
  }
}

class Sparkline {
  constructor(parent) {
    this.root = document.createElementNS(SVG_NS, "svg");
    this.root.setAttribute("class", "spark");
    this.root.setAttribute("viewBox", "0 0 100 24");
    this.root.setAttribute("preserveAspectRatio", "none");
    this.root.setAttribute("aria-hidden", "true");
    this.area = document.createElementNS(SVG_NS, "polygon");
    this.area.setAttribute("class", "spark-area");
    this.line = document.createElementNS(SVG_NS, "polyline");
    this.line.setAttribute("class", "spark-line");
    this.root.append(this.area, this.line);
    parent.append(this.root);
  }

  /** Percent over time from the first point to `until` (server ms); needs two points. */
  draw(points, until) {
    show(this.root, points.length > 1);
    if (points.length < 2) return;
    const t0 = points[0][0];
    const span = Math.max(until - t0, points[points.length - 1][0] - t0, 1000);
    const xy = points.map(([t, p]) => {
      const x = ((t - t0) / span) * 100;
      const y = 23 - (Math.min(100, Math.max(0, p)) / 100) * 22;
      return `${x.toFixed(2)},${y.toFixed(2)}`;
    });
    const lastY = xy[xy.length - 1].split(",")[1];
    xy.push(`${(((until - t0) / span) * 100).toFixed(2)},${lastY}`);
    const line = xy.join(" ");
    setAttr(this.line, "points", line);
    setAttr(this.area, "points", `0,24 ${line} 100,24`);
  }
}

class Card {
  constructor(id) {
    this.root = h("article", "card", { "data-job-id": id });
    const head = h("div", "card-head");
    this.title = h("h3", "card-title");
    const tags = h("div", "tags");
    this.visibility = h("span", "tag tag-vis");
    this.instance = h("span", "tag");
    tags.append(this.visibility, this.instance);
    head.append(this.title, tags);

    const stageRow = h("div", "stage-row");
    this.stage = h("span", "stage");
    this.node = h("span", "node");
    this.percent = h("span", "pct");
    stageRow.append(this.stage, this.node, this.percent);

    this.bar = h("div", "bar", { role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100" });
    this.fill = h("div", "bar-fill");
    this.bar.append(this.fill);

    this.coarseNote = h("p", "note note-coarse");
    this.coarseNote.textContent = "Step detail unavailable: this prompt belongs to another ComfyUI client.";
    this.stalledNote = h("p", "note note-warn");
    this.staleNote = h("p", "note note-stale");

    const facts = h("dl", "facts");
    this.step = new Fact(facts, "step", "Step");
    this.frames = new Fact(facts, "frames", "Frames");
    this.speed = new Fact(facts, "speed", "Speed");
    this.eta = new Fact(facts, "eta", "ETA");
    this.elapsed = new Fact(facts, "elapsed", "Elapsed");
    this.queue = new Fact(facts, "position", "Position");
    this.status = new Fact(facts, "status", "Status");

    this.error = new ErrorBlock();

    this.foot = h("div", "card-foot");
    this.spark = new Sparkline(this.foot);
    this.actions = new CancelControl(this.foot);
    const body = h("div", "card-body");
    body.append(facts, this.foot);

    this.root.append(head, stageRow, this.bar, this.coarseNote, this.stalledNote, this.staleNote,
      body, this.error.root);
  }

  update(job, store, t) {
    const running = job.state === "running";
    const coarse = job.visibility === "coarse";
    const pct = num(job.percent);
    const determinate = running && !coarse && pct !== null;
    this.root.dataset.state = job.state;
    this.root.dataset.visibility = job.visibility ?? "";
    this.root.classList.toggle("is-stale", Boolean(job.stale));
    this.root.classList.toggle("is-stalled", running && Boolean(job.stalled));

    setText(this.title, titleOf(job));
    setText(this.visibility, job.visibility ? `${job.visibility} detail` : "");
    setAttr(this.visibility, "title", VISIBILITY_HINT[job.visibility] ?? null);
    show(this.visibility, Boolean(job.visibility));
    setText(this.instance, job.instance ?? "");
    show(this.instance, Boolean(job.instance));

    setText(this.stage, running && !coarse ? stageLabel(job) : STATE_LABEL[job.state] ?? job.state);
    setText(this.node, running ? fmtNode(job.node) : "");
    setText(this.percent, determinate ? `${Math.floor(pct)}%` : "");

    show(this.bar, running);
    this.bar.classList.toggle("indeterminate", running && !determinate);
    setAttr(this.bar, "aria-label", `${titleOf(job)} progress`);
    setAttr(this.bar, "aria-valuenow", determinate ? Math.floor(pct) : null);
    setAttr(this.bar, "aria-valuetext", running && coarse ? "running, step detail unavailable" : null);
    this.fill.style.width = determinate ? `${Math.min(100, Math.max(0, pct))}%` : "";

    show(this.coarseNote, coarse && !TERMINAL.has(job.state));
    const stalledAt = parseTime(job.stalled?.since);
    show(this.stalledNote, running && stalledAt !== null);
    if (stalledAt !== null) {
      const gpu = num(job.stalled.gpu_utilization);
      setText(this.stalledNote, `Stalled since ${fmtClock(stalledAt, t)}: no progress for ${fmtAgo((t - stalledAt) / 1000)}`
        + (gpu !== null ? `, GPU idle (${fmtPercent(gpu)})` : ""));
    }
    show(this.staleNote, Boolean(job.stale));
    setText(this.staleNote, "Its source is down: last known state, not live.");

    const step = num(job.step);
    const steps = num(job.steps);
    this.step.set(running && steps !== null && !coarse ? `${step ?? 0} / ${steps}` : null);
    const done = num(job.frames_done);
    const total = num(job.frames_total);
    this.frames.set(running && (done !== null || total !== null) ? `${done ?? 0} / ${total ?? "?"}` : null);
    this.speed.set(running && !coarse ? fmtVelocity(job.velocity) ?? "—" : null);
    const etaAt = store.etaAt.get(job.id);
    this.eta.set(etaAt !== null && etaAt !== undefined
      ? `${fmtIn((etaAt - t) / 1000)} · ${fmtClock(etaAt, t)}`
      : running ? "estimating…" : null);
    const started = parseTime(job.started_at);
    const elapsed = started !== null ? (t - started) / 1000 : num(job.elapsed_s);
    this.elapsed.set(running && elapsed !== null ? fmtDuration(elapsed) : null);
    const pos = num(job.queue_position);
    this.queue.set(running ? null : pos !== null && pos > 0 ? `#${pos}` : job.state === "pending" ? "not in ComfyUI yet" : null);
    this.status.set(job.status_raw ? String(job.status_raw) : null);

    this.error.update(job.error);
    const entry = store.samples.get(job.id);
    this.spark.draw(running && !coarse && entry ? entry.points : [], t);
    const actionable = this.actions.update(job, store.cancels.get(job.id));
    show(this.foot, actionable || !this.spark.root.hasAttribute("hidden"));
  }
}

class ErrorBlock {
  constructor() {
    this.root = h("div", "error", { role: "note" });
    this.head = h("p", "error-head");
    this.message = h("p", "error-msg");
    this.root.append(this.head, this.message);
  }

  update(error) {
    const present = Boolean(error && (error.message || error.exception_type || error.node_type));
    show(this.root, present);
    if (!present) return;
    setText(this.head, errorHead(error) || "Error");
    setText(this.message, error.message ?? "");
    show(this.message, Boolean(error.message));
  }
}

/** Cancel button with an inline confirmation step; `phase` lives in Store.cancels. */
class CancelControl {
  constructor(parent) {
    this.root = h("div", "actions");
    this.cancel = h("button", "btn btn-quiet", { type: "button", "data-action": "cancel" });
    this.cancel.textContent = "Cancel…";
    this.confirm = h("div", "confirm", { role: "group", "aria-label": "Confirm cancel" });
    const ask = h("span", "confirm-q");
    ask.textContent = "Cancel this job?";
    const yes = h("button", "btn btn-danger", { type: "button", "data-action": "confirm-cancel" });
    yes.textContent = "Yes, cancel";
    this.keep = h("button", "btn", { type: "button", "data-action": "keep" });
    this.keep.textContent = "Keep";
    this.confirm.append(ask, yes, this.keep);
    this.message = h("span", "cancel-msg", { role: "status", tabindex: "-1" });
    this.root.append(this.cancel, this.confirm, this.message);
    parent.append(this.root);
  }

  /** Returns whether anything is shown. */
  update(job, cancel) {
    const phase = cancel?.phase ?? "idle";
    const cancellable = job.state === "running" || job.state === "queued";
    show(this.cancel, cancellable && (phase === "idle" || phase === "error"));
    show(this.confirm, cancellable && phase === "confirm");
    setText(this.message, cancel?.message ?? "");
    show(this.message, Boolean(cancel?.message));
    this.message.classList.toggle("is-error", phase === "error");
    return cancellable || Boolean(cancel?.message);
  }
}

// --- finished row -----------------------------------------------------------------------------

class FinishedRow {
  constructor(id) {
    this.root = h("li", "row", { "data-job-id": id });
    this.badge = h("span", "badge");
    const main = h("div", "row-main");
    this.title = h("span", "row-title");
    this.meta = h("span", "row-meta");
    this.error = new ErrorBlock();
    main.append(this.title, this.meta, this.error.root);
    this.root.append(this.badge, main);
  }

  update(job, t) {
    this.root.dataset.state = job.state;
    setText(this.badge, STATE_LABEL[job.state] ?? job.state);
    setText(this.title, titleOf(job));
    const started = parseTime(job.started_at);
    const ended = parseTime(job.finished_at);
    const took = num(job.elapsed_s) ?? (started !== null && ended !== null ? (ended - started) / 1000 : null);
    const seen = parseTime(job.last_seen_at);
    const meta = [
      took !== null ? `took ${fmtDuration(took)}` : null,
      ended !== null ? `ended ${fmtClock(ended, t)}` : null,
      job.state === "lost" && seen !== null ? `last seen ${fmtClock(seen, t)}` : null,
      job.instance || null,
    ].filter(Boolean);
    setText(this.meta, meta.join(" · "));
    this.error.update(job.error);
  }
}

// --- gauges -----------------------------------------------------------------------------------

class Gauge {
  constructor(label) {
    this.root = h("div", "gauge");
    const top = h("div", "gauge-top");
    const name = h("span", "gauge-label");
    name.textContent = label;
    this.value = h("span", "gauge-value");
    top.append(name, this.value);
    this.bar = h("div", "gauge-bar", { role: "meter", "aria-label": label, "aria-valuemin": "0", "aria-valuemax": "100" });
    this.fill = h("div", "gauge-fill");
    this.bar.append(this.fill);
    this.sub = h("span", "gauge-sub");
    this.root.append(top, this.bar, this.sub);
  }

  update(percent, sub, warnHigh) {
    const p = num(percent);
    setText(this.value, p === null ? "—" : fmtPercent(p));
    setAttr(this.bar, "aria-valuenow", p === null ? null : Math.round(p));
    this.fill.style.width = p === null ? "0%" : `${Math.min(100, Math.max(0, p))}%`;
    this.root.classList.toggle("is-high", warnHigh && p !== null && p >= 90);
    setText(this.sub, sub);
  }
}

function ratio(used, total) {
  const u = num(used);
  const t = num(total);
  return u !== null && t ? (u / t) * 100 : null;
}

function join(...parts) {
  return parts.filter(Boolean).join(" · ");
}

/** The gauges to show for a resources message, as [key, label, percent, sub] rows. */
function gaugeRows(res) {
  const rows = [];
  const gpus = Array.isArray(res?.gpus) ? res.gpus : [];
  if (!gpus.length) {
    rows.push(["gpu", "GPU", null, res?.gpu_status || "no GPU"]);
  }
  for (const gpu of gpus) {
    const n = gpus.length > 1 ? ` ${gpu.index}` : "";
    const temp = num(gpu.temperature_c);
    const power = num(gpu.power_w);
    const limit = num(gpu.power_limit_w);
    rows.push([`gpu${gpu.index}`, `GPU${n}`, num(gpu.utilization), join(
      gpu.name,
      temp !== null && `${Math.round(temp)} °C`,
      power !== null && `${Math.round(power)}${limit !== null ? ` / ${Math.round(limit)}` : ""} W`,
    )]);
    const used = num(gpu.vram_used);
    const total = num(gpu.vram_total);
    const comfy = num(gpu.comfyui_vram);
    rows.push([`vram${gpu.index}`, `VRAM${n}`, ratio(used, total), join(
      used !== null && total !== null && `${fmtGiB(used)} / ${fmtGiB(total)} GiB`,
      comfy !== null && `ComfyUI ${fmtGiB(comfy)} GiB`,
    )]);
  }
  const comfyCpu = num(res?.comfyui_cpu_percent);
  rows.push(["cpu", "CPU", num(res?.cpu_percent), comfyCpu !== null ? `ComfyUI ${Math.round(comfyCpu)}%` : ""]);
  const ramUsed = num(res?.ram_used);
  const ramTotal = num(res?.ram_total);
  const rss = num(res?.comfyui_rss);
  rows.push(["ram", "RAM", ratio(ramUsed, ramTotal), join(
    ramUsed !== null && ramTotal !== null && `${fmtGiB(ramUsed)} / ${fmtGiB(ramTotal)} GiB`,
    rss !== null && `ComfyUI ${fmtGiB(rss)} GiB`,
  )]);
  return rows;
}

// --- the view ---------------------------------------------------------------------------------

class View {
  cards = new Map();
  rows = new Map();
  gauges = new Map();

  constructor() {
    const $ = (id) => document.getElementById(id);
    this.el = {
      conn: $("conn"), connText: $("conn-text"), retry: $("retry"), notify: $("notify"),
      staleBanner: $("stale-banner"), gauges: $("gauges"), sources: $("sources"),
      running: $("running"), runningEmpty: $("running-empty"), queue: $("queue"),
      queueEmpty: $("queue-empty"), finished: $("finished"), finishedEmpty: $("finished-empty"),
      finishedMore: $("finished-more"), filters: $("filters"), announce: $("announce"),
    };
  }

  render(store, clientNow) {
    const t = store.viewTime(clientNow);
    this.#connection(store, clientNow);
    this.#gauges(store);
    this.#sources(store, t);
    this.#active(store, t);
    this.#finished(store, t);
    this.#title(store);
  }

  #connection(store, clientNow) {
    const { state, retryAt } = store.conn;
    document.body.classList.toggle("is-stale", !store.live);
    this.el.conn.dataset.state = state;
    let text = "Connecting…";
    if (state === "live") text = "Live";
    else if (state === "offline") text = "Offline";
    else if (state === "reconnecting") {
      const wait = Math.max(0, Math.ceil((retryAt - clientNow) / 1000));
      text = wait > 0 ? `Reconnecting in ${wait} s` : "Reconnecting…";
    }
    setText(this.el.connText, text);
    show(this.el.retry, state === "reconnecting");
    show(this.el.staleBanner, !store.live);
    if (!store.live) {
      setText(this.el.staleBanner, store.lastMessageAt === null
        ? "Not connected yet: no data to show."
        : `Disconnected: last update ${fmtAgo((clientNow - store.lastMessageAt) / 1000)} ago. Showing the last known state, not live.`);
    }
  }

  #gauges(store) {
    const rows = gaugeRows(store.resources);
    const keys = rows.map((r) => r[0]);
    for (const [key, label] of rows) {
      if (!this.gauges.has(key)) this.gauges.set(key, new Gauge(label));
    }
    for (const key of [...this.gauges.keys()]) {
      if (!keys.includes(key)) {
        this.gauges.get(key).root.remove();
        this.gauges.delete(key);
      }
    }
    placeInOrder(this.el.gauges, keys.map((k) => this.gauges.get(k).root));
    for (const [key, , pct, sub] of rows) this.gauges.get(key).update(pct, sub, !key.startsWith("gpu") && key !== "cpu");
    const down = store.sources.get("resources");
    this.el.gauges.classList.toggle("is-stale", Boolean(down && !down.up));
  }

  #sources(store, t) {
    const names = [...store.sources.keys()].sort();
    const items = names.map((name) => {
      const src = store.sources.get(name);
      let li = this.el.sources.querySelector(`li[data-source="${CSS.escape(name)}"]`);
      if (!li) {
        li = h("li", "source", { "data-source": name });
        li.append(h("span", "source-dot", { "aria-hidden": "true" }), h("span", "source-name"), h("span", "source-detail"));
      }
      const since = src.since !== null ? ` since ${fmtClock(src.since, t)}` : "";
      const detail = src.detail ? `: ${src.detail}` : "";
      li.classList.toggle("is-down", !src.up);
      setText(li.children[1], name);
      setText(li.children[2], src.up ? "" : `down${since}${detail}`);
      setAttr(li, "title", `${src.up ? "up" : "down"}${since}${detail}`);
      return li;
    });
    for (const li of [...this.el.sources.children]) if (!items.includes(li)) li.remove();
    placeInOrder(this.el.sources, items);
  }

  #active(store, t) {
    const running = [];
    const waiting = [];
    for (const job of store.jobs.values()) {
      if (TERMINAL.has(job.state)) continue;
      (job.state === "running" ? running : waiting).push(job);
    }
    running.sort(byStart);
    waiting.sort(byQueue);
    const activeIds = new Set([...running, ...waiting].map((j) => j.id));
    for (const [id, card] of this.cards) {
      if (!activeIds.has(id)) {
        card.root.remove();
        this.cards.delete(id);
      }
    }
    const cardFor = (job) => {
      let card = this.cards.get(job.id);
      if (!card) {
        card = new Card(job.id);
        this.cards.set(job.id, card);
      }
      card.update(job, store, t);
      return card.root;
    };
    placeInOrder(this.el.running, running.map(cardFor));
    placeInOrder(this.el.queue, waiting.map(cardFor));
    show(this.el.runningEmpty, running.length === 0);
    show(this.el.queueEmpty, waiting.length === 0);
  }

  #finished(store, t) {
    const all = [...store.jobs.values()].filter((j) => TERMINAL.has(j.state)).sort(byFinishedDesc);
    const counts = { all: all.length };
    for (const job of all) counts[job.state] = (counts[job.state] ?? 0) + 1;
    for (const button of this.el.filters.querySelectorAll("[data-filter]")) {
      const key = button.dataset.filter;
      setAttr(button, "aria-pressed", key === store.filter ? "true" : "false");
      setText(button.querySelector(".count"), String(counts[key] ?? 0));
    }
    const shown = all.filter((j) => store.filter === "all" || j.state === store.filter);
    const visible = shown.slice(0, MAX_FINISHED_SHOWN);
    const ids = new Set(visible.map((j) => j.id));
    for (const [id, row] of this.rows) {
      if (!ids.has(id)) {
        row.root.remove();
        this.rows.delete(id);
      }
    }
    placeInOrder(this.el.finished, visible.map((job) => {
      let row = this.rows.get(job.id);
      if (!row) {
        row = new FinishedRow(job.id);
        this.rows.set(job.id, row);
      }
      row.update(job, t);
      return row.root;
    }));
    show(this.el.finishedEmpty, shown.length === 0);
    setText(this.el.finishedEmpty, all.length === 0 ? "No finished jobs yet." : `No ${store.filter} jobs.`);
    show(this.el.finishedMore, shown.length > visible.length);
    setText(this.el.finishedMore, `Showing the latest ${visible.length} of ${shown.length}.`);
  }

  #title(store) {
    const running = [...store.jobs.values()].filter((j) => j.state === "running").sort(byStart);
    let title = "tower-progress";
    if (running.length) {
      const job = running[0];
      const pct = num(job.percent);
      const lead = job.visibility !== "coarse" && pct !== null ? `${Math.floor(pct)}%` : "running";
      const more = running.length > 1 ? ` (+${running.length - 1})` : "";
      title = `${lead} ${titleOf(job)}${more} · tower-progress`;
    }
    if (!store.live) title = `(stale) ${title}`;
    if (document.title !== title) document.title = title;
  }
}

/** localStorage, which private modes may refuse: the setting then lasts for this page only. */
function readSetting(key) {
  try {
    return localStorage.getItem(key);
  } catch {
    return null;
  }
}

function writeSetting(key, value) {
  try {
    localStorage.setItem(key, value);
  } catch (err) {
    console.warn(`tower-progress: setting ${key} not saved: ${err.message}`);
  }
}

// --- wiring -----------------------------------------------------------------------------------

class App {
  store = new Store();
  view = new View();
  connection = null;
  #token = new URLSearchParams(location.search).get("token");
  #renderQueued = false;

  start() {
    this.store.notify = this.#notifySupported() && Notification.permission === "granted"
      && readSetting(NOTIFY_KEY) === "on";
    document.addEventListener("click", (ev) => this.#onClick(ev));
    document.addEventListener("keydown", (ev) => this.#onKey(ev));
    const url = this.#url("ws");
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    if (this.#token) url.searchParams.set("token", this.#token);
    this.connection = new Connection(url.href, {
      onMessage: (msg) => this.#onMessage(msg),
      onStatus: (status) => {
        this.store.conn = status;
        this.#render();
      },
    });
    this.connection.start();
    setInterval(() => this.#render(), RENDER_EVERY_MS);
    this.#renderNotify();
    this.#render();
  }

  /** The API takes the token as a bearer header; only the websocket needs it in the URL. */
  #url(path) {
    return new URL(path, document.baseURI);
  }

  #headers() {
    return this.#token ? { Authorization: `Bearer ${this.#token}` } : {};
  }

  /** Coalesce renders: many messages in one task cost one render. */
  #render() {
    if (this.#renderQueued) return;
    this.#renderQueued = true;
    queueMicrotask(() => {
      this.#renderQueued = false;
      this.view.render(this.store, Date.now());
    });
  }

  #onMessage(msg) {
    const now = Date.now();
    const store = this.store;
    store.lastMessageAt = now;
    switch (msg.type) {
      case "snapshot":
        store.applySnapshot(msg, now).forEach((job) => this.#finishedJob(job));
        break;
      case "job": {
        const finished = store.applyJob(msg.job, now);
        if (finished) this.#finishedJob(finished);
        break;
      }
      case "job_removed":
        store.applyRemoved(msg.id);
        break;
      case "milestone": {
        const job = store.jobs.get(msg.id);
        if (job) this.#announce(`${titleOf(job)} reached ${msg.percent}%`);
        break;
      }
      case "resources":
        store.resources = resourcesOf(msg);
        break;
      case "source":
        store.applySource(msg, now);
        break;
      case "error":
        break;
      default:
        console.warn(`tower-progress: ignoring unknown message type ${msg.type}`);
    }
    this.#fetchMissingSamples();
    this.#render();
  }

  /** Each running job's history is fetched once per connection, then extended live. */
  #fetchMissingSamples() {
    for (const [id, entry] of this.store.samples) {
      if (entry.requested) continue;
      entry.requested = true;
      fetch(this.#url(`api/jobs/${encodeURIComponent(id)}/samples`), { headers: this.#headers() })
        .then((res) => {
          if (!res.ok) throw new Error(`HTTP ${res.status}`);
          return res.json();
        })
        .then((body) => {
          this.store.mergeSamples(id, parseSamples(body));
          this.#render();
        })
        .catch((err) => console.warn(`tower-progress: samples for job ${id} unavailable: ${err.message}`));
    }
  }

  #finishedJob(job) {
    this.#announce(`${titleOf(job)}: ${STATE_LABEL[job.state] ?? job.state}`);
    if (!this.store.notify || !document.hidden) return;
    if (job.state !== "completed" && job.state !== "failed") return;
    if (Notification.permission !== "granted") return;
    const body = job.state === "failed" ? job.error?.message || "Failed" : "Completed";
    try {
      new Notification(`${titleOf(job)}: ${STATE_LABEL[job.state]}`, { body, tag: `tower-progress-${job.id}` });
    } catch (err) {
      console.warn(`tower-progress: notification for job ${job.id} not shown: ${err.message}`);
    }
  }

  #announce(text) {
    setText(this.view.el.announce, text);
  }

  #notifySupported() {
    return "Notification" in window && window.isSecureContext;
  }

  #onClick(ev) {
    const target = ev.target instanceof Element ? ev.target.closest("button") : null;
    if (!target) return;
    if (target === this.view.el.retry) {
      this.connection.retryNow();
      return;
    }
    if (target === this.view.el.notify) {
      this.#toggleNotify();
      return;
    }
    if (target.dataset.filter) {
      this.store.filter = FILTERS.includes(target.dataset.filter) ? target.dataset.filter : "all";
      this.#render();
      return;
    }
    const id = target.closest("[data-job-id]")?.dataset.jobId;
    if (id === undefined) return;
    const card = this.view.cards.get(id);
    switch (target.dataset.action) {
      case "cancel":
        this.store.cancels.set(id, { phase: "confirm", message: null });
        this.view.render(this.store, Date.now());
        card?.actions.keep.focus();
        break;
      case "keep":
        this.store.cancels.delete(id);
        this.view.render(this.store, Date.now());
        card?.actions.cancel.focus();
        break;
      case "confirm-cancel":
        this.#cancel(id);
        card?.actions.message.focus();
        break;
      default:
    }
  }

  #onKey(ev) {
    if (ev.key !== "Escape") return;
    const id = ev.target instanceof Element ? ev.target.closest("[data-job-id]")?.dataset.jobId : undefined;
    if (id === undefined || this.store.cancels.get(id)?.phase !== "confirm") return;
    this.store.cancels.delete(id);
    this.view.render(this.store, Date.now());
    this.view.cards.get(id)?.actions.cancel.focus();
  }

  async #cancel(id) {
    const cancels = this.store.cancels;
    cancels.set(id, { phase: "pending", message: "Canceling…" });
    this.view.render(this.store, Date.now());
    let outcome;
    try {
      const res = await fetch(this.#url(`api/jobs/${encodeURIComponent(id)}/cancel`), {
        method: "POST",
        headers: this.#headers(),
      });
      const text = await res.text();
      let body = {};
      try {
        body = JSON.parse(text) ?? {};
      } catch {
        body = { error: text.trim() };
      }
      outcome = res.ok
        ? { phase: "sent", message: CANCEL_RESULT[body.result] ?? "Cancel requested." }
        : { phase: "error", message: `Cancel failed: ${body.error || `HTTP ${res.status}`}` };
    } catch (err) {
      outcome = { phase: "error", message: `Cancel failed: ${err.message}` };
    }
    if (cancels.has(id)) cancels.set(id, outcome);
    this.#render();
  }

  async #toggleNotify() {
    if (this.store.notify) {
      this.store.notify = false;
    } else {
      const permission = Notification.permission === "default"
        ? await Notification.requestPermission()
        : Notification.permission;
      this.store.notify = permission === "granted";
    }
    writeSetting(NOTIFY_KEY, this.store.notify ? "on" : "off");
    this.#renderNotify();
  }

  #renderNotify() {
    const button = this.view.el.notify;
    show(button, this.#notifySupported());
    if (!this.#notifySupported()) return;
    const denied = Notification.permission === "denied";
    button.disabled = denied;
    setAttr(button, "aria-pressed", this.store.notify ? "true" : "false");
    setText(button, denied ? "Notifications blocked" : this.store.notify ? "Notifications on" : "Notify me");
    setAttr(button, "title", denied
      ? "Notifications are blocked in this browser's site settings."
      : "Show a browser notification when a job completes or fails while this tab is hidden.");
  }
}

new App().start();
