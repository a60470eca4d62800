"""Molecules with RDKit: SMILES -> 2-D depiction (rdMolDraw2D, Cairo) in RDKit's standard atom colours.

Every molecule is drawn at ONE scale (``BOND_LENGTH_PX`` pixels per bond), so image size tracks molecule size as
it does on paper. RDKit shrinks a drawing that does not fit its canvas; that shrinking is detected from the drawn
bond lengths and rejected as ``overflow`` (never a silently smaller molecule). The drawing is cropped to its ink and
placed top-left on the RGB canvas like every other domain.

Layout boxes (the format: :mod:`markup2image.data.layouts`): one box per atom. The SMILES is split into tokens
(Schwaller et al.'s regex); RDKit numbers atoms in the order they appear, so atom ``i`` is the ``i``-th atom token.
Labelled atoms (heteroatoms, charged or isotopic ones) get the extent of their label, read from the ``atom-i`` paths
of an SVG drawing made with the same drawer settings (same coordinates as the Cairo drawing); every atom also gets a
square of half-side ``0.3 x bond length`` around ``MolDraw2D.GetDrawCoords(i)``. A SMILES whose atom tokens do not
match RDKit's atoms one to one (explicit ``[H]`` removed by sanitization) gets no layout.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from markup2image.config import DomainConfig
from markup2image.data.layouts import XYXY, LayoutBox, make_box, nonempty
from markup2image.data.renderers.base import (
    MARGIN,
    RenderError,
    SingleItemEngine,
    place_top_left,
    place_top_left_with_offset,
)

BOND_LENGTH_PX = 11.0  # drawn length of one bond: ~90% of MOSES molecules (~25 heavy atoms) fit 128x128
DEPICTION_BOND_ANGSTROM = 1.5  # RDKit lays bonds out 1.5 units long; fixedBondLength is pixels per unit
SLACK_PX = 16  # drawing canvas = target canvas + slack, so labels at the edge are not clipped before the ink check


class RdkitEngine(SingleItemEngine):
    """``engine: rdkit``."""

    name = "rdkit"

    def __init__(self) -> None:
        import cv2
        from rdkit import Chem, RDLogger
        from rdkit.Chem.Draw import rdMolDraw2D

        RDLogger.DisableLog("rdApp.*")  # parse errors come back as RenderError, not as stderr noise
        cv2.setNumThreads(1)
        self._chem, self._draw, self._cv2 = Chem, rdMolDraw2D, cv2

    def render(self, markup: str, cfg: DomainConfig) -> np.ndarray:
        """uint8 [H,W,3] (or [H,W] for channels=1) depiction of the SMILES ``markup``."""
        return place_top_left(self._depict(markup, cfg)[0], cfg)

    def render_with_layout(self, markup: str, cfg: DomainConfig) -> tuple[np.ndarray, list | None]:
        """:meth:`render` and one box per atom (:mod:`markup2image.data.layouts`): the atom's label extent (from an
        SVG drawing with the same settings) and a square around ``GetDrawCoords``, paired with its SMILES token."""

        rgb, drawer, mol = self._depict(markup, cfg)
        image, offset = place_top_left_with_offset(rgb, cfg)
        svg = self._draw.MolDraw2DSVG(cfg.width + SLACK_PX, cfg.height + SLACK_PX)
        self._options(svg)
        svg.DrawMolecule(mol)  # ``mol`` is already prepared (2-D coordinates, kekulized, wedges): drawn as is
        svg.FinishDrawing()
        centres = [(p.x, p.y) for p in map(drawer.GetDrawCoords, range(mol.GetNumAtoms()))]
        labels = svg_atom_label_extents(svg.GetDrawingText())
        size = (cfg.height, cfg.width)
        return image, molecule_boxes(markup.strip(), mol, centres, labels, BOND_LENGTH_PX, offset, size)

    @staticmethod
    def _options(drawer: object) -> None:
        options = drawer.drawOptions()  # type: ignore[attr-defined]
        options.fixedBondLength = BOND_LENGTH_PX / DEPICTION_BOND_ANGSTROM
        options.padding = 0.0
        options.prepareMolsBeforeDrawing = False  # _depict prepares once; the layout's SVG drawing reuses it

    def _depict(self, markup: str, cfg: DomainConfig) -> tuple[np.ndarray, object, object]:
        """The RGB drawing ``[H + slack, W + slack, 3]`` (before placement), its drawer and the prepared molecule
        (2-D coordinates computed once here, so the layout's second drawing lands on the same atom positions)."""
        smiles = markup.strip()
        if not smiles:
            raise RenderError("empty", "the SMILES is empty")
        if any(ch.isspace() for ch in smiles):
            raise RenderError("parse_error", "a SMILES has no spaces (a name or a reaction was given?)")
        mol = self._chem.MolFromSmiles(smiles)
        if mol is None:
            raise RenderError("parse_error", f"RDKit cannot parse or sanitize the SMILES {smiles[:80]!r}")
        if mol.GetNumAtoms() == 0:
            raise RenderError("empty", "the SMILES has no atoms")
        mol = self._draw.PrepareMolForDrawing(mol)
        drawer = self._draw.MolDraw2DCairo(cfg.width + SLACK_PX, cfg.height + SLACK_PX)
        self._options(drawer)
        drawer.DrawMolecule(mol)
        drawer.FinishDrawing()
        scale = self._drawn_bond_length(drawer, mol)
        if scale is not None and scale < 0.97 * BOND_LENGTH_PX:
            raise RenderError(
                "overflow",
                f"the molecule needs more than {cfg.height - MARGIN}x{cfg.width - MARGIN} px at "
                f"{BOND_LENGTH_PX:g} px per bond (RDKit shrank it to {scale:.1f} px per bond)",
            )
        png = np.frombuffer(drawer.GetDrawingText(), dtype=np.uint8)
        rgb = self._cv2.imdecode(png, self._cv2.IMREAD_COLOR)[..., ::-1]  # BGR -> RGB
        return np.ascontiguousarray(rgb), drawer, mol

    @staticmethod
    def _drawn_bond_length(drawer: object, mol: object) -> float | None:
        """Median drawn length of (up to 8 of) the molecule's bonds in pixels (None without bonds)."""
        lengths = []
        for bond in list(mol.GetBonds())[:8]:  # type: ignore[attr-defined]
            a = drawer.GetDrawCoords(bond.GetBeginAtomIdx())  # type: ignore[attr-defined]
            b = drawer.GetDrawCoords(bond.GetEndAtomIdx())  # type: ignore[attr-defined]
            lengths.append(math.hypot(a.x - b.x, a.y - b.y))
        return float(np.median(lengths)) if lengths else None


# ----------------------------------------------------------------------------------------------------------------
# layout boxes


ATOM_BOX_HALF_BONDS = 0.3  # half-side of the square around an atom centre, in bond lengths

# Schwaller et al.'s SMILES tokens; the first group is the atoms
_ATOMS = r"\[[^\]]+]|Br?|Cl?|N|O|S|P|F|I|b|c|n|o|s|p|\*"
_SMILES_TOKEN = re.compile(rf"({_ATOMS}|\(|\)|\.|=|#|-|\+|\\|/|:|~|@|\?|>|\$|%\d{{2}}|\d)")
_ATOM_TOKEN = re.compile(rf"^({_ATOMS})$")


def smiles_atom_chars(smiles: str, mol: Any) -> list[tuple[int, int]] | None:
    """Character range of each atom's token, indexed like ``mol``'s atoms; None where they do not pair up."""
    spans = [(m.start(), m.end()) for m in _SMILES_TOKEN.finditer(smiles) if _ATOM_TOKEN.match(m.group())]
    if len(spans) != mol.GetNumAtoms():
        return None
    for (c0, c1), atom in zip(spans, mol.GetAtoms(), strict=True):
        tok = smiles[c0:c1]
        bracket = re.match(r"\[\d*([A-Z][a-z]?|[a-z][a-z]?|\*)", tok)
        symbol = bracket.group(1) if bracket else tok
        if symbol.capitalize() != atom.GetSymbol():
            return None
    return spans


def svg_atom_label_extents(svg: str) -> dict[int, XYXY]:
    """Extent of each atom's label in an RDKit SVG (paths of class ``atom-i``; control points bound the curves)."""
    extents: dict[int, XYXY] = {}
    for m in re.finditer(r"<path class='atom-(\d+)' d='([^']*)'", svg):
        nums = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", m.group(2))]
        if len(nums) < 2:
            continue
        xs, ys = nums[0::2], nums[1::2]
        i = int(m.group(1))
        old = extents.get(i, (math.inf, math.inf, -math.inf, -math.inf))
        extents[i] = (min(old[0], *xs), min(old[1], *ys), max(old[2], *xs), max(old[3], *ys))
    return extents


def molecule_boxes(
    smiles: str,
    mol: Any,
    centres: Sequence[tuple[float, float]],
    labels: dict[int, XYXY],
    bond_px: float,
    offset: tuple[int, int],
    size: tuple[int, int],
) -> list[LayoutBox] | None:
    """One box per atom (drawing coordinates -> placed image); None when atoms and SMILES tokens do not pair up."""
    spans = smiles_atom_chars(smiles, mol)
    if spans is None:
        return None
    half = ATOM_BOX_HALF_BONDS * bond_px
    boxes = []
    for i, ((cx, cy), (c0, c1)) in enumerate(zip(centres, spans, strict=True)):
        x0, y0, x1, y1 = cx - half, cy - half, cx + half, cy + half
        if i in labels:
            lx0, ly0, lx1, ly1 = labels[i]
            x0, y0, x1, y1 = min(x0, lx0), min(y0, ly0), max(x1, lx1), max(y1, ly1)
        boxes.append(make_box(smiles, (x0, y0, x1, y1), c0, c1, offset=offset, size=size))
    return nonempty(boxes)
