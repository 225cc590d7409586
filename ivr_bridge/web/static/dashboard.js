// The operator dashboard: live calls from the event stream (/dashboard/feed), a call's
// transcript as it grows, transfer and hang-up through the control API, and the call
// records' history. Everything a caller controls (numbers, words) is set as text.
import { api, ApiError, askToken, events, token } from "./api.js";

const $ = (id) => document.getElementById(id);
const CHART_POINTS = 150; // 5 minutes of 2 s ticks

const live = new Map(); // call_sid -> short snapshot
const chart = [];
let selected = null; // {sid}
let feed = null; // AbortController of the event stream

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text ?? "";
  if (className) td.className = className;
  row.append(td);
  return td;
}

function duration(seconds) {
  const s = Math.max(0, Math.round(seconds || 0));
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

function replyP50(latency) {
  const p50 = latency?.reply_ms?.p50;
  return p50 == null ? "–" : `${Math.round(p50)} ms`;
}

function renderLive() {
  const body = $("live-calls");
  const rows = [...live.values()].sort((a, b) => a.started_at - b.started_at);
  if (!rows.length) {
    const empty = document.createElement("tr");
    empty.className = "empty";
    cell(empty, "No calls right now").colSpan = 8;
    body.replaceChildren(empty);
    return;
  }
  const now = Date.now() / 1000;
  body.replaceChildren(
    ...rows.map((c) => {
      const row = document.createElement("tr");
      row.dataset.sid = c.call_sid;
      if (selected?.sid === c.call_sid) row.className = "selected";
      cell(row, c.from || "unknown");
      cell(row, c.line || "phone");
      cell(row, c.provider);
      cell(row, duration(c.ended ? c.duration_s : now - c.started_at));
      cell(row, c.ended ? "ended" : c.state, `state ${c.ended ? "ended" : c.state}`);
      cell(row, c.turns ?? 0);
      cell(row, c.barge_ins ?? 0);
      cell(row, replyP50(c.latency));
      row.onclick = () => select(c.call_sid);
      return row;
    }),
  );
}

function renderChart() {
  const maxCalls = Math.max(1, ...chart.map((p) => p.active));
  const maxLatency = Math.max(100, ...chart.map((p) => p.p95 ?? 0));
  const x = (i) => (300 * (i + CHART_POINTS - chart.length)) / (CHART_POINTS - 1);
  const points = (value, max) =>
    chart
      .map((p, i) => [i, value(p)])
      .filter(([, v]) => v != null)
      .map(([i, v]) => `${x(i).toFixed(1)},${(58 - (56 * v) / max).toFixed(1)}`)
      .join(" ");
  $("chart-calls").setAttribute("points", points((p) => p.active, maxCalls));
  $("chart-latency").setAttribute("points", points((p) => p.p95, maxLatency));
}

function onStats(stats) {
  const seen = new Set();
  for (const c of stats.calls) {
    seen.add(c.call_sid);
    live.set(c.call_sid, c);
  }
  for (const [sid, c] of live) if (!seen.has(sid) && !c.ended) live.delete(sid);
  $("active").textContent = String(stats.active);
  const { p50, p95 } = stats.reply_ms;
  $("latency").textContent = p50 == null ? "–" : `${p50} / ${p95} ms`;
  chart.push({ active: stats.active, p95 });
  if (chart.length > CHART_POINTS) chart.shift();
  renderLive();
  renderChart();
}

function transcriptLine(kind, text) {
  const item = document.createElement("li");
  item.className = kind;
  item.textContent = text;
  $("detail-transcript").append(item);
  return item;
}

function assistantLine(text, heard, interrupted, heardMs) {
  const item = transcriptLine("assistant", heard ?? text);
  if (interrupted && heard != null && text.length > heard.length) {
    const cut = document.createElement("del");
    cut.textContent = text.slice(heard.length);
    cut.title = `cut off: the caller heard ${heardMs} ms`;
    item.append(cut);
  }
  return item;
}

function showEvent(event) {
  const d = event.data;
  switch (event.type) {
    case "transcript":
      if (d.role === "user") transcriptLine("user", d.text);
      else assistantLine(d.text, d.heard_text, d.interrupted, d.heard_ms);
      break;
    case "barge_in":
      transcriptLine("event barge", `Barge-in: the bot was cut after ${d.heard_ms} ms (${d.dropped_ms} ms not played)`);
      break;
    case "dtmf":
      transcriptLine("event", `Key ${d.digit}${d.action ? ` → ${d.action}` : ""}`);
      break;
    case "emotion":
      if (d.top?.length) transcriptLine("event emotion", `Emotion: ${d.top.map((e) => `${e.name} ${Math.round(e.score * 100)}%`).join(", ")}`);
      break;
    case "control":
      transcriptLine("event", `${d.action === "transfer" ? `Transferred to ${d.to}` : "Hung up"} by ${d.source}`);
      break;
    case "upstream.error":
      transcriptLine("event error", `Voice API: ${d.message}${d.retrying ? " (reconnecting)" : ""}`);
      break;
    case "call.ended":
      transcriptLine("event", `Ended: ${d.outcome.replaceAll("_", " ")} after ${d.duration_s.toFixed(1)} s`);
      break;
    default:
  }
}

function onEvent(event) {
  const sid = event.call_sid;
  if (event.type === "call.started") {
    const d = event.data;
    live.set(sid, {
      call_sid: sid,
      from: d.from,
      to: d.to,
      line: d.line,
      provider: d.provider,
      state: "connected",
      started_at: event.at - event.elapsed,
      turns: 0,
      barge_ins: 0,
    });
  } else if (live.has(sid)) {
    const c = live.get(sid);
    if (event.type === "transcript" && event.data.role === "user") c.turns = (c.turns ?? 0) + 1;
    if (event.type === "barge_in") c.barge_ins = (c.barge_ins ?? 0) + 1;
    if (event.type === "call.ended") {
      Object.assign(c, { ended: true, outcome: event.data.outcome, duration_s: event.data.duration_s });
      if (event.data.latency) c.latency = event.data.latency;
      setTimeout(() => {
        live.delete(sid);
        renderLive();
      }, 10000); // an ended call stays listed a little while, then leaves
    }
  }
  if (selected?.sid === sid) {
    showEvent(event);
    if (event.type === "call.ended") showActions(false);
  }
  renderLive();
}

function showActions(active) {
  $("detail-actions").hidden = !active;
}

async function select(sid) {
  selected = { sid };
  renderLive();
  $("detail-title").textContent = sid;
  $("detail-result").textContent = "";
  $("detail-transcript").replaceChildren();
  showActions(false);
  let call;
  try {
    call = await (await api(`/calls/${encodeURIComponent(sid)}`)).json();
  } catch (error) {
    $("detail-meta").textContent = `Not found: ${error.message}`;
    return;
  }
  if (selected?.sid !== sid) return;
  const meta = [
    `${call.from || call.from_number || "unknown"} → ${call.to || call.to_number || ""}`,
    call.provider,
    call.active ? call.state : (call.outcome || "").replaceAll("_", " "),
    `${(call.duration_s ?? 0).toFixed(1)} s`,
    `reply p50 ${replyP50(call.latency)}`,
  ];
  $("detail-meta").textContent = meta.filter(Boolean).join(" · ");
  showActions(call.active);
  if (call.active) {
    for (const l of call.transcript || []) {
      if (l.role === "user") transcriptLine("user", l.text);
      else assistantLine(l.text, l.heard_text, l.interrupted, l.heard_ms);
    }
    for (const k of call.dtmf || []) transcriptLine("event", `Key ${k.digit}`);
  } else {
    for (const e of call.events || []) showEvent(e);
  }
}

async function control(path, body) {
  if (!selected) return;
  $("detail-result").textContent = "Waiting for the bot's sentence to finish…";
  try {
    const result = await (await api(`/calls/${encodeURIComponent(selected.sid)}/${path}`, { method: "POST", body })).json();
    $("detail-result").textContent = `${result.action}: ${result.result.replaceAll("_", " ")} (waited ${result.waited_ms} ms)`;
  } catch (error) {
    $("detail-result").textContent = `Not done: ${error.message}`;
  }
}

function query(form) {
  const params = new URLSearchParams();
  for (const [name, value] of new FormData(form)) {
    if (!value) continue;
    // datetime-local is the operator's local time: sent as UTC.
    params.set(name, name === "since" || name === "until" ? new Date(value).toISOString() : value);
  }
  return params;
}

async function search(e) {
  e?.preventDefault();
  const body = $("history");
  let calls;
  try {
    calls = (await (await api(`/records?${query($("search"))}`)).json()).calls;
  } catch (error) {
    body.replaceChildren();
    const row = document.createElement("tr");
    cell(row, `Search failed: ${error.message}`).colSpan = 8;
    body.append(row);
    return;
  }
  if (!calls.length) {
    const row = document.createElement("tr");
    row.className = "empty";
    cell(row, "No calls match").colSpan = 8;
    body.replaceChildren(row);
    return;
  }
  body.replaceChildren(
    ...calls.map((c) => {
      const row = document.createElement("tr");
      row.dataset.sid = c.call_sid;
      cell(row, new Date(c.started_at).toLocaleString());
      cell(row, c.from_number);
      cell(row, c.to_number);
      cell(row, c.provider);
      cell(row, c.duration_s == null ? "–" : duration(c.duration_s));
      cell(row, (c.outcome || "").replaceAll("_", " "), `outcome ${c.outcome}`);
      cell(row, c.turns ?? "");
      cell(row, c.barge_ins ?? "");
      row.onclick = () => select(c.call_sid);
      return row;
    }),
  );
}

async function exportRecords() {
  try {
    const response = await api(`/records/export?${query($("search"))}`);
    const url = URL.createObjectURL(await response.blob());
    const link = document.createElement("a");
    link.href = url;
    link.download = (response.headers.get("content-disposition") || "").match(/filename="(.+)"/)?.[1] || "calls.jsonl";
    link.click();
    URL.revokeObjectURL(url);
  } catch (error) {
    $("detail-result").textContent = `Export failed: ${error.message}`;
  }
}

function feedState(state, text) {
  const node = $("feed-state");
  node.dataset.state = state;
  node.textContent = text;
}

async function watch() {
  for (;;) {
    feed = new AbortController();
    feedState("on", "live");
    try {
      await events("/dashboard/feed", (kind, data) => {
        if (kind === "stats") onStats(data);
        else if (kind === "event") onEvent(data);
        else if (kind === "lagged") feedState("off", "reconnecting");
      }, feed.signal);
    } catch (error) {
      if (error instanceof ApiError && (error.status === 401 || error.status === 403)) throw error;
    }
    feedState("off", "reconnecting");
    await new Promise((r) => setTimeout(r, 2000));
  }
}

async function start() {
  for (;;) {
    if (!token.get()) await askToken($("token-form"), "The dashboard needs the bridge's API token (IVR_API_TOKEN).");
    try {
      await api("/calls");
    } catch (error) {
      if (error instanceof ApiError && (error.status === 401 || error.status === 403)) {
        token.clear();
        $("board").hidden = true;
        await askToken($("token-form"), `Refused: ${error.message}.`);
        continue;
      }
      throw error;
    }
    break;
  }
  $("board").hidden = false;
  $("sign-out").hidden = false;
  search();
  try {
    await watch();
  } catch {
    token.clear();
    location.reload();
  }
}

for (const outcome of document.body.dataset.outcomes.split(",")) {
  const option = document.createElement("option");
  option.value = option.textContent = outcome;
  $("outcomes").append(option);
}
$("search").onsubmit = search;
$("export").onclick = exportRecords;
$("hangup").onclick = () => control("hangup");
$("transfer").onclick = () => control("transfer", { to: $("transfer-to").value });
$("sign-out").onclick = () => {
  token.clear();
  feed?.abort();
  location.reload();
};
setInterval(renderLive, 1000); // durations tick
start();
