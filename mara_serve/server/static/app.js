// MARA Serve chat page: a plain OpenAI-API streaming client (no build step, no dependencies).
//
// It talks to the server exactly as any external front end would: GET /v1/models for the
// picker, POST /v1/chat/completions with `stream: true`, and reads the SSE body with fetch +
// ReadableStream up to `data: [DONE]`. With an agent selected it asks for `mara_trace` and
// marks the tokens where the agent rejected candidates. Model text is only ever inserted as
// text nodes (never as HTML).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const ui = {
    key: $("api-key"), remember: $("remember-key"), model: $("model"),
    reload: $("reload-models"), compare: $("compare"), trace: $("trace"),
    system: $("system"), maxTokens: $("max-tokens"), temperature: $("temperature"),
    newChat: $("new-chat"), hint: $("model-hint"), notice: $("notice"), log: $("log"),
    empty: $("empty"), composer: $("composer"), prompt: $("prompt"), send: $("send"),
    stop: $("stop"), tip: $("tip"),
  };
  const PREFS = "mara.prefs";
  const KEY = "mara.apiKey";
  const state = {
    models: [],          // /v1/models cards
    turns: [],           // {user, answers: {primary: Answer, base?: Answer}}
    streams: new Set(),  // AbortControllers of the streams in flight
  };

  // ---- storage (localStorage may be unavailable: private mode, file://) -------------------
  const store = {
    get(k) { try { return localStorage.getItem(k); } catch { return null; } },
    set(k, v) { try { localStorage.setItem(k, v); } catch { /* not persisted */ } },
    del(k) { try { localStorage.removeItem(k); } catch { /* nothing stored */ } },
  };

  function loadPrefs() {
    let p = {};
    try { p = JSON.parse(store.get(PREFS) || "{}"); } catch { p = {}; }
    const key = store.get(KEY);
    if (key !== null) { ui.key.value = key; ui.remember.checked = true; }
    if (typeof p.compare === "boolean") ui.compare.checked = p.compare;
    if (typeof p.trace === "boolean") ui.trace.checked = p.trace;
    if (p.maxTokens) ui.maxTokens.value = p.maxTokens;
    return p;
  }

  function savePrefs() {
    store.set(PREFS, JSON.stringify({
      model: ui.model.value, compare: ui.compare.checked, trace: ui.trace.checked,
      maxTokens: ui.maxTokens.value,
    }));
    if (ui.remember.checked) store.set(KEY, ui.key.value); else store.del(KEY);
  }

  // ---- HTTP ---------------------------------------------------------------------------------
  class APIError extends Error {
    constructor(message, status = 0) { super(message); this.status = status; }
  }

  function headers() {
    const h = { "Content-Type": "application/json", Accept: "application/json" };
    const key = ui.key.value.trim();
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  }

  // The OpenAI error body is {"error": {"message", "type", "param", "code"}}.
  async function errorOf(response) {
    let text = "";
    try { text = await response.text(); } catch { /* body unreadable */ }
    try {
      const message = JSON.parse(text).error.message;
      if (message) return new APIError(message, response.status);
    } catch { /* not OpenAI-shaped */ }
    return new APIError(`HTTP ${response.status} ${response.statusText}`.trim(), response.status);
  }

  async function request(path, init = {}) {
    let response;
    try {
      response = await fetch(path, { ...init, headers: headers() });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new APIError(`cannot reach the server (${e.message})`);
    }
    if (!response.ok) throw await errorOf(response);
    return response;
  }

  // Yields the `data:` payload of each server-sent event (comments and other fields skipped).
  async function* sseData(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        const events = buffer.split(/\r?\n\r?\n/);
        buffer = events.pop();
        for (const event of events) {
          const data = event.split(/\r?\n/)
            .filter((line) => line.startsWith("data:"))
            .map((line) => line.slice(5).replace(/^ /, ""));
          if (data.length) yield data.join("\n");
        }
      }
    } finally {
      reader.releaseLock();
    }
  }

  // Streams one chat completion into `answer` until [DONE]; throws APIError on any error.
  async function streamChat(answer, messages, signal) {
    const body = {
      model: answer.model, messages, stream: true, stream_options: { include_usage: true },
    };
    const maxTokens = parseInt(ui.maxTokens.value, 10);
    if (maxTokens > 0) body.max_completion_tokens = maxTokens;
    if (isAgent(answer.model)) {
      if (ui.trace.checked) body.mara_trace = true;
    } else if (ui.temperature.value !== "") {
      body.temperature = Number(ui.temperature.value);
    }
    const response = await request("/v1/chat/completions", {
      method: "POST", body: JSON.stringify(body), signal,
    });
    for await (const data of sseData(response.body)) {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new APIError(chunk.error.message || "stream error");
      if (chunk.usage) answer.usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        answer.append(choice.delta?.content || "", choice.mara_trace || []);
        if (choice.finish_reason) answer.finishReason = choice.finish_reason;
      }
    }
    throw new APIError("the connection closed before the answer was complete");
  }

  // ---- models -------------------------------------------------------------------------------
  const byId = (id) => state.models.find((m) => m.id === id);
  const isAgent = (id) => Boolean(byId(id)?.parent);
  const baseOf = (id) => byId(id)?.parent || id;

  async function loadModels(prefer) {
    ui.reload.disabled = true;
    try {
      const list = await (await request("/v1/models")).json();
      state.models = list.data || [];
      renderModels(prefer || ui.model.value);
      showNotice("");
    } catch (e) {
      if (e.status === 401 && !ui.key.value.trim()) {
        showNotice("This server needs an API key: enter it above.", "info");
      } else showNotice(`Could not load models: ${e.message}`);
    } finally {
      ui.reload.disabled = false;
    }
  }

  function renderModels(prefer) {
    const bases = state.models.filter((m) => !m.parent);
    const agents = state.models.filter((m) => m.parent);
    ui.model.replaceChildren();
    for (const [label, group] of [["Agents (MARA decoding)", agents], ["Base models", bases]]) {
      if (!group.length) continue;
      const og = document.createElement("optgroup");
      og.label = label;
      for (const m of group) og.append(new Option(m.id, m.id));
      ui.model.append(og);
    }
    if (byId(prefer)) ui.model.value = prefer;
    else if (state.models.length) ui.model.value = (agents[0] || bases[0]).id;
    updateHint();
  }

  function updateHint() {
    const m = byId(ui.model.value);
    const agent = Boolean(m?.parent);
    ui.compare.disabled = !agent;
    ui.trace.disabled = !agent;
    if (!m) ui.hint.textContent = "";
    else if (agent) {
      ui.hint.textContent = `Agent on ${m.parent}: MARA decoding` +
        (m.description ? ` — ${m.description}` : "");
    } else ui.hint.textContent = "Base model: plain decoding (pick an agent to compare)";
  }

  function showNotice(message, kind = "error") {
    ui.notice.textContent = message;
    ui.notice.className = `notice is-${kind}`;
    ui.notice.hidden = !message;
  }

  // ---- trace → marked tokens ------------------------------------------------------------------
  // A chunk's text is the concatenation of its tokens' texts, except where a token is part of
  // a multi-byte character or held back by a stop string; then the rest of the chunk's text
  // carries the remaining traces together.
  const interesting = (t) => t.rejected > 0 || t.fallback;

  function rejectedOf(t) {
    const n = t.fallback ? t.candidates.length : Math.max(0, t.candidates.length - 1);
    return t.candidate_tokens.slice(0, n).map((tok, i) => ({
      tok, p: t.accept_probs[i], llm: t.llm_probs?.[i],
    }));
  }

  const show = (s) => JSON.stringify(s);
  const pct = (p) => (p == null ? "–" : `${(100 * p).toFixed(p < 0.1 ? 1 : 0)}%`);

  function fillTip(traces) {
    const parts = [];
    for (const t of traces) {
      const sec = document.createElement("div");
      sec.className = "tip-sec";
      const head = document.createElement("p");
      const b = document.createElement("b");
      b.textContent = show(t.token);
      // Ranks are 0-based on the wire; shown 1-based, like the numbered list below.
      head.append(b, t.fallback
        ? ` all ${t.evaluated} judged candidates rejected; kept ` +
          (t.accepted_rank === 0 ? "the model's top-1" : `#${t.accepted_rank + 1}`)
        : ` accepted #${t.accepted_rank + 1} of ${t.num_candidates} candidates` +
          ` · p(accept) ${t.accept_prob == null ? "–" : t.accept_prob.toFixed(2)}`);
      sec.append(head);
      const rejected = rejectedOf(t);
      if (rejected.length) {
        const cap = document.createElement("p");
        cap.className = "tip-cap";
        cap.textContent = `Rejected (${rejected.length}) · p(accept) · model p`;
        const ol = document.createElement("ol");
        for (const r of rejected.slice(0, 8)) {
          const li = document.createElement("li");
          const code = document.createElement("code");
          code.textContent = show(r.tok);
          li.append(code, ` ${r.p == null ? "–" : r.p.toFixed(2)} · ${pct(r.llm)}`);
          ol.append(li);
        }
        if (rejected.length > 8) {
          const li = document.createElement("li");
          li.className = "more-items";
          li.textContent = `… ${rejected.length - 8} more`;
          ol.append(li);
        }
        sec.append(cap, ol);
      }
      parts.push(sec);
    }
    ui.tip.replaceChildren(...parts);
  }

  function showTip(mark) {
    fillTip(mark._traces);
    ui.tip.hidden = false;
    const r = mark.getBoundingClientRect();
    const w = ui.tip.offsetWidth;
    const h = ui.tip.offsetHeight;
    const left = Math.min(Math.max(8, r.left), window.innerWidth - w - 8);
    const below = r.bottom + 6 + h < window.innerHeight;
    ui.tip.style.left = `${left}px`;
    ui.tip.style.top = `${below ? r.bottom + 6 : Math.max(8, r.top - h - 6)}px`;
  }

  const hideTip = () => { ui.tip.hidden = true; };

  // ---- one answer (one model's stream) -------------------------------------------------------
  class Answer {
    constructor(container, model, lane) {
      this.model = model;
      this.lane = lane;
      this.text = "";
      this.tokens = 0;
      this.stats = { traced: 0, rejectedTokens: 0, fallbacks: 0, rejectedCandidates: 0 };
      this.pending = [];  // traces whose text has not arrived yet
      this.usage = null;
      this.finishReason = null;
      this.started = performance.now();
      this.firstTokenAt = null;

      this.el = document.createElement("article");
      this.el.className = `answer ${isAgent(model) ? "agent" : "base"}`;
      const head = document.createElement("header");
      const name = document.createElement("span");
      name.className = "who";
      name.textContent = model;
      const kind = document.createElement("span");
      kind.className = "badge";
      kind.textContent = isAgent(model) ? "agent" : "base";
      head.append(name, kind);
      this.body = document.createElement("div");
      this.body.className = "text";
      this.body.setAttribute("aria-live", "polite");
      this.body.setAttribute("aria-busy", "true");
      this.body.setAttribute("aria-label", `Answer of ${model}`);
      this.status = document.createElement("footer");
      this.status.className = "status";
      this.status.textContent = "waiting…";
      this.el.append(head, this.body, this.status);
      this.el.setAttribute("aria-label", `${model}`);
      container.append(this.el);
    }

    append(content, traces) {
      if (content && this.firstTokenAt === null) this.firstTokenAt = performance.now();
      this.text += content;
      for (const t of traces) this.count(t);
      const queue = this.pending.concat(traces);
      this.pending = [];
      let at = 0;
      let i = 0;
      for (; i < queue.length; i++) {
        const tok = queue[i].token;
        if (!tok || !content.startsWith(tok, at)) break;
        this.put(tok, [queue[i]]);
        at += tok.length;
      }
      const rest = queue.slice(i);
      if (at < content.length) this.put(content.slice(at), rest);
      else this.pending = rest;  // e.g. the first half of a character: its text comes later
      if (content || traces.length) this.progress();
    }

    count(t) {
      this.tokens += 1;
      this.stats.traced += 1;
      if (t.fallback) this.stats.fallbacks += 1;
      else if (t.rejected > 0) this.stats.rejectedTokens += 1;
      this.stats.rejectedCandidates += t.rejected;
    }

    put(text, traces) {
      const marked = traces.filter(interesting);
      if (!marked.length) {
        const last = this.body.lastChild;
        if (last && last.nodeType === Node.TEXT_NODE) last.appendData(text);
        else this.body.append(text);
        return;
      }
      const span = document.createElement("span");
      span.className = `tok ${marked.some((t) => t.fallback) ? "fallback" : "rejected"}`;
      span.textContent = text;
      span._traces = marked;
      span.tabIndex = this.body.querySelector(".tok") ? -1 : 0;  // roving tabindex
      span.setAttribute("aria-describedby", "tip");
      this.body.append(span);
    }

    progress() {
      const n = this.usage?.completion_tokens ?? this.tokens;
      this.status.textContent = n ? `streaming… ${n} tokens` : "streaming…";
      followScroll();
    }

    end(kind, message) {
      this.body.setAttribute("aria-busy", "false");
      this.el.classList.add(kind);
      const parts = [];
      const n = this.usage?.completion_tokens ?? this.tokens;
      if (n) {
        const secs = (performance.now() - (this.firstTokenAt ?? this.started)) / 1000;
        parts.push(`${n} tokens`);
        if (secs > 0.05 && n > 1) parts.push(`${(n / secs).toFixed(1)} tok/s`);
      }
      const s = this.stats;
      if (s.traced) {
        parts.push(`${s.rejectedTokens} with rejections`, `${s.fallbacks} fallbacks`,
          `${s.rejectedCandidates} candidates rejected`);
      }
      if (kind === "done") parts.push(this.finishReason === "length" ? "hit max tokens" : "done");
      if (kind === "stopped") parts.push("stopped");
      this.status.textContent = parts.join(" · ");
      if (kind === "failed") {
        const err = document.createElement("p");
        err.className = "error";
        err.setAttribute("role", "alert");
        err.textContent = message;
        this.el.insertBefore(err, this.status);
      }
      if (!this.text && kind !== "failed") this.body.classList.add("blank");
    }
  }

  // ---- conversation ---------------------------------------------------------------------------
  function followScroll() {
    const doc = document.scrollingElement;
    if (doc.scrollHeight - doc.scrollTop - doc.clientHeight < 160) {
      doc.scrollTop = doc.scrollHeight;
    }
  }

  function messagesFor(lane) {
    const messages = [];
    const system = ui.system.value.trim();
    if (system) messages.push({ role: "system", content: system });
    for (const turn of state.turns) {
      messages.push({ role: "user", content: turn.user });
      const a = turn.answers[lane] || turn.answers.primary;
      if (a?.text) messages.push({ role: "assistant", content: a.text });
    }
    return messages;
  }

  function setBusy(busy) {
    ui.send.hidden = busy;
    ui.stop.hidden = !busy;
    ui.send.disabled = busy;
    // The button that was focused disappears: keep keyboard focus on its replacement.
    if (busy && document.activeElement === ui.send) ui.stop.focus({ preventScroll: true });
    if (!busy && document.activeElement === ui.stop) ui.prompt.focus({ preventScroll: true });
  }

  async function run(answer, messages) {
    const controller = new AbortController();
    state.streams.add(controller);
    try {
      await streamChat(answer, messages, controller.signal);
      answer.end("done");
    } catch (e) {
      if (e.name === "AbortError") answer.end("stopped");
      else answer.end("failed", e.message || String(e));
    } finally {
      state.streams.delete(controller);
    }
  }

  async function send(text) {
    const model = ui.model.value;
    if (!model) {
      showNotice("No model to talk to: check the API key and reload the models.");
      return;
    }
    const compare = ui.compare.checked && isAgent(model);
    const lanes = compare ? [["base", baseOf(model)], ["primary", model]] : [["primary", model]];
    const requests = lanes.map(([lane]) => [lane, messagesFor(lane)]);
    const turn = { user: text, answers: {} };
    const user = document.createElement("div");
    user.className = "msg user";
    user.textContent = text;
    const row = document.createElement("div");
    row.className = `answers${compare ? " compare" : ""}`;
    ui.empty.hidden = true;
    ui.log.append(user, row);
    for (const [lane, id] of lanes) turn.answers[lane] = new Answer(row, id, lane);
    state.turns.push(turn);
    followScroll();
    setBusy(true);
    await Promise.all(requests.map(([lane, history]) => {
      history.push({ role: "user", content: text });
      return run(turn.answers[lane], history);
    }));
    setBusy(false);
  }

  function stopAll() {
    for (const c of state.streams) c.abort();
  }

  function newChat() {
    stopAll();
    state.turns = [];
    ui.log.replaceChildren(ui.empty);
    ui.empty.hidden = false;
    hideTip();
    ui.prompt.focus();
  }

  // ---- events ---------------------------------------------------------------------------------
  function autoGrow() {
    ui.prompt.style.height = "auto";
    ui.prompt.style.height = `${Math.min(ui.prompt.scrollHeight, 240)}px`;
  }

  ui.composer.addEventListener("submit", (e) => {
    e.preventDefault();
    const text = ui.prompt.value.trim();
    if (!text || state.streams.size) return;
    ui.prompt.value = "";
    autoGrow();
    send(text);
  });
  ui.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      ui.composer.requestSubmit();
    } else if (e.key === "Escape") stopAll();
  });
  ui.prompt.addEventListener("input", autoGrow);
  ui.stop.addEventListener("click", stopAll);
  ui.newChat.addEventListener("click", newChat);
  ui.reload.addEventListener("click", () => loadModels());
  ui.key.addEventListener("change", () => { savePrefs(); loadModels(); });
  ui.model.addEventListener("change", () => { updateHint(); savePrefs(); });
  for (const el of [ui.remember, ui.compare, ui.trace, ui.maxTokens]) {
    el.addEventListener("change", savePrefs);
  }
  document.getElementById("settings").addEventListener("submit", (e) => {
    e.preventDefault();  // Enter in the key field: reload the models
    loadModels();
  });

  // Tooltips on marked tokens: hover or keyboard focus; arrows move between an answer's marks.
  ui.log.addEventListener("mouseover", (e) => {
    const mark = e.target.closest?.(".tok");
    if (mark?._traces) showTip(mark);
  });
  ui.log.addEventListener("mouseout", (e) => {
    if (e.target.closest?.(".tok") && document.activeElement !== e.target) hideTip();
  });
  ui.log.addEventListener("focusin", (e) => {
    if (e.target._traces) showTip(e.target);
  });
  ui.log.addEventListener("focusout", hideTip);
  ui.log.addEventListener("keydown", (e) => {
    const mark = e.target;
    if (!mark._traces) return;
    if (e.key === "Escape") { hideTip(); return; }
    const marks = [...mark.parentElement.querySelectorAll(".tok")];
    const i = marks.indexOf(mark);
    const next = { ArrowRight: i + 1, ArrowDown: i + 1, ArrowLeft: i - 1, ArrowUp: i - 1,
      Home: 0, End: marks.length - 1 }[e.key];
    if (next === undefined || !marks[next]) return;
    e.preventDefault();
    mark.tabIndex = -1;
    marks[next].tabIndex = 0;
    marks[next].focus();
  });
  window.addEventListener("scroll", () => {
    if (!ui.tip.hidden && !document.activeElement?._traces) hideTip();
  }, { passive: true });

  const prefs = loadPrefs();
  loadModels(prefs.model);
})();
