"""``python -m sidecar.proxy``'s timeout and logging flags, as offload-sidecar has them:
the values reach the data path's settings, and --help shows durations in Go form."""

from __future__ import annotations

import logging

import pytest

from sidecar.proxy import cli


class Started(Exception):
    """Raised by the stand-in server: main() got as far as starting it."""


def run_until_start(monkeypatch, argv: list[str]) -> tuple[object, dict]:
    """main(argv) up to the server's start: (the ProxySettings it got, basicConfig's kwargs)."""
    seen: dict = {}

    class StandInServer:
        def __init__(self, routing, local, settings):
            seen["settings"] = settings

        async def start(self, host, port):
            raise Started

    monkeypatch.setattr(cli, "ProxyServer", StandInServer)
    monkeypatch.setattr(cli.gc, "freeze", lambda: None)  # not in the test process
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: seen.setdefault("logging", kw))
    with pytest.raises(Started):
        cli.main(["--local", "127.0.0.1:9", *argv])
    return seen["settings"], seen["logging"]


def test_timeouts_and_the_log_level_reach_the_proxy(monkeypatch):
    settings, logging_kw = run_until_start(
        monkeypatch,
        [
            "--client-idle-timeout",
            "1m30s",
            "--read-timeout",
            "500ms",
            "--connect-timeout",
            "3",
            "--log-level",
            "debug",
        ],
    )
    assert (settings.client_idle_timeout, settings.read_timeout, settings.connect_timeout) == (90.0, 0.5, 3.0)
    assert logging_kw["level"] == "DEBUG"


def test_the_defaults_are_the_proxy_settings_defaults(monkeypatch):
    settings, logging_kw = run_until_start(monkeypatch, [])
    assert settings == cli.ProxySettings()
    assert logging_kw["level"] == "INFO"


def test_help_shows_durations_in_go_form_as_offload_sidecar_does(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for flag, default in [
        ("--connect-timeout", "2s"),
        ("--read-timeout", "300s"),
        ("--client-idle-timeout", "60s"),
        ("--shutdown-deadline", "30s"),
        ("--shutdown-grace", "1s"),
    ]:
        metavar = flag[2:].upper().replace("-", "_")
        described = text.split(f"{flag} {metavar} ")[-1].split(" --")[0]  # its line in the options list
        assert described.endswith(f"(default: {default})"), (flag, described)
    assert "--log-level {debug,info,warning,error}" in text
    assert "(default: 2.0)" not in text and "(default: 300.0)" not in text


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--client-idle-timeout", "0s"], "argument --client-idle-timeout: must be more than zero: '0s'"),
        (["--client-idle-timeout", "soon"], "argument --client-idle-timeout: not a duration: 'soon'"),
        (["--log-level", "loud"], "argument --log-level: invalid choice: 'loud'"),
    ],
)
def test_a_bad_value_is_refused_by_name(flags, expected, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["--local", "127.0.0.1:9", *flags])
    assert exited.value.code == 2
    assert expected in capsys.readouterr().err
