"""Molecules with RDKit: SMILES -> 2-D depiction (rdMolDraw2D, Cairo) in RDKit's standard atom colours.

Every molecule is drawn at ONE scale (``BOND_LENGTH_PX`` pixels per bond), so image size tracks molecule size as
it does on paper. RDKit shrinks a drawing that does not fit its canvas; that shrinking is detected from the drawn
bond lengths and rejected as ``overflow`` (never a silently smaller molecule). The drawing is cropped to its ink and
placed top-left on the RGB canvas like every other domain.
"""

from __future__ import annotations

import math

import numpy as np

from markup2image.config import DomainConfig
from markup2image.data.layouts import molecule_boxes, svg_atom_label_extents
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
