"use strict";
/* Synapse console: goals list, goal page (DAG, tasks, timeline, events) and system page.
 *
 * Rules kept throughout:
 *  - the DOM is built with createElement + textContent only (el() below); the one exception
 *    is the server's DAG svg, parsed with DOMParser and imported (never innerHTML);
 *  - no polling: data is fetched on navigation, after an action, and when the
 *    Server-Sent Events stream (api/events) reports a change;
 *  - URLs are relative so the console works behind a path prefix.
 */

const GOAL_STATUSES = ["submitted", "planning", "running", "succeeded", "failed", "cancelled"];
const ENDED = new Set(["succeeded", "failed", "cancelled"]);
const TASK_ENDED = new Set(["succeeded", "failed", "skipped", "cancelled"]);
const FILTER_KEYS = ["status", "q", "template", "owner", "since", "until", "before"];
const TASK_COLUMNS = ["step", "action", "status", "attempts", "queue", "started", "duration", "input", "result", "error / skip reason"];
const MAX_INSTANCE_ROWS = 500; // rows of a map's instances in the task table
const MAX_TIMELINE_INSTANCES = 200; // above this a map gets one aggregated timeline bar
const MAX_EVENTS = 2000; // events listed (the newest ones)

const state = {
  view: null, // "goals" | "goal" | "system" | "notfound"
  id: null, // goal id on the goal page
  params: new URLSearchParams(), // goals-list filters from the hash
  token: 0, // bumped on every navigation: stale answers are dropped
  goal: null, // last goal shown
  childIds: new Set(), // child goals of the goal shown (their changes refresh it)
  selected: null, // selected step
  expanded: new Set(), // map steps whose instances are shown
  dir: readStored("synapse.dagDir") === "TB" ? "TB" : "LR",
  zoom: 1,
  fit: false,
};

/* ---------- DOM helpers ---------- */

const $ = (selector, root = document) => root.querySelector(selector);

/** Replaces a node's children (same rules as append). */
function fill(node, ...children) { node.replaceChildren(); return append(node, children); }

/** Appends children: strings/numbers become text nodes; null, false, "" are skipped; arrays are flattened. */
function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child == null || child === false || child === "") continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** el("a", {href, class, id, dataset: {step}, onclick}, ...children) — never parses markup. */
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value == null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") {
      for (const [k, v] of Object.entries(value)) if (v != null) node.dataset[k] = String(v);
    } else if (key === "value") node.value = value;
    else if (typeof value === "function") node.addEventListener(key.replace(/^on/, ""), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  return append(node, children);
}

const dash = () => el("span", { class: "muted" }, "—");
const emptyRow = (columns, text) => el("tr", { class: "empty" }, el("td", { colspan: columns }, text));
const childLink = (id) => el("a", { class: "child-goal", href: `#/goals/${id}` }, `child goal ${id}`);

/** A status badge: span.status.status-<status>. */
function badge(status, id) {
  const text = String(status ?? "unknown");
  return el("span", { class: `status status-${text.replace(/[^\w-]/g, "")}`, id }, text);
}

/** A table with a header row; `cells(row)` gives values or <td>s; empty → one "none" row. */
function dataTable(columns, rows, cells, attrs) {
  const body = rows.map((row) => el("tr", {}, cells(row).map((c) => (c instanceof HTMLTableCellElement ? c : el("td", {}, c ?? dash())))));
  return el("table", { class: "grid", ...attrs },
    el("thead", {}, el("tr", {}, columns.map((c) => el("th", {}, c)))),
    el("tbody", {}, body.length ? body : emptyRow(columns.length, "none")));
}

/** Keeps <details data-key> open across a re-render of `root`. */
function keepOpenDetails(root, render) {
  const open = new Set([...root.querySelectorAll("details[open][data-key]")].map((d) => d.dataset.key));
  render();
  for (const d of root.querySelectorAll("details[data-key]")) if (open.has(d.dataset.key)) d.open = true;
}

// localStorage may be unavailable (privacy modes): then the setting lives in memory only
function readStored(key) { try { return localStorage.getItem(key); } catch { return null; } }
function store(key, value) { try { localStorage.setItem(key, value); } catch { /* in memory only */ } }

/* ---------- JSON and text ---------- */

const clip = (text, max) => (text.length > max ? `${text.slice(0, max - 1)}…` : text);

function oneLine(value) { try { return JSON.stringify(value) ?? String(value); } catch { return String(value); } }
function pretty(value) { try { return JSON.stringify(value, null, 2) ?? String(value); } catch { return String(value); } }
const preview = (value, max = 60) => clip(oneLine(value), max);

/** Small JSON inline; large JSON folded in <details> with a one-line preview (≤ 60 chars). */
function jsonBlock(value, key) {
  if (value === null || value === undefined) return dash();
  const line = oneLine(value);
  if (line.length <= 60) return el("code", { class: "json" }, line);
  return el("details", { class: "json", dataset: { key } }, el("summary", {}, preview(value)), el("pre", {}, pretty(value)));
}

/** Free text (errors): inline when short, folded when long or multi-line. */
function textBlock(value, key, cls) {
  const text = typeof value === "string" ? value : pretty(value);
  if (text.length <= 120 && !text.includes("\n")) return el("span", { class: cls }, text);
  return el("details", { class: cls, dataset: { key } }, el("summary", {}, clip(text.replace(/\s+/g, " "), 80)), el("pre", {}, text));
}

/* ---------- time ---------- */

/** Milliseconds of an ISO (or Postgres text) timestamp, or null. */
function parseTime(value) {
  if (!value) return null;
  const text = String(value).replace(" ", "T").replace(/(\.\d{3})\d+/, "$1").replace(/(:\d\d(?:\.\d+)?[+-]\d\d)$/, "$1:00");
  const ms = Date.parse(text);
  return Number.isNaN(ms) ? null : ms;
}

const sameDay = (a, b) => new Date(a).toDateString() === new Date(b).toDateString();

function fmtLocal(ms) {
  return new Date(ms).toLocaleString(undefined, { year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit" });
}
/** Time of day (with milliseconds if asked) for today, the full local time otherwise. */
function fmtClock(ms, millis) {
  if (!sameDay(ms, Date.now())) return fmtLocal(ms);
  const options = { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false };
  if (millis) options.fractionalSecondDigits = 3;
  return new Date(ms).toLocaleTimeString(undefined, options);
}
/** "3 min ago", "in 2 h"; the local date past 30 days. */
function fmtRelative(ms) {
  const diff = Date.now() - ms, s = Math.floor(Math.abs(diff) / 1000);
  if (s < 10) return diff >= 0 ? "just now" : "in a moment";
  if (s >= 30 * 86400) return fmtLocal(ms);
  const text = s < 60 ? `${s} s` : s < 3600 ? `${Math.floor(s / 60)} min` : s < 86400 ? `${Math.floor(s / 3600)} h` : `${Math.floor(s / 86400)} d`;
  return diff >= 0 ? `${text} ago` : `in ${text}`;
}
function fmtDuration(ms) {
  if (ms == null || !Number.isFinite(ms)) return "";
  ms = Math.max(0, ms);
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const s = ms / 1000;
  if (s < 10) return `${s.toFixed(1)} s`;
  if (s < 60) return `${Math.floor(s)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${String(Math.floor(s % 60)).padStart(2, "0")}s`;
  const h = Math.floor(m / 60);
  if (h < 24) return `${h}h ${String(m % 60).padStart(2, "0")}m`;
  return `${Math.floor(h / 24)}d ${h % 24}h`;
}
/** Elapsed seconds on the timeline axis: 0s, 1.5s, 30s, 2m, 1h30m. */
function fmtElapsed(s) {
  if (s < 60) return `${+s.toFixed(1)}s`;
  if (s < 3600) return s % 60 ? `${Math.floor(s / 60)}m${Math.round(s % 60)}s` : `${s / 60}m`;
  const h = Math.floor(s / 3600), m = Math.round((s % 3600) / 60);
  return m ? `${h}h${m}m` : `${h}h`;
}

/** <time> in local time ("local", "clock" or "relative"), the server's ISO text in its title. */
function timeEl(iso, mode = "local") {
  const ms = parseTime(iso);
  if (ms == null) return dash();
  const text = mode === "relative" ? fmtRelative(ms) : mode === "clock" ? fmtClock(ms, false) : mode === "ms" ? fmtClock(ms, true) : fmtLocal(ms);
  return el("time", { datetime: new Date(ms).toISOString(), title: String(iso) }, text);
}

/** "12.3 s", or "4m 05s …" while still going (measured up to now). */
function durationText(startIso, endIso) {
  const start = parseTime(startIso);
  if (start == null) return "";
  const end = parseTime(endIso);
  return end == null ? `${fmtDuration(Date.now() - start)} …` : fmtDuration(end - start);
}

/** ISO → value for <input type=datetime-local> (local time). */
function toLocalInput(iso) {
  const ms = parseTime(iso);
  if (ms == null) return "";
  const d = new Date(ms), p = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}`;
}

/* ---------- API ---------- */

class ApiError extends Error {
  constructor(message, status, sqlstate) { super(message); Object.assign(this, { status, sqlstate }); }
}

const csrfToken = () => (document.querySelector('meta[name="synapse-csrf"]') || {}).content || "";

/** GET `path`, or POST `body` as JSON with the CSRF token; resolves to the JSON answer. */
async function api(path, body) {
  const init = { headers: { Accept: "application/json" }, credentials: "same-origin" };
  if (body !== undefined) {
    init.method = "POST";
    init.headers["Content-Type"] = "application/json";
    init.headers["X-CSRF-Token"] = csrfToken();
    init.body = JSON.stringify(body);
  }
  let response;
  try { response = await fetch(path, init); } catch (e) { throw new ApiError(`cannot reach the server (${e.message})`, 0, null); }
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { /* not JSON */ }
  if (!response.ok) {
    const message = data && typeof data.error === "string" ? data.error : `HTTP ${response.status} ${response.statusText}`.trim();
    throw new ApiError(message, response.status, (data && data.sqlstate) || null);
  }
  if (data === null && text) throw new ApiError("the server's answer is not JSON", response.status, null);
  return data;
}

const errorText = (e) => (e && e.sqlstate ? `${e.message} (sqlstate ${e.sqlstate})` : String((e && e.message) || e));

/** A loader for one view: drops answers from an earlier navigation, and never runs two
 *  fetches at once (a request made meanwhile runs once the current one ends). */
function loader(url, render, fail) {
  let inflight = false, again = false;
  return async function load() {
    if (inflight) { again = true; return; }
    inflight = true;
    const token = state.token;
    try {
      const data = await api(url());
      if (token === state.token) { clearBanner(); render(data); }
    } catch (e) {
      if (token === state.token) fail(e);
    } finally {
      inflight = false;
      if (again) { again = false; load(); }
    }
  };
}

/* ---------- banner, live indicator, debounce ---------- */

function showBanner(message) {
  const banner = $("#banner");
  fill(banner, el("span", {}, message), el("button", { type: "button", class: "close", "aria-label": "dismiss", onclick: clearBanner }));
  banner.hidden = false;
}
function clearBanner() { fill($("#banner")).hidden = true; }

function setLive(open) {
  const live = $("#live");
  live.dataset.state = open ? "open" : "closed";
  live.textContent = open ? "live" : "reconnecting…";
  live.title = open ? "receiving live updates" : "live updates interrupted; reconnecting";
}

/** Trailing debounce that still fires at most 4 × `ms` after the first call, so a steady
 *  stream of events cannot postpone a refresh for ever. */
const timers = new Map();
function debounce(key, ms, fn) {
  const now = Date.now();
  const pending = timers.get(key);
  const first = pending ? pending.first : now;
  if (pending) clearTimeout(pending.timer);
  const delay = Math.max(0, Math.min(now + ms, first + 4 * ms) - now);
  timers.set(key, { first, timer: setTimeout(() => { timers.delete(key); fn(); }, delay) });
}
function cancelDebounces() { for (const { timer } of timers.values()) clearTimeout(timer); timers.clear(); }

/* ---------- routing ---------- */

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/";
  const at = raw.indexOf("?");
  const path = at < 0 ? raw : raw.slice(0, at);
  const params = new URLSearchParams(at < 0 ? "" : raw.slice(at + 1));
  const goal = path.match(/^\/goals\/(\d+)\/?$/);
  if (path === "/" || path === "") return { view: "goals", params };
  if (goal) return { view: "goal", id: Number(goal[1]), params };
  if (path === "/system" || path === "/system/") return { view: "system", params };
  return { view: "notfound", path };
}

/** Goes to `hash`, re-rendering even when it is already the current one. */
function navigate(hash) {
  if (location.hash === hash || (hash === "#/" && location.hash === "")) route();
  else location.hash = hash;
}

function setNav(view) {
  for (const a of document.querySelectorAll("nav a[data-view]")) {
    const on = a.dataset.view === (view === "goal" ? "goals" : view);
    a.classList.toggle("active", on);
    if (on) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
}

function route() {
  const r = parseHash();
  const previous = { view: state.view, id: state.id };
  cancelDebounces();
  clearBanner();
  state.token++;
  state.view = r.view;
  state.id = r.id ?? null;
  state.params = r.params || new URLSearchParams();
  setNav(r.view);
  const main = $("#view");
  if (r.view === "goals") {
    document.title = "Goals · Synapse";
    fill(main, goalsSkeleton());
    loadGoals();
  } else if (r.view === "goal") {
    document.title = `Goal ${r.id} · Synapse`;
    if (previous.id !== r.id) Object.assign(state, { goal: null, childIds: new Set(), selected: null, expanded: new Set(), zoom: 1 });
    fill(main, goalSkeleton(r.id));
    loadGoal();
  } else if (r.view === "system") {
    document.title = "System · Synapse";
    fill(main, systemSkeleton());
    loadSystem();
  } else {
    document.title = "Not found · Synapse";
    fill(main, el("p", {}, "Nothing here. ", el("a", { href: "#/" }, "Back to the goals")));
    showBanner(`no page at #${r.path}`);
  }
  if (previous.view !== r.view || previous.id !== r.id) window.scrollTo(0, 0);
}

/* ---------- goals list ---------- */

function goalsSkeleton() {
  const p = state.params;
  const field = (label, input) => el("label", {}, el("span", {}, label), input);
  const text = (name, placeholder, type = "text") => el("input", { name, type, placeholder, value: p.get(name) || "" });
  const form = el("form", { id: "filters", class: "filters", onsubmit: (e) => { e.preventDefault(); applyFilters(form); } },
    field("status", el("select", { name: "status" }, el("option", { value: "" }, "any"),
      GOAL_STATUSES.map((s) => el("option", { value: s, selected: p.get("status") === s }, s)))),
    field("search", text("q", "goal text", "search")),
    field("template", text("template", "template")),
    field("owner", text("owner", "owner")),
    field("since", el("input", { name: "since", type: "datetime-local", value: toLocalInput(p.get("since")) })),
    field("until", el("input", { name: "until", type: "datetime-local", value: toLocalInput(p.get("until")) })),
    el("div", { class: "buttons" },
      el("button", { type: "submit", class: "primary" }, "Apply"),
      el("button", { type: "button", onclick: () => navigate("#/") }, "Clear")));
  return el("section", { id: "goals-page" },
    el("div", { class: "page-head" }, el("h1", {}, "Goals"), el("div", { id: "counts", class: "chips" })),
    form,
    el("div", { class: "scroll-x card flush" },
      el("table", { id: "goals", class: "grid" },
        el("thead", {}, el("tr", {}, ["id", "goal", "status", "owner", "template", "created", "duration", "steps"].map((c) => el("th", {}, c)))),
        el("tbody", {}, emptyRow(8, "loading…")))),
    el("div", { id: "pager", class: "pager" }));
}

const goalsHash = (params) => `#/${params.toString() ? `?${params}` : ""}`;

/** Filters form → hash (since/until sent as ISO). */
function applyFilters(form) {
  const data = new FormData(form);
  const params = new URLSearchParams();
  for (const key of ["status", "q", "template", "owner"]) {
    const value = String(data.get(key) || "").trim();
    if (value) params.set(key, value);
  }
  for (const key of ["since", "until"]) {
    const value = data.get(key);
    const ms = value ? new Date(value).getTime() : NaN;
    if (!Number.isNaN(ms)) params.set(key, new Date(ms).toISOString());
  }
  navigate(goalsHash(params));
}

/** Changes one filter (and goes back to the newest page unless paging). */
function setFilter(key, value) {
  const params = new URLSearchParams(state.params);
  if (key !== "before") params.delete("before");
  if (value == null || value === "") params.delete(key);
  else params.set(key, String(value));
  navigate(goalsHash(params));
}

const loadGoals = loader(() => {
  const query = new URLSearchParams();
  for (const key of FILTER_KEYS) if (state.params.get(key)) query.set(key, state.params.get(key));
  query.set("limit", "50");
  return `api/goals?${query}`;
}, renderGoals, (e) => showBanner(`could not load the goals: ${errorText(e)}`));

function renderGoals(data) {
  const counts = data.counts || {};
  const active = state.params.get("status") || "";
  fill($("#counts"), GOAL_STATUSES.map((s) => el("button", {
    type: "button", class: `chip status-${s}${s === active ? " active" : ""}`, dataset: { status: s },
    "aria-pressed": String(s === active), title: s === active ? "show every status" : `show only ${s} goals`,
    onclick: () => setFilter("status", s === active ? "" : s),
  }, `${s} `, el("b", {}, String(counts[s] ?? 0)))));
  const goals = data.goals || [];
  fill($("#goals tbody"), goals.length ? goals.map(goalRow) : emptyRow(8, "none"));
  fill($("#pager"),
    state.params.get("before") && el("button", { type: "button", id: "newest", onclick: () => setFilter("before", "") }, "« Newest"),
    data.next_before != null && el("button", { type: "button", id: "older", onclick: () => setFilter("before", data.next_before) }, "Older »"));
}

function goalRow(g) {
  const href = `#/goals/${g.id}`;
  return el("tr", { dataset: { goalId: g.id } },
    el("td", { class: "num" }, el("a", { href, class: "goal-link" }, String(g.id))),
    el("td", { class: "goal-text" },
      el("a", { href, class: "plain", title: g.goal }, g.goal),
      g.parent_goal_id != null && el("div", { class: "sub" }, "child of ", el("a", { href: `#/goals/${g.parent_goal_id}` }, `goal ${g.parent_goal_id}`)),
      g.error != null && el("div", { class: "sub err clip", title: String(g.error) }, String(g.error))),
    el("td", {}, badge(g.status)),
    el("td", {}, g.owner || dash()),
    el("td", {}, g.template || dash()),
    el("td", { class: "nowrap" }, timeEl(g.created_at, "relative")),
    el("td", { class: "num nowrap" }, durationText(g.created_at, g.finished_at) || dash()),
    el("td", {}, stepsSummary(g.steps)));
}

/** "2/5" with a small stacked bar and the failed/running counts. */
function stepsSummary(s) {
  if (!s || !s.total) return dash();
  const bar = el("span", { class: "stepbar", "aria-hidden": "true" });
  for (const [key, status] of [["succeeded", "succeeded"], ["failed", "failed"], ["running", "running"], ["other", "pending"]]) {
    if (!s[key]) continue;
    const part = el("span", { class: `status-${status}` });
    part.style.width = `${(100 * s[key]) / s.total}%`;
    bar.append(part);
  }
  return el("span", { class: "steps", title: `${s.succeeded} succeeded · ${s.failed} failed · ${s.running} running · ${s.other} other` },
    bar, `${s.succeeded}/${s.total}`,
    s.failed > 0 && el("span", { class: "err" }, ` · ${s.failed} failed`),
    s.running > 0 && el("span", { class: "muted" }, ` · ${s.running} running`));
}

/* ---------- goal page ---------- */

function goalSkeleton(id) {
  const dag = el("div", { id: "dag", class: "dag-wrap", onclick: onDagEvent, ondblclick: onDagEvent, onkeydown: onDagEvent });
  return el("article", { id: "goal-page" },
    el("section", { id: "goal-header", class: "card" }, el("h1", {}, `Goal ${id}`)),
    actionsSection(),
    el("section", { class: "card" },
      el("div", { class: "section-head" }, el("h2", {}, "Plan"), dagToolbar()),
      el("div", { id: "dag-selection", class: "selection" }), dag, el("div", { id: "edges-box" })),
    el("section", { class: "card" }, el("h2", {}, "Tasks"), el("div", { class: "scroll-x" }, el("table", { id: "tasks", class: "grid tasks" }))),
    el("section", { class: "card" }, el("h2", {}, "Timeline"), el("div", { id: "timeline", class: "timeline" })),
    el("section", { class: "card" }, el("h2", {}, "Events"), el("p", { id: "events-note", class: "muted", hidden: true }),
      el("div", { class: "scroll-x" }, el("table", { id: "events", class: "grid" }))));
}

const loadGoal = loader(
  () => `api/goals/${state.id}${state.dir === "TB" ? "?dir=TB" : ""}`,
  renderGoal,
  (e) => showBanner(e.status === 404 ? `goal ${state.id} does not exist` : `could not load goal ${state.id}: ${errorText(e)}`));

function renderGoal(data) {
  const g = data.goal;
  state.goal = g;
  state.childIds = new Set();
  for (const t of g.tasks || []) {
    if (t.child_goal_id != null) state.childIds.add(Number(t.child_goal_id));
    for (const i of t.instances || []) if (i.child_goal_id != null) state.childIds.add(Number(i.child_goal_id));
  }
  document.title = `Goal ${g.id} · Synapse`;
  keepOpenDetails($("#goal-page"), () => {
    renderGoalHeader(g);
    updateActions(g);
    renderDag(data.svg);
    renderEdgesAndSignals(g);
    renderTasks(g);
    renderTimeline(g);
    renderEvents(data.events || []);
  });
  renderSelection();
}

function renderGoalHeader(g) {
  const meta = [
    ["owner", g.owner || dash()], ["template", g.template || dash()], ["depth", g.depth ?? dash()],
    ["created", timeEl(g.created_at)], ["started", timeEl(g.started_at)], ["finished", timeEl(g.finished_at)],
    ["duration", durationText(g.started_at || g.created_at, g.finished_at) || dash()],
  ];
  fill($("#goal-header"),
    el("div", { class: "title-row" },
      el("span", { class: "muted goal-number" }, `goal ${g.id}`), badge(g.status, "goal-status"),
      g.parent && el("span", { class: "parent" }, "child of ",
        el("a", { id: "parent-goal", href: `#/goals/${g.parent.goal_id}` }, `goal ${g.parent.goal_id}`),
        g.parent.step ? ` (step ${g.parent.step})` : "")),
    el("h1", { class: "goal-title" }, g.goal),
    el("dl", { class: "meta" }, meta.map(([k, v]) => el("div", {}, el("dt", {}, k), el("dd", {}, v)))),
    g.error != null && el("div", { id: "goal-error", class: "error-box" }, typeof g.error === "string" ? g.error : pretty(g.error)),
    el("div", { class: "io" },
      el("details", { dataset: { key: "goal-input" } }, el("summary", {}, "input ", el("code", {}, preview(g.input))), el("pre", {}, pretty(g.input))),
      g.result != null && el("div", {}, el("h3", {}, "result"), el("pre", { id: "goal-result", class: "json" }, pretty(g.result)))));
}

/* ----- actions: cancel, signal, retry ----- */

function actionsSection() {
  const result = el("div", { id: "action-result", role: "status", "aria-live": "polite" });
  const error = el("div", { id: "action-error", role: "alert" });
  const clear = () => { result.textContent = ""; error.textContent = ""; };
  const cancel = el("button", { type: "button", id: "cancel", class: "danger", onclick: () => {
    clear();
    const id = state.id;
    if (!confirm(`Cancel goal ${id}? Its unfinished steps will be cancelled.`)) return;
    act(cancel, "cancel", {}, () => `goal ${id} cancelled`);
  } }, "Cancel goal");
  const signal = el("form", { id: "signal-form", class: "inline-form", onsubmit: (e) => {
    e.preventDefault();
    clear();
    const name = signal.elements.namedItem("name").value.trim();
    const text = signal.elements.namedItem("payload").value.trim() || "{}";
    if (!name) { error.textContent = "a signal needs a name"; return; }
    let payload;
    try { payload = JSON.parse(text); } catch (err) { error.textContent = `payload is not valid JSON: ${err.message}`; return; }
    act(signal.querySelector("button"), "signal", { name, payload }, (answer) => (answer.taken
      ? `signal ${name} taken by a waiting step`
      : `signal ${name} kept until a step waits for it`));
  } },
    el("label", {}, el("span", {}, "signal"), el("input", { name: "name", placeholder: "name", autocomplete: "off" })),
    el("label", { class: "grow" }, el("span", {}, "payload (JSON)"), el("textarea", { name: "payload", rows: 1, spellcheck: "false" }, "{}")),
    el("button", { type: "submit" }, "Send signal"));
  const retry = el("form", { id: "retry-form", class: "inline-form", onsubmit: (e) => {
    e.preventDefault();
    clear();
    const step = retry.elements.namedItem("step").value;
    act(retry.querySelector("button"), "retry", { steps: step ? [step] : null },
      () => (step ? `step ${step} retried` : "failed and cancelled steps retried"));
  } },
    el("label", {}, el("span", {}, "retry"), el("select", { name: "step" }, el("option", { value: "" }, "failed and cancelled steps (default)"))),
    el("button", { type: "submit" }, "Retry"));
  return el("section", { id: "actions", class: "card actions", hidden: true }, cancel, signal, retry, result, error, el("div", { id: "signals-box" }));
}

/** POSTs an action; shows the outcome or the refusal, then re-fetches the goal. */
async function act(button, verb, body, describe) {
  const id = state.id;
  const section = button.closest("#actions"); // this page's boxes, even if the user has moved on
  const result = section.querySelector("#action-result"), error = section.querySelector("#action-error");
  button.disabled = true;
  button.classList.add("busy");
  try {
    const answer = await api(`api/goals/${id}/${verb}`, body);
    result.textContent = describe(answer || {});
    if (state.view === "goal" && state.id === id) loadGoal();
  } catch (e) {
    error.textContent = errorText(e);
  } finally {
    button.classList.remove("busy");
    button.disabled = button.id === "cancel" && !!state.goal && ENDED.has(state.goal.status);
  }
}

function updateActions(g) {
  $("#actions").hidden = false;
  const cancel = $("#cancel");
  cancel.disabled = ENDED.has(g.status) || cancel.classList.contains("busy");
  cancel.title = ENDED.has(g.status) ? `the goal has ${g.status}` : "";
  const select = $("#retry-form select[name=step]");
  const chosen = select.value;
  fill(select, el("option", { value: "" }, "failed and cancelled steps (default)"),
    ...(g.tasks || []).map((t) => el("option", { value: t.step }, `${t.step} (${t.status})`)));
  select.value = [...select.options].some((o) => o.value === chosen) ? chosen : "";
}

/* ----- the DAG ----- */

function dagToolbar() {
  const label = () => (state.dir === "LR" ? "layout: left → right" : "layout: top → down");
  const direction = el("button", { type: "button", id: "dag-direction", dataset: { dir: state.dir }, title: "switch the layout direction", onclick: () => {
    state.dir = state.dir === "LR" ? "TB" : "LR";
    store("synapse.dagDir", state.dir);
    direction.textContent = label();
    direction.dataset.dir = state.dir;
    loadGoal();
  } }, label());
  const fit = el("button", { type: "button", id: "dag-fit", "aria-pressed": String(state.fit), onclick: () => { state.fit = !state.fit; applyZoom(); } }, "fit width");
  const zoom = (factor) => () => { state.fit = false; state.zoom = Math.min(4, Math.max(0.25, state.zoom * factor)); applyZoom(); };
  return el("div", { class: "toolbar" }, direction,
    el("button", { type: "button", id: "dag-zoom-out", title: "zoom out", "aria-label": "zoom out", onclick: zoom(1 / 1.25) }, "−"),
    el("button", { type: "button", id: "dag-zoom-in", title: "zoom in", "aria-label": "zoom in", onclick: zoom(1.25) }, "+"),
    fit);
}

/** The server's svg, parsed as XML (never innerHTML); script and handlers dropped as a precaution. */
function parseSvg(text) {
  if (typeof text !== "string" || !text.trim()) return null;
  const doc = new DOMParser().parseFromString(text, "image/svg+xml");
  const root = doc.documentElement;
  if (!root || root.localName !== "svg" || doc.getElementsByTagName("parsererror").length) return null;
  for (const bad of [...root.getElementsByTagName("script"), ...root.getElementsByTagName("foreignObject")]) bad.remove();
  for (const node of [root, ...root.getElementsByTagName("*")]) {
    for (const attr of [...node.attributes]) {
      const value = attr.value.replace(/\s+/g, "").toLowerCase();
      if (/^on/i.test(attr.name) || (attr.localName === "href" && value.startsWith("javascript:"))) node.removeAttributeNode(attr);
    }
  }
  return document.importNode(root, true);
}

function renderDag(svgText) {
  const box = $("#dag");
  const scroll = [box.scrollLeft, box.scrollTop];
  const svg = parseSvg(svgText);
  if (!svg) { fill(box, el("p", { class: "muted" }, "no picture of the plan")); return; }
  fill(box, svg);
  for (const node of svg.querySelectorAll("g.node")) { node.setAttribute("tabindex", "0"); node.setAttribute("role", "button"); }
  applyZoom();
  markSelection();
  [box.scrollLeft, box.scrollTop] = scroll;
}

/** Natural size from the viewBox (adding one from width/height if missing). */
function svgSize(svg) {
  const vb = svg.viewBox && svg.viewBox.baseVal;
  if (vb && vb.width > 0) return { w: vb.width, h: vb.height };
  const w = parseFloat(svg.getAttribute("width")), h = parseFloat(svg.getAttribute("height"));
  if (!(w > 0 && h > 0)) return null;
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  return { w, h };
}

function applyZoom() {
  const fit = $("#dag-fit");
  if (fit) fit.setAttribute("aria-pressed", String(state.fit));
  const svg = $("#dag svg");
  if (!svg) return;
  const size = svgSize(svg);
  $("#dag").classList.toggle("fit", state.fit);
  const natural = !state.fit && size;
  svg.style.width = natural ? `${size.w * state.zoom}px` : state.fit ? "100%" : "";
  svg.style.height = natural ? `${size.h * state.zoom}px` : "auto";
}

const nodeOf = (target) => (target && target.closest ? target.closest("g.node") : null);

/** Click (or Enter on) a node: select its task row. Double-click, or ctrl/⌘/shift-click,
 *  a node with data-child-goal: open the child goal. */
function onDagEvent(e) {
  const node = nodeOf(e.target);
  if (!node || (e.type === "keydown" && e.key !== "Enter" && e.key !== " ")) return;
  const child = node.getAttribute("data-child-goal");
  if (child && (e.type === "dblclick" || e.ctrlKey || e.metaKey || e.shiftKey)) location.hash = `#/goals/${child}`;
  else if (e.type !== "dblclick") { e.preventDefault(); selectStep(node.getAttribute("data-step"), true); }
}

/** Selects a step: highlights node and row, expands a map's instances, scrolls to the row. */
function selectStep(step, scroll) {
  state.selected = step;
  const task = state.goal && (state.goal.tasks || []).find((t) => t.step === step);
  if (task && task.instances && task.instances.length && !state.expanded.has(step)) {
    state.expanded.add(step);
    keepOpenDetails($("#tasks"), () => renderTasks(state.goal));
  }
  markSelection();
  renderSelection();
  const row = [...document.querySelectorAll("#tasks tr[data-step]:not([data-index])")].find((r) => r.dataset.step === step);
  if (row && scroll) {
    row.scrollIntoView({ block: "center", behavior: "smooth" });
    row.classList.remove("flash");
    void row.offsetWidth; // restart the flash animation
    row.classList.add("flash");
  }
}

function markSelection() {
  for (const node of document.querySelectorAll("#dag g.node")) node.classList.toggle("selected", node.getAttribute("data-step") === state.selected);
  for (const row of document.querySelectorAll("#tasks tr[data-step]:not([data-index])")) row.classList.toggle("selected", row.dataset.step === state.selected);
}

function renderSelection() {
  const box = $("#dag-selection");
  if (!box) return;
  const t = state.goal && state.selected != null ? (state.goal.tasks || []).find((x) => x.step === state.selected) : null;
  if (!t) { fill(box, el("span", { class: "muted" }, "Click a step to find it in the task table.")); return; }
  fill(box, "selected ", el("strong", {}, t.step), " ", badge(t.status),
    t.child_goal_id != null && [" · ", el("a", { id: "open-child", href: `#/goals/${t.child_goal_id}` }, `open child goal ${t.child_goal_id} →`),
      el("span", { class: "muted" }, " (or ctrl-click / double-click the node)")],
    t.instances && t.instances.length > 0 && ` · ${t.instances.length} instances listed under it in the task table`);
}

/** Folded tables of the plan's edges (with condition errors) and of the signals received. */
function renderEdgesAndSignals(g) {
  const edges = g.edges || [], signals = g.signals || [];
  const broken = edges.filter((e) => e.state === "error").length;
  fill($("#edges-box"), el("details", { id: "edges", class: "fold", dataset: { key: "edges" } },
    el("summary", {}, `edges (${edges.length})`, broken > 0 && el("span", { class: "err" }, ` · ${broken} with errors`)),
    dataTable(["from", "to", "on", "when", "state", "error"], edges, (e) => [el("code", {}, e.from), el("code", {}, e.to), e.on,
      e.when ? el("code", {}, e.when) : dash(), el("span", { class: `edge-state edge-${String(e.state).replace(/[^\w-]/g, "")}` }, e.state),
      e.error != null ? textBlock(e.error, `edge:${e.from}:${e.to}`, "err") : dash()])));
  fill($("#signals-box"), el("details", { id: "signals", class: "fold", dataset: { key: "signals" } },
    el("summary", {}, `signals received (${signals.length})`),
    dataTable(["name", "payload", "sent", "taken", "taken by"], signals, (sg) => [el("code", {}, sg.name),
      jsonBlock(sg.payload, `sig:${sg.name}:${sg.sent_at}`), timeEl(sg.sent_at), sg.taken_at ? timeEl(sg.taken_at) : dash(),
      sg.taken_by ?? el("span", { class: "muted" }, "not taken yet")])));
}

/* ----- task table ----- */

function renderTasks(g) {
  const body = el("tbody");
  for (const t of g.tasks || []) {
    body.append(taskRow(t));
    if (t.instances && state.expanded.has(t.step)) append(body, instanceRows(t));
  }
  if (!body.firstChild) body.append(emptyRow(TASK_COLUMNS.length, "no tasks yet"));
  fill($("#tasks"), el("thead", {}, el("tr", {}, TASK_COLUMNS.map((c) => el("th", {}, c)))), body);
  markSelection();
}

function toggleInstances(step) {
  if (!state.expanded.delete(step)) state.expanded.add(step);
  keepOpenDetails($("#tasks"), () => renderTasks(state.goal));
}

function taskRow(t) {
  const key = t.step;
  return el("tr", { dataset: { step: t.step }, class: t.instances ? "map-row" : null },
    stepCell(t),
    el("td", {}, el("code", {}, t.action ?? "")),
    el("td", {}, badge(t.status)),
    attemptsCell(t),
    el("td", {}, t.queue ?? dash()),
    el("td", { class: "nowrap" }, timeEl(t.started_at, "clock")),
    el("td", { class: "num nowrap" }, durationText(t.started_at, t.finished_at) || dash()),
    el("td", { class: "json-cell" }, jsonBlock(t.input, `in:${key}`)),
    el("td", { class: "json-cell" }, jsonBlock(t.result, `out:${key}`)),
    el("td", { class: "error-cell" }, errorInfo(t, key)));
}

function stepCell(t) {
  const open = state.expanded.has(t.step);
  // A map step carries its counts beside its instances.
  const m = t.instances ? { size: t.size ?? "?", ended: t.ended ?? 0, failed: t.failed ?? 0 } : null;
  return el("td", { class: "step" },
    el("button", { type: "button", class: "step-name", title: "show in the plan", onclick: () => selectStep(t.step, false) }, t.step),
    m && el("div", { class: "sub" }, `map ×${m.size} · ${m.ended} ended · ${m.failed} failed`),
    t.instances && t.instances.length > 0 && el("button", { type: "button", class: "toggle-instances", "aria-expanded": String(open), onclick: () => toggleInstances(t.step) },
      `${open ? "▾ hide" : "▸ show"} ${t.instances.length} instances`),
    t.child_goal_id != null && el("div", { class: "sub" }, childLink(t.child_goal_id)),
    t.iteration != null && el("div", { class: "sub" }, `round ${t.iteration}${t.max_iterations ? ` of at most ${t.max_iterations}` : ""}`));
}

function attemptsCell(t) {
  const history = t.attempts_history || [];
  if (!history.length) return el("td", { class: "num" }, t.attempts ?? "");
  return el("td", { class: "num" }, el("details", { class: "attempts", dataset: { key: `att:${t.step}` } },
    el("summary", {}, String(t.attempts ?? history.length)),
    el("ol", {}, history.map((a) => el("li", {},
      el("div", {}, `attempt ${a.attempt ?? "?"}`, a.worker && ` · ${a.worker}`, " · ", timeEl(a.started_at, "clock"),
        a.started_at && ` · ${durationText(a.started_at, a.finished_at)}`),
      a.error != null && textBlock(a.error, `atterr:${t.step}:${a.attempt}`, "err"))))));
}

/** Failure kind, error, skip reason and next attempt of a task or instance. */
function errorInfo(x, key) {
  const parts = [
    x.failure_kind && el("span", { class: "tag" }, x.failure_kind),
    x.error != null && textBlock(x.error, `err:${key}`, "err"),
    x.run_at && !TASK_ENDED.has(x.status) && el("div", { class: "sub" }, "next attempt ", timeEl(x.run_at, "relative")),
  ].filter(Boolean);
  return parts.length ? parts : dash();
}

function instanceRows(t) {
  const shown = t.instances.slice(0, MAX_INSTANCE_ROWS);
  const rows = shown.map((i) => el("tr", { class: "instance", dataset: { step: t.step, index: i.index } },
    el("td", { class: "step" }, el("span", { class: "muted" }, t.step), `[${i.index}]`, i.child_goal_id != null && el("div", { class: "sub" }, childLink(i.child_goal_id))),
    el("td"),
    el("td", {}, badge(i.status)),
    el("td", { class: "num" }, i.attempts ?? ""),
    el("td"),
    el("td", { class: "nowrap" }, timeEl(i.started_at, "clock")),
    el("td", { class: "num nowrap" }, durationText(i.started_at, i.finished_at) || dash()),
    el("td"),
    el("td", { class: "json-cell" }, jsonBlock(i.result, `out:${t.step}:${i.index}`)),
    el("td", { class: "error-cell" }, errorInfo(i, `${t.step}:${i.index}`))));
  const more = t.instances.length - shown.length;
  return more > 0 ? [...rows, el("tr", { class: "instance more" }, el("td", { colspan: TASK_COLUMNS.length }, `… and ${more} more instances`))] : rows;
}

/* ----- timeline (waterfall) ----- */

const earliest = (values) => values.reduce((a, b) => Math.min(a, b), Infinity);
const latest = (values) => values.reduce((a, b) => Math.max(a, b), -Infinity);

/** Bars to draw: one per task; per map instance when ≤ 200 of them, else the map's bar spans them all. */
function timelineItems(g, now) {
  const bar = (key, label, status, startIso, endIso, cls) => {
    const start = parseTime(startIso);
    let end = parseTime(endIso);
    const open = start != null && end == null && !TASK_ENDED.has(status);
    if (start != null && end == null) end = open ? now : start;
    return { key, label, status, start, end, open, cls };
  };
  const groups = [];
  for (const t of g.tasks || []) {
    const instances = t.instances || [];
    const item = bar(`t:${t.step}`, t.step, t.status, t.started_at, t.finished_at, instances.length ? "map" : "");
    const subs = [];
    if (instances.length) {
      const starts = instances.map((i) => parseTime(i.started_at)).filter((x) => x != null);
      const ends = instances.map((i) => parseTime(i.finished_at) ?? (i.started_at && !TASK_ENDED.has(i.status) ? now : null)).filter((x) => x != null);
      if (item.start == null && starts.length) {
        item.start = earliest(starts);
        item.end = ends.length ? Math.max(latest(ends), item.start) : item.start;
        item.open = !TASK_ENDED.has(t.status);
        if (item.open) item.end = now;
      }
      if (instances.length > MAX_TIMELINE_INSTANCES) item.label = `${t.step} ×${instances.length}`;
      else for (const i of instances) subs.push(bar(`i:${t.step}:${i.index}`, `${t.step}[${i.index}]`, i.status, i.started_at, i.finished_at, "instance"));
    }
    groups.push([item, ...subs]);
  }
  // waterfall order: by start, not-started tasks last (sort is stable)
  groups.sort((a, b) => (a[0].start ?? Infinity) - (b[0].start ?? Infinity));
  return groups.flat();
}

function renderTimeline(g) {
  const box = $("#timeline");
  const now = Date.now();
  const t0 = parseTime(g.created_at) ?? now;
  const items = timelineItems(g, now);
  if (!items.some((i) => i.start != null)) return void fill(box, el("p", { class: "muted" }, "nothing has started yet"));
  const end = Math.max(latest(items.map((i) => i.end ?? -Infinity)), ENDED.has(g.status) ? (parseTime(g.finished_at) ?? 0) : now);
  const span = Math.max(end - t0, 1000);
  // Rows are kept by key and updated in place, so a new fetch animates bars (CSS transitions).
  let rows = box.querySelector(".tl-rows");
  if (!rows) fill(box, el("div", { class: "tl-axis" }), (rows = el("div", { class: "tl-rows" })));
  box.querySelector(".tl-axis").replaceWith(timelineAxis(span));
  const old = new Map([...rows.children].map((r) => [r.dataset.key, r]));
  items.forEach((item, index) => {
    let row = old.get(item.key);
    if (row) old.delete(item.key);
    else row = el("div", { class: "tl-row", dataset: { key: item.key } }, el("div", { class: "tl-label" }), el("div", { class: "tl-track" }, el("div", { class: "tl-bar" })));
    fillTimelineRow(row, item, t0, span);
    if (rows.children[index] !== row) rows.insertBefore(row, rows.children[index] || null);
  });
  for (const row of old.values()) row.remove();
}

function fillTimelineRow(row, item, t0, span) {
  const took = item.start != null ? fmtDuration(item.end - item.start) + (item.open ? " …" : "") : "not started";
  row.className = `tl-row ${item.cls || ""}`;
  fill(row.querySelector(".tl-label"), el("span", { class: "tl-step", title: item.label }, item.label), el("span", { class: "muted" }, took));
  const bar = row.querySelector(".tl-bar");
  bar.className = `tl-bar status-${String(item.status).replace(/[^\w-]/g, "")}${item.open ? " open" : ""}`;
  bar.hidden = item.start == null;
  if (item.start == null) return;
  bar.style.left = `${(100 * (item.start - t0)) / span}%`;
  bar.style.width = `${Math.max((100 * (item.end - item.start)) / span, 0.3)}%`;
  bar.title = `${item.label} · ${item.status} · ${took} · from +${fmtElapsed((item.start - t0) / 1000)}`;
}

function timelineAxis(span) {
  const steps = [0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 21600, 43200, 86400];
  const total = span / 1000;
  const step = steps.find((s) => total / s <= 8) || Math.ceil(total / 8 / 86400) * 86400;
  const track = el("div", { class: "tl-track" });
  for (let i = 0; i * step <= total + 1e-9; i++) {
    const tick = el("span", { class: "tick" }, fmtElapsed(i * step));
    tick.style.left = `${(100 * i * step) / total}%`;
    track.append(tick);
  }
  return el("div", { class: "tl-axis" }, el("div", { class: "tl-label muted" }, "since created"), track);
}

/* ----- events ----- */

function renderEvents(events) {
  const sorted = [...events].sort((a, b) => (parseTime(a.at) ?? 0) - (parseTime(b.at) ?? 0)).slice(-MAX_EVENTS);
  const rows = sorted.map((e, n) => {
    const kind = String(e.kind ?? "");
    const tone = kind.split(".").pop().replace(/[^\w-]/g, "");
    return el("tr", { dataset: { kind } },
      el("td", { class: "nowrap" }, timeEl(e.at, "ms")),
      el("td", {}, el("span", { class: `kind kind-${tone}` }, kind)),
      el("td", {}, e.step ?? dash()),
      el("td", { class: "num" }, e.attempt ?? ""),
      el("td", {}, e.detail != null ? textBlock(e.detail, `ev:${n}:${e.at}`, "detail") : ""));
  });
  fill($("#events"),
    el("thead", {}, el("tr", {}, ["time", "kind", "step", "attempt", "detail"].map((c) => el("th", {}, c)))),
    el("tbody", {}, rows.length ? rows : emptyRow(5, "none")));
  const note = $("#events-note");
  note.hidden = events.length <= sorted.length;
  note.textContent = note.hidden ? "" : `the ${sorted.length} newest of ${events.length} events`;
}

/* ---------- system page ---------- */

const SYSTEM_SECTIONS = [["forwarder", "Forwarder"], ["queues", "Queues"], ["actions-catalogue", "Actions"], ["templates", "Templates"], ["schedules", "Schedules"], ["workers", "Workers"]];

function systemSkeleton() {
  return el("div", { id: "system" }, el("h1", {}, "System"),
    SYSTEM_SECTIONS.map(([id, title]) => el("section", { id, class: "card" }, el("h2", {}, title), el("p", { class: "muted" }, "loading…"))));
}

const loadSystem = loader(() => "api/system", renderSystem, (e) => showBanner(`could not load the system status: ${errorText(e)}`));

function renderSystem(d) {
  const section = (id, ...content) => { const s = $(`#${id}`); fill(s, s.querySelector("h2"), content); };
  section("forwarder", forwarderHealth(d.forwarder || {}, d.outbox || {}));
  // A part the console's role may not read comes as {error}: said in its place.
  const table = (data, columns, cells) => Array.isArray(data)
    ? dataTable(columns, data, cells)
    : el("p", { class: "muted not-shown" }, `not shown: ${data?.error ?? "unavailable"}`);
  section("queues", table(d.queues, ["queue", "queued", "running", "waiting"],
    (q) => [el("code", {}, q.queue), num(q.queued), num(q.running), num(q.waiting)]));
  section("actions-catalogue", table(d.actions, ["name", "description", "kind", "registered by", "updated"],
    (a) => [el("code", {}, a.name), a.description || dash(), a.builtin ? "built-in" : "registered", a.registered_by, timeEl(a.updated_at, "relative")]));
  section("templates", table(d.templates, ["name", "description", "updated"],
    (t) => [el("code", {}, t.name), t.description || dash(), timeEl(t.updated_at, "relative")]));
  section("schedules", table(d.schedules, ["name", "cron", "time zone", "goal", "next run", "last run", "last goal"],
    (s) => [el("code", {}, s.name), el("code", {}, s.cron), s.time_zone, el("span", { class: "clip", title: s.goal }, s.goal),
      timeEl(s.next_run_at), timeEl(s.last_run_at), s.last_goal_id != null ? el("a", { href: `#/goals/${s.last_goal_id}` }, `goal ${s.last_goal_id}`) : dash()]));
  section("workers", table(d.workers, ["identity", "queues", "state", "started", "last seen", "actions registered"],
    (w) => [el("code", {}, w.identity), (w.queues || []).join(", ") || dash(), workerState(w), timeEl(w.started_at), timeEl(w.last_seen_at, "relative"),
      (w.actions || []).join(", ") || dash()]));
}

const num = (value) => el("td", { class: "num" }, value ?? "");

function workerState(w) {
  if (w.lost_at) return el("span", { class: "status status-failed", title: String(w.lost_at) }, "lost");
  if (w.stopped_at) return el("span", { class: "status status-skipped", title: String(w.stopped_at) }, "stopped");
  return el("span", { class: "status status-succeeded" }, "active");
}

/** Health line (healthy badge, or what is wrong) and every field of forwarder_status. */
function forwarderHealth(f, outbox) {
  let health;
  if (f.error) health = [el("span", { id: "forwarder-health", class: "health bad" }, "unavailable"), " ", el("span", { class: "err" }, String(f.error))];
  else if (f.running && f.redis_connected) health = el("span", { id: "forwarder-health", class: "health good" }, "healthy");
  else {
    const why = f.last_error || (!f.running ? "the forwarder is not running" : "Redis is not connected");
    health = [el("span", { id: "forwarder-health", class: "health bad" }, "unhealthy"), " ", el("span", { class: "err" }, String(why))];
  }
  const fields = { ...(f.error ? {} : f), "outbox.pending": outbox.pending, "outbox.parked": outbox.parked };
  const rows = Object.entries(fields).map(([key, value]) => el("tr", {}, el("th", {}, key), el("td", {}, fieldValue(key, value))));
  return [el("p", { class: "health-line" }, health), el("table", { class: "grid kv" }, el("tbody", {}, rows.length ? rows : emptyRow(2, "none")))];
}

function fieldValue(key, value) {
  if (value == null) return dash();
  if (typeof value === "boolean") return value ? "yes" : "no";
  if (/_at$/.test(key) && typeof value === "string") return [timeEl(value), " (", timeEl(value, "relative"), ")"];
  if (typeof value === "object") return jsonBlock(value, `sys:${key}`);
  return String(value);
}

/* ---------- live updates (Server-Sent Events) ---------- */

let retryDelay = 1000, interrupted = false;

function connectEvents() {
  if (!("EventSource" in window)) return;
  const source = new EventSource("api/events");
  source.addEventListener("open", () => {
    setLive(true);
    retryDelay = 1000;
    if (interrupted) refreshView(); // changes may have been missed while disconnected
    interrupted = false;
  });
  source.addEventListener("error", () => {
    setLive(false);
    interrupted = true;
    // The browser retries by itself unless the stream is closed for good (e.g. an HTTP error).
    if (source.readyState === EventSource.CLOSED) {
      source.close();
      setTimeout(connectEvents, retryDelay);
      retryDelay = Math.min(retryDelay * 2, 30000);
    }
  });
  source.addEventListener("change", (e) => onChange(e.data));
  source.onmessage = (e) => onChange(e.data); // unnamed messages, should the server send any
}

function refreshView() {
  if (state.view === "goals") debounce("goals", 250, loadGoals);
  else if (state.view === "goal") debounce("goal", 100, loadGoal);
  else if (state.view === "system") debounce("system", 500, loadSystem);
}

function onChange(raw) {
  let change;
  try { change = JSON.parse(raw); } catch { return; }
  if (!change || typeof change !== "object") return;
  const id = change.goal_id == null ? null : Number(change.goal_id);
  if (state.view === "goal") {
    if (id != null && (id === state.id || state.childIds.has(id))) refreshView();
  } else refreshView();
}

/* ---------- start ---------- */

window.addEventListener("hashchange", route);
route();
connectEvents();
