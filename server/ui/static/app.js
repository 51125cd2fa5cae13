// The console's entry point: sign-in, tabs (keyboard: arrows, Home, End), the admin's tenant
// switch and the hash routes (#adapters, #training, #playground?adapter=ID) that link sections.

import { api, session } from "./api.js";
import { $, h, showError } from "./dom.js";
import { initAdapters } from "./adapters.js";
import { initTraining } from "./training.js";
import { initPlayground } from "./playground.js";

const TABS = ["adapters", "training", "playground"];

/** What every section shares: who is signed in, whose namespace is shown, and change events. */
const ctx = {
  me: null,
  tenant: "", // admins: "" = every tenant; others: always their own (never sent)
  events: new EventTarget(),
  /** The ?tenant= value for reads in the current view (admins only). */
  viewTenant() { return this.me?.admin ? this.tenant : ""; },
  /** The tenant new things (uploads) go to: the chosen one, else the caller's own. */
  writeTenant() { return this.me?.admin && this.tenant ? this.tenant : ""; },
  emit(name, detail) { this.events.dispatchEvent(new CustomEvent(name, { detail })); },
  on(name, fn) { this.events.addEventListener(name, (e) => fn(e.detail)); },
  /** Tenants seen in admin lists, for the switcher. */
  seenTenants: new Set(),
};

const sections = {};

function selectTab(name, focus = false) {
  for (const tab of TABS) {
    const button = $(`tab-${tab}`);
    const on = tab === name;
    button.setAttribute("aria-selected", String(on));
    button.tabIndex = on ? 0 : -1;
    $(`panel-${tab}`).hidden = !on;
    if (on && focus) button.focus();
  }
  sections[name]?.show?.();
}

function route() {
  if (!ctx.me) return; // signed out: the sections stay hidden and load nothing
  const [name, query] = location.hash.slice(1).split("?");
  const tab = TABS.includes(name) ? name : "adapters";
  if (tab === "playground" && query) sections.playground?.preselect(new URLSearchParams(query).getAll("adapter"));
  selectTab(tab);
}

function initTabs() {
  const list = document.querySelector("[role=tablist]");
  list.addEventListener("click", (e) => {
    const tab = e.target.closest("[role=tab]");
    if (!tab) return;
    const name = tab.id.replace("tab-", "");
    history.pushState(null, "", `#${name}`); // no hashchange: the tab switches at once
    selectTab(name);
  });
  list.addEventListener("keydown", (e) => {
    const current = TABS.indexOf(document.activeElement.id.replace("tab-", ""));
    if (current < 0) return;
    const next = { ArrowRight: current + 1, ArrowLeft: current - 1, Home: 0, End: TABS.length - 1 }[e.key];
    if (next === undefined) return;
    e.preventDefault();
    const name = TABS[(next + TABS.length) % TABS.length];
    history.replaceState(null, "", `#${name}`);
    selectTab(name, true);
  });
  window.addEventListener("hashchange", route);
}

function renderTenantPicker() {
  const select = $("tenant-select");
  const keep = ctx.tenant;
  const names = [...ctx.seenTenants, ctx.me.tenant].filter((t, i, all) => all.indexOf(t) === i).sort();
  select.replaceChildren(h("option", { value: "" }, "All tenants"),
                         ...names.map((t) => h("option", { value: t }, t)));
  select.value = keep;
}

function showWho() {
  const { tenant, admin } = ctx.me;
  $("who-text").textContent = admin ? `Admin key (tenant ${tenant})` : `Tenant ${tenant}`;
  $("who").hidden = false;
  $("tenant-pick").hidden = !admin;
  document.body.classList.toggle("is-admin", admin);
  const note = $("admin-note");
  note.hidden = !admin;
  note.textContent = admin
    ? `Admin view: lists, uploads, deletes, merges and job cancels act for the chosen tenant. The API lets `
      + `training jobs and generation run only as the key's own tenant (${tenant}), so the Training form and `
      + `the Playground always use ${tenant}.`
    : "";
  if (admin) renderTenantPicker();
}

async function signIn(key) {
  session.key = key;
  try {
    ctx.me = await api("/v1/me");
  } catch (err) {
    session.clear();
    throw err;
  }
  $("login").hidden = true;
  $("app").hidden = false;
  showWho();
  route(); // shows the section, which loads its data
}

function initLogin() {
  $("login-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    showError($("login-error"), null);
    try {
      await signIn($("api-key").value.trim());
      $("api-key").value = "";
    } catch (err) {
      showError($("login-error"), err);
      $("api-key").focus();
    }
  });
  $("logout").addEventListener("click", () => {
    session.clear();
    location.hash = "";
    location.reload();
  });
  $("tenant-select").addEventListener("change", (e) => {
    ctx.tenant = e.target.value;
    ctx.emit("tenant");
  });
  ctx.on("tenants-seen", (names) => {
    const before = ctx.seenTenants.size;
    for (const n of names) ctx.seenTenants.add(n);
    if (ctx.seenTenants.size !== before && ctx.me?.admin) renderTenantPicker();
  });
}

async function main() {
  initTabs();
  initLogin();
  sections.adapters = initAdapters(ctx);
  sections.training = initTraining(ctx);
  sections.playground = initPlayground(ctx);
  if (session.has()) {
    try {
      await signIn(session.key);
      return;
    } catch (err) {
      showError($("login-error"), err);
    }
  }
  $("api-key").focus();
}

main();
