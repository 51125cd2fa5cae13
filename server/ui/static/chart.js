// The loss curve as inline SVG: a polyline over the steps so far, x spanning the job's total steps,
// so the curve visibly grows while the job runs. No library: a few elements, redrawn per poll.

const NS = "http://www.w3.org/2000/svg";
const W = 800, H = 260, PAD = { left: 56, right: 12, top: 12, bottom: 28 };

function el(name, attrs, text) {
  const node = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmt(x) {
  return Math.abs(x) >= 100 || x === 0 ? x.toFixed(0) : x.toPrecision(3);
}

/** Draw `history` ([{step, loss}]) on `svg`, x from 0 to `steps`. */
export function drawLossChart(svg, history, steps) {
  svg.replaceChildren();
  const points = history.filter((p) => Number.isFinite(p.loss));
  svg.dataset.points = String(points.length);
  const last = points.at(-1);
  svg.setAttribute("aria-label", last
    ? `Loss curve: ${points.length} of ${steps} steps, latest loss ${fmt(last.loss)}`
    : "Loss curve: no steps yet");
  const x0 = PAD.left, x1 = W - PAD.right, y0 = H - PAD.bottom, y1 = PAD.top;
  svg.append(el("line", { x1: x0, y1: y0, x2: x1, y2: y0, class: "axis" }),
             el("line", { x1: x0, y1: y0, x2: x0, y2: y1, class: "axis" }));
  svg.append(el("text", { x: x1, y: H - 6, "text-anchor": "end", class: "tick" }, `step ${steps}`),
             el("text", { x: x0, y: H - 6, "text-anchor": "start", class: "tick" }, "0"));
  if (!points.length) return;
  const losses = points.map((p) => p.loss);
  let lo = Math.min(...losses), hi = Math.max(...losses);
  if (hi - lo < 1e-9) { hi += 0.5; lo -= 0.5; }
  const margin = (hi - lo) * 0.05; // the curve never sits on the axis
  hi += margin;
  lo -= margin;
  const sx = (step) => x0 + (x1 - x0) * (step / Math.max(steps, 1));
  const sy = (loss) => y0 - (y0 - y1) * ((loss - lo) / (hi - lo));
  svg.append(el("text", { x: x0 - 6, y: y1 + 10, "text-anchor": "end", class: "tick" }, fmt(hi)),
             el("text", { x: x0 - 6, y: y0, "text-anchor": "end", class: "tick" }, fmt(lo)));
  const coords = points.map((p) => `${sx(p.step).toFixed(1)},${sy(p.loss).toFixed(1)}`).join(" ");
  svg.append(el("polyline", { points: coords, class: "curve" }));
  if (points.length <= 60) {
    for (const p of points) svg.append(el("circle", { cx: sx(p.step), cy: sy(p.loss), r: 2.5, class: "dot" }));
  }
}
