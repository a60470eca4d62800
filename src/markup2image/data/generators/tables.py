"""Seeded synthetic HTML tables in the spirit of im2html-100k.

Small tables (1-4 rows, 1-3 columns) with an optional header row, borders on or off, cell padding, the odd
``colspan``/``rowspan``, ``<b>``/``<i>`` and short words and numbers, so that they fit a 64x64 canvas. The markup is
one line of plain HTML (no styles, scripts or external resources); presentation (font, size) belongs to the renderer.
Spans are planned on a grid first, so every row covers the same number of columns.
"""

from __future__ import annotations

import random

WORDS = (
    "a an at by id no ok on to up us ab cd ef gh ij xy "
    "age all and box car cat day dog end fig fox key log map max min net red row set sum tax top use var "
    "area base cell code date data east file item left mean name node note open rate size step test time type "
    "unit user year"
).split()


def _cell_text(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.45:
        text = rng.choice(WORDS)
    elif r < 0.65:
        text = str(rng.randint(0, rng.choice([9, 99, 999])))
    elif r < 0.72:
        text = f"{rng.randint(0, 9)}.{rng.randint(0, 9)}"
    elif r < 0.76:
        text = f"-{rng.randint(1, 9)}"
    elif r < 0.79:
        text = f"{rng.choice(WORDS[:16])} {rng.choice(WORDS[:16])}"
    elif r < 0.9:
        text = rng.choice(WORDS).capitalize()
    else:
        text = ""
    if text and rng.random() < 0.12:
        tag = rng.choice(["b", "i"])
        text = f"<{tag}>{text}</{tag}>"
    return text


def _plan_spans(rng: random.Random, rows: int, cols: int) -> list[list[tuple[int, int] | None]]:
    """grid[r][c] = (rowspan, colspan) for the cell that starts there, None where a span covers it."""
    grid: list[list[tuple[int, int] | None]] = [[(1, 1)] * cols for _ in range(rows)]
    for _ in range(rng.choice([0, 0, 0, 1, 1, 2])):
        r, c = rng.randrange(rows), rng.randrange(cols)
        if grid[r][c] != (1, 1):
            continue
        rs = 2 if rng.random() < 0.4 and r + 1 < rows else 1
        cs = 2 if rs == 1 and c + 1 < cols else 1
        covered = [(r + i, c + j) for i in range(rs) for j in range(cs)]
        if (rs, cs) == (1, 1) or any(grid[i][j] != (1, 1) for i, j in covered):
            continue
        for i, j in covered:
            grid[i][j] = None
        grid[r][c] = (rs, cs)
    return grid


def generate_table(rng: random.Random) -> str:
    """One ``<table>...</table>`` as a single line of HTML."""
    rows, cols = rng.choice([1, 2, 2, 3, 3, 3, 4, 4]), rng.choice([1, 2, 2, 2, 3, 3])
    header = rng.random() < 0.5
    attrs = []
    if rng.random() < 0.7:
        attrs.append(f'border="{rng.choice([1, 1, 2])}"')
    if rng.random() < 0.3:
        attrs.append(f'cellpadding="{rng.choice([0, 1, 2])}"')
    if rng.random() < 0.2:
        attrs.append(f'cellspacing="{rng.choice([0, 1, 2])}"')
    grid = _plan_spans(rng, rows, cols)
    out = ["<table" + "".join(" " + a for a in attrs) + ">"]
    for r in range(rows):
        out.append("<tr>")
        tag = "th" if header and r == 0 else "td"
        for c in range(cols):
            span = grid[r][c]
            if span is None:
                continue
            rs, cs = span
            extra = (f' rowspan="{rs}"' if rs > 1 else "") + (f' colspan="{cs}"' if cs > 1 else "")
            align = f' align="{rng.choice(["left", "right", "center"])}"' if rng.random() < 0.1 else ""
            out.append(f"<{tag}{extra}{align}>{_cell_text(rng)}</{tag}>")
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)
