// The review page of `palionnx serve MODEL --folder DIR`: the folder's images with their caption files, an
// editor per image, recaptioning of selected or missing images with the page's settings.
"use strict";

const cards = new Map();  // image path -> {element, textarea, status, checkbox, dirty}
let writable = true;

function card(item) {
  const element = document.createElement("li");
  element.className = "item";
  element.dataset.path = item.path;
  const checkbox = document.createElement("input");
  checkbox.type = "checkbox";
  checkbox.className = "select";
  const image = document.createElement("img");
  image.alt = item.path;
  api("/v1/dataset/image?path=" + encodeURIComponent(item.path))
    .then((r) => r.blob()).then((blob) => { image.src = URL.createObjectURL(blob); });
  const name = document.createElement("label");
  name.className = "name";
  name.append(checkbox, " " + item.path);
  const textarea = document.createElement("textarea");
  const save = document.createElement("button");
  save.type = "button";
  save.className = "save";
  save.textContent = "Save";
  const status = document.createElement("div");
  status.className = "status";
  element.append(image, name, textarea, save, status);
  const entry = { element, textarea, status, checkbox, save, dirty: false, item };
  textarea.oninput = () => { entry.dirty = true; status.textContent = "edited, not saved"; };
  save.onclick = () => saveCaption(entry);
  cards.set(item.path, entry);
  return entry;
}

function show(entry, item) {
  entry.item = item;
  entry.element.dataset.status = item.status;
  entry.element.classList.toggle("failed", item.status === "failed");
  if (!entry.dirty) {
    entry.textarea.value = item.caption ?? "";
    entry.status.textContent = item.status === "failed" ? "failed: " + item.error : item.status;
  }
  entry.save.disabled = !writable;
}

async function saveCaption(entry) {
  const response = await api("/v1/dataset/caption?path=" + encodeURIComponent(entry.item.path), {
    method: "PUT", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ caption: entry.textarea.value }) });
  if (response.ok) {
    entry.dirty = false;
    entry.status.textContent = "saved";
    entry.element.dataset.saved = "true";
  } else {
    entry.status.textContent = "not saved: " + await errorText(response);
  }
}

function applyFilter() {
  const wanted = document.getElementById("filter").value;
  for (const entry of cards.values()) {
    entry.element.hidden = wanted !== "all" && entry.item.status !== wanted;
  }
}

async function refresh() {
  const response = await api("/v1/dataset");
  const listing = await response.json();
  writable = listing.writable;
  const readonly = document.getElementById("readonly");
  readonly.hidden = writable;
  readonly.textContent = writable ? "" : `${listing.folder} is read-only: browsing only, saving is off`;
  document.getElementById("folder").textContent = listing.folder;
  const list = document.getElementById("items");
  for (const item of listing.items) {
    const entry = cards.get(item.path) || card(item);
    if (!entry.element.isConnected) list.append(entry.element);
    show(entry, item);
  }
  const p = listing.progress;
  document.getElementById("progress").textContent = p.total ? `${p.done} of ${p.total} done, ${p.failed} failed${p.running ? "…" : ""}` : "";
  applyFilter();
  if (p.running) setTimeout(refresh, 500);
}

async function recaption(paths) {
  if (!paths.length) return;
  const response = await api("/v1/dataset/recaption", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ paths, ...settingsFields() }) });
  if (!response.ok) {
    document.getElementById("progress").textContent = await errorText(response);
    return;
  }
  for (const path of paths) cards.get(path).dirty = false;
  refresh();
}

document.getElementById("filter").onchange = applyFilter;
document.getElementById("recaption-selected").onclick = () => recaption(
  [...cards.values()].filter((e) => e.checkbox.checked).map((e) => e.item.path));
document.getElementById("recaption-missing").onclick = () => recaption(
  [...cards.values()].filter((e) => e.item.status === "missing" || e.item.status === "failed").map((e) => e.item.path));
loadSettings().then(refresh);
