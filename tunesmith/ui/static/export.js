// The Export tab: merge a finished run's adapter into its base, or export it as Hugging Face files or one GGUF
// file; each is an ordinary `tunesmith merge` / `tunesmith export` process writing inside the run folder.

import { api, errorLine, every, h, info, post, put } from "./core.js";

export async function exportView(root, preset) {
  const [settings, runs] = await Promise.all([info(), api("/api/runs")]);
  const finished = runs.runs.filter((r) => r.has_final);
  if (!finished.length) {
    root.append(h("p", { class: "muted" }, "No finished run to merge or export yet."));
    return;
  }
  const run = h("select", { id: "export-run" }, finished.map((r) => h("option", { value: r.id, selected: r.id === preset }, r.id)));
  const quant = h("select", { id: "export-quant" }, ["q8_0", "f16", "f32"].map((q) => h("option", { value: q }, q)));
  const message = h("div", { id: "export-message" });
  const jobs = h("div", { id: "export-jobs" });
  const act = async (action) => {
    put(message, h("p", { class: "muted" }, `${action}…`));
    try {
      const result = await post("/api/deliver", { id: run.value, action, quant: quant.value });
      put(message, h("p", { class: "ok" }, `${action} started (process ${result.job.pid})`));
      showJobs();
    } catch (e) {
      put(message, errorLine(e.message));
    }
  };
  const showJobs = async () => {
    const detail = await api("/api/run", { id: run.value });
    const delivery = detail.jobs.filter((j) => j.command === "merge" || j.command === "export");
    put(jobs, ...delivery.map((j) => h("details", { class: "job", open: true },
      h("summary", {}, `${j.command} · ${j.alive ? "running" : j.returncode === null ? "ended" : `exit ${j.returncode}`}`),
      h("code", { class: "argv" }, "tunesmith " + j.argv.join(" ")), h("pre", { class: "log" }, j.log.join("\n")))));
  };
  run.addEventListener("change", showJobs);
  const button = (action, label) => h("button", { id: action, disabled: !settings.allow_launch, onclick: () => act(action) }, label);
  root.append(h("section", { class: "form" }, h("h2", {}, "Merge and export"),
    h("label", {}, "run ", run),
    h("div", { class: "toolbar" }, button("merge", "Merge adapter → merged/"),
      button("export-hf", "Export Hugging Face → export/hf/"), h("label", {}, "GGUF type ", quant),
      button("export-gguf", "Export GGUF → export/model-TYPE.gguf")),
    message, h("h3", {}, "Jobs"), jobs));
  showJobs();
  every(2000, showJobs);
}
