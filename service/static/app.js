// The page: tabs, the API key and who it is (GET /me), the queue with cancel, and wiring the sections together.
import * as adapters from "./adapters.js";
import { ApiError, getJson, getKey, onUnauthorized, setKey } from "./api.js";
import * as finetune from "./finetune.js";
import * as generate from "./generate.js";
import { $, el, show, when } from "./ui.js";

const TABS = ["generate", "gallery", "queue", "finetune", "adapters"];
const QUEUE_POLL_MS = 2000;
let queueTimer = null;

function banner(text) {
  const node = $("#banner");
  node.textContent = text || "";
  show(node, Boolean(text));
}

// ---- tabs (the address's #fragment names the open one) -----------------------------------------------------------
function selectTab(name) {
  if (!TABS.includes(name)) name = "generate";
  for (const t of TABS) {
    $(`#tab-${t}`).setAttribute("aria-selected", String(t === name));
    $(`#tab-${t}`).tabIndex = t === name ? 0 : -1;
    show($(`#panel-${t}`), t === name);
  }
  return name;
}

// Shows a tab and loads what it shows.
function openTab(name, { push = true } = {}) {
  name = selectTab(name);
  if (push && location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  if (name === "gallery") generate.loadGallery();
  if (name === "adapters") refreshAdapters();
  if (name === "finetune") finetune.loadRecent({ follow: true });
  clearTimeout(queueTimer);
  pollQueue(name === "queue");
}

function setupTabs() {
  for (const t of TABS) $(`#tab-${t}`).addEventListener("click", () => openTab(t));
  $(".tabs").addEventListener("keydown", (e) => { // arrow keys move between tabs (the ARIA tabs pattern)
    const i = TABS.findIndex((t) => $(`#tab-${t}`) === document.activeElement);
    if (i < 0 || !["ArrowLeft", "ArrowRight"].includes(e.key)) return;
    const next = TABS[(i + (e.key === "ArrowRight" ? 1 : TABS.length - 1)) % TABS.length];
    openTab(next);
    $(`#tab-${next}`).focus();
  });
  document.addEventListener("minidalle:tab", (e) => openTab(e.detail));
  window.addEventListener("hashchange", () => openTab(location.hash.slice(1), { push: false }));
}

// ---- the key --------------------------------------------------------------------------------------------------
async function whoami() {
  const node = $("#whoami");
  try {
    const me = await getJson("/me");
    banner("");
    adapters.setMe(me);
    node.textContent = me.id === "anonymous" ? "Open mode: no key needed" :
      `Key “${me.name}”${me.admin ? " (admin)" : ""}`;
    node.dataset.key = me.id;
    return me;
  } catch (e) {
    node.textContent = getKey() ? "Key refused" : "No key";
    node.dataset.key = "";
    if (!(e instanceof ApiError && e.status === 401)) banner(e instanceof ApiError ? e.summary : String(e));
    return null;
  }
}

function setupKey() {
  const input = $("#api-key");
  input.value = getKey();
  $("#key-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    setKey(input.value.trim());
    await refreshAll();
  });
  $("#key-forget").addEventListener("click", async () => {
    input.value = "";
    setKey("");
    await refreshAll();
  });
  onUnauthorized((err) => banner(err.summary));
}

// ---- the queue ------------------------------------------------------------------------------------------------
function queueRow(job) {
  const what = job.kind === "generate" ? job.request.prompt : job.kind === "finetune" ?
    `fine-tune of “${job.request.name}”` : `import of “${job.request.name}”`;
  const p = job.progress;
  const progress = p ? el("progress", { max: String(p.total), value: String(p.step),
    "aria-label": `Progress of job ${job.id}` }) : el("span", { class: "hint", text: "waiting" });
  const status = el("span", { class: "hint" });
  return el("tr", { "data-job-id": job.id, "data-state": job.state },
    el("td", {}, el("code", { text: job.id.slice(0, 8) })),
    el("td", { text: job.kind }),
    el("td", { class: "what", text: what }),
    el("td", {}, el("span", { class: `state ${job.state}`, text: job.cancel_requested ? "cancelling" : job.state })),
    el("td", {}, progress, p ? el("span", { class: "hint", text: ` ${p.step}/${p.total}` }) : null),
    el("td", { text: when(job.created_at) }),
    el("td", {}, el("button", { type: "button", class: "danger", text: "Cancel", "aria-label": `Cancel job ${job.id}`,
      disabled: job.cancel_requested, onclick: async (e) => {
        e.target.disabled = true;
        await generate.cancelJob(job.id, status);
        refreshQueue();
      } }), status));
}

async function refreshQueue() {
  try {
    const [queued, running] = await Promise.all([getJson("/jobs?state=queued&limit=100"),
      getJson("/jobs?state=running&limit=100")]);
    const jobs = [...running.jobs, ...queued.jobs.reverse()]; // running first, then in the order they run
    $("#queue").replaceChildren(...jobs.map(queueRow));
    show($("#queue-empty"), jobs.length === 0);
    show($("#queue-error"), false);
    const count = $("#queue-count");
    count.textContent = String(jobs.length);
    show(count, jobs.length > 0);
  } catch (e) {
    const node = $("#queue-error");
    node.textContent = e instanceof ApiError ? e.summary : String(e);
    show(node, true);
  }
}

// While the queue is open it is read every couple of seconds (and once on any other tab, for its count).
async function pollQueue(repeat) {
  if (document.visibilityState === "visible") await refreshQueue();
  if (repeat) queueTimer = setTimeout(() => pollQueue(true), QUEUE_POLL_MS);
}

// ---- together ---------------------------------------------------------------------------------------------------
async function refreshAdapters() {
  const list = await adapters.load();
  generate.setAdapters(list);
  return list;
}

async function refreshAll() {
  const me = await whoami();
  if (!me) {
    for (const id of ["#gallery", "#queue", "#adapters"]) $(id).replaceChildren();
    return;
  }
  await refreshAdapters();
  const tab = TABS.find((t) => $(`#tab-${t}`).getAttribute("aria-selected") === "true");
  openTab(tab, { push: false });
}

async function boot() {
  setupTabs();
  setupKey();
  let params;
  try {
    params = await (await fetch("/ui/params.json")).json();
  } catch (e) {
    banner(`The service can't be reached (${e.message}).`);
    return;
  }
  const jobEnded = () => {
    pollQueue(false);
    if ($("#tab-gallery").getAttribute("aria-selected") === "true") generate.loadGallery();
  };
  generate.setup({ params, jobEnded });
  finetune.setup({
    params, jobEnded,
    adapterPublished: async (name, use) => {
      await refreshAdapters();
      if (use) {
        $("#gen-adapter-choice").value = name;
        $("#gen-adapter-add").click();
        openTab("generate");
      }
    },
  });
  adapters.setup({ changed: refreshAdapters });
  selectTab(location.hash.slice(1));
  await refreshAll();
  document.body.dataset.ready = "1"; // for tests and screenshots: the first answers are in
}

document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible") pollQueue(false);
});
boot();
