// The rdm serve page: plain JavaScript over the JSON API (/api/openapi.json), no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, job: null, events: null, lastSearch: null, progressEvents: 0 };

// --- talking to the API ---------------------------------------------------------------------------

function describeError(status, body) {
  // FastAPI answers {"detail": "text"} or, for invalid fields, {"detail": [{loc, msg}, ...]}
  const detail = body && body.detail;
  if (Array.isArray(detail)) {
    return `${status}: ` + detail.map((d) => `${(d.loc || []).slice(-1)[0]}: ${d.msg}`).join("; ");
  }
  return `${status}: ${detail || "request failed"}`;
}

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new Error(describeError(response.status, body));
  return body;
}

function setStatus(id, text, isError = false) {
  const el = $(id);
  el.textContent = text;
  el.classList.toggle("error", isError);
}

// --- drawing ----------------------------------------------------------------------------------------

function cell(src, title) {
  const img = document.createElement("img");
  img.className = "cell";
  img.alt = title || "";
  img.title = title || "";
  img.loading = "lazy";
  if (src) img.src = src;
  return img;
}

function card(n, extraClass) {
  const div = document.createElement("div");
  div.className = "card" + (extraClass ? " " + extraClass : "");
  div.dataset.id = n.id;
  div.appendChild(cell(n.image, `${n.caption} (id ${n.id})`));
  const caption = document.createElement("div");
  caption.className = "caption";
  caption.textContent = n.caption || `id ${n.id}`;
  div.appendChild(caption);
  if (n.score !== null && n.score !== undefined) {
    const score = document.createElement("div");
    score.className = "score";
    score.textContent = n.score.toFixed(3);
    div.appendChild(score);
  }
  return div;
}

function renderSearch(result) {
  const box = $("search-results");
  box.replaceChildren(...result.results.map((n) => card(n, "neighbour")));
  setStatus("search-status", `${result.k} nearest in ${result.db} to ${JSON.stringify(result.query)}`);
}

function renderJob(job, queryUrl) {
  // one row per sample: [query] neighbours → sample (a striped cell until it is done)
  const rows = job.samples.map((s) => {
    const row = document.createElement("div");
    row.className = "sample-row";
    row.dataset.index = s.index;
    if (s.uploaded_query && queryUrl) row.appendChild(card({ id: "query", caption: "your image", image: queryUrl }));
    if (s.query) row.appendChild(card({ ...s.query, caption: "x̃ " + s.query.caption }, "pseudo-query"));
    s.neighbors.forEach((n) => row.appendChild(card(n, "neighbour")));
    const arrow = document.createElement("span");
    arrow.className = "arrow";
    arrow.textContent = "→";
    row.appendChild(arrow);
    const sample = document.createElement("div");
    sample.className = "sample";
    if (s.image) sample.appendChild(cell(s.image, `sample ${s.index}, seed ${s.seed}`));
    else sample.appendChild(Object.assign(document.createElement("div"), { className: "pending" }));
    row.appendChild(sample);
    return row;
  });
  $("samples").replaceChildren(...rows);
}

function showProgress(job) {
  const bar = $("progress");
  bar.value = job.fraction;
  let text;
  if (job.state === "queued") text = job.position ? `queued, ${job.position} ahead` : "queued, next";
  else if (job.state === "running") {
    const batch = job.batches > 1 ? `, batch ${job.batch + 1}/${job.batches}` : "";
    const eta = job.fraction > 0 ? `, about ${(job.elapsed_s / job.fraction - job.elapsed_s).toFixed(1)} s left` : "";
    text = `step ${job.step}/${job.steps}${batch} · ${job.elapsed_s.toFixed(1)} s${eta}`;
  } else text = `${job.state} after ${job.elapsed_s.toFixed(1)} s`;
  $("progress-text").textContent = text;
  bar.dataset.state = job.state;
  bar.dataset.events = state.progressEvents;
}

// --- searching ------------------------------------------------------------------------------------

async function search(query) {
  const form = new FormData();
  form.append("db", $("db").value);
  form.append("k", query.k);
  if (query.image) form.append("image", query.image);
  else form.append("text", query.text);
  setStatus("search-status", "searching…");
  try {
    renderSearch(await api("/api/search", { method: "POST", body: form }));
    state.lastSearch = query;
  } catch (err) {
    $("search-results").replaceChildren();
    setStatus("search-status", err.message, true);
  }
}

function onSearch(event) {
  event.preventDefault();
  const file = $("search-image").files[0];
  const text = $("search-text").value;
  if (!file && !text.trim()) return setStatus("search-status", "type a prompt or choose an image", true);
  search({ k: $("search-k").value, text, image: file || null });
}

// --- generating -----------------------------------------------------------------------------------

function mode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

function showModeFields() {
  document.querySelectorAll("[data-modes]").forEach((el) => {
    el.hidden = !el.dataset.modes.split(" ").includes(mode());
  });
}

function generationForm() {
  const form = new FormData();
  const m = mode();
  form.append("db", $("db").value);
  form.append("mode", m);
  form.append("n", $("gen-n").value);
  form.append("seed", $("gen-seed").value);
  form.append("sampler", $("gen-sampler").value);
  if ($("gen-steps").value) form.append("steps", $("gen-steps").value);
  if ($("gen-guidance").value) form.append("guidance", $("gen-guidance").value);
  if (m === "text" || m === "class_pool") form.append("text", $("gen-text").value);
  if (m === "text") form.append("text_mode", $("gen-text-mode").value);
  if (m === "image" && $("gen-image").files[0]) {
    form.append("image", $("gen-image").files[0]);
    form.append("include_query", $("gen-include-query").checked);
  }
  if (m === "unconditional") {
    if ($("gen-top-m").value) form.append("top_m", $("gen-top-m").value);
    form.append("weighted", $("gen-weighted").checked);
    const db = state.info.databases.find((d) => d.name === $("db").value);
    if (db && !db.unconditional) form.append("uniform", "true"); // no p(x̃) for this database
  }
  if (m === "class_pool") form.append("pool_size", $("gen-pool").value);
  return form;
}

function finish(job) {
  if (state.events) state.events.close(); // else EventSource reconnects when the stream ends
  state.events = null;
  $("generate-button").disabled = false;
  $("cancel-button").disabled = true;
  if (job.state === "done") {
    const link = $("download");
    link.href = job.grid;
    link.download = `rdm-${job.db}-${job.id.slice(0, 8)}.png`;
    link.hidden = false;
    setStatus("generate-status", `${job.n} images from ${job.label} in ${job.elapsed_s.toFixed(1)} s`);
  } else {
    setStatus("generate-status", `${job.state}: ${job.error || ""}`, job.state === "failed");
  }
}

async function onGenerate(event) {
  event.preventDefault();
  if (state.events) return;
  const queryFile = mode() === "image" ? $("gen-image").files[0] : null;
  const queryUrl = queryFile ? URL.createObjectURL(queryFile) : null;
  $("generate-button").disabled = true;
  $("download").hidden = true;
  state.progressEvents = 0;
  setStatus("generate-status", "submitting…");
  let job;
  try {
    job = await api("/api/generate", { method: "POST", body: generationForm() });
  } catch (err) {
    $("generate-button").disabled = false;
    return setStatus("generate-status", err.message, true);
  }
  state.job = job;
  renderJob(job, queryUrl);
  showProgress(job);
  setStatus("generate-status", `${job.label}: ${job.n} images, ${job.sampler}-${job.steps}, guidance ${job.guidance}`);
  $("cancel-button").disabled = false;
  const events = new EventSource(job.events);
  state.events = events;
  const update = (e) => {
    const j = JSON.parse(e.data);
    if (e.type === "progress") state.progressEvents += 1;
    state.job = j;
    showProgress(j);
    if (["done", "failed", "cancelled"].includes(j.state)) {
      if (j.state === "done") renderJob(j, queryUrl);
      finish(j);
    }
  };
  ["queued", "progress", "done", "failed", "cancelled"].forEach((kind) => events.addEventListener(kind, update));
  events.onerror = () => {
    if (state.events === events && events.readyState === EventSource.CLOSED) {
      setStatus("generate-status", "lost the connection to the server", true);
      finish({ ...state.job, state: "failed", error: "connection lost" });
    }
  };
}

async function onCancel() {
  if (!state.job) return;
  $("cancel-button").disabled = true;
  try {
    await api(`/api/jobs/${state.job.id}/cancel`, { method: "POST" });
  } catch (err) {
    setStatus("generate-status", err.message, true);
  }
}

// --- set-up ------------------------------------------------------------------------------------

function option(value, text) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = text || value;
  return o;
}

function onDatabase() {
  const db = state.info.databases.find((d) => d.name === $("db").value);
  $("db-info").textContent = `${db.count} images from ${db.source} (${db.split})` +
    (db.unconditional ? "" : " · no p(x̃): pseudo-queries are drawn uniformly");
  if (state.lastSearch) search(state.lastSearch); // the same query, now in this database
}

function acceptDrops(form, input) {
  // drop an image anywhere on the form: it becomes the form's file
  form.addEventListener("dragover", (e) => { e.preventDefault(); form.classList.add("dragging"); });
  form.addEventListener("dragleave", () => form.classList.remove("dragging"));
  form.addEventListener("drop", (e) => {
    e.preventDefault();
    form.classList.remove("dragging");
    if (e.dataTransfer.files.length) input.files = e.dataTransfer.files;
  });
}

async function init() {
  const info = await api("/api/info");
  state.info = info;
  const m = info.model;
  $("model").textContent = `model ${m.name}: k = ${m.k}, ${m.resolution} px, ${m.channels === 1 ? "grey" : "colour"}, ${m.prediction}`;
  $("db").replaceChildren(...info.databases.map((d) => option(d.name, `${d.name} (${d.count})`)));
  if (info.refused.length) {
    $("refused").hidden = false;
    $("refused").textContent = "Not offered (another encoder than the model's): " +
      info.refused.map((r) => r.name).join(", ");
  }
  $("gen-text-mode").replaceChildren(...info.text_modes.map((t) => option(t)));
  $("gen-sampler").replaceChildren(...info.samplers.map((s) => option(s)));
  const d = info.defaults, lim = info.limits;
  $("gen-sampler").value = d.sampler;
  $("gen-steps").value = d.steps;
  $("gen-steps").max = lim.max_steps;
  $("gen-guidance").value = d.guidance;
  $("gen-guidance").max = lim.max_guidance;
  $("gen-n").value = d.n;
  $("gen-n").max = lim.max_n;
  $("search-k").value = d.k;
  $("search-k").max = lim.max_k;
  $("gen-pool").max = lim.max_pool;
  onDatabase();
  showModeFields();
  document.querySelectorAll('input[name="mode"]').forEach((r) => r.addEventListener("change", showModeFields));
  $("db").addEventListener("change", onDatabase);
  $("search-form").addEventListener("submit", onSearch);
  $("search-image").addEventListener("change", () => { if ($("search-image").files[0]) $("search-text").value = ""; });
  $("search-text").addEventListener("input", () => { $("search-image").value = ""; });
  $("generate-form").addEventListener("submit", onGenerate);
  $("cancel-button").addEventListener("click", onCancel);
  acceptDrops($("search-form"), $("search-image"));
  acceptDrops($("generate-form"), $("gen-image"));
  document.body.dataset.ready = "true";
}

init().catch((err) => setStatus("search-status", `cannot reach the server: ${err.message}`, true));
