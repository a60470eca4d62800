"""Seeded synthetic markup corpora, one generator per domain.

``synthetic_splits(domain, seed, sizes)`` is the one entry point the download stage uses. Ids are stable: they are a
short hash of (domain, markup), so the same markup always gets the same id and the same seed always gives the same
corpus. Splits are disjoint in markup (duplicates are drawn again) and each split has its own random stream, drawn
test first, so changing ``train_size`` does not change the test set.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable

from markup2image.data.generators.math import generate_math

Generator = Callable[[random.Random], str]

GENERATORS: dict[str, Generator] = {"math": generate_math}

SPLITS: tuple[str, ...] = ("train", "val", "test")

# Give up on a domain whose grammar cannot produce enough distinct items (e.g. a tiny file-backed pool).
_MAX_DRAWS_PER_ITEM = 50


def markup_id(domain: str, markup: str) -> str:
    """Stable 10-hex id of one markup string (im2latex-like length)."""
    return hashlib.sha1(f"{domain}\0{markup}".encode()).hexdigest()[:10]


def get_generator(domain: str) -> Generator:
    _register_optional()
    if domain not in GENERATORS:
        raise ValueError(f"domain {domain!r}: no synthetic generator; known: {sorted(GENERATORS)}")
    return GENERATORS[domain]


def _register_optional() -> None:
    """Import the other domains' generators lazily (they may need heavier packages)."""
    if len(GENERATORS) > 1:
        return
    from markup2image.data.generators.music import generate_music
    from markup2image.data.generators.tables import generate_table

    GENERATORS.update({"tables": generate_table, "music": generate_music})
    try:
        from markup2image.data.generators.molecules import generate_molecule
    except ImportError:  # molecules not there yet
        return
    GENERATORS["molecules"] = generate_molecule


def _split_rng(domain: str, seed: int, split: str) -> random.Random:
    digest = hashlib.sha256(f"{domain}/{seed}/{split}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


# Domains whose grammar takes the difficulty keys data.max_depth / data.max_terms.
GRAMMAR_KEYS: frozenset[str] = frozenset({"math"})


def synthetic_splits(
    domain: str, seed: int, sizes: dict[str, int], grammar: dict[str, int | str] | None = None
) -> dict[str, list[dict[str, str]]]:
    """Generate ``{split: [{"id", "markup"}, ...]}`` with ``sizes[split]`` distinct items per split.

    ``grammar``: difficulty keywords (``max_depth``, ``max_terms``, ``symbols``) for the domains in
    :data:`GRAMMAR_KEYS`; the other generators have a fixed grammar and ignore them."""
    base = get_generator(domain)
    kwargs = dict(grammar or {}) if domain in GRAMMAR_KEYS else {}

    def generate(rng: random.Random) -> str:
        return base(rng, **kwargs)

    seen: set[str] = set()
    ids: set[str] = set()
    out: dict[str, list[dict[str, str]]] = {}
    for split in ("test", "val", "train"):  # test first: its content must not depend on train_size
        rng = _split_rng(domain, seed, split)
        rows: list[dict[str, str]] = []
        n = sizes.get(split, 0)
        draws = 0
        while len(rows) < n:
            draws += 1
            if draws > _MAX_DRAWS_PER_ITEM * max(n, 1):
                raise RuntimeError(
                    f"domain {domain!r}: the generator gave only {len(rows)} distinct items for split {split!r} "
                    f"after {draws} draws; ask for fewer items (data.{split}_size)"
                )
            markup = generate(rng)
            item_id = markup_id(domain, markup)
            if markup in seen or item_id in ids:  # a duplicate (or, rarely, a 40-bit id collision): draw again
                continue
            seen.add(markup)
            ids.add(item_id)
            rows.append({"id": item_id, "markup": markup})
        out[split] = rows
    return {split: out[split] for split in SPLITS}
