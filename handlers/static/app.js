// md5-light's page. No framework and no innerHTML with data: every string
// that came from a user (URLs, errors, digests) is set with textContent.
"use strict";

const MAX_STREAMS = 8;          // the API allows 20 per client; leave room
const LIST_SIZE = 20;
const MINE = "md5light.mine";   // ids of the tasks this browser submitted
const KEY = "md5light.key";     // the API key typed into this page, if any
const MINE_KEPT = 100;
const streams = new Map();      // task id -> EventSource
const speed = new Map();        // task id -> {t, bytes, rate}

const $ = (id) => document.getElementById(id);

function say(element, text, bad) {
  element.textContent = text;
  element.classList.toggle("bad", Boolean(bad));
}

function size(n) {
  if (n === null || n === undefined) return "?";
  const units = ["bytes", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return (i === 0 ? String(n) : n.toFixed(1)) + " " + units[i];
}

function duration(seconds) {
  if (!isFinite(seconds) || seconds < 0) return "";
  if (seconds < 60) return Math.ceil(seconds) + " s";
  if (seconds < 3600) return Math.floor(seconds / 60) + " min " + Math.ceil(seconds % 60) + " s";
  return Math.floor(seconds / 3600) + " h " + Math.floor((seconds % 3600) / 60) + " min";
}

function stored(name, fallback) {
  try { return JSON.parse(localStorage.getItem(name)) ?? fallback; } catch (e) { return fallback; }
}

function remember(id) {
  const mine = stored(MINE, []).filter((known) => known !== id);
  mine.unshift(id);
  localStorage.setItem(MINE, JSON.stringify(mine.slice(0, MINE_KEPT)));
}

async function api(path, options, keyless) {
  options = Object.assign({}, options || {});
  const key = keyless ? "" : stored(KEY, "");
  if (key) options.headers = Object.assign({}, options.headers, { Authorization: "Bearer " + key });
  const response = await fetch(path, options);
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (key && response.status === 401 && path !== "/tasks?limit=1") {
    // A key revoked since it was saved: forget it, and ask again without.
    localStorage.removeItem(KEY);
    return api(path, options, true);
  }
  return { status: response.status, body };
}

function problem(result, fallback) {
  if (result.body && typeof result.body.error === "string") return result.body.error;
  return fallback + " (HTTP " + result.status + ")";
}

// -- submitting ---------------------------------------------------------

async function submitTask(event) {
  event.preventDefault();
  const form = event.target;
  const message = $("submit-message");
  const payload = { url: form.url.value.trim() };
  if (!payload.url) { say(message, "Enter the URL of a file.", true); form.url.focus(); return; }
  if (form.email.value.trim()) payload.email = form.email.value.trim();
  if (form.expected.value.trim()) payload.expected = form.expected.value.trim();
  const algorithms = [...form.querySelectorAll("input[name=algorithms]:checked")]
    .map((box) => box.value);
  if (algorithms.length) payload.algorithms = algorithms;
  $("submit-button").disabled = true;
  say(message, "Submitting…");
  try {
    const result = await api("/submit", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(payload),
    });
    if (result.status !== 202) { say(message, problem(result, "The task was refused"), true); return; }
    remember(result.body.id);
    say(message, "Started.");
    form.url.value = "";
    await loadTasks();
  } catch (e) {
    say(message, "The service did not answer; check your connection and try again.", true);
  } finally {
    $("submit-button").disabled = false;
  }
}

// -- the list -----------------------------------------------------------

// The tasks this browser submitted, plus what GET /tasks lists for this
// caller: an API key's own tasks, every task for an operator, and a 401
// for anyone else (another client's tasks are never listed to it).
async function loadTasks() {
  const message = $("tasks-message");
  const mine = stored(MINE, []).slice(0, LIST_SIZE);
  let listed, named;
  try {
    listed = await api("/tasks?limit=" + LIST_SIZE);
    named = mine.length ? await api("/tasks?" + mine.map((id) => "id=" + encodeURIComponent(id))
      .join("&") + "&limit=" + LIST_SIZE) : { status: 200, body: { tasks: [] } };
  } catch (e) {
    say(message, "Could not load the tasks; the service did not answer.", true);
    return;
  }
  if (named.status !== 200) { say(message, problem(named, "Could not load the tasks"), true); return; }
  const byId = new Map();
  for (const task of [...(listed.status === 200 ? listed.body.tasks : []), ...named.body.tasks]) {
    byId.set(task.id, task);
  }
  const tasks = [...byId.values()].sort((a, b) => (a.created_at < b.created_at ? 1 : -1))
    .slice(0, LIST_SIZE);
  $("tasks-scope").textContent = listed.status === 200 ? "" :
    "Showing the tasks submitted from this browser.";
  const list = $("tasks");
  const wanted = new Set(tasks.map((task) => task.id));
  for (const item of [...list.children]) {
    if (!wanted.has(item.dataset.id)) { stopStream(item.dataset.id); item.remove(); }
  }
  tasks.forEach((task, index) => {
    const item = itemFor(task.id);
    if (list.children[index] !== item) list.insertBefore(item, list.children[index] || null);
    render(item, task);
    if (!finished(task.status)) watch(task.id);
  });
  say(message, tasks.length ? "" : "No tasks yet: submit a URL to start.");
}

function finished(status) {
  return status === "done" || status === "failed" || status === "cancelled";
}

function itemFor(id) {
  let item = document.querySelector('li.task[data-id="' + CSS.escape(id) + '"]');
  if (item) return item;
  item = $("task-template").content.firstElementChild.cloneNode(true);
  item.dataset.id = id;
  item.querySelector(".details").addEventListener("click", () => openDetail(id));
  item.querySelector(".cancel").addEventListener("click", () => cancelTask(id));
  return item;
}

function render(item, task) {
  const status = item.querySelector(".status");
  status.textContent = task.status;
  status.className = "status " + task.status;
  const link = item.querySelector(".url");
  if (task.url !== undefined) {
    link.textContent = task.url;
    // Only web addresses become links (never javascript: or data:).
    if (/^https?:\/\//i.test(task.url)) link.href = task.url; else link.removeAttribute("href");
  }
  const bar = item.querySelector("progress");
  const total = task.bytes_total;
  if (task.status === "done") { bar.max = 1; bar.value = 1; }
  else if (total) { bar.max = total; bar.value = Math.min(task.bytes_done || 0, total); }
  else if (task.status === "running") bar.removeAttribute("value");  // indeterminate
  else { bar.max = 1; bar.value = 0; }
  item.querySelector(".bytes").textContent = (task.bytes_done || 0) === 0 && !total ? ""
    : size(task.bytes_done || 0) + (total ? " of " + size(total) : "");
  showSpeed(item, task);
  if (task.connections !== undefined) {
    const used = task.connections ? task.connections.used : 1;
    item.querySelector(".conn").textContent =
      task.status === "running" && used > 1 ? "over " + used + " connections" : "";
  }
  item.querySelector(".cancel").hidden = finished(task.status);
  const error = item.querySelector(".error");
  if (task.error !== undefined) {
    error.hidden = !task.error;
    error.textContent = task.error ? "Failed: " + task.error : "";
  }
  if (task.digests !== undefined) renderDigests(item, task);
}

function showSpeed(item, task) {
  const rate = item.querySelector(".rate");
  const eta = item.querySelector(".eta");
  if (task.status !== "running") {
    speed.delete(task.id);
    rate.textContent = ""; eta.textContent = "";
    return;
  }
  const now = performance.now() / 1000;
  const bytes = task.bytes_done || 0;
  const last = speed.get(task.id);
  if (last && bytes > last.bytes && now > last.t) {
    const sample = (bytes - last.bytes) / (now - last.t);
    const smooth = last.rate ? 0.6 * last.rate + 0.4 * sample : sample;
    speed.set(task.id, { t: now, bytes, rate: smooth });
  } else if (!last || bytes < last.bytes) {
    speed.set(task.id, { t: now, bytes, rate: 0 });
  }
  const current = speed.get(task.id).rate;
  rate.textContent = current ? size(Math.round(current)) + "/s" : "";
  eta.textContent = current && task.bytes_total
    ? duration((task.bytes_total - bytes) / current) + " left" : "";
}

function renderDigests(item, task) {
  const list = item.querySelector(".digests");
  list.replaceChildren();
  for (const [algorithm, value] of Object.entries(task.digests || {})) {
    const row = document.createElement("li");
    const name = document.createElement("span");
    name.className = "alg"; name.textContent = algorithm;
    const code = document.createElement("code");
    code.className = "digest"; code.dataset.algorithm = algorithm; code.textContent = value;
    const copy = document.createElement("button");
    copy.type = "button"; copy.className = "copy secondary"; copy.textContent = "Copy";
    copy.setAttribute("aria-label", "Copy the " + algorithm + " checksum");
    const note = document.createElement("span");
    note.className = "copied"; note.setAttribute("role", "status");
    copy.addEventListener("click", () => copyText(value, note));
    row.append(name, code, copy, note);
    list.append(row);
  }
  if (task.verified === true) {
    const row = document.createElement("li");
    row.className = "verified";
    row.textContent = "Matches the expected checksum.";
    list.append(row);
  }
  if (task.server_digest && task.status !== "running" && task.status !== "queued") {
    const server = task.server_digest;
    const row = document.createElement("li");
    row.className = "server " + (server.verified === true ? "verified"
      : server.verified === false ? "corrupted" : "unverified");
    row.textContent = "Server: " + describeServer(server) + ".";
    list.append(row);
  }
}

// The server's own checksum and its check, in words (as the mail and the
// CLI say it: service/model/claim_text.py).
function describeServer(server) {
  const mib = 1024 * 1024;
  const bytes = (n) => (n % mib === 0 ? n / mib + " MiB" : n + " bytes");
  let claim = server.header + " (" + server.algorithm;
  if (server.parts) claim += " of " + server.parts + " parts";
  claim += ")";
  if (server.verified === true) {
    return "verified against the server's " + claim +
      (server.part_size ? ", with parts of " + bytes(server.part_size) : "");
  }
  if (server.verified === false) return "the server's " + claim + " does NOT match the bytes received";
  return "the server's " + claim + " is unverified: " + (server.why || "no reason recorded");
}

async function copyText(text, note) {
  try {
    await navigator.clipboard.writeText(text);
  } catch (e) {
    // No clipboard API (plain http on another host, old browser): the
    // selection-and-copy command still works in a user gesture.
    const area = document.createElement("textarea");
    area.value = text; area.setAttribute("readonly", "");
    area.className = "offscreen";
    document.body.append(area);
    area.select();
    const ok = document.execCommand && document.execCommand("copy");
    area.remove();
    if (!ok) { note.textContent = "Select the checksum and copy it by hand."; return; }
  }
  note.textContent = "Copied";
  setTimeout(() => { note.textContent = ""; }, 2500);
}

// -- live progress --------------------------------------------------------

function watch(id) {
  if (streams.has(id) || streams.size >= MAX_STREAMS) return;
  const source = new EventSource("/tasks/" + encodeURIComponent(id) + "/events");
  streams.set(id, source);
  const update = (event) => {
    const item = document.querySelector('li.task[data-id="' + CSS.escape(id) + '"]');
    if (item) render(item, JSON.parse(event.data));
  };
  source.addEventListener("snapshot", update);
  source.addEventListener("progress", update);
  source.addEventListener("end", (event) => { update(event); stopStream(id); watchNext(); });
}

function stopStream(id) {
  const source = streams.get(id);
  if (source) { source.close(); streams.delete(id); }
}

function watchNext() {
  for (const item of $("tasks").children) {
    const status = item.querySelector(".status").textContent;
    if (!finished(status)) watch(item.dataset.id);
  }
}

async function cancelTask(id) {
  const result = await api("/tasks/" + encodeURIComponent(id), { method: "DELETE" });
  if (result.status !== 200) say($("tasks-message"), problem(result, "Could not cancel"), true);
}

// -- detail -------------------------------------------------------------

async function openDetail(id) {
  const result = await api("/tasks/" + encodeURIComponent(id));
  if (result.status !== 200) { say($("tasks-message"), problem(result, "Could not open the task"), true); return; }
  const task = result.body;
  const fields = $("detail-fields");
  fields.replaceChildren();
  const rows = [
    ["Status", task.status], ["URL", task.url], ["md5", task.md5],
    ["Size", task.bytes_total === null ? null : size(task.bytes_total)],
    ["Expected", task.expected], ["Verified", task.verified === null ? null : String(task.verified)],
    ["Failure", task.error], ["Attempts", String(task.attempts)],
    ["Submitted", task.created_at], ["Started", task.started_at], ["Finished", task.finished_at],
    ["Webhook", task.callback ? task.callback.status : null],
    ["Server's checksum", task.server_digest ? describeServer(task.server_digest) : null],
  ];
  for (const [algorithm, value] of Object.entries(task.digests || {})) {
    if (algorithm !== "md5") rows.splice(3, 0, [algorithm, value]);
  }
  for (const [label, value] of rows) {
    if (value === null || value === undefined) continue;
    const dt = document.createElement("dt"); dt.textContent = label;
    const dd = document.createElement("dd"); dd.textContent = value;
    fields.append(dt, dd);
  }
  $("detail-json").textContent = JSON.stringify(task, null, 2);
  $("detail-title").textContent = "Task " + task.id;
  $("detail").showModal();
}

// -- manifests ------------------------------------------------------------

let manifestSource = null;

async function submitManifest(event) {
  event.preventDefault();
  const message = $("manifest-message");
  const file = $("manifest-file").files[0];
  const text = $("manifest-text").value;
  if (!file && !text.trim()) { say(message, "Choose a file or paste a checksum list.", true); return; }
  const body = file ? await file.text() : text;
  const json = file ? /\.json$/i.test(file.name) : /^\s*[[{]/.test(text);
  say(message, "Uploading…");
  let result;
  try {
    result = await api("/manifests", {
      method: "POST", body, headers: { "Content-Type": json ? "application/json" : "text/plain" },
    });
  } catch (e) {
    say(message, "The service did not answer; try again.", true);
    return;
  }
  if (result.status !== 202) {
    let reason = problem(result, "The manifest was refused");
    const lines = (result.body && result.body.lines) || [];
    if (lines.length) reason += " Line " + lines[0].line + ": " + lines[0].error;
    say(message, reason, true);
    return;
  }
  say(message, "Checking " + result.body.lines + " files…");
  watchManifest(result.body.id);
  loadTasks();
}

function watchManifest(id) {
  if (manifestSource) manifestSource.close();
  $("manifest-progress").hidden = false;
  manifestSource = new EventSource("/manifests/" + encodeURIComponent(id) + "/events");
  const update = (event) => renderManifest(JSON.parse(event.data));
  manifestSource.addEventListener("snapshot", update);
  manifestSource.addEventListener("progress", update);
  manifestSource.addEventListener("end", (event) => {
    update(event);
    manifestSource.close(); manifestSource = null;
    const totals = JSON.parse(event.data).totals;
    const bad = (totals.mismatch || 0) + (totals.failed || 0);
    say($("manifest-message"), bad ? bad + " of the files did not verify." : "Every file verified.", bad > 0);
    loadTasks();
  });
}

function renderManifest(manifest) {
  const totals = manifest.totals || {};
  const ended = (totals.ok || 0) + (totals.mismatch || 0) + (totals.failed || 0);
  const bar = $("manifest-bar");
  bar.max = manifest.lines || 1; bar.value = ended;
  const list = $("manifest-totals");
  list.replaceChildren();
  const rows = [["Files", manifest.lines], ["OK", totals.ok], ["Mismatch", totals.mismatch],
    ["Could not read", totals.failed], ["Running", totals.running], ["Queued", totals.queued],
    ["Downloaded", size(totals.bytes_done || 0)]];
  for (const [label, value] of rows) {
    const dt = document.createElement("dt"); dt.textContent = label;
    const dd = document.createElement("dd"); dd.textContent = String(value ?? 0);
    dd.dataset.total = label;
    list.append(dt, dd);
  }
}

async function useKey(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (key) localStorage.setItem(KEY, JSON.stringify(key)); else localStorage.removeItem(KEY);
  $("api-key").value = "";
  const check = await api("/tasks?limit=1");
  say($("key-message"), !key ? "No key: showing this browser's tasks." :
    check.status === 200 ? "Key saved." : problem(check, "The key was refused"),
  Boolean(key) && check.status !== 200);
  if (key && check.status === 401) localStorage.removeItem(KEY);
  loadTasks();
}

document.addEventListener("DOMContentLoaded", () => {
  $("submit-form").addEventListener("submit", submitTask);
  $("key-form").addEventListener("submit", useKey);
  $("manifest-form").addEventListener("submit", submitManifest);
  $("refresh").addEventListener("click", loadTasks);
  $("detail-close").addEventListener("click", () => $("detail").close());
  loadTasks();
});
