"""PromQL queries held to the series they name: the chart's recording rules, alerts and
dashboard queries, parsed into their syntax tree (promql-parser, the Rust parser's Python
binding) and each part evaluated against a real Prometheus.

``selectors`` is static (names and matcher labels, for a check without a server);
``Checker.problems`` asks the server about every part of a query, so that a metric or label
that does not exist, a join that matches nothing or a grouping by a label the series do not
carry fails with the part at fault named, not only as "no data" for the whole query.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import promql_parser as pp

COMPARISONS = {"==", "!=", ">", "<", ">=", "<="}
SET_OPERATORS = {"and", "or", "unless"}
# The dashboard's Grafana variables as its default selection (All) evaluates them.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$namespace": ".*",
    "$modeldeployment": ".*",
    "$webhook_namespace": ".*",
}
LEGEND_LABEL = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
ANNOTATION_LABEL = re.compile(r"\$labels\.([A-Za-z_][A-Za-z0-9_]*)")


def parse(expr: str) -> Any:
    """The syntax tree; ValueError naming the query when it does not parse."""
    try:
        return pp.parse(expr)
    except Exception as exc:  # noqa: BLE001 - the binding raises its own error types
        raise ValueError(f"{expr!r} does not parse: {exc}") from None


def _op(node: Any) -> str:
    return str(node.op).strip()


def children(node: Any) -> list[Any]:
    kind = type(node).__name__
    if kind == "BinaryExpr":
        return [node.lhs, node.rhs]
    if kind in ("ParenExpr", "UnaryExpr", "SubqueryExpr"):
        return [node.expr]
    if kind == "AggregateExpr":
        return [node.expr] + ([node.param] if node.param is not None else [])
    if kind == "Call":
        return list(node.args)
    if kind == "MatrixSelector":
        return [node.vector_selector]
    return []


def walk(node: Any) -> Iterator[Any]:
    yield node
    for child in children(node):
        yield from walk(child)


def value_type(node: Any) -> str:
    """vector, scalar, matrix or string."""
    kind = type(node).__name__
    if kind in ("VectorSelector", "AggregateExpr"):
        return "vector"
    if kind in ("MatrixSelector", "SubqueryExpr"):
        return "matrix"
    if kind == "NumberLiteral":
        return "scalar"
    if kind == "StringLiteral":
        return "string"
    if kind in ("ParenExpr", "UnaryExpr"):
        return value_type(node.expr)
    if kind == "Call":
        return str(node.func.return_type).rsplit(".", 1)[-1].lower()
    if kind == "BinaryExpr":
        sides = {value_type(node.lhs), value_type(node.rhs)}
        return "vector" if "vector" in sides else "scalar"
    raise TypeError(f"unknown PromQL node {kind}")


def selectors(expr: str) -> list[tuple[str, list[str]]]:
    """(metric name, label names of its matchers) of every selector in ``expr``."""
    found = []
    for node in walk(parse(expr)):
        if type(node).__name__ == "VectorSelector":
            found.append((node.name or "", [m.name for m in node.matchers.matchers if m.name != "__name__"]))
    return found


def may_be_empty(node: Any) -> bool:
    """A filter (a comparison without bool, a set operation) may rightly select nothing."""
    for part in walk(node):
        if type(part).__name__ == "BinaryExpr":
            op = _op(part)
            returns_bool = part.modifier is not None and part.modifier.return_bool
            if op in SET_OPERATORS or (op in COMPARISONS and not returns_bool):
                return True
    return False


def carrier(node: Any) -> list[Any]:
    """The parts whose series (and labels) a filtering query returns when it returns any:
    the vector side of a comparison with a scalar, the left side of and/unless, both of or."""
    kind = type(node).__name__
    if kind == "ParenExpr":
        return carrier(node.expr)
    if kind == "BinaryExpr":
        op = _op(node)
        if op in ("and", "unless"):
            return carrier(node.lhs)
        if op == "or":
            return carrier(node.lhs) + carrier(node.rhs)
        if op in COMPARISONS and not (node.modifier is not None and node.modifier.return_bool):
            if value_type(node.rhs) == "scalar":
                return carrier(node.lhs)
            if value_type(node.lhs) == "scalar":
                return carrier(node.rhs)
            return carrier(node.lhs)
    return [node]


class QueryError(RuntimeError):
    """Prometheus refused a query (bad syntax, or e.g. many-to-many matching at run time)."""


@dataclass
class Prometheus:
    """The HTTP API of one Prometheus server."""

    url: str

    def get(self, path: str, **params: Any) -> Any:
        """The response's data; QueryError with Prometheus's message when it refuses."""
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=30) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            if exc.code not in (400, 422):
                raise
            body = json.loads(exc.read())
        if body.get("status") != "success":
            raise QueryError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def range_series(self, expr: str, start: float, end: float, step: float) -> list[dict[str, str]]:
        """The label sets of every series ``expr`` returns at any step of [start, end]."""
        data = self.get("/api/v1/query_range", query=expr, start=start, end=end, step=step)
        return [r["metric"] for r in data["result"] if r["values"]]

    def series(self, match: str, start: float, end: float) -> list[dict[str, str]]:
        return self.get("/api/v1/series", **{"match[]": match, "start": start, "end": end})


@dataclass
class Checker:
    """Checks queries against what ``prometheus`` stored between ``start`` and ``end``."""

    prometheus: Prometheus
    start: float
    end: float
    step: float = 2.0

    def labels_of(self, node: Any) -> tuple[list[dict[str, str]], set[str]]:
        series = self.prometheus.range_series(str(node), self.start, self.end, self.step)
        return series, {name for s in series for name in s}

    def problems(self, expr: str, *, need_data: bool, labels: set[str] = frozenset()) -> list[str]:
        """What is wrong with ``expr`` and its parts ([] when nothing is).

        Every selector must match stored series and its matchers' labels must exist on its
        metric; every grouping, matching and group_left/right label must be carried by the
        operand it applies to; every part that cannot rightly be empty must return data;
        ``labels`` must be on every series of the query's result (or, for a filter that
        selects nothing now, of the parts it would return). ``need_data``: the whole query
        must return data."""
        root = parse(expr)
        found: list[str] = []
        seen: dict[str, tuple[list[dict[str, str]], set[str]]] = {}

        def evaluate(node: Any) -> tuple[list[dict[str, str]], set[str]]:
            key = str(node)
            if key not in seen:
                try:
                    seen[key] = self.labels_of(node)
                except QueryError as exc:
                    found.append(f"{node}: Prometheus refuses it: {exc}")
                    seen[key] = ([], set())
            return seen[key]

        for node in walk(root):
            kind = type(node).__name__
            if value_type(node) != "vector":
                continue
            series, _ = evaluate(node)
            if kind == "VectorSelector":
                stored = self.prometheus.series(node.name or str(node), self.start, self.end)
                if not stored:
                    found.append(f"{node}: no series named {node.name!r}")
                    continue
                known = {name for s in stored for name in s}
                for matcher in node.matchers.matchers:
                    if matcher.name != "__name__" and matcher.name not in known:
                        found.append(
                            f"{node}: {node.name} has no label {matcher.name!r} (it has {sorted(known)})"
                        )
                if not series:
                    found.append(f"{node}: selects none of the {len(stored)} series of {node.name}")
                continue
            if not series and not may_be_empty(node) and node is not root:
                found.append(f"{node}: returns nothing")
            if kind == "AggregateExpr" and node.modifier is not None:
                _, operand = evaluate(node.expr)
                missing = [label for label in node.modifier.labels if label not in operand]
                if missing:
                    found.append(f"{node}: groups by {missing}, which {node.expr} does not carry")
            if (
                kind == "BinaryExpr"
                and node.modifier is not None
                and value_type(node.lhs) == value_type(node.rhs)
            ):
                _, left = evaluate(node.lhs)
                _, right = evaluate(node.rhs)
                matching = node.modifier.matching
                if matching is not None:
                    where = (left & right) if "Include" in str(matching.type) else (left | right)
                    missing = [label for label in matching.labels if label not in where]
                    if missing and left and right:
                        found.append(f"{node}: matches on {missing}, missing from a side")
                grouped = node.modifier.group_labels or []
                one_side = right if "ManyToOne" in str(node.modifier.card) else left
                missing = [label for label in grouped if label not in one_side]
                if missing:
                    found.append(f"{node}: copies {missing}, which the other side does not carry")
            if kind == "Call" and node.func.name == "histogram_quantile":
                _, operand = evaluate(node.args[1])
                if "le" not in operand:
                    found.append(f"{node}: its operand has no le label")

        series, _ = evaluate(root)
        if need_data and not series:
            found.append(f"{expr}: returns nothing")
        parts = [root] if series else carrier(root)
        for part in parts:
            part_series, _ = evaluate(part)
            if not part_series and part is not root:
                found.append(f"{part}: returns nothing, so the labels of {expr!r} cannot be checked")
            for s in part_series:
                missing = sorted(label for label in labels if label not in s)
                if missing:
                    found.append(f"{part}: a series without {missing}: {s}")
                    break
        return found


def dashboard_queries(board: dict) -> list[tuple[str, str, str]]:
    """(where, query, legend) of every panel target, variable and annotation query."""
    found = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            found.append(
                (f"panel {panel['title']!r} {target['refId']}", target["expr"], target["legendFormat"])
            )
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            inner = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", variable["query"]["query"])
            assert inner, f"variable {variable['name']}: not a label_values() query"
            found.append((f"variable {variable['name']}", inner.group(1), "{{" + inner.group(2) + "}}"))
    for annotation in board["annotations"]["list"]:
        if "expr" in annotation:
            found.append((f"annotation {annotation['name']!r}", annotation["expr"], annotation["textFormat"]))
    return found
