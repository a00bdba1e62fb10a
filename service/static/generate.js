// Generate: the form (every field of POST /generate, adapters from GET /adapters with scales), a live card per
// job (progress over Server-Sent Events, images as they arrive), and the gallery with "use these settings again".
import { ApiError, followEvents, getJson, postForm, sendJson } from "./api.js";
import { $, $$, apiImage, applyParams, clearErrors, el, fieldValue, plural, show, showErrors } from "./ui.js";

const FIELDS = ["prompt", "negative_prompt", "num_images", "num_inference_steps", "guidance_scale", "seed", "width",
  "height", "scheduler", "prior", "prior_num_inference_steps", "prior_guidance_scale", "ip_adapter_scale",
  "webhook_url", "webhook_progress"];
// what POST /variations takes besides the image (a form: its values as text); the prior is the image's own
const VARIATION_FIELDS = ["prompt", "negative_prompt", "num_images", "num_inference_steps", "guidance_scale", "seed",
  "width", "height", "scheduler", "ip_adapter_scale", "webhook_url"];
const MAX_LIVE_CARDS = 8; // older finished ones leave (the gallery keeps their images)
let adapterDefault = 1.0;
let known = []; // adapters this key may use (GET /adapters)
let onJobEnded = () => {};

export function setup({ params, jobEnded }) {
  onJobEnded = jobEnded;
  applyParams("gen-", params.generate);
  adapterDefault = params.generate.scale ? params.generate.scale.default : 1.0;
  const native = params.native_size;
  if (native) for (const side of ["width", "height"]) $(`#gen-${side}`).placeholder = `${native} (native)`;
  $("#generate-form").addEventListener("submit", (e) => {
    e.preventDefault();
    submit();
  });
  $("#gen-adapter-add").addEventListener("click", () => {
    const name = $("#gen-adapter-choice").value;
    if (name) addAdapterRow(name, adapterDefault);
  });
}

// The adapters the form offers (after GET /adapters).
export function setAdapters(list) {
  known = list;
  const choice = $("#gen-adapter-choice");
  choice.replaceChildren(...(list.length ? list.map((a) => el("option", {
    value: a.name, text: a.mine ? a.name : `${a.name} (shared)`,
  })) : [el("option", { value: "", text: "(no adapters yet)" })]));
}

function addAdapterRow(name, scale) {
  const rows = $("#gen-adapters");
  if ($$("li", rows).some((li) => li.dataset.name === name)) return; // once: the API refuses a name twice
  const i = rows.children.length;
  const id = `gen-adapter-scale-${name}`;
  const li = el("li", { class: "row" },
    el("span", { class: "adapter-name", text: name }),
    el("label", { for: id, text: "scale" }),
    el("input", { id, type: "number", step: "0.05", value: String(scale), "data-type": "float",
      "aria-label": `Scale of ${name}` }),
    el("button", { type: "button", class: "quiet", "aria-label": `Remove ${name}`, text: "Remove",
      onclick: () => li.remove() }));
  li.dataset.name = name;
  li.dataset.index = String(i);
  rows.append(li);
}

// The JSON body of POST /generate from the form.
function body() {
  const out = {};
  for (const name of FIELDS) {
    const v = fieldValue($(`#gen-${name}`));
    if (v !== undefined && !(name === "webhook_progress" && v === false)) out[name] = v;
  }
  out.prompt = $("#gen-prompt").value; // sent as typed: the API says when it is blank
  out.adapters = $$("#gen-adapters li").map((li) => ({
    name: li.dataset.name, scale: fieldValue($("input", li)) ?? adapterDefault,
  }));
  return out;
}

// `adapters.1.scale` -> that row's input.
function resolveField(field) {
  const m = /^adapters\.(\d+)(?:\.(\w+))?/.exec(field);
  if (!m) return null;
  const li = $$("#gen-adapters li")[Number(m[1])];
  return li ? $("input", li) : $("#gen-adapter-choice");
}

async function submit() {
  const form = $("#generate-form");
  const button = $("#generate-submit");
  clearErrors(form);
  button.disabled = true;
  const req = body();
  const image = $("#gen-file").files[0];
  try {
    let accepted;
    if (image) { // variations: a multipart form with the image
      const form = new FormData();
      form.append("file", image);
      for (const name of VARIATION_FIELDS) {
        if (req[name] !== undefined && req[name] !== "") form.append(name, String(req[name]));
      }
      accepted = await postForm("/variations", form);
    } else {
      accepted = await sendJson("POST", "/generate", req);
    }
    follow(accepted.job_id, image && !req.prompt.trim() ? { ...req, prompt: `variations of ${image.name}` } : req);
  } catch (e) {
    showErrors(form, "gen-", e, resolveField);
  } finally {
    button.disabled = false;
  }
}

// Fills the form with a request (and the seed of one image of it, which then reproduces that image alone).
export function fill(req, { seed, numImages } = {}) {
  for (const name of FIELDS) {
    const input = $(`#gen-${name}`);
    const v = req[name];
    if (input.type === "checkbox") input.checked = Boolean(v);
    else input.value = v === null || v === undefined ? "" : String(v);
  }
  if (seed !== undefined) $("#gen-seed").value = String(seed);
  if (numImages !== undefined) $("#gen-num_images").value = String(numImages);
  $("#gen-adapters").replaceChildren();
  for (const a of req.adapters || []) addAdapterRow(a.name, a.scale);
  clearErrors($("#generate-form"));
}

// ---- live cards -----------------------------------------------------------------------------------------------
// A card for one job, following its events: a progress bar, then its images in their slots as they arrive.
export function follow(jobId, req) {
  show($("#live-empty"), false);
  const card = $("#tpl-live").content.firstElementChild.cloneNode(true);
  card.dataset.jobId = jobId;
  card.id = `live-${jobId}`;
  $(".job-title", card).textContent = req.prompt;
  const state = $(".state", card);
  const bar = $("progress", card);
  bar.setAttribute("aria-label", `Progress of “${req.prompt}”`);
  const status = $(".status", card);
  const cancel = $(".job-cancel", card);
  const slots = $(".slots", card);
  const n = req.num_images || 1;
  for (let i = 0; i < n; i++) slots.append(el("div", { class: "slot", "data-index": String(i), text: `#${i + 1}` }));
  const setState = (s) => {
    state.textContent = s;
    state.className = `state ${s}`;
    card.dataset.state = s;
  };
  setState("queued");
  cancel.addEventListener("click", () => cancelJob(jobId, status));
  $("#live").prepend(card);
  for (const old of $$("#live > .job[data-ended]").slice(MAX_LIVE_CARDS - 1)) old.remove();
  followEvents(`/jobs/${jobId}/events`, (type, data) => {
    if (type === "started") setState("running");
    else if (type === "progress") {
      setState("running");
      bar.max = data.total;
      bar.value = data.step;
      const eta = data.eta_s ? ` · about ${data.eta_s.toFixed(1)} s left` : "";
      status.textContent = `step ${data.step}/${data.total}${eta}`;
    } else if (type === "image") {
      const slot = $(`.slot[data-index="${data.index}"]`, slots) || slots.appendChild(el("div", { class: "slot" }));
      slot.replaceChildren(apiImage(data.url, { alt: `${req.prompt}, seed ${data.seed}`, target: 160 }),
        el("span", { class: "seed", text: `seed ${data.seed}` }));
      slot.classList.add("filled");
    } else if (type === "succeeded") {
      setState("succeeded");
      const images = (data.result && data.result.images) || [];
      status.textContent = `done: ${plural(images.length, "image")}`;
    } else if (type === "failed") {
      setState("failed");
      status.textContent = data.error || "failed";
    } else if (type === "cancelled") {
      setState("cancelled");
      status.textContent = "cancelled";
    }
  }).catch((e) => {
    status.textContent = e instanceof ApiError ? e.summary : String(e);
  }).finally(() => {
    cancel.hidden = true;
    card.dataset.ended = "1";
    for (const slot of $$(".slot:not(.filled)", slots)) slot.classList.add("empty");
    onJobEnded();
  });
  return card;
}

export async function cancelJob(jobId, statusNode) {
  try {
    const r = await sendJson("POST", `/jobs/${jobId}/cancel`);
    if (statusNode) statusNode.textContent = r.detail;
    return r;
  } catch (e) {
    if (statusNode) statusNode.textContent = e instanceof ApiError ? e.summary : String(e);
    return null;
  }
}

// ---- gallery --------------------------------------------------------------------------------------------------
export async function loadGallery() {
  const grid = $("#gallery");
  let jobs;
  try {
    jobs = (await getJson("/jobs?kind=generate&state=succeeded&limit=50")).jobs;
  } catch (e) {
    grid.replaceChildren(el("p", { class: "error", text: e instanceof ApiError ? e.summary : String(e) }));
    return;
  }
  const cards = [];
  for (const job of jobs) {
    for (const image of (job.result && job.result.images) || []) cards.push(photo(job, image));
  }
  grid.replaceChildren(...cards);
  show($("#gallery-empty"), cards.length === 0);
}

function photo(job, image) {
  const card = $("#tpl-photo").content.firstElementChild.cloneNode(true);
  const meta = image.metadata || {};
  const req = job.request || {};
  card.dataset.jobId = job.id;
  card.dataset.seed = String(image.seed);
  $(".frame", card).append(apiImage(image.url, { alt: `${req.prompt}, seed ${image.seed}`, target: 192 }));
  $(".prompt", card).textContent = req.prompt;
  const adapters = (meta.adapters || req.adapters || []).map((a) => Array.isArray(a) ? `${a[0]} × ${a[1]}` :
    `${a.name} × ${a.scale}`);
  const rows = [["seed", image.seed], ["steps", meta.steps ?? req.num_inference_steps],
    ["guidance", meta.guidance_scale ?? req.guidance_scale], ["size", meta.width ? `${meta.width}×${meta.height}` : ""],
    ["scheduler", meta.scheduler || req.scheduler], ["negative", meta.negative_prompt || req.negative_prompt],
    ["adapters", adapters.join(", ")], ["model", meta.model]];
  const dl = $(".params", card);
  for (const [k, v] of rows) {
    if (v === undefined || v === null || v === "") continue;
    dl.append(el("dt", { text: k }), el("dd", { text: String(v) }));
  }
  const reuse = $(".reuse", card);
  reuse.setAttribute("aria-label", `Use these settings again: ${req.prompt}, seed ${image.seed}`);
  reuse.addEventListener("click", () => {
    fill(req, { seed: image.seed, numImages: 1 });
    document.dispatchEvent(new CustomEvent("minidalle:tab", { detail: "generate" }));
    $("#gen-prompt").focus();
  });
  return card;
}
