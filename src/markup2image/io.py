"""Atomic file writes and JSONL helpers shared by every stage.

A killed stage must never leave a half-written file that a rerun would trust, so everything is written to a
temporary file in the same folder and renamed into place.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

# An item id names its files (images/<id>.png): letters, digits, '.', '_', '-', not starting with '.'.
SAFE_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")


def is_safe_id(item_id: object) -> bool:
    """True when ``item_id`` is a string that can name a file in an output folder and nothing outside it."""
    return isinstance(item_id, str) and SAFE_ID.fullmatch(item_id) is not None


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temp file beside ``path``; on success fsync and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj: Any, indent: int = 2) -> None:
    with atomic_open(path) as fh:
        json.dump(obj, fh, indent=indent, sort_keys=False)
        fh.write("\n")


def read_json(path: str | Path, fix: str = "") -> Any:
    """The JSON in ``path``; with ``fix``, a file that is not JSON raises :class:`CorruptFileError` naming the file
    and ``fix`` (what the user should do)."""
    with open(path) as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as exc:
            if not fix:
                raise
            raise CorruptFileError(f"{path}: not JSON ({exc}); {fix}") from exc


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    n = 0
    with atomic_open(path) as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    with open(path) as fh:
        for i, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i}: not valid JSON ({exc.msg}); fix or delete that line") from exc
    return rows


def save_png(path: str | Path, image: np.ndarray) -> None:
    """Save an 8-bit image ``[H, W]`` or ``[H, W, 3]`` atomically as PNG."""
    from PIL import Image

    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"{path}: expected uint8 image, got {arr.dtype}")
    with atomic_open(path, "wb") as fh:
        Image.fromarray(arr).save(fh, format="PNG")


class CorruptFileError(ValueError):
    """A file a stage needs cannot be read; the message names the file (and, where the caller knows it, the fix)."""


_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def png_complete(path: str | Path) -> bool:
    """True when ``path`` ends with a PNG's IEND chunk (a write cut short by a kill does not), whatever PIL's
    ``LOAD_TRUNCATED_IMAGES`` says elsewhere in the process. Reads 12 bytes."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(os.path.getsize(path) - 12, 0))
            return fh.read() == _PNG_END
    except OSError:
        return False


def load_image(path: str | Path, channels: int = 1) -> np.ndarray:
    """Load an image as uint8 ``[H, W]`` (channels=1) or ``[H, W, 3]``.

    16-bit images are scaled to 8 bits (PIL's own conversion clips them: mid-gray became white); transparent
    pixels are composited on white (PIL's drops alpha: a transparent background became black). Raises
    :class:`CorruptFileError` naming the file when it is missing, truncated or not an image."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            if im.format == "PNG" and not png_complete(path):
                raise CorruptFileError(f"{path}: truncated PNG (no IEND chunk at its end)")
            im.load()
            return _to_uint8(im, channels)
    except CorruptFileError:
        raise
    except FileNotFoundError as exc:
        raise CorruptFileError(f"{path}: no such image file") from exc
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise CorruptFileError(f"{path}: cannot be read as an image ({type(exc).__name__}: {exc})") from exc


def _to_uint8(im: Any, channels: int) -> np.ndarray:
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode != "F" else max(float(arr.max()), 1.0)
        gray = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return gray if channels == 1 else np.repeat(gray[..., None], 3, axis=-1)
    if "A" in im.getbands() or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8).copy()
