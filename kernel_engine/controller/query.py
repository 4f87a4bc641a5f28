"""The task database's query language: MongoDB-style filters on task records, pure.

A query maps record keys (:data:`QUERYABLE`) to a plain value (equality) or to a dict of
operators, ``{"completed": {"$gte": t0}, "engine_id": {"$in": [0, 1]}}``; every condition
must hold. :func:`check_query` validates a query from the wire and normalises it (plain
values become ``$eq``, dates become unix timestamps); :func:`compile_query` evaluates it
on record dicts in Python and :func:`to_sql` turns it into an SQLite ``WHERE`` clause.
The two agree on every record, ``None`` (SQL ``NULL``) included:

- ``$eq v`` holds when the field equals ``v``; ``{"$eq": None}`` when it is unset.
- ``$ne v`` is the negation of ``$eq v``, so an unset field matches ``{"$ne": 3}`` (as
  in MongoDB and the predecessor's in-memory database).
- ``$in`` holds when the field is set and in the list; ``$nin`` is its negation (an
  unset field matches it).
- ``$lt``, ``$lte``, ``$gt``, ``$gte`` never hold for an unset field, as in SQL.

Queries arrive from any client, so their size is bounded: at most
:data:`MAX_LIST` values in one ``$in``/``$nin``, :data:`MAX_VALUES` values and
:data:`MAX_TEXT` characters in all; numbers are finite or infinite (never NaN) and
integers fit in 53 bits, so SQLite and Python compare them the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

__all__ = [
    "DEFAULT_KEYS",
    "KEYS",
    "OPERATORS",
    "QUERYABLE",
    "SQL_TYPES",
    "check_keys",
    "check_query",
    "compile_query",
    "matches",
    "to_sql",
]

QUERYABLE: tuple[str, ...] = (
    "msg_id",
    "msg_type",
    "client_uuid",
    "engine_id",
    "engine_uuid",
    "label",
    "status",
    "submitted",
    "started",
    "completed",
    "received",
    "resubmitted",
)
"""The scalar record keys a query may test."""

DATES = frozenset({"submitted", "started", "completed", "received"})
NUMBERS = DATES | {"engine_id"}
NULLABLE = frozenset(QUERYABLE) - {"msg_id"}

SQL_TYPES: dict[str, str] = {
    key: "REAL" if key in DATES else "INTEGER" if key == "engine_id" else "TEXT"
    for key in QUERYABLE
}
"""The SQLite column type of each queryable key (the comparisons above assume these)."""

KEYS: tuple[str, ...] = (
    *QUERYABLE,
    "header",
    "metadata",
    "content",
    "buffers",
    "result_header",
    "result_metadata",
    "result_content",
    "result_buffers",
    "stdout",
    "stderr",
    "after",
    "follow",
)
"""Every key a query may return."""

DEFAULT_KEYS: tuple[str, ...] = tuple(k for k in KEYS if k not in ("buffers", "result_buffers"))
"""What a query returns when no keys are given: everything but the buffers."""

OPERATORS = ("$eq", "$ne", "$in", "$nin", "$lt", "$lte", "$gt", "$gte")
MAX_LIST = 10_000
MAX_VALUES = 20_000
MAX_TEXT = 1_000_000
_MAX_INT = 2**53

Query = dict[str, dict[str, Any]]


class _Budget:
    """What is left of one query's size bounds."""

    def __init__(self) -> None:
        self.values = MAX_VALUES
        self.text = MAX_TEXT

    def spend(self, key: str, value: Any) -> None:
        self.values -= 1
        if isinstance(value, str):
            self.text -= len(value)
        if self.values < 0 or self.text < 0:
            raise ValueError(
                f"query too large at {key!r}: at most {MAX_VALUES} values and "
                f"{MAX_TEXT} characters in all"
            )


def _kind(value: Any) -> str:
    return type(value).__name__


def _date(key: str, value: datetime | str) -> float:
    if isinstance(value, str):
        try:
            return _date(key, datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            raise ValueError(f"{key!r}: {value[:40]!r} is not an ISO 8601 date") from None
    try:
        return value.timestamp()  # a naive datetime counts as local time, as Python does
    except (OverflowError, OSError, ValueError):
        raise ValueError(f"{key!r}: {value} is out of range") from None


def _scalar(key: str, op: str, value: Any, budget: _Budget) -> Any:
    """One operand for ``key``, checked and normalised (dates as timestamps)."""
    budget.spend(key, value)
    if value is None:
        if op not in ("$eq", "$ne"):
            raise TypeError(f"{key!r}: {op} needs a value, not None")
        if key not in NULLABLE:
            raise ValueError(f"{key!r} is never None")
        return None
    if key in NUMBERS:
        if key in DATES and isinstance(value, (datetime, str)):
            value = _date(key, value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{key!r}: {op} needs a number, not {_kind(value)}")
        if isinstance(value, int):
            if abs(value) > _MAX_INT:
                raise ValueError(f"{key!r}: {value} is out of range (at most 2**53)")
        elif math.isnan(value):
            raise ValueError(f"{key!r}: NaN is not comparable")
        return value
    if not isinstance(value, str):
        raise TypeError(f"{key!r}: {op} needs a string, not {_kind(value)}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{key!r}: the string is not valid Unicode") from None
    return value


def _operand(key: str, op: str, value: Any, budget: _Budget) -> Any:
    if op not in ("$in", "$nin"):
        return _scalar(key, op, value, budget)
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise TypeError(f"{key!r}: {op} needs a list, not {_kind(value)}")
    if len(value) > MAX_LIST:
        raise ValueError(f"{key!r}: {op} takes at most {MAX_LIST} values, not {len(value)}")
    for item in value:
        if item is None:
            raise TypeError(f"{key!r}: {op} takes no None (use $eq/$ne None)")
    return tuple(dict.fromkeys(_scalar(key, op, item, budget) for item in value))


def check_query(query: Any) -> Query:
    """Validate a query from the wire; return it normalised as ``{key: {op: operand}}``.

    Raises
    ------
    TypeError
        When the query, a key's condition or an operand has the wrong type.
    ValueError
        For an unknown key or operator, an out-of-range operand or a query too large.
    """
    if not isinstance(query, Mapping):
        raise TypeError(f"a query must be a dict, not {_kind(query)}")
    budget = _Budget()
    out: Query = {}
    for key, condition in query.items():
        if not isinstance(key, str):
            raise TypeError(f"query keys must be strings, not {_kind(key)}")
        if key not in SQL_TYPES:
            raise ValueError(
                f"cannot query {key[:40]!r}: queryable keys are {', '.join(QUERYABLE)}"
            )
        if not isinstance(condition, Mapping):
            if isinstance(condition, (list, tuple, set, frozenset, bytes)):
                raise TypeError(f"{key!r}: use {{'$in': [...]}} to match one of several values")
            condition = {"$eq": condition}
        if not condition:
            raise ValueError(f"{key!r}: no operator given")
        ops: dict[str, Any] = {}
        for op, value in condition.items():
            if op not in OPERATORS:
                raise ValueError(f"{key!r}: unknown operator {str(op)[:20]!r}; use {OPERATORS}")
            ops[op] = _operand(key, op, value, budget)
        out[key] = ops
    return out


def _test(op: str, operand: Any) -> Callable[[Any], bool]:
    """A predicate on one field's value (None: unset), with the semantics above."""
    if op == "$eq":
        return lambda v: v is None if operand is None else v is not None and v == operand
    if op == "$ne":
        return lambda v: v is not None if operand is None else v is None or v != operand
    if op == "$in":
        members = frozenset(operand)
        return lambda v: v is not None and v in members
    if op == "$nin":
        members = frozenset(operand)
        return lambda v: v is None or v not in members
    if op == "$lt":
        return lambda v: v is not None and v < operand
    if op == "$lte":
        return lambda v: v is not None and v <= operand
    if op == "$gt":
        return lambda v: v is not None and v > operand
    return lambda v: v is not None and v >= operand


def compile_query(query: Any) -> Callable[[Mapping[str, Any]], bool]:
    """Check ``query`` once; return a predicate on record dicts (missing keys: None)."""
    tests = [
        (key, _test(op, operand))
        for key, ops in check_query(query).items()
        for op, operand in ops.items()
    ]
    return lambda row: all(test(row.get(key)) for key, test in tests)


def matches(row: Mapping[str, Any], query: Any) -> bool:
    """Whether the record ``row`` matches ``query`` (checked on every call: to test many
    rows, use :func:`compile_query`)."""
    return compile_query(query)(row)


_SQL_COMPARE = {"$lt": "<", "$lte": "<=", "$gt": ">", "$gte": ">="}


def to_sql(query: Any, prefix: str = "") -> tuple[str, list[Any]]:
    """``query`` as an SQLite ``WHERE`` clause on columns named after the keys (after
    ``prefix``, e.g. ``"t."``) with its parameters; ``("1", [])`` for an empty query."""
    terms: list[str] = []
    params: list[Any] = []
    for key, ops in check_query(query).items():
        col = prefix + key
        for op, operand in ops.items():
            if op == "$eq":
                terms.append(f"{col} IS NULL" if operand is None else f"{col} = ?")
            elif op == "$ne":
                # IS NOT is SQL's null-safe inequality: true for a NULL column
                terms.append(f"{col} IS NOT NULL" if operand is None else f"{col} IS NOT ?")
            elif op in ("$in", "$nin"):
                marks = ",".join("?" * len(operand))
                if op == "$in":
                    terms.append(f"{col} IN ({marks})" if operand else "0")
                else:
                    terms.append(f"({col} IS NULL OR {col} NOT IN ({marks}))" if operand else "1")
                params.extend(operand)
                continue
            else:
                terms.append(f"{col} {_SQL_COMPARE[op]} ?")
            if operand is not None:
                params.append(operand)
    return (" AND ".join(terms) or "1"), params


def check_keys(keys: Any) -> tuple[str, ...]:
    """The record keys to return: :data:`DEFAULT_KEYS` for None, else the given ones
    (each once, ``msg_id`` always first, as the predecessor does).

    Raises
    ------
    TypeError
        When ``keys`` is not a list of strings.
    ValueError
        For an unknown key.
    """
    if keys is None:
        return DEFAULT_KEYS
    if isinstance(keys, (str, bytes)) or not isinstance(keys, (list, tuple, set, frozenset)):
        raise TypeError(f"keys must be a list of strings, not {_kind(keys)}")
    out = ["msg_id"]
    for key in keys:
        if not isinstance(key, str):
            raise TypeError(f"keys must be strings, not {_kind(key)}")
        if key not in KEYS:
            raise ValueError(f"unknown record key {key[:40]!r}: keys are {', '.join(KEYS)}")
        if key not in out:
            out.append(key)
    return tuple(out)
