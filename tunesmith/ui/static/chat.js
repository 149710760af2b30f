// The playground: one prompt to one or two runs' models side by side, answers streamed token by token through
// the same route `tunesmith serve` answers on (the run's chat template and stop tokens).

import { api, errorLine, h, put } from "./core.js";

class Pane {
  constructor(index, runs, preset) {
    this.index = index;
    this.messages = [];
    this.select = h("select", { id: `chat-run-${index}` }, index ? h("option", { value: "" }, "(none)") : null,
      runs.map((r) => h("option", { value: r.id, selected: r.id === preset }, r.id)));
    this.log = h("div", { class: "chat-log", id: `chat-log-${index}` });
    this.select.addEventListener("change", () => this.reset());
    this.el = h("div", { class: "chat-pane" }, h("label", {}, index ? "compare with " : "model ", this.select), this.log);
  }

  reset() {
    this.messages = [];
    put(this.log);
  }

  // Send the user's text with this pane's history; the answer streams into a new bubble.
  async send(text, settings) {
    if (!this.select.value) return;
    this.messages.push({ role: "user", content: text });
    const answer = h("div", { class: "bubble assistant streaming", id: `chat-answer-${this.index}`, "data-chunks": 0 });
    this.log.querySelectorAll("[id^=chat-answer-]").forEach((el) => el.removeAttribute("id"));
    this.log.append(h("div", { class: "bubble user" }, text), answer);
    const messages = settings.system ? [{ role: "system", content: settings.system }, ...this.messages] : this.messages;
    try {
      const reply = await stream({ id: this.select.value, messages, max_tokens: settings.maxTokens,
        temperature: settings.temperature }, answer);
      this.messages.push({ role: "assistant", content: reply });
    } catch (e) {
      this.messages.pop();
      answer.replaceWith(errorLine(e.message));
    } finally {
      answer.classList.remove("streaming");
      answer.dataset.done = "true";
    }
  }
}

// POST /api/chat and append each streamed delta to `target`; returns the whole answer.
async function stream(body, target) {
  const response = await fetch("/api/chat", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body) });
  if (!response.ok) {
    const data = await response.json().catch(() => ({}));
    throw new Error(data.error || `${response.status} ${response.statusText}`);
  }
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "", text = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const event of events) text += handle(event, target);
  }
  return text;
}

function handle(event, target) {
  const data = event.replace(/^data: /, "").trim();
  if (!data || data === "[DONE]") return "";
  const chunk = JSON.parse(data);
  if (chunk.error) throw new Error(chunk.error.message || String(chunk.error));
  const delta = (chunk.choices && chunk.choices[0] && chunk.choices[0].delta) || {};
  if (!delta.content) return "";
  target.append(delta.content);
  target.dataset.chunks = Number(target.dataset.chunks) + 1;
  return delta.content;
}

export async function chatView(root, preset) {
  const runs = (await api("/api/runs")).runs.filter((r) => r.has_final);
  if (!runs.length) {
    root.append(h("p", { class: "muted" }, "No finished run to chat with yet."));
    return;
  }
  const panes = [new Pane(0, runs, preset), new Pane(1, runs, null)];
  const system = h("input", { id: "chat-system", placeholder: "system prompt (optional)" });
  const maxTokens = h("input", { id: "chat-max-tokens", type: "number", value: 64, min: 1, max: 1024 });
  const temperature = h("input", { id: "chat-temperature", type: "number", value: 0, min: 0, max: 2, step: 0.1 });
  const prompt = h("textarea", { id: "chat-prompt", rows: 3, placeholder: "Say something (Enter sends, Shift+Enter: new line)" });
  const send = async () => {
    const text = prompt.value.trim();
    if (!text) return;
    prompt.value = "";
    const settings = { system: system.value.trim(), maxTokens: Number(maxTokens.value) || 64,
      temperature: Number(temperature.value) || 0 };
    await Promise.all(panes.map((p) => p.send(text, settings)));
  };
  prompt.addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); } });
  root.append(h("section", {}, h("h2", {}, "Chat"),
    h("div", { class: "toolbar" }, system, h("label", {}, "max tokens ", maxTokens),
      h("label", {}, "temperature ", temperature),
      h("button", { id: "chat-reset", onclick: () => panes.forEach((p) => p.reset()) }, "Reset")),
    h("div", { class: "chat-panes" }, panes.map((p) => p.el)),
    h("div", { class: "toolbar chat-input" }, prompt, h("button", { id: "chat-send", onclick: send }, "Send"))));
}
