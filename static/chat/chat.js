// The chat page: the streaming composer, stop, resume after reload, regenerate,
// edit and versions, older messages on scroll, the sidebar's small behaviours
// and the theme. Rendering (Markdown + the one sanitiser) lives in render.js
// as window.ChatRender; htmx does the plain request-and-swap work.
"use strict";

(function () {
  const chat = document.getElementById("chat");
  if (!chat) return;
  const composer = document.getElementById("composer");
  const textarea = composer.querySelector("textarea[name=content]");
  const modelSelect = composer.querySelector("select[name=model]");
  const sendButton = composer.querySelector("button.send");
  const stopButton = composer.querySelector("button.stop");
  const errorBox = composer.querySelector(".composer-error");
  const messages = document.getElementById("messages");
  const csrfToken = composer.querySelector("input[name=csrfmiddlewaretoken]").value;

  // The reply this tab is following: {id, controller}.
  let active = null;

  // A phone or tablet: its keyboard has no Shift for a new line, so Enter
  // types one and the Send button sends; and the composer is not focused by
  // itself (that would pop the keyboard over the reply being read).
  const touchOnly = matchMedia("(pointer: coarse)").matches && !matchMedia("(pointer: fine)").matches;
  const sendsOnEnter = (event) =>
    event.key === "Enter" && !event.shiftKey && !event.isComposing && !touchOnly;
  if (touchOnly) {
    textarea.removeAttribute("autofocus");
    textarea.placeholder = "Message";
    if (document.activeElement === textarea) textarea.blur();
  }

  function conversationId() {
    return chat.dataset.conversation;
  }

  function conversationUrl(path) {
    return `/c/${conversationId()}/${path}`;
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

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

  function userArticle(text) {
    const article = el("article", { class: "message message-user", "data-role": "user" });
    article.append(el("div", { class: "message-body plain" }, text));
    article.append(el("footer", { class: "message-meta" }));
    return article;
  }

  function assistantArticle() {
    const article = el("article", {
      class: "message message-assistant",
      "data-role": "assistant",
      "data-status": "streaming",
      "aria-live": "polite",
    });
    const body = el("div", { class: "message-body", "data-markdown": "" });
    const meta = el("footer", { class: "message-meta" });
    meta.append(el("span", { class: "status status-streaming" }, "Generating…"));
    meta.append(el("span", { class: "error-text" }, ""));
    article.append(body, meta);
    return article;
  }

  const STATUS_LABELS = {
    complete: "",
    stopped: "Stopped",
    interrupted: "Interrupted",
    error: "Error",
    streaming: "Generating…",
  };

  // A complete reply the token limit cut short says so (finish reason "length").
  const CUT_OFF = "Cut off at the length limit";

  function setStatus(article, status, error, finishReason) {
    article.dataset.status = status;
    const badge = article.querySelector(".status");
    badge.className = `status status-${status}`;
    badge.textContent =
      status === "complete" && finishReason === "length" ? CUT_OFF : (STATUS_LABELS[status] ?? status);
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
    messages.classList.toggle("busy", busy);
    if (!busy && !touchOnly) textarea.focus();
  }

  // The server's own reason for refusing a request (its JSON `error`), else a generic one.
  async function refusal(response, generic) {
    try {
      const reason = (await response.json()).error;
      if (reason) return reason;
    } catch (_) {
      /* not JSON: the generic reason */
    }
    return `${generic} (HTTP ${response.status}).`;
  }

  function showError(text) {
    errorBox.textContent = text;
    errorBox.hidden = !text;
  }

  // The text a message was written as: what "Copy" copies and "Edit" starts from.
  const sources = new WeakMap();
  function messageSource(article) {
    const body = article.querySelector(".message-body");
    if (sources.has(article)) return sources.get(article);
    if (window.ChatRender.sourceOf) return window.ChatRender.sourceOf(body) ?? body.innerText;
    return article.dataset.role === "user" ? body.textContent : body.innerText;
  }

  // Server-rendered footers (versions, Copy, Edit, Regenerate) for messages
  // this page created while streaming, once their ids and versions are known.
  async function refreshFooters(articles) {
    if (!conversationId()) return;
    try {
      const response = await fetch(conversationUrl("messages/?limit=2"));
      if (!response.ok) return;
      const template = document.createElement("template");
      template.innerHTML = await response.text();
      for (const fresh of template.content.querySelectorAll("article.message")) {
        const article = articles.find((a) => a && a.id === fresh.id);
        if (!article) continue;
        const footer = fresh.querySelector(".message-meta");
        article.querySelector(".message-meta").replaceWith(footer);
        article.dataset.status = fresh.dataset.status;
        window.htmx?.process(footer);
      }
    } catch (err) {
      /* the page still works; a reload shows the controls */
    }
  }

  // A dropped stream (a phone changing networks, a proxy restart) is followed
  // again from the reply's own stream URL: it answers the text so far, then
  // the rest. These are the waits before each try (ms).
  const RECONNECT_DELAYS = [250, 1000, 2000, 4000, 8000];

  // Follows one reply's SSE stream into `article`, reconnecting if it drops.
  async function follow(response, article, user) {
    const view = new window.ChatRender.StreamView(article.querySelector(".message-body"));
    let ended = false;
    let titlePending = false;
    const onEvent = (name, data) => {
      if (name === "start") {
        article.id = `m-${data.assistant_message}`;
        article.dataset.id = data.assistant_message;
        active.id = data.assistant_message;
        if (user && data.user_message) {
          user.id = `m-${data.user_message}`;
          user.dataset.id = data.user_message;
        }
        titlePending = data.title_pending;
        // Another tab (or device) added messages this page does not show: the
        // model saw them, so the page shows them too once the reply is in.
        if ("parent" in data && String(data.parent ?? "") !== active.shownLast) active.stale = true;
        adoptConversation(data);
        if (active.stopRequested) stop(); // Stop was pressed before the id was known
      } else if (name === "snapshot") {
        view.setText(data.t);
      } else if (name === "message") {
        view.append(data.t);
      } else if (name === "end") {
        ended = true;
        view.finish();
        setStatus(article, data.status, data.error, data.finish_reason);
      }
      scrollToBottom();
    };
    let gone = false;
    for (let attempt = 0; ; attempt++) {
      let events = 0;
      try {
        await readEvents(response, (name, data) => {
          events++;
          onEvent(name, data);
        });
      } catch (err) {
        /* the connection dropped mid-read: reconnect below */
      }
      // The connection dropped; the reply itself goes on server-side.
      if (events > 1) attempt = 0; // it had been following: a new drop starts afresh
      if (ended || !article.dataset.id || attempt >= RECONNECT_DELAYS.length) break;
      await sleep(RECONNECT_DELAYS[attempt]);
      try {
        response = await fetch(conversationUrl(`m/${article.dataset.id}/stream/`));
      } catch (err) {
        response = new Response(""); // offline still: the next wait
      }
      // Gone (deleted) or not ours: nothing to follow. A proxy's 502-504 or a
      // 429 is passing: the next wait.
      if ([403, 404, 410].includes(response.status)) {
        gone = true;
        break;
      }
      if (!response.ok) response = new Response("");
    }
    sources.set(article, view.text);
    article.removeAttribute("aria-live");
    if (!ended) {
      view.finish();
      setStatus(
        article,
        "interrupted",
        gone ? "This reply is no longer there." : "Connection lost. Reload the page to see the reply.",
      );
    }
    return { ended, titlePending };
  }

  // After a reply: the page is free again first, then its controls arrive.
  function settle(result, articles) {
    const stale = active?.stale;
    active = null;
    setBusy(false);
    if (!result?.ended) return;
    if (stale) window.htmx.ajax("GET", conversationUrl("messages/"), { target: "#messages", swap: "innerHTML" });
    else refreshFooters(articles);
    if (result.titlePending) followTitle();
  }

  function setTitle(title) {
    document.querySelector(".chat-title").textContent = title;
    document.title = `${title} · chatsite`;
  }

  // The sidebar, re-rendered by the server (day groups, the current entry).
  async function refreshSidebar() {
    const list = document.getElementById("conversation-list");
    const search = document.querySelector("#sidebar input[type=search]");
    const query = search.value ? `?q=${encodeURIComponent(search.value)}` : "";
    const response = await fetch(`/${query}`, {
      headers: {
        "HX-Request": "true",
        "HX-Target": "conversation-list",
        "HX-Current-URL": location.href,
      },
    });
    if (!response.ok) return;
    list.innerHTML = await response.text();
    window.htmx?.process(list);
  }

  function adoptConversation(data) {
    if (conversationId() === String(data.conversation)) return;
    chat.dataset.conversation = data.conversation;
    composer.action = `/c/${data.conversation}/send/`;
    history.replaceState(null, "", `/c/${data.conversation}/`);
    setTitle(data.title);
    refreshSidebar();
    refreshSettings();
  }

  // A new chat's settings went with its first message; from now on the
  // panel saves to the conversation (and offers its exports).
  async function refreshSettings() {
    const response = await fetch(conversationUrl("settings/"));
    if (!response.ok) return;
    const template = document.createElement("template");
    template.innerHTML = await response.text();
    const panel = template.content.querySelector(".chat-settings");
    document.querySelector(".chat-settings").replaceWith(panel);
    window.htmx?.process(panel);
  }

  // The automatic title arrives shortly after the first reply.
  async function followTitle() {
    const before = document.querySelector(".chat-title").textContent;
    for (const delay of [300, 1000, 2000, 4000]) {
      await sleep(delay);
      try {
        const { title } = await (await fetch(conversationUrl("title/"))).json();
        if (title !== before) {
          setTitle(title);
          await refreshSidebar();
          return;
        }
      } catch (err) {
        return;
      }
    }
  }

  // POSTs `body` to `url`, which answers with a reply's SSE stream; `place()`
  // puts the new articles in the page once the server has accepted.
  async function startReply(url, body, place) {
    if (active) return false;
    showError("");
    active = { id: null, controller: new AbortController() };
    setBusy(true);
    let response;
    try {
      response = await fetch(url, {
        method: "POST",
        body,
        headers: { "X-CSRFToken": csrfToken },
        signal: active.controller.signal,
      });
    } catch (err) {
      showError("Could not reach the server. Your message was not sent.");
      active = null;
      setBusy(false);
      return false;
    }
    if (!response.ok) {
      showError(await refusal(response, "The server refused the message"));
      active = null;
      setBusy(false);
      return false;
    }
    document.querySelector(".empty-hint")?.remove();
    // The last message this page shows: the new one should follow it.
    const shown = messages.querySelectorAll("article.message[data-id]");
    active.shownLast = shown.length ? shown[shown.length - 1].dataset.id : "";
    const { user, article } = place();
    followBottom = true;
    scrollToBottom();
    let result;
    try {
      result = await follow(response, article, user);
    } catch (err) {
      if (err.name !== "AbortError") setStatus(article, "interrupted", "Connection lost.");
    }
    settle(result, [user, article]);
    return true;
  }

  function send() {
    const content = textarea.value;
    if (!content.trim() || active) return;
    startReply(composer.action, new FormData(composer), () => {
      textarea.value = "";
      // Only the newest reply can be regenerated: earlier buttons would branch
      // the conversation somewhere the page no longer shows.
      for (const button of messages.querySelectorAll(".regenerate")) button.remove();
      const user = userArticle(content);
      const article = assistantArticle();
      messages.append(user, article);
      return { user, article };
    });
  }

  function replyForm(fields) {
    const form = new FormData();
    form.set("model", modelSelect.value);
    for (const [key, value] of Object.entries(fields || {})) form.set(key, value);
    return form;
  }

  function regenerate(old) {
    startReply(conversationUrl(`m/${old.dataset.id}/regenerate/`), replyForm(), () => {
      const article = assistantArticle();
      // What followed the old reply is not on the new version's path.
      while (old.nextElementSibling) old.nextElementSibling.remove();
      old.replaceWith(article);
      return { article };
    });
  }

  // Edit: the message becomes a form in place; "Save & send" sends a new
  // version (the old one stays, reachable with the version arrows).
  function openEditor(article) {
    if (active || article.querySelector(".edit-form")) return;
    const body = article.querySelector(".message-body");
    const meta = article.querySelector(".message-meta");
    const form = el("form", { class: "edit-form" });
    const area = el("textarea", { "aria-label": "Edit message", rows: "3" });
    area.value = messageSource(article);
    const save = el("button", { type: "submit", class: "button primary" }, "Save & send");
    const cancel = el("button", { type: "button", class: "button" }, "Cancel");
    const actions = el("div", { class: "edit-actions" });
    actions.append(cancel, save);
    form.append(area, actions);
    body.hidden = meta.hidden = true;
    body.after(form);
    area.focus();
    const close = () => {
      form.remove();
      body.hidden = meta.hidden = false;
      article.querySelector(".edit-message")?.focus();
    };
    cancel.addEventListener("click", close);
    area.addEventListener("keydown", (event) => {
      if (event.key === "Escape") {
        event.stopPropagation();
        close();
      } else if (sendsOnEnter(event)) {
        event.preventDefault();
        form.requestSubmit();
      }
    });
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const content = area.value;
      if (!content.trim()) return;
      const url = conversationUrl(`m/${article.dataset.id}/edit/`);
      startReply(url, replyForm({ content }), () => {
        // The new version replaces the old one and everything after it on screen.
        while (article.nextElementSibling) article.nextElementSibling.remove();
        const user = userArticle(content);
        const reply = assistantArticle();
        article.replaceWith(user);
        messages.append(reply);
        return { user, article: reply };
      });
    });
  }

  async function copyMessage(button) {
    const text = messageSource(button.closest("article"));
    let ok = false;
    try {
      await navigator.clipboard.writeText(text);
      ok = true;
    } catch (err) {
      const area = el("textarea", { readonly: "", class: "offscreen" });
      area.value = text;
      document.body.append(area);
      area.select();
      ok = document.execCommand("copy");
      area.remove();
    }
    button.textContent = ok ? "Copied" : "Copy failed";
    setTimeout(() => (button.textContent = "Copy"), 1500);
  }

  messages.addEventListener("click", (event) => {
    const button = event.target.closest("button");
    if (!button || !messages.contains(button)) return;
    const article = button.closest("article.message");
    if (button.classList.contains("copy-message")) copyMessage(button);
    else if (button.classList.contains("edit-message")) openEditor(article);
    else if (button.classList.contains("regenerate")) regenerate(article);
    else if (button.closest(".load-older")) loadOlder(button.closest(".load-older"));
  });

  async function resume(article) {
    active = { id: article.dataset.id, controller: new AbortController() };
    setBusy(true);
    let result;
    try {
      const response = await fetch(article.dataset.streamUrl, {
        signal: active.controller.signal,
      });
      if (response.ok) result = await follow(response, article);
    } catch (err) {
      if (err.name !== "AbortError") setStatus(article, "interrupted", "Connection lost.");
    }
    settle(result, [article]);
  }

  async function stop() {
    if (!active) return;
    if (!active.id) {
      active.stopRequested = true; // sent as soon as the reply has an id
      return;
    }
    stopButton.disabled = true;
    try {
      const response = await fetch(conversationUrl(`m/${active.id}/stop/`), {
        method: "POST",
        headers: { "X-CSRFToken": csrfToken },
      });
      if (!response.ok) {
        showError(await refusal(response, "Could not stop the reply"));
      }
    } catch (err) {
      showError("Could not reach the server to stop the reply.");
    } finally {
      stopButton.disabled = false;
    }
  }

  // Older messages load when the top of the transcript comes into view; the
  // reader stays where they were.
  const olderObserver = new IntersectionObserver(
    (entries) => {
      for (const entry of entries) if (entry.isIntersecting) loadOlder(entry.target);
    },
    { root: messages, rootMargin: "400px 0px 0px 0px" },
  );

  function watchOlder() {
    const sentinel = messages.querySelector(".load-older");
    if (sentinel) olderObserver.observe(sentinel);
  }

  async function loadOlder(sentinel) {
    if (sentinel.dataset.loading) return;
    sentinel.dataset.loading = "1";
    olderObserver.unobserve(sentinel);
    let html;
    try {
      const response = await fetch(sentinel.dataset.url);
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      html = await response.text();
    } catch (err) {
      delete sentinel.dataset.loading;
      return;
    }
    const template = document.createElement("template");
    template.innerHTML = html;
    const nodes = Array.from(template.content.children);
    const fromBottom = messages.scrollHeight - messages.scrollTop;
    sentinel.replaceWith(template.content);
    for (const node of nodes) {
      window.ChatRender.renderAll(node);
      window.htmx?.process(node);
    }
    messages.scrollTop = messages.scrollHeight - fromBottom;
    watchOlder();
  }

  composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  textarea.addEventListener("keydown", (event) => {
    if (sendsOnEnter(event)) {
      event.preventDefault();
      send();
    }
  });
  stopButton.addEventListener("click", stop);

  // Sidebar entry menus: one open at a time, closed by a click elsewhere or Escape.
  function closeMenus(except) {
    for (const menu of document.querySelectorAll(".item-menu[open]")) {
      if (menu !== except) menu.open = false;
    }
  }
  document.addEventListener(
    "toggle",
    (event) => {
      const details = event.target;
      if (!details.matches?.(".item-menu") || !details.open) return;
      const menu = details.querySelector(".menu");
      const list = details.closest(".conversation-list");
      menu.classList.remove("up");
      if (list && menu.getBoundingClientRect().bottom > list.getBoundingClientRect().bottom) {
        menu.classList.add("up");
      }
    },
    true, // toggle does not bubble
  );
  document.addEventListener("click", (event) => {
    closeMenus(event.target.closest(".item-menu"));
    // The settings popover too closes on a click outside it.
    for (const popover of document.querySelectorAll("details.chat-settings[open]")) {
      if (!popover.contains(event.target)) popover.open = false;
    }
  });

  document.addEventListener("keydown", (event) => {
    const key = event.key.toLowerCase();
    if ((event.ctrlKey || event.metaKey) && event.shiftKey && key === "o") {
      event.preventDefault();
      location.assign("/");
      return;
    }
    if (event.key !== "Escape") return;
    const rename = event.target.closest?.(".rename-form, .confirming");
    const menu = event.target.closest?.(".item-menu[open]");
    const popover = event.target.closest?.("details[open]");
    if (rename) rename.querySelector("button.cancel").click();
    else if (menu) {
      menu.open = false;
      menu.querySelector("summary").focus();
    } else if (popover) {
      popover.open = false;
      popover.querySelector("summary").focus();
    } else if (document.body.classList.contains("sidebar-open")) setSidebar(false);
    // Escape stops a reply only from the composer or the conversation, not
    // while clearing the search box or leaving some other field.
    else if (active && (event.target === textarea || !event.target.closest?.("input, select, textarea, #sidebar")))
      stop();
  });

  // Phone layout: the sidebar slides over the chat and back.
  const sidebarToggle = document.querySelector(".sidebar-toggle");
  function setSidebar(open) {
    document.body.classList.toggle("sidebar-open", open);
    sidebarToggle.setAttribute("aria-expanded", String(open));
    chat.inert = open; // focus and taps stay in the sidebar while it covers the chat
    if (open) document.querySelector("#sidebar input[type=search]").focus();
    else sidebarToggle.focus();
  }
  sidebarToggle.addEventListener("click", () => setSidebar(true));
  // Widened past the phone layout (a tablet turned, a window resized) with the
  // sidebar open: close it, or the inert chat could not be reached.
  matchMedia("(max-width: 760px)").addEventListener("change", (event) => {
    if (!event.matches && document.body.classList.contains("sidebar-open")) setSidebar(false);
  });
  // A tap beside the open sidebar, on the dimmed chat, closes it.
  document.querySelector(".sidebar-backdrop").addEventListener("click", () => setSidebar(false));
  document.querySelector(".sidebar-close").addEventListener("click", () => setSidebar(false));

  // htmx: no version switching under a running reply; resume after a swap;
  // show the settings form's refusals; keep the tab title with the header.
  document.addEventListener("htmx:beforeRequest", (event) => {
    if (active && messages.contains(event.target)) event.preventDefault();
  });
  document.addEventListener("htmx:beforeSwap", (event) => {
    if (event.detail.target.id === "settings-status" && event.detail.xhr.status < 500) {
      event.detail.shouldSwap = true;
      event.detail.isError = false;
    }
  });
  // A deleted entry leaves the list: the focus goes to its neighbour (or New
  // chat). The entry's own events end with it, so this looks before the swap
  // and focuses once the swap (synchronous, right after) is done.
  document.addEventListener("htmx:beforeSwap", (event) => {
    const li = event.detail.target;
    if (li?.classList?.contains("confirming") && event.detail.requestConfig?.verb === "post") {
      const item = (node) => node?.matches?.(".conversation-item") && node.querySelector("a");
      const next =
        item(li.nextElementSibling) || item(li.previousElementSibling) || document.querySelector(".new-chat");
      setTimeout(() => next?.isConnected && next.focus(), 0);
    }
  });
  document.addEventListener("htmx:afterSwap", (event) => {
    if (event.detail.target === messages) {
      watchOlder();
      const streaming = messages.querySelector("article[data-status=streaming][data-stream-url]");
      if (streaming && !active) resume(streaming);
    }
  });
  document.addEventListener("htmx:oobAfterSwap", () => {
    // A rename swaps the header in; the tab title follows it.
    document.title = `${document.getElementById("chat-title").textContent} · chatsite`;
  });

  // Theme: the user's choice is stored; choosing what the system shows
  // anyway goes back to following the system.
  const themeButton = document.querySelector(".theme-toggle");
  const systemDark = window.matchMedia("(prefers-color-scheme: dark)");
  const root = document.documentElement;
  function isDark() {
    return root.dataset.theme ? root.dataset.theme === "dark" : systemDark.matches;
  }
  function applyTheme(theme) {
    if (theme === "system") delete root.dataset.theme;
    else root.dataset.theme = theme;
    const media = (scheme) =>
      theme === "system" ? `(prefers-color-scheme: ${scheme})` : theme === scheme ? "all" : "not all";
    document.getElementById("code-theme-light")?.setAttribute("media", media("light"));
    document.getElementById("code-theme-dark")?.setAttribute("media", media("dark"));
    themeButton.setAttribute("aria-pressed", String(isDark()));
  }
  themeButton.addEventListener("click", () => {
    const dark = !isDark();
    const theme = dark === systemDark.matches ? "system" : dark ? "dark" : "light";
    applyTheme(theme);
    fetch(themeButton.dataset.url, {
      method: "POST",
      body: new URLSearchParams({ theme }),
      headers: { "X-CSRFToken": csrfToken },
    });
  });
  systemDark.addEventListener("change", () => {
    themeButton.setAttribute("aria-pressed", String(isDark()));
  });
  themeButton.setAttribute("aria-pressed", String(isDark()));

  window.ChatRender.renderAll(document);
  const streaming = messages.querySelector("article[data-status=streaming][data-stream-url]");
  if (streaming) resume(streaming);
  scrollToBottom();
  watchOlder();
})();
