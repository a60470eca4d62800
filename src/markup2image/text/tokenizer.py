"""Markup tokenizers trained on the train split with HF ``tokenizers`` (``tokenize.kind``), or a pretrained one.

* ``bpe``: BPE over whitespace-split words, merging within them (useful for SMILES and HTML, which are not
  pre-split);
* ``word``: one id per whitespace token: im2latex's own vocabulary (``\\frac``, ``{``, ``x``), one id per glyph;
* ``char``: one id per character; never out of vocabulary on ASCII markup, and what generalises over glyphs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from markup2image.io import CorruptFileError, atomic_open, read_jsonl, write_json, write_jsonl
from markup2image.modes import TOKENIZER_KINDS

if TYPE_CHECKING:
    from markup2image.config import TokenizeConfig

log = logging.getLogger(__name__)

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS]
TOKENIZER_FILE = "tokenizer.json"


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a BPE over whitespace-split markup; ``[PAD]`` gets id 0."""
    return train_tokenizer("bpe", texts, vocab_size, min_frequency)


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a ``kind`` tokenizer (``bpe``, ``word`` or ``char``) on ``texts``; ``[PAD]`` gets id 0.

    ``vocab_size`` caps every kind; ``min_frequency`` applies to ``bpe`` merges and ``word`` entries (a ``char``
    vocabulary keeps every character seen once, so hand-written markup meets few unknowns)."""
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.decoder = decoders.BPEDecoder()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS, show_progress=False
        )
    elif kind in ("word", "char"):
        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        split = [pre_tokenizers.WhitespaceSplit()]
        if kind == "char":
            split.append(pre_tokenizers.Split(Regex("."), behavior="isolated"))
        tok.pre_tokenizer = pre_tokenizers.Sequence(split)
        tok.decoder = decoders.WordPiece(prefix="", cleanup=False)  # joins with spaces
        trainer = trainers.WordLevelTrainer(
            vocab_size=vocab_size,
            min_frequency=1 if kind == "char" else min_frequency,
            special_tokens=SPECIAL_TOKENS,
            show_progress=False,
        )
    else:
        raise ValueError(f"tokenize.kind: {kind!r} is not one of {list(TOKENIZER_KINDS)}")
    tok.train_from_iterator(list(texts), trainer=trainer)
    # [BOS] ... [EOS] around every item: the attention mask is never empty, even for empty markup.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))]
    )
    return tok


def load_tokenizer(path_or_id: str | Path) -> Tokenizer:
    """Load ``tokenizer.json`` from a folder or file, or a pretrained tokenizer by hub id / local folder."""
    p = Path(path_or_id)
    if p.is_dir() and (p / TOKENIZER_FILE).exists():
        p = p / TOKENIZER_FILE
    if p.is_file():
        try:
            return Tokenizer.from_file(str(p))
        except Exception as exc:  # noqa: BLE001 - the Rust side raises a bare Exception
            raise CorruptFileError(
                f"{p}: not a valid tokenizer.json ({exc}); rerun the tokenize stage, or copy the folder again"
            ) from exc
    try:
        return Tokenizer.from_pretrained(str(path_or_id))
    except Exception as exc:  # noqa: BLE001 - the hub client raises many kinds
        raise FileNotFoundError(
            f"tokenizer {path_or_id!r}: not a tokenizer.json, a folder holding one, or a reachable hub id ({exc}); "
            "run the tokenize stage or set tokenize.pretrained to a local folder"
        ) from exc


def pad_id(tok: Tokenizer) -> int:
    pid = tok.token_to_id(PAD)
    return 0 if pid is None else pid


def encode_batch(tok: Tokenizer, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Encode markup to ``input_ids [B, N]`` and ``attention_mask [B, N]`` (int64), padded to the longest item.

    Items longer than ``max_length`` are truncated to their first ``max_length`` tokens; that, markup pieces the
    tokenizer does not know (``[UNK]``) and empty markup are each logged once per call with the items concerned.
    """
    encs = tok.encode_batch(list(texts))
    ids = [e.ids[:max_length] for e in encs]
    report_encoding_issues(tok, texts, encs, max_length)
    n = max(1, max(len(x) for x in ids))
    out = np.full((len(ids), n), pad_id(tok), dtype=np.int64)
    mask = np.zeros((len(ids), n), dtype=np.int64)
    for i, row in enumerate(ids):
        out[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return out, mask


def report_encoding_issues(tok: Tokenizer, texts: Sequence[str], encs: Sequence[Any], max_length: int) -> None:
    """One warning line per kind of issue: truncation (tokens before -> kept), unknown pieces, empty markup."""
    cut = [(i, len(e.ids), len(texts[i])) for i, e in enumerate(encs) if len(e.ids) > max_length]
    if cut:
        few = "; ".join(f"item {i}: {n} tokens ({c} characters)" for i, n, c in cut[:3]) + ("; ..." * (len(cut) > 3))
        log.warning(
            "%d markup item(s) longer than the model's %d text positions; each keeps its first %d tokens (%s)",
            len(cut), max_length, max_length, few,
        )  # fmt: skip
    unk = tok.token_to_id(UNK)
    unknown = []
    for i, e in enumerate(encs):
        pieces = [texts[i][a:b] for t, (a, b) in zip(e.ids, e.offsets, strict=True) if t == unk]
        if pieces:
            unknown.append(f"item {i}: {', '.join(repr(p) for p in pieces[:4])}" + (" ..." if len(pieces) > 4 else ""))
    if unknown:
        log.warning(
            "%d markup item(s) hold pieces the tokenizer never saw in training, read as %s (%s)",
            len(unknown), UNK, "; ".join(unknown[:3]) + ("; ..." if len(unknown) > 3 else ""),
        )  # fmt: skip
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        log.warning("%d empty markup item(s) (items %s): drawn from no markup at all", len(empty), empty[:5])


def empty_markup_like(tok: Tokenizer, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The empty markup (``[BOS] [EOS]``) as ids and mask shaped like ``input_ids [B, N]``: what a model trained
    with ``train.cond_dropout`` saw in place of the markup (classifier-free guidance's unconditional input)."""
    null = tok.encode("").ids[: input_ids.shape[1]]
    ids = np.full(input_ids.shape, pad_id(tok), dtype=np.int64)
    mask = np.zeros(input_ids.shape, dtype=np.int64)
    ids[:, : len(null)] = null
    mask[:, : len(null)] = 1
    return ids, mask


def tokenize_corpus(cfg: TokenizeConfig, rendered_dir: str | Path, out_dir: str | Path) -> dict:
    """The tokenize stage: train a ``cfg.kind`` tokenizer on the rendered train split (or load ``cfg.pretrained``),
    write ids for all splits, each cut to ``cfg.max_length`` tokens (0: no cut) as SS-DM cuts at
    ``max_input_length``.

    Writes ``out_dir/tokenizer.json`` and ``out_dir/<split>.jsonl`` rows ``{"id", "ids"}``. Returns counts, the
    vocabulary size and, per split, how many items were truncated (``truncated``, ``truncation_rate``).
    """

    rendered_dir, out_dir = Path(rendered_dir), Path(out_dir)
    pretrained, max_length = cfg.pretrained, cfg.max_length
    splits = {s: read_jsonl(rendered_dir / f"{s}.jsonl") for s in ("train", "val", "test")}
    if pretrained:
        tok = load_tokenizer(pretrained)
    else:
        if not splits["train"]:
            raise ValueError(f"{rendered_dir}/train.jsonl: no rendered training markup to train the tokenizer on")
        tok = train_tokenizer(cfg.kind, (r["markup"] for r in splits["train"]), cfg.vocab_size, cfg.min_frequency)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_open(out_dir / TOKENIZER_FILE) as fh:
        fh.write(tok.to_str())
    counts, truncated, lengths = {}, {}, []
    cut = max_length if max_length > 0 else None
    for split, rows in splits.items():
        encs = tok.encode_batch([r["markup"] for r in rows]) if rows else []
        lengths += [len(e.ids) for e in encs]
        truncated[split] = sum(cut is not None and len(e.ids) > cut for e in encs)
        counts[split] = write_jsonl(
            out_dir / f"{split}.jsonl", ({"id": r["id"], "ids": e.ids[:cut]} for r, e in zip(rows, encs))
        )
        if truncated[split]:
            log.warning(
                "tokenize %s: %d of %d markup items are longer than tokenize.max_length=%d tokens and were cut "
                "(longest %d); raise tokenize.max_length and model.max_text_length to keep them whole",
                split, truncated[split], len(encs), max_length, max(len(e.ids) for e in encs),
            )  # fmt: skip
    lengths = lengths or [0]
    report = {
        "kind": "pretrained" if pretrained else cfg.kind,
        "vocab_size": tok.get_vocab_size(),
        "counts": counts,
        "max_tokens": max(lengths),
        "mean_tokens": float(np.mean(lengths)),
        "unk_id": tok.token_to_id(UNK),
        "max_length": max_length,
        "truncated": truncated,
        "truncation_rate": {s: (truncated[s] / counts[s] if counts[s] else 0.0) for s in counts},
    }
    write_json(out_dir / "tokenize_report.json", report)
    return report
