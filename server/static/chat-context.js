// gpt-serve's web page, chat mode: each turn fitted to the model's context before it is sent.
// Loaded before app.js; uses its chat state and its headers(), errorFrom() and addNote() when
// called. Tokens are counted by the server (POST tokenize with the messages, rendered by the chat
// template as POST v1/chat/completions renders them), which also names the model's context.
"use strict";

// A dim note in the conversation (after `after`, else at its end).
function addNote(text, kind, after) {
  const el = document.createElement("div");
  el.className = "note " + kind;
  el.textContent = text;
  if (after) after.after(el); else $("messages").append(el);
  return el;
}

// {count, max_model_len} for `messages`; throws the server's error, or an AbortError.
async function countTokens(model, messages, signal) {
  const resp = await fetch("tokenize", {
    method: "POST", headers: headers(), body: JSON.stringify({ model, messages }), signal,
  });
  if (!resp.ok) throw new Error(await errorFrom(resp));
  return resp.json();
}

// Tokens to leave for the reply when older turns must go: the max tokens asked for, else a
// quarter of the context; at most half of it, so a large max tokens does not empty the history.
function replyRoom(context, wanted) {
  return Math.max(1, Math.min(wanted || Math.floor(context / 4), Math.floor(context / 2)));
}

// Which turns of `history` (oldest first, the new user message last) to send after `head` (the
// system message, or nothing): the newest that leave replyRoom() tokens for the reply, never
// fewer than the new message itself, and starting with a user message. From `start` on (turns
// dropped before stay dropped), by binary search over POST tokenize calls.
// -> {start, count (the prompt's tokens), context}
async function fitContext(model, head, history, start, wanted, signal) {
  const counts = new Map();
  const count = async (k) => {
    if (!counts.has(k)) counts.set(k, await countTokens(model, head.concat(history.slice(k)), signal));
    return counts.get(k);
  };
  const all = await count(start);
  const context = all.max_model_len;
  if (!context) return { start, count: all.count, context };  // still loading: the server judges
  const fits = (c) => c.count + replyRoom(context, wanted) <= context;
  if (fits(all)) return { start, count: all.count, context };
  const last = history.length - 1;
  let lo = Math.min(start + 1, last), hi = last;  // the fewest dropped that fits; the last if none
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (fits(await count(mid))) hi = mid; else lo = mid + 1;
  }
  if (history[lo].role !== "user") lo += 1;  // no reply without the message it answered
  return { start: lo, count: (await count(lo)).count, context };
}

// The chat request for the turn just added to chat.messages: `base` with the system message
// (`head`) and the turns that fit, older ones dropped for good (chat.start moves on, their
// bubbles are dimmed, and the first time a note says so), max_tokens capped to the room left.
// Throws a clear error when even the new message does not fit. Where tokens cannot be counted
// (an older server), the conversation goes as it is and the server judges.
async function fitTurn(base, head, signal) {
  const epoch = chat.epoch;
  let fit;
  try {
    fit = await fitContext(base.model, head, chat.messages, chat.start, base.max_tokens, signal);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    return { ...base, messages: head.concat(chat.messages.slice(chat.start)) };
  }
  if (epoch !== chat.epoch) throw new DOMException("the chat was reset", "AbortError");
  const { start, count, context } = fit;
  if (context && count >= context) {
    const system = head.length ? " with the system message" : "";
    throw new Error(`this message does not fit the model's ${context}-token context: it takes ${count} ` +
      `tokens${system}, and the reply needs at least one. Shorten it${system ? " (or the system message)" : ""}.`);
  }
  if (start > chat.start) {
    for (const el of chat.elements.slice(chat.start, start)) el.classList.add("dropped");
    chat.start = start;
    if (!chat.droppedNoted) {
      chat.droppedNoted = true;
      const note = addNote(`older turns dropped to fit the model's ${context}-token context`, "dropped-note");
      chat.elements[chat.elements.length - 1].before(note);  // just above the new message
    }
  }
  const request = { ...base, messages: head.concat(chat.messages.slice(start)) };
  if (context && base.max_tokens) request.max_tokens = Math.min(base.max_tokens, context - count);
  return request;
}
