// tokenmill chat page: talks to the server's own OpenAI endpoints (/v1/models, /v1/chat/completions with
// stream=true) like any other client. Model text only ever reaches the page through TokenmillMarkdown
// (which escapes it first) or textContent.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const els = {
    model: $("model"),
    messages: $("messages"),
    empty: $("empty"),
    composer: $("composer"),
    prompt: $("prompt"),
    send: $("send"),
    stop: $("stop"),
    newChat: $("new-chat"),
    toggleSettings: $("toggle-settings"),
    closeSettings: $("close-settings"),
    system: $("system-prompt"),
    temperature: $("temperature"),
    topP: $("top-p"),
    maxTokens: $("max-tokens"),
    seed: $("seed"),
    jsonMode: $("json-mode"),
    jsonFields: $("json-fields"),
    schemaName: $("schema-name"),
    schema: $("schema"),
    apiKey: $("api-key"),
  };
  const SETTINGS_KEY = "tokenmill-chat-settings";
  const API_KEY_KEY = "tokenmill-chat-api-key"; // per tab (sessionStorage), never in localStorage
  const PERSISTED = ["system", "temperature", "topP", "maxTokens", "seed", "jsonMode", "schemaName", "schema"];
  const DEFAULT_SCHEMA = JSON.stringify(
    {
      type: "object",
      properties: { answer: { type: "string" }, confidence: { type: "number", minimum: 0, maximum: 1 } },
      required: ["answer", "confidence"],
    },
    null,
    2,
  );

  let modelName = null;
  const history = []; // the turns sent as context: {role, content}
  let current = null; // the reply in flight: {controller}
  let conversation = 0; // bumped by "New chat", so that a reply stopped by it stays out of the new history
  // Touch keyboards have no Shift+Enter: there Enter is a new line and the Send button sends.
  const enterSends = !window.matchMedia("(pointer: coarse)").matches;

  // ---- settings ---------------------------------------------------------------------------------------
  function loadSettings() {
    let saved = {};
    try {
      saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}") || {};
    } catch (e) {
      saved = {};
    }
    for (const name of PERSISTED) {
      if (!(name in saved)) continue;
      if (els[name].type === "checkbox") els[name].checked = Boolean(saved[name]);
      else els[name].value = String(saved[name]);
    }
    if (!els.schema.value.trim()) els.schema.value = DEFAULT_SCHEMA;
    try {
      els.apiKey.value = sessionStorage.getItem(API_KEY_KEY) || "";
    } catch (e) {
      /* storage disabled: the key lives in the field only */
    }
    els.jsonFields.hidden = !els.jsonMode.checked;
  }

  function saveSettings() {
    const values = {};
    for (const name of PERSISTED) values[name] = els[name].type === "checkbox" ? els[name].checked : els[name].value;
    try {
      localStorage.setItem(SETTINGS_KEY, JSON.stringify(values));
      sessionStorage.setItem(API_KEY_KEY, els.apiKey.value);
    } catch (e) {
      /* storage disabled */
    }
  }

  function number(el, label, { integer = false } = {}) {
    const raw = el.value.trim();
    if (!raw) return undefined;
    const value = Number(raw);
    if (!Number.isFinite(value) || (integer && !Number.isInteger(value))) {
      throw new Error(`${label} must be ${integer ? "an integer" : "a number"}, got "${raw}"`);
    }
    return value;
  }

  /** The request body for `messages`; throws an Error with a readable message for invalid settings. */
  function requestBody(messages) {
    const body = { messages, stream: true, stream_options: { include_usage: true } };
    if (modelName) body.model = modelName;
    const fields = {
      temperature: number(els.temperature, "Temperature"),
      top_p: number(els.topP, "top_p"),
      max_tokens: number(els.maxTokens, "max_tokens", { integer: true }),
      seed: number(els.seed, "Seed", { integer: true }),
    };
    for (const [key, value] of Object.entries(fields)) if (value !== undefined) body[key] = value;
    if (els.jsonMode.checked) {
      let schema;
      try {
        schema = JSON.parse(els.schema.value);
      } catch (e) {
        throw new Error(`The JSON schema is not valid JSON: ${e.message}`);
      }
      body.response_format = {
        type: "json_schema",
        json_schema: { name: els.schemaName.value.trim() || "reply", schema },
      };
    }
    return body;
  }

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = els.apiKey.value.trim();
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  }

  /** The server's error message from an error response (OpenAI body `{error: {message, param}}`). */
  async function errorMessage(resp) {
    let text = "";
    try {
      text = await resp.text();
    } catch (e) {
      /* body unreadable */
    }
    try {
      const err = JSON.parse(text).error;
      if (err && err.message) return err.message + (err.param ? ` (parameter: ${err.param})` : "");
    } catch (e) {
      /* not JSON */
    }
    return text.trim() || resp.statusText || "request failed";
  }

  // ---- model name ---------------------------------------------------------------------------------------
  async function loadModel() {
    els.model.classList.remove("bad");
    els.model.removeAttribute("data-ready");
    try {
      const resp = await fetch("v1/models", { headers: headers() });
      if (!resp.ok) {
        modelName = null;
        els.model.textContent = `${resp.status}: ${await errorMessage(resp)}`;
        els.model.classList.add("bad");
        if (resp.status === 401 || resp.status === 403) {
          setSettingsOpen(true);
          els.apiKey.focus();
        }
        return;
      }
      const card = ((await resp.json()).data || [])[0];
      modelName = card ? card.id : null;
      els.model.textContent = modelName || "(no model)";
      if (card && card.max_model_len) els.model.title = `${card.id}: context of ${card.max_model_len} tokens`;
      els.model.dataset.ready = "1";
    } catch (e) {
      modelName = null;
      els.model.textContent = "server unreachable";
      els.model.classList.add("bad");
    }
  }

  // ---- conversation view -----------------------------------------------------------------------------------
  function nearBottom() {
    const m = els.messages;
    return m.scrollHeight - m.scrollTop - m.clientHeight < 48;
  }

  function scrollDown(force) {
    if (force || nearBottom()) els.messages.scrollTop = els.messages.scrollHeight;
  }

  function addMessage(kind, label) {
    els.empty.hidden = true;
    const wrap = document.createElement("div");
    wrap.className = `msg ${kind}`;
    const role = document.createElement("div");
    role.className = "role";
    role.textContent = label;
    const body = document.createElement("div");
    body.className = kind === "assistant" ? "body md" : "body";
    wrap.append(role, body);
    els.messages.append(wrap);
    return { wrap, body };
  }

  function addUserMessage(text) {
    const view = addMessage("user", "You");
    view.body.textContent = text;
    scrollDown(true);
    return view;
  }

  function showError(text, view) {
    const target = view || addMessage("error", "Error");
    if (view) {
      const box = document.createElement("div");
      box.className = "error-text";
      box.setAttribute("role", "alert");
      box.textContent = text;
      view.wrap.append(box);
    } else {
      target.body.setAttribute("role", "alert");
      target.body.textContent = text;
    }
    scrollDown(true);
  }

  /** Render a reply; JSON-schema replies are shown as a JSON code block. Escaping happens in render(). */
  function renderReply(view, text, json) {
    const stick = nearBottom();
    const source = json ? "```json\n" + prettyJson(text) + "\n```" : text;
    view.body.innerHTML = window.TokenmillMarkdown.render(source);
    if (stick) scrollDown(true);
  }

  function prettyJson(text) {
    try {
      return JSON.stringify(JSON.parse(text), null, 2);
    } catch (e) {
      return text; // still streaming, or not JSON
    }
  }

  function setBusy(busy) {
    els.send.hidden = busy;
    els.stop.hidden = !busy;
    document.body.dataset.busy = busy ? "1" : "";
  }

  // ---- one reply -----------------------------------------------------------------------------------------
  async function send(text) {
    const messages = [];
    if (els.system.value.trim()) messages.push({ role: "system", content: els.system.value });
    messages.push(...history, { role: "user", content: text });
    let body;
    try {
      body = requestBody(messages);
    } catch (e) {
      showError(e.message);
      return false;
    }
    saveSettings();
    addUserMessage(text);
    const json = Boolean(body.response_format);
    const view = addMessage("assistant", modelName || "assistant");
    view.wrap.dataset.state = "streaming";
    const stats = document.createElement("div");
    stats.className = "stats";
    view.wrap.append(stats);

    const controller = new AbortController();
    const turnOf = conversation;
    current = { controller };
    setBusy(true);
    const t0 = performance.now();
    let tFirst = null;
    let tLast = null;
    let reply = "";
    let chunks = 0;
    let usage = null;
    let finish = null;
    let state = "done";
    let error = null;
    let pending = false;
    const schedule = () => {
      if (pending) return;
      pending = true;
      requestAnimationFrame(() => {
        pending = false;
        renderReply(view, reply, json);
      });
    };

    try {
      const resp = await fetch("v1/chat/completions", {
        method: "POST",
        headers: headers(),
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (!resp.ok) throw new Error(`HTTP ${resp.status}: ${await errorMessage(resp)}`);
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      let done = false;
      while (!done) {
        const { value, done: eof } = await reader.read();
        if (eof) break;
        buffer = (buffer + decoder.decode(value, { stream: true })).replace(/\r\n?/g, "\n");
        let sep;
        while (!done && (sep = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, sep);
          buffer = buffer.slice(sep + 2);
          const data = event
            .split("\n")
            .filter((line) => line.startsWith("data:"))
            .map((line) => line.slice(5).replace(/^ /, ""))
            .join("\n");
          if (!data) continue;
          if (data === "[DONE]") {
            done = true;
            break;
          }
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(`server error: ${chunk.error.message || "unknown"}`);
          if (chunk.usage) usage = chunk.usage;
          const choice = (chunk.choices || [])[0];
          if (!choice) continue;
          const delta = (choice.delta && choice.delta.content) || "";
          if (delta) {
            const now = performance.now();
            if (tFirst === null) tFirst = now;
            tLast = now;
            chunks += 1;
            reply += delta;
            schedule();
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
      if (!done) throw new Error("the stream ended before [DONE]");
    } catch (e) {
      if (e.name === "AbortError") state = "stopped";
      else {
        state = "error";
        error = e.message || String(e);
        controller.abort(); // close the stream if it is still open: the server then frees the request
      }
    } finally {
      current = null;
      setBusy(false);
    }

    renderReply(view, reply, json);
    view.body.hidden = !reply && state === "error"; // only the error box, no empty reply
    if (!reply && state === "stopped") view.body.textContent = "(stopped before the first token)";
    view.wrap.dataset.state = state;
    stats.textContent = describe({ t0, tFirst, tLast, usage, chunks, finish, state });
    if (tFirst !== null) stats.dataset.ttftMs = String(Math.round(tFirst - t0));
    stats.dataset.finish = state === "done" ? finish || "" : state;
    if (state === "error") showError(error, view);
    if (state !== "error" && reply && turnOf === conversation) {
      history.push({ role: "user", content: text }, { role: "assistant", content: reply });
    } else if (state === "error" && !els.prompt.value) {
      els.prompt.value = text; // to retry after fixing the settings
    }
    scrollDown(false);
    return true;
  }

  function describe({ t0, tFirst, tLast, usage, chunks, finish, state }) {
    const parts = [];
    if (state === "stopped") parts.push("stopped");
    if (tFirst !== null) parts.push(`TTFT ${((tFirst - t0) / 1000).toFixed(2)} s`);
    // usage is exact; without it (a stopped reply) each streamed chunk counts as one token.
    const tokens = usage ? usage.completion_tokens : chunks;
    const span = tFirst !== null && tLast !== null ? (tLast - tFirst) / 1000 : 0;
    if (tokens > 1 && span > 0) parts.push(`${((tokens - 1) / span).toFixed(1)} tok/s`);
    if (tokens) parts.push(`${usage ? "" : "~"}${tokens} tokens`);
    if (state === "done" && finish) parts.push(finish === "length" ? "hit max_tokens" : `finish: ${finish}`);
    return parts.join(" · ");
  }

  // ---- wiring ------------------------------------------------------------------------------------------------
  function setSettingsOpen(open) {
    document.body.classList.toggle("settings-open", open);
    els.toggleSettings.setAttribute("aria-expanded", String(open));
  }

  els.composer.addEventListener("submit", async (e) => {
    e.preventDefault();
    const text = els.prompt.value;
    if (current || !text.trim()) return;
    els.prompt.value = "";
    if (!(await send(text)) && !els.prompt.value) els.prompt.value = text;
  });
  els.prompt.addEventListener("keydown", (e) => {
    if (enterSends && e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      els.composer.requestSubmit();
    }
  });
  els.stop.addEventListener("click", () => current && current.controller.abort());
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && current) current.controller.abort();
  });
  els.newChat.addEventListener("click", () => {
    if (current) current.controller.abort();
    conversation += 1;
    history.length = 0;
    for (const node of [...els.messages.querySelectorAll(".msg")]) node.remove();
    els.empty.hidden = false;
    els.prompt.focus();
  });
  els.toggleSettings.addEventListener("click", () =>
    setSettingsOpen(!document.body.classList.contains("settings-open")),
  );
  els.closeSettings.addEventListener("click", () => setSettingsOpen(false));
  els.jsonMode.addEventListener("change", () => {
    els.jsonFields.hidden = !els.jsonMode.checked;
    saveSettings();
  });
  for (const name of PERSISTED) els[name].addEventListener("change", saveSettings);
  els.apiKey.addEventListener("change", () => {
    saveSettings();
    loadModel();
  });
  els.messages.addEventListener("click", (e) => {
    const button = e.target.closest("button.copy");
    if (!button) return;
    const code = button.closest(".code").querySelector("code").textContent;
    const done = (label) => {
      button.textContent = label;
      setTimeout(() => (button.textContent = "copy"), 1200);
    };
    if (navigator.clipboard) navigator.clipboard.writeText(code).then(() => done("copied"), () => done("failed"));
    else done("no clipboard");
  });

  if (!enterSends) els.prompt.placeholder = "Message";
  loadSettings();
  setSettingsOpen(window.matchMedia("(min-width: 761px)").matches);
  loadModel();
  els.prompt.focus();
})();
