// Adapters: the tenant's list with usage from /metrics, upload with a progress bar, delete, merge.

import { api, adapterUsage, upload, withQuery } from "./api.js";
import { $, bytes, h, showError, toast } from "./dom.js";

function adapterPath(record, suffix = "") {
  return withQuery(`/v1/adapters/${encodeURIComponent(record.id)}${suffix}`, { tenant: record.tenant });
}

export function initAdapters(ctx) {
  const tbody = $("adapters-table").querySelector("tbody");
  let loading = null;
  let again = false; // a refresh asked for while one runs: run once more after it (the view may have changed)

  async function usage() {
    try {
      return adapterUsage(await api("/metrics"));
    } catch {
      return {}; // usage is a bonus: the list still shows without it
    }
  }

  function cell(label, ...content) {
    return h("td", { dataset: { label } }, ...content);
  }

  function actions(record) {
    const merged = record.mode === "merged";
    const own = record.tenant === ctx.me.tenant;
    return cell("Actions", h("div", { class: "actions" },
      h("button", { type: "button", "aria-label": `${merged ? "Unmerge" : "Merge"} ${record.id}`,
                    onclick: () => act(record, merged ? "DELETE" : "POST") }, merged ? "Unmerge" : "Merge"),
      h("button", { type: "button", class: "danger", "aria-label": `Delete ${record.id}`,
                    onclick: () => remove(record) }, "Delete"),
      own ? h("a", { class: "button", href: `#playground?adapter=${encodeURIComponent(record.id)}` }, "Try") : null));
  }

  function row(record, use) {
    const u = use[`${record.tenant}/${record.id}`] ?? { requests: 0, tokens: 0 };
    const type = record.variant ? `${record.type} (${record.variant})` : record.type;
    return h("tr", { dataset: { adapter: record.id, tenant: record.tenant } },
      h("th", { scope: "row", dataset: { label: "Id" } }, record.id),
      h("td", { class: "admin-only", dataset: { label: "Tenant" } }, record.tenant),
      cell("Type", type), cell("Rank", String(record.rank ?? "–")),
      cell("Targets", (record.target_modules ?? []).join(", ")),
      cell("Size", bytes(record.size_bytes)), cell("Version", String(record.version)),
      cell("Mode", record.mode ?? "unmerged"), cell("Resident", record.resident ? "yes" : "no"),
      cell("Requests", String(u.requests)), cell("Tokens", String(u.tokens)), actions(record));
  }

  async function load() {
    showError($("adapters-error"), null);
    try {
      const [list, use] = await Promise.all([api(withQuery("/v1/adapters", { tenant: ctx.viewTenant() })), usage()]);
      const records = list.data;
      tbody.replaceChildren(...records.map((r) => row(r, use)));
      $("adapters-empty").hidden = records.length > 0;
      const base = use[`${ctx.viewTenant() || ctx.me.tenant}/_base`];
      $("base-usage").textContent = base ? `Base model: ${base.requests} requests, ${base.tokens} tokens.` : "";
      if (ctx.me.admin) ctx.emit("tenants-seen", records.map((r) => r.tenant));
    } catch (err) {
      showError($("adapters-error"), err);
    }
  }

  function refresh() {
    if (loading) {
      again = true;
      return loading;
    }
    loading = load().finally(() => {
      loading = null;
      if (again) {
        again = false;
        refresh();
      }
    });
    return loading;
  }

  async function act(record, method) {
    showError($("adapters-error"), null);
    try {
      await api(adapterPath(record, "/merge"), { method });
      toast(`${record.id}: ${method === "POST" ? "merged" : "unmerged"}`);
    } catch (err) {
      showError($("adapters-error"), err);
    }
    await refresh();
  }

  async function remove(record) {
    if (!window.confirm(`Delete adapter "${record.id}" of tenant ${record.tenant}? This cannot be undone.`)) return;
    showError($("adapters-error"), null);
    try {
      await api(adapterPath(record), { method: "DELETE" });
      toast(`Deleted ${record.id}`);
      ctx.emit("adapters-changed");
    } catch (err) {
      showError($("adapters-error"), err);
    }
    await refresh();
  }

  $("upload-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const id = $("upload-id").value.trim();
    const form = new FormData();
    form.append("config", $("upload-config").files[0]);
    form.append("weights", $("upload-weights").files[0]);
    const bar = $("upload-progress");
    bar.hidden = false;
    bar.value = 0;
    showError($("upload-error"), null);
    const submit = e.target.querySelector("button[type=submit]");
    submit.disabled = true;
    try {
      const path = withQuery(`/v1/adapters/${encodeURIComponent(id)}`, { tenant: ctx.writeTenant() });
      const record = await upload(path, form, (f) => { bar.value = Math.round(f * 100); });
      bar.value = 100;
      toast(`Uploaded ${record.id} (version ${record.version})`);
      e.target.reset();
      ctx.emit("adapters-changed");
      await refresh();
    } catch (err) {
      bar.hidden = true;
      showError($("upload-error"), err);
    } finally {
      submit.disabled = false;
    }
  });

  $("adapters-refresh").addEventListener("click", refresh);
  ctx.on("tenant", refresh);
  ctx.on("adapters-changed", refresh);
  return { show: refresh };
}
