// Playground: one prompt sent to the base and to each chosen adapter at once, every answer streamed
// token by token into its own column (POST /generate, stream: true), and the same requests as curl
// and Python for the user to run outside the browser.

import { api, streamEvents } from "./api.js";
import { $, h, showError } from "./dom.js";

const BASE = ""; // the base model's target value (adapter_id: null)

function shellQuote(text) {
  return `'${text.replaceAll("'", "'\\''")}'`;
}

function pyValue(v) {
  if (v === null || v === undefined) return "None";
  return JSON.stringify(v); // a JSON string or number is a valid Python literal
}

export function curlSnippet(origin, body) {
  return `curl -N ${origin}/generate \\\n  -H "Authorization: Bearer $LORAPLEX_API_KEY" \\\n`
    + `  -H "Content-Type: application/json" \\\n  -d ${shellQuote(JSON.stringify({ ...body, stream: true }))}`;
}

export function pythonSnippet(origin, body, adapterIds) {
  const { prompt, adapter_id: _, ...options } = body;
  const args = Object.entries(options).map(([k, v]) => `, ${k}=${pyValue(v)}`).join("");
  return [
    "import os",
    "from client import Client  # this repository's client/ package (pip install loraplex)",
    "",
    `with Client(${pyValue(origin)}, api_key=os.environ.get("LORAPLEX_API_KEY")) as c:`,
    `    for adapter_id in [${adapterIds.map(pyValue).join(", ")}]:`,
    "        print(f\"--- {adapter_id or 'base'}\")",
    `        for delta in c.generate_stream(${pyValue(prompt)}, adapter_id=adapter_id${args}):`,
    "            print(delta, end=\"\", flush=True)",
    "        print()",
  ].join("\n");
}

export function initPlayground(ctx) {
  let wanted = new Set();
  let running = null; // AbortController of the run in flight

  function settings() {
    const body = {
      prompt: $("play-prompt").value,
      max_new_tokens: Number($("play-max").value),
      temperature: Number($("play-temp").value),
      top_p: Number($("play-top-p").value),
      top_k: Number($("play-top-k").value),
    };
    if ($("play-seed").value !== "") body.seed = Number($("play-seed").value);
    return body;
  }

  function checkbox(value, label, checked) {
    const id = `play-t-${value || "base"}`.replace(/[^a-zA-Z0-9_-]/g, "_");
    return h("div", { class: "check" },
      h("input", { type: "checkbox", id, value, checked, name: "target" }),
      h("label", { for: id }, label));
  }

  async function loadTargets() {
    try {
      const models = await api("/v1/models");
      const [base, ...adapters] = models.data;
      const prior = new Set([...document.querySelectorAll("#play-target-list input:checked")].map((i) => i.value));
      const first = prior.size === 0 && wanted.size === 0;
      $("play-target-list").replaceChildren(
        checkbox(BASE, `Base model (${base.id})`, first || prior.has(BASE) || wanted.size > 0),
        ...adapters.map((a) => checkbox(a.id, a.id, prior.has(a.id) || wanted.has(a.id))));
      wanted = new Set();
    } catch (err) {
      showError($("play-error"), err);
    }
  }

  function pane(target) {
    const title = target === BASE ? "Base model" : target;
    const out = h("pre", { class: "out", dataset: { chunks: "0" }, "aria-label": `${title} output` });
    const meta = h("p", { class: "meta", role: "status" }, "waiting…");
    const node = h("section", { class: "card pane", dataset: { target: target || "base" } },
      h("h3", {}, title), out, meta);
    return { node, out, meta };
  }

  async function runOne(body, target, view, signal) {
    let chunks = 0;
    try {
      await streamEvents("/generate", { ...body, adapter_id: target || null }, (event) => {
        if (event.text) {
          view.out.textContent += event.text;
          chunks += 1;
          view.out.dataset.chunks = String(chunks);
          view.meta.textContent = "streaming…";
        }
        if (event.finish_reason) {
          const u = event.usage ?? {};
          view.meta.textContent = `${event.finish_reason} · ${u.prompt_tokens ?? "?"} prompt + `
            + `${u.completion_tokens ?? "?"} generated tokens`;
          view.node.dataset.done = "true";
        }
      }, signal);
    } catch (err) {
      view.node.dataset.done = "true";
      view.meta.textContent = err.name === "AbortError" ? "stopped" : "";
      if (err.name !== "AbortError") view.meta.append(h("span", { class: "error", role: "alert" }, err.message));
    }
  }

  $("play-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    showError($("play-error"), null);
    const targets = [...document.querySelectorAll("#play-target-list input:checked")].map((i) => i.value);
    if (!targets.length) {
      showError($("play-error"), { message: "choose the base model or at least one adapter to compare" });
      return;
    }
    const body = settings();
    const views = targets.map(pane);
    $("play-outputs").replaceChildren(...views.map((v) => v.node));
    $("snippet-curl").textContent = targets
      .map((t) => curlSnippet(location.origin, { ...body, adapter_id: t || null })).join("\n\n");
    $("snippet-python").textContent = pythonSnippet(location.origin, body, targets.map((t) => t || null));
    $("play-snippets").hidden = false;
    running?.abort();
    running = new AbortController();
    $("play-stop").disabled = false;
    await Promise.all(targets.map((t, i) => runOne(body, t, views[i], running.signal)));
    $("play-stop").disabled = true;
  });

  $("play-stop").addEventListener("click", () => running?.abort());
  ctx.on("adapters-changed", loadTargets);
  return {
    show: loadTargets,
    preselect(ids) { wanted = new Set(ids); },
  };
}
