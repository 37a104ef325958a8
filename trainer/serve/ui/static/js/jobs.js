// The jobs list: GET /ui/api/jobs (the API's list, with a status filter), paged by after/limit, every 2 s.
import { getJSON } from "./api.js";
import { $, badge, duration, familyOf, fill, h, number, patchRows, poll, showError, startPage, when } from "./util.js";

startPage();
const params = new URLSearchParams(location.search);
const state = {
  status: params.get("status") || "",
  limit: Number(params.get("limit")) || 20,
  cursors: [null], // the `after` of each page seen; the last one is the current page's
};
if (params.get("after")) state.cursors.push(params.get("after"));
$("status").value = state.status;
$("limit").value = String(state.limit);
let lastPage = null;

function query() {
  const q = new URLSearchParams({ limit: state.limit });
  if (state.status) q.set("status", state.status);
  const after = state.cursors[state.cursors.length - 1];
  if (after) q.set("after", after);
  return q;
}

function row(job) {
  const end = job.finished_at || (["running", "queued", "validating_files"].includes(job.status) ? Date.now() / 1000 : null);
  const cells = [
    ["Job", h("a", { href: `/jobs/${encodeURIComponent(job.id)}` }, job.id)],
    ["Status", badge(job.status)],
    ["Family", familyOf(job.model)],
    ["Fine-tuned model", job.fine_tuned_model ? h("code", {}, job.fine_tuned_model) : "—"],
    ["Created", when(job.created_at)],
    ["Trained tokens", number(job.trained_tokens)],
    ["Duration", end ? duration(end - job.created_at) : "—"],
  ];
  return h("tr", { "data-job": job.id, "data-key": job.id }, cells.map(([label, value]) => h("td", { "data-label": label }, value)));
}

async function refresh() {
  const q = query();
  try {
    const page = await getJSON(`/ui/api/jobs?${q}`);
    showError($("error"), null);
    lastPage = page;
    patchRows(document.querySelector("#jobs tbody"), page.data.map(row));
    $("jobs").hidden = !page.data.length;
    $("empty").hidden = Boolean(page.data.length);
    if (state.status && !page.data.length) fill($("empty"), `No ${state.status} jobs on this page.`);
    else if (!page.data.length) fill($("empty"), "No jobs here yet. ", h("a", { href: "/new" }, "Create one"),
      ": drop a training file, check it, see the price, start.");
    $("older").disabled = !page.has_more;
    $("newer").disabled = state.cursors.length < 2;
    $("page-label").textContent = `Page ${state.cursors.length}`;
  } catch (error) {
    showError($("error"), error);
  }
  const shown = new URLSearchParams(q);
  if (state.limit === 20) shown.delete("limit");
  history.replaceState(null, "", shown.toString() ? `/?${shown}` : "/");
}

$("status").addEventListener("change", () => { state.status = $("status").value; state.cursors = [null]; refresh(); });
$("limit").addEventListener("change", () => { state.limit = Number($("limit").value); state.cursors = [null]; refresh(); });
$("filters").addEventListener("submit", (event) => event.preventDefault());
$("older").addEventListener("click", () => {
  if (lastPage && lastPage.data.length) { state.cursors.push(lastPage.data[lastPage.data.length - 1].id); refresh(); }
});
$("newer").addEventListener("click", () => { if (state.cursors.length > 1) { state.cursors.pop(); refresh(); } });
poll(refresh, 2000);
