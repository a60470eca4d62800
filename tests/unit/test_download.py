"""The download stage: synthetic, file and hub sources; hub gold images kept through the render stage."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from markup2image.config import ConfigError, DataConfig, Params, RenderConfig
from markup2image.data.download import download_corpus
from markup2image.data.render import render_corpus
from markup2image.io import load_image, read_jsonl, write_jsonl


def data_params(**data: object) -> Params:
    base = DataConfig(train_size=6, val_size=2, test_size=2)
    return Params(data=dataclasses.replace(base, **data), render=RenderConfig(workers=1, timeout=30, batch_size=8))


@pytest.mark.parametrize("domain", ["math", "tables", "music", "molecules"])
def test_synthetic_download_writes_three_splits(tmp_path: Path, domain: str) -> None:
    counts = download_corpus(data_params(), domain, tmp_path)
    assert {s: counts[s] for s in ("train", "val", "test")} == {"train": 6, "val": 2, "test": 2}
    rows = {s: read_jsonl(tmp_path / f"{s}.jsonl") for s in ("train", "val", "test")}
    assert all(set(r) == {"id", "markup"} for split in rows.values() for r in split)
    ids = [r["id"] for split in rows.values() for r in split]
    assert len(set(ids)) == 10
    again = tmp_path / "again"
    download_corpus(data_params(), domain, again)
    assert (again / "test.jsonl").read_text() == (tmp_path / "test.jsonl").read_text()


def test_file_source_jsonl_with_splits(tmp_path: Path) -> None:
    src = tmp_path / "mine.jsonl"
    write_jsonl(src, [
        {"id": "a", "formula": "x + 1", "split": "train"},
        {"id": "b", "formula": "y", "split": "validation"},
        {"id": "c", "formula": "z", "split": "test"},
        {"id": "a", "formula": "again", "split": "test"},  # repeated id: dropped
    ])  # fmt: skip
    download_corpus(data_params(source="file", files={"math": str(src)}), "math", tmp_path / "out")
    assert read_jsonl(tmp_path / "out" / "train.jsonl") == [{"id": "a", "markup": "x + 1"}]
    assert read_jsonl(tmp_path / "out" / "val.jsonl") == [{"id": "b", "markup": "y"}]
    assert read_jsonl(tmp_path / "out" / "test.jsonl") == [{"id": "c", "markup": "z"}]


def test_file_source_csv_without_splits_is_cut_by_seed(tmp_path: Path) -> None:
    src = tmp_path / "mine.csv"
    with src.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["smiles"])
        writer.writerows([[s] for s in ["C", "CC", "CCC", "CCO", "c1ccccc1", "CN", "CCN", "O=C=O", "N#N", "CCCl"]])
    params = data_params(source="file", files={"molecules": str(src)}, train_size=-1, val_size=2, test_size=3)
    counts = download_corpus(params, "molecules", tmp_path / "out")
    assert (counts["train"], counts["val"], counts["test"]) == (5, 2, 3)
    markups = [r["markup"] for s in ("train", "val", "test") for r in read_jsonl(tmp_path / "out" / f"{s}.jsonl")]
    assert sorted(markups) == sorted(["C", "CC", "CCC", "CCO", "c1ccccc1", "CN", "CCN", "O=C=O", "N#N", "CCCl"])


def test_file_source_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.files.math"):
        download_corpus(data_params(source="file"), "math", tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        download_corpus(data_params(source="file", files={"math": str(tmp_path / "nope.jsonl")}), "math", tmp_path)


def make_hub_fixture(root: Path) -> dict[str, list[np.ndarray]]:
    """A local copy of the im2latex-100k schema: {train,val,test}.parquet with formula, filename, image."""
    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage

    images: dict[str, list[np.ndarray]] = {}
    for split, n in (("train", 3), ("val", 2), ("test", 2)):
        arrays = []
        for i in range(n):
            a = np.full((64, 320), 255, np.uint8)
            a[4 : 10 + i, 4 : 30 + 5 * i] = 0
            arrays.append(a)
        if split == "test":  # one gold of another size: placed top-left by the render stage
            arrays[1] = np.full((40, 100), 255, np.uint8)
            arrays[1][10:20, 30:60] = 0
        images[split] = arrays
        table = Dataset.from_dict(
            {
                "formula": [f"x _ {{ {i} }} {split}" for i in range(n)],
                "filename": [f"{split}{i:02d}.png" for i in range(n)],
                "image": [PILImage.fromarray(a) for a in arrays],
            },
            features=Features({"formula": Value("string"), "filename": Value("string"), "image": Image()}),
        )
        table.to_parquet(str(root / f"{split}.parquet"))
    return images


def test_hub_source_keeps_gold_images_through_render(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    hub.mkdir()
    images = make_hub_fixture(hub)
    params = data_params(source="hub", hub_ids={"math": str(hub)}, train_size=-1, val_size=-1, test_size=-1)
    counts = download_corpus(params, "math", tmp_path / "raw")
    assert (counts["train"], counts["val"], counts["test"], counts["gold"]) == (3, 2, 2, 7)
    assert read_jsonl(tmp_path / "raw" / "val.jsonl")[1] == {"id": "val01", "markup": "x _ { 1 } val"}
    assert np.array_equal(load_image(tmp_path / "raw" / "gold" / "train02.png"), images["train"][2])

    report = render_corpus(params, "math", tmp_path / "raw", tmp_path / "rendered", progress=False)
    assert report["gold"] == report["rendered"] == report["total"] == 7
    assert np.array_equal(load_image(tmp_path / "rendered" / "images" / "train01.png"), images["train"][1])
    moved = load_image(tmp_path / "rendered" / "images" / "test01.png")
    assert moved.shape == (64, 320)
    assert (moved[4:14, 4:34] == 0).all() and (moved[14:, :] == 255).all()  # cropped to ink, placed at (4, 4)
    rows = [json.loads(line) for line in (tmp_path / "rendered" / "test.jsonl").read_text().splitlines()]
    assert [r["image"] for r in rows] == ["images/test00.png", "images/test01.png"]


def test_hub_sizes_take_the_first_rows(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    hub.mkdir()
    make_hub_fixture(hub)
    params = data_params(source="hub", hub_ids={"math": str(hub)}, train_size=2, val_size=0, test_size=1)
    counts = download_corpus(params, "math", tmp_path / "raw")
    assert (counts["train"], counts["val"], counts["test"], counts["gold"]) == (2, 0, 1, 3)
    assert [r["id"] for r in read_jsonl(tmp_path / "raw" / "train.jsonl")] == ["train00", "train01"]


def test_unreachable_hub_id_is_one_clear_error(tmp_path: Path) -> None:
    params = data_params(source="hub", hub_ids={"math": str(tmp_path / "no-such-dataset")})
    with pytest.raises(RuntimeError, match="data.hub_ids.math"):
        download_corpus(params, "math", tmp_path / "raw")
