"""Corrupt and odd files: one clear line naming the file and what to do, never a traceback, never a silently
wrong result (issue "nothing lost, nothing let in", item 3), and clear handling of long, unknown and empty markup
when sampling (item 5)."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import TINY_MODEL

from markup2image.cli import main
from markup2image.config import DomainConfig
from markup2image.data.dataset import MarkupImageDataset
from markup2image.io import CorruptFileError, load_image, save_png
from markup2image.models.model import MODEL_WEIGHTS, MarkupToImageModel, load_model
from markup2image.text.tokenizer import TOKENIZER_FILE, encode_batch, train_tokenizer
from markup2image.training.synthetic import write_synthetic_training_set

IMAGE = DomainConfig(height=16, width=32, channels=1, engine="mathtext")


def _gold(tmp_path: Path) -> np.ndarray:
    g = np.full((16, 32), 255, np.uint8)
    g[4:12, 4:20] = 40
    return g


def test_16_bit_and_transparent_pngs_load_as_what_they_show(tmp_path: Path) -> None:
    gold = _gold(tmp_path)
    Image.fromarray(gold.astype(np.uint16) * 257).save(tmp_path / "g16.png")  # 16-bit gray
    rgba = np.zeros((16, 32, 4), np.uint8)
    rgba[..., 3] = np.where(gold < 255, 255, 0)  # ink opaque, background transparent
    rgba[..., :3] = 40
    Image.fromarray(rgba, "RGBA").save(tmp_path / "ga.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    np.testing.assert_array_equal(load_image(tmp_path / "g16.png"), gold)  # PIL alone clips 40*257 to 255
    np.testing.assert_array_equal(load_image(tmp_path / "ga.png"), gold)  # PIL alone turns the background black
    assert load_image(tmp_path / "ga.png", channels=3).shape == (16, 32, 3)


def test_truncated_missing_and_foreign_files_name_themselves(tmp_path: Path) -> None:
    save_png(tmp_path / "ok.png", _gold(tmp_path))
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("not an image")
    for name, says in (("cut.png", "truncated PNG"), ("text.png", "cannot be read"), ("gone.png", "no such image")):
        with pytest.raises(CorruptFileError, match=says) as info:
            load_image(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)


def test_training_names_a_truncated_image_before_it_starts(tmp_path: Path) -> None:
    rendered, tokenized = tmp_path / "rendered", tmp_path / "tokenized"
    write_synthetic_training_set(rendered, tokenized, IMAGE)
    victim = sorted((rendered / "images").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:40])
    with pytest.raises(CorruptFileError, match=r"1 image\(s\) listed in .* missing or truncated .*dvc repro"):
        MarkupImageDataset(rendered, tokenized, "train", channels=1)


def _tiny_model(folder: Path) -> None:
    tok = train_tokenizer("char", ["x + y", "a ^ { 2 }"] * 3, vocab_size=40)
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY_MODEL, block_out_channels=(8, 16), cross_attention_levels=(False, True))
    MarkupToImageModel(model_cfg=cfg, image=IMAGE, vocab_size=tok.get_vocab_size()).save(
        folder, extra={"domain": "math"}
    )
    (folder / TOKENIZER_FILE).write_text(tok.to_str())


def _cli_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(args)
    message = str(info.value.code)
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in capsys.readouterr().err
    return message


def test_corrupt_model_files_give_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good"
    _tiny_model(good)
    load_model(good)
    for case in ("weights", "tokenizer", "missing"):
        bad = tmp_path / case
        shutil.copytree(good, bad)
        if case == "weights":
            (bad / MODEL_WEIGHTS).write_bytes((good / MODEL_WEIGHTS).read_bytes()[:500])
        elif case == "tokenizer":
            (bad / TOKENIZER_FILE).write_text("{not json")
        else:
            (bad / MODEL_WEIGHTS).unlink()
        msg = _cli_error(["sample", "--model", str(bad), "--markup", "x", "--out", str(tmp_path / "a.png")], capsys)
        assert str(bad) in msg
        assert {"weights": "cannot be loaded", "tokenizer": "not a valid tokenizer.json", "missing": "missing"}[
            case
        ] in msg


def test_score_with_nothing_scoreable_says_why_in_one_line(tmp_path: Path, capsys) -> None:
    gold, small, cut, empty = (tmp_path / n for n in ("gold", "small", "cut", "empty"))
    for d in (gold, small, cut, empty):
        d.mkdir()
    save_png(gold / "a.png", _gold(tmp_path))
    save_png(small / "a.png", _gold(tmp_path)[:8, :16])
    (cut / "a.png").write_bytes((gold / "a.png").read_bytes()[:30])
    assert "1 with different sizes" in _cli_error(["score", "--pred", str(small), "--gold", str(gold)], capsys)
    assert "1 with an unreadable file" in _cli_error(["score", "--pred", str(cut), "--gold", str(gold)], capsys)
    assert "no same-named images" in _cli_error(["score", "--pred", str(empty), "--gold", str(gold)], capsys)


def test_long_unknown_and_empty_markup_are_reported(caplog: pytest.LogCaptureFixture) -> None:
    tok = train_tokenizer("word", ["x + y", "a ^ { 2 }"] * 3, vocab_size=40)
    long = "x + " * 2500  # 10,000 characters
    with caplog.at_level(logging.WARNING):
        ids, mask = encode_batch(tok, [long, "\\foo + x", ""], max_length=64)
    assert ids.shape == (3, 64) and mask[0].sum() == 64
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "item 0: 5002 tokens (10000 characters)" in text and "first 64 tokens" in text
    assert "'\\\\foo'" in text and "[UNK]" in text
    assert "empty markup item(s) (items [2])" in text
