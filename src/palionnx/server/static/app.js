// The caption page: images chosen or dropped are captioned one after another, each caption streaming in
// beside its image.
"use strict";

const results = [];  // {name, caption, element}
let queue = Promise.resolve();

function addImage(file) {
  const item = document.createElement("li");
  item.className = "item";
  const image = document.createElement("img");
  image.src = URL.createObjectURL(file);
  image.alt = file.name;
  const name = document.createElement("div");
  name.className = "name";
  name.textContent = file.name;
  const caption = document.createElement("div");
  caption.className = "caption";
  const status = document.createElement("div");
  status.className = "status";
  status.textContent = "waiting";
  item.append(image, name, caption, status);
  document.getElementById("results").append(item);
  const entry = { name: file.name, caption: null, element: item };
  results.push(entry);
  queue = queue.then(async () => {
    status.textContent = "captioning";
    try {
      const final = await streamCaption(file, file.name, (delta) => { caption.textContent += delta; });
      caption.textContent = final.caption;
      entry.caption = final.caption;
      status.textContent = `${final.tokens} tokens in ${final.timings.total_s.toFixed(2)} s`;
      item.dataset.done = "true";
    } catch (error) {
      item.classList.add("failed");
      status.textContent = "failed: " + error.message;
      item.dataset.done = "true";
    }
    summarize();
  });
}

function summarize() {
  const done = results.filter((r) => r.caption !== null).length;
  document.getElementById("summary").textContent = `${done} of ${results.length} captioned`;
}

function addFiles(files) {
  for (const file of files) if (file.type.startsWith("image/") || /\.(jpe?g|png|webp|gif|bmp|tiff?)$/i.test(file.name)) addImage(file);
  summarize();
}

document.getElementById("files").onchange = (event) => addFiles(event.target.files);
const drop = document.getElementById("drop");
drop.ondragover = (event) => { event.preventDefault(); drop.classList.add("over"); };
drop.ondragleave = () => drop.classList.remove("over");
drop.ondrop = (event) => { event.preventDefault(); drop.classList.remove("over"); addFiles(event.dataTransfer.files); };
document.getElementById("copy").onclick = () => navigator.clipboard.writeText(
  results.filter((r) => r.caption !== null).map((r) => `${r.name}\t${r.caption}`).join("\n"));
document.getElementById("download").onclick = () => download("captions.jsonl",
  results.filter((r) => r.caption !== null).map((r) => JSON.stringify({ file: r.name, caption: r.caption }) + "\n").join(""));
loadSettings();
