"""The pure parts of sidecar/credentials/oauth.py: token responses, client authentication, the
refresh schedule, the single flight (with an in-process stand-in for the HTTP POST)."""

from __future__ import annotations

import asyncio
import base64
import json
import re

import pytest

from sidecar.credentials.oauth import (
    AccessToken,
    OAuthClient,
    TokenError,
    TokenRequest,
    basic_credentials,
    parse_token_response,
    with_authorization,
)
from sidecar.proxy.routing import RemoteTarget


def body(**doc: object) -> bytes:
    return json.dumps(doc).encode()


def test_a_token_response_gives_the_token_and_its_expiry() -> None:
    token = parse_token_response(200, body(access_token="abc", token_type="bearer", expires_in=3600), now=10)
    assert (token.value, token.expires_at, token.lifetime) == ("abc", 3610, 3600)
    assert token.refresh_at == 3610 - 60  # a tenth of the lifetime early, at most a minute
    short = parse_token_response(200, body(access_token="abc", expires_in="30"), now=0)
    assert short.refresh_at == 27
    assert "abc" not in repr(token)


@pytest.mark.parametrize(
    ("status", "raw", "message"),
    [
        (
            401,
            body(error="invalid_client", error_description="secret abc wrong"),
            "answered 401 (invalid_client)",
        ),
        (500, b"<html>oops</html>", "answered 500"),
        (200, b"not json", "not a JSON object"),
        (200, b"[" * 30_000 + b"]" * 30_000, "not a JSON object"),  # deeper than json recurses
        (200, body(access_token="tok\u20acn"), "access_token is not usable in a header"),
        (200, body(access_token="caf\u00e9"), "access_token is not usable in a header"),  # latin-1, not ASCII
        (200, body(access_token="a\tb"), "access_token is not usable in a header"),
        (200, body(access_token="a=b"), "access_token is not usable in a header"),  # '=' only at the end
        (200, body(access_token="==="), "access_token is not usable in a header"),
        (200, body(token_type="Bearer"), "no usable access_token"),
        (200, body(access_token="a b"), "access_token is not usable in a header"),
        (200, body(access_token="abc", token_type="mac"), "token_type must be Bearer"),
        (200, body(access_token="abc", expires_in=0), "expires_in must be a positive number"),
        (200, body(access_token="abc", expires_in=True), "expires_in must be a positive number"),
        # Only ASCII digits, and not thousands of them: int() refuses '²' and > 4300 digits.
        (200, body(access_token="abc", expires_in="\u00b2"), "expires_in must be a positive number"),
        (200, body(access_token="abc", expires_in="9" * 5000), "expires_in must be a positive number"),
        (200, body(access_token="abc", expires_in="\u0663\u0660"), "expires_in must be a positive number"),
    ],
)
def test_bad_token_responses_say_what_is_wrong_without_echoing_the_body(
    status: int, raw: bytes, message: str
) -> None:
    with pytest.raises(TokenError, match=re.escape(message)) as caught:
        parse_token_response(status, raw, now=0)
    assert "secret abc" not in str(caught.value)
    for token in ("tok\u20acn", "caf\u00e9"):
        assert token not in str(caught.value)


def test_an_rfc6750_b64token_is_accepted_as_it_is() -> None:
    for value in ("abc", "A-Za.z_0~9+/==", "eyJhbGciOi.eyJzdWIi.c2lnbmF0dXJl", "x="):
        assert parse_token_response(200, body(access_token=value), now=0).value == value


def test_an_unexpected_error_while_fetching_is_a_failed_fetch_logged_by_type_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Whatever goes wrong (a bug, an odd answer), the caller gets no token and a backoff,
    never an exception; the message, which may quote the body, is not logged."""
    now = [0.0]
    calls = 0

    async def post(request: TokenRequest, context: object, timeout: float) -> tuple[int, bytes]:
        nonlocal calls
        calls += 1
        if calls == 1:
            return 200, body(access_token="good", expires_in=100)
        raise KeyError("body held tok-secret-1")

    oauth = OAuthClient(
        "https://auth.example/token", "id", "sec", clock=lambda: now[0], post=post, retry_min=2
    )

    async def scenario() -> None:
        assert await oauth.authorization() == "Bearer good"
        now[0] = 95.0  # refresh fails, the token is still valid: kept
        assert await oauth.authorization() == "Bearer good"
        now[0] = 101.0  # expired, and the refresh fails again: no token, serve locally
        assert await oauth.authorization() is None
        assert oauth.current() is None
        assert calls == 3

    asyncio.run(scenario())
    assert "KeyError; serving locally" in caplog.text
    assert "tok-secret-1" not in caplog.text and "good" not in caplog.text


def test_client_credentials_are_form_encoded_then_basic() -> None:
    header = basic_credentials("id:1", "p@ss word/+")
    assert base64.b64decode(header.removeprefix("Basic ")) == b"id%3A1:p%40ss%20word%2F%2B"
    headers, form = TokenRequest("https://auth.example/token", "id", "sec", scope="models").encode()
    assert set(headers) == {"Authorization"} and form == b"grant_type=client_credentials&scope=models"
    headers, form = TokenRequest("https://auth.example/token", "id", "sec", auth_method="post").encode()
    assert headers == {} and b"client_secret=sec" in form
    assert "sec" not in repr(TokenRequest("https://auth.example/token", "id", "sec"))
    with pytest.raises(ValueError, match="tokenUrl must be an https URL"):
        TokenRequest("ftp://x/token", "id", "sec")


def test_with_authorization_replaces_the_header_and_keeps_the_others() -> None:
    target = RemoteTarget("https", "r", 443, "r", headers=(("authorization", "old"), ("X-A", "1")))
    assert with_authorization(target, "Bearer t").headers == (("X-A", "1"), ("Authorization", "Bearer t"))
    assert with_authorization(target, None).headers == (("X-A", "1"),)


class Endpoint:
    """In-process stand-in for the POST: counts calls, answers after a yield."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail = False

    async def __call__(self, request: TokenRequest, ssl_context: object, timeout: float) -> tuple[int, bytes]:
        self.calls += 1
        await asyncio.sleep(0)  # a yield: concurrent callers arrive while the fetch is pending
        if self.fail:
            raise ConnectionRefusedError(111, "Connection refused")
        return 200, body(access_token=f"t{self.calls}", expires_in=100)


def test_concurrent_callers_share_one_fetch_and_failures_back_off() -> None:
    now = [0.0]
    endpoint = Endpoint()
    oauth = OAuthClient(
        "https://auth.example/token", "id", "sec", clock=lambda: now[0], post=endpoint, retry_min=2
    )

    async def scenario() -> None:
        assert set(await asyncio.gather(*(oauth.authorization() for _ in range(20)))) == {"Bearer t1"}
        assert endpoint.calls == 1
        endpoint.fail = True
        now[0] = 95.0  # in the refresh window: the failed refresh keeps the valid token
        assert await oauth.authorization() == "Bearer t1"
        now[0] = 96.0  # within the backoff: no new attempt
        assert await oauth.authorization() == "Bearer t1"
        assert endpoint.calls == 2
        now[0] = 101.0  # expired: tried again (the backoff is over), failed, nothing to serve with
        assert await oauth.authorization() is None
        assert endpoint.calls == 3
        now[0] = 104.0  # within the doubled backoff (4 s): not tried
        assert await oauth.authorization() is None
        assert endpoint.calls == 3
        endpoint.fail = False
        now[0] = 110.0
        assert await oauth.authorization() == "Bearer t4"

    asyncio.run(scenario())


def test_no_secret_means_no_token_and_no_request() -> None:
    endpoint = Endpoint()
    oauth = OAuthClient("https://auth.example/token", "id", None, post=endpoint)
    assert asyncio.run(oauth.authorization()) is None
    assert endpoint.calls == 0


def test_an_invalidated_token_is_fetched_again() -> None:
    endpoint = Endpoint()
    oauth = OAuthClient("https://auth.example/token", "id", "sec", post=endpoint)

    async def scenario() -> None:
        assert await oauth.authorization() == "Bearer t1"
        oauth.invalidate()  # the remote answered 401
        assert oauth.current() is None
        assert await oauth.authorization() == "Bearer t2"

    asyncio.run(scenario())


def test_access_token_refresh_point() -> None:
    assert AccessToken("x", expires_at=1000, lifetime=1000).refresh_at == 940


def test_oauth_for_a_modeldeployment_reads_its_secret_reference() -> None:
    import copy
    from pathlib import Path

    import yaml

    from crds.validation import validate_object
    from sidecar.credentials.oauth import oauth_for

    tutorial = yaml.safe_load(
        (Path(__file__).parents[1] / "testdata" / "modeldeployments" / "tutorial.yaml").read_text()
    )
    assert oauth_for(validate_object(tutorial).model, client=None) is None
    obj = copy.deepcopy(tutorial)
    obj["spec"]["offloadingConfig"]["remoteBackend"]["authConfig"] = {
        "type": "oauth",
        "oauthConfig": {
            "clientId": "offloader",
            "tokenUrl": "https://auth.example/token",
            "clientSecretRef": {"name": "remote-credentials", "key": "secret"},
        },
    }
    model = validate_object(obj).model
    assert model is not None
    found = oauth_for(model, client=object())
    assert found is not None
    oauth, reader = found
    assert (oauth.token_url, oauth.client_id) == ("https://auth.example/token", "offloader")
    assert reader is not None and (reader.namespace, reader.name, reader.key) == (
        model.namespace,
        "remote-credentials",
        "secret",
    )
    assert oauth.current() is None


def test_the_refresher_sleeps_until_shortly_before_expiry_and_backs_off_while_failing() -> None:
    """Driven by a FAKE clock and sleep: each sleep advances the clock by what was asked."""
    now = [0.0]
    waits: list[float] = []
    published: list[str | None] = []
    answers = iter([(200, body(access_token="t1", expires_in=100)), ConnectionRefusedError(), None])

    async def post(request: TokenRequest, ssl_context: object, timeout: float) -> tuple[int, bytes]:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        if answer is None:
            raise asyncio.CancelledError  # ends the test
        return answer

    async def sleep(delay: float) -> None:
        waits.append(delay)
        now[0] += delay

    oauth = OAuthClient(
        "https://auth.example/token", "id", "sec", clock=lambda: now[0], sleep=sleep, post=post, retry_min=2
    )
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(oauth.run_refresher(published.append))
    # Fetched at 0 (expires at 100, refreshed at 90); the refresh at 90 fails: the token is
    # kept and the next attempt waits the backoff (2 s); at 92 the third fetch ends the test.
    assert waits == [90.0, 2.0]
    assert published == ["Bearer t1"]
