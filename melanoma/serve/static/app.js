// The page for `melanoma serve`: one request per image, so each card fills in (or shows its
// error) on its own. Everything it shows comes from /api/model and /api/predict.
//
// The one decision: the calibrated melanoma probability against the head's threshold. The page
// words it so that the two cannot be read against each other ("Below the melanoma threshold
// (0.98)" in a neutral colour; never a green "benign"), and the class probabilities are listed
// as they are, without marking the largest one as if it decided.
"use strict";

const $ = (id) => document.getElementById(id);
const OVERLAY_LABELS = {
  rollout: "Attention rollout", grad_rollout: "Gradient-weighted rollout", gradcam: "Grad-CAM (CNN)",
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

function pct(p, digits = 1) { return (100 * p).toFixed(digits) + "%"; }

// a probability and a threshold on one scale, with the digits the threshold needs (0.98, 0.999;
// at most 4) and more where the two would otherwise look equal without being equal
function pair(p, t) {
  let d = 2;
  while (d < 4 && Math.abs(Number(Number(t).toFixed(d)) - t) > 1e-9) d++;
  for (; d <= 6; d++) {
    const a = Number(p).toFixed(d), b = Number(t).toFixed(d);
    if (a !== b || p === t) return [a, b];
  }
  return [Number(p).toFixed(6), Number(t).toFixed(6)];
}

function showPageError(message) {
  const box = $("page-error");
  box.textContent = message;
  box.hidden = !message;
}

// what a reader must know before reading this head's numbers: synthetic data, no calibration
function headWarnings(head) {
  const out = [];
  if (head.data_warning) out.push(head.data_warning);
  if (!head.calibrated) out.push(`this head is NOT calibrated${head.uncalibrated_reason ? ": " + head.uncalibrated_reason : ""}`);
  return out;
}

function describeHead() {
  const head = model.heads[$("head").value];
  const op = head.operating_point;
  const cal = head.calibration;
  const parts = [`${model.backbone || "ViT"}, ${model.image_size} px`, `classes: ${head.class_names.join(", ")}`];
  const rec = model.backbone_record || {};
  if (rec.family === "timm") parts[0] = `timm ${parts[0]}`;
  const w = rec.weights;
  if (w && w.source) parts.push(`initial weights: ${w.name} (${w.source}${w.license ? `, licence ${w.license}` : ""})`);
  if (head.trained_on) parts.push(`trained on ${head.trained_on}`);
  parts.push(cal && cal.temperature !== undefined ? `calibrated (temperature ${Number(cal.temperature).toFixed(2)})`
    : "NOT calibrated");
  parts.push(op ? `operating point ${Number(op.threshold).toFixed(3)}` +
    (op.target_sensitivity !== undefined && op.target_sensitivity !== null ? ` for ${pct(op.target_sensitivity)} target sensitivity` : "")
    : "no operating point stored (run melanoma evaluate)");
  $("model-line").textContent = parts.join(" · ");
  // a head that fuses patient metadata: its fields as inputs (empty = not recorded, scored as missing)
  const meta = head.metadata;
  $("metadata-controls").hidden = !meta;
  if (meta) {
    for (const f of ["age", "sex", "site"]) $(f).parentElement.hidden = !meta.fields.includes(f);
    const site = meta.encodings.site;
    if (site && $("site").options.length === 0) {
      $("site").append(el("option", { value: "" }, "not recorded"));
      for (const v of site.values) $("site").append(el("option", { value: v }, v));
    }
  }
  const warnings = headWarnings(head);
  $("head-warning").textContent = warnings.length ? "Caution: " + warnings.join("; ") + "." : "";
  $("head-warning").hidden = !warnings.length;
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
    block.append(el("div", { class: "prob" }, rec.predicted_class, el("small", {}, "most probable class")));
    block.append(el("p", { class: "why" }, "This head has no melanoma class: no melanoma decision."));
    return block;
  }
  const p = rec.melanoma_probability, t = rec.threshold;
  const calibrated = Boolean(result.calibration);
  block.append(el("div", { class: "prob" }, pct(p),
    el("small", {}, calibrated ? "melanoma probability (calibrated)" : "melanoma probability (NOT calibrated)")));
  const decision = t === null || t === undefined ? "none" : (rec.decision || "none");
  let label, why;
  if (decision === "none") {
    label = "No decision";
    why = "No operating point is stored for this head, so no decision is made (run melanoma evaluate).";
  } else {
    const [ps, ts] = pair(p, t);
    label = decision === "melanoma" ? `At or above the melanoma threshold (${ts})` : `Below the melanoma threshold (${ts})`;
    const op = result.target_sensitivity !== null && result.target_sensitivity !== undefined
      ? `, the operating point chosen for ${pct(result.target_sensitivity)} sensitivity on validation data` : "";
    why = `The decision compares the melanoma probability ${ps} with the threshold ${ts}${op}. `;
    if (decision !== "melanoma" && p >= 0.5) {
      why += `Although above 0.5, ${ps} is below this threshold: this is not a finding of "benign".`;
    } else if (decision !== "melanoma") {
      why += "Below the threshold is not a finding of \"benign\".";
    } else {
      why += "At or above it, this head flags the lesion as melanoma.";
    }
  }
  block.append(el("span", { class: `decision ${decision}` }, label));
  block.append(el("p", { class: "why" }, why));
  return block;
}

function classTable(result, rec) {
  const table = el("table", { class: "classes" },
    el("caption", {}, "Probability of each class (the decision above uses the melanoma probability and the threshold only)"));
  for (const name of result.class_names) {
    const p = rec[`prob_${name}`];
    const bar = el("span");
    bar.style.width = pct(p);
    table.append(el("tr", {}, el("td", {}, name), el("td", {}, pct(p)), el("td", { class: "bar", "aria-hidden": "true" }, bar)));
  }
  return table;
}

function otherFields(result, rec) {
  const classes = new Set(result.class_names.map((c) => `prob_${c}`));
  const rows = Object.entries(rec).filter(([k]) => !SHOWN.has(k) && !classes.has(k));
  const details = el("details", {}, el("summary", {}, "all fields"));
  const extra = { head: result.head, tta: result.tta, predicted_class: rec.predicted_class,
                  calibration: JSON.stringify(result.calibration) };
  for (const [k, v] of [...Object.entries(extra), ...rows]) {
    details.append(el("div", {}, `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`));
  }
  return details;
}

function newCard(file) {
  const photo = el("img", { class: "photo", alt: `uploaded image ${file.name}` });
  const photoFigure = el("figure", {}, photo, el("figcaption", {}, "uploaded image"));
  // a file the browser cannot show (not an image, TIFF): a line of text, not a broken-image icon
  photo.addEventListener("error", () => photoFigure.replaceChildren(el("p", { class: "muted noimg" }, "(the browser cannot display this file)")));
  photo.src = URL.createObjectURL(file);
  const images = el("div", { class: "images" }, photoFigure);
  const numbers = el("div", { class: "numbers" }, el("p", { class: "pending" }, "Predicting…"));
  const card = el("article", { class: "card", "aria-label": file.name },
    el("h2", {}, file.name), el("div", { class: "body" }, numbers, images));
  return { card, numbers, images, photoFigure };
}

async function predictOne(file, parts) {
  const { card, numbers, images, photoFigure } = parts;
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("head", $("head").value);
  form.append("tta", $("tta").checked ? "true" : "false");
  form.append("overlay", $("overlay").value);
  if (!$("metadata-controls").hidden) {
    for (const f of ["age", "sex", "site"]) {
      if (!$(f).parentElement.hidden && $(f).value !== "") form.append(f, $(f).value);
    }
  }
  let body = null, status = 0;
  try {
    const r = await fetch("/api/predict", { method: "POST", body: form });
    status = r.status;
    body = await r.json().catch(() => null);
    if (!r.ok) throw new Error(errorText(body, status));
  } catch (e) {
    numbers.replaceChildren(el("p", { class: "error" }, el("strong", {}, "Not predicted: "), e.message));
    photoFigure.remove();
    card.classList.add("failed");
    return;
  }
  const rec = body.predictions[0];
  if (rec.overlay_png) {
    const overlay = el("img", { class: "overlay", alt: `attention overlay for ${file.name}` });
    overlay.src = `data:image/png;base64,${rec.overlay_png}`;
    images.append(el("figure", {}, overlay, el("figcaption", {}, `${OVERLAY_LABELS[body.overlay] || body.overlay}: where the model looked`)));
  }
  const warnings = [body.data_warning, body.calibration_warning].filter(Boolean);
  const caution = warnings.length ? [el("p", { class: "caution" }, "Caution: " + warnings.join("; ") + ".")] : [];
  numbers.replaceChildren(...caution, decisionBlock(body, rec), classTable(body, rec), otherFields(body, rec));
  card.classList.add("done");
}

function handleFiles(files) {
  showPageError("");
  if (!model) { showPageError("The model is not loaded yet; reload the page."); return; }
  const list = Array.from(files);
  if (!list.length) { showPageError("No files were dropped: drop image files, not folders or links."); return; }
  // cards in upload order, each filled in when its own answer comes
  const parts = list.map(newCard);
  for (const p of parts) $("results").append(p.card);
  parts[0].card.scrollIntoView({ block: "nearest" });
  list.forEach((f, i) => predictOne(f, parts[i]));
}

function openPicker() { $("files").click(); }

function setupDrop() {
  const drop = $("drop");
  $("files").addEventListener("change", (e) => { handleFiles(e.target.files); e.target.value = ""; });
  $("choose").addEventListener("click", openPicker);
  // Enter or Space on the focused drop zone opens the file picker (keys on the button inside
  // it are the button's own)
  drop.addEventListener("keydown", (e) => {
    if (e.target !== drop || (e.key !== "Enter" && e.key !== " ")) return;
    e.preventDefault();
    openPicker();
  });
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
