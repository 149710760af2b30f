// Live curves of runs: metrics.jsonl read incrementally (byte offsets) and drawn as loss, learning rate,
// gradient norm and tokens/s charts; several runs overlay on the same axes.

import { api } from "./core.js";
import { COLORS, lineChart } from "./charts.js";

// Keeps one run's records, fetching only what was appended since the last call.
export class MetricsFeed {
  constructor(runId) {
    this.runId = runId;
    this.records = [];
    this.offset = 0;
    this.damaged = 0;
  }

  // Returns true when new records arrived (or the file was rewritten).
  async poll() {
    const chunk = await api("/api/metrics", { id: this.runId, offset: this.offset });
    if (chunk.reset) { this.records = []; this.damaged = 0; }
    this.records.push(...chunk.records);
    this.damaged += chunk.damaged;
    const changed = chunk.reset || chunk.records.length > 0;
    this.offset = chunk.offset;
    return changed;
  }

  points(key) {
    return this.records.filter((r) => typeof r[key] === "number").map((r) => [r.step, r[key]]);
  }
}

export const CHARTS = [
  ["loss", "loss"], ["lr", "learning rate"], ["grad_norm", "gradient norm"], ["tokens_per_s", "tokens / s"],
];

// The four charts of one run (train and validation loss share the first).
export function runCharts(feed) {
  return CHARTS.map(([key, title]) => {
    const series = [{ name: key === "loss" ? "train" : key, points: feed.points(key) }];
    if (key === "loss") series.push({ name: "validation", points: feed.points("eval_loss"), dashed: true, markers: true });
    return lineChart({ id: `curve-${key}`, title, series: series.filter((s, i) => i === 0 || s.points.length) });
  });
}

// One chart per metric with every run's series overlaid.
export function overlayCharts(feeds, keys = CHARTS) {
  return keys.map(([key, title]) => lineChart({ id: `overlay-${key}`, title, width: 560, height: 260,
    series: feeds.map((feed, i) => ({ name: feed.runId, points: feed.points(key), color: COLORS[i % COLORS.length] })) }));
}
