// Small helpers: build elements (text only: data never becomes markup), format numbers and times.
import { setupKeyUi } from "./api.js";

export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value === false || value === null || value === undefined) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (name === "className") element.className = value;
    else element.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

export const $ = (id) => document.getElementById(id);

export function fill(element, ...children) {
  element.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
}

export const number = (n) => (n === null || n === undefined ? "—" : Number(n).toLocaleString("en-US"));
export const usd = (n) => (n === null || n === undefined ? "—" : `$${Number(n) < 1 ? Number(n).toFixed(4) : Number(n).toFixed(2)}`);
export const fixed = (n, digits = 4) => (n === null || n === undefined || Number.isNaN(n) ? "—" : Number(n).toFixed(digits));

export function when(seconds) {
  if (!seconds) return "—";
  const date = new Date(seconds * 1000);
  const pad = (v) => String(v).padStart(2, "0");
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} ${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || seconds < 0) return "—";
  seconds = Math.round(seconds);
  const hours = Math.floor(seconds / 3600);
  const minutes = Math.floor((seconds % 3600) / 60);
  const rest = seconds % 60;
  if (hours) return `${hours}h ${String(minutes).padStart(2, "0")}m`;
  if (minutes) return `${minutes}m ${String(rest).padStart(2, "0")}s`;
  return `${rest}s`;
}

export const TERMINAL = ["succeeded", "failed", "cancelled"];

export function badge(status) {
  return h("span", { className: `badge status-${status}` }, status);
}

export function familyOf(model) {
  return model && model.startsWith("ft:") ? model.split(":")[1] : model;
}

export function showError(element, error) {
  if (!element) return;
  element.hidden = !error;
  element.textContent = error ? (error.message || String(error)) : "";
}

export function toast(message) {
  const box = $("toast");
  if (!box) return;
  box.textContent = message;
  box.classList.add("show");
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => box.classList.remove("show"), 2500);
}

export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const area = h("textarea", { className: "visually-hidden" }, text);
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  toast(`Copied ${text}`);
}

export function copyButton(text, label = "Copy") {
  return h("button", { type: "button", className: "small", "aria-label": `${label} ${text}`, onclick: () => copyText(text) }, label);
}

// Run `task` now and every `ms` while `keepGoing()` says so; errors are shown, polling continues.
export function poll(task, ms, keepGoing = () => true) {
  let timer = null;
  const tick = async () => {
    try { await task(); } catch (error) { console.error(error); }
    if (keepGoing()) timer = setTimeout(tick, document.hidden ? ms * 3 : ms);
  };
  tick();
  return () => clearTimeout(timer);
}

export function startPage() {
  setupKeyUi();
}

// Put `rows` (each with a data-key) in `tbody`, changing only the cells that differ: a row a keyboard
// user is on keeps its focus across the 2 s refreshes.
export function patchRows(tbody, rows) {
  const old = new Map([...tbody.children].map((row) => [row.dataset.key, row]));
  rows.forEach((row, index) => {
    let target = row;
    const existing = old.get(row.dataset.key);
    if (existing && existing.children.length === row.children.length) {
      old.delete(row.dataset.key);
      const cells = [...row.children];
      cells.forEach((cell, j) => {
        const previous = existing.children[j];
        if (previous.innerHTML !== cell.innerHTML) previous.replaceWith(cell);
      });
      target = existing;
    }
    if (tbody.children[index] !== target) tbody.insertBefore(target, tbody.children[index] || null);
  });
  for (const row of old.values()) row.remove();
}

// Call `render` only when `data` differs from the last call's with the same `key`.
const rendered = new Map();
export function renderIfChanged(key, data, render) {
  const text = JSON.stringify(data);
  if (rendered.get(key) === text) return;
  rendered.set(key, text);
  render(data);
}
