// The bridge's HTTP API from a page: the bearer token (kept for this tab only, sent in a
// header, never in a URL) and server-sent events read through fetch, which, unlike
// EventSource, can send that header.
const KEY = "ivr-bridge-api-token";

export const token = {
  get: () => sessionStorage.getItem(KEY) || "",
  set: (value) => sessionStorage.setItem(KEY, value.trim()),
  clear: () => sessionStorage.removeItem(KEY),
};

// `ivr-bridge serve` in development mode prints a link with a token for that run in the
// URL's fragment (never sent to the server): keep it for the tab, and out of the address bar.
if (location.hash.startsWith("#token=")) {
  token.set(decodeURIComponent(location.hash.slice("#token=".length)));
  history.replaceState(null, "", location.pathname + location.search);
}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers(extra = {}) {
  const value = token.get();
  return value ? { ...extra, authorization: `Bearer ${value}` } : extra;
}

export async function api(path, { method = "GET", body } = {}) {
  const init = { method, headers: headers(body ? { "content-type": "application/json" } : {}) };
  if (body) init.body = JSON.stringify(body);
  const response = await fetch(path, init);
  if (!response.ok) throw await refusal(response);
  return response;
}

async function refusal(response) {
  let message = response.statusText;
  try {
    message = (await response.json()).error || message;
  } catch {
    // not JSON: keep the status text
  }
  return new ApiError(response.status, message);
}

/** Read `path` as an event stream, calling onEvent(kind, data) per event, until it
 * ends or `signal` aborts. Rejects with ApiError when refused. */
export async function events(path, onEvent, signal) {
  const response = await fetch(path, { headers: headers(), signal });
  if (!response.ok) throw await refusal(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let text = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    text += value;
    let end;
    while ((end = text.indexOf("\n\n")) >= 0) {
      const block = text.slice(0, end);
      text = text.slice(end + 2);
      let kind = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) kind = line.slice(7);
        else if (line.startsWith("data: ")) data.push(line.slice(6));
      }
      if (data.length) onEvent(kind, JSON.parse(data.join("\n")));
    }
  }
}

/** Asks for the token in `form` (an element with an input and a message line), resolving
 * once one is given. */
export function askToken(form, message) {
  form.hidden = false;
  form.querySelector(".message").textContent = message;
  return new Promise((resolve) => {
    form.onsubmit = (e) => {
      e.preventDefault();
      token.set(form.querySelector("input").value);
      form.hidden = true;
      resolve();
    };
  });
}
