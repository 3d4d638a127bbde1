// The chat page: the streaming composer, stop, resume after reload.
// Rendering (Markdown + the one sanitiser) lives in render.js as window.ChatRender.
"use strict";

(function () {
  const chat = document.getElementById("chat");
  if (!chat) return;
  const composer = document.getElementById("composer");
  const textarea = composer.querySelector("textarea[name=content]");
  const sendButton = composer.querySelector("button.send");
  const stopButton = composer.querySelector("button.stop");
  const errorBox = composer.querySelector(".composer-error");
  const messages = document.getElementById("messages");
  const csrfToken = composer.querySelector("input[name=csrfmiddlewaretoken]").value;

  // The reply this tab is following: {id, stopUrl, controller}.
  let active = null;

  function conversationId() {
    return chat.dataset.conversation;
  }

  function stopUrl(messageId) {
    return `/c/${conversationId()}/m/${messageId}/stop/`;
  }

  // Reads an SSE body from fetch(), calling onEvent(name, data) per event.
  async function readEvents(response, onEvent) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n\n")) !== -1) {
        const frame = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let name = "message";
        const data = [];
        for (const line of frame.split("\n")) {
          if (line.startsWith("event:")) name = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
        }
        if (data.length) onEvent(name, JSON.parse(data.join("\n")));
      }
    }
  }

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function addUserMessage(text) {
    const article = el("article", { class: "message message-user", "data-role": "user" });
    article.append(el("div", { class: "message-body plain" }, text));
    messages.append(article);
    return article;
  }

  function addAssistantMessage() {
    const article = el("article", {
      class: "message message-assistant",
      "data-role": "assistant",
      "data-status": "streaming",
    });
    const body = el("div", { class: "message-body", "data-markdown": "" });
    const meta = el("footer", { class: "message-meta" });
    meta.append(el("span", { class: "status status-streaming" }, "Generating…"));
    meta.append(el("span", { class: "error-text" }, ""));
    article.append(body, meta);
    messages.append(article);
    return article;
  }

  const STATUS_LABELS = {
    complete: "",
    stopped: "Stopped",
    interrupted: "Interrupted",
    error: "Error",
    streaming: "Generating…",
  };

  function setStatus(article, status, error) {
    article.dataset.status = status;
    const badge = article.querySelector(".status");
    badge.className = `status status-${status}`;
    badge.textContent = STATUS_LABELS[status] ?? status;
    article.querySelector(".error-text").textContent = error || "";
  }

  // Keep the newest text in view unless the user scrolled up to read.
  let followBottom = true;
  messages.addEventListener("scroll", () => {
    followBottom = messages.scrollHeight - messages.scrollTop - messages.clientHeight < 80;
  });
  function scrollToBottom() {
    if (followBottom) messages.scrollTop = messages.scrollHeight;
  }

  function setBusy(busy) {
    sendButton.hidden = busy;
    stopButton.hidden = !busy;
    if (!busy) textarea.focus();
  }

  function showError(text) {
    errorBox.textContent = text;
    errorBox.hidden = !text;
  }

  // Follows one reply's SSE stream into `article`.
  async function follow(response, article, onStart) {
    const view = new window.ChatRender.StreamView(article.querySelector(".message-body"));
    let ended = false;
    await readEvents(response, (name, data) => {
      if (name === "start") {
        onStart?.(data);
        article.id = `m-${data.assistant_message}`;
        article.dataset.id = data.assistant_message;
        active.id = data.assistant_message;
      } else if (name === "snapshot") {
        view.setText(data.t);
      } else if (name === "message") {
        view.append(data.t);
      } else if (name === "end") {
        ended = true;
        view.finish();
        setStatus(article, data.status, data.error);
      }
      scrollToBottom();
    });
    if (!ended) {
      // The connection dropped; the reply itself goes on server-side.
      view.finish();
      setStatus(article, "interrupted", "Connection lost. Reload the page to see the reply.");
    }
  }

  function adoptConversation(data) {
    if (conversationId() === String(data.conversation)) return;
    chat.dataset.conversation = data.conversation;
    const sendUrl = `/c/${data.conversation}/send/`;
    composer.action = sendUrl;
    history.replaceState(null, "", `/c/${data.conversation}/`);
    document.querySelector(".chat-title").textContent = data.title;
    document.title = `${data.title} · chatsite`;
    const list = document.querySelector("#conversation-list ul");
    if (list) {
      list.querySelector(".empty")?.remove();
      const item = el("li");
      item.append(el("a", { href: `/c/${data.conversation}/`, "aria-current": "page" }, data.title));
      list.prepend(item);
    }
  }

  async function send() {
    const content = textarea.value;
    if (!content.trim() || active) return;
    showError("");
    const form = new FormData(composer);
    active = { id: null, controller: new AbortController() };
    setBusy(true);
    let response;
    try {
      response = await fetch(composer.action, {
        method: "POST",
        body: form,
        headers: { "X-CSRFToken": csrfToken },
        signal: active.controller.signal,
      });
    } catch (err) {
      showError("Could not reach the server. Your message was not sent.");
      active = null;
      setBusy(false);
      return;
    }
    if (!response.ok) {
      let reason = `The server refused the message (HTTP ${response.status}).`;
      try {
        reason = (await response.json()).error || reason;
      } catch (_) {
        /* not JSON: keep the generic reason */
      }
      showError(reason);
      active = null;
      setBusy(false);
      return;
    }
    textarea.value = "";
    document.querySelector(".empty-hint")?.remove();
    addUserMessage(content);
    const article = addAssistantMessage();
    followBottom = true;
    scrollToBottom();
    try {
      await follow(response, article, adoptConversation);
    } catch (err) {
      if (err.name !== "AbortError") setStatus(article, "interrupted", "Connection lost.");
    }
    active = null;
    setBusy(false);
  }

  async function resume(article) {
    active = { id: article.dataset.id, controller: new AbortController() };
    setBusy(true);
    try {
      const response = await fetch(article.dataset.streamUrl, {
        signal: active.controller.signal,
      });
      if (response.ok) await follow(response, article);
    } catch (err) {
      if (err.name !== "AbortError") setStatus(article, "interrupted", "Connection lost.");
    }
    active = null;
    setBusy(false);
  }

  async function stop() {
    if (!active || !active.id) return;
    stopButton.disabled = true;
    try {
      await fetch(stopUrl(active.id), {
        method: "POST",
        headers: { "X-CSRFToken": csrfToken },
      });
    } finally {
      stopButton.disabled = false;
    }
  }

  composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  textarea.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Escape") return;
    if (document.body.classList.contains("sidebar-open")) setSidebar(false);
    else if (active) stop();
  });
  stopButton.addEventListener("click", stop);

  // Phone layout: the sidebar slides over the chat and back.
  const sidebarToggle = document.querySelector(".sidebar-toggle");
  function setSidebar(open) {
    document.body.classList.toggle("sidebar-open", open);
    sidebarToggle.setAttribute("aria-expanded", String(open));
    if (open) document.querySelector("#sidebar input[type=search]").focus();
    else sidebarToggle.focus();
  }
  sidebarToggle.addEventListener("click", () => setSidebar(true));
  document.querySelector(".sidebar-close").addEventListener("click", () => setSidebar(false));

  window.ChatRender.renderAll(document);
  const streaming = messages.querySelector("article[data-status=streaming][data-stream-url]");
  if (streaming) resume(streaming);
  scrollToBottom();
})();
