// Shared helpers: the JSON API, a tiny element builder, number formatting and per-view timers.

export class ApiError extends Error {}

export async function api(path, params = {}) {
  const query = new URLSearchParams(params).toString();
  const response = await fetch(path + (query ? "?" + query : ""), { headers: { Accept: "application/json" } });
  return unwrap(response);
}

export async function post(path, body) {
  const response = await fetch(path, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  return unwrap(response);
}

async function unwrap(response) {
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) throw new ApiError((data && data.error) || `${response.status} ${response.statusText}`);
  return data;
}

// h("div", {class: "x", onclick: f}, "text", child) -> an element; null/false children are skipped.
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else if (key === "style") el.style.cssText = value;  // CSSOM: allowed by the page's content security policy
    else el.setAttribute(key, value === true ? "" : value);
  }
  append(el, children);
  return el;
}

// Replace an element's children (null, undefined and false are left out, as in h()).
export function put(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

export function append(el, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function fmtNumber(value, digits = 4) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return value.toLocaleString("en");
  const abs = Math.abs(value);
  if (abs !== 0 && (abs < 1e-3 || abs >= 1e5)) return value.toExponential(2);
  return value.toFixed(digits);
}

export function fmtSeconds(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  seconds = Math.max(0, Math.round(seconds));
  const hours = Math.floor(seconds / 3600), minutes = Math.floor((seconds % 3600) / 60), rest = seconds % 60;
  if (hours) return `${hours} h ${minutes} min`;
  if (minutes) return `${minutes} min ${rest} s`;
  return `${rest} s`;
}

export function fmtBytes(bytes) {
  if (bytes === null || bytes === undefined) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (bytes >= 1024 && i < units.length - 1) { bytes /= 1024; i += 1; }
  return `${bytes.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function badge(status) {
  return h("span", { class: `badge ${status}`, "data-status": status }, status);
}

export function errorLine(message) {
  return h("p", { class: "error", role: "alert" }, message);
}

// Timers that belong to the current view; the router clears them when the view changes.
const timers = new Set();
export function every(ms, fn) {
  const id = setInterval(fn, ms);
  timers.add(id);
  return id;
}
export function clearTimers() {
  for (const id of timers) clearInterval(id);
  timers.clear();
}

// The page's settings (folders, recipes, launching), fetched once.
let infoPromise = null;
export function info() {
  if (!infoPromise) infoPromise = api("/api/info");
  return infoPromise;
}

export function runLink(id) {
  return h("a", { href: `#/run/${encodeURIComponent(id)}`, class: "run-link" }, id);
}
