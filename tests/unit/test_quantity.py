from decimal import Decimal

import pytest

from crds.quantity import parse_quantity


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("2", Decimal(2)),
        (2, Decimal(2)),
        ("250m", Decimal("0.25")),
        ("1.5Gi", Decimal(1.5 * 2**30)),
        ("1Ki", Decimal(1024)),
        ("2k", Decimal(2000)),
        ("100n", Decimal("1e-7")),
        ("2e3", Decimal(2000)),
        ("1E", Decimal("1e18")),
        (".5", Decimal("0.5")),
        ("-1", Decimal(-1)),
    ],
)
def test_quantities_parse_to_exact_decimals(text, value):
    assert parse_quantity(text) == value


@pytest.mark.parametrize(
    "text", ["", "lots", "1.2.3", "1 Gi", "1Gi\n", "Gi", "1gi", "1e999", True, None, 1.5]
)
def test_malformed_quantities_are_refused(text):
    with pytest.raises(ValueError):
        parse_quantity(text)
