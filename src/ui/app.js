// lineside review UI: a feed of recent inspections and a part view with the
// image, its defect overlay and a review form. Plain DOM, no framework, no
// CDN: the line network is offline. Text from records is only ever set with
// textContent, never parsed as HTML.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, props = {}, ...children) => {
  const e = document.createElement(tag);
  Object.assign(e, props);
  for (const c of children) e.append(c);
  return e;
};
const svg = (tag, attrs = {}) => {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
};
const fmtTime = (iso) => new Date(iso).toLocaleString();
const pct = (x) => (100 * x).toFixed(1) + "%";

// With auth.required the API wants a key; it is asked for once and kept for
// this tab only (sessionStorage), never in a cookie or the URL.
const KEY = "lineside-api-key";
const authHeaders = () => {
  const k = sessionStorage.getItem(KEY);
  return k ? { authorization: "Bearer " + k } : {};
};

async function api(path, options = {}, retried = false) {
  const resp = await fetch(path, { ...options, headers: { ...(options.headers || {}), ...authHeaders() } });
  if (resp.status === 401 && !retried) {
    const k = window.prompt("This server needs an API key (a factory key or the admin token):");
    if (k) {
      sessionStorage.setItem(KEY, k.trim());
      return api(path, options, true);
    }
  }
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(body.error ? body.error.message : resp.statusText);
  return body;
}

// <img src> cannot send a key: with one, the image is fetched and shown from a blob.
async function setImage(img, url) {
  if (!sessionStorage.getItem(KEY)) {
    img.src = url;
    return;
  }
  const resp = await fetch(url, { headers: authHeaders() });
  if (resp.ok) img.src = URL.createObjectURL(await resp.blob());
}

function setStatus(text) {
  $("#status").textContent = text;
}

// ---- feed ----------------------------------------------------------------

let pollTimer = null;
let cursor = null;

function filterParams() {
  const params = new URLSearchParams();
  for (const [k, v] of new FormData($("#filters"))) if (v) params.set(k, v);
  return params;
}

async function loadFeed(append = false) {
  const params = filterParams();
  params.set("limit", "50");
  if (append && cursor) params.set("cursor", cursor);
  const page = await api("/v1/inspections?" + params);
  cursor = page.next_cursor;
  $("#more").hidden = !cursor;
  const body = $("#feed tbody");
  if (!append) body.replaceChildren();
  for (const r of page.items) body.append(feedRow(r));
  if (!append) await loadStats(page.items);
  setStatus("updated " + new Date().toLocaleTimeString());
}

function feedRow(r) {
  const v = r.effective_verdict;
  const row = el("tr", {},
    el("td", { textContent: fmtTime(r.time) }),
    el("td", { textContent: r.factory || "—" }),
    el("td", { textContent: r.line || "—" }),
    el("td", { textContent: r.part_id || "—" }),
    el("td", { textContent: r.label }),
    el("td", { textContent: r.score.toFixed(3) }),
    el("td", { className: "verdict v-" + v, textContent: v + (r.review ? " (reviewed)" : "") }));
  row.dataset.id = r.id;
  row.dataset.verdict = v;
  row.addEventListener("click", () => { location.hash = "#/inspection/" + encodeURIComponent(r.id); });
  return row;
}

async function loadStats(recent) {
  const params = filterParams();
  const stats = await api("/v1/stats?" + params);
  // One card per line: totals from the statistics, the latest verdict from the feed.
  const lines = new Map();
  for (const row of stats.rows) {
    const key = (row.factory || "—") + " / " + (row.line || "—");
    const t = lines.get(key) || { count: 0, fail: 0, review: 0 };
    t.count += row.count; t.fail += row.fail; t.review += row.review;
    lines.set(key, t);
  }
  const latest = new Map();
  for (const r of recent) {
    const key = (r.factory || "—") + " / " + (r.line || "—");
    if (!latest.has(key)) latest.set(key, r);
  }
  $("#lines").replaceChildren(...[...lines].map(([key, t]) => {
    const last = latest.get(key);
    return el("div", { className: "line-card" },
      el("b", { textContent: key }),
      el("span", { textContent: `${t.count} parts · ${pct(t.fail / t.count)} defective · ${t.review} to review` }),
      el("div", { className: last ? "verdict v-" + last.effective_verdict : "muted",
                  textContent: last ? "last: " + last.effective_verdict + " (" + last.label + ")" : "" }));
  }));
  drawChart(stats.rows);
}

function drawChart(rows) {
  const hours = new Map();
  for (const r of rows) {
    const h = hours.get(r.hour) || { count: 0, fail: 0 };
    h.count += r.count; h.fail += r.fail;
    hours.set(r.hour, h);
  }
  const data = [...hours].sort((a, b) => a[0].localeCompare(b[0])).slice(-48);
  const chart = svg("svg", { viewBox: "0 0 600 160", preserveAspectRatio: "xMinYMin meet", role: "img" });
  const title = svg("title");
  title.textContent = "defect rate per hour";
  chart.append(title);
  const w = Math.min(36, data.length ? 560 / data.length : 560);
  for (const [y, text] of [[15, "100%"], [135, "0%"]]) {
    const label = svg("text", { x: 0, y: y + 3 });
    label.textContent = text;
    chart.append(label);
  }
  data.forEach(([hour, h], i) => {
    const rate = h.count ? h.fail / h.count : 0;
    const height = Math.max(1, rate * 120);
    const bar = svg("rect", { x: 32 + i * w + 1, y: 135 - height, width: Math.max(1, w - 2), height });
    bar.append(svg("title"));
    bar.firstChild.textContent = `${fmtTime(hour)}: ${pct(rate)} of ${h.count}`;
    chart.append(bar);
    if (i === 0 || i === data.length - 1) {
      const label = svg("text", { x: 32 + i * w, y: 152 });
      label.textContent = new Date(hour).toLocaleString([], { month: "short", day: "numeric", hour: "2-digit" });
      chart.append(label);
    }
  });
  if (!data.length) {
    const t = svg("text", { x: 250, y: 80 });
    t.textContent = "no inspections in this range";
    chart.append(t);
  }
  $("#chart").replaceChildren(chart);
}

// ---- part view -------------------------------------------------------------

async function loadPart(id) {
  const r = await api("/v1/inspections/" + encodeURIComponent(id));
  $("#part-title").textContent = `${r.factory || "—"} / ${r.line || "—"} · part ${r.part_id || "—"}`;
  showVerdict(r);
  const facts = [
    ["id", r.id], ["time", fmtTime(r.time)], ["label", `${r.label} (${r.score.toFixed(3)})`],
    ["anomaly score", r.anomaly_score == null ? "—" : r.anomaly_score.toFixed(3)],
    ["model", `${r.model} @ ${r.model_version}`],
    ["plugins", (r.plugins || []).map((p) => `${p.stage}: ${p.name} (${p.sha256.slice(0, 12)})`).join(", ") || "—"],
    ["capture", r.capture_id || "—"], ["total ms", r.timings.total],
  ];
  if (r.storage_warning) facts.push(["storage", r.storage_warning]);
  $("#facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", { textContent: k }), el("dd", { textContent: String(v) })]));
  $("#defects tbody").replaceChildren(...(r.defects || []).map((d) => el("tr", {},
    el("td", { textContent: d.code || "—" }), el("td", { textContent: d.label || "—" }),
    el("td", { textContent: d.score == null ? "—" : Number(d.score).toFixed(3) }),
    el("td", { textContent: d.region ? d.region.join(", ") : "—" }))));
  drawStage(r);
  showReviews(r.reviews || []);
  $("#review-form").dataset.id = r.id;
  $("#review-status").textContent = "";
}

function showVerdict(r) {
  const v = r.effective_verdict;
  $("#verdict").className = "verdict v-" + v;
  $("#verdict").textContent = v;
  $("#model-verdict").textContent = r.review
    ? `(model said ${r.verdict}; overridden by ${r.review.reviewer} at ${fmtTime(new Date(r.review.reviewed_ms).toISOString())})`
    : "(model verdict)";
}

function showReviews(reviews) {
  $("#reviews").replaceChildren(...reviews.map((x) => el("li", {
    textContent: `${fmtTime(new Date(x.created_ms).toISOString())}: ${x.reviewer} → ${x.verdict}${x.note ? " — " + x.note : ""}`,
  })));
}

function drawStage(r) {
  const stage = $("#stage");
  if (!r.image_url) {
    stage.replaceChildren(el("div", { className: "missing", textContent: "image not retained (pass not sampled, or removed by retention)" }));
    return;
  }
  const img = el("img", { id: "part-image", alt: "inspected part" });
  setImage(img, r.image_url);
  const size = (r.response && r.response.image) || { width: 100, height: 100 };
  const overlay = svg("svg", { id: "overlay", viewBox: `0 0 ${size.width} ${size.height}`, preserveAspectRatio: "none" });
  for (const d of r.defects || []) {
    if (!d.region) continue;
    const [x, y, w, h] = d.region;
    overlay.append(svg("rect", { x, y, width: w, height: h, "data-code": d.code || d.label || "" }));
    const t = svg("text", { x: x + 2, y: Math.max(12, y - 3) });
    t.textContent = d.code || d.label || "";
    overlay.append(t);
  }
  const parts = [img];
  if (r.heatmap_url) {
    const heat = el("img", { className: "heat", id: "heatmap", alt: "anomaly heatmap" });
    setImage(heat, r.heatmap_url);
    heat.hidden = !$("#show-heatmap").checked;
    parts.push(heat);
  }
  parts.push(overlay);
  stage.replaceChildren(...parts);
  $("#show-heatmap").disabled = !r.heatmap_url;
}

async function submitReview(ev) {
  ev.preventDefault();
  const form = ev.target;
  const data = Object.fromEntries(new FormData(form));
  if (!data.note) delete data.note;
  try {
    const r = await api(`/v1/inspections/${encodeURIComponent(form.dataset.id)}/review`, {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(data),
    });
    showVerdict(r);
    showReviews(r.reviews || []);
    $("#review-status").textContent = `Saved: ${r.review.verdict} by ${r.review.reviewer}`;
  } catch (e) {
    $("#review-status").textContent = "Not saved: " + e.message;
  }
}

// ---- routing ---------------------------------------------------------------

async function route() {
  clearInterval(pollTimer);
  const m = location.hash.match(/^#\/inspection\/(.+)$/);
  $("#feed-view").hidden = !!m;
  $("#part-view").hidden = !m;
  try {
    if (m) {
      await loadPart(decodeURIComponent(m[1]));
    } else {
      await loadFeed();
      pollTimer = setInterval(() => loadFeed().catch((e) => setStatus("offline: " + e.message)), 2000);
    }
  } catch (e) {
    setStatus("error: " + e.message);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#filters").addEventListener("submit", (ev) => { ev.preventDefault(); loadFeed().catch((e) => setStatus(e.message)); });
  $("#more").addEventListener("click", () => loadFeed(true).catch((e) => setStatus(e.message)));
  $("#review-form").addEventListener("submit", submitReview);
  $("#show-heatmap").checked = true;
  $("#show-heatmap").addEventListener("change", (ev) => {
    const heat = $("#heatmap");
    if (heat) heat.hidden = !ev.target.checked;
  });
  window.addEventListener("hashchange", route);
  route();
});
