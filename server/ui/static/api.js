// The console's only door to the server: every call carries the key kept in sessionStorage,
// and every refusal becomes an ApiError holding the server's own JSON message.

const KEY_ITEM = "loraplex.key";

export class ApiError extends Error {
  constructor(status, type, message) {
    super(message);
    this.status = status;
    this.type = type;
  }
}

export const session = {
  get key() { return sessionStorage.getItem(KEY_ITEM) ?? ""; },
  set key(value) { sessionStorage.setItem(KEY_ITEM, value); },
  clear() { sessionStorage.removeItem(KEY_ITEM); },
  has() { return sessionStorage.getItem(KEY_ITEM) !== null; },
};

function headers(extra = {}) {
  const h = { ...extra };
  if (session.key) h.Authorization = `Bearer ${session.key}`;
  return h;
}

/** `path` with `params` (null/undefined/"" values left out) as the query string. */
export function withQuery(path, params = {}) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== null && v !== undefined && v !== "") q.set(k, String(v));
  }
  const s = q.toString();
  return s ? `${path}?${s}` : path;
}

async function errorOf(response) {
  let type = "http_error";
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error) {
      type = body.error.type ?? type;
      message = body.error.message ?? message;
    }
  } catch { /* not JSON: keep the status line */ }
  return new ApiError(response.status, type, message);
}

/** fetch + JSON; throws ApiError on any non-2xx. `json` is sent as the body. */
export async function api(path, { method = "GET", json, body, signal } = {}) {
  const init = { method, headers: headers(), signal };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (body !== undefined) {
    init.body = body;
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await errorOf(response);
  if (response.status === 204) return null;
  const type = response.headers.get("Content-Type") ?? "";
  return type.includes("json") ? response.json() : response.text();
}

/** Multipart PUT/POST with upload progress (fetch has none): onProgress(fraction 0..1). */
export function upload(path, form, onProgress, method = "PUT") {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open(method, path);
    for (const [k, v] of Object.entries(headers())) xhr.setRequestHeader(k, v);
    xhr.upload.addEventListener("progress", (e) => {
      if (e.lengthComputable) onProgress(e.loaded / e.total);
    });
    xhr.addEventListener("load", () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch { /* empty or not JSON */ }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else reject(new ApiError(xhr.status, body?.error?.type ?? "http_error",
                               body?.error?.message ?? `${xhr.status} ${xhr.statusText}`));
    });
    xhr.addEventListener("error", () => reject(new ApiError(0, "network", "the upload failed: connection lost")));
    xhr.send(form);
  });
}

/** POST `body` with stream: true and call onEvent(parsed JSON) per SSE `data:` event until [DONE]. */
export async function streamEvents(path, body, onEvent, signal) {
  const response = await fetch(path, {
    method: "POST",
    headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
    body: JSON.stringify({ ...body, stream: true }),
    signal,
  });
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const parsed = JSON.parse(data);
        if (parsed.error) throw new ApiError(200, parsed.error.type, parsed.error.message);
        onEvent(parsed);
      }
    }
  }
}

/** Prometheus text → {"tenant/adapter": {requests, tokens}} summed over the other labels. */
export function adapterUsage(text) {
  const usage = {};
  const line = /^loraplex_adapter_(requests|prompt_tokens|generated_tokens)_total\{([^}]*)\}\s+(\S+)/;
  for (const row of text.split("\n")) {
    const m = line.exec(row);
    if (!m) continue;
    const labels = Object.fromEntries([...m[2].matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)].map((x) => [x[1], x[2]]));
    const key = `${labels.tenant}/${labels.adapter}`;
    const entry = (usage[key] ??= { requests: 0, tokens: 0 });
    if (m[1] === "requests") entry.requests += Number(m[3]);
    else entry.tokens += Number(m[3]);
  }
  return usage;
}
