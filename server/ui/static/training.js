// Training: submit a job (JSONL file or pasted lines, sent as the upload route's `data` file so the
// server's own parser and messages apply), the jobs list, and one job watched live: progress bar and
// loss curve redrawn from GET /v1/training/jobs/{id} (its loss_history) every POLL_MS while it runs.

import { api, withQuery } from "./api.js";
import { drawLossChart } from "./chart.js";
import { $, h, showError, toast } from "./dom.js";

const POLL_MS = 400;
const LIST_EVERY = 5; // polls between jobs-list refreshes while a job runs
const ACTIVE = new Set(["queued", "running"]);

function shortId(id) {
  return id.length > 14 ? `${id.slice(0, 12)}…` : id;
}

function targets() {
  return $("train-targets").value.split(",").map((s) => s.trim()).filter(Boolean);
}

function examples() {
  const file = $("train-file").files[0];
  if (file) return file;
  const text = $("train-text").value.trim();
  if (!text) throw new Error("give the examples: choose a JSONL file or paste JSONL lines");
  return new Blob([`${text}\n`], { type: "application/jsonl" });
}

export function initTraining(ctx) {
  const tbody = $("jobs-table").querySelector("tbody");
  let watched = null; // job id shown in the job card
  let timer = 0;
  let polls = 0;
  let lastStatus = null; // of the watched job: a change refreshes the list at once

  async function loadList() {
    showError($("jobs-error"), null);
    try {
      const list = await api(withQuery("/v1/training/jobs", { tenant: ctx.viewTenant(), limit: 50 }));
      tbody.replaceChildren(...list.data.map(row));
      $("jobs-empty").hidden = list.data.length > 0;
      if (ctx.me.admin) ctx.emit("tenants-seen", list.data.map((j) => j.tenant));
    } catch (err) {
      showError($("jobs-error"), err);
    }
  }

  function row(job) {
    const { step, steps } = job.progress;
    return h("tr", { dataset: { job: job.id } },
      h("th", { scope: "row", dataset: { label: "Job" } }, h("code", { title: job.id }, shortId(job.id))),
      h("td", { class: "admin-only", dataset: { label: "Tenant" } }, job.tenant),
      h("td", { dataset: { label: "Adapter" } }, job.adapter_id),
      h("td", { dataset: { label: "Status" } }, job.status),
      h("td", { dataset: { label: "Progress" } }, h("span", {},
        h("progress", { max: steps, value: step, "aria-label": `${job.adapter_id}: step ${step} of ${steps}` }),
        ` ${step}/${steps}`)),
      h("td", { dataset: { label: "Loss" } }, job.loss === null ? "–" : job.loss.toPrecision(4)),
      h("td", { dataset: { label: "Actions" } }, h("div", { class: "actions" },
        h("button", { type: "button", "aria-label": `Watch job ${job.id}`, onclick: () => watch(job.id) }, "Watch"),
        ACTIVE.has(job.status)
          ? h("button", { type: "button", class: "danger", "aria-label": `Cancel job ${job.id}`,
                          onclick: () => cancel(job.id) }, "Cancel")
          : null)));
  }

  function render(job) {
    const { step, steps } = job.progress;
    tbody.querySelector(`tr[data-job="${CSS.escape(job.id)}"]`)?.replaceWith(row(job)); // the list keeps up
    $("job-card").hidden = false;
    $("job-title").textContent = `Job ${shortId(job.id)} → ${job.adapter_id}`;
    $("job-card").dataset.status = job.status;
    $("job-status").textContent = `${job.status} · step ${step} of ${steps}`
      + (job.loss === null ? "" : ` · loss ${job.loss.toPrecision(4)}`);
    const bar = $("job-progress");
    bar.max = steps;
    bar.value = step;
    drawLossChart($("loss-chart"), job.loss_history ?? [], steps);
    $("job-cancel").hidden = !ACTIVE.has(job.status);
    const tryIt = $("job-try");
    tryIt.hidden = !(job.status === "succeeded" && job.tenant === ctx.me.tenant);
    tryIt.href = `#playground?adapter=${encodeURIComponent(job.adapter_id)}`;
    showError($("job-error"), job.error ? { message: job.error } : null);
  }

  async function poll() {
    clearTimeout(timer);
    if (!watched) return;
    const id = watched;
    try {
      const job = await api(`/v1/training/jobs/${encodeURIComponent(id)}`);
      if (id !== watched) return;
      render(job);
      polls += 1;
      const changed = job.status !== lastStatus;
      lastStatus = job.status;
      if (ACTIVE.has(job.status)) {
        if (changed || polls % LIST_EVERY === 0) loadList();
        timer = setTimeout(poll, POLL_MS);
      } else {
        loadList();
        if (job.status === "succeeded") ctx.emit("adapters-changed");
      }
    } catch (err) {
      showError($("job-error"), err);
    }
  }

  function watch(id) {
    watched = id;
    polls = 0;
    lastStatus = null;
    poll();
    $("job-card").scrollIntoView({ block: "nearest" });
  }

  async function cancel(id) {
    try {
      const job = await api(`/v1/training/jobs/${encodeURIComponent(id)}/cancel`, { method: "POST" });
      toast(job.status === "cancelled" ? "Job cancelled" : "Cancelling: the job stops before its next step");
    } catch (err) {
      showError($("jobs-error"), err);
    }
    if (id === watched) poll();
    loadList();
  }

  $("train-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    showError($("train-error"), null);
    const spec = {
      adapter_id: $("train-id").value.trim(),
      method: $("train-method").value,
      rank: Number($("train-rank").value),
      steps: Number($("train-steps").value),
      learning_rate: Number($("train-lr").value),
      batch_size: Number($("train-batch").value),
      target_modules: targets(),
    };
    try {
      const form = new FormData();
      form.append("spec", JSON.stringify(spec));
      form.append("data", examples(), "examples.jsonl");
      const job = await api("/v1/training/jobs/upload", { method: "POST", body: form });
      toast(`Job ${shortId(job.id)} queued`);
      watch(job.id);
      loadList();
    } catch (err) {
      showError($("train-error"), err);
    }
  });

  $("job-cancel").addEventListener("click", () => watched && cancel(watched));
  $("jobs-refresh").addEventListener("click", loadList);
  ctx.on("tenant", loadList);
  return { show: loadList };
}
