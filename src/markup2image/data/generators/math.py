"""Seeded synthetic LaTeX formulas in the style of im2latex-100k.

Formulas are written as im2latex's normalized token sequences: every token separated by one space and every group
braced (``\\frac { a } { b }``, ``x _ { i } ^ { 2 }``). The grammar stays inside what both matplotlib mathtext and
real LaTeX (amsmath) accept, so either engine can render every formula. Lengths are short to medium (im2latex's
bulk) so that most formulas fit the 64x320 canvas; the ones that do not are rejected by the renderer as
``overflow``, never scaled.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

LATIN = list("abcdefghijklmnopqrstuvwxyz") + list("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
GREEK = (
    r"\alpha \beta \gamma \delta \epsilon \varepsilon \zeta \eta \theta \vartheta \kappa \lambda \mu \nu \xi \pi "
    r"\rho \sigma \tau \phi \varphi \chi \psi \omega \Gamma \Delta \Theta \Lambda \Xi \Pi \Sigma \Phi \Psi \Omega"
).split()
DIGITS = list("0123456789")
BINARY = ["+", "-", "+", "-", r"\cdot", r"\times", r"\pm", "/"]
RELATIONS = ["=", "=", "=", r"\leq", r"\geq", r"\neq", r"\approx", r"\equiv", r"\sim", "<", ">", r"\to", r"\in"]
FUNCTIONS = [r"\sin", r"\cos", r"\log", r"\exp", r"\ln", r"\tan", r"\det", r"\max", r"\min"]
ACCENTS = [r"\hat", r"\bar", r"\tilde", r"\vec", r"\dot"]
FONTS = [r"\mathrm", r"\mathbf", r"\mathcal"]
BIG_OPERATORS = [r"\sum", r"\sum", r"\int", r"\prod", r"\oint"]
SYMBOLS = [r"\infty", r"\partial", r"\nabla", r"\hbar", r"\ell"]
BRACKETS = [("(", ")"), ("(", ")"), ("[", "]"), (r"\{", r"\}"), ("|", "|")]


@dataclass(frozen=True)
class Symbols:
    """The alphabet a grammar draws from (``data.symbols``)."""

    latin: tuple[str, ...]
    greek: tuple[str, ...]
    binary: tuple[str, ...]
    relations: tuple[str, ...]
    functions: tuple[str, ...]
    brackets: tuple[tuple[str, str], ...]
    extras: bool  # accents, math alphabets, big operators, \infty-like symbols


FULL = Symbols(
    tuple(LATIN), tuple(GREEK), tuple(BINARY), tuple(RELATIONS), tuple(FUNCTIONS), tuple(BRACKETS), extras=True
)
# basic: the glyphs of school algebra (lower-case Latin, a few capitals, common Greek, digits, + - = and relations,
# scripts, fractions, roots, \sin-like functions, parentheses); fewer glyph kinds to learn on a CPU budget.
BASIC = Symbols(
    latin=tuple("abcdefghijklmnopqrstuvwxyz") + tuple("ABCNXY"),
    greek=tuple(r"\alpha \beta \gamma \delta \theta \lambda \mu \pi \sigma \phi \omega \Delta \Sigma \Omega".split()),
    binary=("+", "-", "+", "-", r"\cdot", r"\times"),
    relations=("=", "=", "=", "<", ">", r"\leq", r"\geq", r"\neq", r"\approx"),
    functions=(r"\sin", r"\cos", r"\tan", r"\log", r"\exp"),
    brackets=(("(", ")"),),
    extras=False,
)
SYMBOL_SETS = {"full": FULL, "basic": BASIC}


class MathFormulaGenerator:
    """Draw one formula per call from a seeded grammar.

    ``max_depth`` bounds nesting (fractions inside scripts inside brackets); ``max_terms`` bounds the length of one
    flat expression. Both are kept small so that formulas look like im2latex's short-to-medium ones.
    """

    def __init__(self, rng: random.Random, max_depth: int = 2, max_terms: int = 5, symbols: str = "full") -> None:
        self.rng = rng
        self.max_depth = max_depth
        self.max_terms = max_terms
        if symbols not in SYMBOL_SETS:
            raise ValueError(f"data.symbols: {symbols!r} is not one of {sorted(SYMBOL_SETS)}")
        self.s = SYMBOL_SETS[symbols]

    # -- leaves ----------------------------------------------------------------------------------------------------
    def symbol(self) -> list[str]:
        r = self.rng.random()
        if r < 0.55:
            return [self.rng.choice(self.s.latin)]
        if r < 0.8:
            return [self.rng.choice(self.s.greek)]
        if r < 0.95 or not self.s.extras:
            return list(str(self.rng.choice([1, 2, 2, 3, 4, 10, self.rng.randint(0, 99)])))
        return [self.rng.choice(SYMBOLS)]

    def script_body(self, depth: int, superscript: bool) -> list[str]:
        """A short sub/superscript: one symbol, ``- 1``, ``i + 1``, ``\\prime`` or (rarely) a small expression."""
        r = self.rng.random()
        if r < 0.55:
            return self.symbol()
        if r < 0.68:
            return [self.rng.choice(["-", "+"]), self.rng.choice(DIGITS[1:4] + ["i", "n"])]
        if r < 0.82:
            return [self.rng.choice("ijknm"), self.rng.choice(["+", "-"]), self.rng.choice(DIGITS[1:3])]
        if r < 0.9 and superscript:
            return [r"\prime"]
        if depth == 0:
            return [*self.symbol(), *self.symbol()]
        return self.symbol()

    def scripted(self, base: list[str], depth: int, p: float = 0.35) -> list[str]:
        """``base`` with a subscript, a superscript, both (rarely) or neither."""
        out = list(base)
        r = self.rng.random()
        if r < p * 0.6:
            out += ["_", "{", *self.script_body(depth, superscript=False), "}"]
        elif r < p:
            out += ["^", "{", *self.script_body(depth, superscript=True), "}"]
        elif r < p * 1.2:
            out += ["_", "{", *self.script_body(depth, False), "}", "^", "{", *self.script_body(depth, True), "}"]
        return out

    def term(self, depth: int) -> list[str]:
        if depth >= self.max_depth:
            return self.scripted(self.symbol(), depth, p=0.2)
        r = self.rng.random()
        if r < 0.5:
            return self.scripted(self.symbol(), depth)
        if r < 0.6 - 0.05 * depth:
            return ["\\frac", "{", *self.expression(depth + 1, 2), "}", "{", *self.expression(depth + 1, 2), "}"]
        if r < 0.64:
            root = ["\\sqrt"]
            if self.rng.random() < 0.25:
                root += ["[", self.rng.choice(["3", "n", "4"]), "]"]
            return root + ["{", *self.expression(depth + 1, 2), "}"]
        if r < 0.72:
            left, right = self.rng.choice(self.s.brackets)
            inner = self.expression(depth + 1, 3)
            if self.rng.random() < 0.5:
                return self.scripted(["\\left" + left, *inner, "\\right" + right], depth + 1, p=0.25)
            return self.scripted([left, *inner, right], depth + 1, p=0.25)
        if r < 0.88 and not self.s.extras:
            return self.scripted(self.symbol(), depth)
        if r < 0.77 and depth == 0:
            return self.big_operator(depth)
        if r < 0.84:
            return self.scripted([self.rng.choice(ACCENTS), "{", *self.symbol(), "}"], depth + 1, p=0.2)
        if r < 0.88:  # math alphabets take Latin letters (\\mathcal only capitals, as in LaTeX's cmsy)
            font = self.rng.choice(FONTS)
            letters = LATIN[26:] if font == r"\mathcal" else LATIN
            return [font, "{", *(self.rng.choice(letters) for _ in range(self.rng.choice([1, 1, 2]))), "}"]
        if r < 0.95:
            return [self.rng.choice(self.s.functions), *self.scripted(self.symbol(), depth + 1, p=0.2)]
        return self.scripted(["(", *self.symbol(), ")"], depth)

    def big_operator(self, depth: int) -> list[str]:
        op = self.rng.choice(BIG_OPERATORS)
        out = [op]
        if op in (r"\sum", r"\prod"):
            i = self.rng.choice("ijkn")
            out += ["_", "{", i, "=", self.rng.choice(["0", "1"]), "}"]
            if self.rng.random() < 0.7:
                out += ["^", "{", self.rng.choice(["n", "N", r"\infty", "k"]), "}"]
        elif self.rng.random() < 0.7:
            out += ["_", "{", *self.symbol(), "}", "^", "{", *self.symbol(), "}"]
        out += self.expression(depth + 1, 2)
        if op in (r"\int", r"\oint"):
            out += ["d", self.rng.choice("xtsrz")]
        return out

    def expression(self, depth: int, max_terms: int | None = None) -> list[str]:
        n = self.rng.randint(1, max_terms or self.max_terms)
        out = self.term(depth)
        for _ in range(n - 1):
            if self.rng.random() < 0.45:
                out.append(self.rng.choice(self.s.binary))
            out += self.term(depth)
        return out

    def formula(self) -> str:
        """One formula: an expression, optionally related to another one, optionally ending in ``,`` or ``.``."""
        tokens = self.expression(0)
        if self.rng.random() < 0.55:
            tokens += [self.rng.choice(self.s.relations), *self.expression(0, 3)]
        if self.rng.random() < 0.15:
            tokens += [self.rng.choice([",", "."])]
        return " ".join(tokens)


def generate_math(rng: random.Random, max_depth: int = 2, max_terms: int = 5, symbols: str = "full") -> str:
    """One synthetic im2latex-style formula drawn with ``rng`` (``data.max_depth``, ``data.max_terms``,
    ``data.symbols``)."""
    return MathFormulaGenerator(rng, max_depth=max_depth, max_terms=max_terms, symbols=symbols).formula()
