// gpt-serve's web page (index.html): completion and chat modes over this server's API.
//
// Test hooks, so tests wait on attributes rather than sleep:
// - body[data-mode]: "completion" or "chat"; #model[data-loaded] once the model list arrived;
//   #mode-hint[data-suggested-mode]: the served model's suggested_mode;
// - chat: each .msg.assistant reply carries data-chunks (content chunks so far), data-done="true"
//   once finished, data-finish-reason ("stopped" when the user stopped it), data-error on failure,
//   data-sent-messages (how many messages the request carried, the system message included) and
//   data-max-tokens (the max_tokens sent, if any); turns dropped to fit the model's context are
//   .msg.dropped; notes in the conversation are .note (.dropped-note, .cut-note);
// - completion: #output[data-runs] counts generations; #continuation (remade by each one, with
//   data-run) carries data-chunks, data-done, data-finish-reason, data-error, and from the usage
//   chunk data-prompt-tokens and data-completion-tokens, and data-tokens-per-second.
"use strict";
const $ = (id) => document.getElementById(id);
const MODES = ["completion", "chat"];
const STORED = ["temperature", "top-p", "top-k", "max-tokens", "seed", "stop", "api-key", "system"];
// chat: the conversation (elements: each message's bubble; start: the first one still sent, the
// older ones dropped to fit the model's context, chat-context.js), epoch: bumped by reset
const chat = { messages: [], elements: [], start: 0, droppedNoted: false, controller: null, epoch: 0 };
const completion = { controller: null, runs: 0, last: null };  // last: {prompt, text} to continue from
const cards = new Map();  // model id -> its /v1/models card

// ---- settings, kept in localStorage (which may be unavailable: private windows, file://)
function store(key, value) { try { localStorage.setItem("gpt-serve-chat:" + key, value); } catch (e) {} }
function stored(key) { try { return localStorage.getItem("gpt-serve-chat:" + key); } catch (e) { return null; } }
for (const id of STORED) {
  const v = stored(id);
  if (v !== null) $(id).value = v;
  $(id).addEventListener("change", () => store(id, $(id).value));
}

function showError(message) { $("error").textContent = message || ""; $("error").hidden = !message; }
function setStatus(text) { $("status").textContent = text || ""; }

// ---- the mode: the user's choice (stored) or else what the served model suggests
function chosenMode() { const m = stored("mode"); return MODES.includes(m) ? m : null; }
function suggestedMode() {
  const card = cards.get($("model").value);
  return card && MODES.includes(card.suggested_mode) ? card.suggested_mode : null;
}

function setMode(mode) {
  document.body.dataset.mode = mode;
  for (const m of MODES) $("tab-" + m).setAttribute("aria-selected", String(m === mode));
  showHint();
}

function showHint() {
  const hint = $("mode-hint");
  const suggested = suggestedMode();
  hint.dataset.suggestedMode = suggested || "";
  hint.hidden = !suggested;
  if (!suggested) return;
  hint.textContent = suggested === "chat"
    ? "This model is served with a chat template: Chat mode fits it best."
    : "This model continues text: Completion mode fits it best.";
  hint.classList.toggle("mismatch", suggested !== document.body.dataset.mode);
}

function followSuggestion() {
  const mode = chosenMode() || suggestedMode();
  if (mode) setMode(mode); else showHint();
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// The server's {"error": {"message": ...}} when it sent one.
async function errorFrom(resp) {
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) return `${body.error.message} (HTTP ${resp.status})`;
  } catch (e) {}
  return `HTTP ${resp.status} ${resp.statusText}`.trim();
}

// A stop string as typed: \n, \t, \r and \\ become a newline, a tab, a carriage return and a
// backslash; any other backslash stays as it is (as the CLIs' --stop reads it).
const ESCAPES = { n: "\n", t: "\t", r: "\r", "\\": "\\" };
function unescapeStop(text) { return text.replace(/\\([ntr\\])/g, (_, c) => ESCAPES[c]); }

// Sampling settings as request fields; a blank field leaves the server's default.
function readParams() {
  const fields = [["temperature", "temperature", parseFloat], ["top-p", "top_p", parseFloat],
                  ["top-k", "top_k", Number], ["max-tokens", "max_tokens", Number], ["seed", "seed", Number]];
  const params = {};
  for (const [id, name, parse] of fields) {
    const raw = $(id).value.trim();
    if (raw === "") continue;
    const v = parse(raw);
    const real = name === "temperature" || name === "top_p";
    if (!Number.isFinite(v) || (!real && !Number.isInteger(v))) {
      throw new Error(`${name} must be a ${real ? "number" : "whole number"}, got "${raw}"`);
    }
    params[name] = v;
  }
  // stop sequences: one a line, with escapes (a stop string may hold a newline); prompts are literal
  const stops = $("stop").value.split("\n").filter((line) => line !== "").map(unescapeStop);
  if (stops.length) params.stop = stops;
  return params;
}

async function loadModels() {
  const select = $("model");
  try {
    const resp = await fetch("v1/models", { headers: headers() });
    if (!resp.ok) { showError(`cannot list models: ${await errorFrom(resp)}`); return; }
    const body = await resp.json();
    const previous = select.value;
    select.replaceChildren();
    cards.clear();
    for (const m of body.data || []) {
      const option = document.createElement("option");
      option.value = option.textContent = m.id;
      select.append(option);
      cards.set(m.id, m);
    }
    if (previous && cards.has(previous)) select.value = previous;
    followSuggestion();
    select.dataset.loaded = "true";
    showError("");
  } catch (e) {
    showError(`cannot reach the server: ${e.message}`);
  }
}

// ---- server-sent events: yields each event's data (multi-line data joined with "\n")
async function* sseData(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();  // stream mode: a UTF-8 character split across reads stays whole
  let buffer = "", data = [];
  const take = (line) => {
    if (line.endsWith("\r")) line = line.slice(0, -1);
    if (line === "") { const event = data.length ? data.join("\n") : null; data = []; return event; }
    if (line.startsWith("data:")) data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
    return null;  // other fields (event:, id:, retry:) and ":" comments carry nothing here
  };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      const lines = buffer.split("\n");
      buffer = done ? "" : lines.pop();
      for (const line of lines) { const event = take(line); if (event !== null) yield event; }
      if (done) break;
    }
    if (data.length) yield data.join("\n");
  } finally {
    reader.cancel().catch(() => {});  // closes the connection when we stop early
  }
}

// POST a streaming request to `path`; hands choice 0's text pieces (`pieceOf(choice)`) to
// `onPiece`. Resolves to {finish, usage}. Throws the server's error message, whether it came as
// the response or inside the stream, or an AbortError once `signal` aborts.
async function streamPieces(path, request, signal, pieceOf, onPiece) {
  const resp = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(request), signal });
  if (!resp.ok) throw new Error(await errorFrom(resp));
  let finish = null, usage = null;
  for await (const data of sseData(resp.body)) {
    if (data === "[DONE]") break;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new Error(chunk.error.message || "the server reported an error");
    if (chunk.usage) usage = chunk.usage;
    for (const choice of chunk.choices || []) {
      if ((choice.index || 0) !== 0) continue;
      const piece = pieceOf(choice);
      if (piece) onPiece(piece);
      if (choice.finish_reason) finish = choice.finish_reason;
    }
  }
  if (finish === null) throw new Error("the stream ended before the reply was finished");
  return { finish, usage };
}

// Request fields shared by both modes, or null (the reason shown) when they cannot be sent.
function baseRequest() {
  let params;
  try { params = readParams(); } catch (e) { showError(e.message); return null; }
  const model = $("model").value;
  if (!model) {
    showError("no model to talk to: the server listed none (or could not be reached)");
    loadModels();
    return null;
  }
  showError("");
  return { model, stream: true, stream_options: { include_usage: true }, ...params };
}

// ---- completion mode
function setGenerating(busy) {
  $("generate").disabled = busy;
  $("generate-stop").disabled = !busy;
  $("continue").disabled = busy || !(completion.last && completion.last.text);
}

async function generate(prompt) {
  if (completion.controller || prompt === "") return;  // one generation at a time
  const base = baseRequest();
  if (!base) return;
  const output = $("output");
  completion.runs += 1;
  completion.last = null;
  const promptEl = document.createElement("span");
  promptEl.className = "prompt-text";
  promptEl.textContent = prompt;
  const el = document.createElement("span");
  el.id = "continuation";
  el.className = "continuation";
  Object.assign(el.dataset, { run: String(completion.runs), chunks: "0", done: "false" });
  output.replaceChildren(promptEl, el);
  output.dataset.runs = String(completion.runs);
  output.hidden = false;
  $("completion-stats").textContent = "";

  const controller = new AbortController();
  completion.controller = controller;
  setGenerating(true);
  const started = performance.now();
  let text = "", finish = null, usage = null, error = null;
  try {
    ({ finish, usage } = await streamPieces("v1/completions", { ...base, prompt }, controller.signal,
      (choice) => choice.text, (piece) => {
        el.append(piece);  // a text node: model output is never parsed as HTML
        text += piece;
        el.dataset.chunks = String(Number(el.dataset.chunks) + 1);
        el.scrollIntoView({ block: "end" });
      }));
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped";
    else error = e.message;
  }
  const seconds = (performance.now() - started) / 1000;
  completion.controller = null;
  completion.last = { prompt, text };
  setGenerating(false);

  const stats = [];
  if (usage) {
    el.dataset.promptTokens = String(usage.prompt_tokens);
    el.dataset.completionTokens = String(usage.completion_tokens);
    const rate = seconds > 0 ? usage.completion_tokens / seconds : 0;
    el.dataset.tokensPerSecond = rate.toFixed(1);
    stats.push(`${usage.prompt_tokens} prompt tokens`, `${usage.completion_tokens} completion tokens`);
    stats.push(`finish: ${finish === "length" ? "length (cut short)" : finish}`,
      `${rate.toFixed(1)} tokens/s (${seconds.toFixed(2)} s in all)`);
  } else if (finish) {
    stats.push(`finish: ${finish}`);
  }
  if (error !== null) {
    el.dataset.error = error;
    el.classList.add("failed");
    showError(error);
  }
  $("completion-stats").textContent = stats.join(" \u00b7 ");
  el.dataset.finishReason = finish || "";
  el.dataset.done = "true";
}

// Continue: the text so far becomes the prompt, and the model goes on from there.
function continueGeneration() {
  if (!completion.last || completion.controller) return;
  const prompt = completion.last.prompt + completion.last.text;
  $("prompt").value = prompt;
  generate(prompt);
}

// ---- chat mode
function addMessage(role, text) {
  const el = document.createElement("div");
  el.className = "msg " + role;
  el.textContent = text;
  $("messages").append(el);
  el.scrollIntoView({ block: "end" });
  return el;
}

function setSending(busy) {
  $("send").disabled = busy;
  $("chat-stop").disabled = !busy;
}

async function send() {
  if (chat.controller) return;  // one reply at a time
  const text = $("input").value;
  if (!text.trim()) return;
  const base = baseRequest();
  if (!base) return;
  setStatus("");
  $("input").value = "";

  chat.messages.push({ role: "user", content: text });
  const userEl = addMessage("user", text);
  chat.elements.push(userEl);
  const el = addMessage("assistant", "");
  el.dataset.chunks = "0";
  el.dataset.done = "false";
  const system = $("system").value.trim();
  const head = system ? [{ role: "system", content: system }] : [];
  const controller = new AbortController();
  const epoch = chat.epoch;
  chat.controller = controller;
  setSending(true);
  let reply = "", finish = null, usage = null, error = null;
  try {
    const request = await fitTurn(base, head, controller.signal);  // chat-context.js
    el.dataset.sentMessages = String(request.messages.length);
    if (request.max_tokens) el.dataset.maxTokens = String(request.max_tokens);
    ({ finish, usage } = await streamPieces("v1/chat/completions", request, controller.signal,
      (choice) => choice.delta && choice.delta.content, (piece) => {
        el.append(piece);  // a text node: model output is never parsed as HTML
        reply += piece;
        el.dataset.chunks = String(Number(el.dataset.chunks) + 1);
        el.scrollIntoView({ block: "end" });
      }));
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped";
    else error = e.message;
  } finally {
    chat.controller = null;
    setSending(false);
  }

  if (epoch !== chat.epoch) {
    // reset while this reply streamed: the conversation it belonged to is gone
  } else if (error !== null && reply === "") {
    // Nothing came back: forget the turn, and give the text back to edit and resend.
    chat.messages.pop();
    chat.elements.pop();
    userEl.classList.add("failed");
    el.classList.add("failed");
    el.textContent = error;
    if (!$("input").value) $("input").value = text;
    showError(error);
  } else {
    // A stopped or broken-off reply stays: the user saw it, so it is context for the next turn.
    chat.messages.push({ role: "assistant", content: reply });
    chat.elements.push(el);
    if (error !== null) { showError(error); el.classList.add("failed"); }
    if (finish === "length") {
      const n = usage ? `${usage.completion_tokens} tokens` : "its limit";
      addNote(`reply cut short at ${n} (max tokens, or the room left in the context)`, "cut-note", el);
    }
    if (!usage) setStatus(`finish: ${finish}`);
    else setStatus(`${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens, finish: ${finish}`);
  }
  if (error !== null) el.dataset.error = error;
  el.dataset.finishReason = finish || "";
  el.dataset.done = "true";
  $("input").focus();
}

function reset() {
  if (chat.controller) chat.controller.abort();
  chat.epoch += 1;
  chat.messages = [];
  chat.elements = [];
  chat.start = 0;
  chat.droppedNoted = false;
  $("messages").replaceChildren();
  showError("");
  setStatus("");
  $("input").focus();
}

// ---- wiring
for (const mode of MODES) {
  $("tab-" + mode).addEventListener("click", () => {
    store("mode", mode);  // the user's choice now outranks the model's suggestion
    setMode(mode);
    (mode === "chat" ? $("input") : $("prompt")).focus();
  });
}
$("completion-form").addEventListener("submit", (e) => { e.preventDefault(); generate($("prompt").value); });
$("prompt").addEventListener("keydown", (e) => {
  if (e.key !== "Enter" || !(e.ctrlKey || e.metaKey) || e.isComposing) return;
  e.preventDefault();
  generate($("prompt").value);
});
$("generate-stop").addEventListener("click", () => { if (completion.controller) completion.controller.abort(); });
$("continue").addEventListener("click", continueGeneration);
$("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
});
$("chat-stop").addEventListener("click", () => { if (chat.controller) chat.controller.abort(); });
$("reset").addEventListener("click", reset);
$("settings-toggle").addEventListener("click", () => { $("settings").hidden = !$("settings").hidden; });
$("api-key").addEventListener("change", loadModels);
$("model").addEventListener("change", followSuggestion);
setMode(chosenMode() || "completion");  // until the model list says what fits
(document.body.dataset.mode === "chat" ? $("input") : $("prompt")).focus();
loadModels();
