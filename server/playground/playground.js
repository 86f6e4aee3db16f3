// The playground: chat with a session and watch what its cache keeps. Plain ES module, no build step,
// nothing fetched but this server's API (/info, /sessions, /v1/chat/completions, the retention route).

const $ = (id) => document.getElementById(id);
const state = { model: null, classes: [], panes: [], key: sessionStorage.getItem("toyllm-key") || "", busy: null };

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

async function api(path, options = {}) {
  const headers = { "Content-Type": "application/json", ...(options.headers || {}) };
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    $("key-label").hidden = false;
    throw new Error("this server wants an API key: enter it above");
  }
  return response;
}

async function json(path, options) {
  const response = await api(path, options);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error ? body.error.message : `HTTP ${response.status}`);
  return body;
}

// ------------------------------------------------------------------------------- cache classes
function classLabel(c) {
  const p = c.cache;
  const extra = p.policy === "full" ? `up to ${c.max_tokens} tokens` : `budget ${p.budget}${p.cold_bits ? `, cold int${p.cold_bits}` : ""}`;
  return `${p.policy} (${extra})`;
}

function fillClasses(info) {
  // One entry per cache a request can name (the full cache's classes differ only in size).
  const seen = new Set();
  state.classes = info.cache_classes.filter((c) => {
    const key = JSON.stringify(c.cache.policy === "full" ? { policy: "full" } : c.cache);
    if (seen.has(key)) return false;
    seen.add(key);
    return true;
  });
  for (const select of [$("class-a"), $("class-b")]) {
    select.replaceChildren(...state.classes.map((c, i) => new Option(classLabel(c), String(i))));
  }
  const full = state.classes.findIndex((c) => c.cache.policy === "full");
  $("class-b").value = String(full >= 0 ? full : Math.min(1, state.classes.length - 1));
}

function spec(c) {
  return c.cache.policy === "full" ? { policy: "full" } : c.cache;
}

// ------------------------------------------------------------------------------- panes
function makePane(classIndex) {
  const node = $("pane-template").content.firstElementChild.cloneNode(true);
  const pane = { node, cls: state.classes[classIndex], sessionId: null, texts: [], hot: [], cold: [] };
  node.querySelector(".pane-title").textContent = classLabel(pane.cls);
  node.dataset.policy = pane.cls.cache.policy;
  return pane;
}

function layout() {
  const panes = [makePane(Number($("class-a").value))];
  if ($("compare").checked) panes.push(makePane(Number($("class-b").value)));
  state.panes = panes;
  $("panes").replaceChildren(...panes.map((p) => p.node));
  for (const p of panes) p.node.querySelector(".memory").textContent = "a new session: nothing cached yet";
  $("panes").dataset.count = String(panes.length);
}

// ------------------------------------------------------------------------------- a turn
async function ensureSession(pane) {
  if (pane.sessionId) return;
  const body = await json("/sessions", { method: "POST", body: JSON.stringify({ cache: spec(pane.cls) }) });
  pane.sessionId = body.session_id;
  pane.node.dataset.session = body.session_id;
}

async function streamReply(pane, message, signal) {
  const reply = pane.node.querySelector(".reply");
  reply.hidden = false;
  reply.textContent = "";
  const body = { model: state.model, messages: [{ role: "user", content: message }], stream: true,
                 max_tokens: Number($("max-tokens").value) || 128, temperature: Number($("temperature").value) || 0 };
  const response = await api("/v1/chat/completions", { method: "POST", body: JSON.stringify(body), signal,
                                                       headers: { "X-Session-ID": pane.sessionId } });
  if (!response.ok) {
    const error = await response.json().catch(() => ({}));
    throw new Error(error.error ? error.error.message : `HTTP ${response.status}`);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r/g, "");  // events end with a blank line (CRLF or LF)
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") {  // read on to the end of the stream: the response closes whole
          document.body.dataset.streamsDone = String(Number(document.body.dataset.streamsDone || 0) + 1);
          continue;
        }
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) reply.textContent += delta.content;
      }
    }
  }
}

async function refresh(pane) {
  const id = pane.sessionId;
  const kept = await json(`/sessions/${id}/retention?texts_from=${pane.texts.length}`);
  pane.texts = pane.texts.slice(0, kept.texts_from).concat(kept.texts);
  const counts = (b64) => {
    const bytes = Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));
    return kept.count_bytes === 1 ? Array.from(bytes) : Array.from(new Uint16Array(bytes.buffer));
  };
  pane.hot = counts(kept.hot);
  pane.cold = counts(kept.cold);
  const pairs = Math.max(1, kept.layers * kept.kv_heads);
  drawConversation(pane, pairs);
  drawMap(pane.node.querySelector(".retention-map"), kept);
  drawHistogram(pane.node.querySelector(".histogram"), pane.hot, pane.cold, pairs);
  const info = await json(`/sessions/${id}`);
  const c = info.cache;
  const mb = (n) => `${(n / 1e6).toFixed(n < 1e6 ? 3 : 1)} MB`;
  pane.node.querySelector(".memory").textContent =
    `${c.tokens_seen} tokens: ${mb(c.bytes)} held against ${mb(c.full_bytes)} for a full cache ` +
    `(${c.compression_ratio.toFixed(1)}x) · hot ${mb(c.hot_bytes)} · cold ${mb(c.cold_bytes)} · ` +
    `${c.compressions} compressions · ${c.tokens_evicted} tokens evicted per head · ${info.memory.state}`;
  pane.node.dataset.turns = String(info.turns);
}

function drawConversation(pane, pairs) {
  const box = pane.node.querySelector(".conversation");
  const spans = pane.texts.map((text, i) => {
    const span = document.createElement("span");
    const hot = pane.hot[i] / pairs;
    const cold = pane.cold[i] / pairs;
    span.className = "tok";
    span.textContent = text;
    span.dataset.hot = hot.toFixed(3);
    span.dataset.cold = cold.toFixed(3);
    span.style.background = `rgba(var(--hot), ${(0.08 + 0.5 * hot).toFixed(3)})`;
    if (cold > 0) span.style.boxShadow = `inset 0 -3px rgba(var(--cold), ${(0.3 + 0.7 * cold).toFixed(3)})`;
    span.title = `position ${i}: hot in ${pane.hot[i]} of ${pairs} (layer, KV head) pairs, cold in ${pane.cold[i]}`;
    return span;
  });
  box.replaceChildren(...spans);
  box.scrollTop = box.scrollHeight;
  pane.node.querySelector(".reply").hidden = true;
}

function drawMap(canvas, kept) {
  const bytes = Uint8Array.from(atob(kept.map), (ch) => ch.charCodeAt(0));
  const cols = Math.max(1, kept.map_columns);
  canvas.width = cols;
  canvas.height = Math.max(1, kept.layers);
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(cols, canvas.height);
  for (let i = 0; i < bytes.length; i++) {
    const v = bytes[i] / 255;  // share kept hot: white (none) to blue (all)
    image.data[4 * i] = Math.round(255 - v * (255 - 37));
    image.data[4 * i + 1] = Math.round(255 - v * (255 - 99));
    image.data[4 * i + 2] = Math.round(255 - v * (255 - 235));
    image.data[4 * i + 3] = 255;
  }
  ctx.putImageData(image, 0, 0);
  canvas.style.height = `${Math.min(160, 4 * canvas.height)}px`;
  canvas.dataset.columns = String(cols);
}

function drawHistogram(canvas, hot, cold, pairs) {
  const bins = Math.max(1, Math.min(64, hot.length));
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const width = canvas.width / bins;
  for (let b = 0; b < bins; b++) {
    const lo = Math.floor((b * hot.length) / bins);
    const hi = Math.max(lo + 1, Math.floor(((b + 1) * hot.length) / bins));
    let h = 0;
    let c = 0;
    for (let i = lo; i < hi && i < hot.length; i++) { h += hot[i]; c += cold[i]; }
    const hs = h / (pairs * (hi - lo));
    const cs = c / (pairs * (hi - lo));
    ctx.fillStyle = "rgb(37, 99, 235)";
    ctx.fillRect(b * width + 1, canvas.height * (1 - hs), width - 2, canvas.height * hs);
    ctx.fillStyle = "rgb(234, 88, 12)";
    ctx.fillRect(b * width + 1, canvas.height * (1 - hs - cs), width - 2, canvas.height * cs);
  }
  canvas.dataset.bins = String(bins);
}

async function send(event) {
  event.preventDefault();
  const message = $("message").value.trim();
  if (!message || state.busy) return;
  const controller = new AbortController();
  state.busy = controller;
  $("send").disabled = true;
  $("stop").disabled = false;
  setStatus("generating...");
  try {
    await Promise.all(state.panes.map(async (pane) => {
      await ensureSession(pane);
      try {
        await streamReply(pane, message, controller.signal);
      } catch (error) {
        if (error.name !== "AbortError") throw error;
      }
      const replied = performance.now();
      await refresh(pane);
      pane.node.dataset.refreshMs = (performance.now() - replied).toFixed(1);  // the reply's end to its views
    }));
    $("message").value = "";
    setStatus("");
  } catch (error) {
    setStatus(error.message, true);
  } finally {
    state.busy = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

async function start() {
  $("api-key").value = state.key;
  $("api-key").addEventListener("change", () => {
    state.key = $("api-key").value;
    sessionStorage.setItem("toyllm-key", state.key);
    start();
  });
  try {
    const info = await json("/info");
    state.model = info.model.name;
    if (!info.chat.template) setStatus(`${state.model} has no chat template: start the server with TOYLLM_CHAT_TEMPLATE`, true);
    fillClasses(info);
    layout();
    document.body.dataset.ready = "true";
  } catch (error) {
    setStatus(error.message, true);
  }
}

$("composer").addEventListener("submit", send);
$("message").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) send(e);
});
$("stop").addEventListener("click", () => state.busy && state.busy.abort());
$("new-session").addEventListener("click", () => { if (!state.busy) layout(); });
for (const id of ["class-a", "class-b"]) $(id).addEventListener("change", () => { if (!state.busy) layout(); });
$("compare").addEventListener("change", () => {
  $("class-b").disabled = !$("compare").checked;
  if (!state.busy) layout();
});
start();
