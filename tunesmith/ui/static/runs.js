// The runs page: every run under --runs, filtered and sorted, refreshed every two seconds; tick runs to compare.

import { api, badge, errorLine, every, fmtNumber, fmtSeconds, h, runLink, put } from "./core.js";

const COLUMNS = [
  ["id", "run"], ["kind", "kind"], ["status", "status"], ["objective", "objective"], ["strategy", "strategy"],
  ["model", "model"], ["step", "steps"], ["best_loss", "best loss"], ["last_loss", "last loss"],
  ["wall_seconds", "wall time"], ["updated", "updated"],
];
const STATUSES = ["", "running", "finished", "preempted", "failed"];
const state = { sort: "updated", desc: true, filter: "", status: "", selected: new Set() };

export function runsView(root) {
  const message = h("div", { id: "runs-message" });
  const table = h("table", { id: "runs-table", class: "runs" });
  const redraw = () => draw(table, rows);
  const filter = h("input", { id: "filter", type: "search", placeholder: "filter: run, model, strategy, objective…",
    value: state.filter, oninput: (e) => { state.filter = e.target.value; redraw(); } });
  const status = h("select", { id: "status-filter", onchange: (e) => { state.status = e.target.value; redraw(); } },
    STATUSES.map((s) => h("option", { value: s, selected: s === state.status }, s || "any status")));
  const compare = h("button", { id: "compare-selected", onclick: () => {
    location.hash = "#/compare/" + [...state.selected].map(encodeURIComponent).join(",");
  } }, "Compare selected");
  root.append(h("section", {}, h("div", { class: "toolbar" }, filter, status, compare), message, table));
  let rows = [];
  const load = async () => {
    try {
      rows = (await api("/api/runs")).runs;
      put(message, rows.length ? "" : h("p", { class: "muted" }, "No runs yet: start one from the Train tab."));
      redraw();
    } catch (e) {
      put(message, errorLine(e.message));
    }
  };
  load();
  every(2000, load);
}

function visible(rows) {
  const words = state.filter.toLowerCase().split(/\s+/).filter(Boolean);
  const kept = rows.filter((r) => (!state.status || r.status === state.status) && words.every((w) =>
    [r.id, r.kind, r.model, r.strategy, r.objective, r.status].some((v) => String(v || "").toLowerCase().includes(w))));
  const key = state.sort, sign = state.desc ? -1 : 1;
  return kept.sort((a, b) => {
    const x = a[key], y = b[key];
    if (x === y) return 0;
    if (x === null || x === undefined) return 1;
    if (y === null || y === undefined) return -1;
    return (x < y ? -1 : 1) * sign;
  });
}

function header() {
  return h("tr", {}, h("th", {}, ""), COLUMNS.map(([key, title]) => h("th", {
    class: "sortable" + (state.sort === key ? (state.desc ? " desc" : " asc") : ""), "data-sort": key,
    onclick: () => { state.desc = state.sort === key ? !state.desc : key === "updated"; state.sort = key; },
  }, title)));
}

function draw(table, rows) {
  const head = header();
  head.addEventListener("click", () => draw(table, rows));
  put(table, h("thead", {}, head), h("tbody", {}, visible(rows).map(row)));
}

function row(r) {
  const pick = h("input", { type: "checkbox", class: "pick", "data-run": r.id, checked: state.selected.has(r.id),
    onchange: (e) => { if (e.target.checked) state.selected.add(r.id); else state.selected.delete(r.id); } });
  const problems = (r.problems || []).length
    ? h("span", { class: "warn", title: r.problems.join("\n") }, ` ⚠ ${r.problems.length}`) : null;
  const status = badge(r.status);
  if (r.reason) status.title = r.reason;
  const updated = r.updated ? new Date(r.updated * 1000).toLocaleString() : "–";
  return h("tr", { "data-run": r.id },
    h("td", {}, pick), h("td", {}, runLink(r.id), problems), h("td", {}, r.kind), h("td", {}, status,
      (r.activity || []).filter((a) => a !== "train").map((a) => h("span", { class: "activity" }, ` ${a}…`))),
    h("td", {}, r.objective || "–"), h("td", {}, r.strategy || "–"), h("td", { class: "model", title: r.model || "" },
      shortModel(r.model)),
    h("td", { class: "num" }, steps(r)), h("td", { class: "num" }, fmtNumber(r.best_loss)),
    h("td", { class: "num" }, fmtNumber(r.last_loss)), h("td", { class: "num" }, fmtSeconds(r.wall_seconds)),
    h("td", { class: "num" }, updated));
}

export function steps(r) {
  if (r.step === null || r.step === undefined) return "–";
  return r.total_steps ? `${fmtNumber(r.step)} / ${fmtNumber(r.total_steps)}` : fmtNumber(r.step);
}

function shortModel(model) {
  if (!model) return "–";
  const parts = String(model).split("/");
  return parts.length > 2 ? "…/" + parts.slice(-2).join("/") : model;
}
