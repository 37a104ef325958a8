// Uploaded files (GET /ui/api/files: the API's FileObjects with their validation state).
import { download, getJSON } from "./api.js";
import { $, h, number, patchRows, poll, showError, startPage, when } from "./util.js";

startPage();
const checking = new Set();

function validationCell(file) {
  if (file.purpose !== "fine-tune") return h("span", { className: "muted" }, "result file");
  const v = file.validation;
  if (checking.has(file.id)) return h("span", { className: "muted" }, "checking…");
  if (!v) return h("button", { type: "button", className: "small", onclick: () => check(file) }, "Check");
  const text = v.state === "errors" ? `${v.n_errors} error(s)` : v.state === "warnings" ? `ok, ${v.n_warnings} warning(s)` : "ok";
  return h("span", {}, h("span", { className: `badge check-${v.state}` }, text), ` ${number(v.n_examples)} examples · ${v.family}`);
}

async function check(file) {
  checking.add(file.id);
  await refresh();
  try {
    await getJSON(`/ui/api/files/${encodeURIComponent(file.id)}/report`);
  } catch (error) {
    showError($("error"), error);
  }
  checking.delete(file.id);
  await refresh();
}

function row(file) {
  const actions = [h("button", { type: "button", className: "small", onclick: () => download(`/v1/files/${encodeURIComponent(file.id)}/content`, file.filename).catch((e) => showError($("error"), e)) }, "Download")];
  if (file.purpose === "fine-tune") actions.unshift(h("a", { className: "button small", href: `/new?file=${encodeURIComponent(file.id)}` }, "New job"));
  const cells = [
    ["File", file.filename], ["Id", h("code", {}, file.id)], ["Purpose", file.purpose], ["Size", `${number(file.bytes)} bytes`],
    ["Uploaded", when(file.created_at)], ["Validation", validationCell(file)], ["Actions", h("span", { className: "row-actions" }, actions)],
  ];
  return h("tr", { "data-file": file.id, "data-key": file.id }, cells.map(([label, value]) => h("td", { "data-label": label }, value)));
}

let autoChecked = false;

async function refresh() {
  try {
    const listing = await getJSON("/ui/api/files");
    showError($("error"), null);
    patchRows(document.querySelector("#files tbody"), listing.data.map(row));
    $("files").hidden = !listing.data.length;
    $("empty").hidden = Boolean(listing.data.length);
    if (!autoChecked) { // small files are checked at once; large ones on request
      autoChecked = true;
      for (const file of listing.data) {
        if (file.purpose === "fine-tune" && !file.validation && file.bytes < 5e6) check(file);
      }
    }
  } catch (error) {
    showError($("error"), error);
  }
}

poll(refresh, 5000);
