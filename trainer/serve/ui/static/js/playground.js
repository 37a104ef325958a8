// Playground: one system and one user prompt to two models; both answers stream side by side
// (POST /v1/chat/completions, or /v1/completions for prompt/completion families, with stream and
// stream_options.include_usage), with token counts and tokens/s.
import { api, getJSON } from "./api.js";
import { $, fill, h, number, startPage } from "./util.js";

startPage();
const models = new Map();
const params = new URLSearchParams(location.search);

async function loadModels() {
  const listing = await getJSON("/ui/api/models");
  for (const model of listing.data) models.set(model.id, model);
  const kinds = { family: "base family", "fine-tuned": "fine-tuned", checkpoint: "checkpoint" };
  fill($("models"), listing.data.map((m) => h("option", { value: m.id }, kinds[m.kind] || m.kind)));
  const wanted = params.get("model");
  const fineTuned = listing.data.find((m) => m.kind === "fine-tuned");
  const b = wanted || (fineTuned ? fineTuned.id : "");
  const a = params.get("compare") || (b ? (b.startsWith("ft:") ? b.split(":")[1] : b) : "gpt-3.5-turbo");
  if (!$("model-a").value) $("model-a").value = a;
  if (!$("model-b").value) $("model-b").value = b || a;
}

function isChat(name) {
  const known = models.get(name);
  if (known) return known.chat;
  const family = name.startsWith("ft:") ? name.split(":")[1] : name;
  return !["babbage-002", "davinci-002"].includes(family);
}

// Read an SSE body: calls onEvent(json) for each `data:` line until [DONE].
async function readStream(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

async function run(side, model, system, user, settings) {
  const out = $(`out-${side}`);
  const stats = $(`stats-${side}`);
  fill($(`title-${side}`), side.toUpperCase(), ": ", h("code", {}, model));
  out.textContent = "";
  out.classList.remove("failed");
  stats.textContent = "waiting for the model…";
  const chat = isChat(model);
  const messages = [];
  if (system.trim()) messages.push({ role: "system", content: system });
  messages.push({ role: "user", content: user });
  const body = chat
    ? { model, messages, stream: true, stream_options: { include_usage: true }, ...settings }
    : { model, prompt: (system.trim() ? `${system}\n\n` : "") + user, stream: true, stream_options: { include_usage: true }, ...settings };
  const started = performance.now();
  let first = null;
  let chunks = 0;
  let usage = null;
  try {
    const response = await api(chat ? "/v1/chat/completions" : "/v1/completions", { method: "POST", json: body });
    if (!response.ok) {
      let message = `${response.status}`;
      try { message = (await response.json()).error.message; } catch { /* keep the status */ }
      throw new Error(message);
    }
    await readStream(response, (event) => {
      if (event.error) throw new Error(event.error.message || "stream error");
      if (event.usage) usage = event.usage;
      for (const choice of event.choices || []) {
        const text = chat ? (choice.delta && choice.delta.content) || "" : choice.text || "";
        if (!text) continue;
        if (first === null) first = performance.now();
        chunks += 1;
        out.textContent += text;
        stats.textContent = `${chunks} chunk(s) so far…`;
      }
    });
    const end = performance.now();
    const completion = usage ? usage.completion_tokens : chunks;
    const generating = first === null ? 0 : (end - first) / 1000;
    const rate = generating > 0 ? completion / generating : null;
    stats.textContent = [
      usage ? `${number(usage.prompt_tokens)} prompt tokens` : null,
      `${number(completion)} completion tokens`,
      rate ? `${rate.toFixed(1)} tokens/s` : null,
      first !== null ? `first token after ${((first - started) / 1000).toFixed(2)} s` : "no text",
    ].filter(Boolean).join(" · ");
    out.dataset.done = "true";
    if (!out.textContent) out.textContent = "(empty answer)";
  } catch (error) {
    out.textContent = error.message;
    out.classList.add("failed");
    stats.textContent = "failed";
  }
}

$("play-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const settings = { max_tokens: Number($("max-tokens").value) || 64, temperature: Number($("temperature").value) || 0 };
  const system = $("system").value;
  const user = $("user").value;
  $("run").disabled = true;
  for (const side of ["a", "b"]) delete $(`out-${side}`).dataset.done;
  await Promise.all([run("a", $("model-a").value.trim(), system, user, settings),
    run("b", $("model-b").value.trim(), system, user, settings)]);
  $("run").disabled = false;
});
$("play-form").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("play-form").requestSubmit();
});

loadModels().catch((error) => { $("stats-a").textContent = error.message; });
