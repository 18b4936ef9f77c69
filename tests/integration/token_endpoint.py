"""An OAuth2 token endpoint (client credentials grant) for tests, run as its own process.

    python -m tests.integration.token_endpoint --cert tls.crt --key tls.key \\
        --client-id offloader --secret s3cret --expires-in 60 --delay 0.2

POST /token issues opaque random tokens to a client that authenticates with
HTTP Basic (or client_secret_post); GET /stats says how many were issued and
which are valid; POST /admin/secret sets a new client secret (the body);
POST /admin/mode sets how /token answers (the body, or ``--mode``):

- ``ok``: a token, as above;
- ``nested``: a 200 whose body is JSON arrays nested 30,000 deep (under 64 KiB,
  deeper than a JSON parser recurses);
- ``huge``: a 200 with arrays nested 200,000 deep (400 KB);
- ``garbage``: a 200 with random bytes that are not JSON;
- ``euro``: a 200 with an access_token holding a non-ASCII character.
Listens on 127.0.0.1 only and prints "listening <port>" once ready.
"""

from __future__ import annotations

import argparse
import base64
import json
import secrets
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, unquote

MODES = ("ok", "nested", "huge", "garbage", "euro")
EURO_TOKEN = "tok€n-abc"


def broken_body(mode: str) -> bytes:
    """What a broken token endpoint answers with a 200, per mode."""
    if mode == "nested":
        return b"[" * 30_000 + b"]" * 30_000
    if mode == "huge":
        return b"[" * 200_000 + b"]" * 200_000
    if mode == "garbage":
        return b"\xff\xfe{" + secrets.token_bytes(512)
    assert mode == "euro"
    return json.dumps({"access_token": EURO_TOKEN, "token_type": "Bearer", "expires_in": 60}).encode()


class State:
    def __init__(self, client_id: str, secret: str, expires_in: int, delay: float, mode: str = "ok"):
        self.mode = mode
        self.client_id = client_id
        self.secret = secret
        self.expires_in = expires_in
        self.delay = delay
        self.lock = threading.Lock()
        self.issued: list[tuple[str, float]] = []
        self.requests = 0


def handler_for(state: State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _send(self, status: int, doc: dict) -> None:
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _send_raw(self, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except OSError:  # a client that stops reading a huge answer hangs up: expected
                self.close_connection = True

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def do_GET(self) -> None:
            if self.path != "/stats":
                return self._send(404, {"error": "not_found"})
            now = time.time()
            with state.lock:
                valid = [t for t, expiry in state.issued if expiry > now]
                self._send(200, {"issued": len(state.issued), "requests": state.requests, "valid": valid})

        def do_POST(self) -> None:
            body = self._body()
            if self.path == "/admin/secret":
                with state.lock:
                    state.secret = body.decode()
                return self._send(200, {})
            if self.path == "/admin/mode":
                if body.decode() not in MODES:
                    return self._send(400, {"error": "unknown mode"})
                with state.lock:
                    state.mode = body.decode()
                return self._send(200, {})
            if self.path != "/token":
                return self._send(404, {"error": "not_found"})
            with state.lock:
                state.requests += 1
            time.sleep(state.delay)
            form = dict(parse_qsl(body.decode()))
            client_id, secret = form.get("client_id"), form.get("client_secret")
            auth = self.headers.get("Authorization", "")
            if auth.startswith("Basic "):
                user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
                client_id, secret = unquote(user), unquote(password)
            if form.get("grant_type") != "client_credentials":
                return self._send(400, {"error": "unsupported_grant_type"})
            with state.lock:
                if client_id != state.client_id or secret != state.secret:
                    return self._send(401, {"error": "invalid_client"})
                mode = state.mode
            if mode != "ok":
                return self._send_raw(broken_body(mode))
            with state.lock:
                token = secrets.token_urlsafe(24)
                state.issued.append((token, time.time() + state.expires_in))
                expires_in = state.expires_in
            self._send(200, {"access_token": token, "token_type": "Bearer", "expires_in": expires_in})

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--expires-in", type=int, default=3600)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--mode", choices=MODES, default="ok")
    args = parser.parse_args(argv)
    state = State(args.client_id, args.secret, args.expires_in, args.delay, args.mode)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler_for(state))
    server.daemon_threads = True
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.cert, args.key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    print(f"listening {server.server_address[1]}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
