"""BPE tokenizer: trained on train markup, pads with [PAD]=0, masks padding, never yields an empty mask."""

import json

import numpy as np

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
    report = tokenize_corpus(rendered, tmp_path / "tok", vocab_size=100, min_frequency=1)
    assert report["counts"] == {"train": 8, "val": 2, "test": 2}
    tok = load_tokenizer(tmp_path / "tok")
    rows = [json.loads(line) for line in (tmp_path / "tok" / "test.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["test0", "test1"]
    assert rows[0]["ids"] == tok.encode(CORPUS[2]).ids
