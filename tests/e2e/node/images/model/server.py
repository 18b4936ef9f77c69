"""A CPU-burning HTTP model server: the stand-in for the tutorial's registry.k8s.io/hpa-example
(which cannot be pulled here). Like hpa-example, each GET spends real CPU (a loop of square
roots, BURN_ITERATIONS of them, 1,000,000 by default as there) and answers "OK!". It also
says which pod served it, in the X-Served-By header (the pod's hostname), so a client can
count the requests per backend.

SIGTERM stops it gracefully, as hpa-example's Apache does on its stop signal: the listener
closes at once and the requests in flight are finished before it exits."""

import math
import os
import signal
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = int(os.environ.get("PORT", "80"))
ITERATIONS = int(os.environ.get("BURN_ITERATIONS", "1000000"))
SERVED_BY = os.environ.get("SERVED_BY") or socket.gethostname()


def burn(iterations: int) -> float:
    x = 0.0001
    for _ in range(iterations):
        x += math.sqrt(x)
    return x


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        burn(ITERATIONS)
        body = b"OK!"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Served-By", SERVED_BY)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    server = ThreadingHTTPServer(("0.0.0.0", PORT), Handler)
    server.daemon_threads = False  # server_close() waits for the requests in flight
    stopping = threading.Event()

    def stop(signum: int, frame: object) -> None:
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"serving on :{PORT} as {SERVED_BY}, {ITERATIONS} square roots per request", flush=True)
    server.serve_forever()
    server.server_close()
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
