// One run: status and progress (step / total, ETA), live curves, actions (stop, resume, chat, export), and the
// run's files: report, config, data report and preview, evaluation, estimate, checkpoints, jobs.

import { api, badge, errorLine, every, fmtBytes, fmtNumber, fmtSeconds, h, post, put } from "./core.js";
import { MetricsFeed, runCharts } from "./curves.js";
import { dataReport, previewPanel } from "./data.js";
import { markdown } from "./md.js";
import { steps } from "./runs.js";

export function runView(root, runId) {
  const feed = new MetricsFeed(runId);
  const parts = {
    head: h("div", { id: "run-head" }), progress: h("div", { id: "progress" }), actions: h("div", { id: "actions" }),
    message: h("div", { id: "action-message" }), problems: h("div", { id: "problems" }),
    curves: h("div", { id: "curves", class: "charts" }), sections: h("div", { id: "sections" }),
  };
  root.append(...Object.values(parts));
  const samples = [];  // (seconds, step): the rate behind the ETA
  let sectionsKey = "", actionsKey = "", kind = null;
  const refresh = async () => {
    try {
      const run = await api("/api/run", { id: runId });
      samples.push([Date.now() / 1000, run.step || 0]);
      if (samples.length > 30) samples.shift();
      kind = run.kind;
      renderHead(parts, run, samples);
      sectionsKey = renderSections(parts.sections, run, sectionsKey);
      if (actionKey(run) !== actionsKey) {
        actionsKey = actionKey(run);
        renderActions(parts, run, refresh);
      }
    } catch (e) {
      put(parts.head, h("h2", {}, runId), errorLine(e.message));
    }
  };
  const tick = async () => {
    try {
      const changed = await feed.poll();
      const wanted = feed.records.length > 0 || kind === "train";  // a prepare or eval folder has no curves
      if (wanted && (changed || !parts.curves.childElementCount)) put(parts.curves, ...runCharts(feed));
    } catch (e) { /* the run view shows the error */ }
  };
  refresh(); tick();
  every(2000, refresh);
  every(1000, tick);
}

function actionKey(run) {
  return JSON.stringify([run.status, run.stoppable, run.resumable, run.has_final, run.latest_checkpoint]);
}

function renderHead(parts, run, samples) {
  const title = h("h2", {}, run.id, " ", badge(run.status));
  const meta = h("p", { class: "muted" }, [run.kind, run.objective, run.strategy, run.model].filter(Boolean).join(" · "));
  put(parts.head, title, run.reason ? h("p", { class: "reason", id: "reason" }, run.reason) : null, meta);
  put(parts.problems, ...(run.problems || []).map((p) => h("p", { class: "warn problem" }, "⚠ " + p)));
  const fraction = run.total_steps ? Math.min(1, (run.step || 0) / run.total_steps) : 0;
  const eta = run.status === "running" ? etaSeconds(run, samples) : null;
  put(parts.progress,
    h("div", { class: "bar-outer" }, h("div", { class: "bar-inner", style: `width:${(fraction * 100).toFixed(1)}%` })),
    h("span", { id: "step", "data-step": run.step || 0 }, `step ${steps(run)}`),
    h("span", {}, ` · wall ${fmtSeconds(run.wall_seconds)}`),
    eta !== null ? h("span", { id: "eta" }, ` · ETA ${fmtSeconds(eta)}`) : null,
    h("span", {}, ` · last loss ${fmtNumber(run.last_loss)} · best ${fmtNumber(run.best_loss)}`
      + (run.best_of ? ` (${run.best_of}, step ${run.best_step})` : "")));
}

function etaSeconds(run, samples) {
  if (!run.total_steps || !run.step) return null;
  const first = samples.find((s) => s[1] < run.step), now = samples[samples.length - 1];
  const rate = first ? (now[1] - first[1]) / (now[0] - first[0]) : run.step / (run.wall_seconds || Infinity);
  return rate > 0 ? (run.total_steps - run.step) / rate : null;
}

function renderActions(parts, run, refresh) {
  const act = async (path, body, pending, done) => {
    put(parts.message, h("p", { class: "muted" }, pending));
    try {
      await post(path, body);
      put(parts.message, h("p", { class: "ok" }, done));
      refresh();
    } catch (e) {
      put(parts.message, errorLine(e.message));
    }
  };
  const overrides = h("input", { id: "resume-overrides", placeholder: "overrides for resume, e.g. train.max_steps=500" });
  put(parts.actions, h("div", { class: "toolbar" },
    run.stoppable ? h("button", { id: "stop", class: "danger", onclick: () => act("/api/stop", { id: run.id }, "Stopping…",
      "SIGTERM sent: the run finishes its step, writes a checkpoint and exits") }, "Stop") : null,
    run.resumable ? [overrides, h("button", { id: "resume", onclick: () => act("/api/resume",
      { id: run.id, overrides: overrides.value.split(/\s+/).filter(Boolean) }, "Resuming…",
      "resume started: training continues from the latest checkpoint") }, "Resume")] : null,
    run.has_final ? h("a", { class: "button", id: "chat-link", href: `#/chat/${encodeURIComponent(run.id)}` }, "Chat") : null,
    run.has_final ? h("a", { class: "button", href: `#/export/${encodeURIComponent(run.id)}` }, "Merge / export") : null,
    run.has_final ? h("a", { class: "button", href: `#/eval/${encodeURIComponent(run.id)}` }, "Evaluate") : null));
}

function section(id, title, ...body) {
  return h("section", { id, class: "run-section" }, h("h3", {}, title), ...body);
}

// Sections are rebuilt only when what they show changed (so scrolling and the preview stay put).
function renderSections(container, run, lastKey) {
  const key = JSON.stringify([run.report_md, run.config_text, run.data_report, run.eval_md, run.estimate,
    run.comparison_md, run.checkpoints, run.prepared, run.jobs.map((j) => [j.id, j.alive, j.log.length, j.returncode])]);
  if (key === lastKey) return key;
  put(container,
    run.report_md ? section("report", "Report", markdown(run.report_md)) : null,
    run.comparison_md ? section("comparison", "Strategy comparison", markdown(run.comparison_md)) : null,
    section("data", "Data", dataReport(run.data_report), previewPanel(run.id, run.prepared, run.config_text
      ? () => prepareHere(run.id) : null)),
    run.eval_md ? section("evaluation", "Evaluation", markdown(run.eval_md)) : null,
    run.estimate && run.estimate.peak_bytes ? section("estimate", "Estimate", estimateTable(run.estimate)) : null,
    section("checkpoints", "Checkpoints", checkpointTable(run)),
    run.config_text ? section("config", "Config", h("pre", { class: "config" }, run.config_text)) : null,
    run.jobs.length ? section("jobs", "Jobs started here", run.jobs.map(jobBox)) : null);
  return key;
}

async function prepareHere(runId) {
  const message = document.getElementById("action-message");
  try {
    await post("/api/launch", { command: "prepare", config: `run:${runId}`, overrides: [] });
    put(message, h("p", { class: "ok" }, "prepare started: the rows appear here when it finishes"));
  } catch (e) {
    put(message, errorLine(e.message));
  }
}

function estimateTable(e) {
  const rows = [["peak memory", fmtBytes(e.peak_bytes) + ` (${e.peak_phase})`],
    ["trainable parameters", fmtNumber(e.trainable_params)], ["tokens / s (predicted)", fmtNumber(e.tokens_per_s, 0)],
    ["device", e.device], ...(e.measured ? [["measured peak", fmtBytes(e.measured.peak_bytes)]] : []),
    ["advice", e.advice || "–"]];
  return h("table", { class: "md-table" }, h("tbody", {}, rows.map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, v)))));
}

function checkpointTable(run) {
  const rows = run.checkpoints.map((c) => h("tr", { "data-checkpoint": c.name }, h("td", {}, c.name),
    h("td", {}, c.complete ? "complete" : "being written (or damaged)"), h("td", { class: "num" }, fmtBytes(c.bytes))));
  return h("div", {}, rows.length ? h("table", { class: "md-table", id: "checkpoint-table" }, h("tbody", {}, rows))
    : h("p", { class: "muted" }, "No checkpoints."), run.has_final ? h("p", {}, "final/ holds the trained model.") : null);
}

function jobBox(job) {
  const state = job.alive ? "running" : job.returncode === null ? "ended" : `exit ${job.returncode}`;
  return h("details", { class: "job", open: job.alive || job.returncode ? true : null },
    h("summary", {}, `${job.command} · ${state} · ${new Date(job.started * 1000).toLocaleTimeString()}`),
    h("code", { class: "argv" }, "tunesmith " + job.argv.join(" ")), h("pre", { class: "log" }, job.log.join("\n")));
}
