// Line charts as inline SVG (no library, nothing fetched): axes with round ticks, one path per series, a legend.

const NS = "http://www.w3.org/2000/svg";
export const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563", "#db2777"];
const MARGIN = { left: 62, right: 12, top: 26, bottom: 30 };

function svg(tag, attrs = {}, text = null) {
  const el = document.createElementNS(NS, tag);
  for (const [key, value] of Object.entries(attrs)) el.setAttribute(key, value);
  if (text !== null) el.textContent = text;
  return el;
}

// About `count` round values covering [lo, hi].
export function ticks(lo, hi, count = 5) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count, power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw) || raw;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

// The tick labels of one axis: as many digits as the spacing needs, in exponent form when the axis's values are
// very small or large (0.5 1.0 1.5 / 9.996e-4 9.998e-4 1.000e-3).
function labels(values) {
  const step = values.length > 1 ? values[1] - values[0] : Math.abs(values[0]) || 1;
  const largest = Math.max(...values.map(Math.abs));
  if (largest !== 0 && (largest < 1e-3 || largest >= 1e5)) {
    const digits = Math.min(6, Math.max(1, Math.ceil(Math.log10(largest / step))));
    return values.map((v) => v.toExponential(digits));
  }
  const decimals = Math.min(8, Math.max(0, -Math.floor(Math.log10(step))));
  return values.map((v) => v.toFixed(decimals));
}

function extent(series, axis) {
  const values = series.flatMap((s) => s.points.map((p) => p[axis])).filter(Number.isFinite);
  if (!values.length) return null;
  let lo = Math.min(...values), hi = Math.max(...values);
  if (lo === hi) { lo -= Math.abs(lo) * 0.05 || 1; hi += Math.abs(hi) * 0.05 || 1; }
  return [lo, hi];
}

// lineChart({id, title, series: [{name, points: [[x, y]], color, dashed}]}) -> <svg>
export function lineChart({ id, title, series, width = 460, height = 230, xLabel = "step" }) {
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img", "aria-label": title });
  if (id) root.id = id;
  root.append(svg("text", { x: MARGIN.left, y: 16, class: "chart-title" }, title));
  const xs = extent(series, 0), ys = extent(series, 1);
  if (!xs || !ys) {
    root.append(svg("text", { x: width / 2, y: height / 2, class: "chart-empty", "text-anchor": "middle" }, "no data yet"));
    return root;
  }
  const plotW = width - MARGIN.left - MARGIN.right, plotH = height - MARGIN.top - MARGIN.bottom;
  const x = (v) => MARGIN.left + ((v - xs[0]) / (xs[1] - xs[0] || 1)) * plotW;
  const y = (v) => MARGIN.top + plotH - ((v - ys[0]) / (ys[1] - ys[0])) * plotH;
  drawAxes(root, xs, ys, x, y, plotW, plotH, xLabel);
  series.forEach((s, i) => drawSeries(root, s, s.color || COLORS[i % COLORS.length], x, y));
  if (series.length > 1) drawLegend(root, series, width);
  return root;
}

function drawAxes(root, xs, ys, x, y, plotW, plotH, xLabel) {
  const bottom = MARGIN.top + plotH;
  root.append(svg("rect", { x: MARGIN.left, y: MARGIN.top, width: plotW, height: plotH, class: "chart-frame" }));
  const yTicks = ticks(ys[0], ys[1]), xTicks = ticks(xs[0], xs[1], 6).filter((v) => Number.isInteger(v));
  labels(yTicks).forEach((text, i) => {
    const v = yTicks[i];
    root.append(svg("line", { x1: MARGIN.left, x2: MARGIN.left + plotW, y1: y(v), y2: y(v), class: "chart-grid" }));
    root.append(svg("text", { x: MARGIN.left - 4, y: y(v) + 4, "text-anchor": "end", class: "chart-tick" }, text));
  });
  labels(xTicks.length ? xTicks : [xs[0]]).forEach((text, i) => {
    const v = xTicks.length ? xTicks[i] : xs[0];
    root.append(svg("text", { x: x(v), y: bottom + 14, "text-anchor": "middle", class: "chart-tick" }, text));
  });
  root.append(svg("text", { x: MARGIN.left + plotW, y: bottom + 27, "text-anchor": "end", class: "chart-tick" }, xLabel));
}

function drawSeries(root, s, color, x, y) {
  const points = s.points.filter((p) => Number.isFinite(p[0]) && Number.isFinite(p[1]));
  if (!points.length) return;
  const d = points.map((p, i) => `${i ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join("");
  const path = svg("path", { d, fill: "none", stroke: color, "stroke-width": 1.6, class: "series",
    "data-series": s.name, "data-points": points.length });
  if (s.dashed) path.setAttribute("stroke-dasharray", "5 3");
  root.append(path);
  if (points.length === 1 || s.markers) {
    for (const p of points) root.append(svg("circle", { cx: x(p[0]), cy: y(p[1]), r: 2.5, fill: color }));
  }
}

function drawLegend(root, series, width) {
  let offset = width - MARGIN.right;
  [...series].reverse().forEach((s, j) => {
    const i = series.length - 1 - j, name = s.name.length > 28 ? "…" + s.name.slice(-27) : s.name;
    const text = svg("text", { x: offset, y: 16, "text-anchor": "end", class: "chart-legend" }, name);
    text.setAttribute("fill", s.color || COLORS[i % COLORS.length]);
    root.append(text);
    offset -= name.length * 6.2 + 14;
  });
}

// A histogram from bin edges and counts: bars as rects.
export function histogram({ id, title, edges, counts, width = 460, height = 200 }) {
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img", "aria-label": title });
  if (id) root.id = id;
  root.append(svg("text", { x: MARGIN.left, y: 16, class: "chart-title" }, title));
  if (!counts || !counts.length) return root;
  const plotW = width - MARGIN.left - MARGIN.right, plotH = height - MARGIN.top - MARGIN.bottom;
  const lo = edges[0], hi = edges[edges.length - 1], top = Math.max(...counts) || 1;
  const x = (v) => MARGIN.left + ((v - lo) / (hi - lo || 1)) * plotW;
  const y = (v) => MARGIN.top + plotH - (v / top) * plotH;
  drawAxes(root, [lo, hi], [0, top], x, y, plotW, plotH, "tokens per example");
  counts.forEach((c, i) => {
    root.append(svg("rect", { x: x(edges[i]), y: y(c), width: Math.max(1, x(edges[i + 1]) - x(edges[i]) - 1),
      height: MARGIN.top + plotH - y(c), class: "bar" }));
  });
  return root;
}
