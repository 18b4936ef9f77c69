"""Authentication to the remote backend: OAuth2 client credentials, or a static header.

:class:`OAuthClient` gets an access token from ``tokenUrl`` with the client
credentials grant (RFC 6749 4.4), keeps it until shortly before it expires and
refreshes it once for all the requests waiting on it (single flight). When the
token endpoint fails, :meth:`OAuthClient.authorization` returns None and the
caller serves the request locally; failed attempts back off so that a dead
endpoint is not asked once per request. Neither the client secret nor a token
is ever logged or shown in a repr.

The data path is synchronous per request: the control side calls
:meth:`OAuthClient.authorization` (or keeps :meth:`OAuthClient.run_refresher`
running, which renews the token before expiry) and publishes the remote target
with the header via :func:`with_authorization`; :meth:`OAuthClient.current`
answers without awaiting.

The client secret comes inline, or from a Secret (``clientSecretRef``) that
:func:`oauth_for` gives a :class:`~sidecar.credentials.secrets.SecretKeyReader` for.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from crds.backoff import Backoff
from sidecar.credentials.secrets import SecretKeyReader
from sidecar.httpclient import HttpError, ResponseTooLarge, fetch
from sidecar.proxy.routing import RemoteTarget

log = logging.getLogger("sidecar.credentials.oauth")

MAX_TOKEN_RESPONSE_BYTES = 64 * 1024  # a token response is a few hundred bytes; JWTs a few KiB
# RFC 6750 2.1 b64token: what can follow "Bearer " in a header as it is.
ACCESS_TOKEN_RE = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# expires_in as a string: ASCII digits only (str.isdigit accepts '²', which int() refuses),
# and few enough that int() stays cheap (it refuses more than 4300 digits).
_SECONDS = re.compile(r"[0-9]{1,15}")
DEFAULT_EXPIRES_IN = 300.0  # when the endpoint does not say (RFC 6749 makes expires_in optional)


class TokenError(Exception):
    """The token endpoint did not give a usable token. Never carries a secret."""


@dataclass(frozen=True)
class AccessToken:
    value: str = field(repr=False)
    expires_at: float  # on the client's clock
    lifetime: float

    @property
    def refresh_at(self) -> float:
        """Shortly before expiry: a tenth of the lifetime, at most a minute, early."""
        return self.expires_at - min(60.0, self.lifetime / 10)


def parse_token_response(status: int, body: bytes, now: float) -> AccessToken:
    """A token endpoint's answer -> the token, or TokenError naming what is wrong."""
    try:
        doc = json.loads(body) if body else {}
    except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than the parser goes
        doc = None
    if status != 200:
        code = doc.get("error") if isinstance(doc, dict) else None
        detail = f" ({code})" if isinstance(code, str) and code.isprintable() and len(code) < 64 else ""
        raise TokenError(f"the token endpoint answered {status}{detail}")
    if not isinstance(doc, dict):
        raise TokenError("the token endpoint's answer is not a JSON object")
    token = doc.get("access_token")
    if not isinstance(token, str) or not token:
        raise TokenError("the token endpoint's answer has no usable access_token")
    if ACCESS_TOKEN_RE.fullmatch(token) is None:
        raise TokenError(
            "the token endpoint's access_token is not usable in a header "
            "(RFC 6750 allows only ASCII letters, digits and -._~+/ then =)"
        )
    token_type = doc.get("token_type", "Bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise TokenError(f"token_type must be Bearer, got {str(token_type)[:20]!r}")
    expires_in = doc.get("expires_in", DEFAULT_EXPIRES_IN)
    if isinstance(expires_in, str) and _SECONDS.fullmatch(expires_in):
        expires_in = int(expires_in)
    if not isinstance(expires_in, int | float) or isinstance(expires_in, bool) or expires_in <= 0:
        raise TokenError("expires_in must be a positive number of seconds")
    return AccessToken(token, now + float(expires_in), float(expires_in))


def basic_credentials(client_id: str, secret: str) -> str:
    """RFC 6749 2.3.1: both form-urlencoded, then HTTP Basic."""
    pair = f"{quote(client_id, safe='')}:{quote(secret, safe='')}"
    return "Basic " + base64.b64encode(pair.encode()).decode("ascii")


@dataclass(frozen=True)
class TokenRequest:
    """What to ask the token endpoint; the secret stays out of repr."""

    token_url: str
    client_id: str
    client_secret: str = field(repr=False)
    scope: str | None = None
    auth_method: str = "basic"  # "basic" (client_secret_basic) or "post" (client_secret_post)

    def __post_init__(self) -> None:
        url = urlsplit(self.token_url)
        if url.scheme not in ("https", "http") or not url.hostname:
            raise ValueError(f"tokenUrl must be an https URL, got {self.token_url!r}")
        if self.auth_method not in ("basic", "post"):
            raise ValueError(f"auth_method must be basic or post, got {self.auth_method!r}")

    def encode(self) -> tuple[dict[str, str], bytes]:
        """Extra headers and the form body."""
        form = {"grant_type": "client_credentials"}
        if self.scope:
            form["scope"] = self.scope
        headers = {}
        if self.auth_method == "basic":
            headers["Authorization"] = basic_credentials(self.client_id, self.client_secret)
        else:
            form.update(client_id=self.client_id, client_secret=self.client_secret)
        return headers, urlencode(form).encode()


async def post_token_request(
    request: TokenRequest, ssl_context: ssl.SSLContext | None, timeout: float
) -> tuple[int, bytes]:
    """POST the form over a fresh connection; returns status and body. TokenError when the
    answer is not HTTP or over MAX_TOKEN_RESPONSE_BYTES."""
    extra, body = request.encode()
    headers = [
        ("Content-Type", "application/x-www-form-urlencoded"),
        ("Accept", "application/json"),
        *extra.items(),
    ]
    try:
        response = await fetch(
            request.token_url,
            method="POST",
            headers=headers,
            body=body,
            ssl_context=ssl_context,
            timeout=timeout,
            max_body=MAX_TOKEN_RESPONSE_BYTES,
            # Never a link-local or cloud metadata address: the shared gateway would post the
            # client credentials there from the installation's network identity.
            refuse_link_local="tokenUrl",
        )
    except ResponseTooLarge:
        raise TokenError("the token endpoint's answer is too large") from None
    except HttpError as exc:  # its message never quotes the answer
        raise TokenError(f"the token endpoint's answer is not usable HTTP: {exc}") from None
    return response.status, response.body


PostFn = Callable[[TokenRequest, ssl.SSLContext | None, float], Awaitable[tuple[int, bytes]]]


class OAuthClient:
    """The Authorization header for the remote backend, from client credentials."""

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: str | None,
        *,
        scope: str | None = None,
        auth_method: str = "basic",
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 5.0,
        retry_min: float = 1.0,
        retry_max: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        post: PostFn = post_token_request,
    ):
        TokenRequest(token_url, client_id, "", scope, auth_method)  # validates early
        self.token_url = token_url
        self.client_id = client_id
        self._secret = client_secret
        self.scope = scope
        self.auth_method = auth_method
        self.ssl_context = ssl_context
        self.timeout = timeout
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.backoff = Backoff(retry_min, retry_max, jitter=False)  # after failed fetches
        self._clock = clock
        self._sleep = sleep
        self._post = post
        self._token: AccessToken | None = None
        self._inflight: asyncio.Future[str | None] | None = None
        self._failures = 0
        self._retry_at = -float("inf")
        self.fetches = 0  # token requests sent

    def __repr__(self) -> str:
        return f"OAuthClient(token_url={self.token_url!r}, client_id={self.client_id!r})"

    # -- the hook for the data path -------------------------------------------------------------

    def current(self) -> str | None:
        """The header if a token is held and not expired; never waits."""
        token = self._token
        if token is not None and self._clock() < token.expires_at:
            return f"Bearer {token.value}"
        return None

    async def authorization(self) -> str | None:
        """``Bearer <token>``, fetching or refreshing it if needed; None = serve locally."""
        now = self._clock()
        token = self._token
        if token is not None and now < token.refresh_at:
            return f"Bearer {token.value}"
        if self._inflight is None:
            if now < self._retry_at:  # the endpoint failed a moment ago: don't ask again yet
                return self.current()
            self._inflight = asyncio.ensure_future(self._refresh())
        return await asyncio.shield(self._inflight)

    def invalidate(self) -> None:
        """Drop the token (the remote refused it with 401): the next call fetches one."""
        self._token = None
        self._retry_at = -float("inf")

    def set_secret(self, client_secret: str | None) -> None:
        """The referenced Secret changed: tokens from the old secret are dropped."""
        if client_secret != self._secret:
            self._secret = client_secret
            self.invalidate()
            self._failures = 0

    async def run_refresher(self, on_change: Callable[[str | None], None]) -> None:
        """Keeps a fresh token forever, calling ``on_change`` whenever the header changes.

        Wakes shortly before expiry (:attr:`AccessToken.refresh_at`); while failing, when
        the backoff allows the next attempt, or at expiry if that comes first (the header
        is withdrawn then). Never more often than every 50 ms."""
        last: str | None = None
        while True:
            header = await self.authorization()
            if header != last:
                last = header
                on_change(header)
            token, now = self._token, self._clock()
            if token is not None and now < token.refresh_at:
                wait = token.refresh_at - now
            else:  # failing: try again when allowed, and drop the header when it expires
                wait = self._retry_at - now
                if token is not None and now < token.expires_at:
                    wait = min(wait, token.expires_at - now)
            await self._sleep(max(0.05, wait))

    # -- fetching ---------------------------------------------------------------------------------

    async def _refresh(self) -> str | None:
        try:
            if not self._secret:
                raise TokenError("no client secret (is the referenced Secret readable?)")
            request = TokenRequest(self.token_url, self.client_id, self._secret, self.scope, self.auth_method)
            self.fetches += 1
            status, body = await self._post(request, self.ssl_context, self.timeout)
            token = parse_token_response(status, body, self._clock())
        except Exception as exc:  # noqa: BLE001 - whatever the endpoint sent, no token is a failed fetch
            delay = self.backoff.delay(self._failures)
            self._failures += 1
            self._retry_at = self._clock() + delay
            log.warning(
                "no access token from %s: %s; serving locally, next attempt in %.0f s",
                self.token_url,
                _describe(exc),
                delay,
            )
            return self.current()
        finally:
            self._inflight = None
        self._token = token
        self._failures = 0
        self._retry_at = -float("inf")
        return f"Bearer {token.value}"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, TokenError):
        return str(exc)
    # Only the type: the message of an unexpected error may quote the body or the token.
    return type(exc).__name__ + (f" ({exc.strerror})" if isinstance(exc, OSError) and exc.strerror else "")


def with_authorization(target: RemoteTarget, header: str | None, name: str = "Authorization") -> RemoteTarget:
    """The remote target carrying ``name: header`` (replacing any such header)."""
    kept = tuple((k, v) for k, v in target.headers if k.lower() != name.lower())
    if header is None:
        return replace(target, headers=kept)
    return replace(target, headers=(*kept, (name, header)))


def oauth_for(
    model: Any, client: Any, ssl_context: ssl.SSLContext | None = None
) -> tuple[OAuthClient, SecretKeyReader | None] | None:
    """The OAuth client a ModelDeployment's remote needs, and the reader of its secret.

    None when the remote has no OAuth config. The secret starts unknown when it
    comes from a Secret: run
    ``secrets.follow_key(reader, oauth.set_secret, period=...)`` beside the proxy.
    """
    config = model.spec.offloading_config
    backend = config.remote_backend if config else None
    auth = backend.auth_config if backend else None
    oauth_config = auth.oauth_config if auth else None
    if oauth_config is None or not oauth_config.token_url or not oauth_config.client_id:
        return None
    ref = oauth_config.client_secret_ref
    reader = SecretKeyReader(client, model.namespace, ref.name, ref.key) if ref is not None else None
    oauth = OAuthClient(
        oauth_config.token_url,
        oauth_config.client_id,
        None if reader is not None else oauth_config.client_secret,
        ssl_context=ssl_context,
    )
    return oauth, reader
