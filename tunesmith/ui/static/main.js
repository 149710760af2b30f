// The router: #/runs, #/run/ID, #/train, #/eval[/ID], #/chat[/ID], #/export[/ID], #/compare/ID,ID...

import { clearTimers, errorLine, h, put } from "./core.js";
import { chatView } from "./chat.js";
import { compareView } from "./compare.js";
import { exportView } from "./export.js";
import { evalView, trainView } from "./launch.js";
import { runView } from "./run.js";
import { runsView } from "./runs.js";

const VIEWS = {
  runs: (root) => runsView(root),
  run: (root, arg) => runView(root, arg),
  train: (root, arg) => trainView(root, arg),
  eval: (root, arg) => evalView(root, arg),
  chat: (root, arg) => chatView(root, arg),
  export: (root, arg) => exportView(root, arg),
  compare: (root, arg) => compareView(root, arg ? arg.split(",").map(decodeURIComponent).filter(Boolean) : []),
};

async function route() {
  clearTimers();
  const [, name = "runs", ...rest] = (location.hash || "#/runs").split("/");
  const raw = rest.join("/");
  const arg = name === "compare" ? raw : decodeURIComponent(raw);
  const view = VIEWS[name] ? name : "runs";
  document.querySelectorAll("#tabs a").forEach((a) => a.classList.toggle("active",
    a.dataset.tab === view || (view === "run" && a.dataset.tab === "runs")));
  const root = h("div", { class: `view view-${view}`, "data-view": view });
  put(document.getElementById("view"), root);
  try {
    await VIEWS[view](root, arg || null);
  } catch (e) {
    root.append(errorLine(e.message));
  }
}

window.addEventListener("hashchange", route);
route();
