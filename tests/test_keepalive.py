"""A client's idle pooled connection is still open on the server when it is reused."""

import socket
import time
from urllib.parse import urlparse

from client.http import KEEPALIVE_EXPIRY_S
from services.env.app import create_app
from services.http import KEEP_ALIVE_S

REQUEST = b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: keep-alive\r\n\r\n"


def _response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
    return data


def test_clients_drop_idle_connections_before_the_server_does() -> None:
    assert KEEPALIVE_EXPIRY_S < KEEP_ALIVE_S


def test_the_server_keeps_an_idle_connection_open_past_the_old_5s_default(serve) -> None:
    url = urlparse(serve(create_app()))
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(REQUEST)
        assert _response(sock).startswith(b"HTTP/1.1 200")
        time.sleep(6.0)  # uvicorn's default keep-alive (5 s) would have closed it by now
        sock.sendall(REQUEST)
        assert _response(sock).startswith(b"HTTP/1.1 200")
