// The Markdown the CLI writes (report.md, data_report.md, eval.md, comparison.md): headings, pipe tables, lists,
// paragraphs, `code` and **bold**. Rendered into DOM nodes (text is never parsed as HTML); images are left out,
// the page draws its own curves.

import { h } from "./core.js";

function inline(text) {
  const out = [];
  const pattern = /(`[^`]+`|\*\*[^*]+\*\*)/g;
  let last = 0;
  for (const match of text.matchAll(pattern)) {
    if (match.index > last) out.push(text.slice(last, match.index));
    const token = match[0];
    out.push(token.startsWith("`") ? h("code", {}, token.slice(1, -1)) : h("strong", {}, token.slice(2, -2)));
    last = match.index + token.length;
  }
  if (last < text.length) out.push(text.slice(last));
  return out;
}

function cells(line) {
  return line.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map((c) => c.trim());
}

function table(lines) {
  const head = cells(lines[0]);
  const body = lines.slice(2).map(cells);
  return h("table", { class: "md-table" },
    h("thead", {}, h("tr", {}, head.map((c) => h("th", {}, inline(c))))),
    h("tbody", {}, body.map((row) => h("tr", {}, row.map((c) => h("td", {}, inline(c)))))));
}

export function markdown(text) {
  const root = h("div", { class: "md" });
  const lines = (text || "").split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim() || /^!\[.*\]\(.*\)$/.test(line.trim())) { i += 1; continue; }
    const heading = line.match(/^(#{1,4})\s+(.*)$/);
    if (heading) { root.append(h(`h${heading[1].length + 2}`, {}, inline(heading[2]))); i += 1; continue; }
    if (line.trim().startsWith("|")) {
      const block = [];
      while (i < lines.length && lines[i].trim().startsWith("|")) block.push(lines[i++]);
      root.append(block.length > 1 ? table(block) : h("p", {}, block[0]));
      continue;
    }
    if (/^\s*[-*]\s+/.test(line)) {
      const items = [];
      while (i < lines.length && /^\s*[-*]\s+/.test(lines[i])) items.push(lines[i++].replace(/^\s*[-*]\s+/, ""));
      root.append(h("ul", {}, items.map((item) => h("li", {}, inline(item)))));
      continue;
    }
    const para = [lines[i++]];  // at least this line, whatever it starts with
    while (i < lines.length && lines[i].trim() && !/^(#|\||\s*[-*]\s)/.test(lines[i])) para.push(lines[i++]);
    root.append(h("p", {}, inline(para.join(" "))));
  }
  return root;
}
