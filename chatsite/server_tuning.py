"""daphne's hot path, tuned: Twisted TCP writes sent at once, no deprecation proxy per frame.

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
    _installed = True


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
