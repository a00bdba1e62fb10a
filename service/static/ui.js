// Small DOM helpers shared by the page's sections: elements, form fields from the parameter definitions, errors
// shown next to the field they name, and crisp upscaled images.
import { ApiError, imageUrl } from "./api.js";

export const $ = (sel, root = document) => root.querySelector(sel);
export const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

export function show(node, visible) {
  node.hidden = !visible;
}

// Sets bounds, defaults and help on the inputs of a form from /ui/params.json (`prefix` + api field name = id).
export function applyParams(prefix, defs) {
  for (const [name, p] of Object.entries(defs)) {
    const input = document.getElementById(prefix + name);
    if (!input) continue;
    input.title = p.help;
    if (input.tagName === "SELECT" && p.choices) {
      for (const c of p.choices) input.append(el("option", { value: c, text: c }));
      if (p.default !== null) input.value = p.default;
      continue;
    }
    if (input.type === "checkbox") {
      input.checked = Boolean(p.default);
      continue;
    }
    if (input.type === "number") {
      if (p.min !== null) input.min = p.min;
      if (p.max !== null) input.max = p.max;
      if (p.step) input.step = p.step;
      if (p.default !== null && !Array.isArray(p.default)) input.value = p.default;
    }
  }
}

// The value of one input as the API wants it: undefined when left empty (the API's default applies).
export function fieldValue(input) {
  if (input.type === "checkbox") return input.checked;
  const raw = input.value.trim();
  if (raw === "") return undefined;
  if (input.dataset.type === "int" || input.dataset.type === "float") {
    const n = Number(raw);
    return Number.isFinite(n) ? n : raw; // the API names the field when it is not a number
  }
  return input.value;
}

// ---- errors next to their fields ------------------------------------------------------------------------------
export function clearErrors(form) {
  for (const p of $$(".field-error", form)) p.remove();
  for (const i of $$("[aria-invalid]", form)) i.removeAttribute("aria-invalid");
  const summary = $(".form-error", form);
  if (summary) show(summary, false);
}

// Shows an error under each field it names (ids are `prefix` + field; `resolve` maps other names) and a summary.
export function showErrors(form, prefix, err, resolve = () => null) {
  clearErrors(form);
  const summary = $(".form-error", form);
  const problems = err instanceof ApiError ? err.problems : [];
  for (const { field, message } of problems) {
    if (!field) continue;
    const input = resolve(field) || document.getElementById(prefix + field) ||
      document.getElementById(prefix + field.split(".")[0]);
    if (!input) continue;
    input.setAttribute("aria-invalid", "true");
    const id = `${input.id}-error`;
    const note = el("p", { class: "error field-error", id, text: message });
    input.setAttribute("aria-describedby", id);
    (input.closest(".field, li, .row") || input.parentElement).append(note);
  }
  if (summary) {
    summary.textContent = err instanceof ApiError ? err.summary : String(err);
    show(summary, true);
  }
}

// ---- images -----------------------------------------------------------------------------------------------------
// An <img> of an API image, upscaled by a whole factor to about `target` pixels without smoothing (a 32×32 image
// from the tiny model is drawn 6× at 192 px), or scaled down to fit when it is larger.
export function apiImage(url, { alt = "", target = 192 } = {}) {
  const img = el("img", { alt, class: "px loading", decoding: "async" });
  img.dataset.src = url;
  img.addEventListener("load", () => {
    const w = img.naturalWidth, h = img.naturalHeight;
    const factor = Math.max(w, h) < target ? Math.floor(target / Math.max(w, h)) : target / Math.max(w, h);
    img.style.width = `${Math.round(w * factor)}px`;
    img.style.height = `${Math.round(h * factor)}px`;
    img.classList.toggle("smooth", factor < 1);
    img.classList.remove("loading");
  }, { once: true });
  imageUrl(url).then((src) => { img.src = src; }, (e) => {
    img.classList.remove("loading");
    img.alt = `${alt} (not available: ${e.message})`;
    img.classList.add("broken");
  });
  return img;
}

export function when(seconds) {
  if (!seconds) return "";
  const d = new Date(seconds * 1000);
  return d.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
}

export function plural(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}
