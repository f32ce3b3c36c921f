// xlserve's chat page: plain JavaScript, no dependencies, no build step. Served with
// `Content-Security-Policy: default-src 'self'`, so it loads nothing from elsewhere and runs no inline
// code. Model output only ever reaches the page as text (textContent), never as HTML.
//
// Two ways to talk to the server:
// - /v1/chat/completions (the default): the page keeps the conversation and sends it whole each turn.
// - /v1/chat/interactive (the "Interactive session" box): the server keeps the history of one
//   session id; a turn sends only its new message. Reset ends the session on the server.
// Stop aborts the fetch: the server sees the connection close and aborts the request at once.
"use strict";

const KEY_STORAGE = "xlserve-api-key"; // sessionStorage: the key lives as long as the tab
const MAX_SESSION_ID = 2 ** 31 - 1;

const $ = (id) => document.getElementById(id);

const chat = {
  messages: [], // {role, content} of the conversation shown, oldest first
  controller: null, // the AbortController of the reply being written
  sessionId: newSessionId(),
  sessionOpen: false, // the server holds this session's history (interactive mode)
};

function newSessionId() {
  const word = new Uint32Array(1);
  crypto.getRandomValues(word);
  return 1 + (word[0] % MAX_SESSION_ID);
}

// ----- settings ------------------------------------------------------------------------------------

function apiKey() {
  return $("api-key").value.trim();
}

function headers() {
  const result = { "Content-Type": "application/json" };
  const key = apiKey();
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

function sampling() {
  return {
    maxTokens: Number($("max-tokens").value),
    temperature: Number($("temperature").value),
    topP: Number($("top-p").value),
  };
}

function showSliderValues() {
  for (const id of ["max-tokens", "temperature", "top-p"]) {
    $(`${id}-value`).textContent = $(id).value;
  }
}

// ----- talking to the server -----------------------------------------------------------------------

// The server's own words for a failed answer: OpenAI's `error.message`, else the status and body.
async function errorMessage(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body && body.error && body.error.message) return body.error.message;
  } catch (ignored) {
    // not JSON: fall through
  }
  return `${response.status} ${response.statusText} ${text.slice(0, 300)}`.trim();
}

// The lines of a streamed body as they arrive (SSE and NDJSON are both line-based).
async function* lines(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      yield buffer.slice(0, end).replace(/\r$/, "");
      buffer = buffer.slice(end + 1);
    }
  }
  buffer += decoder.decode();
  if (buffer) yield buffer;
}

// /v1/chat/completions' SSE events as {text, finishReason, usage}; an error event throws its message.
async function* completionParts(response) {
  for await (const line of lines(response)) {
    if (!line.startsWith("data:")) continue;
    const data = line.slice(5).trim();
    if (data === "[DONE]") return;
    const event = JSON.parse(data);
    if (event.error) throw new Error(event.error.message);
    const choice = event.choices && event.choices[0];
    yield {
      text: (choice && choice.delta && choice.delta.content) || "",
      finishReason: choice ? choice.finish_reason : null,
      usage: event.usage || null,
    };
  }
}

// /v1/chat/interactive's NDJSON lines as {text, finishReason, tokens, historyTokens}.
async function* interactiveParts(response) {
  for await (const line of lines(response)) {
    if (!line.trim()) continue;
    const event = JSON.parse(line);
    if (event.error) throw new Error(event.error.message);
    yield {
      text: event.text || "",
      finishReason: event.finish_reason,
      tokens: event.tokens,
      historyTokens: event.history_tokens,
      message: event.message,
    };
  }
}

async function post(path, body, signal) {
  const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!response.ok) throw new Error(await errorMessage(response));
  return response;
}

function withSystemPrompt(messages) {
  const system = $("system").value.trim();
  return system ? [{ role: "system", content: system }, ...messages] : messages;
}

// One reply, written into `reply` as it streams. `history` is the conversation before the reply.
async function requestReply(history, signal, onPart) {
  const { maxTokens, temperature, topP } = sampling();
  if (!$("interactive").checked) {
    const response = await post("v1/chat/completions", {
      model: $("model").value,
      messages: withSystemPrompt(history),
      stream: true,
      stream_options: { include_usage: true },
      max_tokens: maxTokens,
      temperature,
      top_p: topP,
    }, signal);
    for await (const part of completionParts(response)) onPart(part);
    return;
  }
  // A new session gets the whole conversation; an open one only the new message.
  const prompt = chat.sessionOpen ? history[history.length - 1].content : withSystemPrompt(history);
  const response = await post("v1/chat/interactive", {
    prompt,
    session_id: chat.sessionId,
    interactive_mode: true,
    stream: true,
    request_output_len: maxTokens,
    temperature,
    top_p: topP,
  }, signal);
  for await (const part of interactiveParts(response)) {
    onPart(part);
    if (part.finishReason && part.finishReason !== "abort") chat.sessionOpen = true;
  }
}

// Ask the server to drop this tab's session (its history and pinned KV pages), and start a new one.
// A turn may still be ending on the server (a Stop a moment ago): `cancel` answers once it has, so the
// end that follows never finds the session busy.
function endSession() {
  if (chat.sessionOpen) {
    const session = { session_id: chat.sessionId, prompt: "" };
    post("v1/chat/interactive", { ...session, cancel: true })
      .then(() => post("v1/chat/interactive", { ...session, interactive_mode: false, request_output_len: 0 }))
      .catch((error) => showError(error.message));
  }
  chat.sessionId = newSessionId();
  chat.sessionOpen = false;
}

let modelListings = 0; // a listing that a newer one (say, after a new key) overtook is dropped

async function loadModels() {
  const select = $("model");
  const listing = ++modelListings;
  try {
    const response = await fetch("v1/models", { headers: headers() });
    if (!response.ok) throw new Error(await errorMessage(response));
    const { data } = await response.json();
    if (listing !== modelListings) return;
    const chosen = select.value;
    select.replaceChildren(...data.map((model) => new Option(model.id, model.id)));
    if (data.some((model) => model.id === chosen)) select.value = chosen;
    const longest = data.find((model) => model.id === select.value);
    if (longest && longest.max_model_len) {
      const slider = $("max-tokens");
      slider.max = String(longest.max_model_len);
      // LMDeploy's default (512), but never more than the session holds beside a short prompt.
      slider.value = String(Math.min(Number(slider.value), Math.max(1, Math.floor(longest.max_model_len / 2))));
      showSliderValues();
    }
    clearError();
  } catch (error) {
    if (listing === modelListings) showError(`cannot list the models: ${error.message}`);
  }
}

// ----- the page ------------------------------------------------------------------------------------

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function setStatus(text) {
  $("status").textContent = text;
}

function messageNode(message) {
  const node = document.createElement("div");
  node.className = `message ${message.role}`;
  const role = document.createElement("div");
  role.className = "role";
  role.textContent = message.role === "user" ? "You" : "Assistant";
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = message.content;
  node.append(role, content);
  return node;
}

function render() {
  const box = $("conversation");
  box.replaceChildren(...chat.messages.map(messageNode));
  box.scrollTop = box.scrollHeight;
  updateButtons();
}

function busy() {
  return chat.controller !== null;
}

function updateButtons() {
  $("send").disabled = busy();
  $("stop").disabled = !busy();
  $("regenerate").disabled = busy() || !chat.messages.some((message) => message.role === "user");
}

// Write the assistant's reply to the conversation so far (which ends with the user's message).
async function reply() {
  const history = chat.messages.slice();
  const answer = { role: "assistant", content: "" };
  chat.messages.push(answer);
  const controller = new AbortController();
  chat.controller = controller;
  render();
  clearError();
  setStatus("writing…");
  const node = $("conversation").lastElementChild;
  const content = node.querySelector(".content");
  let counts = "";
  let finishReason = "";
  try {
    await requestReply(history, controller.signal, (part) => {
      answer.content += part.text;
      content.textContent = answer.content;
      $("conversation").scrollTop = $("conversation").scrollHeight;
      if (part.usage) counts = `${part.usage.completion_tokens} tokens`;
      if (part.historyTokens !== undefined) {
        counts = `session ${chat.sessionId}: ${part.historyTokens} tokens of history before this turn, `
          + `${part.tokens} new`;
      }
      if (part.finishReason) finishReason = ` (${part.finishReason})`;
      if (part.message) showError(part.message);
    });
    setStatus(counts + finishReason);
  } catch (error) {
    if (controller.signal.aborted) {
      node.classList.add("stopped");
      setStatus("stopped");
    } else {
      showError(error.message);
      setStatus("");
    }
    // The server kept no history of a turn that did not finish: the next turn starts a new session
    // with the whole conversation, the stopped part of the reply included.
    if ($("interactive").checked) endSession();
    if (!answer.content) {
      chat.messages.pop();
      node.remove();
    }
  } finally {
    chat.controller = null;
    updateButtons();
  }
}

function send(event) {
  event.preventDefault();
  const text = $("prompt").value;
  if (busy() || !text.trim()) return;
  $("prompt").value = "";
  chat.messages.push({ role: "user", content: text });
  reply();
}

function stop() {
  if (chat.controller) chat.controller.abort();
}

function regenerate() {
  if (busy()) return;
  while (chat.messages.length && chat.messages[chat.messages.length - 1].role !== "user") chat.messages.pop();
  if (!chat.messages.length) return;
  // The server's history holds the answer being replaced: replay the conversation into a new session.
  if ($("interactive").checked) endSession();
  reply();
}

function reset() {
  stop();
  if ($("interactive").checked) endSession();
  chat.messages = [];
  clearError();
  setStatus("");
  render();
}

function init() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) $("api-key").value = key;
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORAGE, apiKey());
    loadModels();
  });
  $("interactive").addEventListener("change", () => {
    if (!$("interactive").checked) endSession();
  });
  for (const id of ["max-tokens", "temperature", "top-p"]) $(id).addEventListener("input", showSliderValues);
  $("composer").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) send(event);
  });
  $("stop").addEventListener("click", stop);
  $("regenerate").addEventListener("click", regenerate);
  $("reset").addEventListener("click", reset);
  showSliderValues();
  render();
  loadModels();
}

init();
