"""A user's file of markup for ``markup2image render`` / ``sample --markup-file``.

Either JSONL with one ``{"id": ..., "markup": ...}`` object per line (``id`` optional), or plain text with one
markup per line. Items without an id are named by :func:`~markup2image.data.generators.markup_id` of their domain
and markup, so ``render`` and ``sample`` of the same file write same-named images that ``score`` pairs up.
Blank lines are skipped; a repeated id is an error naming both lines.
"""

from __future__ import annotations

import json
from pathlib import Path

from markup2image.data.generators import markup_id
from markup2image.io import is_safe_id


def read_markup_file(path: str | Path, domain: str) -> list[dict[str, str]]:
    """``[{"id", "markup"}, ...]`` in file order; raises ValueError naming the file and line on bad input."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such markup file (one markup per line, or JSONL with 'id' and 'markup')")
    rows: list[dict[str, str]] = []
    where: dict[str, int] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        item_id, markup = None, line.strip()
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: a line starting with '{{' is not valid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict) or not isinstance(obj.get("markup"), str):
                raise ValueError(f"{path}:{n}: a JSON line needs a string 'markup'")
            markup = obj["markup"]
            item_id = None if obj.get("id") is None else str(obj["id"])
        item_id = item_id or markup_id(domain, markup)
        if not is_safe_id(item_id):
            raise ValueError(
                f"{path}:{n}: id {item_id!r} is not a safe file name "
                "(letters, digits, '.', '_', '-'; not starting with '.')"
            )
        if item_id in where:
            raise ValueError(f"{path}:{n}: id {item_id!r} repeats line {where[item_id]}; ids name the output files")
        where[item_id] = n
        rows.append({"id": item_id, "markup": markup})
    if not rows:
        raise ValueError(f"{path}: no markup in the file")
    return rows
