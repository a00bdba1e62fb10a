// Adapters: the key's own and those shared with it (GET /adapters), download with the key, share / make private
// (PATCH), delete (DELETE), and import of a LoRA file (multipart POST /adapters).
import { ApiError, download, followEvents, getJson, postForm, request, sendJson } from "./api.js";
import { $, clearErrors, el, show, showErrors } from "./ui.js";

const DOWNLOADS = [ // label, ?file= (empty: the zip of the whole adapter)
  ["zip", ""],
  ["diffusers", "pytorch_lora_weights.safetensors"],
  ["kohya", "kohya_lora.safetensors"],
];
let me = { admin: false };
let onChange = () => {};

export function setup({ changed }) {
  onChange = changed;
  $("#import-form").addEventListener("submit", (e) => {
    e.preventDefault();
    importLora();
  });
  $("#imp-file").addEventListener("change", () => { // a name from the file's, when none is given yet
    const file = $("#imp-file").files[0];
    const name = $("#imp-name");
    if (file && !name.value) name.value = file.name.replace(/\.safetensors$/i, "").replace(/[^A-Za-z0-9_-]+/g, "-")
      .replace(/^[-_]+/, "").slice(0, 64);
  });
}

export function setMe(who) {
  me = who || { admin: false };
}

function problem(e) {
  const node = $("#adapters-error");
  node.textContent = e instanceof ApiError ? e.summary : String(e);
  show(node, true);
}

export async function load() {
  show($("#adapters-error"), false);
  let adapters = [];
  try {
    adapters = (await getJson("/adapters")).adapters;
  } catch (e) {
    problem(e);
    return [];
  }
  $("#adapters").replaceChildren(...adapters.map(row));
  show($("#adapters-empty"), adapters.length === 0);
  return adapters;
}

function row(a) {
  const manage = a.mine || me.admin;
  const tr = el("tr", { "data-name": a.name });
  const downloads = el("td", { class: "downloads" }, ...DOWNLOADS.map(([label, file]) => el("button", {
    type: "button", class: "quiet", text: label, "aria-label": `Download ${a.name} (${label})`,
    onclick: () => download(file ? `${a.download_url}?file=${encodeURIComponent(file)}` : a.download_url,
      file ? `${a.name}-${file}` : `${a.name}.zip`).catch(problem),
  })));
  const actions = el("td", { class: "manage" });
  if (manage) {
    const next = a.visibility === "public" ? "private" : "public";
    actions.append(el("button", { type: "button", text: next === "public" ? "Share" : "Make private",
      "aria-label": `${next === "public" ? "Share" : "Make private"} ${a.name}`,
      onclick: async () => {
        try {
          await sendJson("PATCH", a.url, { visibility: next });
        } catch (e) {
          problem(e);
        }
        onChange();
      } }));
    const del = el("button", { type: "button", class: "danger", text: "Delete", "aria-label": `Delete ${a.name}` });
    del.addEventListener("click", async () => {
      if (del.dataset.confirm !== "1") { // a second click within a few seconds deletes
        del.dataset.confirm = "1";
        del.textContent = "Really delete?";
        setTimeout(() => { del.dataset.confirm = ""; del.textContent = "Delete"; }, 4000);
        return;
      }
      try {
        await request("DELETE", a.url);
      } catch (e) {
        problem(e);
      }
      onChange();
    });
    actions.append(del);
  }
  tr.append(el("th", { scope: "row", text: a.name }),
    el("td", { text: a.mine ? "mine" : "shared with you" }),
    el("td", {}, el("span", { class: `badge ${a.visibility}`, text: a.visibility })),
    el("td", { text: a.steps ?? "" }), el("td", { text: a.base_model || "" }),
    el("td", { text: a.created ? a.created.replace("T", " ").replace(/\+00:00$/, " UTC") : "" }),
    downloads, actions);
  return tr;
}

async function importLora() {
  const f = $("#import-form");
  const button = $("#import-submit");
  const status = $("#import-status");
  clearErrors(f);
  const data = new FormData();
  const file = $("#imp-file").files[0];
  if (file) data.append("file", file, file.name);
  data.append("name", $("#imp-name").value);
  button.disabled = true;
  status.textContent = "importing… (checked against the model on a worker)";
  try {
    let a = await postForm("/adapters", data);
    if (a.job_id) { // 202: the import job runs on (a busy queue); follow it to its end
      status.textContent = "importing… (waiting for a worker)";
      let error = null;
      const final = await followEvents(a.events_url, (type, d) => { if (type === "failed") error = d.error; });
      if (final !== "succeeded") throw new ApiError(422, error || `the import job was ${final}`);
      a = { name: data.get("name") };
    }
    status.textContent = `Imported “${a.name}”.`;
    $("#imp-name").value = "";
    $("#imp-file").value = "";
    onChange();
  } catch (e) {
    status.textContent = "";
    showErrors(f, "imp-", e);
  } finally {
    button.disabled = false;
  }
}
