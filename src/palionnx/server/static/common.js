// What both pages share: the API key (asked once, kept for the browser session), calls to the API, the
// settings form, and streamed captions (server-sent events read from a fetch).
"use strict";

const KEY = "palionnx-key";

function authHeaders() {
  const key = sessionStorage.getItem(KEY);
  return key ? { Authorization: "Bearer " + key } : {};
}

function askForKey(message) {
  return new Promise((resolve) => {
    const form = document.getElementById("keyform");
    document.getElementById("keymessage").textContent = message;
    form.hidden = false;
    form.onsubmit = (event) => {
      event.preventDefault();
      sessionStorage.setItem(KEY, document.getElementById("key").value.trim());
      form.hidden = true;
      resolve();
    };
  });
}

// fetch with the key; on 401 ask for a key and try again.
async function api(path, options = {}) {
  for (;;) {
    const response = await fetch(path, { ...options, headers: { ...(options.headers || {}), ...authHeaders() } });
    if (response.status !== 401) return response;
    await askForKey(sessionStorage.getItem(KEY) ? "That key was refused: try another." : "This server needs an API key.");
  }
}

async function errorText(response) {
  try {
    return (await response.json()).error.message;
  } catch (_) {
    return "HTTP " + response.status;
  }
}

// The settings form's values as request fields (empty fields left out: the server's defaults).
function settingsFields() {
  const fields = {};
  for (const input of document.querySelectorAll("#settings [name]")) {
    if (input.name !== "preset" && input.value !== "") fields[input.name] = input.value;
  }
  return fields;
}

// The key form and the settings form, the same on both pages: [label, field name, input attributes].
const FIELDS = [
  ["prompt", "prompt", {}],
  ["max tokens", "max_new_tokens", { type: "number", min: "1" }],
  ["temperature", "temperature", { type: "number", min: "0", step: "0.05" }],
  ["top-k", "top_k", { type: "number", min: "0" }],
  ["top-p", "top_p", { type: "number", min: "0", max: "1", step: "0.05" }],
  ["repetition penalty", "repetition_penalty", { type: "number", min: "0", step: "0.05" }],
  ["no repeat n-gram", "no_repeat_ngram_size", { type: "number", min: "0" }],
];

function labelled(text, input) {
  const label = document.createElement("label");
  label.append(text + " ", input);
  return label;
}

function buildForms() {
  const key = document.createElement("input");
  Object.assign(key, { id: "key", type: "password", autocomplete: "off" });
  const message = document.createElement("span");
  message.id = "keymessage";
  const use = document.createElement("button");
  use.textContent = "Use key";
  document.getElementById("keyform").append(message, " ", key, " ", use);
  const preset = document.createElement("select");
  preset.name = "preset";
  preset.add(new Option("none (greedy)", ""));
  const settings = document.getElementById("settings");
  settings.append(labelled("preset", preset));
  for (const [text, name, attributes] of FIELDS) {
    const input = document.createElement("input");
    Object.assign(input, { name, ...attributes });
    settings.append(labelled(text, input));
  }
}

async function loadSettings() {
  buildForms();
  const response = await api("/v1/page");
  const page = await response.json();
  document.getElementById("model").textContent = `${page.model} (${page.level}, ${page.device})`;
  document.querySelector("#settings [name=prompt]").placeholder = page.prompt;
  document.querySelector("#settings [name=max_new_tokens]").max = page.max_new_tokens;
  const preset = document.querySelector("#settings [name=preset]");
  for (const name of Object.keys(page.presets)) preset.add(new Option(name, name));
  preset.onchange = () => {
    for (const input of document.querySelectorAll("#settings [name]")) {
      if (input.name !== "prompt" && input.name !== "preset") input.value = "";
    }
    for (const [name, value] of Object.entries(page.presets[preset.value] || {})) {
      const input = document.querySelector(`#settings [name=${name}]`);
      if (input) input.value = value;
    }
  };
  return page;
}

// POST an image (a Blob) to /v1/caption as a stream; onDelta(text) per piece. Resolves with the final JSON.
async function streamCaption(image, name, onDelta) {
  const form = new FormData();
  form.append("image", image, name);
  for (const [key, value] of Object.entries(settingsFields())) form.append(key, value);
  form.append("stream", "true");
  const response = await api("/v1/caption", { method: "POST", body: form });
  if (!response.ok) throw new Error(await errorText(response));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let final = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer.slice(0, end).replace(/^data: /, "");
      buffer = buffer.slice(end + 2);
      if (data === "[DONE]") continue;
      const event = JSON.parse(data);
      if (event.error) throw new Error(event.error.message);
      if ("delta" in event) onDelta(event.delta);
      else final = event;
    }
  }
  if (!final) throw new Error("the stream ended without a caption");
  return final;
}

function download(name, text) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([text], { type: "text/plain" }));
  link.download = name;
  link.click();
}
