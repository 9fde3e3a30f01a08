"""The one exception type user-facing entry points raise for bad input.

DESIGN.md, "Bad input": every entry point validates before work starts and fails with one clear
line naming the case, the file and the rule broken. The CLI prints ``str(error)`` as that line and
exits with status 2; it never prints a traceback for a :class:`NoisysegInputError`.
"""

from __future__ import annotations


class NoisysegInputError(ValueError):
    """Bad user input, reported as one line: ``case <id>: <file>: <rule broken>``.

    Args:
        rule: what is wrong, in words (e.g. ``"label is not binary (values 0, 1, 3)"``).
        case: the case id the problem belongs to, when there is one.
        path: the file or store path concerned, when there is one.
    """

    def __init__(self, rule: str, *, case: str | None = None, path: str | None = None) -> None:
        self.rule = rule
        self.case = case
        self.path = path
        parts = []
        if case is not None:
            parts.append(f"case {case}")
        if path is not None:
            parts.append(str(path))
        parts.append(rule)
        super().__init__(": ".join(parts))
