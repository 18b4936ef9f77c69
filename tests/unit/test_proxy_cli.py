"""``python -m sidecar.proxy``'s flags: bad values are refused by name before anything starts."""

from __future__ import annotations

import pytest

from sidecar.proxy.cli import main


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--percentage", "101"], "argument --percentage: not a whole number from 0 to 100: '101'"),
        (["--percentage", "²"], "argument --percentage: not a whole number from 0 to 100: '²'"),
        (["--local", "x:y"], "argument --local: not host:port: 'x:y'"),
        (["--listen", "127.0.0.1:²"], "argument --listen: not host:port: '127.0.0.1:²'"),
        (["--header", "abc"], "argument --header: not Name=Value: 'abc'"),
        (["--header", "X Y=1"], "argument --header: 'X Y' is not a valid HTTP header name"),
        (["--header", "Host=evil"], "argument --header: Host is managed by the proxy and cannot be set"),
        (["--header", "X-A=1\r\nX-B: 2"], "argument --header: value must not contain CR, LF or NUL"),
        (["--read-timeout", "1q"], "argument --read-timeout: not a duration: '1q'"),
        (["--connect-timeout", "0s"], "argument --connect-timeout: must be more than zero: '0s'"),
        (["--remote", "ftp://x"], "--remote: remote must be http(s)://host[:port][/prefix], got 'ftp://x'"),
    ],
)
def test_a_bad_flag_is_refused_by_name(flags, expected, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--local", "127.0.0.1:9", *flags])
    assert exited.value.code == 2
    assert expected in capsys.readouterr().err
