"""Identifiers are data, never paths.

Every case id (from a file name or a dataset.json ``case_id``) and every dataset id is checked against one safe
pattern, :data:`SAFE_ID`, before it names anything on disk; and every path built from a root the caller was given plus
such names goes through :func:`safe_join`, which refuses to leave that root. Together they guarantee that no input can
make the pipeline read, write or delete outside the store / output folder it was handed.

The pattern: 1 to 128 characters from ``A-Z a-z 0-9 . _ -``, starting with a letter or a digit. So no separators, no
``..`` component, no absolute path, no NUL or control characters, no leading dot (hidden files) or dash (command-line
options), and short enough to leave room for suffixes (``_0000.nii.gz``) under the usual 255-byte name limit.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from voco.errors import UnsafePathError

#: The one pattern every identifier that becomes part of a file name must match.
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_ID_LENGTH = 128


def id_problem(value: object) -> str | None:
    """Why ``value`` is not a safe identifier (None when it is)."""
    if not isinstance(value, str):
        return f"is a {type(value).__name__}, not a string"
    if not value:
        return "is empty"
    if "\x00" in value:
        return "contains a NUL character"
    if len(value) > MAX_ID_LENGTH:
        return f"is {len(value)} characters long (at most {MAX_ID_LENGTH})"
    if "/" in value or "\\" in value:
        return "contains a path separator"
    if value in (".", "..") or value.startswith("."):
        return "starts with a dot"
    if not SAFE_ID.fullmatch(value):
        bad = sorted({c for c in value if not re.fullmatch(r"[A-Za-z0-9._-]", c)})
        if bad:
            return f"contains the character(s) {''.join(bad)!r}"
        return "must start with a letter or a digit"
    return None


def check_id(value: object, what: str = "id") -> str:
    """Return ``value`` if it is a safe identifier, else raise :class:`UnsafePathError` naming it and the rule.

    Args:
        value: the identifier (case id, dataset id, ...).
        what: what it is, for the message (e.g. ``"case id in /data/x/dataset.json entry 3"``).
    """
    problem = id_problem(value)
    if problem is not None:
        shown = repr(value) if not isinstance(value, str) or len(value) <= 80 else repr(value[:77] + "...")
        raise UnsafePathError(
            f"{what} {shown} {problem}: identifiers must match {SAFE_ID.pattern} (letters, digits, '.', '_', '-'; "
            f"no path separators, at most {MAX_ID_LENGTH} characters); rename it"
        )
    return value  # type: ignore[return-value]


def is_inside(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> bool:
    """Whether ``path`` resolves (symlinks followed) to ``root`` or something below it."""
    r = Path(root).resolve()
    p = Path(path).resolve()
    return p == r or r in p.parents


def safe_join(root: str | os.PathLike[str], *parts: str) -> Path:
    """``root / part / ...``, refusing any result that resolves outside ``root``.

    Each part may contain ``/`` (a relative sub-path such as ``"cases"``), but not a NUL, an absolute path or a ``..``
    component, and the joined path (symlinks resolved) must stay inside ``root``.

    Raises:
        UnsafePathError: the joined path would leave ``root`` (the message names both).
    """
    root = Path(root)
    for part in parts:
        s = str(part)
        if not s or "\x00" in s or os.path.isabs(s) or s.startswith("\\") or ".." in re.split(r"[\\/]", s):
            raise UnsafePathError(f"refusing path component {s[:80]!r} under {root}: empty, absolute, NUL or '..'")
    path = root.joinpath(*parts)
    if not is_inside(path, root):
        raise UnsafePathError(f"refusing {path}: it resolves to {path.resolve()}, outside {root.resolve()}")
    return path
