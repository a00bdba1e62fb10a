// The JSON API, as the page uses it: the key, requests and their errors, event streams, images and downloads.
// `<img src>` and EventSource can't send an Authorization header, so images and event streams are read with fetch.

const KEY_STORAGE = "minidalle.key";

export function getKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

export function setKey(key) {
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
  images.clear(); // another key may see other images
}

function authHeaders(extra = {}) {
  const key = getKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
}

// An answer that is not 2xx. `field` is the request field it names (422 `loc`, or "field: …" details), if any.
export class ApiError extends Error {
  constructor(status, detail, retryAfter = null) {
    const problems = ApiError.problems(detail);
    super(problems.map((p) => (p.field && !p.message.startsWith(p.field) ? `${p.field}: ${p.message}` : p.message))
      .join("; ") || `HTTP ${status}`);
    this.status = status;
    this.problems = problems;
    this.retryAfter = retryAfter;
  }

  // [{field, message}] from FastAPI's 422 list or a "field: message" string.
  static problems(detail) {
    if (Array.isArray(detail)) {
      return detail.map((d) => {
        const loc = (d.loc || []).filter((p, i) => !(i === 0 && ["body", "query", "path"].includes(p)));
        return { field: loc.join(".") || null, message: String(d.msg || "") };
      });
    }
    if (typeof detail === "string") {
      const m = /^([a-z_]+(?:\.[\w]+)*): /.exec(detail);
      return [{ field: m ? m[1] : null, message: detail }];
    }
    return [];
  }

  // What to tell a person, with the status's meaning.
  get summary() {
    if (this.status === 401) return getKey() ? `The API key was refused: ${this.message}` :
      "This service needs an API key: paste yours in the “API key” field at the top.";
    if (this.status === 429) {
      const wait = this.retryAfter ? ` Try again in ${this.retryAfter} s.` : "";
      return `Too busy right now: ${this.message}.${wait}`;
    }
    if (this.status === 413) return `Too large: ${this.message}`;
    if (this.status === 0) return `The service can't be reached (${this.message}).`;
    return this.message;
  }
}

const listeners = { unauthorized: [] };
export function onUnauthorized(fn) {
  listeners.unauthorized.push(fn);
}

async function raiseFor(resp) {
  let detail = null;
  try {
    detail = (await resp.json()).detail;
  } catch {
    detail = resp.statusText;
  }
  const err = new ApiError(resp.status, detail, resp.headers.get("Retry-After"));
  if (resp.status === 401) listeners.unauthorized.forEach((fn) => fn(err));
  return err;
}

// fetch with the key; throws ApiError unless the answer is 2xx.
export async function request(method, path, { json, form, signal } = {}) {
  const opts = { method, headers: authHeaders(), signal, cache: "no-store" };
  if (json !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(json);
  } else if (form !== undefined) {
    opts.body = form; // the browser writes the multipart boundary
  }
  let resp;
  try {
    resp = await fetch(path, opts);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, String(e.message || e));
  }
  if (!resp.ok) throw await raiseFor(resp);
  return resp;
}

export async function getJson(path, opts) {
  return (await request("GET", path, opts)).json();
}

export async function sendJson(method, path, json) {
  const resp = await request(method, path, { json });
  return resp.status === 204 ? null : resp.json();
}

export async function postForm(path, form) {
  return (await request("POST", path, { form })).json();
}

// ---- Server-Sent Events over fetch ----------------------------------------------------------------------------
const FINAL = new Set(["succeeded", "failed", "cancelled"]);

// Parses text/event-stream (WHATWG): feed it text, it calls emit(type, data string, id) per event.
export class SseParser {
  constructor(emit) {
    this.emit = emit;
    this.buffer = "";
    this.afterCR = false;
    this.reset();
  }

  reset() {
    this.type = "";
    this.data = [];
    this.id = null;
  }

  feed(text) {
    if (this.afterCR && text.startsWith("\n")) text = text.slice(1); // a "\r\n" split across two chunks
    this.afterCR = text.endsWith("\r");
    this.buffer += text;
    const lines = this.buffer.split(/\r\n|\r|\n/);
    this.buffer = lines.pop(); // an unfinished line
    for (const line of lines) this.line(line);
  }

  line(line) {
    if (line === "") {
      if (this.data.length) this.emit(this.type || "message", this.data.join("\n"), this.id);
      this.reset();
      return;
    }
    if (line.startsWith(":")) return; // a comment: keep-alive ping
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.type = value;
    else if (field === "data") this.data.push(value);
    else if (field === "id") this.id = value;
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Follows a job's events until its final one: onEvent(type, data object). A dropped stream is resumed where it
// stopped (Last-Event-ID). Resolves with the final event's type; rejects with ApiError (401, 404, …).
export async function followEvents(url, onEvent, { signal } = {}) {
  let lastId = null;
  for (let attempt = 0; ; attempt++) {
    const headers = authHeaders({ Accept: "text/event-stream" });
    if (lastId) headers["Last-Event-ID"] = lastId;
    let final = null;
    try {
      const resp = await fetch(url, { headers, signal, cache: "no-store" });
      if (!resp.ok) {
        const err = await raiseFor(resp);
        if (resp.status !== 429 && resp.status < 500) throw err;
        await sleep(1000 * Math.min(30, Number(err.retryAfter) || 2));
        continue;
      }
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      const parser = new SseParser((type, data, id) => {
        if (id) lastId = id;
        let parsed = {};
        try {
          parsed = data ? JSON.parse(data) : {};
        } catch {
          parsed = { raw: data };
        }
        onEvent(type, parsed);
        if (FINAL.has(type)) final = type;
      });
      while (final === null) {
        const { value, done } = await reader.read();
        if (done) break;
        parser.feed(value);
      }
      if (final !== null) {
        reader.cancel().catch(() => {});
        return final;
      }
    } catch (e) {
      if (e instanceof ApiError || e.name === "AbortError") throw e;
    }
    if (attempt >= 20) throw new ApiError(0, "the event stream kept dropping");
    await sleep(Math.min(5000, 250 * 2 ** Math.min(attempt, 4)));
  }
}

// ---- images and downloads -------------------------------------------------------------------------------------
const images = new Map(); // url -> Promise<object URL>

// An object URL for an image the API serves (fetched once with the key).
export function imageUrl(url) {
  if (!images.has(url)) {
    const p = request("GET", url).then((r) => r.blob()).then((b) => URL.createObjectURL(b));
    p.catch(() => images.delete(url));
    images.set(url, p);
  }
  return images.get(url);
}

// Fetches a file with the key and hands it to the browser as a download.
export async function download(url, fallbackName) {
  const resp = await request("GET", url);
  const disposition = resp.headers.get("Content-Disposition") || "";
  const m = /filename\*?=(?:UTF-8'')?"?([^";]+)"?/i.exec(disposition);
  const name = m ? decodeURIComponent(m[1]) : fallbackName;
  const blob = await resp.blob();
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 60_000);
  return name;
}
