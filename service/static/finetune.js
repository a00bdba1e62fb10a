// Fine-tune: upload a dataset zip with the training settings (multipart POST /finetune), then follow the job: a
// live loss curve from its `progress` events and validation images from its `validation` events.
import { ApiError, followEvents, getJson, postForm } from "./api.js";
import { cancelJob } from "./generate.js";
import { $, apiImage, applyParams, clearErrors, el, fieldValue, show, showErrors, when } from "./ui.js";

const FIELDS = ["name", "steps", "checkpoint_every", "learning_rate", "lr_scheduler", "lr_warmup_steps", "rank",
  "alpha", "dropout", "batch_size", "grad_accum", "resolution", "caption_dropout", "seed", "train_prior",
  "random_flip", "webhook_url", "webhook_progress"];
const SVG = "http://www.w3.org/2000/svg";
let current = null; // {jobId, controller}
let hooks = {};

export function setup({ params, adapterPublished, jobEnded }) {
  hooks = { adapterPublished, jobEnded };
  applyParams("ft-", params.finetune);
  if (params.native_size) $("#ft-resolution").placeholder = `${params.native_size} (native)`;
  $("#finetune-form").addEventListener("submit", (e) => {
    e.preventDefault();
    submit();
  });
  $("#ft-cancel").addEventListener("click", () => current && cancelJob(current.jobId, $("#ft-status")));
}

function form() {
  const data = new FormData();
  const file = $("#ft-file").files[0];
  if (file) data.append("file", file, file.name);
  for (const name of FIELDS) {
    const v = fieldValue($(`#ft-${name}`));
    if (v !== undefined) data.append(name, String(v));
  }
  for (const line of $("#ft-validation_prompts").value.split("\n")) {
    if (line.trim()) data.append("validation_prompts", line.trim());
  }
  return data;
}

async function submit() {
  const f = $("#finetune-form");
  const button = $("#finetune-submit");
  clearErrors(f);
  const file = $("#ft-file").files[0];
  button.disabled = true;
  button.textContent = file ? `Uploading ${(file.size / 1e6).toFixed(1)} MB…` : "Starting…";
  try {
    const accepted = await postForm("/finetune", form());
    watch(accepted.job_id, $("#ft-name").value);
    loadRecent();
  } catch (e) {
    showErrors(f, "ft-", e, (field) => (field.startsWith("validation_prompts") ? $("#ft-validation_prompts") :
      field === "dataset_id" ? $("#ft-file") : null));
  } finally {
    button.disabled = false;
    button.textContent = "Start fine-tune";
  }
}

// ---- the live view ---------------------------------------------------------------------------------------------
// Follows one fine-tune from its first event (a late listener gets the history): its curve fills in at once.
export function watch(jobId, name) {
  if (current) current.controller.abort();
  const controller = new AbortController();
  current = { jobId, controller };
  show($("#ft-empty"), false);
  show($("#ft-live"), true);
  $("#ft-live").dataset.jobId = jobId;
  $("#ft-title").textContent = name || jobId;
  const bar = $("#ft-progress");
  bar.value = 0;
  const status = $("#ft-status");
  status.textContent = "waiting for a worker…";
  const validation = $("#ft-validation");
  validation.replaceChildren();
  show($("#ft-val-empty"), true);
  const done = $("#ft-done");
  done.replaceChildren();
  show(done, false);
  const cancel = $("#ft-cancel");
  cancel.hidden = false;
  const losses = [];
  drawCurve(losses, 1);
  setState("queued");
  let total = 1;
  followEvents(`/jobs/${jobId}/events`, (type, data) => {
    if (current?.jobId !== jobId) return;
    if (type === "started") setState("running");
    else if (type === "progress") {
      setState("running");
      total = data.total;
      bar.max = data.total;
      bar.value = data.step;
      if (typeof data.loss === "number") losses.push([data.step, data.loss]);
      drawCurve(losses, total);
      const bits = [`step ${data.step}/${data.total}`];
      if (typeof data.loss === "number") bits.push(`loss ${data.loss.toFixed(4)}`);
      if (typeof data.diffusion_prior_loss === "number") bits.push(`prior loss ${data.diffusion_prior_loss.toFixed(4)}`);
      if (typeof data.lr === "number") bits.push(`lr ${data.lr.toExponential(1)}`);
      if (data.eta_s) bits.push(`about ${Math.ceil(data.eta_s)} s left`);
      status.textContent = bits.join(" · ");
    } else if (type === "checkpoint") {
      status.textContent = `checkpoint saved at step ${data.step}`;
    } else if (type === "validation") {
      show($("#ft-val-empty"), false);
      const row = el("div", { class: "val-row", "data-step": String(data.step) },
        el("span", { class: "val-step", text: data.step === data.total ? `final (step ${data.step})` :
          `step ${data.step}` }),
        ...(data.images || []).map((url, i) => apiImage(url, { alt: `validation ${i + 1} at step ${data.step}`,
          target: 128 })));
      validation.append(row);
    } else if (type === "succeeded") {
      setState("succeeded");
      const adapter = data.result && data.result.adapter;
      if (adapter) {
        done.replaceChildren(el("span", { text: `Adapter “${adapter.name}” is published. ` }),
          el("button", { type: "button", text: "Use it in Generate",
            onclick: () => hooks.adapterPublished(adapter.name, true) }));
        show(done, true);
        hooks.adapterPublished(adapter.name, false);
      }
    } else if (type === "failed") {
      setState("failed");
      status.textContent = data.error || "failed";
    } else if (type === "cancelled") {
      setState("cancelled");
      status.textContent = "cancelled (its last checkpoint is kept)";
    }
  }, { signal: controller.signal }).catch((e) => {
    if (e.name !== "AbortError") status.textContent = e instanceof ApiError ? e.summary : String(e);
  }).finally(() => {
    if (current?.jobId === jobId) cancel.hidden = true;
    hooks.jobEnded();
    loadRecent();
  });
}

function setState(s) {
  const node = $("#ft-state");
  node.textContent = s;
  node.className = `state ${s}`;
  $("#ft-live").dataset.state = s;
}

// The loss per step (light) and its exponential moving average (dark), on a linear scale from 0.
function drawCurve(points, total) {
  const svg = $("#ft-curve");
  const title = $("title", svg);
  svg.replaceChildren(title);
  svg.dataset.points = String(points.length);
  const W = 520, H = 220, L = 48, R = 12, T = 12, B = 28;
  const maxLoss = Math.max(1e-6, ...points.map((p) => p[1])) * 1.05;
  const x = (s) => L + ((W - L - R) * s) / Math.max(1, total);
  const y = (v) => T + (H - T - B) * (1 - v / maxLoss);
  const add = (tag, attrs, text) => {
    const n = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    svg.append(n);
    return n;
  };
  add("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" });
  add("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" });
  add("text", { x: L - 6, y: T + 4, class: "tick end" }, maxLoss.toPrecision(2));
  add("text", { x: L - 6, y: H - B, class: "tick end" }, "0");
  add("text", { x: L, y: H - 8, class: "tick" }, "0");
  add("text", { x: W - R, y: H - 8, class: "tick end" }, `step ${total}`);
  if (!points.length) {
    add("text", { x: (W + L) / 2, y: H / 2, class: "tick middle" }, "no loss yet");
    return;
  }
  add("polyline", { class: "loss", points: points.map(([s, v]) => `${x(s).toFixed(1)},${y(v).toFixed(1)}`).join(" ") });
  let ema = points[0][1];
  const smooth = points.map(([s, v]) => {
    ema = 0.8 * ema + 0.2 * v;
    return `${x(s).toFixed(1)},${y(ema).toFixed(1)}`;
  });
  add("polyline", { class: "ema", points: smooth.join(" ") });
  const [ls, lv] = points[points.length - 1];
  add("circle", { class: "last", cx: x(ls).toFixed(1), cy: y(lv).toFixed(1), r: 3 });
}

// ---- recent fine-tunes ------------------------------------------------------------------------------------------
export async function loadRecent({ follow = false } = {}) {
  const list = $("#ft-recent");
  let jobs;
  try {
    jobs = (await getJson("/jobs?kind=finetune&limit=10")).jobs;
  } catch (e) {
    list.replaceChildren(el("li", { class: "error", text: e instanceof ApiError ? e.summary : String(e) }));
    return;
  }
  list.replaceChildren(...jobs.map((job) => el("li", {},
    el("span", { class: "recent-name", text: job.request.name }),
    el("span", { class: `state ${job.state}`, text: job.state }),
    el("span", { class: "hint", text: when(job.created_at) }),
    el("button", { type: "button", class: "quiet", text: "Show", "aria-label": `Show fine-tune ${job.request.name}`,
      onclick: () => watch(job.id, job.request.name) }))));
  if (!jobs.length) list.append(el("li", { class: "hint", text: "none yet" }));
  const active = jobs.find((j) => j.state === "running" || j.state === "queued");
  if (follow && !current && (active || jobs[0])) watch((active || jobs[0]).id, (active || jobs[0]).request.name);
}
