// imgcls serve: the page. Names from the model and the files are data: set with
// textContent, never innerHTML.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  let info = null;

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    const key = $("key-input").value;
    if (key) h["X-API-Key"] = key;
    return h;
  }

  async function call(path, options) {
    const r = await fetch(path, Object.assign({}, options, { headers: headers(options && options.headers) }));
    if (r.status === 401) $("key").style.display = "block";
    return r;
  }

  async function loadModel() {
    const r = await call("/v1/model");
    if (!r.ok) {
      $("model").textContent = "the model: " + ((await r.json()).error || r.status);
      return;
    }
    info = await r.json();
    $("model").textContent = info.name + " (version " + info.version + ", " + info.format + ", " +
      info.classes.length + " classes, " + info.input_size.join("x") + " px)";
  }

  function bars(answer) {
    const box = el("div", "bars");
    const multi = Array.isArray(answer.labels);
    const head = multi ? (answer.labels.map((l) => l.label).join(", ") || "(no label over its threshold)")
                       : answer.label;
    box.appendChild(el("div", "label", head));
    for (const t of answer.top_k) {
      const row = el("div", "bar");
      row.appendChild(el("span", "name", t.label));
      const track = el("span", "track");
      const fill = el("span", "fill");
      fill.style.display = "block";
      fill.style.width = (100 * t.p).toFixed(1) + "%";
      track.appendChild(fill);
      row.appendChild(track);
      row.appendChild(el("span", "p", (100 * t.p).toFixed(1) + "%"));
      box.appendChild(row);
    }
    return box;
  }

  async function one(file) {
    const card = el("div", "result");
    card.setAttribute("data-file", file.name);
    const thumb = el("img");
    thumb.alt = file.name;
    thumb.src = URL.createObjectURL(file);
    card.appendChild(thumb);
    const status = el("div", "bars", file.name + ": predicting...");
    card.appendChild(status);
    $("results").prepend(card);
    const type = file.type && file.type.startsWith("image/") ? file.type : "application/octet-stream";
    const r = await call("/v1/predict", { method: "POST", body: file, headers: { "Content-Type": type } });
    const answer = await r.json();
    if (!r.ok) {
      status.textContent = file.name + ": " + (answer.error || r.status);
      status.className = "bars error";
      return;
    }
    card.replaceChild(bars(answer), status);
    if (info && info.explain) {
      const e = await call("/v1/explain", { method: "POST", body: file, headers: { "Content-Type": type } });
      if (e.ok) {
        const cam = el("img", "cam");
        cam.alt = "Grad-CAM";
        cam.title = "Grad-CAM for " + decodeURIComponent(e.headers.get("X-Explained-Class") || "");
        cam.src = URL.createObjectURL(await e.blob());
        card.appendChild(cam);
      }
    }
  }

  async function run(files) {
    $("error").textContent = "";
    for (const f of files) {
      try { await one(f); } catch (err) { $("error").textContent = String(err); }
    }
  }

  const drop = $("drop");
  drop.addEventListener("click", () => $("pick").click());
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("pick").click(); });
  $("pick").addEventListener("change", (e) => run(Array.from(e.target.files)));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    run(Array.from(e.dataTransfer.files));
  });
  $("key-input").addEventListener("change", loadModel);
  loadModel();
})();
