/*
 * ChatRender: the one renderer and sanitiser for message text.
 *
 * Every path that turns message text into HTML (a page load, an htmx swap, a
 * live streamed reply) goes through renderMarkdown(), so the same policy holds
 * while streaming and after a reload. Message text is untrusted: it is model
 * output, and the model can be steered by anything it has read.
 *
 * Needs, loaded before it: markdown-it (window.markdownit), DOMPurify and
 * highlight.js (window.hljs). A classic script so it runs under
 * `script-src 'self'` with no eval and no inline code.
 */
(function () {
  "use strict";

  const SAFE_LINK_PROTOCOLS = new Set(["http:", "https:", "mailto:"]);
  const SAFE_DATA_IMAGE = /^data:image\/(png|jpeg|gif|webp)[;,]/i;

  // An allowlist rather than DOMPurify's broad defaults: these are the tags
  // markdown-it emits (html is off), plus the span our image hook creates.
  const ALLOWED_TAGS = [
    "a", "blockquote", "br", "code", "del", "em", "h1", "h2", "h3", "h4", "h5",
    "h6", "hr", "img", "li", "ol", "p", "pre", "s", "span", "strong", "table",
    "tbody", "td", "th", "thead", "tr", "ul",
  ];
  const ALLOWED_ATTR = ["align", "alt", "class", "href", "src", "start", "title"];
  // Redundant with the allowlists on purpose: these are the ones that run
  // script, load resources or restyle the page, and must stay out even if
  // someone widens the allowlists later.
  const FORBID_TAGS = [
    "audio", "base", "button", "embed", "form", "frame", "iframe", "input",
    "link", "math", "meta", "object", "picture", "script", "select", "source",
    "style", "svg", "template", "textarea", "video",
  ];
  const FORBID_ATTR = [
    "action", "background", "formaction", "ping", "poster", "srcset", "style",
    "xlink:href",
  ];
  const PURIFY_CONFIG = {
    ALLOWED_TAGS,
    ALLOWED_ATTR,
    FORBID_TAGS,
    FORBID_ATTR,
    ALLOW_DATA_ATTR: false,
    ALLOW_ARIA_ATTR: false,
    ALLOW_UNKNOWN_PROTOCOLS: false,
  };

  // Classes come only from our own renderer: highlight.js token classes and
  // markdown-it's language-*. Anything else could borrow the site's own styles
  // to dress message text up as UI.
  const ALLOWED_CLASS = /^(hljs[\w-]*|[a-z]+_|language-[\w+#.-]+|blocked-image)$/;

  // A private DOMPurify instance, so our hooks never leak into other callers.
  const purifier = window.DOMPurify(window);

  function resolveUrl(raw) {
    // The browser's own URL parser, so the check sees exactly what a click or
    // an image load would: it strips tabs, newlines and leading control
    // characters and lower-cases the scheme, which defeats the usual tricks.
    try {
      return new URL(raw, window.location.href);
    } catch (error) {
      return null;
    }
  }

  function isSafeLinkHref(raw) {
    const url = resolveUrl(raw);
    return url !== null && SAFE_LINK_PROTOCOLS.has(url.protocol);
  }

  function isSafeImageSrc(raw) {
    const url = resolveUrl(raw);
    if (url === null || raw.trim() === "") return false;
    if (url.protocol === "data:") return SAFE_DATA_IMAGE.test(url.href);
    // Another origin would learn the reader's IP and anything the model put
    // in the URL (the classic prompt-injection exfiltration channel).
    return (
      (url.protocol === "http:" || url.protocol === "https:") &&
      url.origin === window.location.origin
    );
  }

  function blockedImage(img) {
    // Show what the image was, as plain text: no request, nothing to click.
    const span = img.ownerDocument.createElement("span");
    span.className = "blocked-image";
    span.title = "Image from another site, not loaded";
    const alt = (img.getAttribute("alt") || "").trim() || "image";
    const src = img.getAttribute("src") || "";
    span.textContent = `[${alt}]` + (src ? ` ${src}` : "");
    return span;
  }

  purifier.addHook("afterSanitizeAttributes", (node) => {
    if (node.hasAttribute && node.hasAttribute("class")) {
      const kept = node.getAttribute("class").split(/\s+/).filter((c) => ALLOWED_CLASS.test(c));
      if (kept.length) node.setAttribute("class", kept.join(" "));
      else node.removeAttribute("class");
    }

    if (node.nodeName === "A") {
      if (node.hasAttribute("href") && isSafeLinkHref(node.getAttribute("href"))) {
        node.setAttribute("rel", "noopener noreferrer nofollow");
        node.setAttribute("target", "_blank");
      } else {
        // Keep the text so the reader still sees what was written.
        node.removeAttribute("href");
      }
    }

    if (node.nodeName === "IMG" && !isSafeImageSrc(node.getAttribute("src") || "")) {
      // The hook runs inside DOMPurify's inert document, so nothing has been
      // fetched yet; replacing the node here means nothing ever will be.
      node.replaceWith(blockedImage(node));
    }
  });

  /** Sanitise an HTML string with the chat policy. Every renderer ends here. */
  function sanitizeHtml(html) {
    return purifier.sanitize(html, PURIFY_CONFIG);
  }

  function highlightCode(code, lang) {
    let body = null;
    try {
      // No guessing for unnamed or unknown languages: highlightAuto() runs
      // every bundled grammar (~90 ms for 1.4 KB of code in Chromium), and a
      // wrong guess is worse than plain text.
      if (lang && window.hljs.getLanguage(lang)) {
        body = window.hljs.highlight(code, { language: lang, ignoreIllegals: true }).value;
      }
    } catch (error) {
      // A grammar bug must never lose the message: fall back to plain text.
      body = null;
    }
    if (body === null) body = md.utils.escapeHtml(code);
    const langClass = lang ? ` language-${md.utils.escapeHtml(lang)}` : "";
    // Returning a whole <pre> tells markdown-it not to wrap it again.
    return `<pre><code class="hljs${langClass}">${body}</code></pre>`;
  }

  const md = window.markdownit({
    html: false,
    linkify: true,
    breaks: false,
    typographer: false,
    highlight: highlightCode,
  });

  // markdown-it aligns table columns with style="text-align:…". Style
  // attributes are forbidden (and refused by the CSP, which would log a
  // violation for every aligned table), so use the legacy align attribute.
  md.core.ruler.push("table_align_attribute", (state) => {
    for (const token of state.tokens) {
      if (token.type !== "th_open" && token.type !== "td_open") continue;
      const match = /^text-align:(left|right|center)$/.exec(token.attrGet("style") || "");
      if (!match) continue;
      token.attrs = token.attrs.filter(([name]) => name !== "style");
      token.attrSet("align", match[1]);
    }
  });

  /** Markdown → sanitised HTML string. */
  function renderMarkdown(text) {
    return sanitizeHtml(md.render(String(text ?? "")));
  }

  function addCopyButtons(root) {
    for (const code of root.querySelectorAll("pre > code")) {
      const pre = code.parentElement;
      if (pre.querySelector(":scope > button.copy-code")) continue;
      const button = document.createElement("button");
      button.type = "button";
      button.className = "copy-code";
      button.setAttribute("aria-label", "Copy");
      button.textContent = "Copy";
      pre.insertBefore(button, code);
    }
  }

  function copyWithTextarea(text) {
    // For plain-http deployments, where navigator.clipboard does not exist.
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.appendChild(area);
    area.select();
    try {
      return document.execCommand("copy");
    } finally {
      area.remove();
    }
  }

  async function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      try {
        await navigator.clipboard.writeText(text);
        return true;
      } catch (error) {
        // Denied permission or an unfocused page: try the old way.
      }
    }
    return copyWithTextarea(text);
  }

  // One delegated listener rather than one per button: buttons are recreated
  // on every render, and sanitised message HTML can never contain a button.
  document.addEventListener("click", async (event) => {
    const button = event.target.closest && event.target.closest("button.copy-code");
    if (!button) return;
    const code = button.parentElement && button.parentElement.querySelector(":scope > code");
    if (!code) return;
    const ok = await copyText(code.textContent);
    button.textContent = ok ? "Copied" : "Copy failed";
    clearTimeout(button.copyResetTimer);
    button.copyResetTimer = setTimeout(() => {
      button.textContent = "Copy";
    }, 1500);
  });

  // The text each element was last rendered from: what a message's "Copy"
  // copies and "Edit" starts from, once the page shows only the HTML.
  const sources = new WeakMap();

  /** Replace element's content with the rendered text, plus copy buttons. */
  function renderInto(element, text) {
    element.innerHTML = renderMarkdown(text);
    addCopyButtons(element);
    sources.set(element, String(text ?? ""));
  }

  /** The Markdown source `element` was rendered from, or undefined. */
  function sourceOf(element) {
    return sources.get(element);
  }

  const FENCE_OPEN = /^[ \t]*(`{3,}|~{3,})([^`]*)$/;

  /**
   * A live reply. Keeps the whole text and re-renders it at most once per
   * animation frame; the accumulated text is always what gets sanitised, so
   * a tag cut across chunks is never seen in pieces.
   *
   * To keep each frame's work independent of the reply's length, text before
   * the last blank line outside a code fence is "settled": rendered once and
   * left in place. Only the tail after it is re-rendered per frame. finish()
   * then renders everything in one go, so the end result is exactly what a
   * reload shows (reference links, loose lists and the like can differ while
   * streaming).
   */
  class StreamView {
    constructor(element) {
      this.element = element;
      this.text = "";
      // Count of characters fed to renderMarkdown(), to prove the work is linear.
      this.renderedChars = 0;
      this.renderCount = 0;
      this.renderMs = 0; // time spent rendering while streaming
      this.finished = false;
      this.frame = null; // a pending animation frame
      this.timer = null; // or a pending wait before one
      this.notBefore = 0; // no tail render before this time (see renderFrame)
      this.reset();
      // Keep renderAll() from rendering over a live reply.
      element.setAttribute("data-markdown-rendered", "");
    }

    reset() {
      this.settledLength = 0; // text[0:settledLength] is rendered and fixed
      this.scanPos = 0; // start of the first line not yet scanned for blocks
      this.fence = null; // the open fence's marker, e.g. "```"
      this.tailNodes = [];
      this.element.replaceChildren();
    }

    append(delta) {
      this.text += String(delta ?? "");
      this.scheduleRender();
    }

    setText(fullText) {
      fullText = String(fullText ?? "");
      if (!fullText.startsWith(this.text.slice(0, this.scanPos))) {
        // Text already scanned or settled changed (not just grew): start over.
        this.reset();
      }
      this.text = fullText;
      this.scheduleRender();
    }

    scheduleRender() {
      if (this.finished) {
        renderInto(this.element, this.text);
        return;
      }
      if (this.frame !== null || this.timer !== null) return;
      const render = () => {
        this.timer = null;
        this.frame = window.requestAnimationFrame(() => {
          this.frame = null;
          this.renderFrame();
        });
      };
      const wait = this.notBefore - performance.now();
      if (wait > 0) {
        this.timer = window.setTimeout(render, wait);
      } else {
        render();
      }
    }

    finish() {
      if (this.timer !== null) window.clearTimeout(this.timer);
      if (this.frame !== null) window.cancelAnimationFrame(this.frame);
      this.timer = this.frame = null;
      this.finished = true;
      renderInto(this.element, this.text);
      this.renderedChars += this.text.length;
    }

    /** Find the end of the last blank line outside a fence, scanning only new lines. */
    advanceSettledBoundary() {
      let boundary = this.settledLength;
      let lineStart = this.scanPos;
      let newline;
      while ((newline = this.text.indexOf("\n", lineStart)) !== -1) {
        const line = this.text.slice(lineStart, newline);
        const fenceMatch = FENCE_OPEN.exec(line);
        if (this.fence === null) {
          if (fenceMatch) this.fence = fenceMatch[1];
          else if (line.trim() === "") boundary = newline + 1;
        } else if (
          fenceMatch &&
          fenceMatch[1][0] === this.fence[0] &&
          fenceMatch[1].length >= this.fence.length &&
          fenceMatch[2].trim() === ""
        ) {
          this.fence = null;
        }
        lineStart = newline + 1;
      }
      this.scanPos = lineStart;
      return boundary;
    }

    renderFrame() {
      const started = performance.now();
      this.renderCount += 1;
      for (const node of this.tailNodes) node.remove();

      const boundary = this.advanceSettledBoundary();
      if (boundary > this.settledLength) {
        const settled = this.text.slice(this.settledLength, boundary);
        const nodes = this.renderNodes(settled);
        const holder = document.createElement("div");
        holder.append(...nodes);
        addCopyButtons(holder);
        this.element.append(...holder.childNodes);
        this.settledLength = boundary;
      }

      this.tailNodes = this.renderNodes(this.text.slice(this.settledLength));
      this.element.append(...this.tailNodes);

      // The tail (after the last blank line outside a code fence) is rendered
      // again each time. One long paragraph or code block makes that grow with
      // the reply, so wait three times as long as this render took: rendering
      // then keeps at most about a quarter of the main thread, whatever the length.
      const took = performance.now() - started;
      this.renderMs += took;
      this.notBefore = performance.now() + 3 * took;
    }

    renderNodes(text) {
      this.renderedChars += text.length;
      // A <template> parses without loading anything; nodes come out inert.
      const template = document.createElement("template");
      template.innerHTML = renderMarkdown(text);
      return Array.from(template.content.childNodes);
    }
  }

  /** Render every not-yet-rendered [data-markdown] element under root. */
  function renderAll(root) {
    root = root || document.body;
    if (!root || !root.querySelectorAll) return;
    const elements = Array.from(root.querySelectorAll("[data-markdown]"));
    if (root.matches && root.matches("[data-markdown]")) elements.unshift(root);
    for (const element of elements) {
      if (element.hasAttribute("data-markdown-rendered")) continue;
      // The server wrote the raw text, HTML-escaped, so textContent is it verbatim.
      renderInto(element, element.textContent);
      element.setAttribute("data-markdown-rendered", "");
    }
  }

  window.ChatRender = Object.freeze({
    renderMarkdown,
    sanitizeHtml,
    renderInto,
    renderAll,
    sourceOf,
    StreamView,
  });

  function renderPage() {
    renderAll(document.body);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", renderPage);
  } else {
    renderPage();
  }
  // Swapped-in content (including out-of-band swaps) may carry new messages.
  document.addEventListener("htmx:afterSwap", renderPage);
  document.addEventListener("htmx:oobAfterSwap", renderPage);
})();
