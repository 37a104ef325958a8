// A job's page: the API's job, events and checkpoints, plus /ui/api's request, validation, estimate,
// metrics (results.csv) and histogram; polled every 2 s until the job ends.
import { ApiError, download, getJSON, postJSON } from "./api.js";
import { COLORS, histogramChart, lineChart, redrawOnResize } from "./charts.js";
import { estimateView, validationView } from "./report.js";
import {
  $, TERMINAL, copyButton, duration, fill, fixed, h, number, patchRows, poll, renderIfChanged, showError, startPage, toast,
  when,
} from "./util.js";

startPage();
const jobId = decodeURIComponent(location.pathname.split("/").filter(Boolean)[1] || "");
const base = `/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}`;
const ui = `/ui/api/jobs/${encodeURIComponent(jobId)}`;
const state = { summary: null, metrics: [], events: new Map(), eventsCursor: null, moreEvents: false,
  checkpoints: [], histogramLoaded: false, done: false };
$("job-id").textContent = jobId;
document.title = `${jobId} · ftlab`;

// ---- status, facts, actions ------------------------------------------------------------------
function renderSummary() {
  const { job, progress, requested, downloads, files } = state.summary;
  if ($("status").textContent !== job.status) { // a live region: announced when it changes, not every poll
    $("status").textContent = job.status;
    $("status").className = `badge status-${job.status}`;
  }
  const ftModel = job.fine_tuned_model;
  $("ft-model").hidden = !ftModel;
  renderIfChanged("ft-model", ftModel, () => ftModel && fill($("ft-model"), h("code", {}, ftModel), " ", copyButton(ftModel)));
  const running = job.status === "running";
  const step = progress.step || 0;
  const total = progress.total_steps;
  $("progress-box").hidden = !(total && (running || job.status === "paused" || step));
  if (total) {
    $("progress").max = total;
    $("progress").value = Math.min(step, total);
    $("progress-label").textContent = `Progress: step ${step} of ${total} (${Math.round((100 * step) / total)}%)`;
  }
  const now = Date.now() / 1000;
  if (running && job.estimated_finish) {
    $("eta").textContent = `ETA ${when(job.estimated_finish)} (in ${duration(Math.max(0, job.estimated_finish - now))})`;
  } else {
    $("eta").textContent = "";
  }
  const detail = {
    validating_files: "checking the files", queued: "waiting for its turn", running: "training",
    paused: "paused at a checkpoint; resume to continue", succeeded: "done", failed: "stopped with an error",
    cancelled: "cancelled",
  }[job.status] || "";
  $("status-detail").textContent = detail;
  $("job-error").hidden = !job.error;
  if (job.error) fill($("job-error"), h("strong", {}, job.error.code || "error"), ": ", job.error.message);
  const end = job.finished_at || (TERMINAL.includes(job.status) ? null : now);
  const fileLabel = (file) => (file ? (file.deleted ? `${file.id} (deleted)` : `${file.filename} (${file.id})`) : "—");
  const facts = [
    ["Model", job.model], ["Family", state.summary.family], ["Suffix", state.summary.suffix || "—"],
    ["Created", when(job.created_at)], ["Started", when(progress.started_at)], ["Finished", when(job.finished_at)],
    ["Duration", end ? duration(end - job.created_at) : "—"], ["Trained tokens", number(job.trained_tokens)],
    ["Seed", job.seed ?? "—"], ["Training file", fileLabel(files.training)], ["Validation file", fileLabel(files.validation)],
  ];
  fill($("facts"), facts.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
  fill(document.querySelector("#hyperparameters tbody"), Object.entries(job.hyperparameters).map(([name, used]) =>
    h("tr", {}, h("th", { scope: "row" }, name), h("td", {}, String(requested[name])), h("td", {}, String(used)))));
  $("cancel").disabled = TERMINAL.includes(job.status);
  $("pause").disabled = !["queued", "running"].includes(job.status);
  $("resume").disabled = job.status !== "paused";
  $("download-adapter").disabled = !downloads.adapter;
  $("download-results").disabled = !downloads.results;
  $("playground").href = `/playground?model=${encodeURIComponent(ftModel && job.status === "succeeded" ? ftModel : state.summary.family)}`;
  renderIfChanged("estimate", state.summary.estimate, (estimate) => fill($("estimate"), estimateView(estimate)));
  renderIfChanged("files", files, () => fill($("files"), [["Training", files.training], ["Validation", files.validation]]
    .filter(([, f]) => f).map(([kind, f]) => h("p", {}, h("strong", {}, `${kind}: `), fileLabel(f), f.bytes ? ` · ${number(f.bytes)} bytes` : ""))));
  renderIfChanged("validation", state.summary.validation, (validation) =>
    fill($("validation"), validation ? [h("h3", {}, "Validation report"), ...validationView(validation)] : []));
}

async function act(action) {
  try {
    await postJSON(`${base}/${action}`);
    toast(`Asked to ${action} ${jobId}`);
    state.done = false;
    startPolling();
  } catch (error) {
    showError($("error"), error);
  }
}

for (const action of ["cancel", "pause", "resume"]) $(action).addEventListener("click", () => act(action));
$("download-adapter").addEventListener("click", () =>
  download(`${ui}/adapter.zip`, `${jobId}-adapter.zip`).catch((e) => showError($("error"), e)));
$("download-results").addEventListener("click", () =>
  download(`${ui}/results.csv`, `${jobId}-results.csv`).catch((e) => showError($("error"), e)));

// ---- charts ------------------------------------------------------------------------------------
const smoothing = () => Number($("smoothing").value);

function drawCharts() {
  const series = (key) => state.metrics.filter((r) => r[key] !== null && r[key] !== undefined).map((r) => [r.step, r[key]]);
  lineChart($("loss-chart"), {
    series: [{ name: "training loss", color: COLORS.train, points: series("train_loss") },
      { name: "validation loss", color: COLORS.validation, points: series("valid_loss") }],
    smoothing: smoothing(), yName: "loss", readout: $("loss-readout"),
  });
  lineChart($("accuracy-chart"), {
    series: [{ name: "training token accuracy", color: COLORS.train, points: series("train_mean_token_accuracy") },
      { name: "validation token accuracy", color: COLORS.validation, points: series("valid_mean_token_accuracy") }],
    smoothing: smoothing(), yName: "accuracy", readout: $("accuracy-readout"),
  });
  const legend = (names) => names.filter(([, , key]) => series(key).length)
    .map(([name, kind]) => h("span", { className: `key key-${kind}` }, name));
  fill($("loss-legend"), legend([["training loss", "train", "train_loss"], ["validation loss", "validation", "valid_loss"]]));
  fill($("accuracy-legend"), legend([["training", "train", "train_mean_token_accuracy"],
    ["validation", "validation", "valid_mean_token_accuracy"]]));
  drawRewards(series, legend);
  drawPreferences(series, legend);
}

// A DPO job's preference metrics (its preference_results.csv): reward accuracy, and the rewards themselves.
function drawPreferences(series, legend) {
  const preferring = series("train_reward_accuracy").length > 0;
  $("preference-panel").hidden = !preferring;
  if (!preferring) return;
  lineChart($("preference-accuracy-chart"), {
    series: [{ name: "training reward accuracy", color: COLORS.train, points: series("train_reward_accuracy") },
      { name: "validation reward accuracy", color: COLORS.validation, points: series("valid_reward_accuracy") }],
    smoothing: smoothing(), yName: "accuracy", readout: $("preference-accuracy-readout"),
  });
  lineChart($("preference-reward-chart"), {
    series: [{ name: "validation reward margin", color: COLORS.validation, points: series("valid_reward_margin") },
      { name: "training reward margin", color: COLORS.train, points: series("train_reward_margin") },
      { name: "training preferred reward", color: COLORS.train, points: series("train_chosen_reward") },
      { name: "training non-preferred reward", color: COLORS.validation, points: series("train_rejected_reward") }],
    smoothing: smoothing(), yName: "reward", readout: $("preference-reward-readout"),
  });
  fill($("preference-accuracy-legend"), legend([["training", "train", "train_reward_accuracy"],
    ["validation", "validation", "valid_reward_accuracy"]]));
  fill($("preference-reward-legend"), legend([["training margin", "train", "train_reward_margin"],
    ["validation margin", "validation", "valid_reward_margin"]]));
}

// A reinforcement job's rewards (its reward_results.csv): mean reward and reply length, training and validation.
function drawRewards(series, legend) {
  const rewarded = series("train_reward_mean").length > 0;
  $("rewards-panel").hidden = !rewarded;
  $("accuracy-chart").closest("figure").hidden = rewarded; // its train_accuracy column holds the mean reward
  if (!rewarded) return;
  const pair = (key) => [{ name: `training ${key}`, color: COLORS.train, points: series(`train_${key}`) },
    { name: `validation ${key}`, color: COLORS.validation, points: series(`valid_${key}`) }];
  lineChart($("reward-chart"), { series: pair("reward_mean"), smoothing: smoothing(), yName: "reward",
    readout: $("reward-readout") });
  lineChart($("length-chart"), { series: pair("completion_tokens"), smoothing: smoothing(), yName: "tokens",
    readout: $("length-readout") });
  fill($("reward-legend"), legend([["training", "train", "train_reward_mean"], ["validation", "validation", "valid_reward_mean"]]));
  fill($("length-legend"), legend([["training", "train", "train_completion_tokens"],
    ["validation", "validation", "valid_completion_tokens"]]));
  const last = state.metrics[state.metrics.length - 1];
  const sum = (key) => state.metrics.reduce((total, row) => total + (row[key] || 0), 0);
  fill($("reward-facts"), [["Reward std (last step)", fixed(last.train_reward_std)],
    ["KL to the reference (last step)", last.train_kl === null || last.train_kl === undefined ? "not measured (kl_coef 0)" : fixed(last.train_kl)],
    ["Grading time", `${fixed(sum("train_grader_seconds"))} s`], ["Grader errors", number(sum("train_grader_errors"))]]
    .flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

function renderSamples(events) {
  const latest = events.find((e) => e.data && Array.isArray(e.data.samples));
  $("no-samples").hidden = Boolean(latest);
  fill(document.querySelector("#samples tbody"), latest ? latest.data.samples.map((s) => h("tr", {},
    h("td", { "data-label": "Line" }, String(s.line)), h("td", { "data-label": "Prompt" }, s.prompt),
    h("td", { "data-label": "Reply" }, s.reply), h("td", { "data-label": "Reward" }, fixed(s.reward)))) : []);
}

$("smoothing").addEventListener("input", () => {
  $("smoothing-value").textContent = smoothing().toFixed(2);
  drawCharts();
});
redrawOnResize($("loss-chart"), drawCharts);

async function loadMetrics() {
  const after = state.metrics.length ? state.metrics[state.metrics.length - 1].step : 0;
  const page = await getJSON(`${ui}/metrics?after_step=${after}`);
  if (page.data.length || !state.metrics.length) {
    state.metrics = state.metrics.concat(page.data);
    drawCharts();
  }
}

// ---- events and checkpoints --------------------------------------------------------------------
function renderEvents() {
  if (renderEvents.shown === state.events.size && $("older-events").hidden === !state.moreEvents) return;
  renderEvents.shown = state.events.size;
  const events = [...state.events.values()].sort((a, b) => (a.id < b.id ? 1 : -1));
  fill($("events"), events.map((e) => h("li", { className: `event level-${e.level || "info"}` },
    h("time", { datetime: new Date(e.created_at * 1000).toISOString() }, when(e.created_at)), " ",
    e.level && e.level !== "info" ? h("span", { className: "level" }, e.level) : null, " ", e.message)));
  $("older-events").hidden = !state.moreEvents;
  renderSamples(events);
}

async function loadEvents() {
  const page = await getJSON(`${base}/events?limit=100`);
  const known = state.events.size;
  for (const event of page.data) state.events.set(event.id, event);
  if (!known) { state.moreEvents = page.has_more; state.eventsCursor = page.data.length ? page.data[page.data.length - 1].id : null; }
  renderEvents();
}

$("older-events").addEventListener("click", async () => {
  const page = await getJSON(`${base}/events?limit=100&after=${encodeURIComponent(state.eventsCursor)}`);
  for (const event of page.data) state.events.set(event.id, event);
  state.moreEvents = page.has_more;
  if (page.data.length) state.eventsCursor = page.data[page.data.length - 1].id;
  renderEvents();
});

async function loadCheckpoints() {
  const page = await getJSON(`${base}/checkpoints?limit=100`);
  state.checkpoints = page.data;
  $("no-checkpoints").hidden = Boolean(page.data.length);
  $("checkpoints").hidden = !page.data.length;
  patchRows(document.querySelector("#checkpoints tbody"), page.data.map((c) => h("tr", { "data-step": c.step_number, "data-key": c.id },
    h("td", { "data-label": "Step" }, String(c.step_number)),
    h("td", { "data-label": "Model name" }, h("code", { className: "model-code" }, c.fine_tuned_model_checkpoint), " ", copyButton(c.fine_tuned_model_checkpoint)),
    h("td", { "data-label": "Training loss" }, fixed(c.metrics.train_loss)),
    h("td", { "data-label": "Validation loss" }, fixed(c.metrics.valid_loss)),
    h("td", { "data-label": "Created" }, when(c.created_at)),
    h("td", { "data-label": "Actions" }, h("span", { className: "row-actions" },
      h("a", { className: "button small", href: `/playground?model=${encodeURIComponent(c.fine_tuned_model_checkpoint)}` }, "Playground"),
      h("button", { type: "button", className: "small", onclick: () => download(`${ui}/adapter.zip?step=${c.step_number}`, `${jobId}-step-${c.step_number}-adapter.zip`).catch((e) => showError($("error"), e)) }, "Adapter"))))));
}

async function loadHistogram() {
  if (state.histogramLoaded) return;
  const histogram = await getJSON(`${ui}/histogram`);
  state.histogramLoaded = true;
  const draw = () => histogramChart($("histogram"), histogram, $("histogram-legend"));
  draw();
  redrawOnResize($("histogram"), draw);
  if (histogram.missing_files.length) $("histogram-legend").append(` (no longer uploaded: ${histogram.missing_files.join(", ")})`);
}

// ---- the loop ------------------------------------------------------------------------------------
async function refresh() {
  try {
    state.summary = await getJSON(ui);
    showError($("error"), null);
  } catch (error) {
    showError($("error"), error instanceof ApiError && error.status === 404 ? new Error(`No job ${jobId} on this server.`) : error);
    if (error instanceof ApiError && error.status === 404) state.done = true;
    return;
  }
  renderSummary();
  await Promise.all([loadMetrics(), loadEvents(), loadCheckpoints(),
    loadHistogram().catch((error) => fill($("histogram"), h("p", { className: "muted" }, `No histogram: ${error.message}`)))]);
  if (TERMINAL.includes(state.summary.job.status)) state.done = true;
}

let stopPolling = null;
function startPolling() {
  if (stopPolling) stopPolling();
  stopPolling = poll(refresh, 2000, () => !state.done);
}
startPolling();
