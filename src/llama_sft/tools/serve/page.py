"""The chat page ``llama-sft serve`` shows at ``/``: one self-contained HTML file (no external assets,
so it works offline) that talks to the server's own ``/v1/chat/completions`` with ``stream: true``."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>llama-sft chat</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 0; display: flex; height: 100vh; color: #222; }
  aside { width: 260px; padding: 16px; background: #f4f4f6; border-right: 1px solid #ddd; }
  aside label { display: block; margin: 12px 0 4px; font-size: 13px; color: #555; }
  aside input, aside textarea { width: 100%; box-sizing: border-box; font: inherit; font-size: 14px; }
  main { flex: 1; display: flex; flex-direction: column; }
  #log { flex: 1; overflow-y: auto; padding: 16px; }
  .msg { max-width: 80%; margin: 8px 0; padding: 8px 12px; border-radius: 10px; white-space: pre-wrap; }
  .user { background: #dbeafe; margin-left: auto; }
  .assistant { background: #f1f1f1; }
  .error { background: #fee2e2; }
  form { display: flex; gap: 8px; padding: 12px; border-top: 1px solid #ddd; }
  #input { flex: 1; font: inherit; padding: 8px; }
  button { font: inherit; padding: 8px 14px; }
  h1 { font-size: 16px; margin: 0 0 8px; }
</style>
</head>
<body>
<aside>
  <h1>llama-sft chat</h1>
  <div id="model">loading model list...</div>
  <label for="system">System prompt (empty: the template's)</label>
  <textarea id="system" rows="4"></textarea>
  <label for="temperature">Temperature (0: greedy)</label>
  <input id="temperature" type="number" min="0" max="2" step="0.1" value="0.2">
  <label for="top_p">Top-p</label>
  <input id="top_p" type="number" min="0.01" max="1" step="0.05" value="0.9">
  <label for="max_tokens">Max tokens</label>
  <input id="max_tokens" type="number" min="1" step="1" value="256">
  <label for="key">API key (when the server has one)</label>
  <input id="key" type="password" autocomplete="off">
  <p><button id="new" type="button">New chat</button></p>
</aside>
<main>
  <div id="log"></div>
  <form id="form">
    <input id="input" autocomplete="off" placeholder="Type a message and press Enter">
    <button id="send" type="submit">Send</button>
  </form>
</main>
<script>
const $ = (id) => document.getElementById(id);
let model = null, history = [], busy = false;

function headers() {
  const h = {"Content-Type": "application/json"};
  if ($("key").value) h["Authorization"] = "Bearer " + $("key").value;
  return h;
}

function bubble(kind, text) {
  const div = document.createElement("div");
  div.className = "msg " + kind;
  div.textContent = text;
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

async function loadModel() {
  const response = await fetch("/v1/models", {headers: headers()});
  const data = await response.json();
  if (!response.ok) { $("model").textContent = data.error.message; return; }
  model = data.data[0].id;
  $("model").textContent = "model: " + model;
}

async function send(text) {
  if (!model) await loadModel();
  const messages = [];
  if ($("system").value.trim()) messages.push({role: "system", content: $("system").value});
  messages.push(...history, {role: "user", content: text});
  bubble("user", text);
  const answer = bubble("assistant", "");
  const body = {
    model, messages, stream: true,
    temperature: Number($("temperature").value), top_p: Number($("top_p").value),
    max_tokens: Number($("max_tokens").value),
  };
  const response = await fetch("/v1/chat/completions", {method: "POST", headers: headers(), body: JSON.stringify(body)});
  if (!response.ok) {
    const data = await response.json();
    answer.className = "msg error";
    answer.textContent = data.error.message;
    return;
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += value;
    const events = buffer.split("\\n\\n");
    buffer = events.pop();
    for (const event of events) {
      const data = event.replace(/^data: /, "");
      if (data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) { answer.className = "msg error"; answer.textContent = chunk.error.message; return; }
      const delta = chunk.choices.length ? chunk.choices[0].delta.content : null;
      if (delta) { answer.textContent += delta; $("log").scrollTop = $("log").scrollHeight; }
    }
  }
  history.push({role: "user", content: text}, {role: "assistant", content: answer.textContent});
}

$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || busy) return;
  $("input").value = "";
  busy = true; $("send").disabled = true;
  try { await send(text); } catch (error) { bubble("error", String(error)); }
  busy = false; $("send").disabled = false; $("input").focus();
});
$("new").addEventListener("click", () => { history = []; $("log").innerHTML = ""; $("input").focus(); });
loadModel().catch(() => {});
</script>
</body>
</html>
"""
