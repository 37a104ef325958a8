// The dashboard's one way to the server: fetch with the API key as `Authorization: Bearer`, exactly as
// the API expects. A 401 asks for the key (a <dialog>), stores it in localStorage and tries again.
const STORAGE = "ftlab.apiKey";

export class ApiError extends Error {
  constructor(status, message, code, param) {
    super(message);
    this.status = status;
    this.code = code;
    this.param = param;
  }
}

export function storedKey() {
  try { return localStorage.getItem(STORAGE) || ""; } catch { return ""; }
}

function storeKey(key) {
  try { key ? localStorage.setItem(STORAGE, key) : localStorage.removeItem(STORAGE); } catch { /* private mode */ }
  const button = document.getElementById("key-button");
  if (button) button.hidden = !key;
}

let asking = null;

function askKey(refused) {
  if (asking) return asking;
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  const message = document.getElementById("key-message");
  message.textContent = refused
    ? "That key was refused. Enter the server's API key (server.api_key or FTLAB_API_KEY)."
    : "This server needs its API key (server.api_key or FTLAB_API_KEY).";
  message.className = refused ? "error" : "";
  input.value = "";
  asking = new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      if (input.value.trim()) storeKey(input.value.trim());
      asking = null;
      resolve();
    }, { once: true });
  });
  if (!dialog.open) dialog.showModal();
  input.focus();
  return asking;
}

export function setupKeyUi() {
  const dialog = document.getElementById("key-dialog");
  document.getElementById("key-forget").addEventListener("click", () => {
    storeKey("");
    document.getElementById("key-input").value = "";
    dialog.close();
  });
  document.getElementById("key-button").addEventListener("click", () => askKey(false));
  document.getElementById("key-button").hidden = !storedKey();
}

// fetch(path) with the key; `json` is sent as a JSON body. Resolves to the Response (never a 401).
export async function api(path, { json, ...options } = {}) {
  for (;;) {
    const headers = new Headers(options.headers || {});
    const key = storedKey();
    if (key) headers.set("Authorization", `Bearer ${key}`);
    let body = options.body;
    if (json !== undefined) {
      headers.set("Content-Type", "application/json");
      body = JSON.stringify(json);
    }
    const response = await fetch(path, { ...options, headers, body });
    if (response.status !== 401) return response;
    await askKey(Boolean(key));
  }
}

export async function getJSON(path, options) {
  const response = await api(path, options);
  let body = null;
  try { body = await response.json(); } catch { /* not JSON */ }
  if (!response.ok) {
    const error = (body && body.error) || {};
    throw new ApiError(response.status, error.message || `${response.status} ${response.statusText}`, error.code, error.param);
  }
  return body;
}

export const postJSON = (path, json) => getJSON(path, { method: "POST", json });

// Download what `path` answers (sent with the key) as a file named `filename`.
export async function download(path, filename) {
  const response = await api(path);
  if (!response.ok) {
    let message = `${response.status}`;
    try { message = (await response.json()).error.message; } catch { /* keep the status */ }
    throw new ApiError(response.status, message);
  }
  const url = URL.createObjectURL(await response.blob());
  const link = Object.assign(document.createElement("a"), { href: url, download: filename });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// POST /v1/files (multipart: file, purpose=fine-tune), as client.files.create does.
export async function uploadFile(file) {
  const form = new FormData();
  form.append("purpose", "fine-tune");
  form.append("file", file, file.name);
  return getJSON("/v1/files", { method: "POST", body: form });
}
