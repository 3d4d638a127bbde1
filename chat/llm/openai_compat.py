"""OpenAI and OpenAI-compatible servers (Ollama, vLLM, llama.cpp server, LM Studio).

Uses the `openai` package's client for the request (its URL, auth and
identification headers, its HTTP client and connection pool) but reads the SSE
body raw and decodes each chunk with `json.loads`: building a pydantic object
per chunk costs more than everything else on the hot path. The HTTP layer is
the package's aiohttp client when available.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import logging
import socket
import ssl
import time
import weakref
from collections.abc import AsyncIterator
from urllib.parse import unquote, urlsplit

import httpx2
import openai
from openai._models import FinalRequestOptions

try:
    import aiohttp

    _AIOHTTP_ERRORS: tuple[type[Exception], ...] = (aiohttp.ClientError,)
except ImportError:  # the package's aiohttp extra is not installed
    _AIOHTTP_ERRORS = ()

from .base import ChatMessage, Delta, GenerationParams, ProviderError, on_abort

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
MODELS_TTL = 60.0  # seconds a successful /models answer is reused
MODELS_FAILURE_TTL = 10.0  # seconds before a failed /models call is tried again
MODELS_TIMEOUT = 5.0

_METADATA_HOSTS = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
    }
)
_LINK_LOCAL_V4 = ipaddress.IPv4Network("169.254.0.0/16")
_METADATA_IPS = frozenset(
    {
        ipaddress.IPv4Address("100.100.100.200"),  # Alibaba Cloud metadata
        ipaddress.IPv6Address("fd00:ec2::254"),  # AWS IMDS over IPv6
    }
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


# -- base URL validation ------------------------------------------------------------------------
def _parse_ipv4_any(host: str) -> ipaddress.IPv4Address | None:
    """Parse an IPv4 address in any spelling inet_aton accepts (decimal, hex, octal, short)."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    nums = []
    for part in parts:
        p = part.lower()
        try:
            if p.startswith("0x"):
                n = int(p[2:] or "0", 16)
            elif len(p) > 1 and p.startswith("0"):
                n = int(p[1:], 8)
            else:
                if not p.isdigit():
                    return None
                n = int(p, 10)
        except ValueError:
            return None
        nums.append(n)
    *head, last = nums
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(nums)):
        return None
    value = last
    for i, n in enumerate(head):
        value |= n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def _embedded_v4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr in _NAT64 or int(addr) >> 32 == 0:  # NAT64 or IPv4-compatible (::a.b.c.d)
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def _ascii_host(host: str) -> str:
    """The host name the HTTP clients will connect to, for a host written in Unicode.

    yarl (aiohttp) and httpx2 map a non-ASCII host through IDNA, which turns
    "169\u3002254\u3002169\u3002254" (ideographic full stops), fullwidth digits
    and circled digits into plain ASCII: the checks must see what they see.
    Both of Python's IDNA mappings are tried (the codec's IDNA 2003 and the
    idna package's UTS 46, which yarl uses); those that accept the name must
    agree, and a name neither accepts is refused.
    """
    if host.isascii():
        return host
    spellings = set()
    with contextlib.suppress(UnicodeError):
        spellings.add(host.encode("idna").decode("ascii").lower())
    try:
        import idna  # installed with httpx2 and yarl
    except ImportError:
        pass
    else:
        with contextlib.suppress(idna.IDNAError, UnicodeError):
            spellings.add(idna.encode(host, uts46=True).decode("ascii").lower())
    if len(spellings) != 1:
        raise ValueError("The model server URL has a host name that cannot be used.")
    return spellings.pop()


def validate_base_url(url: str) -> str:
    """Check an endpoint URL before any request goes to it; return it normalised.

    Only http and https. Refuses link-local and cloud-metadata targets
    (169.254.0.0/16 in any spelling, fe80::/10, IPv4 embedded in IPv6, the
    metadata host names). Loopback and private ranges are allowed on purpose:
    self-hosters run Ollama or vLLM on localhost or their LAN. Host names are not
    resolved here, so DNS pointing at a metadata address is not caught.
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError("The model server URL is empty.")
    url = url.strip()
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError("The model server URL is not a valid URL.") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError("The model server URL must start with http:// or https://.")
    host = _ascii_host(unquote(parts.hostname or "").strip()).rstrip(".").lower()
    if not host:
        raise ValueError("The model server URL has no host name.")
    if host in _METADATA_HOSTS:
        raise ValueError("The model server URL points at a cloud metadata service; refused.")

    addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        addr = _parse_ipv4_any(host)
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.is_link_local:
            raise ValueError("The model server URL points at a link-local address; refused.")
        if addr in _METADATA_IPS:
            raise ValueError("The model server URL points at a cloud metadata service; refused.")
        addr = _embedded_v4(addr)
    if addr is not None and (addr in _LINK_LOCAL_V4 or addr in _METADATA_IPS):
        raise ValueError(
            "The model server URL points at a link-local or cloud metadata address; refused."
        )
    return url.rstrip("/")


# -- error mapping ------------------------------------------------------------------------------
def _status_message(status: int) -> str:
    if status in (401, 403):
        return f"The model server rejected the credentials (HTTP {status})."
    if status == 404:
        return f"The model server does not know this model (HTTP {status})."
    if status == 429:
        return f"The model server is rate limiting requests (HTTP {status}). Try again shortly."
    if status >= 500:
        return f"The model server failed (HTTP {status})."
    if status in (400, 413, 422):
        return f"The model server rejected the request (HTTP {status})."
    return f"The model server gave an unexpected answer (HTTP {status})."


def _timeout_message(seconds: float) -> str:
    return f"The model server stopped responding (timed out after {seconds:g} s)."


LOST = "The connection to the model server was lost."
CONNECT_FAILED = "Could not connect to the model server."


class OpenAICompatProvider:
    """A `Provider` for any server speaking the OpenAI chat-completions API."""

    def __init__(
        self,
        *,
        name: str,
        base_url: str | None,
        api_key: str | None,
        models: list[str] | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
    ):
        self.name = name
        self.base_url = validate_base_url(base_url or DEFAULT_BASE_URL)
        self._api_key = api_key
        self._models = list(models) if models else None
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._timeout = httpx2.Timeout(read_timeout, connect=connect_timeout)
        # A stream's read timeout is its _ReadDeadline; the transport only connects.
        self._stream_timeout = httpx2.Timeout(None, connect=connect_timeout)
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, openai.AsyncOpenAI]
        self._clients = weakref.WeakKeyDictionary()
        self._models_cache: tuple[float, list[str]] | None = None
        self._last_good_models: list[str] = []

    def __repr__(self) -> str:  # never show the key
        return f"<OpenAICompatProvider {self.name!r}>"

    # -- clients --------------------------------------------------------------------------------
    def _client(self) -> openai.AsyncOpenAI:
        """The AsyncOpenAI client of the running event loop (one per loop)."""
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = openai.AsyncOpenAI(
                # A placeholder rather than None: None would make the package read
                # OPENAI_API_KEY and send OpenAI's key to whatever server this is.
                api_key=self._api_key or "no-key",
                base_url=self.base_url,
                timeout=self._timeout,
                max_retries=0,  # a retried stream could duplicate tokens
                http_client=_http_client(self._timeout),
            )
            if urlsplit(self.base_url).hostname != "api.openai.com":
                # OPENAI_ORG_ID / OPENAI_PROJECT_ID are for OpenAI, not for other servers.
                client.organization = client.project = None
            self._clients[loop] = client
        return client

    async def aclose(self) -> None:
        """Close the client of the running loop (tests, shutdown)."""
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.close()

    # -- models ---------------------------------------------------------------------------------
    async def list_models(self) -> list[str]:
        if self._models:
            return list(self._models)
        now = time.monotonic()
        if self._models_cache is not None and self._models_cache[0] > now:
            return list(self._models_cache[1])
        try:
            page = await self._client().models.list(timeout=min(MODELS_TIMEOUT, self.read_timeout))
            ids = sorted(m.id for m in page.data if getattr(m, "id", None))
            ttl = MODELS_TTL
        except Exception as exc:
            # Keep offering the last list that worked: a blip of /models must
            # not make every conversation on these models unusable.
            log.warning("Listing models of provider %r failed: %s", self.name, _describe(exc))
            ids = self._last_good_models
            ttl = MODELS_FAILURE_TTL
        else:
            self._last_good_models = ids
        self._models_cache = (time.monotonic() + ttl, ids)
        return list(ids)

    # -- streaming ------------------------------------------------------------------------------
    async def stream(
        self, messages: list[ChatMessage], params: GenerationParams
    ) -> AsyncIterator[Delta]:
        kwargs: dict = {
            "model": params.model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": params.max_tokens,
        }
        if params.temperature is not None:
            kwargs["temperature"] = params.temperature
        client = self._client()
        finish: str | None = None
        usage: dict | None = None
        try:
            async with (
                _ReadDeadline(self.read_timeout) as deadline,
                _raw_chat_stream(client, kwargs, self._stream_timeout) as resp,
            ):
                done = False
                if (shutdown := _shutdown_hook(resp)) is not None:
                    on_abort(shutdown)
                try:
                    async for payload in _sse_data(_body_chunks(resp), deadline):
                        if payload == b"[DONE]":
                            done = True
                            break
                        try:
                            obj = _json_loads(payload)
                        except ValueError:
                            log.warning("Provider %r sent a malformed chunk", self.name)
                            continue
                        if not isinstance(obj, dict):
                            continue
                        if obj.get("error"):
                            raise ProviderError("The model server reported an error.")
                        u = obj.get("usage")
                        if isinstance(u, dict):
                            usage = u
                        choices = obj.get("choices")
                        if not choices or not isinstance(choices, list):
                            continue
                        choice = choices[0]
                        if not isinstance(choice, dict):
                            continue
                        delta = choice.get("delta")
                        if isinstance(delta, dict):
                            text = delta.get("content")
                            if text and isinstance(text, str):
                                yield Delta(text=text)
                        fr = choice.get("finish_reason")
                        if fr:
                            finish = str(fr)
                except (httpx2.RequestError, OSError, *_AIOHTTP_ERRORS) as exc:
                    # A server that said how it finished but then hung or dropped
                    # the connection before [DONE] still gave a complete reply.
                    if finish is None:
                        log.warning("Provider %r: stream failed: %s", self.name, _describe(exc))
                        if isinstance(exc, httpx2.ReadTimeout | TimeoutError):
                            raise ProviderError(_timeout_message(self.read_timeout)) from None
                        raise ProviderError(LOST) from None
                if not done and finish is None:
                    # The body ended cleanly, the reply did not: something cut it short.
                    log.warning("Provider %r: stream ended without a finish", self.name)
                    raise ProviderError(LOST)
        except ProviderError:
            raise
        except TimeoutError:  # the read deadline: nothing arrived for read_timeout seconds
            log.warning("Provider %r: no data for %g s", self.name, self.read_timeout)
            if finish is None:
                raise ProviderError(_timeout_message(self.read_timeout)) from None
            # It had said how it finished, then hung before [DONE]: a complete reply.
        except _UpstreamStatus as exc:
            log.warning(
                "Provider %r: HTTP %s from the model server (%s)",
                self.name,
                exc.status,
                _error_code(exc.body),
            )
            raise ProviderError(_status_message(exc.status)) from None
        except httpx2.TimeoutException as exc:  # before the response: connect, write or pool
            log.warning("Provider %r: %s", self.name, _describe(exc))
            if isinstance(exc, httpx2.ReadTimeout):
                raise ProviderError(_timeout_message(self.read_timeout)) from None
            # The aiohttp transport reports a refused connection as ConnectTimeout.
            if any(isinstance(e, OSError) and not isinstance(e, TimeoutError) for e in _chain(exc)):
                raise ProviderError(CONNECT_FAILED) from None
            raise ProviderError(
                f"Could not connect to the model server "
                f"(timed out after {self.connect_timeout:g} s)."
            ) from None
        except (httpx2.HTTPError, OSError, *_AIOHTTP_ERRORS) as exc:
            log.warning("Provider %r: %s", self.name, _describe(exc))
            raise ProviderError(CONNECT_FAILED) from None
        except Exception:
            log.exception("Provider %r: unexpected failure while streaming", self.name)
            raise ProviderError("The model server request failed.") from None
        if finish is not None or usage is not None:
            yield Delta(
                finish_reason=finish,
                prompt_tokens=_int(usage, "prompt_tokens"),
                completion_tokens=_int(usage, "completion_tokens"),
            )


class _ReadDeadline:
    """A stream's read timeout, checked coarsely: fails it after `seconds` with no data.

    aiohttp's own read timeout re-arms a timer for every chunk received (a
    cancel and a new TimerHandle), ~5% of the server's CPU at 100 streams. Here
    a chunk only stamps the time (`last`), and one timer per stream checks at
    most every `seconds`; once nothing arrived for that long it expires the
    `asyncio.timeout` around the request and the stream, which then raises
    TimeoutError from wherever the stream waits, headers or body.
    """

    __slots__ = ("seconds", "last", "_loop", "_timeout", "_timer")

    def __init__(self, seconds: float):
        self.seconds = seconds

    async def __aenter__(self) -> _ReadDeadline:
        self._loop = asyncio.get_running_loop()
        self.last = self._loop.time()
        self._timeout = asyncio.timeout(None)
        await self._timeout.__aenter__()
        self._timer = self._loop.call_later(self.seconds, self._check)
        return self

    async def __aexit__(self, *exc_info) -> bool | None:
        self._timer.cancel()
        return await self._timeout.__aexit__(*exc_info)

    def _check(self) -> None:
        idle = self._loop.time() - self.last
        if idle >= self.seconds:
            self._timeout.reschedule(self._loop.time())  # expire now
        else:
            self._timer = self._loop.call_later(self.seconds - idle, self._check)


# The request's URL, headers and timeouts as the package builds them, per client.
_REQUEST_TEMPLATES: weakref.WeakKeyDictionary[openai.AsyncOpenAI, tuple] = (
    weakref.WeakKeyDictionary()
)


def _chat_request(
    client: openai.AsyncOpenAI, body: dict, timeout: httpx2.Timeout
) -> httpx2.Request:
    """POST /chat/completions as the package builds it, carrying `body`.

    The package builds the URL and the headers (the key, its own identification,
    `X-Stainless-Raw-Response`) once per client, with its own `_build_request`;
    a request then only changes the body. Building them afresh, with the
    package's per-request options models, was half of its ~0.9 ms of CPU per
    request here.
    """
    template = _REQUEST_TEMPLATES.get(client)
    if template is None:
        options = FinalRequestOptions.construct(
            method="post",
            url="/chat/completions",
            json_data={},
            headers={"X-Stainless-Raw-Response": "stream"},
            timeout=timeout,
        )
        built = client._build_request(options)
        headers = [(k, v) for k, v in built.headers.multi_items() if k.lower() != "content-length"]
        template = _REQUEST_TEMPLATES[client] = (built.url, headers, built.extensions)
    url, headers, extensions = template
    return httpx2.Request(
        "POST", url, headers=headers, content=json.dumps(body).encode(), extensions=extensions
    )


class _UpstreamStatus(Exception):
    """The model server answered with an error status (not 2xx)."""

    def __init__(self, status: int, body: bytes):
        self.status, self.body = status, body


@contextlib.asynccontextmanager
async def _raw_chat_stream(client: openai.AsyncOpenAI, body: dict, timeout: httpx2.Timeout):
    """POST /chat/completions on the client's HTTP stack, the body streamed back unparsed.

    The package's HTTP client sends it (its aiohttp transport, its connection
    pool, no redirects followed); an error status raises _UpstreamStatus.
    """
    response = await client._client.send(_chat_request(client, body, timeout), stream=True)
    try:
        if not 200 <= response.status_code < 300:
            error_body = b""
            with contextlib.suppress(httpx2.HTTPError, OSError, *_AIOHTTP_ERRORS):
                async for chunk in response.aiter_bytes():
                    error_body += chunk
                    if len(error_body) > 65536:  # enough to log its error code
                        break
            raise _UpstreamStatus(response.status_code, error_body)
        yield response
    finally:
        await response.aclose()


def _aiohttp_response(response: httpx2.Response):
    """The aiohttp response under the package's aiohttp transport, if that is what ran it.

    None for another transport, or for a compressed body (httpx2 decodes it).
    """
    # httpx2's client wraps the transport's stream (BoundAsyncStream) around it.
    stream = getattr(response.stream, "_stream", response.stream)
    aiohttp_response = getattr(stream, "_aiohttp_response", None)
    if response.headers.get("content-encoding", "identity") != "identity":
        return None
    return aiohttp_response


def _body_chunks(response) -> AsyncIterator[bytes]:
    """The response body as it arrives.

    Straight from aiohttp's stream when the client runs on the package's aiohttp
    transport: httpx2's response and the transport add three async generator
    layers per chunk, a tenth of the server's CPU at 100 streams.
    """
    aiohttp_response = _aiohttp_response(response)
    if aiohttp_response is None:
        return response.aiter_bytes()
    return aiohttp_response.content.iter_any()


def _shutdown_hook(response):
    """A hook that sends the upstream our FIN now (base.on_abort), or None.

    It acts only while the connection still belongs to this response: aiohttp
    releases it to the pool as soon as the whole body is in, and a pooled
    connection must not be shut. The connection itself is closed as usual
    when the stream's task unwinds.
    """
    aiohttp_response = _aiohttp_response(response)
    if aiohttp_response is None:
        return None

    def shutdown() -> None:
        connection = aiohttp_response.connection
        transport = connection.transport if connection is not None else None
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    return shutdown


async def _sse_data(
    chunks: AsyncIterator[bytes], deadline: _ReadDeadline | None = None
) -> AsyncIterator[bytes]:
    """The `data` of each server-sent event in a byte stream (multi-line data joined).

    Splits on blank lines first: an upstream token is usually one whole event
    per chunk, so most chunks cost one split and one line check. Every chunk,
    a comment too, counts as a sign of life for `deadline`.
    """
    buf = b""
    now = time.monotonic  # the event loop's clock
    async for raw in chunks:
        if deadline is not None:
            deadline.last = now()
        buf += raw
        cr = b""
        if b"\r" in buf:  # CR LF or CR line ends (rare): normalised to LF
            if buf.endswith(b"\r"):  # perhaps the first half of a CR LF: wait for the next byte
                buf, cr = buf[:-1], b"\r"
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *events, buf = buf.split(b"\n\n")
        buf += cr
        for event in events:
            data = _event_data(event)
            if data is not None:
                yield data
    if buf.endswith(b"\r"):  # the stream ended: that CR was a line end
        for event in buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n\n")[:-1]:
            data = _event_data(event)
            if data is not None:
                yield data


_scan_json = json.JSONDecoder().scan_once  # the C scanner json.loads runs


def _json_loads(payload: bytes):
    """`json.loads(payload)`, minus its Python-level wrapping for the usual case.

    json.loads of bytes first detects the encoding and runs two whitespace
    regexes around the C scanner: ~40% of its cost for a chunk of one token.
    Anything unusual (not UTF-8, leading whitespace, not JSON) goes through
    json.loads itself, which then raises its usual ValueError.
    """
    try:
        text = payload.decode()
        value, end = _scan_json(text, 0)
    except (UnicodeDecodeError, StopIteration, ValueError):
        return json.loads(payload)
    if end != len(text) and text[end:].strip():
        return json.loads(payload)  # raises "Extra data"
    return value


def _event_data(event: bytes) -> bytes | None:
    if event.startswith(b"data:") and b"\n" not in event:
        return event[6:] if event[5:6] == b" " else event[5:]
    data = [
        line[6:] if line[5:6] == b" " else line[5:]
        for line in event.split(b"\n")
        if line.startswith(b"data:")
    ]  # comments (":"), event:, id: and retry: lines carry no data
    return b"\n".join(data) if data else None


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """Shared by all clients: building one (loading the CA bundle) takes ~60 ms."""
    return httpx2.create_ssl_context()


def _http_client(timeout: httpx2.Timeout) -> httpx2.AsyncClient:
    """The package's aiohttp-backed client (about twice as fast as plain httpx2 here)."""
    kwargs = {"timeout": timeout, "follow_redirects": False, "verify": _ssl_context()}
    try:
        return openai.DefaultAioHttpClient(**kwargs)
    except RuntimeError:  # the aiohttp extra is not installed
        return openai.DefaultAsyncHttpxClient(**kwargs)


def _int(usage: dict | None, key: str) -> int | None:
    if usage is None:
        return None
    value = usage.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _error_code(body: bytes) -> str:
    """The type and code of an OpenAI-shaped error body, for the log (never its message)."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    data = data if isinstance(data, dict) else {}
    err = data.get("error", data) if isinstance(data.get("error", data), dict) else {}
    return f"type={err.get('type')!r} code={err.get('code')!r}"


def _chain(exc: BaseException) -> list[BaseException]:
    chain = [exc]
    cause = exc.__cause__ or exc.__context__
    while cause is not None and len(chain) < 8 and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    return chain


def _describe(exc: BaseException) -> str:
    """An exception's class chain, without messages (which may echo URLs or bodies)."""
    return " <- ".join(type(e).__name__ for e in _chain(exc))
