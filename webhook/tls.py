"""The webhook's serving certificate, reloaded when its files change, without a restart.

cert-manager renews a certificate at two thirds of its life and the kubelet then updates
the mounted Secret volume (it writes a new directory and swaps the ``..data`` symlink the
files point through). A webhook that read its certificate once would serve the old one
until it expired, and then every admission would fail.

How: the server listens with one ``ssl.SSLContext`` whose SNI callback (called by OpenSSL
for every ClientHello, with or without a server name) hands the handshake to the
*current* context. A change of the files builds a whole new context; only once it has
loaded does it become current. New handshakes get the new certificate; connections
already open keep theirs (nothing is dropped); a half-written or mismatched pair fails
to load and is retried at the next poll, the old certificate still served meanwhile.

The files are polled (a few KiB read every ``interval`` seconds): inotify on a symlink
swapped by the kubelet is easy to get wrong, and a poll also covers files replaced in place.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from webhook import metrics

log = logging.getLogger("webhook.tls")

DEFAULT_INTERVAL = 10.0  # seconds between polls; the kubelet's Secret sync takes up to a minute


class CertificateError(ValueError):
    """The certificate or key cannot be used; the message names the file."""


def certificate_expiry(pem: bytes) -> float:
    """notAfter of the first (leaf) certificate of a PEM chain, in seconds since the epoch.

    Raises CertificateError when there is no parsable certificate."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise CertificateError(f"not a PEM certificate: {exc}") from None
    return cert.not_valid_after_utc.timestamp()


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A TLS server context (1.2 and up, Python's default ciphers) serving this pair."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert_file), str(key_file))
    except (OSError, ssl.SSLError) as exc:
        raise CertificateError(f"{cert_file}, {key_file}: cannot load: {exc}") from None
    return context


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CertificateError(f"{path}: cannot read: {exc.strerror}") from None


class ReloadingCertificate:
    """The serving certificate: ``context`` to listen with, ``check`` to pick up changes.

    Construction loads the pair (CertificateError if it cannot: the webhook must not start
    without a certificate); ``start`` polls every ``interval`` seconds in a daemon thread.
    """

    def __init__(
        self,
        cert_file: str | Path,
        key_file: str | Path,
        *,
        interval: float = DEFAULT_INTERVAL,
        build: Callable[[Path, Path], ssl.SSLContext] = server_context,
    ):
        self.cert_file = Path(cert_file)
        self.key_file = Path(key_file)
        self.interval = interval
        self._build = build
        self.reloads = 0  # certificates loaded after the first
        self.expiry = 0.0
        self._digest = b""  # of the pair in use
        self._refused = b""  # of the last pair that failed to load: not retried until it changes
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        first = self._load()
        assert first is not None  # nothing was loaded before: the pair is always new
        self.current: ssl.SSLContext = first
        # The listening context; the callback hands each handshake to the current one.
        self.context = self.current
        self.context.sni_callback = self._select

    def _select(self, connection: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        current = self.current
        if current is not context:
            connection.context = current

    def _snapshot(self) -> tuple[bytes, bytes]:
        return _read(self.cert_file), _read(self.key_file)

    def _load(self) -> ssl.SSLContext | None:
        """A context of the files as they are now; None when they did not change since the
        last load. Raises CertificateError when they cannot be used."""
        cert, key = self._snapshot()
        digest = hashlib.sha256(cert + b"\0" + key).digest()
        if digest in (self._digest, self._refused):
            return None
        try:
            try:
                expiry = certificate_expiry(cert)
            except CertificateError as exc:
                raise CertificateError(f"{self.cert_file}: {exc}") from None
            context = self._build(self.cert_file, self.key_file)
        except CertificateError:
            self._refused = digest
            raise
        # The files may have changed while being loaded (cert and key are two reads):
        # use the context only if what was loaded is what was read; else the next poll retries.
        if self._snapshot() != (cert, key):
            raise CertificateError(f"{self.cert_file}: changed while being loaded")
        self._digest = digest
        self.expiry = expiry
        metrics.SERVING_CERTIFICATE_EXPIRY.set(expiry)
        return context

    def check(self) -> bool:
        """Reload if the files changed; True when a new certificate is now served.

        A pair that cannot be used is logged and counted, and the certificate in use kept."""
        try:
            context = self._load()
        except CertificateError as exc:
            metrics.SERVING_CERTIFICATE_RELOADS.labels("error").inc()
            log.warning("serving certificate not reloaded, keeping the one in use: %s", exc)
            return False
        if context is None:
            return False
        self.current = context
        self.reloads += 1
        metrics.SERVING_CERTIFICATE_RELOADS.labels("success").inc()
        log.info("serving certificate reloaded from %s (expires at %.0f)", self.cert_file, self.expiry)
        return True

    def start(self) -> None:
        def poll() -> None:
            while not self._stop.wait(self.interval):
                self.check()

        self._thread = threading.Thread(target=poll, name="tls-reload", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
