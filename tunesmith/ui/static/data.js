// A run's data: the data report (sources, skipped rows with their file:line: field reasons, splits, a token-length
// histogram) and the first prepared rows as the model sees them, loss-bearing tokens highlighted.

import { api, errorLine, fmtNumber, h, put } from "./core.js";
import { histogram } from "./charts.js";

export function dataReport(report) {
  if (!report || !report.splits) return h("p", { class: "muted" }, "No data report in this run yet.");
  const sources = Object.entries(report.sources || {}).flatMap(([split, files]) =>
    Object.entries(files).map(([path, r]) => h("tr", {}, h("td", {}, split), h("td", { class: "path" }, path),
      h("td", { class: "num" }, fmtNumber(r.rows_read)), h("td", { class: "num" }, fmtNumber(r.rows_kept)),
      h("td", { class: "num" + (r.skipped ? " warn" : "") }, fmtNumber(r.skipped)))));
  const splits = Object.entries(report.splits).filter(([, s]) => s.rows).map(([name, s]) => h("tr", {},
    h("td", {}, name), ...[s.rows, s.examples, s.truncated, s.dropped_no_loss_tokens, s.tokens, s.loss_tokens]
      .map((v) => h("td", { class: "num" }, fmtNumber(v))),
    h("td", { class: "num" }, s.length ? `${s.length.p50} / ${s.length.p90} / ${s.length.max}` : "–")));
  const charts = Object.entries(report.splits).filter(([, s]) => s.length_histogram && s.length_histogram.counts)
    .map(([name, s]) => histogram({ id: `histogram-${name}`, title: `token lengths, ${name} (${s.examples} examples)`,
      edges: s.length_histogram.edges, counts: s.length_histogram.counts }));
  return h("div", { class: "data-report" },
    h("p", { class: "muted" }, `Fingerprint ${report.fingerprint || "–"}`),
    h("table", { class: "md-table" }, h("thead", {}, h("tr", {}, ["split", "source", "rows read", "kept", "skipped"]
      .map((t) => h("th", {}, t)))), h("tbody", {}, sources)),
    skippedList(Object.entries(report.sources || {}).flatMap(([, files]) => Object.values(files))
      .flatMap((r) => r.errors || [])),
    h("table", { class: "md-table" }, h("thead", {}, h("tr", {}, ["split", "rows", "examples", "truncated",
      "no loss token", "tokens", "loss tokens", "length p50 / p90 / max"].map((t) => h("th", {}, t)))),
      h("tbody", {}, splits)),
    h("div", { class: "charts" }, charts));
}

function skippedList(errors) {
  if (!errors.length) return null;
  return h("div", { class: "skipped", id: "skipped-rows" }, h("h4", {}, "Skipped rows (first ones)"),
    h("ul", {}, errors.map((e) => h("li", { class: "skip-reason" }, h("code", {}, e)))));
}

// The preview panel: pick a split, show its first rows.
export function previewPanel(runId, prepared, onPrepare) {
  const out = h("div", { id: "preview-rows" });
  const split = h("select", { id: "preview-split" }, ["train", "validation", "test"].map((s) =>
    h("option", { value: s, disabled: !prepared.includes(s) && prepared.length > 0 }, s)));
  const show = async () => {
    put(out, h("p", { class: "muted" }, "Reading rows…"));
    try {
      const result = await api("/api/preview", { id: runId, split: split.value, rows: 5 });
      put(out, renderPreview(result));
    } catch (e) {
      put(out, errorLine(e.message));
    }
  };
  const button = h("button", { id: "show-rows", onclick: show }, "Show rows as the model sees them");
  const prepare = onPrepare ? h("button", { id: "prepare-data", onclick: onPrepare }, "Prepare data here") : null;
  const hint = prepared.length ? null : h("p", { class: "muted" },
    "This run has no prepared split of its own (training keeps its copy in the data cache, outside the runs folder); "
    + "“Prepare data here” runs `tunesmith prepare` on its config into data/.");
  return h("div", { class: "preview" }, h("div", { class: "toolbar" }, split, button, prepare), hint, out);
}

function renderPreview(result) {
  if (result.missing) return h("p", { class: "muted" }, result.missing);
  const legend = h("p", { class: "legend" }, h("span", { class: "tok loss" }, "loss-bearing"), " ",
    h("span", { class: "tok" }, "context (no loss)"), ` — first ${result.rows.length} of ${result.total} rows`);
  const rows = result.rows.map((r, i) => h("div", { class: "row-preview", "data-row": i },
    h("div", { class: "row-meta" }, `#${i} ${r.source || ""} · ${r.tokens} tokens, ${r.loss_tokens} with loss`),
    h("pre", { class: "tokens" }, r.segments.map((s) => h("span", { class: s.loss ? "tok loss" : "tok" }, s.text)))));
  return h("div", {}, legend, rows);
}
