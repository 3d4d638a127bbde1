"""daphne's hot path, tuned: Twisted TCP writes sent at once, no deprecation proxy per frame,
disconnect hooks run when the socket closes, no form parsing nobody reads.

1. daphne runs on Twisted, whose TCP transport never sends in `write()`: it
queues the bytes, registers the socket with the event loop for writability,
and sends on the next loop turn, then unregisters it. For a streamed reply
that is, for every frame of every stream, two `epoll_ctl` calls, one more
loop wake-up and Twisted's logging-context wrapper around the send: a fifth
of daphne's CPU at 100 streams (py-spy, docs/performance-profile.md).

`install()` makes a plain TCP write try the socket first when nothing is
queued before it, and queue only what the kernel did not take, so order is
kept and back-pressure (producers paused on a full buffer) works as before.
TLS connections, a connection being closed and any write that finds bytes
already queued take Twisted's own path unchanged, as does a send that fails:
Twisted's next write attempt then sees the error and closes the connection.

2. Twisted replaces its `twisted.web.http` module with a proxy that warns on
deprecated names, so each `http.Request` lookup in daphne's per-frame
`handle_reply` costs ~2 µs. daphne's protocol module gets the real module.

3. daphne tells the application of a lost connection by queueing an
`http.disconnect` message, which the application reads on a later turn of
the event loop, behind everything else ready to run. The disconnect hooks
(chat.streaming.on_client_disconnect) run in Twisted's own callback instead,
the moment the socket reports the close: an API client's upstream is then
dropped before anything else runs.

4. Twisted parses the Content-Type of every POST with the email package, and
a form or multipart body into `request.args`, which daphne never reads (it
hands the application the raw body): ~4% of an API request's CPU, and a
second in-memory copy of every upload. daphne's requests skip that parse.
"""

from __future__ import annotations

_installed = False


def install() -> None:
    """Patch twisted.internet.tcp.Connection and daphne.http_protocol (once per process)."""
    global _installed
    if _installed:
        return
    _install_eager_writes()
    _install_real_http_module()
    _install_disconnect_hooks()
    _install_no_form_parsing()
    _installed = True


def _install_no_form_parsing() -> None:
    from daphne import http_protocol

    init = http_protocol.WebRequest.__init__

    def init_without_form_parsing(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self._parsePOSTFormSubmission = False  # Twisted's own switch for it

    http_protocol.WebRequest.__init__ = init_without_form_parsing


def _install_disconnect_hooks() -> None:
    from daphne import http_protocol, server

    from chat.streaming import DISCONNECT_HOOKS, run_disconnect_hooks

    create_application = server.Server.create_application
    connection_lost = http_protocol.WebRequest.connectionLost

    def create_application_with_hooks(self, protocol, scope):
        if isinstance(protocol, http_protocol.WebRequest):
            # The application adds its hooks to this list (chatsite.asgi).
            protocol.chatsite_disconnect_hooks = scope[DISCONNECT_HOOKS] = []
        return create_application(self, protocol, scope)

    def connection_lost_with_hooks(self, reason):
        run_disconnect_hooks(getattr(self, "chatsite_disconnect_hooks", None))
        connection_lost(self, reason)

    server.Server.create_application = create_application_with_hooks
    http_protocol.WebRequest.connectionLost = connection_lost_with_hooks


def _install_real_http_module() -> None:
    from daphne import http_protocol
    from twisted.python.deprecate import _ModuleProxy

    if isinstance(http_protocol.http, _ModuleProxy):
        http_protocol.http = object.__getattribute__(http_protocol.http, "_module")


def _install_eager_writes() -> None:
    from twisted.internet import tcp

    queued_write = tcp.Connection.write
    queued_write_sequence = tcp.Connection.writeSequence

    def send_now(conn: tcp.Connection, data: bytes) -> bytes:
        """Send what the socket takes now; return the rest (all of it when it must wait)."""
        if (
            conn.TLS
            or not conn.connected
            or conn.disconnecting
            or conn._writeDisconnected
            or conn._tempDataBuffer
            or len(conn.dataBuffer) > conn.offset
        ):
            return data
        sent = conn.writeSomeData(data)
        if isinstance(sent, Exception):
            return data  # lost: the queued write's attempt reports it and closes
        return data[sent:]

    def write(self, data):
        if type(data) is bytes and data:
            data = send_now(self, data)
            if not data:
                return
        queued_write(self, data)

    def write_sequence(self, iovec):
        if iovec and all(type(part) is bytes for part in iovec):
            rest = send_now(self, b"".join(iovec))
            if rest:
                queued_write(self, rest)
            return
        queued_write_sequence(self, iovec)

    tcp.Connection.write = write
    tcp.Connection.writeSequence = write_sequence
