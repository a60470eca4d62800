"""HCMA: segment -> token mapping, losses on hand-computed tensors, guidance lowers the loss, clean off switch,
persistence, grounded sampling entry point, layout metric."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from markup2image.config import DiffusionConfig, DomainConfig, HcmaConfig, ModelConfig
from markup2image.data.layout_tensors import LayoutBatch, layout_batch
from markup2image.diffusion.guidance import (
    alignment_energy,
    alignment_guidance,
    guided_sample_images,
    sample_with_layout,
)
from markup2image.diffusion.losses import global_alignment_loss, local_alignment_loss
from markup2image.diffusion.sampling import sample_images
from markup2image.evaluation.layout_metrics import layout_scores
from markup2image.models.hcma import (
    HcmaModule,
    LocalAlignmentHead,
    build_hcma,
    fourier_box_embedding,
    hcma_loss,
    load_hcma,
    random_translate,
    save_hcma,
)
from markup2image.text.tokenizer import train_bpe

IMAGE = DomainConfig(height=16, width=32, channels=1)
TINY = HcmaConfig(global_weight=1.0, local_weight=1.0, patch_size=4, dim=16, layers=1, heads=2, fourier_bands=2)


@pytest.fixture(scope="module")
def tok():
    texts = [r"\frac { a } { b } + x _ { i }", "CCOc1ccc(Cl)cc1", "CCO", "CCOC", r"x + y = \alpha"] * 5
    return train_bpe(texts, vocab_size=60, min_frequency=1)


def tiny_module(seed: int = 0, **kw: float) -> HcmaModule:
    torch.manual_seed(seed)
    module = build_hcma(HcmaConfig(**{**TINY.__dict__, **kw}), image=IMAGE, text_dim=8)
    assert module is not None
    return module.eval()


# ----------------------------------------------------------------------------------------------------------------
# segments -> BPE token positions


def test_layout_batch_maps_segments_to_their_bpe_tokens(tok) -> None:
    math_markup, smiles = r"\frac { a } { b } + x", "OCCC(Cl)CCO"  # a SMILES the BPE never saw whole
    layouts = [
        [{"box": [0, 0, 8, 4], "chars": [0, 5]}, {"box": [8, 4, 16, 16], "span": [7, 8]}],  # \frac, then "+"
        [{"box": [4, 0, 12, 8], "chars": [5, 7]}],  # Cl
    ]
    enc = [tok.encode(m) for m in (math_markup, smiles)]
    n = max(len(e.ids) for e in enc)
    lb = layout_batch(layouts, [math_markup, smiles], tok, n, (16, 32), max_boxes=8)
    assert lb.boxes.shape == (2, 2, 4) and lb.segment_mask.shape == (2, 2, n)
    torch.testing.assert_close(lb.boxes[0, 1], torch.tensor([8 / 32, 4 / 16, 16 / 32, 1.0]))
    assert lb.box_mask.tolist() == [[True, True], [True, False]]  # item 2 has one box; the pad box is off

    def picked(i: int, k: int) -> str:
        return "".join(enc[i].tokens[j] for j in torch.nonzero(lb.segment_mask[i, k]).flatten().tolist())

    assert picked(0, 0) == r"\frac" and picked(0, 1) == "+"
    assert picked(1, 0) == "(Cl"  # the BPE pieces overlapping "Cl" ("(C", "l"), nothing else
    assert not lb.segment_mask[:, :, 0].any()  # [BOS] belongs to no segment
    cut = layout_batch(layouts, [math_markup, smiles], tok, 3, (16, 32), max_boxes=8)
    assert cut.box_mask[0].tolist() == [True, False]  # "+" was truncated away: its box is off


def test_no_layout_gives_no_valid_box(tok) -> None:
    lb = layout_batch([None, []], ["x", "y"], tok, 4, (16, 32), max_boxes=4)
    assert lb.box_mask.shape == (2, 1) and not lb.box_mask.any()


# ----------------------------------------------------------------------------------------------------------------
# losses by hand


def test_fourier_box_embedding_by_hand() -> None:
    e = fourier_box_embedding(torch.tensor([[0.0, 0.5, 0.25, 1.0]]), bands=1)
    s = math.sqrt(0.5)
    torch.testing.assert_close(e, torch.tensor([[0.0, 1.0, 1.0, 0.0, s, s, 0.0, -1.0]]), atol=1e-6, rtol=0)


def test_global_loss_by_hand_uses_only_valid_tokens() -> None:
    hidden = torch.tensor([[[1.0, 1.0], [1.0, -1.0], [5.0, 5.0]]])  # valid mean of the first two = (1, 0)
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(global_alignment_loss(torch.tensor([[2.0, 0.0]]), hidden, mask), torch.tensor([0.0]))
    torch.testing.assert_close(global_alignment_loss(torch.tensor([[0.0, 3.0]]), hidden, mask), torch.tensor([1.0]))
    torch.testing.assert_close(global_alignment_loss(torch.tensor([[-1.0, 0.0]]), hidden, mask), torch.tensor([2.0]))


def test_local_loss_by_hand() -> None:
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    f = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [9.0, 9.0]]])
    segment = torch.tensor([[[1, 0, 0], [1, 1, 0], [0, 0, 1]]], dtype=torch.bool)
    layout = LayoutBatch(torch.zeros(1, 3, 4), torch.tensor([[True, True, False]]), segment)
    total, count = local_alignment_loss(f, hidden, layout.segment_mask, layout.box_mask)
    # box 0: f = s = (1, 0); box 1: s = mean((1, 0), (0, 1)) = (0.5, 0.5), parallel to f; box 2 is off
    torch.testing.assert_close(total, torch.tensor([0.0]))
    assert count.tolist() == [2.0]
    f2 = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [9.0, 9.0]]])  # box 0: cos 0 -> 1; box 1: cos 1/sqrt2
    total2, _ = local_alignment_loss(f2, hidden, layout.segment_mask, layout.box_mask)
    torch.testing.assert_close(total2, torch.tensor([1.0 + 1.0 - math.sqrt(0.5)]))


def test_box_membership_uses_centres_and_never_leaves_a_box_empty() -> None:
    centres = torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])  # 2x2 grid
    boxes = torch.tensor([[[0.0, 0.0, 1.0, 0.5], [0.6, 0.6, 0.7, 0.7], [0.0, 0.0, 0.0, 0.0]]])
    member = LocalAlignmentHead.membership(centres, boxes, (2, 2))
    assert member[0, 0].tolist() == [True, True, False, False]  # the top row's centres
    assert member[0, 1].tolist() == [False, False, False, True]  # a box between centres: the patch under it
    assert member[0].sum(-1).min() >= 1


def test_hcma_loss_weights_the_terms(tok) -> None:
    module = tiny_module(global_weight=0.5, local_weight=2.0)
    x, t = torch.randn(2, 1, 16, 32), torch.tensor([10, 900])
    hidden, mask = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.long)
    seg = torch.zeros(2, 2, 5, dtype=torch.bool)
    seg[0, 0, 1] = seg[0, 1, 2] = seg[1, 0, 3] = True
    layout = LayoutBatch(torch.tensor([[[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]]] * 2), seg.any(-1), seg)
    loss, terms = hcma_loss(module, x, t, hidden, mask, layout)
    parts = module.alignment_losses(x, t, hidden, mask, layout)
    want = 0.5 * parts["global"].mean() + 2.0 * parts["local_sum"].sum() / 3.0  # 3 valid boxes in the batch
    torch.testing.assert_close(loss, want)
    assert terms["hcma_boxes"] == 3.0 and 0 <= terms["hcma_global"] <= 2 and 0 <= terms["hcma_local"] <= 2
    loss.backward()
    assert (
        module.vit.patch_embedding.weight.grad is not None and module.local_head.box_mlp[0].weight.grad.abs().sum() > 0
    )
    no_layout, terms = hcma_loss(module, x, t, hidden, mask, None)
    torch.testing.assert_close(no_layout, 0.5 * parts["global"].mean())
    assert "hcma_local" not in terms


def test_detached_text_gets_no_gradient() -> None:
    module = tiny_module(local_weight=0.0)
    hidden = torch.randn(1, 3, 8, requires_grad=True)
    loss, _ = hcma_loss(module, torch.randn(1, 1, 16, 32), torch.tensor([5]), hidden, torch.ones(1, 3), None)
    loss.backward()
    assert hidden.grad is None
    attached = tiny_module(local_weight=0.0, detach_text=False)
    loss, _ = hcma_loss(attached, torch.randn(1, 1, 16, 32), torch.tensor([5]), hidden, torch.ones(1, 3), None)
    loss.backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------
# switching off


def test_zero_weights_build_nothing_and_one_weight_builds_one_head() -> None:
    assert build_hcma(HcmaConfig(), image=IMAGE, text_dim=8) is None
    loss, terms = hcma_loss(None, torch.randn(1, 1, 16, 32), torch.tensor([1]), torch.randn(1, 2, 8), None, None)
    assert float(loss) == 0.0 and terms == {}
    only_global = tiny_module(local_weight=0.0)
    both = tiny_module()
    assert only_global.local_head is None and only_global.global_head is not None
    assert sum(p.numel() for p in only_global.parameters()) < sum(p.numel() for p in both.parameters())
    with pytest.raises(ValueError, match="hcma.patch_size"):
        build_hcma(HcmaConfig(global_weight=1.0, patch_size=5), image=IMAGE, text_dim=8)


class _Denoiser(torch.nn.Module):
    """eps = 0.1 x + a markup-dependent bias: the model interface the samplers need."""

    image = IMAGE

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.sin(ids[..., None].float() * torch.arange(1, 9).float())  # (B, N, 8)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return 0.1 * x + 0.01 * hidden.mean(dim=(1, 2))[:, None, None, None]


@pytest.mark.parametrize(("sampler", "steps"), [("ddim", 4), ("dpm_solver", 4), ("ddpm", 1000)])
def test_unguided_equals_sample_images(sampler: str, steps: int) -> None:
    ids, mask = torch.tensor([[2, 5, 3], [2, 7, 3]]), torch.ones(2, 3, dtype=torch.long)
    kw = dict(sampler=sampler, steps=steps, seed=3, diffusion=DiffusionConfig())
    want = sample_images(_Denoiser(), ids, mask, **kw)
    assert torch.equal(guided_sample_images(_Denoiser(), None, ids, mask, **kw), want)
    module = tiny_module()
    assert torch.equal(guided_sample_images(_Denoiser(), module, ids, mask, **kw), want)  # scales 0
    with_local_no_layout = guided_sample_images(_Denoiser(), module, ids, mask, guidance_local=5.0, **kw)
    assert torch.equal(with_local_no_layout, want)
    if sampler == "ddim":
        guided = guided_sample_images(_Denoiser(), module, ids, mask, guidance_global=50.0, **kw)
        assert not torch.equal(guided, want)


# ----------------------------------------------------------------------------------------------------------------
# guidance


def _layout() -> LayoutBatch:
    seg = torch.zeros(2, 2, 3, dtype=torch.bool)
    seg[:, 0, 1] = seg[:, 1, 2] = True
    return LayoutBatch(torch.tensor([[[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]]] * 2), seg.any(-1), seg)


@pytest.mark.parametrize(("g", "lo"), [(1.0, 0.0), (0.0, 1.0), (1.0, 1.0)])
def test_a_step_against_the_gradient_lowers_the_energy(g: float, lo: float) -> None:
    module = tiny_module(seed=1)
    torch.manual_seed(0)
    x, t = torch.randn(2, 1, 16, 32), torch.tensor([300, 300])
    hidden, mask = torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.long)
    grad, before = alignment_guidance(module, x, t, hidden, mask, _layout(), guidance_global=g, guidance_local=lo)
    after = alignment_energy(module, x - 0.5 * grad, t, hidden, mask, _layout(), guidance_global=g, guidance_local=lo)
    assert (after < before).all(), (before, after)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("sampler", ["ddim", "dpm_solver"])
def test_guided_sampling_ends_with_a_lower_alignment_loss(sampler: str) -> None:
    """Guidance at every step (eps + sqrt(1 - abar) grad E) leaves samples whose energy is below the unguided ones'."""
    module = tiny_module(seed=2)
    ids, mask = torch.tensor([[2, 5, 3], [2, 7, 3]]), torch.ones(2, 3, dtype=torch.long)
    kw = dict(sampler=sampler, steps=3, seed=5, diffusion=DiffusionConfig())
    plain = guided_sample_images(_Denoiser(), module, ids, mask, **kw)
    scales = dict(guidance_global=20.0, guidance_local=20.0)
    guided = guided_sample_images(_Denoiser(), module, ids, mask, layout=_layout(), **scales, **kw)
    hidden, t0 = _Denoiser().encode(ids, mask), torch.zeros(2, dtype=torch.long)
    e_plain = alignment_energy(module, plain, t0, hidden, mask, _layout(), **scales)
    e_guided = alignment_energy(module, guided, t0, hidden, mask, _layout(), **scales)
    assert (e_guided < e_plain).all(), (e_plain, e_guided)


def test_guidance_needs_the_head_it_uses() -> None:
    only_global = tiny_module(local_weight=0.0)
    x, t, h, m = torch.randn(1, 1, 16, 32), torch.tensor([3]), torch.randn(1, 3, 8), torch.ones(1, 3)
    layout = LayoutBatch(_layout().boxes[:1], _layout().box_mask[:1], _layout().segment_mask[:1])
    with pytest.raises(ValueError, match="hcma.guidance_local"):
        alignment_energy(only_global, x, t, h, m, layout, guidance_global=0.0, guidance_local=1.0)
    with pytest.raises(ValueError, match="guidance needs a model trained with HCMA"):
        guided_sample_images(
            _Denoiser(), None, torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long),
            sampler="ddim", steps=2, seed=0, diffusion=DiffusionConfig(), guidance_global=1.0,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# persistence and grounded sampling


def test_save_and_load_beside_the_model(tmp_path: Path) -> None:
    module = tiny_module(seed=4)
    assert load_hcma(tmp_path) is None
    save_hcma(module, tmp_path)
    loaded = load_hcma(tmp_path)
    assert loaded is not None and loaded.cfg == module.cfg
    x, t, h, m = torch.randn(1, 1, 16, 32), torch.tensor([7]), torch.randn(1, 3, 8), torch.ones(1, 3)
    torch.testing.assert_close(
        loaded.alignment_losses(x, t, h, m)["global"], module.alignment_losses(x, t, h, m)["global"]
    )


def test_load_from_inside_the_model_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    module = tiny_module(seed=5)
    state = {f"hcma.{k}": v.contiguous() for k, v in module.state_dict().items()} | {"unet.w": torch.zeros(1)}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "model_config.json").write_text(json.dumps({"hcma_module": module.config_dict()}))
    loaded = load_hcma(tmp_path)
    assert loaded is not None
    torch.testing.assert_close(loaded.vit.cls_token, module.vit.cls_token)


def test_sample_with_layout_writes_a_grounded_image(tmp_path: Path, tok) -> None:
    from markup2image.models.model import MarkupToImageModel

    torch.manual_seed(0)
    model_cfg = ModelConfig(block_out_channels=(8, 16), cross_attention_levels=(False, True), norm_num_groups=4,
                            encoder_dim=8, encoder_layers=1, encoder_heads=2, attention_head_dim=4)  # fmt: skip
    model = MarkupToImageModel(model_cfg=model_cfg, image=IMAGE, vocab_size=tok.get_vocab_size())
    model.save(tmp_path / "model")
    (tmp_path / "model" / "tokenizer.json").write_text(tok.to_str())
    with pytest.raises(ValueError, match="no HCMA module"):
        sample_with_layout(tmp_path / "model", "x + y", None, tmp_path / "a.png", steps=2, progress=False)
    save_hcma(tiny_module(guidance_global=0.0, guidance_local=10.0), tmp_path / "model")
    layout = tmp_path / "boxes.json"
    layout.write_text(
        json.dumps({"boxes": [{"box": [0, 0, 8, 16], "span": [0, 1]}, {"box": [8, 0, 16, 16], "chars": [4, 5]}]})
    )
    image = sample_with_layout(tmp_path / "model", "x + y", layout, tmp_path / "g.png", steps=2,
                               boxes_out=tmp_path / "g_boxes.png", progress=False)  # fmt: skip
    assert image.shape == (16, 32) and image.dtype == np.uint8
    assert (tmp_path / "g.png").exists() and (tmp_path / "g_boxes.png").exists()
    plain = sample_with_layout(tmp_path / "model", "x + y", layout, tmp_path / "p.png", steps=2, guidance_local=0.0,
                               progress=False)  # fmt: skip
    assert not np.array_equal(image, plain)  # the layout's local guidance changed the sample
    layout.write_text(json.dumps([{"box": [0, 0, 8, 16], "chars": [40, 41]}]))
    with pytest.raises(ValueError, match="no box names a segment"):
        sample_with_layout(tmp_path / "model", "x + y", layout, tmp_path / "e.png", steps=2, progress=False)


# ----------------------------------------------------------------------------------------------------------------
# layout metric


def test_layout_scores_by_hand() -> None:
    image = np.full((10, 10), 255, np.uint8)
    image[1:3, 1:3] = 0  # 4 ink pixels inside box A
    image[6:8, 6:8] = 0  # 4 ink pixels outside every box
    boxes = [{"box": [0, 0, 5, 5], "span": [0, 1]}, {"box": [5, 0, 10, 5], "span": [1, 2]}]
    s = layout_scores(image, boxes, expected_fill=0.16)  # expected 4 px per 25-px box
    assert s["ink_in_boxes"] == pytest.approx(0.5)
    assert s["box_fill"] == pytest.approx(0.5)  # A full, B empty
    assert s["layout_f1"] == pytest.approx(0.5)
    gold = np.full((10, 10), 255, np.uint8)
    gold[1:3, 1:5] = 0  # 8 px in A, none in B: B is skipped
    assert layout_scores(image, boxes, gold=gold)["box_fill"] == pytest.approx(0.5)
    assert layout_scores(np.full((10, 10), 255, np.uint8), boxes) == {"ink_in_boxes": 0, "box_fill": 0, "layout_f1": 0}
    full = layout_scores(np.zeros((10, 10), np.uint8), boxes)
    assert full["box_fill"] == 1.0 and full["ink_in_boxes"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------------------------
# training-time translation (hcma.translate)


def test_random_translate_moves_image_and_boxes_together_inside_the_canvas() -> None:
    x = torch.ones(3, 1, 16, 32)
    x[0, :, 2:6, 4:10] = -1.0  # item 0: ink exactly in its box
    x[2, :, 9:12, 20:31] = -1.0  # item 2: ink but no valid box -> stays put
    seg = torch.zeros(3, 1, 2, dtype=torch.bool)
    seg[0, 0, 0] = seg[1, 0, 1] = True
    boxes = torch.tensor([[[4 / 32, 2 / 16, 10 / 32, 6 / 16]], [[0.0, 0.0, 1.0, 1.0]], [[0.5, 0.5, 0.75, 0.75]]])
    layout = LayoutBatch(boxes, seg.any(-1), seg)
    moved_any = False
    for seed in range(8):
        out, lay = random_translate(x, layout, torch.Generator().manual_seed(seed))
        x0, y0, x1, y1 = (round(float(v) * s) for v, s in zip(lay.boxes[0, 0], (32, 16, 32, 16)))
        assert 0 <= x0 and x1 <= 32 and 0 <= y0 and y1 <= 16
        assert (out[0, 0, y0:y1, x0:x1] == -1).all() and int((out[0] == -1).sum()) == 24  # the ink is in the box
        moved_any |= (x0, y0) != (4, 2)
        assert torch.equal(out[1], x[1]) and torch.equal(lay.boxes[1], boxes[1])  # a full-canvas box cannot move
        assert torch.equal(out[2], x[2]) and torch.equal(lay.boxes[2], boxes[2])
    assert moved_any
    again, _ = random_translate(x, layout, torch.Generator().manual_seed(3))
    assert torch.equal(again, random_translate(x, layout, torch.Generator().manual_seed(3))[0])  # seeded


def test_translate_only_in_training_mode() -> None:
    module = tiny_module(local_weight=1.0, global_weight=0.0)
    x, t = torch.randn(2, 1, 16, 32), torch.tensor([10, 900])
    hidden, mask = torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.long)
    small = LayoutBatch(_layout().boxes * 0.5 + 0.25, _layout().box_mask, _layout().segment_mask)  # room to move

    def loss(seed: int) -> torch.Tensor:
        return hcma_loss(module, x, t, hidden, mask, small, torch.Generator().manual_seed(seed))[0]

    assert torch.equal(loss(0), loss(1))
    module.train()
    assert not torch.equal(loss(0), loss(1))


# ----------------------------------------------------------------------------------------------------------------
# the HCMA module inside the denoiser


def _tiny_model(hcma: HcmaConfig | None, vocab: int = 30):
    from markup2image.models.model import MarkupToImageModel

    torch.manual_seed(0)
    model_cfg = ModelConfig(block_out_channels=(8, 16), cross_attention_levels=(False, True), norm_num_groups=4,
                            encoder_dim=8, encoder_layers=1, encoder_heads=2, attention_head_dim=4)  # fmt: skip
    return MarkupToImageModel(model_cfg=model_cfg, image=IMAGE, vocab_size=vocab, hcma=hcma)


def test_zero_weights_leave_the_model_exactly_as_without_hcma() -> None:
    plain, off = _tiny_model(None).state_dict(), _tiny_model(HcmaConfig(dim=8, translate=False)).state_dict()
    assert list(plain) == list(off) and all(torch.equal(plain[k], off[k]) for k in plain)
    assert _tiny_model(HcmaConfig()).config_dict() == _tiny_model(None).config_dict()  # no hcma_module entry
    on = _tiny_model(TINY).state_dict()
    assert all(torch.equal(plain[k], on[k]) for k in plain)  # built last: the other parts initialise the same
    assert {k for k in on if k not in plain} == {k for k in on if k.startswith("hcma.")} != set()


def test_model_with_hcma_saves_and_loads_it(tmp_path: Path) -> None:
    from markup2image.models.model import load_model

    model = _tiny_model(TINY)
    model.save(tmp_path)
    cfg = json.loads((tmp_path / "model_config.json").read_text())
    assert cfg["hcma_module"]["hcma"]["local_weight"] == 1.0 and cfg["hcma_module"]["text_dim"] == 8
    loaded = load_model(tmp_path)
    assert loaded.hcma is not None
    for k, v in model.hcma.state_dict().items():
        assert torch.equal(loaded.hcma.state_dict()[k], v), k
    alone = load_hcma(tmp_path)  # what guidance reads from a model folder
    assert alone is not None and torch.equal(alone.vit.cls_token, model.hcma.vit.cls_token)


def test_forward_adds_the_hcma_loss_of_the_anchor_rows() -> None:
    from markup2image.data.layout_tensors import HcmaBatch

    model = _tiny_model(TINY).eval()
    ids, mask = torch.tensor([[2, 5, 3], [2, 7, 3]]), torch.ones(2, 3, dtype=torch.long)
    x, t = torch.randn(3, 1, 16, 32), torch.tensor([5, 500, 50])
    out = model(x, t, ids, mask, text_index=torch.tensor([0, 1, 0]), hcma_batch=HcmaBatch(_layout()))
    hidden = model.encode(ids, mask)
    want, terms = hcma_loss(model.hcma, x[:2], t[:2], hidden, mask, _layout())
    torch.testing.assert_close(out.hcma_loss, want)
    assert out.hcma_terms == terms and set(terms) == {"hcma_global", "hcma_local", "hcma_boxes"}
    torch.testing.assert_close(out.sample, model(x, t, ids, mask, text_index=torch.tensor([0, 1, 0])))
    with pytest.raises(ValueError, match="hcma.global_weight / hcma.local_weight"):
        _tiny_model(None)(x[:2], t[:2], ids, mask, hcma_batch=HcmaBatch(None))


def test_summary_counts_the_hcma_parameters() -> None:
    from markup2image.config import Params
    from markup2image.models.summary import parameter_summary

    off = parameter_summary(Params(), "math", 100)
    on = parameter_summary(Params(hcma=HcmaConfig(global_weight=1.0, local_weight=1.0)), "math", 100)
    assert off["hcma"] == 0 and on["hcma"] > 0
    assert on["total"] - off["total"] == on["hcma"]
    assert on["config"]["hcma_global_weight"] == 1.0


def test_text_mean_is_a_running_mean_updated_only_in_training() -> None:
    module = tiny_module()
    x, t = torch.randn(2, 1, 16, 32), torch.tensor([10, 900])
    hidden, mask = torch.randn(2, 3, 8), torch.tensor([[1, 1, 0], [1, 0, 0]])
    module.alignment_losses(x, t, hidden, mask)
    assert not module.text_mean.any()  # eval: untouched
    module.train()
    module.alignment_losses(x, t, hidden, mask)
    first = hidden[mask.bool()].mean(0)  # the 3 valid tokens
    torch.testing.assert_close(module.text_mean, first)  # first update: weight 1
    module.alignment_losses(x, t, hidden + 1.0, mask)
    torch.testing.assert_close(module.text_mean, first + 0.5)  # second: weight 1/2
    # centred targets: a direction every markup shares (here +100 on feature 0) is taken out of the alignment
    module.eval()
    common = torch.zeros(8)
    common[0] = 100.0
    before = module.alignment_losses(x, t, hidden, mask)["global"]
    module.text_mean.add_(common)
    torch.testing.assert_close(module.alignment_losses(x, t, hidden + common, mask)["global"], before)
