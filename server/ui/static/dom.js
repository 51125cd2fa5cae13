// Small DOM helpers shared by the console's sections.

export const $ = (id) => document.getElementById(id);

/** h("td", {class: "x", dataset: {label: "Id"}}, "text", childNode) → element. */
export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "dataset") Object.assign(node.dataset, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

/** Show `err` (an ApiError carries the server's message) in `target`; clear it with null. */
export function showError(target, err) {
  if (!err) { target.textContent = ""; return; }
  const status = err.status ? ` (HTTP ${err.status})` : "";
  target.textContent = `${err.message}${status}`;
}

let toastTimer = 0;
export function toast(message) {
  const node = $("toast");
  node.textContent = message;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { node.textContent = ""; }, 6000);
}

export function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}
