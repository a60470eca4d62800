"""The U-Net, its attention processors (positions, masks, CCAM), FSA, ablation switches, counts and export."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from tiny_models import TINY_IMAGE, TINY_MODEL

from markup2image.config import DomainConfig, ModelConfig, Params
from markup2image.diffusion.losses import fine_grained_alignment_loss
from markup2image.diffusion.sampling import sample_images
from markup2image.models.ccam import ContextAwareCrossAttention
from markup2image.models.fsa import FineGrainedSequenceAlignment
from markup2image.models.model import MarkupToImageModel, load_model
from markup2image.models.position import PositionalAttnProcessor
from markup2image.models.summary import count_parameters, parameter_summary, sized_model_config, with_switches
from markup2image.models.unet_parts import ccam_sites, level_size, patched_image, transformer_sites

IMAGE, TINY = TINY_IMAGE, TINY_MODEL


def _model(**switches) -> MarkupToImageModel:
    torch.manual_seed(0)
    return MarkupToImageModel(model_cfg=dataclasses.replace(TINY, **switches), image=IMAGE, vocab_size=30).eval()


def _inputs(b: int = 3, n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, n, dtype=torch.long)
    mask[0, n - 2 :] = 0
    x = torch.randn(b, 1, IMAGE.height, IMAGE.width, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    hidden = torch.randn(b, n, TINY.encoder_dim, generator=g)
    return x, t, hidden, mask


def _n(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


# -- attention processors -----------------------------------------------------------------------------------------


def test_every_attention_block_has_positions():
    model = _model(ccam=True)
    attns = [(n, m) for n, m in model.unet.named_modules() if isinstance(m, Attention)]
    assert len(attns) == 2 * len(transformer_sites(model.unet, IMAGE)) > 0
    for name, attn in attns:
        proc = attn.processor
        assert isinstance(proc, PositionalAttnProcessor), name
        assert proc.image_pos is not None, name
        assert (proc.text_pos is not None) == attn.is_cross_attention, name
    # and each one is live: perturbing one block's row table (or text table) changes eps
    x, t, hidden, mask = _inputs()
    with torch.no_grad():
        base = model.denoise(x, t, hidden, mask)
        for _, attn in attns:
            table = attn.processor.text_pos.weight if attn.is_cross_attention else attn.processor.image_pos.row
            table.add_(0.5)
            assert not torch.allclose(model.denoise(x, t, hidden, mask), base, atol=1e-6)
            table.sub_(0.5)


def test_position_switch_removes_every_table():
    on, off = _model(), _model(position_embeddings=False)
    assert count_parameters(off)["position_embeddings"] == 0
    expected = sum(
        s.height * s.channels + s.width * s.channels + (TINY.max_text_length * TINY.encoder_dim)
        for s in transformer_sites(on.unet, IMAGE)
    )  # row + col per self- and cross-attention, text table per cross-attention
    expected += sum(s.height * s.channels + s.width * s.channels for s in transformer_sites(on.unet, IMAGE))
    assert count_parameters(on)["position_embeddings"] == expected
    assert _n(on) - _n(off) == expected


def test_level_sizes_match_the_unet():
    model = _model()
    sizes = {}
    hooks = [
        s.block.register_forward_pre_hook(lambda _m, a, s=s: sizes.__setitem__(s.name, a[0].shape[1]))
        for s in transformer_sites(model.unet, IMAGE)
    ]
    x, t, hidden, mask = _inputs()
    model.denoise(x, t, hidden, mask)
    for h in hooks:
        h.remove()
    for s in transformer_sites(model.unet, IMAGE):
        assert sizes[s.name] == s.height * s.width
    assert level_size(DomainConfig(height=64, width=320), 5) == (2, 10)


@pytest.mark.parametrize("ccam", [False, True])
def test_padded_text_is_ignored(ccam):
    """Changing the features of padded tokens leaves eps unchanged; changing a valid token does not."""
    model = _model(ccam=ccam)
    x, t, hidden, mask = _inputs()
    other = hidden.clone()
    other[0, -2:] = torch.randn(2, TINY.encoder_dim) * 10
    with torch.no_grad():
        a = model.denoise(x, t, hidden, mask)
        b = model.denoise(x, t, other, mask)
        assert torch.allclose(a, b, atol=1e-6)
        other[0, 0] += 1.0
        assert not torch.allclose(model.denoise(x, t, other, mask)[0], a[0], atol=1e-4)


def test_mask_is_batch_major():
    """Each item gives the same eps alone as inside a batch with differently padded neighbours."""
    model = _model(ccam=True)
    x, t, hidden, mask = _inputs(b=3)
    mask[1, 3:] = 0
    with torch.no_grad():
        batched = model.denoise(x, t, hidden, mask)
        for i in range(3):
            n = int(mask[i].sum())
            alone = model.denoise(x[i : i + 1], t[i : i + 1], hidden[i : i + 1, :n], mask[i : i + 1, :n])
            assert torch.allclose(batched[i : i + 1], alone, atol=1e-5)


def _reference_mha(q, k, val, keep, heads):
    """Explicit softmax attention over ``heads`` heads, padded keys dropped with -inf."""
    q, k, val = (z.unflatten(-1, (heads, -1)).transpose(1, 2) for z in (q, k, val))
    logits = q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5)
    logits = logits.masked_fill(~keep[:, None, None, :], float("-inf"))
    return (logits.softmax(-1) @ val).transpose(1, 2).flatten(2)


def test_ccam_matches_a_materialised_reference():
    torch.manual_seed(0)
    c, d, heads, hw, n = 8, 6, 2, 5, 4
    proc = ContextAwareCrossAttention(channels=c, text_dim=d, rank=3)
    attn = Attention(query_dim=c, cross_attention_dim=d, heads=heads, dim_head=c // heads)
    v, t = torch.randn(2, hw, c), torch.randn(2, n, d)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    out = proc(attn, v, t, attention_mask=mask)
    mha = functools.partial(_reference_mha, heads=heads)
    keep = mask.bool()
    cha = attn.to_out[0](mha(attn.to_q(v), attn.to_k(t), attn.to_v(t), keep))
    r = torch.softmax(proc.relation_a(v) @ proc.relation_b(v).transpose(1, 2) / 3**0.5, dim=-1)  # (B, HW, HW)
    q = proc.psi(r @ proc.relation_value(v))
    memory = torch.cat([v, proc.text_to_memory(t)], 1)
    keep_mem = torch.cat([torch.ones(2, hw, dtype=torch.bool), keep], 1)
    coa = proc.context_out(mha(q, proc.memory_key(memory), proc.memory_value(memory), keep_mem))
    ref = proc.fusion(torch.cat([cha, coa], -1))
    assert torch.allclose(out, ref, atol=1e-5)


def test_ccam_relation_query_is_psi_of_the_relation_matrix():
    """``ccam_query: relation`` (eq. 12): Q = Psi(R) with Psi: HW -> C; it is another module than relation_value."""
    torch.manual_seed(0)
    c, d, heads, hw, n = 8, 6, 2, 5, 4
    proc = ContextAwareCrossAttention(channels=c, text_dim=d, rank=3, query="relation", positions=hw)
    assert proc.psi.in_features == hw and proc.psi.out_features == c
    assert not hasattr(proc, "relation_value")
    attn = Attention(query_dim=c, cross_attention_dim=d, heads=heads, dim_head=c // heads)
    v, t = torch.randn(2, hw, c), torch.randn(2, n, d)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    out = proc(attn, v, t, attention_mask=mask)
    mha = functools.partial(_reference_mha, heads=heads)
    keep = mask.bool()
    cha = attn.to_out[0](mha(attn.to_q(v), attn.to_k(t), attn.to_v(t), keep))
    r = torch.softmax(proc.relation_a(v) @ proc.relation_b(v).transpose(1, 2) / 3**0.5, dim=-1)
    memory = torch.cat([v, proc.text_to_memory(t)], 1)
    keep_mem = torch.cat([torch.ones(2, hw, dtype=torch.bool), keep], 1)
    coa = proc.context_out(mha(proc.psi(r), proc.memory_key(memory), proc.memory_value(memory), keep_mem))
    assert torch.allclose(out, proc.fusion(torch.cat([cha, coa], -1)), atol=1e-5)
    # same seed, same v and text: relation_value computes another function
    torch.manual_seed(0)
    other = ContextAwareCrossAttention(channels=c, text_dim=d, rank=3, query="relation_value")
    assert not torch.allclose(other(attn, v, t, attention_mask=mask), out, atol=1e-3)
    with pytest.raises(ValueError, match="positions"):
        ContextAwareCrossAttention(channels=c, text_dim=d, rank=3, query="relation")
    with pytest.raises(ValueError, match="ccam_query"):
        ContextAwareCrossAttention(channels=c, text_dim=d, rank=3, query="rel")


def test_ccam_relation_psi_is_sized_per_site():
    model = _model(ccam=True, ccam_query="relation")
    sites = {f"{s.name}.attn2.processor": s for s in transformer_sites(model.unet, IMAGE)}
    ccams = [(n, m) for n, m in model.unet.named_modules() if isinstance(m, ContextAwareCrossAttention)]
    assert ccams
    for name, proc in ccams:
        assert proc.query == "relation" and proc.psi.in_features == sites[name].height * sites[name].width


def test_ccam_sits_at_the_lowest_resolutions():
    cfg = sized_model_config(ModelConfig(ccam=True), "paper")
    with torch.device("meta"):
        model = MarkupToImageModel(model_cfg=cfg, image=DomainConfig(height=64, width=320), vocab_size=8)
    sites = transformer_sites(model.unet, model.image)
    chosen = ccam_sites(sites, 5)
    assert len(chosen) == 5 and {s.level for s in chosen} == {5}
    ccams = [n for n, m in model.unet.named_modules() if isinstance(m, ContextAwareCrossAttention)]
    assert sorted(ccams) == sorted(f"{s.name}.attn2.processor" for s in chosen)
    assert len([s for s in sites if s.block.attn2 is not None]) == 21  # 8 down + 1 mid + 12 up cross-attentions


# -- FSA, heads, switches ---------------------------------------------------------------------------------------


def test_fsa_image_encoder_maps_width_to_sequence():
    fsa = FineGrainedSequenceAlignment(TINY, DomainConfig(height=16, width=40, channels=1))
    vs = fsa.image_encoder(torch.randn(2, 1, 16, 40))
    assert vs.shape == (2, 10, TINY.encoder_dim)  # two stride-2 stages: M = 40 / 4 tokens
    t = torch.randn(2, 5, TINY.encoder_dim)
    assert fsa.align(torch.randn(2, 1, 16, 40), t).shape == t.shape
    loss = fsa(torch.randn(2, 1, 16, 40), t, torch.ones(2, 5))
    assert loss.ndim == 0 and 0.0 <= loss.item() <= 3.0


def test_fsa_loss_reaches_markup_only_through_the_cam_query():
    """``t`` is a stop-gradient target in L_fa: its gradient equals the one through the CAM query alone."""
    torch.manual_seed(0)
    fsa = FineGrainedSequenceAlignment(TINY, DomainConfig(height=16, width=40, channels=1))
    images, mask = torch.randn(2, 1, 16, 40), torch.ones(2, 5)
    t = torch.randn(2, 5, TINY.encoder_dim, requires_grad=True)
    (grad,) = torch.autograd.grad(fsa(images, t, mask), t)
    t_query = t.detach().clone().requires_grad_(True)
    via_query = fine_grained_alignment_loss(fsa.align(images, t_query), t.detach(), mask)
    (expected,) = torch.autograd.grad(via_query, t_query)
    torch.testing.assert_close(grad, expected)
    assert grad.abs().sum() > 0  # the markup encoder is still shaped by L_fa
    t_target = t.detach().clone().requires_grad_(True)
    with_target = fine_grained_alignment_loss(fsa.align(images, t.detach()), t_target, mask)
    (through_target,) = torch.autograd.grad(with_target, t_target)
    assert not torch.allclose(grad, grad + through_target)  # the target path would have added a gradient


@pytest.mark.parametrize(
    ("switch", "attribute", "group"),
    [("fsa", "alignment", "fsa"), ("con_aug", "contrastive_head", "contrastive_head"), ("ccam", None, "ccam")],
)
def test_each_ablation_switch_adds_exactly_its_parameters(switch, attribute, group):
    base, full = _model(), _model(**{switch: True})
    added = _n(full) - _n(base)
    assert added > 0
    assert count_parameters(full)[group] == added and count_parameters(base)[group] == 0
    if attribute:
        assert getattr(base, attribute) is None and _n(getattr(full, attribute)) == added
    else:
        ccams = [m for m in full.unet.modules() if isinstance(m, ContextAwareCrossAttention)]
        assert len(ccams) == 2 and not any(isinstance(m, ContextAwareCrossAttention) for m in base.unet.modules())


def test_switched_off_parts_refuse_to_run():
    model = _model()
    x, t, _, mask = _inputs()
    ids = torch.randint(1, 30, mask.shape)
    with pytest.raises(ValueError, match="model.fsa"):
        model(x, t, ids, mask, align_images=x)
    with pytest.raises(ValueError, match="model.con_aug"):
        model(x, t, ids, mask, return_mid=True)


def test_mid_projection_is_normalised_and_text_index_shares_encodings():
    model = _model(con_aug=True)
    x, t, _, mask = _inputs()
    ids = torch.randint(1, 30, mask.shape) * mask
    with torch.no_grad():
        out = model(
            torch.cat([x, x]),
            torch.cat([t, t]),
            ids,
            mask,
            text_index=torch.tensor([0, 1, 2, 0, 1, 2]),
            return_mid=True,
        )
        assert torch.allclose(out.mid_projection.norm(dim=-1), torch.ones(6), atol=1e-5)
        assert torch.allclose(out.sample[:3], out.sample[3:], atol=1e-6)
        assert torch.allclose(out.sample[:3], model(x, t, ids, mask), atol=1e-6)


def test_summary_groups_add_up_and_paper_counts():
    params = Params()
    for size in ("tiny", "paper"):
        for on in (False, True):
            p = dataclasses.replace(params, model=with_switches(params.model, fsa=on, con_aug=on, ccam=on))
            s = parameter_summary(p, "math", vocab_size=512, size=size)
            parts = s["encoder"] + s["encoder_frozen"] + s["unet"]["total"] + s["position_embeddings"]
            parts += s["ccam"] + s["fsa"] + s["contrastive_head"]
            assert parts == s["total"]
            assert s["unet"]["total"] == sum(v for k, v in s["unet"].items() if k != "total")
    ss_dm = parameter_summary(params, "math", vocab_size=512, size="paper")
    # SS-DM reports ~209M for U-Net + positions at D = 768 (the frozen GPT-Neo not counted)
    assert 200e6 < ss_dm["unet_with_attention_extras"] < 215e6
    assert ss_dm["unet"]["total"] == 190_892_545  # diffusers' U-Net at that config, positions excluded


# -- persistence, sampling, export ------------------------------------------------------------------------------


def test_save_load_round_trip_with_all_parts(tmp_path):
    model = _model(fsa=True, con_aug=True, ccam=True)
    model.save(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.model_cfg == model.model_cfg
    x, t, _, mask = _inputs()
    ids = torch.randint(1, 30, mask.shape) * mask
    with torch.no_grad():
        assert torch.equal(model(x, t, ids, mask), loaded(x, t, ids, mask))


def test_sampling_runs_without_the_training_parts():
    model = _model(fsa=True, con_aug=True, ccam=True)
    ids = torch.randint(1, 30, (2, 5))
    calls = []
    model.alignment.register_forward_pre_hook(lambda *_: calls.append(1))
    out = sample_images(
        model, ids, torch.ones_like(ids), sampler="ddim", steps=3, seed=0, diffusion=Params().diffusion
    )
    assert out.shape == (2, 1, IMAGE.height, IMAGE.width) and calls == []


class _Denoise(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, sample, timestep, hidden, mask):
        return self.model.denoise(sample, timestep, hidden, mask)


def _export_denoiser(model, inputs: tuple, path) -> None:
    """``model.denoise`` -> ONNX (torchscript exporter, opset 17), batch and text length dynamic."""
    torch.onnx.export(
        _Denoise(model),
        inputs,
        str(path),
        opset_version=17,
        dynamo=False,
        input_names=["sample", "timestep", "encoder_hidden_states", "encoder_attention_mask"],
        output_names=["eps"],
        dynamic_axes={
            "sample": {0: "batch"},
            "timestep": {0: "batch"},
            "encoder_hidden_states": {0: "batch", 1: "tokens"},
            "encoder_attention_mask": {0: "batch", 1: "tokens"},
        },
    )


@pytest.mark.parametrize("query", ["relation_value", "relation"])
def test_unet_with_ccam_exports_to_onnx(tmp_path, query):
    model = _model(ccam=True, ccam_query=query)
    path = tmp_path / "unet.onnx"
    _export_denoiser(model, _inputs(b=2, n=6), path)
    assert path.stat().st_size > 0
    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime not installed: export checked, parity not")
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x, t, hidden, mask = _inputs(b=3, n=9, seed=1)  # other batch and text length than at export
    mask[2, 5:] = 0
    feeds = {
        "sample": x.numpy(),
        "timestep": t.numpy(),
        "encoder_hidden_states": hidden.numpy(),
        "encoder_attention_mask": mask.numpy(),
    }
    (got,) = sess.run(None, feeds)
    with torch.no_grad():
        want = model.denoise(x, t, hidden, mask).numpy()
    assert np.abs(got - want).max() <= 1e-4


def test_patched_unet_runs_its_first_level_at_h_over_p_and_exports(tmp_path):
    """``model.patch_size`` 2: the U-Net's attention runs on the 4x8 grid of 2x2 patches, takes and returns
    ``[B, 1, 8, 16]``, every output pixel depends on its own patch, and the ONNX graph computes the same eps."""
    model = _model(patch_size=2, ccam=True)
    grid = patched_image(IMAGE, 2)
    assert (grid.height, grid.width, grid.channels) == (4, 8, 4)
    sizes = {}
    hooks = [
        s.block.register_forward_pre_hook(lambda _m, a, s=s: sizes.__setitem__(s.name, a[0].shape[1]))
        for s in transformer_sites(model.unet, grid)
    ]
    x, t, hidden, mask = _inputs()
    with torch.no_grad():
        eps = model.denoise(x, t, hidden, mask)
    for h in hooks:
        h.remove()
    assert eps.shape == x.shape
    assert sizes and all(sizes[s.name] == s.height * s.width for s in transformer_sites(model.unet, grid))
    assert max(sizes.values()) == 4 * 8  # level 0 is the patch grid, not the 8x16 image
    # pixel (i, j) of the input reaches output pixel (i, j): the shuffles are each other's inverse
    probe = x.clone().requires_grad_(True)
    model.denoise(probe, t, hidden, mask)[0, 0, 5, 11].backward()
    assert probe.grad[0, 0, 5, 11] != 0
    path = tmp_path / "unet.onnx"
    _export_denoiser(model, _inputs(b=2, n=6), path)
    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime not installed: export checked, parity not")
    import onnxruntime as ort

    x, t, hidden, mask = _inputs(b=3, n=9, seed=1)
    feeds = {
        "sample": x.numpy(),
        "timestep": t.numpy(),
        "encoder_hidden_states": hidden.numpy(),
        "encoder_attention_mask": mask.numpy(),
    }
    (got,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    with torch.no_grad():
        assert np.abs(got - model.denoise(x, t, hidden, mask).numpy()).max() <= 1e-4


def test_patch_size_must_divide_the_image():
    with pytest.raises(ValueError, match="does not divide the 8x16 image"):
        patched_image(IMAGE, 3)
    assert patched_image(IMAGE, 1) is IMAGE


def test_attention_bias_shapes():
    from markup2image.models.position import attention_bias

    mask = torch.tensor([[1, 0]])
    assert torch.equal(attention_bias(mask, torch.float32), torch.tensor([[[[0.0, -10000.0]]]]))
    diffusers_bias = (1 - mask.float()) * -10000.0
    assert torch.equal(attention_bias(diffusers_bias[:, None], torch.float32), attention_bias(mask, torch.float32))
    assert attention_bias(None, torch.float32) is None
    assert F.softmax(attention_bias(mask, torch.float32)[0, 0, 0], -1)[1] == 0.0


# -- cross-attention K/V cache ------------------------------------------------------------------------------------


def _count_text_projections(model) -> list[int]:
    """Wrap every processor's ``text_projections``; the returned list grows by one per call."""
    calls: list[int] = []
    for proc in model.unet.modules():
        if isinstance(proc, PositionalAttnProcessor):
            orig = proc.text_projections
            proc.text_projections = lambda *a, _orig=orig: calls.append(1) or _orig(*a)
    return calls


@pytest.mark.parametrize("sampler", ["ddim", "dpm_solver"])
@pytest.mark.parametrize("switches", [{}, {"ccam": True}, {"ccam": True, "position_embeddings": False}])
def test_kv_cache_gives_the_same_samples_and_projects_once_per_batch(sampler, switches):
    model = _model(**switches)
    calls = _count_text_projections(model)
    sites = sum(isinstance(m, Attention) and m.is_cross_attention for m in model.unet.modules())
    ids = torch.randint(1, 30, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    kw = dict(sampler=sampler, steps=4, seed=0, diffusion=Params().diffusion)
    cached = sample_images(model, ids, mask, kv_cache=True, **kw)
    assert len(calls) == sites  # once per cross-attention for the whole batch
    calls.clear()
    fresh = sample_images(model, ids, mask, kv_cache=False, **kw)
    assert len(calls) == 4 * sites  # once per cross-attention per step
    assert (cached - fresh).abs().max() <= 1e-5
    assert all(p.text_cache is None for p in model.unet.modules() if isinstance(p, PositionalAttnProcessor))


def test_kv_cache_follows_new_and_modified_markup():
    from markup2image.models.position import cross_attention_kv_cache

    model = _model(ccam=True)
    x, t, hidden, mask = _inputs()
    other = torch.randn_like(hidden)
    with torch.no_grad():
        want = [model.denoise(x, t, h, mask) for h in (hidden, other, hidden + 1)]
        with cross_attention_kv_cache(model.unet):
            assert torch.equal(model.denoise(x, t, hidden, mask), want[0])
            assert torch.equal(model.denoise(x, t, other, mask), want[1])  # a new batch
            hidden.add_(1)  # the same tensor, modified in place
            assert torch.equal(model.denoise(x, t, hidden, mask), want[2])
            part = model.denoise(x[:2], t[:2], other[:2], mask[:2])  # a view of a cached tensor, another shape
            assert torch.allclose(part, want[1][:2], atol=1e-5)


def test_compiled_unet_reads_the_prefilled_cache_in_one_graph():
    """Under torch.compile the step stays one graph (fullgraph) and a new batch of the same shape reuses it."""
    from markup2image.models.position import cross_attention_kv_cache

    model = _model(ccam=True)
    calls = _count_text_projections(model)
    x, t, hidden, mask = _inputs()
    other = torch.randn_like(hidden)
    torch._dynamo.reset()
    compiled = torch.compile(model.unet, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        want = [model.denoise(x, t, h, mask) for h in (hidden, other)]
        calls.clear()
        with cross_attention_kv_cache(compiled) as cache:
            cache.prefill(hidden)
            got = compiled(x, t, encoder_hidden_states=hidden, encoder_attention_mask=mask).sample
            assert torch.allclose(got, want[0], atol=1e-5)
            cache.prefill(other)
            with torch.compiler.set_stance("fail_on_recompile"):
                got = compiled(x, t, encoder_hidden_states=other, encoder_attention_mask=mask).sample
            assert torch.allclose(got, want[1], atol=1e-5)
    sites = sum(isinstance(m, Attention) and m.is_cross_attention for m in model.unet.modules())
    assert len(calls) == 2 * sites  # the two prefills only: the compiled steps projected nothing
    torch._dynamo.reset()


def test_export_ignores_an_active_kv_cache(tmp_path):
    """ONNX export inside a prefilled cache still computes K/V in the graph (no markup baked in as constants)."""
    from markup2image.export.graphs import export_ready_unet
    from markup2image.models.position import cross_attention_kv_cache

    model = _model(ccam=True)
    x, t, hidden, mask = _inputs(b=2, n=6)
    path = tmp_path / "unet.onnx"
    with torch.no_grad(), cross_attention_kv_cache(model.unet) as cache:
        cache.prefill(hidden)
        copy = export_ready_unet(model.unet)
        assert all(p.text_cache is None for p in copy.modules() if isinstance(p, PositionalAttnProcessor))
        _export_denoiser(model, (x, t, hidden, mask), path)
    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime not installed")
    import onnxruntime as ort

    other = torch.randn_like(hidden)
    feeds = {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": other.numpy()}
    feeds["encoder_attention_mask"] = mask.numpy()
    (got,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    with torch.no_grad():
        want = model.denoise(x, t, other, mask).numpy()
    assert np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize(
    "options",
    [{}, {"norm_num_groups": 2, "residual_connection": True, "rescale_output_factor": 2.0, "qk_norm": "layer_norm"}],
)
@pytest.mark.parametrize("cross", [False, True])
def test_export_processor_matches_the_stock_diffusers_one(cross, options):
    """PositionalAttnProcessor without positions (what export swaps in for AttnProcessor2_0) computes the same."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from markup2image.models.position import PositionalAttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6 if cross else None, heads=2, dim_head=4, **options)
    x = torch.randn(2, 8, 2, 3)  # (B, C, H, W): the spatial path
    context, bias = None, None
    if cross:
        context = torch.randn(2, 3, 6)
        bias = (1 - torch.tensor([[1.0, 1, 1], [1, 0, 0]]))[:, None] * -10000.0  # (B, 1, N), as the U-Net passes it
    want = AttnProcessor2_0()(attn, x, context, attention_mask=bias)
    got = PositionalAttnProcessor()(attn, x, context, attention_mask=bias)
    assert got.shape == x.shape and torch.allclose(got, want, atol=1e-6)


def test_sinusoidal_position_init_sets_every_table_and_keeps_them_trainable():
    from markup2image.models.position import ImagePositionEmbedding, TextPositionEmbedding, sinusoid_table

    cfg = dataclasses.replace(TINY, position_init="sinusoidal")
    model = MarkupToImageModel(model_cfg=cfg, image=IMAGE, vocab_size=30)
    tables = [m for m in model.unet.modules() if isinstance(m, (ImagePositionEmbedding, TextPositionEmbedding))]
    assert any(isinstance(t, TextPositionEmbedding) for t in tables) and any(
        isinstance(t, ImagePositionEmbedding) for t in tables
    )
    for t in tables:
        if isinstance(t, TextPositionEmbedding):
            assert torch.equal(t.weight.detach(), sinusoid_table(*t.weight.shape)) and t.weight.requires_grad
        else:
            c = t.row.shape[1]
            assert torch.equal(t.row[:, : c // 2].detach(), sinusoid_table(t.height, c // 2))
            assert t.row[:, c // 2 :].abs().sum() == 0 and t.col[:, : c // 2].abs().sum() == 0
    plain = MarkupToImageModel(model_cfg=TINY, image=IMAGE, vocab_size=30)
    assert max(float(t.weight.abs().max()) for t in plain.modules() if isinstance(t, TextPositionEmbedding)) < 0.2
