// A validation report (validation.json) and an estimate (estimate.json), as tables.
import { duration, h, number, usd } from "./util.js";

function issueRows(issues) {
  return issues.map((issue) => {
    const [what, ...fix] = String(issue.message).split(" — ");
    return h("tr", { className: "issue" },
      h("td", { "data-label": "File" }, issue.file || ""),
      h("td", { "data-label": "Line" }, issue.line === null || issue.line === undefined ? "—" : `line ${issue.line}`),
      h("td", { "data-label": "Code" }, h("code", {}, issue.code)),
      h("td", { "data-label": "Problem" }, what),
      h("td", { "data-label": "Fix" }, fix.join(" — ") || "—"));
  });
}

function issueTable(title, issues, kind) {
  return h("div", { className: `issues issues-${kind}` },
    h("h3", {}, `${title} (${issues.length})`),
    h("table", { className: "cards" },
      h("thead", {}, h("tr", {}, ["File", "Line", "Code", "Problem", "Fix"].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, issueRows(issues))));
}

function distribution(name, d) {
  if (!d) return null;
  return h("tr", {}, h("th", { scope: "row" }, name), ["min", "mean", "median", "max"].map((k) => h("td", {}, number(Math.round(d[k] * 10) / 10))));
}

export function validationView(validation) {
  if (!validation) return [h("p", { className: "muted" }, "Not validated yet.")];
  const parts = [];
  const verdict = validation.errors.length
    ? h("p", { className: "verdict bad" }, `${validation.errors.length} error(s): a job on this file would fail validation. Fix the lines below and upload again.`)
    : h("p", { className: "verdict good" }, `No format errors${validation.warnings.length ? `; ${validation.warnings.length} warning(s)` : ""}.`);
  parts.push(verdict);
  if (validation.errors.length) parts.push(issueTable("Errors", validation.errors, "errors"));
  if (validation.warnings.length) parts.push(issueTable("Warnings", validation.warnings, "warnings"));
  for (const [kind, stats] of Object.entries(validation.stats || {})) {
    if (!stats || stats.n_examples === undefined) continue;
    parts.push(h("h3", {}, `Statistics: ${kind}`));
    parts.push(h("p", {}, `${number(stats.n_examples)} valid example(s) of ${number(stats.n_lines)} line(s); ${number(stats.n_too_long)} over the context length.`));
    parts.push(h("table", { className: "stats" },
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "per example"), ["min", "mean", "median", "max"].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {},
        distribution("tokens", stats.total_tokens_per_example),
        distribution("assistant tokens", stats.preferred_tokens_per_example ? null : stats.assistant_tokens_per_example),
        distribution("completion tokens", stats.completion_tokens_per_example),
        distribution("prompt tokens", stats.prompt_tokens_per_example),
        distribution("preferred tokens", stats.preferred_tokens_per_example),
        distribution("non-preferred tokens", stats.non_preferred_tokens_per_example),
        distribution("messages", stats.messages_per_example))));
  }
  return parts;
}

export function estimateView(estimate) {
  if (!estimate) return [h("p", { className: "muted" }, "No estimate yet.")];
  const local = estimate.local || {};
  const hosted = [
    ["Training examples", number(estimate.n_examples)],
    ["Billed tokens per epoch", number(estimate.billed_tokens_per_epoch)],
    ["Epochs", number(estimate.n_epochs)],
    ["Billed tokens", number(estimate.billed_tokens)],
    [`Hosted price ($${estimate.training_price_per_1k} / 1K tokens)`, usd(estimate.training_cost_usd)],
    ["Fine-tuned model use, input / output per 1K", `$${estimate.fine_tuned_input_per_1k} / $${estimate.fine_tuned_output_per_1k}`],
  ];
  if (estimate.validation_tokens !== undefined) hosted.push(["Validation tokens (not billed)", number(estimate.validation_tokens)]);
  const here = local.tokens_per_second ? [
    ["Device", local.device],
    ["Throughput", `${number(Math.round(local.tokens_per_second))} tokens/s`],
    ["Wall time", duration(local.wall_time_s)],
    [`Cost ($${local.hour_usd}/h)`, usd(local.cost_usd)],
  ] : [["Local", local.note || "unknown"]];
  const table = (caption, rows) => h("table", { className: "kv" }, h("caption", {}, caption),
    h("tbody", {}, rows.map(([k, v]) => h("tr", {}, h("th", { scope: "row" }, k), h("td", {}, v)))));
  const parts = [h("div", { className: "estimate-pair" },
    table(`Hosted: ${estimate.model} (${estimate.pricing} prices)`, hosted),
    table("Local: this machine", here))];
  if (estimate.over_budget) parts.push(h("p", { className: "error" }, `Over the budget train.max_cost_usd=$${estimate.max_cost_usd}.`));
  return parts;
}
