"""Offline answer metrics: normalised exact match and "gold appears in the prediction".

These need no judge model, so they are always computed. Both compare normalised token sequences:
lowercased, punctuation turned into spaces, the articles a/an/the dropped, whitespace collapsed.
"""

from __future__ import annotations

import string
import unicodedata
from collections import defaultdict
from typing import Iterable, Mapping

_ARTICLES = frozenset({"a", "an", "the"})
_ASCII_PUNCT = frozenset(string.punctuation)


def _is_punct(ch: str) -> bool:
    return ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P")


def _tokens(s: str) -> list[str]:
    text = "".join(" " if _is_punct(ch) else ch for ch in str(s).lower())
    return [tok for tok in text.split() if tok not in _ARTICLES]


def normalize_answer(s: str) -> str:
    """Lowercase, replace punctuation by spaces, drop a/an/the, collapse whitespace.

    ``normalize_answer("The man's  T-shirt!") == "man s t shirt"``. Punctuation becomes a space rather
    than vanishing so that "t-shirt" still contains the token "shirt" and "3.5" does not become "35".
    """
    return " ".join(_tokens(s))


def exact_match(pred: str, gold: str) -> bool:
    """True when the normalised prediction equals the normalised gold answer."""
    return _tokens(pred) == _tokens(gold)


def contains_match(pred: str, gold: str) -> bool:
    """True when gold's normalised tokens appear contiguously in the prediction's.

    Token-level, so gold "dog" is found in "a black dog" but not in "hotdog". A gold answer that
    normalises to nothing (e.g. "the") only matches an equally empty prediction.
    """
    p, g = _tokens(pred), _tokens(gold)
    if not g:
        return not p
    return any(p[i:i + len(g)] == g for i in range(len(p) - len(g) + 1))


def _summarise(rows: list[tuple[bool, bool]]) -> dict:
    n = len(rows)
    return {
        "n": n,
        "exact_match": sum(e for e, _ in rows) / n if n else None,
        "contains": sum(c for _, c in rows) / n if n else None,
    }


def offline_metrics(items: Iterable[Mapping], per_type: bool = True) -> dict:
    """Exact-match and contains accuracy (fractions in [0, 1], None when there are no items).

    ``items`` are mappings with ``pred``, ``answer`` and optionally ``type``. Returns
    ``{"overall": {"n", "exact_match", "contains"}, "per_type": {type: {...same...}}}``; types are
    keyed as strings, items without one are grouped under ``"untyped"``, and ``per_type`` is empty
    when ``per_type`` is false or no item has a type.
    """
    overall: list[tuple[bool, bool]] = []
    groups: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    any_typed = False
    for item in items:
        row = (exact_match(item["pred"], item["answer"]), contains_match(item["pred"], item["answer"]))
        overall.append(row)
        qtype = item.get("type")
        any_typed |= qtype is not None
        groups["untyped" if qtype is None else str(qtype)].append(row)
    return {
        "overall": _summarise(overall),
        "per_type": {k: _summarise(v) for k, v in sorted(groups.items())} if per_type and any_typed else {},
    }
