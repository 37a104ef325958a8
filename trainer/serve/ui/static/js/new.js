// New job: drop a training file → POST /v1/files → its validation report and histogram, and the price
// (/ui/api) → family, suffix, hyperparameters, validation file → POST /v1/fine_tuning/jobs → the job page.
import { api, getJSON, postJSON, uploadFile } from "./api.js";
import { histogramChart, redrawOnResize } from "./charts.js";
import { estimateView, validationView } from "./report.js";
import { $, fill, h, number, showError, startPage } from "./util.js";

startPage();
const state = { file: null, report: null, families: [], asked: 0 };

function status(text) { $("upload-status").textContent = text; }

async function loadChoices(selectTrain) {
  const [models, files] = await Promise.all([getJSON("/ui/api/models"), getJSON("/v1/files?purpose=fine-tune")]);
  state.families = models.data.filter((m) => m.kind === "family");
  const family = $("family").value;
  fill($("family"), h("option", { value: "" }, "from the file's format"),
    state.families.map((m) => h("option", { value: m.id }, `${m.id} (${m.chat ? "chat" : "prompt/completion"})`)));
  if (family) $("family").value = family;
  const option = (f) => h("option", { value: f.id }, `${f.filename} (${f.id}, ${number(f.bytes)} bytes)`);
  const existing = $("existing").value;
  fill($("existing"), h("option", { value: "" }, "—"), files.data.map(option));
  $("existing").value = selectTrain || existing;
  const valid = $("validation-file").value;
  fill($("validation-file"), h("option", { value: "" }, "None"), files.data.map(option));
  $("validation-file").value = valid;
}

function chosenFamily() { return $("family").value || undefined; }
function chosenMethod() { return $("method").value || (state.report && state.report.method) || "supervised"; }

async function showReport() {
  const file = state.file;
  const family = chosenFamily();
  status(`Checking ${file.filename}…`);
  const q = new URLSearchParams();
  if (family) q.set("model", family);
  if ($("method").value) q.set("method", $("method").value);
  const asked = ++state.asked; // the newest question wins: an older report arriving late is dropped
  const report = await getJSON(`/ui/api/files/${encodeURIComponent(file.id)}/report?${q}`);
  if (state.file !== file || asked !== state.asked) return;
  state.report = report;
  if (!family) $("family").value = report.family;
  if (!$("method").value) $("method").value = report.method;
  $("grader-box").hidden = report.method !== "reinforcement";
  $("report-area").hidden = false;
  $("job-form").hidden = false;
  const v = report.validation;
  fill($("verdict"), h("strong", {}, file.filename), ` (${file.id}) as a ${report.family} training file: `,
    `${number(report.file.n_examples)} valid example(s) of ${number(report.file.n_lines)} line(s).`);
  fill($("report"), validationView(v));
  const draw = () => histogramChart($("histogram"), report.histogram, $("histogram-legend"));
  draw();
  const errors = v.errors.length;
  $("submit").disabled = errors > 0;
  $("submit-note").textContent = errors ? `Fix the ${errors} error(s) first: a job on this file would fail validation.` : "";
  status(errors ? `${file.filename}: ${errors} error(s).` : `${file.filename} is valid.`);
  await showEstimate();
}
redrawOnResize($("histogram"), () => state.report && histogramChart($("histogram"), state.report.histogram, $("histogram-legend")));

async function showEstimate() {
  if (!state.file) return;
  const q = new URLSearchParams({ training_file: state.file.id, model: $("family").value || state.report.family,
    method: chosenMethod() });
  const epochs = $("n_epochs").value.trim() || "auto";
  q.set("n_epochs", epochs);
  if ($("validation-file").value) q.set("validation_file", $("validation-file").value);
  try {
    fill($("estimate"), estimateView(await getJSON(`/ui/api/estimate?${q}`)));
  } catch (error) {
    fill($("estimate"), h("p", { className: "error" }, error.message));
  }
}

async function useFile(file, keepFamily = false) {
  if (!keepFamily) { $("family").value = ""; $("method").value = ""; }
  state.file = file;
  state.report = null;
  showError($("error"), null);
  try {
    await showReport();
  } catch (error) {
    showError($("error"), error);
    status("");
  }
}

async function upload(file, forValidation = false) {
  if (!file) return null;
  status(`Uploading ${file.name} (${number(file.size)} bytes)…`);
  try {
    const uploaded = await uploadFile(file);
    status(`Uploaded ${uploaded.filename} as ${uploaded.id}.`);
    await loadChoices(forValidation ? undefined : uploaded.id);
    return uploaded;
  } catch (error) {
    showError($("error"), error);
    status("");
    return null;
  }
}

// drag and drop, or the file input (the drop zone is its label, so the keyboard reaches it)
const zone = $("dropzone");
for (const name of ["dragenter", "dragover"]) zone.addEventListener(name, (e) => { e.preventDefault(); zone.classList.add("over"); });
for (const name of ["dragleave", "drop"]) zone.addEventListener(name, () => zone.classList.remove("over"));
zone.addEventListener("drop", async (event) => {
  event.preventDefault();
  const file = event.dataTransfer.files[0];
  const uploaded = await upload(file);
  if (uploaded) await useFile(uploaded);
});
$("train-input").addEventListener("change", async () => {
  const uploaded = await upload($("train-input").files[0]);
  $("train-input").value = "";
  if (uploaded) await useFile(uploaded);
});
$("existing").addEventListener("change", async () => {
  const id = $("existing").value;
  if (!id) return;
  await useFile(await getJSON(`/v1/files/${encodeURIComponent(id)}`));
});
$("validation-input").addEventListener("change", async () => {
  const uploaded = await upload($("validation-input").files[0], true);
  $("validation-input").value = "";
  if (uploaded) { $("validation-file").value = uploaded.id; await showEstimate(); }
});
$("family").addEventListener("change", () => state.file && useFile(state.file, true));
$("method").addEventListener("change", () => state.file && useFile(state.file, true));

// ---- the grader (method reinforcement): validated and tried through the graders API --------------------------
function graderObject() {
  try {
    return JSON.parse($("grader").value);
  } catch (error) {
    throw new Error(`The grader is not JSON: ${error.message}`);
  }
}

async function firstLine() {
  const response = await api(`/v1/files/${encodeURIComponent(state.file.id)}/content`);
  if (!response.ok) throw new Error(`cannot read ${state.file.filename} (${response.status})`);
  const line = (await response.text()).split("\n").find((text) => text.trim());
  return JSON.parse(line);
}

$("grader-validate").addEventListener("click", async () => {
  try {
    await postJSON("/v1/fine_tuning/alpha/graders/validate", { grader: graderObject() });
    $("grader-result").textContent = "The grader is valid.";
  } catch (error) {
    $("grader-result").textContent = error.message;
  }
});

$("grader-try").addEventListener("click", async () => {
  try {
    const result = await postJSON("/v1/fine_tuning/alpha/graders/run",
      { grader: graderObject(), model_sample: $("grader-sample").value, item: await firstLine() });
    const flags = Object.entries(result.metadata.errors).filter(([, v]) => v === true).map(([k]) => k);
    const subs = Object.entries(result.sub_rewards || {}).map(([k, v]) => `${k} ${number(v)}`).join(", ");
    $("grader-result").textContent = `reward ${number(result.reward)}${subs ? ` (${subs})` : ""}` +
      (flags.length ? `; errors: ${flags.join(", ")}` : "");
  } catch (error) {
    $("grader-result").textContent = error.message;
  }
});
$("n_epochs").addEventListener("change", showEstimate);
$("validation-file").addEventListener("change", showEstimate);

function hyperparameter(name, parse) {
  const raw = $(name).value.trim();
  if (!raw || raw === "auto") return undefined;
  const value = parse(raw);
  if (!Number.isFinite(value) || value <= 0) throw new Error(`${name}: use auto or a positive number (got ${raw})`);
  return value;
}

$("job-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  showError($("form-error"), null);
  if (!state.file) return;
  let body;
  try {
    const hyperparameters = {};
    const epochs = hyperparameter("n_epochs", (v) => (/^\d+$/.test(v) ? Number(v) : NaN));
    const batch = hyperparameter("batch_size", (v) => (/^\d+$/.test(v) ? Number(v) : NaN));
    const lr = hyperparameter("learning_rate_multiplier", Number);
    if (epochs !== undefined) hyperparameters.n_epochs = epochs;
    if (batch !== undefined) hyperparameters.batch_size = batch;
    if (lr !== undefined) hyperparameters.learning_rate_multiplier = lr;
    const method = chosenMethod();
    body = { model: $("family").value || state.report.family, training_file: state.file.id };
    if (method === "supervised") body.hyperparameters = hyperparameters;
    else body.method = { type: method, [method]: { hyperparameters, ...(method === "reinforcement" ? { grader: graderObject() } : {}) } };
    if ($("suffix").value.trim()) body.suffix = $("suffix").value.trim();
    if ($("validation-file").value) body.validation_file = $("validation-file").value;
    if ($("seed").value.trim()) body.seed = Number($("seed").value.trim());
  } catch (error) {
    showError($("form-error"), error);
    return;
  }
  $("submit").disabled = true;
  try {
    const job = await postJSON("/v1/fine_tuning/jobs", body);
    location.assign(`/jobs/${encodeURIComponent(job.id)}`);
  } catch (error) {
    showError($("form-error"), error);
    $("submit").disabled = false;
  }
});

(async () => {
  try {
    const preset = new URLSearchParams(location.search).get("file");
    await loadChoices(preset || undefined);
    if (preset) await useFile(await getJSON(`/v1/files/${encodeURIComponent(preset)}`));
  } catch (error) {
    showError($("error"), error);
  }
})();
