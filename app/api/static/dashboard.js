// Crucible dashboard: polls the API every two seconds and redraws the open tab (no reloads).
"use strict";

const POLL_MS = 2000;
const state = { tab: "overview", selected: null, selectedDead: null, checked: new Set(), filtersReady: false,
  openCases: new Set(), casesShown: null };

const $ = (selector) => document.querySelector(selector);
const esc = (value) => String(value ?? "").replace(/[&<>"']/g, (c) =>
  ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const ago = (seconds) => (seconds == null ? "–" : seconds < 60 ? `${seconds}s ago` : `${Math.round(seconds / 60)}m ago`);
const time = (iso) => (iso ? new Date(iso).toLocaleTimeString() : "–");

// Every piece of data needs an admin key; it is kept for this tab only (sessionStorage).
const KEY_SLOT = "crucible-admin-key";

async function api(path, options = {}) {
  const headers = { "content-type": "application/json", "x-api-key": sessionStorage.getItem(KEY_SLOT) || "" };
  const response = await fetch(path, { headers, ...options });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `${response.status}`);
  return body;
}

function showTab(tab) {
  state.tab = tab;
  document.querySelectorAll(".tab").forEach((s) => s.classList.toggle("current", s.id === tab));
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("current", a.dataset.tab === tab));
  refresh();
}

// -- overview --------------------------------------------------------------------------------

function renderWorkers(status) {
  const rows = Object.values(status.worker_stats).map((w) => `
    <tr class="${w.online ? "" : "offline"}" data-worker="${esc(w.name)}">
      <td>${esc(w.name)}</td><td>${esc(w.host)}</td><td>${esc(w.pid)}</td><td>${esc(w.queues.join(", "))}</td>
      <td>${esc(w.concurrency)}</td><td>${esc(w.active)}</td><td>${esc(w.processed)}</td><td>${esc(w.failed)}</td>
      <td>${esc(w.retried)}</td><td>${esc(ago(w.last_seen_s))}</td><td>${esc(w.load)}</td>
      <td>${w.online ? "online" : "gone"}</td></tr>`);
  $("[data-testid=workers] tbody").innerHTML = rows.join("") || '<tr><td colspan="12">no workers</td></tr>';
}

function renderQueues(status) {
  const rows = Object.entries(status.queue_details).map(([name, q]) => `
    <tr data-queue="${name}"><td>${name}</td><td>${q.ready}</td><td>${q.delayed}</td><td>${q.in_flight}</td>
      <td>${q.dead}</td><td>${q.oldest_age_s == null ? "–" : q.oldest_age_s + " s"}</td></tr>`);
  $("[data-testid=queues] tbody").innerHTML = rows.join("");
  const schedulers = status.schedulers.filter((s) => s.online).map((s) => s.name);
  $("#schedulers").textContent = schedulers.length
    ? `Schedulers online: ${schedulers.join(", ")}` : "No scheduler online: cleanup is not running.";
  const wire = status.celery_wire;
  $("#celery-wire").textContent = wire.problem
    ? `Celery wire: ${wire.problem}`
    : `Celery wire: ingress ${wire.ingress}, ${wire.accepted} taken, ${wire.rejected} dead-lettered`;
  $("#celery-wire").classList.toggle("problem", Boolean(wire.problem));
}

// A small SVG line chart: one polyline per series, y from 0 to the largest value.
function lineChart(svg, series, labels) {
  const width = 360, height = 160, pad = 24;
  const values = series.flatMap((s) => s.values.filter((v) => v != null));
  const top = Math.max(1, ...values);
  const x = (i, n) => pad + (i * (width - 2 * pad)) / Math.max(1, n - 1);
  const y = (v) => height - pad - (v / top) * (height - 2 * pad);
  const lines = series.map((s) => {
    const points = s.values.map((v, i) => (v == null ? null : [x(i, s.values.length), y(v), v])).filter(Boolean);
    const dots = points.map(([px, py, v]) => `<circle cx="${px}" cy="${py}" r="2.5" fill="${s.color}"><title>${esc(s.name)}: ${v}</title></circle>`);
    return `<polyline fill="none" stroke="${s.color}" stroke-width="2" points="${points.map(([px, py]) => `${px},${py}`).join(" ")}"/>${dots.join("")}`;
  });
  const legend = series.map((s, i) => `<text class="legend" x="${pad + i * 90}" y="12" fill="${s.color}">${esc(s.name)}</text>`);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.innerHTML = `<line x1="${pad}" y1="${height - pad}" x2="${width - pad}" y2="${height - pad}" stroke="#ccc"/>
    <text class="legend" x="2" y="${pad}">${Math.round(top)}</text>${lines.join("")}${legend.join("")}
    <text class="legend" x="${pad}" y="${height - 6}">${esc(labels[0] || "")}</text>
    <text class="legend" x="${width - pad - 40}" y="${height - 6}">${esc(labels[labels.length - 1] || "")}</text>`;
}

function renderRates(rates) {
  const m = rates.minutes;
  const labels = m.map((r) => new Date(r.minute_ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }));
  lineChart($("#chart-throughput"), [
    { name: "submitted", color: "#0969da", values: m.map((r) => r.submitted) },
    { name: "finished", color: "#1a7f37", values: m.map((r) => r.finished) },
  ], labels);
  lineChart($("#chart-rates"), [
    { name: "success %", color: "#1a7f37", values: m.map((r) => (r.finished ? r.success_rate * 100 : null)) },
    { name: "failure %", color: "#cf222e", values: m.map((r) => (r.finished ? r.failure_rate * 100 : null)) },
  ], labels);
  lineChart($("#chart-latency"), [
    { name: "p50", color: "#1a7f37", values: m.map((r) => r.latency_ms.p50) },
    { name: "p95", color: "#9a6700", values: m.map((r) => r.latency_ms.p95) },
    { name: "p99", color: "#cf222e", values: m.map((r) => r.latency_ms.p99) },
  ], labels);
  const h = rates.hour;
  $("#hour-summary").textContent = `Last hour: ${h.submitted} submitted, ${h.finished} finished, ` +
    `success ${h.finished ? Math.round(h.success_rate * 100) : "–"} %, ` +
    `latency p50 ≤ ${h.latency_ms.p50 ?? "–"} ms, p95 ≤ ${h.latency_ms.p95 ?? "–"} ms, p99 ≤ ${h.latency_ms.p99 ?? "–"} ms`;
}

// -- evaluations -----------------------------------------------------------------------------

function fillFilters(languages, statuses) {
  if (state.filtersReady) return;
  const add = (select, values) => values.forEach((v) => select.insertAdjacentHTML("beforeend", `<option>${esc(v)}</option>`));
  add($("[data-testid=filter-status]"), statuses);
  add($("[data-testid=filter-language]"), languages);
  state.filtersReady = true;
}

async function refreshEvaluations() {
  const params = new URLSearchParams({ limit: "100" });
  new FormData($("#filters")).forEach((value, key) => value && params.set(key, value));
  const page = await api(`/api/evaluations?${params}`);
  fillFilters(page.languages, page.statuses);
  $("[data-testid=evaluations] tbody").innerHTML = page.evaluations.map((e) => `
    <tr data-eval="${esc(e.eval_id)}"><td>${esc(e.eval_id)}</td><td class="status-${esc(e.status)}">${esc(e.status)}</td>
      <td>${esc(e.language)}</td><td>${esc(e.queue)}</td><td>${esc(e.queue_system)}</td><td>${time(e.created_at)}</td>
      <td><code>${esc(e.code_preview.slice(0, 60))}</code></td></tr>`).join("") || '<tr><td colspan="7">none</td></tr>';
  if (state.selected) await refreshDetail();
}

async function refreshDetail() {
  const id = encodeURIComponent(state.selected);
  const [e, timeline] = await Promise.all([api(`/api/eval/${id}`), api(`/api/eval/${id}/timeline`)]);
  $("#detail").hidden = false;
  $("#detail-title").textContent = e.eval_id;
  const fields = { status: e.status, "celery state": e.celery_state, language: e.language, queue: e.queue,
    system: e.queue_system, worker: e.worker, executor: e.executor, retries: e.retries, "next retry": e.next_retry_at,
    "exit code": e.exit_code, "run time": e.runtime_ms == null ? null : `${e.runtime_ms} ms`,
    "peak memory": e.peak_memory_kb == null ? null : `${e.peak_memory_kb} KiB`, created: e.created_at,
    started: e.started_at, completed: e.completed_at, webhook: webhook(e.callback) };
  $("#detail-fields").innerHTML = Object.entries(fields)
    .map(([k, v]) => `<dt>${esc(k)}</dt><dd data-field="${esc(k)}">${esc(v ?? "–")}</dd>`).join("");
  renderCases(e);
  $("#detail-code").textContent = e.code ?? "";
  $("#detail-output").textContent = e.output ?? "";
  $("#detail-error").textContent = e.error ?? "";
  $("#detail-timeline").innerHTML = timeline.events.map((t) =>
    `<li>${new Date(t.at_ms).toLocaleTimeString()} — ${esc(t.previous_status ?? "new")} → <b>${esc(t.status)}</b>` +
    `${t.worker ? ` on ${esc(t.worker)}` : ""}${t.retries ? ` (retry ${esc(t.retries)})` : ""}</li>`).join("");
  const open = e.status === "queued" || e.status === "running";
  $("#cancel").disabled = !open;
  $("#terminate").disabled = e.status !== "running";
}

// A webhook's delivery: its state, attempts and last error (null: the submission has none).
const webhook = (c) => (c ? `${c.status}, ${c.attempts} attempt${c.attempts === 1 ? "" : "s"}` +
  `${c.last_error ? `: ${c.last_error}` : ""} → ${c.url}` : null);

// A submission with test cases: its verdict, the compile step and a row per case, whose output
// and error open below it. Redrawn only when the evaluation's cases change, so an open row stays
// open (and its text selectable) across polls.
const ms = (v) => (v == null ? "–" : `${Number.isInteger(v) || v >= 10 ? Math.round(v) : Number(v).toFixed(1)} ms`);
const kib = (v) => (v == null ? "–" : `${Math.round(v).toLocaleString()} KiB`);

function clip(text, n = 100) {
  return text.length > n ? `${text.slice(0, n)}…` : text;
}

// What a case's row says of how it ended: the checker's word, else the limit that ended it, else
// the start of its error (for a Python traceback, its last line: the exception).
function caseNote(c) {
  if (c.checker_message) return clip(c.checker_message.trim().split("\n")[0]);
  if (c.time_limit) return `${c.time_limit} time limit`;
  const lines = String(c.error ?? "").trim().split("\n").filter((l) => l.trim());
  if (!lines.length) return "";
  return clip(lines[0].startsWith("Traceback (most recent call last)") ? lines[lines.length - 1] : lines[0]);
}

function caseRows(c, i) {
  const ran = c.status !== "skipped";
  const open = ran && state.openCases.has(String(i));
  const meta = [`exit code ${c.exit_code ?? "–"}`, c.signal ? `signal ${c.signal}` : "",
    c.time_limit ? `${c.time_limit} time limit` : "", c.output_truncated ? "output truncated" : ""].filter(Boolean);
  const row = `<tr class="case" data-case="${i}" ${ran ? `aria-expanded="${open}"` : ""}>
    <td class="toggle">${ran ? (open ? "▾" : "▸") : ""}</td><td>${i + 1}</td><td class="name">${esc(c.name)}</td>
    <td class="status-${esc(c.status)}">${esc(c.status)}</td><td class="num">${esc(ms(c.runtime_ms))}</td>
    <td class="num">${esc(ms(c.cpu_ms))}</td><td class="num">${esc(kib(c.peak_memory_kb))}</td>
    <td class="${c.checker_message || c.time_limit ? "note" : "note from-error"}">${esc(caseNote(c))}</td></tr>`;
  if (!ran) return row;
  return `${row}<tr class="case-io" data-case-io="${i}" ${open ? "" : "hidden"}><td></td><td colspan="7">
    <div class="case-meta">${esc(meta.join(" · "))}</div>
    ${c.checker_message ? `<h4>Checker</h4><pre data-io="checker">${esc(c.checker_message)}</pre>` : ""}
    <h4>Output</h4><pre data-io="output">${esc(c.output)}</pre>
    <h4>Error</h4><pre data-io="error">${esc(c.error)}</pre></td></tr>`;
}

function renderCases(e) {
  const hasCases = e.total != null;
  $("#detail-tests").hidden = !hasCases;
  if (!hasCases) { state.casesShown = null; return; }
  const shown = JSON.stringify([e.eval_id, e.verdict, e.passed, e.total, e.compile, e.cases]);
  if (shown === state.casesShown) return;
  state.casesShown = shown;
  $("#detail-verdict").innerHTML = `Verdict: <span class="verdict status-${esc(e.verdict)}">${esc(e.verdict ?? "–")}</span>` +
    ` — <b>${esc(e.passed ?? "–")}/${esc(e.total)}</b> passed`;
  const c = e.compile;
  $("#detail-compile").innerHTML = c
    ? `Compile: <span class="status-${esc(c.status)}">${esc(c.status)}</span>, ` +
      `${c.cached ? "cached (compiled before)" : "compiled now"}, ${esc(ms(c.runtime_ms))} (CPU ${esc(ms(c.cpu_ms))})`
    : "Compile: none (an interpreted language)";
  $("#detail-compile-error").hidden = !c?.error;
  $("#detail-compile-error").textContent = c?.error ?? "";
  $("#detail-cases tbody").innerHTML = (e.cases ?? []).map(caseRows).join("") ||
    '<tr><td colspan="8">no cases</td></tr>';
}

function toggleCase(row) {
  const i = row.dataset.case;
  const io = $(`#detail-cases tr[data-case-io="${i}"]`);
  if (!io) return;
  const open = io.hidden;
  io.hidden = !open;
  open ? state.openCases.add(i) : state.openCases.delete(i);
  row.setAttribute("aria-expanded", String(open));
  row.querySelector(".toggle").textContent = open ? "▾" : "▸";
}

async function cancelSelected(terminate) {
  try {
    const done = await api(`/api/eval/${encodeURIComponent(state.selected)}/cancel?terminate=${terminate}`, { method: "POST" });
    $("#action-result").textContent = done.message;
  } catch (error) {
    $("#action-result").textContent = error.message;
  }
  refresh();
}

// -- dead letters ----------------------------------------------------------------------------

async function refreshDeadLetters() {
  const [page, stats] = await Promise.all([api("/api/dlq/tasks?limit=200"), api("/api/dlq/statistics")]);
  const breakdown = Object.entries(stats.exception_breakdown).map(([k, v]) => `${k}: ${v}`).join(", ");
  $("#dlq-stats").textContent = `${stats.queue_size} dead letters` + (breakdown ? ` — by exception: ${breakdown}` : "");
  $("[data-testid=dead-letters] tbody").innerHTML = page.tasks.map((t) => `
    <tr data-task="${esc(t.task_id)}"><td><input type="checkbox" data-check="${esc(t.task_id)}" ${state.checked.has(t.task_id) ? "checked" : ""}></td>
      <td>${esc(t.task_id)}</td><td>${esc(t.exception_class)}</td><td>${esc(t.exception_message)}</td><td>${esc(t.retry_count ?? 0)}</td>
      <td>${time(t.last_failure_time)}</td>
      <td><button data-retry="${esc(t.task_id)}">Retry</button> <button data-delete="${esc(t.task_id)}">Delete</button></td></tr>`)
    .join("") || '<tr><td colspan="7">the dead-letter queue is empty</td></tr>';
  const shown = page.tasks.find((t) => t.task_id === state.selectedDead);
  $("#dlq-detail").hidden = !shown;
  if (shown) {
    $("#dlq-detail-title").textContent = `${shown.task_id}: ${shown.exception_class}`;
    $("#dlq-traceback").textContent = shown.traceback ?? "";
  }
}

async function deadLetterAction(path, method, body) {
  try {
    const done = await api(path, { method, body: body && JSON.stringify(body) });
    $("#dlq-result").textContent = done.message || `${done.succeeded} retried, ${done.failed} failed`;
  } catch (error) {
    $("#dlq-result").textContent = error.message;
  }
  refresh();
}

// -- wiring ----------------------------------------------------------------------------------

async function refresh() {
  try {
    if (state.tab === "overview") {
      const [status, rates] = await Promise.all([api("/api/celery-status"), api("/api/rates?minutes=60")]);
      renderWorkers(status);
      renderQueues(status);
      renderRates(rates);
    } else if (state.tab === "evaluations") {
      await refreshEvaluations();
    } else {
      await refreshDeadLetters();
    }
    $("#updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    $("#updated").textContent = `not updated: ${error.message}`;
  }
}

document.addEventListener("click", (event) => {
  const target = event.target;
  const tab = target.closest("nav a");
  if (tab) { event.preventDefault(); location.hash = tab.dataset.tab; return; }
  if (target.dataset.retry) return deadLetterAction(`/api/dlq/tasks/${encodeURIComponent(target.dataset.retry)}/retry`, "POST");
  if (target.dataset.delete) return deadLetterAction(`/api/dlq/tasks/${encodeURIComponent(target.dataset.delete)}`, "DELETE");
  if (target.dataset.check) {
    target.checked ? state.checked.add(target.dataset.check) : state.checked.delete(target.dataset.check);
    return;
  }
  const caseRow = target.closest("tr[data-case]");
  if (caseRow) { toggleCase(caseRow); return; }
  const evalRow = target.closest("tr[data-eval]");
  if (evalRow) {
    if (evalRow.dataset.eval !== state.selected) { state.openCases.clear(); state.casesShown = null; }
    state.selected = evalRow.dataset.eval;
    $("#action-result").textContent = "";
    refresh();
    return;
  }
  const deadRow = target.closest("tr[data-task]");
  if (deadRow) { state.selectedDead = deadRow.dataset.task; refresh(); }
});
$("#cancel").addEventListener("click", () => cancelSelected(false));
$("#terminate").addEventListener("click", () => cancelSelected(true));
$("#dlq-retry-selected").addEventListener("click", () => {
  const ids = [...state.checked];
  state.checked.clear();
  deadLetterAction("/api/dlq/tasks/retry-batch", "POST", ids);
});
$("#filters").addEventListener("input", () => refresh());
$("#key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_SLOT, $("#key").value.trim());
  $("#key").value = "";
  refresh();
});
$("#filters").addEventListener("submit", (event) => event.preventDefault());
window.addEventListener("hashchange", () => showTab(location.hash.slice(1) || "overview"));

showTab(location.hash.slice(1) || "overview");
setInterval(refresh, POLL_MS);
