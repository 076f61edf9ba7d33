// The CapsNet page. Every number and picture on it is an answer of this service's API: /predict (the
// capsule lengths and poses), /reconstruct?format=png (the decoder's picture of a pose, edited or not) and
// /routing-trace?format=png (the coupling heatmaps). The page itself only draws the ink and the bars.
// With several models served, a picker (from /metadata's `models`) chooses the one every call names
// (`?model=`); the default model is chosen first.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const pad = $("pad");
  const padCtx = pad.getContext("2d");
  const recon = $("recon");
  const reconCtx = recon.getContext("2d");
  const heatmap = $("heatmap");
  const OFFSET = 0.25; // slider range: the paper's pose perturbations, Fig. 4

  const state = {
    key: sessionStorage.getItem("capsnet-api-key") || "",
    model: null, // the model every call names; null until /metadata said which one is the default
    preprocess: "mnist", // that model's default preprocessing, for the texts
    labels: [],
    file: null, // a chosen or dropped file, sent as it is until the user draws again
    sent: null, // {blob, type} of the last analysed input, for the heatmap's re-draws
    poses: null, // (classes, 16) from /predict
    k: null, // the predicted class
    seq: 0,
  };

  // ------------------------------------------------------------------------------------------------
  // API calls: the bearer key when one is set; JSON errors shown with their `detail`

  class ApiError extends Error {}

  function withModel(path) {
    if (state.model === null) return path;
    return `${path}${path.includes("?") ? "&" : "?"}model=${encodeURIComponent(state.model)}`;
  }

  async function api(path, body, type) {
    const headers = {};
    if (state.key) headers.Authorization = `Bearer ${state.key}`;
    if (type) headers["Content-Type"] = type;
    const method = body === undefined ? "GET" : "POST";
    const response = await fetch(withModel(path), { method, body, headers });
    if (response.ok) return response;
    let detail = response.statusText;
    try {
      detail = (await response.json()).detail || detail;
    } catch (_) {
      /* not JSON: keep the status text */
    }
    if (response.status === 401) showKeyForm();
    throw new ApiError(`${path.split("?")[0]}: ${response.status} ${detail}`);
  }

  function say(text, isError = false) {
    $("status").textContent = text;
    $("status").classList.toggle("error", isError);
  }

  function showKeyForm() {
    $("key-form").hidden = false;
    document.body.dataset.needsKey = "1";
    $("key").focus();
  }

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = $("key").value.trim();
    sessionStorage.setItem("capsnet-api-key", state.key);
    loadMetadata().then((ok) => {
      if (ok && state.sent) analyse(state.sent);
    });
  });

  const PREPROCESSING = {
    mnist: "brings them to MNIST form (crop, fit into 20×20, centre of mass in 28×28)",
    fashion: "brings them to Fashion-MNIST form (trim, longest side 28, centred, bright on black)",
    none: "takes them as the 28×28 images they must be",
  };

  function prompt() {
    return state.preprocess === "mnist"
      ? "Draw a digit on the black pad, or drop an image file on it."
      : "Draw on the black pad, or drop an image file on it.";
  }

  // /metadata of the chosen model (the default one first): its labels, and the picker of every model
  async function loadMetadata() {
    try {
      const meta = await (await api("/metadata")).json();
      state.model = meta.name;
      state.preprocess = meta.preprocess;
      state.labels = meta.labels;
      $("model").textContent =
        `model ${meta.name} ${meta.version} · r = ${meta.routing_iterations} routing iterations · ` +
        `${meta.providers.join(", ")}`;
      fillPicker(meta.models);
      $("preprocess-note").textContent = PREPROCESSING[meta.preprocess] || PREPROCESSING.mnist;
      $("input-title").textContent = meta.preprocess === "mnist" ? "Digit" : "Image";
      buildBars(meta.labels);
      document.body.dataset.needsKey = "0";
      document.body.dataset.model = meta.name;
      say(prompt());
      return true;
    } catch (err) {
      say(err instanceof ApiError && err.message.includes(" 401 ")
        ? "This service needs an API key: enter it above." : err.message, true);
      if (err.message.includes(" 503 ")) setTimeout(loadMetadata, 1000); // still loading the model
      return false;
    }
  }

  function fillPicker(models) {
    const picker = $("model-picker");
    picker.replaceChildren(...models.map((m) => {
      const option = document.createElement("option");
      option.value = m.name;
      option.textContent = `${m.name} (${m.labels.length} classes)`;
      option.selected = m.name === state.model;
      return option;
    }));
    $("model-pick").hidden = models.length < 2;
  }

  $("model-picker").addEventListener("change", async (event) => {
    state.model = event.target.value;
    state.seq++; // an analysis on its way for the other model is not shown
    if (await loadMetadata() && state.sent) analyse(state.sent);
  });

  // ------------------------------------------------------------------------------------------------
  // The drawing pad: pointer events cover the mouse, touch and pens

  function clearPad() {
    padCtx.fillStyle = "#000";
    padCtx.fillRect(0, 0, pad.width, pad.height);
  }

  function padPoint(event) {
    const box = pad.getBoundingClientRect();
    return [((event.clientX - box.left) * pad.width) / box.width,
            ((event.clientY - box.top) * pad.height) / box.height];
  }

  function ink(from, to) {
    padCtx.strokeStyle = "#fff";
    padCtx.lineWidth = 20;
    padCtx.lineCap = "round";
    padCtx.lineJoin = "round";
    padCtx.beginPath();
    padCtx.moveTo(...from);
    padCtx.lineTo(...to);
    padCtx.stroke();
  }

  let last = null;
  pad.addEventListener("pointerdown", (event) => {
    event.preventDefault();
    pad.setPointerCapture(event.pointerId);
    state.file = null; // from now on the pad is the input
    last = padPoint(event);
    ink(last, last);
  });
  pad.addEventListener("pointermove", (event) => {
    if (!last) return;
    const p = padPoint(event);
    ink(last, p);
    last = p;
  });
  const endStroke = () => {
    if (!last) return;
    last = null;
    pad.toBlob((blob) => analyse({ blob, type: "image/png" }), "image/png");
  };
  pad.addEventListener("pointerup", endStroke);
  pad.addEventListener("pointercancel", endStroke);

  $("clear").addEventListener("click", () => {
    clearPad();
    state.file = null;
    say(prompt());
  });

  // files: chosen, or dropped anywhere on the page
  async function useFile(file) {
    state.file = file;
    try {
      const bitmap = await createImageBitmap(file);
      const s = Math.min(pad.width / bitmap.width, pad.height / bitmap.height);
      const w = bitmap.width * s;
      const h = bitmap.height * s;
      clearPad();
      padCtx.drawImage(bitmap, (pad.width - w) / 2, (pad.height - h) / 2, w, h);
    } catch (_) {
      clearPad(); // a format the browser cannot show (e.g. TIFF): the service may still read it
    }
    analyse({ blob: file, type: file.type || "application/octet-stream" });
  }
  $("file").addEventListener("change", (event) => {
    if (event.target.files[0]) useFile(event.target.files[0]);
    event.target.value = "";
  });
  document.addEventListener("dragover", (event) => {
    event.preventDefault();
    pad.classList.add("drop");
  });
  document.addEventListener("dragleave", () => pad.classList.remove("drop"));
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    pad.classList.remove("drop");
    if (event.dataTransfer.files[0]) useFile(event.dataTransfer.files[0]);
  });

  // ------------------------------------------------------------------------------------------------
  // One analysis: /predict, then the reconstruction and the heatmaps of the same input

  async function analyse(input) {
    const seq = ++state.seq;
    state.sent = input;
    document.body.dataset.busy = "1";
    say("asking the model…");
    try {
      const answer = await (await api("/predict", input.blob, input.type)).json();
      if (seq !== state.seq) return; // a newer drawing is on its way
      const p = answer.predictions[0];
      state.poses = p.poses;
      state.k = p.class_index;
      showPrediction(p);
      buildSliders(p.poses[p.class_index].length);
      await Promise.all([redrawReconstruction(), drawHeatmap(input, seq)]);
      if (seq !== state.seq) return;
      say(`class ${p.label}: capsule length ${p.probability.toFixed(3)}. Move the sliders to edit its pose.`);
      document.body.dataset.analysed = String(seq);
    } catch (err) {
      if (seq === state.seq) say(err.message, true);
    } finally {
      if (seq === state.seq) document.body.dataset.busy = "0";
    }
  }

  function buildBars(labels) {
    const bars = $("bars");
    bars.replaceChildren();
    bars.classList.toggle("names", labels.some((label) => label.length > 2)); // class names, not digits
    labels.forEach((label, j) => {
      const col = document.createElement("div");
      col.className = "col";
      col.dataset.class = String(j);
      col.title = `class ${label}`;
      col.innerHTML = `<div class="track"><div class="bar"><span></span></div></div>` +
        `<div class="label"></div>`;
      col.querySelector(".label").textContent = label;
      bars.append(col);
    });
  }

  function showPrediction(p) {
    if ($("bars").children.length !== p.probabilities.length) {
      buildBars(state.labels.length === p.probabilities.length
        ? state.labels : p.probabilities.map((_, j) => String(j)));
    }
    [...$("bars").children].forEach((col, j) => {
      const v = p.probabilities[j];
      const bar = col.querySelector(".bar");
      bar.style.height = `${(100 * v).toFixed(3)}%`;
      bar.dataset.value = String(v);
      bar.querySelector("span").textContent = v.toFixed(3);
      col.classList.toggle("best", j === p.class_index);
      col.title = `class ${col.querySelector(".label").textContent}: |v| = ${v.toFixed(4)}`;
    });
    $("predicted").textContent = p.label;
    $("predicted").dataset.classIndex = String(p.class_index);
    $("predicted-length").textContent = `(capsule length ${p.probability.toFixed(3)})`;
    $("recon-class").textContent = p.label;
  }

  // ------------------------------------------------------------------------------------------------
  // The pose sliders and the live reconstruction

  function buildSliders(dims) {
    const box = $("sliders");
    if (box.children.length !== dims) {
      box.replaceChildren();
      for (let d = 0; d < dims; d++) {
        const row = document.createElement("label");
        row.className = "slider";
        row.innerHTML = `<span>d${d}</span><input type="range" min="${-OFFSET}" max="${OFFSET}" step="0.01"` +
          ` value="0" data-dim="${d}"><output>+0.00</output>`;
        row.querySelector("input").addEventListener("input", onSlide);
        box.append(row);
      }
    }
    for (const input of box.querySelectorAll("input")) {
      input.value = "0";
      input.nextElementSibling.textContent = "+0.00";
    }
    $("reset").disabled = false;
  }

  function onSlide(event) {
    const v = Number(event.target.value);
    event.target.nextElementSibling.textContent = `${v >= 0 ? "+" : ""}${v.toFixed(2)}`;
    redrawReconstruction().catch((err) => say(err.message, true));
  }

  $("reset").addEventListener("click", () => {
    buildSliders(state.poses[state.k].length);
    redrawReconstruction().catch((err) => say(err.message, true));
  });

  function editedPoses() {
    const poses = state.poses.map((row) => row.slice());
    for (const input of $("sliders").querySelectorAll("input")) {
      poses[state.k][Number(input.dataset.dim)] += Number(input.value);
    }
    return poses;
  }

  // One request at a time; slider moves during it are folded into one more request with the latest pose.
  let running = null;
  let dirty = false;
  function redrawReconstruction() {
    dirty = true;
    recon.dataset.pending = "1";
    if (!running) {
      running = (async () => {
        try {
          while (dirty) {
            dirty = false;
            const body = JSON.stringify({ poses: editedPoses() });
            const png = await (await api(`/reconstruct?format=png&class_index=${state.k}`, body,
              "application/json")).blob();
            const bitmap = await createImageBitmap(png);
            reconCtx.drawImage(bitmap, 0, 0, recon.width, recon.height);
            recon.dataset.version = String(Number(recon.dataset.version) + 1);
          }
        } finally {
          running = null;
          recon.dataset.pending = "0";
        }
      })();
    }
    return running;
  }

  // ------------------------------------------------------------------------------------------------
  // Routing heatmaps

  let heatmapUrl = null;
  async function drawHeatmap(input, seq) {
    const weighted = $("weighted").checked ? "&weighted=true" : "";
    const png = await (await api(`/routing-trace?format=png${weighted}`, input.blob, input.type)).blob();
    if (seq !== state.seq) return;
    if (heatmapUrl) URL.revokeObjectURL(heatmapUrl);
    heatmapUrl = URL.createObjectURL(png);
    await new Promise((resolve, reject) => {
      heatmap.onload = resolve;
      heatmap.onerror = () => reject(new Error("the heatmap PNG could not be shown"));
      heatmap.src = heatmapUrl;
    });
    heatmap.dataset.version = String(Number(heatmap.dataset.version) + 1);
  }

  $("weighted").addEventListener("change", () => {
    if (state.sent) drawHeatmap(state.sent, state.seq).catch((err) => say(err.message, true));
  });

  clearPad();
  if (state.key) $("key").value = state.key;
  loadMetadata();
})();
