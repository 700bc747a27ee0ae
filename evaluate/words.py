"""Score figures in words a user reads: question-type names and the one-line accuracy summary."""

from __future__ import annotations

TYPE_WORDS = {"color": "colour"}
"""How a question type is printed (the toy corpus's types are spelled the American way in the files)."""


def accuracy_in_words(report: dict) -> str:
    """One line a user reads, from a score report: exact-match accuracy overall, then per question type.

    ``{"overall": {"exact_match": 0.867}, "per_type": {"color": {"exact_match": 1.0}, ...}}``
    -> ``"accuracy 0.87: colour 1.00, shape 0.60, direction 1.00"`` (types in the report's order).
    """
    overall = report["overall"]["exact_match"]
    if overall is None:
        return "accuracy: no scored questions"
    parts = [f"{TYPE_WORDS.get(name, name)} {m['exact_match']:.2f}" for name, m in report["per_type"].items()
             if m["exact_match"] is not None and name != "untyped"]
    return f"accuracy {overall:.2f}" + (": " + ", ".join(parts) if parts else "")
