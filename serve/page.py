"""The endpoint's own page at ``/``: choose or drop images, see each one's top-k (and, for a
multi-label model, every label over the threshold) with probabilities, and which model answered.
One self-contained HTML document (no external scripts, styles or fonts), talking to the same
``/v1/model`` and ``/v1/predict`` a client uses; ``{{PREFIX}}`` is the app's route prefix."""

from __future__ import annotations

import html

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>imgcls</title>
<style>
 body{font:15px/1.4 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
 header{background:#1d2330;color:#fff;padding:12px 20px} header b{font-size:18px}
 #model{opacity:.85;margin-left:12px} main{max-width:900px;margin:20px auto;padding:0 16px}
 #drop{border:2px dashed #8a94a6;border-radius:10px;padding:26px;text-align:center;background:#fff}
 #drop.over{border-color:#2f6fde;background:#eef4ff} .row{display:flex;gap:12px;align-items:center;margin-top:12px}
 .card{display:flex;gap:16px;background:#fff;border-radius:10px;padding:12px;margin-top:12px;box-shadow:0 1px 2px #0002}
 .card img{width:96px;height:96px;object-fit:contain;image-rendering:pixelated;background:#eee;border-radius:6px}
 .bar{height:8px;background:#2f6fde;border-radius:4px} .cls{display:grid;grid-template-columns:90px 1fr 60px;gap:8px;align-items:center}
 .labels span{display:inline-block;background:#e3f1e6;color:#185c2b;border-radius:12px;padding:1px 9px;margin:2px 4px 2px 0}
 .err{color:#a3131f} input[type=number]{width:60px}
</style></head>
<body><header><b>imgcls</b><span id="model">loading the model...</span></header>
<main>
 <div id="drop">Drop images here, or <input id="files" type="file" accept="image/*" multiple></div>
 <div class="row"><label>top-k <input id="topk" type="number" min="1" value="5"></label>
  <label>token <input id="token" type="password" placeholder="if the endpoint asks for one"></label></div>
 <div id="results"></div>
</main>
<script>
const PREFIX = "{{PREFIX}}";
const $ = (id) => document.getElementById(id);
function headers() { const t = $("token").value.trim(); return t ? {"Authorization": "Bearer " + t} : {}; }
async function loadModel() {
  const r = await fetch(PREFIX + "/v1/model", {headers: headers()});
  const body = await r.json();
  if (!r.ok) { $("model").textContent = body.detail || r.status; return null; }
  $("model").textContent = body.name + " v" + body.version + (body.alias ? " @" + body.alias : " (pinned)")
    + " | " + body.classes.length + " classes" + (body.multi_label ? ", multi-label" : "");
  $("topk").max = body.classes.length;
  return body;
}
function card(file) {
  const div = document.createElement("div"); div.className = "card";
  const img = document.createElement("img"); img.src = URL.createObjectURL(file); img.alt = file.name;
  const out = document.createElement("div"); out.style.flex = "1";
  out.innerHTML = "<b></b><div class='labels'></div><div class='top'>classifying...</div>";
  out.querySelector("b").textContent = file.name;
  div.append(img, out); $("results").prepend(div); return out;
}
function show(out, p) {
  const top = out.querySelector(".top"); top.textContent = "";
  for (const c of p.top_k) {
    const row = document.createElement("div"); row.className = "cls";
    row.innerHTML = "<span class='label'></span><div><div class='bar'></div></div><span></span>";
    row.children[0].textContent = c.label;
    row.querySelector(".bar").style.width = (100 * c.probability).toFixed(1) + "%";
    row.children[2].textContent = (100 * c.probability).toFixed(1) + "%";
    top.append(row);
  }
  if (p.labels) {
    const labels = out.querySelector(".labels");
    labels.textContent = p.labels.length ? "" : "no label over " + p.threshold.toFixed(2);
    for (const l of p.labels) { const s = document.createElement("span"); s.textContent = l.label; labels.append(s); }
  }
}
async function classify(files) {
  await loadModel();
  for (const file of files) {
    const out = card(file);
    const form = new FormData(); form.append("file", file, file.name);
    try {
      const r = await fetch(PREFIX + "/v1/predict?top_k=" + encodeURIComponent($("topk").value),
                            {method: "POST", body: form, headers: headers()});
      const body = await r.json();
      if (!r.ok) { out.querySelector(".top").innerHTML = "<span class='err'></span>";
                   out.querySelector(".err").textContent = r.status + " " + body.error + ": " + body.detail; continue; }
      show(out, body.predictions[0]);
    } catch (e) { out.querySelector(".top").textContent = String(e); }
  }
}
$("files").addEventListener("change", (e) => classify([...e.target.files]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); classify([...e.dataTransfer.files]); });
$("token").addEventListener("change", loadModel);
loadModel();
</script></body></html>
"""


def page(prefix: str) -> str:
    """The page for an app served under ``prefix`` (Serve's route prefix: ``""`` at the root)."""
    return PAGE.replace("{{PREFIX}}", html.escape(prefix.rstrip("/"), quote=True))


# /v1/predict in the OpenAPI schema: the handler reads the request itself (multipart or a raw body),
# so FastAPI cannot infer these; with them /docs' "Try it out" uploads an image.
PREDICT_OPENAPI = {
    "parameters": [
        {"name": "top_k", "in": "query", "required": False, "description": "classes per image (default serve.top_k)",
         "schema": {"type": "integer", "minimum": 1}},
        {"name": "explain", "in": "query", "required": False,
         "description": "gradcam: add each image's Grad-CAM overlay (base64 PNG)",
         "schema": {"type": "string", "enum": ["gradcam"]}},
        {"name": "format", "in": "query", "required": False,
         "description": "with explain: png answers the overlay itself (one image)",
         "schema": {"type": "string", "enum": ["json", "png"]}},
    ],
    "requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
            "file": {"type": "array", "items": {"type": "string", "format": "binary"},
                     "description": "one or more images (any field name is accepted)"}}}},
        **{t: {"schema": {"type": "string", "format": "binary"}}
           for t in ("image/png", "image/jpeg", "image/webp", "application/octet-stream")},
    }},
    "responses": {
        "200": {"description": "each image's top-k (multi-label models: also every label over the threshold)",
                "content": {"application/json": {"example": {
                    "model": {"name": "digits", "version": "4", "alias": "champion"},
                    "predictions": [{"file": "3.png", "top_k": [{"label": "3", "index": 3, "probability": 0.991}]}]}}}},
        **{str(code): {"description": what, "content": {"application/json": {"example": {"error": error, "detail": "..."}}}}
           for code, what, error in (
               (400, "not an image, a malformed body or parameter", "invalid_image"),
               (401, "a token is required", "unauthorized"),
               (413, "too large: body, image pixels, files or fields", "image_too_large"),
               (415, "neither multipart nor an image body", "unsupported_media_type"),
               (500, "an unexpected error in the replica", "internal_error"),
               (504, "not answered within serve.request_timeout_s", "timeout"))},
        "503": {"description": "overloaded: retry after the Retry-After header's seconds"},
    },
}
