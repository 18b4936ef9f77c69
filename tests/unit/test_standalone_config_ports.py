"""A standalone config file whose remote port is not in ASCII digits is refused naming the field
(it used to raise out of parse_document, and the config source restarted forever)."""

from __future__ import annotations

import pytest
import yaml

from sidecar.standalone.config import parse_document
from tests import modeldeployments as md


@pytest.mark.parametrize("port", ["\u00b2", "\u0661\u0668\u0660\u0660\u0662", "9" * 5000])
def test_a_remote_port_not_in_ascii_digits_is_an_error_naming_the_host(port):
    doc = md.variant(changes={"spec.offloadingConfig.remoteBackend.host": f"127.0.0.1:{port}"})
    loaded = parse_document(yaml.safe_dump(doc, allow_unicode=True))
    assert loaded.model is None
    assert [e.split(":", 1)[0] for e in loaded.errors] == ["spec.offloadingConfig.remoteBackend.host"]
