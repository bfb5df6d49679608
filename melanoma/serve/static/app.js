// The page for `melanoma serve`: one request per image, so each card fills in (or shows its
// error) on its own. Everything it shows comes from /api/model and /api/predict.
"use strict";

const $ = (id) => document.getElementById(id);
const OVERLAY_LABELS = {
  rollout: "Attention rollout", grad_rollout: "Gradient-weighted rollout",
  last_layer: "Last layer (mean of heads)", heads: "Last layer, per head", none: "No overlay",
};
// record fields drawn in their own place; any other field is listed under "all fields"
const SHOWN = new Set(["filename", "error", "predicted_class", "melanoma_probability", "threshold", "decision", "overlay_png"]);
let model = null;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function pct(p) { return (100 * p).toFixed(1) + "%"; }

function showPageError(message) {
  const box = $("page-error");
  box.textContent = message;
  box.hidden = !message;
}

function describeHead() {
  const head = model.heads[$("head").value];
  const op = head.operating_point;
  const cal = head.calibration;
  const parts = [`${model.backbone || "ViT"}, ${model.image_size} px`, `classes: ${head.class_names.join(", ")}`];
  parts.push(cal && cal.temperature !== undefined ? `calibrated (temperature ${Number(cal.temperature).toFixed(2)})`
    : `NOT calibrated${head.uncalibrated_reason ? ": " + head.uncalibrated_reason : ""}`);
  parts.push(op ? `operating point ${Number(op.threshold).toFixed(3)}` +
    (op.target_sensitivity !== undefined ? ` for ${pct(op.target_sensitivity)} target sensitivity` : "")
    : "no operating point stored (run melanoma evaluate)");
  $("model-line").textContent = parts.join(" · ");
}

async function loadModel() {
  try {
    const r = await fetch("/api/model");
    if (!r.ok) throw new Error(`GET /api/model: HTTP ${r.status}`);
    model = await r.json();
  } catch (e) {
    $("model-line").textContent = "";
    showPageError(`Cannot reach the model server (${e.message}). Is melanoma serve still running?`);
    return;
  }
  for (const name of Object.keys(model.heads)) {
    $("head").append(el("option", { value: name }, name));
  }
  $("head").value = model.default_head;
  for (const m of model.overlay_methods) {
    $("overlay").append(el("option", { value: m }, OVERLAY_LABELS[m] || m));
  }
  $("overlay").value = model.default_overlay;
  $("head").addEventListener("change", describeHead);
  describeHead();
  const mb = (model.limits.max_bytes / 1048576).toFixed(0);
  $("limits").textContent = `JPEG, PNG, BMP or TIFF · up to ${(model.limits.max_pixels / 1e6).toFixed(0)} megapixels ` +
    `and ${mb} MB per image · sent one image per request, so each result appears as soon as it is ready`;
}

function errorText(body, status) {
  if (body && body.error) {
    const files = (body.files || []).map((f) => f.error).join("; ");
    return files ? `${files}` : body.error;
  }
  return `HTTP ${status}`;
}

function decisionBlock(result, rec) {
  const block = el("div");
  if (rec.melanoma_probability === undefined || rec.melanoma_probability === null) {
    block.append(el("div", { class: "prob" }, rec.predicted_class, el("small", {}, "predicted class")));
    block.append(el("p", { class: "why" }, "This head has no melanoma class: no melanoma decision."));
    return block;
  }
  block.append(el("div", { class: "prob" }, pct(rec.melanoma_probability), el("small", {}, "melanoma probability (calibrated)")));
  const decision = rec.decision || "none";
  const label = { melanoma: "Melanoma", not_melanoma: "Not melanoma", none: "No decision" }[decision] || decision;
  block.append(el("span", { class: `decision ${decision}` }, label));
  let why;
  if (rec.threshold === null || rec.threshold === undefined) {
    why = "No operating point is stored for this head, so no decision is made (run melanoma evaluate).";
  } else {
    why = `Melanoma when the probability is at least ${Number(rec.threshold).toFixed(3)}`;
    why += result.target_sensitivity !== null && result.target_sensitivity !== undefined
      ? `: the operating point chosen for ${pct(result.target_sensitivity)} sensitivity on validation data.`
      : ".";
  }
  block.append(el("p", { class: "why" }, why));
  return block;
}

function classTable(result, rec) {
  const table = el("table", { class: "classes" });
  for (const name of result.class_names) {
    const p = rec[`prob_${name}`];
    const bar = el("span");
    bar.style.width = pct(p);
    table.append(el("tr", { class: name === rec.predicted_class ? "top" : "" },
      el("td", {}, name), el("td", {}, pct(p)), el("td", { class: "bar" }, bar)));
  }
  return table;
}

function otherFields(result, rec) {
  const classes = new Set(result.class_names.map((c) => `prob_${c}`));
  const rows = Object.entries(rec).filter(([k]) => !SHOWN.has(k) && !classes.has(k));
  const details = el("details", {}, el("summary", {}, "all fields"));
  const extra = { head: result.head, tta: result.tta, calibration: JSON.stringify(result.calibration) };
  for (const [k, v] of [...Object.entries(extra), ...rows]) {
    details.append(el("div", {}, `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`));
  }
  return details;
}

async function predictOne(file) {
  const photo = el("img", { class: "photo", alt: file.name });
  photo.src = URL.createObjectURL(file);
  const images = el("div", { class: "images" }, el("figure", {}, photo, el("figcaption", {}, "uploaded image")));
  const numbers = el("div", { class: "numbers" }, el("p", { class: "pending" }, "Predicting…"));
  const card = el("article", { class: "card" }, el("h2", {}, file.name), el("div", { class: "body" }, numbers, images));
  $("results").prepend(card);

  const form = new FormData();
  form.append("file", file, file.name);
  form.append("head", $("head").value);
  form.append("tta", $("tta").checked ? "true" : "false");
  form.append("overlay", $("overlay").value);
  let body = null, status = 0;
  try {
    const r = await fetch("/api/predict", { method: "POST", body: form });
    status = r.status;
    body = await r.json().catch(() => null);
    if (!r.ok) throw new Error(errorText(body, status));
  } catch (e) {
    numbers.replaceChildren(el("p", { class: "error" }, `Cannot predict this image: ${e.message}`));
    card.classList.add("failed");
    return;
  }
  const rec = body.predictions[0];
  if (rec.overlay_png) {
    const overlay = el("img", { class: "overlay", alt: `attention overlay for ${file.name}` });
    overlay.src = `data:image/png;base64,${rec.overlay_png}`;
    images.append(el("figure", {}, overlay, el("figcaption", {}, `${OVERLAY_LABELS[body.overlay] || body.overlay}: where the model looked`)));
  }
  numbers.replaceChildren(decisionBlock(body, rec), classTable(body, rec), otherFields(body, rec));
  card.classList.add("done");
}

function handleFiles(files) {
  showPageError("");
  if (!model) { showPageError("The model is not loaded yet; reload the page."); return; }
  const list = Array.from(files);
  if (!list.length) { showPageError("No files were dropped: drop image files, not folders or links."); return; }
  for (const f of list) predictOne(f);
}

function setupDrop() {
  const drop = $("drop");
  $("files").addEventListener("change", (e) => { handleFiles(e.target.files); e.target.value = ""; });
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => handleFiles(e.dataTransfer.files));
  // a file dropped beside the zone would make the browser navigate away from the page
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
}

setupDrop();
loadModel();
