// The Train and Evaluate tabs: pick a config (a recipe in configs/ or a run's own), add key=value overrides and
// start the command; the server checks them as the CLI does, and its one-line error shows before anything runs.

import { api, errorLine, h, info, post, put } from "./core.js";

const TRAIN_COMMANDS = ["train", "prepare", "compare-strategies", "estimate"];

function overridesOf(text) {
  return text.split("\n").map((line) => line.trim()).filter((line) => line && !line.startsWith("#"));
}

async function configOptions() {
  const [settings, runs] = await Promise.all([info(), api("/api/runs")]);
  const recipes = settings.recipes.map((ref) => [ref, `configs/${ref.slice("recipe:".length)}`]);
  const own = runs.runs.filter((r) => r.objective).map((r) => [`run:${r.id}`, `run ${r.id} (its config.yaml)`]);
  return { settings, runs: runs.runs, options: [...recipes, ...own] };
}

function launchOff(settings) {
  return settings.allow_launch ? null : h("p", { class: "warn", id: "launch-off" },
    "Launching is off: this studio listens beyond loopback without --allow-launch.");
}

async function start(body, message) {
  put(message, h("p", { class: "muted" }, "Checking the config…"));
  try {
    const result = await post("/api/launch", body);
    put(message, h("p", { class: "ok" }, `${body.command} started (process ${result.job.pid})`));
    location.hash = `#/run/${encodeURIComponent(result.run)}`;
  } catch (e) {
    put(message, errorLine(e.message));
    message.firstChild.id = "launch-error";
  }
}

export async function trainView(root, preset) {
  const { settings, options } = await configOptions();
  const command = h("select", { id: "command" }, TRAIN_COMMANDS.map((c) => h("option", { value: c }, c)));
  const config = h("select", { id: "config" }, options.map(([ref, label]) =>
    h("option", { value: ref, selected: ref === preset }, label)));
  const overrides = h("textarea", { id: "overrides", rows: 6,
    placeholder: "one key=value per line, e.g.\ntrain.lr=1e-4\ntrain.output_dir=runs/my-run" });
  const strategies = h("input", { id: "strategies",
    placeholder: "compare-strategies: e.g. lora full reft:train.lr=1e-2" });
  const yaml = h("pre", { class: "config", id: "config-text" });
  const message = h("div", { id: "launch-message" });
  const showYaml = async () => {
    try { yaml.textContent = config.value ? (await api("/api/config", { ref: config.value })).text : ""; }
    catch (e) { yaml.textContent = e.message; }
  };
  config.addEventListener("change", showYaml);
  const button = h("button", { id: "start", disabled: !settings.allow_launch, onclick: () => start({
    command: command.value, config: config.value, overrides: overridesOf(overrides.value),
    strategies: strategies.value.split(/\s+/).filter(Boolean) }, message) }, "Start");
  root.append(h("section", { class: "form" }, h("h2", {}, "Train, prepare, compare strategies, estimate"),
    launchOff(settings),
    h("label", {}, "command ", command), h("label", {}, "config ", config),
    h("label", { class: "wide" }, "overrides (checked like the command line's)", overrides),
    h("label", { class: "wide" }, "strategies ", strategies), h("div", { class: "toolbar" }, button), message,
    h("h3", {}, "Config"), yaml));
  showYaml();
}

export async function evalView(root, preset) {
  const { settings, runs } = await configOptions();
  const finished = runs.filter((r) => r.has_final);
  const recipes = settings.recipes.filter((ref) => ref.includes("eval"));
  const config = h("select", { id: "eval-config" }, (recipes.length ? recipes : settings.recipes).map((ref) =>
    h("option", { value: ref }, `configs/${ref.slice("recipe:".length)}`)));
  const pick = (id, none) => h("select", { id }, none ? h("option", { value: "" }, none) : null,
    finished.map((r) => h("option", { value: r.id, selected: r.id === preset }, r.id)));
  const model = pick("eval-run"), other = pick("eval-compare", "(no comparison)");
  const overrides = h("textarea", { id: "eval-overrides", rows: 4, placeholder: "more key=value overrides" });
  const message = h("div", { id: "launch-message" });
  const tables = h("div", { id: "eval-tables" });
  const showTables = async () => {
    put(tables);
    if (!model.value) return;
    const run = await api("/api/run", { id: model.value });
    const { markdown } = await import("./md.js");
    put(tables, run.eval_md ? markdown(run.eval_md) : h("p", { class: "muted" }, "Not evaluated yet."));
  };
  model.addEventListener("change", showTables);
  const button = h("button", { id: "start-eval", disabled: !settings.allow_launch, onclick: () => {
    const run = `${settings.runs}/${model.value}`;
    start({ command: "eval", config: config.value, compare: other.value ? [model.value, other.value] : [],
      overrides: [`model.name_or_path=${run}/final`, `train.output_dir=${run}`, ...overridesOf(overrides.value)] },
    message);
  } }, "Evaluate");
  root.append(h("section", { class: "form" }, h("h2", {}, "Evaluate a run"), launchOff(settings),
    h("label", {}, "eval config ", config), h("label", {}, "run ", model), h("label", {}, "compare with ", other),
    h("label", { class: "wide" }, "overrides", overrides), h("div", { class: "toolbar" }, button), message,
    h("h3", {}, "Evaluation tables"), tables));
  showTables();
}
