// Compare runs: their curves overlaid on the same axes, and their summary rows side by side.

import { api, errorLine, every, fmtNumber, fmtSeconds, h, runLink, put } from "./core.js";
import { MetricsFeed, overlayCharts } from "./curves.js";
import { steps } from "./runs.js";

const ROWS = [["status", "status"], ["objective", "objective"], ["strategy", "strategy"], ["model", "model"],
  ["steps", "steps"], ["best_loss", "best loss"], ["last_loss", "last loss"], ["last_eval_loss", "last validation loss"],
  ["wall_seconds", "wall time"]];

export async function compareView(root, ids) {
  if (ids.length < 2) {
    root.append(h("p", { class: "muted", id: "compare-hint" },
      "Tick two or more runs on the Runs page, then “Compare selected”."));
    return;
  }
  const feeds = ids.map((id) => new MetricsFeed(id));
  const charts = h("div", { class: "charts", id: "overlay" });
  const table = h("div", { id: "compare-table" });
  root.append(h("h2", {}, "Comparing ", ids.length, " runs"), table, charts);
  const refresh = async () => {
    try {
      const changed = await Promise.all(feeds.map((f) => f.poll()));
      if (changed.some(Boolean) || !charts.childElementCount) put(charts, ...overlayCharts(feeds));
      const all = (await api("/api/runs")).runs;
      put(table, summary(ids.map((id) => all.find((r) => r.id === id) || { id, status: "missing" })));
    } catch (e) {
      put(table, errorLine(e.message));
    }
  };
  await refresh();
  every(2000, refresh);
}

function cell(run, key) {
  if (key === "steps") return steps(run);
  if (key === "wall_seconds") return fmtSeconds(run.wall_seconds);
  return typeof run[key] === "number" ? fmtNumber(run[key]) : run[key] || "–";
}

function summary(runs) {
  return h("table", { class: "md-table" },
    h("thead", {}, h("tr", {}, h("th", {}, ""), runs.map((r) => h("th", {}, runLink(r.id))))),
    h("tbody", {}, ROWS.map(([key, title]) => h("tr", {}, h("th", {}, title), runs.map((r) => h("td", {}, cell(r, key)))))));
}
