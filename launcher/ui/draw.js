// Drawing: elements built from data (never from HTML strings: log lines and names are text), time-series
// charts in SVG, stacked memory bars and the plan's columns in HTML.

const SVG = "http://www.w3.org/2000/svg";
// Chart geometry in SVG units: the drawing stretches to the card's width, the text around it is HTML.
const CHART_W = 300;
const CHART_H = 60;

export const $ = (id) => document.getElementById(id);

// An HTML element: props are properties (className, textContent, dataset via "data-" keys, on* handlers).
export function h(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null) continue;
    if (key.startsWith("data-")) node.setAttribute(key, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node[key] = value;
  }
  node.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  node.append(...children);
  return node;
}

export function mib(value) {
  if (value === null || value === undefined) return "?";
  return value >= 1024 ? `${(value / 1024).toFixed(1)} GiB` : `${Math.round(value)} MiB`;
}

export function age(seconds) {
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  if (seconds < 172800) return `${(seconds / 3600).toFixed(1)} h`;
  return `${Math.round(seconds / 86400)} d`;
}

// A line chart over a time window, with a dashed limit line (thermal limit, power limit); without a point
// it shows its text alone, no empty axes. `data-points` says how many points it holds.
export class Chart {
  constructor(metric) {
    this.value = h("span", { className: "value" });
    this.line = svg("polyline", { class: "line", "vector-effect": "non-scaling-stroke", points: "" });
    this.limit = svg("line", { class: "limit", "vector-effect": "non-scaling-stroke", x1: 0, x2: CHART_W });
    this.svg = svg(
      "svg",
      { class: "chart", viewBox: `0 0 ${CHART_W} ${CHART_H}`, preserveAspectRatio: "none", "data-metric": metric },
      this.limit,
      this.line,
    );
    this.node = h("figure", { className: "metric" }, h("figcaption", {}, metric, " ", this.value), this.svg);
  }

  // points: [[time_s, value]] oldest first; top: the value at the chart's top; limit: null for none.
  update(points, fromS, toS, top, limit, text) {
    const spanS = Math.max(toS - fromS, 1e-3);
    const x = (t) => (((t - fromS) / spanS) * CHART_W).toFixed(1);
    const y = (v) => (CHART_H - (Math.min(v, top) / top) * CHART_H).toFixed(1);
    this.line.setAttribute("points", points.map(([t, v]) => `${x(t)},${y(v)}`).join(" "));
    this.svg.dataset.points = points.length;
    this.limit.style.display = limit === null ? "none" : "";
    if (limit !== null) for (const attr of ["y1", "y2"]) this.limit.setAttribute(attr, y(limit));
    this.value.textContent = text;
    this.svg.style.display = points.length ? "" : "none";
  }
}

// A horizontal bar of segments [{term, mib, label, instance}] against a total; data- attributes carry the
// numbers so what is drawn can be checked against the API.
export function bar(segments, totalMib, className) {
  return h(
    "div",
    { className: `bar ${className}` },
    segments.map((s) => {
      const node = h("span", {
        className: `seg ${s.term}`,
        title: `${s.label}: ${mib(s.mib)}`,
        "data-term": s.term,
        "data-mib": s.mib,
        "data-instance": s.instance,
      });
      node.style.width = `${Math.max(0, (100 * s.mib) / totalMib)}%`;
      return node;
    }),
  );
}

export const TERMS = [
  ["weights", "weights_mib"],
  ["kv", "kv_cache_mib"],
  ["compute", "compute_mib"],
  ["overhead", "overhead_mib"],
];

function legend() {
  return h(
    "p",
    { className: "legend" },
    TERMS.map(([term]) => h("span", {}, h("i", { className: `seg ${term}` }), term)),
  );
}

// A device's name in a plan: a peer's RPC device is named by its host, whose GPU indices are its own.
function deviceLabel(d) {
  return d.host && d.host !== "local" ? `${d.host} GPU ${d.gpu}` : `GPU ${d.gpu}`;
}

// The model's layers in order, one tick each, coloured by the GPU that holds them. A tensor split is no
// stack of layers: every GPU holds its share of every layer, so each part spans them all.
function layerStrip(devices, tensor) {
  if (tensor) {
    const parts = devices.map((d, i) => {
      const part = h("span", { className: `part p${i % 2}`, title: `${deviceLabel(d)}: its share of all ${d.layers} layers`, "data-gpu": d.gpu, "data-layers": d.layers });
      part.style.flexGrow = 1;
      return part;
    });
    return parts.length ? h("div", { className: "strip tensor", title: "every layer on every GPU" }, parts) : null;
  }
  const parts = devices
    .filter((d) => d.layers || d.output_layer)
    .map((d, i) => {
      const count = d.layers + (d.output_layer ? 1 : 0);
      const part = h("span", { className: `part p${i % 2}`, title: `${deviceLabel(d)}: ${count} layers`, "data-gpu": d.gpu, "data-layers": count });
      part.style.flexGrow = count;
      part.style.backgroundSize = `${100 / count}% 100%`;
      return part;
    });
  return parts.length ? h("div", { className: "strip", title: "layers" }, parts) : null;
}

// The terms of a check (planned against what the server reports allocating), in the API's order.
const CHECK_TERMS = ["weights", "kv", "state", "compute", "output", "other"];

// A running server's plan against what it reports allocating: per device (as the server names it), the
// planned bar above the actual one on one scale, the difference, what the GPU reading says the process
// holds, then the findings past the planner's tolerance (warnings where the plan was short).
function checkView(actual) {
  const scale = Math.max(1, ...actual.devices.map((d) => Math.max(d.planned_mib, d.actual_mib, d.process_mib ?? 0)));
  const segments = (d, side) =>
    CHECK_TERMS.map((term) => ({ term, mib: d.terms[term][`${side}_mib`], label: `${side} ${term}` }));
  const rows = actual.devices.map((d) =>
    h(
      "div",
      { className: `check-device${d.seen ? "" : " unseen"}`, "data-device": d.device },
      h("strong", {}, d.device),
      bar(segments(d, "planned"), scale, "planned"),
      bar(segments(d, "actual"), scale, "actual"),
      h(
        "span",
        { className: "difference", "data-mib": d.difference_mib },
        `planned ${mib(d.planned_mib)}, actual ${mib(d.actual_mib)} (${d.difference_mib >= 0 ? "+" : "−"}${mib(Math.abs(d.difference_mib))})` +
          (d.process_mib !== null && d.process_mib !== undefined ? `, process ${mib(d.process_mib)}` : "") +
          (d.seen ? "" : " · not in the server's log"),
      ),
    ),
  );
  const findings = actual.findings.map((f) => h("li", { className: f.over ? "warn" : "info" }, f.message));
  return h(
    "div",
    { className: "check" },
    h("p", {}, `planned against actual (${actual.source})`),
    rows,
    findings.length ? h("ul", { className: "findings" }, findings) : null,
  );
}

// The plan drawn: one column per GPU, its height the GPU's usable memory (all on one scale), filled
// bottom-up with what the plan puts there (past the usable line, in red, where it does not fit). Under each,
// its layers; what a running server reports against it (``actual``: its check, or null); then the
// refusal's reason and the ways out, or the command line.
export function planView(plan, actual = null) {
  const scale = Math.max(1, ...plan.devices.map((d) => Math.max(d.usable_mib, d.total_mib)));
  let first = 0;
  const tensor = plan.split_mode === "tensor";
  const columns = plan.devices.map((d) => {
    const stacked = d.layers ? `layers ${first}-${first + d.layers - 1}` : "no layers";
    const layers = tensor ? `a share of all ${d.layers} layers` : stacked;
    first += d.layers;
    const usable = h("div", { className: "usable", "data-mib": d.usable_mib });
    usable.style.height = `${(100 * d.usable_mib) / scale}%`;
    const fill = h(
      "div",
      { className: "fill" },
      TERMS.map(([term, key]) => {
        const seg = h("span", { className: `seg ${term}`, title: `${term}: ${mib(d[key])}`, "data-term": term, "data-mib": d[key] });
        seg.style.height = `${(100 * d[key]) / scale}%`;
        return seg;
      }),
    );
    const over = d.total_mib > d.usable_mib;
    const overflow = over ? h("div", { className: "overflow" }) : null;
    if (overflow) {
      overflow.style.bottom = usable.style.height;
      overflow.style.height = `${(100 * (d.total_mib - d.usable_mib)) / scale}%`;
    }
    return h(
      "div",
      { className: `column${over ? " over" : ""}`, "data-gpu": d.gpu, "data-host": d.host ?? "local" },
      h("div", { className: "space" }, usable, fill, overflow),
      h("strong", {}, deviceLabel(d)),
      h("span", {}, d.name),
      d.endpoint ? h("span", { className: "endpoint muted" }, `rpc ${d.endpoint}`) : null,
      h("span", {}, `needs ${mib(d.total_mib)}, usable ${mib(d.usable_mib)}`),
      h("span", { className: "layers" }, layers + (d.output_layer && !tensor ? " + output" : "")),
    );
  });
  const host = plan.host.weights_mib + plan.host.kv_cache_mib + plan.host.compute_mib;
  return h(
    "div",
    { className: `plan ${plan.fits ? "fits" : "refused"}` },
    h(
      "p",
      {},
      h("strong", { className: "verdict" }, plan.fits ? "fits" : "does not fit"),
      ` · ${plan.backend} · ctx ${plan.ctx} · KV ${plan.cache_type_k}/${plan.cache_type_v}`,
      ` · flash-attn ${plan.flash_attn ? "on" : "off"} · ${plan.gpu_layers} GPU layers`,
      plan.tensor_split.length > 1 ? ` · ${plan.split_mode ?? "layer"} split ${plan.tensor_split.join(",")}` : "",
      h("span", { className: "terms" }, plan.measured ? ` · measured ${plan.measured}` : " · estimated"),
    ),
    plan.split_reason ? h("p", { className: "muted split-mode" }, `split mode ${plan.split_reason}`) : null,
    columns.length ? h("div", { className: "columns" }, columns) : h("p", { className: "muted" }, "no GPU in this plan"),
    layerStrip(plan.devices, tensor),
    columns.length ? legend() : null,
    host ? h("p", {}, `host memory: ${mib(host)}`) : null,
    plan.context && plan.fits ? h("p", { className: "muted" }, `ctx: max chose ${plan.context.reason}`) : null,
    actual ? checkView(actual) : null,
    plan.reason ? h("p", { className: "reason" }, plan.reason) : null,
    plan.suggestions.length ? h("ul", { className: "suggestions" }, plan.suggestions.map((s) => h("li", {}, s))) : null,
    plan.command.length ? h("pre", { className: "command" }, plan.command.join(" ")) : null,
  );
}
