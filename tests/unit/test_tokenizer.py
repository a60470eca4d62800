"""BPE tokenizer: trained on train markup, pads with [PAD]=0, masks padding, never yields an empty mask."""

import json

import numpy as np
import pytest

from markup2image.config import TokenizeConfig
from markup2image.text.tokenizer import (
    BOS,
    EOS,
    PAD,
    encode_batch,
    load_tokenizer,
    pad_id,
    tokenize_corpus,
    train_bpe,
)

CORPUS = [r"\frac { a } { b }", r"x ^ { 2 } + y ^ { 2 }", r"\sqrt { x + 1 }", r"\alpha _ { i } \beta"] * 5


def test_train_bpe_special_tokens_and_round_trip():
    tok = train_bpe(CORPUS, vocab_size=200, min_frequency=1)
    assert tok.token_to_id(PAD) == 0 and pad_id(tok) == 0
    enc = tok.encode(r"\frac { a } { b }")
    assert enc.tokens[0] == BOS and enc.tokens[-1] == EOS
    assert "[UNK]" not in enc.tokens  # every token seen in training
    assert "\\frac" in tok.decode(enc.ids)


def test_encode_batch_pads_masks_and_truncates():
    tok = train_bpe(CORPUS, vocab_size=200, min_frequency=1)
    ids, mask = encode_batch(tok, [r"\alpha", r"x ^ { 2 } + y ^ { 2 }", ""], max_length=6)
    assert ids.shape == mask.shape == (3, 6)
    assert mask[0].sum() == 3  # [BOS] \alpha [EOS]
    assert (ids[0, 3:] == 0).all() and (mask[0, 3:] == 0).all()
    assert mask[1].all()  # truncated to 6
    assert mask[2].sum() == 2  # empty markup still has [BOS] [EOS]: never an all-masked row
    assert ids.dtype == np.int64


def test_tokenize_corpus_writes_ids_for_every_split(tmp_path):
    rendered = tmp_path / "rendered"
    rendered.mkdir()
    for split, rows in {"train": CORPUS[:8], "val": CORPUS[:2], "test": CORPUS[2:4]}.items():
        (rendered / f"{split}.jsonl").write_text(
            "".join(
                json.dumps({"id": f"{split}{i}", "markup": m, "image": "x.png"}) + "\n" for i, m in enumerate(rows)
            )
        )
    report = tokenize_corpus(TokenizeConfig(vocab_size=100, min_frequency=1, max_length=0), rendered, tmp_path / "tok")
    assert report["counts"] == {"train": 8, "val": 2, "test": 2}
    tok = load_tokenizer(tmp_path / "tok")
    rows = [json.loads(line) for line in (tmp_path / "tok" / "test.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["test0", "test1"]
    assert rows[0]["ids"] == tok.encode(CORPUS[2]).ids


def test_word_tokenizer_gives_one_id_per_markup_token():
    from markup2image.text.tokenizer import train_tokenizer

    tok = train_tokenizer("word", CORPUS, vocab_size=100, min_frequency=1)
    enc = tok.encode(r"\frac { a } { b }")
    assert enc.tokens == [BOS, "\\frac", "{", "a", "}", "{", "b", "}", EOS]
    assert tok.encode(r"\gamma").tokens[1] == "[UNK]"  # a token never seen in training


def test_char_tokenizer_splits_every_character_and_knows_unseen_words():
    from markup2image.text.tokenizer import train_tokenizer

    tok = train_tokenizer("char", CORPUS, vocab_size=100, min_frequency=5)  # chars ignore min_frequency
    enc = tok.encode(r"\beta _ { q }")
    assert enc.tokens == [BOS, "\\", "b", "e", "t", "a", "_", "{", "q", "}", EOS]
    assert "[UNK]" not in enc.tokens  # 'q' appears in \sqrt
    assert "[UNK]" not in tok.encode(r"\arc").tokens  # a new command, old letters
    assert tok.encode("n").tokens[1] == "[UNK]"  # a character never seen


def test_tokenize_corpus_records_the_kind(tmp_path):
    from markup2image.io import write_jsonl

    rendered = tmp_path / "r"
    for split in ("train", "val", "test"):
        write_jsonl(rendered / f"{split}.jsonl", [{"id": f"{split}{i}", "markup": m} for i, m in enumerate(CORPUS)])
    report = tokenize_corpus(TokenizeConfig("char", 100, 1, max_length=0), rendered, tmp_path / "tok")
    assert report["kind"] == "char"
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.encode("ab").tokens == [BOS, "a", "b", EOS]


def test_tokenize_corpus_cuts_at_max_length_and_reports_the_rate(tmp_path, caplog):
    from markup2image.io import write_jsonl

    rendered = tmp_path / "r"
    for split in ("train", "val", "test"):
        write_jsonl(rendered / f"{split}.jsonl", [{"id": f"{split}{i}", "markup": m} for i, m in enumerate(CORPUS)])
    full = tokenize_corpus(TokenizeConfig("char", 100, 1, max_length=0), rendered, tmp_path / "full")
    lengths = [len(load_tokenizer(tmp_path / "full").encode(m).ids) for m in CORPUS]
    cut = sorted(lengths)[len(lengths) // 2]  # about half the items are longer
    with caplog.at_level("WARNING"):
        report = tokenize_corpus(TokenizeConfig("char", 100, 1, max_length=cut), rendered, tmp_path / "cut")
    longer = sum(n > cut for n in lengths)
    assert 0 < longer < len(CORPUS)
    assert report["truncated"] == {"train": longer, "val": longer, "test": longer}
    assert report["truncation_rate"]["test"] == pytest.approx(longer / len(CORPUS))
    assert full["truncated"] == {"train": 0, "val": 0, "test": 0}
    rows = [json.loads(line) for line in (tmp_path / "cut" / "test.jsonl").read_text().splitlines()]
    assert max(len(r["ids"]) for r in rows) == cut
    assert "longer than tokenize.max_length" in caplog.text
