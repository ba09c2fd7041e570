// The dashboard: GPUs (live charts, plans against what each GPU reports), instances and their acts, the
// peers' models, a followed log, any model's plan drawn, the front door's requests and the daemon's events.
// Everything is read from the daemon's own API; nothing is fetched from anywhere else.

import { events, json } from "./api.js";
import { $, Chart, TERMS, age, bar, h, mib, planView } from "./draw.js";
import { openLog, refreshPeers, refreshRequests } from "./panels.js";

const WINDOW_S = 300; // the charts show up to the last five minutes
// Ages tick and requests in flight change without an event: instances and requests are read this often.
const REFRESH_MS = 2000;
const EVENTS_KEPT = 200;
// States in which an instance's plan holds memory on its GPUs.
const HOLDING = new Set(["starting", "loading", "ready", "unhealthy", "draining", "stopping"]);
const CAN_START = new Set(["stopped", "failed", "backoff"]);

const gpus = new Map(); // index -> {charts, samples, latest, parts}
const cards = new Map(); // instance name -> {node, fields, status}
let topology = { links: [], thermal_limit_c: 90, poll_interval_s: 1 };
let instances = [];
let instancesAt = 0; // performance.now() when `instances` was read
const streams = { gpus: "connecting", events: "connecting" };

// ---- connection --------------------------------------------------------------------------------------

function streamState(name) {
  return (state) => {
    streams[name] = state;
    const open = Object.values(streams).every((s) => s === "open");
    $("connection").textContent = open ? "live" : "reconnecting…";
    $("connection").className = open ? "ok" : "warn";
  };
}

// ---- GPUs --------------------------------------------------------------------------------------------

// Each chart: the value of a sample, the chart's top (given the highest value shown), its limit line (null:
// none) and the text beside it.
const METRICS = [
  {
    metric: "memory",
    value: (s) => s.memory_used_mib,
    top: (s) => s.memory_total_mib,
    limit: () => null,
    text: (v, s) => `${mib(v)} of ${mib(s.memory_total_mib)}`,
  },
  {
    metric: "temperature",
    value: (s) => s.temperature_c,
    top: (_s, highest) => Math.max(topology.thermal_limit_c + 10, highest),
    limit: () => topology.thermal_limit_c,
    text: (v) => `${v.toFixed(0)} °C, limit ${topology.thermal_limit_c} °C`,
  },
  {
    metric: "utilisation",
    value: (s) => s.utilization_pct,
    top: () => 100,
    limit: () => null,
    text: (v) => `${v.toFixed(0)} %`,
  },
  {
    metric: "power",
    value: (s) => s.power_w,
    top: (s, highest) => Math.max(1.1 * (s.power_limit_w ?? 0), highest),
    limit: (s) => s.power_limit_w,
    text: (v, s) => `${v.toFixed(0)} W` + (s.power_limit_w ? ` of ${s.power_limit_w.toFixed(0)} W` : ""),
  },
];

function pcie(s) {
  if (s.pcie_gen === null || s.pcie_width === null) return "PCIe link not read";
  const below = (s.pcie_gen_max && s.pcie_gen < s.pcie_gen_max) || (s.pcie_width_max && s.pcie_width < s.pcie_width_max);
  const link = `PCIe gen${s.pcie_gen} x${s.pcie_width}`;
  return below ? `${link}, below its gen${s.pcie_gen_max} x${s.pcie_width_max}` : link;
}

function rate(bytesPerS) {
  if (bytesPerS === null || bytesPerS === undefined) return "-";
  for (const [unit, size] of [["GB/s", 1e9], ["MB/s", 1e6], ["kB/s", 1e3]]) {
    if (bytesPerS >= size) return `${(bytesPerS / size).toFixed(1)} ${unit}`;
  }
  return `${bytesPerS.toFixed(0)} B/s`;
}

// PCIe and NVLink/xGMI traffic: what the GPU sends (TX) and receives (RX), and links down or slow.
function traffic(s) {
  const parts = [];
  if (s.pcie_tx_bytes_per_second !== null || s.pcie_rx_bytes_per_second !== null) {
    parts.push(`PCIe TX ${rate(s.pcie_tx_bytes_per_second)} RX ${rate(s.pcie_rx_bytes_per_second)}`);
  }
  for (const l of s.links ?? []) {
    const peer = l.peer === null ? "" : /^[0-9]+$/.test(l.peer) ? ` to GPU ${l.peer}` : ` to ${l.peer}`;
    const state = l.up ? `TX ${rate(l.tx_bytes_per_second)} RX ${rate(l.rx_bytes_per_second)}` : "down";
    parts.push(`${l.kind} ${l.link}${peer}: ${state}`);
  }
  return parts.join(" · ");
}

function gpuCard(sample) {
  const parts = {
    title: h("h3", {}),
    facts: h("p", { className: "muted" }),
    traffic: h("p", { className: "muted traffic" }),
    error: h("p", { className: "error" }),
    memory: h("div", { className: "memory" }),
  };
  const charts = METRICS.map((m) => ({ chart: new Chart(m.metric), ...m }));
  const node = h(
    "article",
    { className: "card gpu", "data-gpu": sample.index },
    parts.title,
    parts.facts,
    parts.traffic,
    parts.error,
    h("div", { className: "charts" }, charts.map((c) => c.chart.node)),
    parts.memory,
  );
  if (!gpus.size) $("gpus").replaceChildren();
  $("gpus").append(node);
  const gpu = { charts, samples: [], latest: sample, parts, dirty: false };
  gpus.set(sample.index, gpu);
  return gpu;
}

function onSample(sample) {
  const gpu = gpus.get(sample.index) ?? gpuCard(sample);
  const last = gpu.samples.at(-1);
  if (last && sample.time <= last.time) return; // sent again after a reconnect
  gpu.samples.push(sample);
  while (gpu.samples[0].time < sample.time - WINDOW_S) gpu.samples.shift();
  gpu.latest = sample;
  if (!gpu.dirty) {
    gpu.dirty = true;
    requestAnimationFrame(() => drawGpu(gpu));
  }
}

function drawGpu(gpu) {
  gpu.dirty = false;
  const s = gpu.latest;
  gpu.parts.title.textContent = `GPU ${s.index} · ${s.name}`;
  gpu.parts.facts.textContent = [s.vendor, s.pci_bus_id, pcie(s), s.throttle.length ? `throttled: ${s.throttle.join(", ")}` : ""]
    .filter(Boolean)
    .join(" · ");
  gpu.parts.traffic.textContent = traffic(s);
  if (s.links?.length) drawLinks(); // the links line shows what flows on them
  gpu.parts.error.textContent = s.error ?? "";
  // The window fills the chart from the first sample held, up to WINDOW_S.
  const toS = s.time;
  const fromS = Math.min(gpu.samples[0].time, toS - 1);
  for (const { chart, value, top, limit, text } of gpu.charts) {
    const points = gpu.samples.filter((x) => value(x) !== null).map((x) => [x.time, value(x)]);
    const highest = Math.max(1, ...points.map((p) => p[1]));
    const shown = points.length ? text(points.at(-1)[1], s) : "not read";
    chart.update(points, fromS, toS, top(s, highest) || highest, limit(s), shown);
  }
  drawMemory(gpu);
}

// What each instance's plan puts on this GPU, term by term, beside what the GPU reports used.
function drawMemory(gpu) {
  const s = gpu.latest;
  if (s.memory_total_mib === null) {
    gpu.parts.memory.replaceChildren(h("p", { className: "muted" }, "memory not read"));
    return;
  }
  const planned = [];
  for (const inst of instances) {
    if (!HOLDING.has(inst.state) || !inst.plan) continue;
    for (const d of inst.plan.devices.filter((d) => d.gpu === s.index)) {
      for (const [term, key] of TERMS) planned.push({ term, mib: d[key], instance: inst.name, label: `${inst.name} ${term}` });
    }
  }
  const plannedMib = planned.reduce((sum, p) => sum + p.mib, 0);
  const used = s.memory_used_mib ?? 0;
  const names = [...new Set(planned.map((p) => p.instance))];
  gpu.parts.memory.replaceChildren(
    h("p", {}, names.length ? `planned for ${names.join(", ")}: ${mib(plannedMib)}` : "nothing planned here"),
    bar(planned, s.memory_total_mib, "planned"),
    h("p", {}, `reported used: ${mib(used)} of ${mib(s.memory_total_mib)}` + (names.length ? ` (${used >= plannedMib ? "+" : "−"}${mib(Math.abs(used - plannedMib))} against the plans)` : "")),
    bar([{ term: "used", mib: used, label: "used" }], s.memory_total_mib, "used"),
  );
}

// What flows between two GPUs now: the NVLink/xGMI links of the first that end at the second, both ways.
function flow(a, b) {
  const ends = (gpus.get(a)?.latest.links ?? []).filter((l) => l.up && l.peer === String(b));
  if (!ends.length) return "";
  const sum = (key) => ends.reduce((total, l) => total + (l[key] ?? 0), 0);
  return `, ${a}→${b} ${rate(sum("tx_bytes_per_second"))}, ${b}→${a} ${rate(sum("rx_bytes_per_second"))}`;
}

function drawLinks() {
  const text = topology.links.map((l) => `GPU ${l.gpus[0]} ↔ GPU ${l.gpus[1]}: ${l.link}${l.direct ? " (direct)" : " (through the CPU)"}${flow(l.gpus[0], l.gpus[1])}`);
  $("links").textContent = text.length ? `Links: ${text.join(" · ")}` : "";
}

async function startGpus() {
  topology = await json("gpus/topology");
  drawLinks();
  const latest = await json("gpus");
  if (!latest.length) {
    $("gpus").replaceChildren(h("p", { className: "none" }, "no GPU: the daemon sees none (gpus.backend: none, or no driver); models run on the CPU"));
    streams.gpus = "open";
    return;
  }
  const recent = Math.ceil(WINDOW_S / topology.poll_interval_s);
  // Each reconnect asks for the window again; samples already held are skipped by their time.
  events(() => `gpus/stream?recent=${recent}&follow=true`, (_kind, sample) => onSample(sample), streamState("gpus"));
}

// ---- instances ---------------------------------------------------------------------------------------

function field(label) {
  const value = h("span", { className: "v" });
  return [value, h("span", { className: `f ${label}` }, `${label} `, value)];
}

function instanceCard(name) {
  const fields = {};
  const facts = ["pid", "port", "GPUs", "restarts", "requests"].map((label) => {
    const [value, node] = field(label);
    fields[label] = value;
    return node;
  });
  fields.state = h("span", { className: "state" });
  fields.age = h("span", { className: "age muted" });
  fields.model = h("p", { className: "muted model" });
  fields.exit = h("p", { className: "exit" });
  fields.degraded = h("p", { className: "degraded-reason" });
  fields.line = h("p", { className: "logline" });
  fields.message = h("p", { className: "message" });
  const buttons = Object.fromEntries(
    ["start", "stop", "restart"].map((verb) => [verb, h("button", { type: "button", className: verb, textContent: verb, onclick: () => act(name, verb) })]),
  );
  fields.buttons = buttons;
  const node = h(
    "article",
    { className: "card instance", "data-instance": name },
    h("h3", {}, name, " ", fields.state, " ", fields.age),
    fields.model,
    h("p", { className: "facts" }, facts),
    fields.exit,
    fields.degraded,
    fields.line,
    h("p", { className: "actions" }, Object.values(buttons), h("button", { type: "button", className: "log", textContent: "log", onclick: () => openLog(name) })),
    fields.message,
  );
  const card = { node, fields, status: null };
  cards.set(name, card);
  return card;
}

function downloadLine(d) {
  const mb = (bytes) => (bytes / 1e6).toFixed(1);
  const share = d.total_bytes ? Math.floor((100 * d.done_bytes) / d.total_bytes) : 100;
  const left = d.eta_s === null ? "" : `, about ${Math.ceil(d.eta_s)} s left`;
  return `downloading ${d.file}: ${mb(d.done_bytes)} of ${mb(d.total_bytes)} MB (${share} %), ${mb(d.rate_bytes_s)} MB/s${left}`;
}

function drawInstance(status) {
  const card = cards.get(status.name) ?? instanceCard(status.name);
  const f = card.fields;
  card.status = status;
  f.state.textContent = status.state;
  f.state.className = `state ${status.state}`;
  f.model.textContent = `${status.backend} · ${status.model}`;
  f.pid.textContent = status.pid ?? "–";
  f.port.textContent = status.port ?? "–";
  f.GPUs.textContent = status.gpus.length ? status.gpus.join(", ") : "–";
  f.restarts.textContent = status.restarts;
  f.requests.textContent = `${status.requests_in_flight} in flight, ${status.requests_queued} queued`;
  const exit = [status.last_exit && `last exit: ${status.last_exit}`, status.last_error && `error: ${status.last_error}`];
  f.exit.textContent = exit.filter(Boolean).join(" · ");
  // Why it is down though nothing failed here: which peer or rpc-server it waits for.
  f.degraded.textContent = status.state === "degraded" ? `degraded: ${status.degraded_reason ?? "a peer is away"}` : "";
  // While a hub model's files download, how far it is stands where the server's last line will.
  f.line.textContent = status.download ? downloadLine(status.download) : (status.log_line ?? "");
  f.buttons.start.disabled = !CAN_START.has(status.state);
  f.buttons.stop.disabled = status.state === "stopped";
  return card.node;
}

function tickAges() {
  const elapsedS = (performance.now() - instancesAt) / 1000;
  for (const { fields, status } of cards.values()) {
    if (status) fields.age.textContent = `for ${age(status.state_age_s + elapsedS)}`;
  }
}

async function refreshInstances() {
  try {
    instances = await json("instances");
  } catch (error) {
    $("instances").replaceChildren(h("p", { className: "error" }, `instances: ${error.message}`));
    return;
  }
  instancesAt = performance.now();
  if (!instances.length) $("instances").replaceChildren(h("p", { className: "muted" }, "no model configured"));
  for (const status of instances) {
    const node = drawInstance(status);
    if (node.parentNode !== $("instances")) {
      $("instances").querySelector(":scope > p")?.remove(); // "loading…"
      $("instances").append(node); // kept in place after that: a press on its buttons is never cut short
    }
  }
  tickAges();
  drawPlanChoices();
  drawRequestCounts();
  for (const gpu of gpus.values()) drawMemory(gpu);
}

let refreshing = null;
function refreshSoon() {
  refreshing ??= setTimeout(() => {
    refreshing = null;
    refreshInstances();
  }, 50);
}

async function act(name, verb) {
  const message = cards.get(name).fields.message;
  message.className = "message";
  message.textContent = `${verb}…`;
  try {
    await json(`instances/${encodeURIComponent(name)}/${verb}`, { method: "POST" }, `${verb} ${name}`);
    message.textContent = ""; // the state shows how it goes
  } catch (error) {
    message.className = "message error";
    message.textContent = `${verb} refused: ${error.message}`;
  }
  refreshSoon();
}

// ---- plans -------------------------------------------------------------------------------------------

function drawPlanChoices() {
  const select = $("plan-model");
  const names = instances.map((i) => i.name);
  if ([...select.options].map((o) => o.value).join("\n") === names.join("\n")) return;
  const chosen = select.value;
  select.replaceChildren(...names.map((n) => h("option", { value: n, textContent: n })));
  if (names.includes(chosen)) select.value = chosen;
  else if (names.length) showPlan();
}

async function showPlan() {
  const name = $("plan-model").value;
  if (!name) return;
  try {
    const path = encodeURIComponent(name);
    const [plan, instance] = await Promise.all([json(`plan/${path}`), json(`instances/${path}`)]);
    if ($("plan-model").value === name) $("plan").replaceChildren(planView(plan, instance.actual));
  } catch (error) {
    $("plan").replaceChildren(h("p", { className: "error" }, `no plan for ${name}: ${error.message}`));
  }
}

$("plan-model").addEventListener("change", showPlan);

// ---- requests ----------------------------------------------------------------------------------------

function drawRequestCounts() {
  const byModel = new Map();
  for (const inst of instances) {
    const [flight, queued] = byModel.get(inst.group) ?? [0, 0];
    byModel.set(inst.group, [flight + inst.requests_in_flight, Math.max(queued, inst.requests_queued)]);
  }
  $("request-counts").replaceChildren(
    h("ul", { className: "counts" }, [...byModel].map(([model, [flight, queued]]) => h("li", { "data-model": model }, `${model}: ${flight} in flight, ${queued} queued`))),
  );
}

// ---- events ------------------------------------------------------------------------------------------

function describe(e) {
  const who = e.instance ?? (e.gpu !== null && e.gpu !== undefined ? `GPU ${e.gpu}` : "daemon");
  if (e.kind === "state" && e.state) return `${who}: ${e.state}${e.message === e.state ? "" : ` (${e.message})`}`;
  return `${who}: ${e.kind}: ${e.message}`;
}

function onEvent(_kind, event) {
  const list = $("events");
  list.prepend(
    h("li", { className: `kind-${event.kind}`, "data-kind": event.kind }, h("time", { dateTime: event.time }, event.time.slice(11, 19)), " ", describe(event)),
  );
  while (list.childElementCount > EVENTS_KEPT) list.lastChild.remove();
  if (event.instance) {
    refreshSoon();
    if (event.instance === $("plan-model").value && event.kind === "state") showPlan();
  }
}

function startEvents() {
  events(
    () => "events?recent=50",
    onEvent,
    (state) => {
      if (state === "open") $("events").replaceChildren(); // the recent ones come again
      streamState("events")(state);
    },
  );
}

// ---- start -------------------------------------------------------------------------------------------

async function start() {
  await refreshInstances();
  startEvents();
  try {
    await startGpus();
  } catch (error) {
    $("gpus").replaceChildren(h("p", { className: "error" }, `GPUs: ${error.message}`));
  }
  refreshRequests();
  refreshPeers();
  setInterval(refreshInstances, REFRESH_MS);
  setInterval(refreshRequests, REFRESH_MS);
  setInterval(refreshPeers, REFRESH_MS); // a peer that stops answering says nothing: it is read again
  setInterval(tickAges, 1000);
}

start();
