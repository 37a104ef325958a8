// Charts drawn as SVG, no library: line charts of metrics by step (with smoothing) and histograms.
const NS = "http://www.w3.org/2000/svg";
export const COLORS = { train: "#2457c5", validation: "#d9480f" };

function svg(tag, attributes = {}, text) {
  const element = document.createElementNS(NS, tag);
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, value);
  if (text !== undefined) element.textContent = text;
  return element;
}

// "Nice" tick values covering [low, high].
export function ticks(low, high, count = 5) {
  if (!(high > low)) { high = low + 1; low = low - (low === 0 ? 0 : 1); }
  const raw = (high - low) / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * power).find((s) => s >= raw) || raw;
  const first = Math.ceil(low / step) * step;
  const values = [];
  for (let v = first; v <= high + step * 1e-9; v += step) values.push(Number(v.toPrecision(12)));
  return values;
}

const label = (v) => (Math.abs(v) >= 1000 ? v.toLocaleString("en-US") : String(Number(v.toPrecision(4))));

// TensorBoard's smoothing: an exponential moving average, debiased at the start.
export function smooth(points, weight) {
  if (!weight) return points;
  let last = 0;
  let norm = 0;
  return points.map(([x, y]) => {
    last = last * weight + (1 - weight) * y;
    norm = norm * weight + (1 - weight);
    return [x, last / norm];
  });
}

function frame(box, height = 240) {
  const width = Math.max(240, Math.floor(box.clientWidth || 480));
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, class: "chart-svg" });
  return { root, width, height, margin: { left: 52, right: 12, top: 10, bottom: 34 } };
}

function axes(root, geometry, xs, ys, xName, yName) {
  const { width, height, margin } = geometry;
  const g = svg("g", { class: "axes" });
  for (const y of ys.values) {
    const py = ys.scale(y);
    g.append(svg("line", { x1: margin.left, x2: width - margin.right, y1: py, y2: py, class: "grid" }));
    g.append(svg("text", { x: margin.left - 6, y: py + 4, "text-anchor": "end" }, label(y)));
  }
  for (const x of xs.values) {
    const px = xs.scale(x);
    g.append(svg("line", { x1: px, x2: px, y1: height - margin.bottom, y2: height - margin.bottom + 4, class: "tick" }));
    g.append(svg("text", { x: px, y: height - margin.bottom + 16, "text-anchor": "middle" }, label(x)));
  }
  g.append(svg("line", { x1: margin.left, x2: width - margin.right, y1: height - margin.bottom, y2: height - margin.bottom, class: "axis" }));
  g.append(svg("text", { x: (margin.left + width - margin.right) / 2, y: height - 4, "text-anchor": "middle", class: "axis-name" }, xName));
  if (yName) g.append(svg("text", { x: 12, y: margin.top + 2, class: "axis-name", transform: `rotate(-90 12 ${margin.top + 2})`, "text-anchor": "end" }, yName));
  root.append(g);
}

function scale(low, high, from, to) {
  const span = high - low || 1;
  return (v) => from + ((v - low) / span) * (to - from);
}

// series: [{name, color, points: [[step, value], ...]}]; smoothing in [0, 1).
export function lineChart(box, { series, smoothing = 0, xName = "step", yName = "", readout }) {
  const geometry = frame(box);
  const { root, width, height, margin } = geometry;
  const drawn = series.filter((s) => s.points.length);
  const all = drawn.flatMap((s) => s.points);
  root.setAttribute("role", "img");
  const summary = drawn.map((s) => `${s.name}: ${s.points.length} points, last ${label(s.points[s.points.length - 1][1])} at step ${s.points[s.points.length - 1][0]}`);
  root.setAttribute("aria-label", summary.length ? summary.join("; ") : "No data yet");
  if (!all.length) {
    root.append(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "empty" }, "No data yet"));
    box.replaceChildren(root);
    return root;
  }
  const xValues = all.map((p) => p[0]);
  const yValues = all.map((p) => p[1]);
  const xLow = Math.min(...xValues, 0);
  const xHigh = Math.max(...xValues, 1);
  let yLow = Math.min(...yValues);
  let yHigh = Math.max(...yValues);
  const pad = (yHigh - yLow) * 0.08 || Math.abs(yHigh) * 0.1 || 0.1;
  yLow -= pad; yHigh += pad;
  const yTicks = ticks(yLow, yHigh, 4);
  const xTicks = ticks(xLow, xHigh, Math.max(2, Math.min(8, Math.floor(width / 80)))).filter((x) => Number.isInteger(x) || xHigh < 5);
  const xs = { values: xTicks, scale: scale(xLow, xHigh, margin.left, width - margin.right) };
  const ys = { values: yTicks, scale: scale(yLow, yHigh, height - margin.bottom, margin.top) };
  axes(root, geometry, xs, ys, xName, yName);
  const path = (points) => points.map(([x, y], i) => `${i ? "L" : "M"}${xs.scale(x).toFixed(1)},${ys.scale(y).toFixed(1)}`).join("");
  for (const s of drawn) {
    const sparse = s.points.length < 30;
    if (smoothing > 0 && s.points.length > 1) {
      root.append(svg("path", { d: path(s.points), class: "raw", stroke: s.color }));
    }
    root.append(svg("path", { d: path(smooth(s.points, smoothing)), class: "line", stroke: s.color, "data-series": s.name }));
    if (sparse) {
      for (const [x, y] of s.points) root.append(svg("circle", { cx: xs.scale(x), cy: ys.scale(y), r: 2.5, fill: s.color }));
    }
  }
  // a crosshair and a text readout of the nearest step (pointer)
  const cross = svg("line", { y1: margin.top, y2: height - margin.bottom, class: "cross", visibility: "hidden" });
  root.append(cross);
  root.addEventListener("pointermove", (event) => {
    const rect = root.getBoundingClientRect();
    const px = ((event.clientX - rect.left) / rect.width) * width;
    const step = xLow + ((px - margin.left) / (width - margin.left - margin.right)) * (xHigh - xLow);
    const parts = [];
    let nearestX = null;
    for (const s of drawn) {
      const smoothed = smooth(s.points, smoothing);
      let best = 0;
      smoothed.forEach((p, i) => { if (Math.abs(p[0] - step) < Math.abs(smoothed[best][0] - step)) best = i; });
      nearestX = smoothed[best][0];
      parts.push(`${s.name} ${label(s.points[best][1])}${smoothing ? ` (smoothed ${label(smoothed[best][1])})` : ""} at step ${smoothed[best][0]}`);
    }
    cross.setAttribute("x1", xs.scale(nearestX));
    cross.setAttribute("x2", xs.scale(nearestX));
    cross.setAttribute("visibility", "visible");
    if (readout) readout.textContent = parts.join(" · ");
  });
  root.addEventListener("pointerleave", () => cross.setAttribute("visibility", "hidden"));
  box.replaceChildren(root);
  return root;
}

// histogram: {edges, counts: {kind: [...]}, context_length} as from /ui/api/.../histogram.
export function histogramChart(box, histogram, legend) {
  const geometry = frame(box, 200);
  const { root, width, height, margin } = geometry;
  const kinds = Object.keys(histogram.counts || {}).filter((k) => (histogram.counts[k] || []).length);
  const edges = histogram.edges || [];
  root.setAttribute("role", "img");
  if (!kinds.length || edges.length < 2) {
    root.setAttribute("aria-label", "No examples to count");
    root.append(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "empty" }, "No valid examples"));
    box.replaceChildren(root);
    if (legend) legend.replaceChildren();
    return root;
  }
  const maxCount = Math.max(...kinds.flatMap((k) => histogram.counts[k]), 1);
  let xLow = edges[0];
  let xHigh = edges[edges.length - 1];
  if (xHigh - xLow < 20) { // a narrow spread: show it inside a wider window, so one bar is not the whole chart
    const middle = (xLow + xHigh) / 2;
    xLow = Math.max(0, Math.floor(middle - 10));
    xHigh = xLow + 20;
  }
  const xTicks = ticks(xLow, xHigh, Math.max(2, Math.floor(width / 90))).filter(Number.isInteger);
  const xs = { values: xTicks, scale: scale(xLow, xHigh, margin.left, width - margin.right) };
  const ys = { values: ticks(0, maxCount, 4).filter(Number.isInteger), scale: scale(0, maxCount * 1.05, height - margin.bottom, margin.top) };
  axes(root, geometry, xs, ys, "tokens per example (cl100k_base, as billed)", "examples");
  kinds.forEach((kind, k) => {
    histogram.counts[kind].forEach((count, i) => {
      if (!count) return;
      const x0 = xs.scale(edges[i]);
      const x1 = xs.scale(edges[i + 1]);
      const barWidth = Math.max(1, (x1 - x0) / kinds.length - 1);
      const y = ys.scale(count);
      const bar = svg("rect", { x: x0 + k * barWidth, y, width: barWidth, height: height - margin.bottom - y, fill: COLORS[kind] || "#666", class: "bar" });
      bar.append(svg("title", {}, `${kind}: ${count} example(s) of ${edges[i]}–${edges[i + 1] - 1} tokens`));
      root.append(bar);
    });
  });
  const context = histogram.context_length;
  if (context && context <= xHigh) {
    const x = xs.scale(context);
    root.append(svg("line", { x1: x, x2: x, y1: margin.top, y2: height - margin.bottom, class: "limit" }));
  }
  const totals = kinds.map((k) => `${k}: ${histogram.counts[k].reduce((a, b) => a + b, 0)} examples`);
  root.setAttribute("aria-label", `Token lengths from ${edges[0]} to ${edges[edges.length - 1] - 1}; ${totals.join(", ")}`);
  box.replaceChildren(root);
  if (legend) {
    legend.replaceChildren(...kinds.map((k) => {
      const item = document.createElement("span");
      item.className = `key key-${k}`;
      item.textContent = `${k} (${histogram.counts[k].reduce((a, b) => a + b, 0)})`;
      return item;
    }));
  }
  return root;
}

// Redraw `draw` when the box changes width (phone rotation, window resize).
export function redrawOnResize(box, draw) {
  let width = box.clientWidth;
  new ResizeObserver(() => {
    if (Math.abs(box.clientWidth - width) > 8) {
      width = box.clientWidth;
      draw();
    }
  }).observe(box);
}
