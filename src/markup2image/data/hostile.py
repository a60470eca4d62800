"""Seeded corpora of broken and hostile markup mixed with valid items, per domain (``bench robustness``, tests).

``hostile_corpus(domain, n, seed, canary)`` returns ``n`` rows ``{"id", "markup", "kind"}``: ``VALID_SHARE`` of them
drawn from the domain's synthetic generator (kind ``valid``), the rest from the domain's hostile kinds below, in
turn, each with a random part so that no two rows are the same. ``canary`` is a folder OUTSIDE the render stage's
scratch and output folders: items that try to write files, run programs or read files name paths in it (absolute
and relative), so a run that leaves anything in it has let markup out.

What the kinds aim at (the sandbox each must hit is in the render stage's docs, README "Hostile input"):
- math (TeX): unbalanced groups, unknown macros, infinite expansion, ``\\write18``, ``\\openout``/``\\openin``,
  ``\\input`` of absolute and ``..`` paths, ``\\csname``-built primitives, ``\\end{document}``, forged item markers.
- music (LilyPond): embedded Scheme ``#(system ...)``/``$(...)``, ``\\include``, output-name changes, unbalanced
  braces, unknown commands, huge repeats.
- tables (WeasyPrint): ``<script>``, ``<iframe>``, ``<img src="http://...">``, CSS ``url(...)`` and ``@import``,
  ``file://`` URLs, unbalanced tags, deep nesting, huge spans.
- molecules (RDKit): invalid SMILES, valence errors, unclosed rings, unknown elements, 500-atom molecules.
- every domain: empty and blank markup, NUL bytes and odd unicode (RTL marks, zero-width joiners, emoji,
  combining marks), markup of 2k-20k characters (reaches the engine) and of 100k+ (past ``render.max_chars``),
  ids that are not file names (``../x``, ``a/b``).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from markup2image.data.generators import get_generator, markup_id

VALID_SHARE = 0.4
ODD_UNICODE = ("\u202e", "\u200d", "\ufeff", "\U0001f600", "e\u0301", "\u0000", "\x07", "\u2028", "\uffff")

Kind = Callable[[random.Random, str], str]


def _odd(rng: random.Random) -> str:
    return "".join(rng.choice(ODD_UNICODE) for _ in range(rng.randint(1, 4)))


def _repeat(markup: str, chars: int) -> str:
    unit = markup + " "
    return (unit * (chars // len(unit) + 1))[:chars]


def _common(valid: Callable[[random.Random], str]) -> dict[str, Kind]:
    return {
        "empty": lambda rng, c: rng.choice(["", " ", "\n\t ", "\u3000"]),
        "nul_bytes": lambda rng, c: valid(rng).replace(" ", "\x00", 1) + "\x00",
        "odd_unicode": lambda rng, c: _odd(rng) + valid(rng) + _odd(rng),
        "huge": lambda rng, c: _repeat(valid(rng), rng.randint(100_000, 300_000)),  # past render.max_chars
        "long": lambda rng, c: _repeat(valid(rng), rng.randint(2_000, 20_000)),  # reaches the engine
    }


def _math_kinds(valid: Callable[[random.Random], str]) -> dict[str, Kind]:
    return {
        "unbalanced": lambda rng, c: rng.choice(["{", "}", "\\frac{a}{", "x^{2", "\\left( x", "a}b{"]) + valid(rng),
        "unknown_macro": lambda rng, c: f"\\undefinedmacro{rng.randint(0, 10**6)} {valid(rng)}",
        "infinite_loop": lambda rng, c: (
            rng.choice(["\\def\\x{\\x}\\x", "\\loop\\iftrue\\repeat"]) + " " * rng.randint(0, 9)
        ),
        "memory_bomb": lambda rng, c: "\\def\\x{\\x\\x}\\x" + " " * rng.randint(0, 9),
        "write18": lambda rng, c: f"\\immediate\\write18{{touch {c}/write18_{rng.randint(0, 10**6)}}} x",
        "openout": lambda rng, c: (
            "\\newwrite\\w\\immediate\\openout\\w="
            + rng.choice([f"{c}/openout_{rng.randint(0, 10**6)}", f"../../openout_{rng.randint(0, 10**6)}"])
            + " \\immediate\\write\\w{x}\\immediate\\closeout\\w y"
        ),
        "openin": lambda rng, c: (
            "\\newread\\r\\openin\\r="
            + rng.choice(["/etc/passwd", "../../../../etc/hostname", "~/.bashrc"])
            + f" \\read\\r to\\l \\mbox{{\\l}} {rng.randint(0, 99)}"
        ),
        "input": lambda rng, c: (
            rng.choice(["\\input{/etc/passwd}", "\\input{../../../etc/hostname}", "\\input|ls"])
            + f" {rng.randint(0, 99)}"
        ),
        "csname": lambda rng, c: (
            rng.choice(
                [
                    f"\\csname immediate\\endcsname\\csname write\\endcsname18{{touch {c}/csname}}",
                    "\\csname input\\endcsname{/etc/passwd}",
                    "\\expandafter\\csname end\\endcsname{document}",
                ]
            )
            + f" {rng.randint(0, 99)}"
        ),
        "end_document": lambda rng, c: f"x \\end{{displaymath}}\\end{{document}} {rng.randint(0, 99)}",
        "forged_marker": lambda rng, c: f"\\typeout{{M2I-ITEM {rng.randint(0, 70)}}} \\undefinedmacro {valid(rng)}",
        "catcode": lambda rng, c: f"\\catcode`\\{{=12 {valid(rng)}",
    }


def _music_kinds(valid: Callable[[random.Random], str]) -> dict[str, Kind]:
    return {
        "scheme_system": lambda rng, c: f'#(system "touch {c}/scheme_{rng.randint(0, 10**6)}") ' + valid(rng),
        "scheme_dollar": lambda rng, c: f'$(system "touch {c}/dollar") {valid(rng)} $(+ 1 {rng.randint(0, 99)})',
        "include": lambda rng, c: rng.choice(['\\include "/etc/passwd"', '\\include "../../x.ly"']) + f" {valid(rng)}",
        "output_name": lambda rng, c: (
            rng.choice([f'\\bookOutputName "{c}/out_{rng.randint(0, 10**6)}"', '\\bookOutputSuffix "../../x"'])
            + f" {valid(rng)}"
        ),
        "unbalanced": lambda rng, c: rng.choice(["{ ", "} ", "{ { "]) + valid(rng),
        "unknown_command": lambda rng, c: f"{{ \\undefinedcommand{rng.randint(0, 10**6)} c4 d4 }}",
        "bad_notes": lambda rng, c: f"{{ c4 zz{rng.randint(0, 99)} 4. .. }}",
        "huge_repeat": lambda rng, c: f"{{ \\repeat unfold {rng.randint(20000, 40000)} {{ c16 d e f }} }}",
    }


def _tables_kinds(valid: Callable[[random.Random], str]) -> dict[str, Kind]:
    def cell(rng: random.Random, inner: str) -> str:
        return f'<table border="1"><tr><td>{inner}</td><td>{rng.randint(0, 999)}</td></tr></table>'

    return {
        "script": lambda rng, c: cell(rng, f"<script>fetch('http://example.com/{rng.randint(0, 99)}')</script>x"),
        "iframe": lambda rng, c: cell(rng, f'<iframe src="http://example.com/{rng.randint(0, 99)}"></iframe>'),
        "img_http": lambda rng, c: cell(rng, f'<img src="http://example.com/{rng.randint(0, 99)}.png">'),
        "css_url": lambda rng, c: (
            f'<table style="background: url(http://example.com/{rng.randint(0, 99)}.png)"><tr><td>a</td></tr></table>'
        ),
        "css_file_url": lambda rng, c: (
            f'<table><tr><td style="background-image: url(file:///etc/passwd)">{rng.randint(0, 99)}</td></tr></table>'
        ),
        "style_import": lambda rng, c: (
            f"<style>@import url(http://example.com/{rng.randint(0, 99)}.css);</style>"
            "<table><tr><td>a</td></tr></table>"
        ),
        "link_tag": lambda rng, c: (
            f'<link rel="stylesheet" href="http://example.com/{rng.randint(0, 99)}">' + valid(rng)
        ),
        "unbalanced": lambda rng, c: (
            rng.choice(["<table><tr><td>a", "</td></tr>", "<table><b>x</table>"]) + valid(rng)
        ),
        "deep_nesting": lambda rng, c: "<table><tr><td>" * rng.randint(200, 400) + "x",
        "huge_span": lambda rng, c: f'<table><tr><td colspan="{rng.randint(10**4, 10**5)}">a</td></tr></table>',
    }


def _molecules_kinds(valid: Callable[[random.Random], str]) -> dict[str, Kind]:
    return {
        "invalid": lambda rng, c: (
            rng.choice(["C1CC(", "((", "C==C", "c1cc", "[C@@", "C%", "=C"]) + "C" * rng.randint(0, 9)
        ),
        "valence": lambda rng, c: (
            rng.choice(["C(C)(C)(C)(C)C", "O(C)(C)C", "N(=O)(=O)=O", "F(F)F"]) + "C" * rng.randint(0, 9)
        ),
        "unclosed_ring": lambda rng, c: f"C{rng.randint(1, 9)}CCCC" + "C" * rng.randint(0, 9),
        "unknown_element": lambda rng, c: f"[Xx{rng.randint(0, 99)}]CC",
        "atoms_500": lambda rng, c: rng.choice(["C", "CC(C)", "c1ccccc1"]) * (500 // 3) + "C" * rng.randint(0, 50),
        "injection": lambda rng, c: f"CCO; touch {c}/smiles_{rng.randint(0, 99)}",
    }


SPECIFIC: dict[str, Callable[[Callable[[random.Random], str]], dict[str, Kind]]] = {
    "math": _math_kinds,
    "music": _music_kinds,
    "tables": _tables_kinds,
    "molecules": _molecules_kinds,
}


def domain_kinds(domain: str) -> dict[str, Kind]:
    """The hostile kinds of ``domain``: the ones every domain gets and the domain's own."""
    if domain not in SPECIFIC:
        raise ValueError(f"domain {domain!r}: no hostile corpus; known: {sorted(SPECIFIC)}")
    valid = get_generator(domain)
    return {**_common(valid), **SPECIFIC[domain](valid)}


BAD_IDS = ("../escape", "a/b", "", ".hidden", "x" * 300, "nul\x00id")


def hostile_corpus(domain: str, n: int, seed: int, canary: str) -> list[dict[str, str]]:
    """``n`` rows ``{"id", "markup", "kind"}`` (module docstring). Ids are unique (kind, index, markup hash); a few
    are not file names (kind ``bad_id``, valid markup). Markups may repeat (``empty`` has few forms)."""
    kinds = domain_kinds(domain)
    rng = random.Random(f"hostile/{domain}/{seed}")
    valid = get_generator(domain)
    names = sorted(kinds)
    rows: list[dict[str, str]] = []
    n_valid = round(n * VALID_SHARE)
    n_bad_ids = min(len(BAD_IDS), max(n - n_valid, 0) // 20)
    for bad_id in BAD_IDS[:n_bad_ids]:
        rows.append({"id": bad_id, "markup": valid(rng), "kind": "bad_id"})
    for i in range(n - n_bad_ids):
        if i < n_valid:
            kind, markup = "valid", valid(rng)
        else:
            kind = names[(i - n_valid) % len(names)]
            markup = kinds[kind](rng, canary)
        rows.append({"id": f"{kind}-{i:05d}-{markup_id(domain, markup)[:6]}", "markup": markup, "kind": kind})
    return rows
