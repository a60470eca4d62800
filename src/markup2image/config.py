"""Typed, frozen configuration built from ``params.yaml``.

This is the one place that reads ``params.yaml``. Every section is a frozen dataclass; unknown keys and values of
the wrong type raise :class:`ConfigError` naming the dotted key (``train.lr``) and what to do.

``lambda`` is a Python keyword, so the top-level FSA-CDM weight ``lambda`` (of the EUBO term, eq. 10) is the field
:attr:`Params.lambda_` (PEP 8's trailing underscore); its loss is ``losses.eubo_term`` and its log key ``loss_eubo``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from markup2image.modes import DOMAINS, ObjectiveName, SamplerName, TokenizerKind

# params.yaml key -> dataclass field, for keys that are not valid Python names.
_RENAMED = {"lambda": "lambda_"}
_RENAMED_BACK = {v: k for k, v in _RENAMED.items()}


class ConfigError(ValueError):
    """A bad params key or value; the message names the dotted key."""


@dataclass(frozen=True)
class DomainConfig:
    """Image geometry and renderer of one domain (design §3)."""

    height: int
    width: int
    channels: int = 1
    engine: str = "mathtext"
    font_size: float = 12.0  # math: pt (mathtext; latex takes 10/11/12); tables: CSS px; music: staff size (pt)
    dpi: float = 0.0  # renderer resolution; 0 = the engine's default, calibrated on the original datasets


def _default_domain_configs() -> dict[str, DomainConfig]:
    return {
        "math": DomainConfig(height=64, width=320, channels=1, engine="mathtext"),
        "tables": DomainConfig(height=64, width=64, channels=1, engine="weasyprint", font_size=6.0),
        "music": DomainConfig(height=192, width=448, channels=1, engine="lilypond", font_size=20.0),
        "molecules": DomainConfig(height=128, width=128, channels=3, engine="rdkit"),
    }


@dataclass(frozen=True)
class DataConfig:
    """The download stage: where markup comes from and how much of it."""

    source: Literal["synthetic", "hub", "file"] = "synthetic"
    seed: int = 0
    train_size: int = 512
    val_size: int = 32
    test_size: int = 32
    # synthetic math grammar: nesting depth (fractions in scripts in brackets) and terms per flat expression
    max_depth: int = 2
    max_terms: int = 5
    symbols: Literal["full", "basic"] = "full"  # the glyph alphabet (data/generators/math.py)
    # hub: dataset id per domain (datasets.load_dataset); file: a JSONL/CSV path per domain
    hub_ids: dict[str, str] = field(
        default_factory=lambda: {
            "math": "yuntian-deng/im2latex-100k",
            "tables": "yuntian-deng/im2html-100k",
            "music": "yuntian-deng/im2ly-35k-syn",
            "molecules": "yuntian-deng/im2smiles-20k",
        }
    )
    files: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RenderConfig:
    workers: int = 2
    timeout: float = 60.0
    batch_size: int = 64
    max_chars: int = 50_000  # longer markup is rejected as too_long before any renderer runs


@dataclass(frozen=True)
class TokenizeConfig:
    kind: TokenizerKind = "bpe"  # trained tokenizer (text/tokenizer.py); ignored with pretrained
    vocab_size: int = 512
    min_frequency: int = 2
    max_length: int = 128  # the tokenize stage cuts every markup to this many tokens (reported per split)
    pretrained: str = ""  # a tokenizer folder or hub id; empty = train BPE on the train split


@dataclass(frozen=True)
class ModelConfig:
    """U-Net and markup encoder (design §4)."""

    block_out_channels: tuple[int, ...] = (32, 64, 64)
    cross_attention_levels: tuple[bool, ...] = (False, True, True)
    # > 1: the U-Net sees p x p pixel patches as channels (space-to-depth in, depth-to-space out; Hoogeboom et al.
    # 2023, "simple diffusion"), so its first level runs at H/p x W/p; must divide the image height and width
    patch_size: int = 1
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    encoder: Literal["transformer", "pretrained"] = "transformer"
    encoder_dim: int = 64
    encoder_layers: int = 2
    encoder_heads: int = 4
    pretrained_encoder: str = ""
    # pretrained encoder only: trainable transformer layers after the frozen LM (0: the LM's last hidden states as
    # they are, projected only if encoder_dim differs from its width; SS-DM feeds GPT-Neo's states straight in)
    encoder_adapter_layers: int = 1
    max_text_length: int = 128
    position_embeddings: bool = True
    position_init: Literal["random", "sinusoidal"] = "random"  # starting point of the learned position tables
    fsa: bool = False
    con_aug: bool = False
    ccam: bool = False
    ccam_blocks: int = 5  # cross-attention blocks turned into CCAMs, lowest resolution first (paper: 5)
    ccam_rank: int = 64  # rank of the CoA relation projections W_a, W_b
    # CoA's context queries: relation = Psi(R) (FSA-CDM eq. 12, the paper recipes) | relation_value = Psi(R v W_c)
    ccam_query: Literal["relation", "relation_value"] = "relation_value"
    fsa_channels: tuple[int, ...] = (32, 64, 128)  # FSA image encoder: one stride-2 residual stage per entry
    fsa_hidden: int = 128  # FSA BiLSTM hidden size per direction
    contrastive_dim: int = 128  # size of the projection head for the InfoNCE term (model.con_aug)


@dataclass(frozen=True)
class DiffusionConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    # linear: DDPM's betas (the paper protocol) | squaredcos_cap_v2: Nichol & Dhariwal's cosine alpha_bar, which
    # spends fewer steps at near-pure noise on small images (docs/decisions.md §1) | scaled_linear: latent models'
    beta_schedule: Literal["linear", "squaredcos_cap_v2", "scaled_linear"] = "linear"
    # what the U-Net predicts (the model turns it into a noise prediction; models/parameterization.py) and the loss
    # weighting: snr_gamma 0 trains each parameterisation in its own space (MSE on eps, v or y0), > 0 uses
    # min-SNR-gamma weights (Hang et al. 2023) on the y0 error: min(SNR, gamma) ||y0 - y0_hat||^2.
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    snr_gamma: float = 0.0
    # which timesteps training draws: uniform (DDPM) | shifted: t = T s u / (1 + (s - 1) u), u ~ U(0, 1), SD3's
    # timestep shift (Esser et al. 2024, sec. 5.3.2), s > 1 trains more often at high noise | logit_normal: u =
    # sigmoid(N(mean, std)) (SD3's logit-normal, diffusers' compute_density_for_timestep_sampling). decisions §1.
    timestep_sampling: Literal["uniform", "shifted", "logit_normal"] = "uniform"
    timestep_shift: float = 1.0
    timestep_logit_mean: float = 0.0
    timestep_logit_std: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    objective: ObjectiveName = "ddpm"
    steps: int = 400
    # > 0: train this many passes over the training split instead; takes precedence over steps, which becomes
    # ceil(epochs * train items / batch_size) when training starts (logged), e.g. the paper's 100 epochs
    epochs: float = 0.0
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    lr_schedule: Literal["cosine", "constant"] = "cosine"  # after the linear warm-up
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = False  # EMA decay 1 - (1 + step)^(-2/3), capped at ema_decay
    cond_dropout: float = 0.0  # share of items trained on the empty markup (for classifier-free guidance)
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0
    num_processes: int = 1
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    accelerate_config: str = ""  # an `accelerate config` YAML for multi-node runs; empty = flags from these params
    cpu: bool = False  # train on CPU processes (gloo) even where GPUs are visible
    sample_every: int = 0  # log a grid of EMA samples of train markup to DVCLive every N steps; 0 = off
    keep_checkpoints: int = 2  # newest complete checkpoints kept; 0 = keep all
    snapshot_steps: tuple[int, ...] = ()  # also save the EMA model at these steps (models/<d>/snapshots/step_N)
    num_negatives: int = 5
    ss_max_prob: float = 0.8
    cdcd_weight: float = 0.01


@dataclass(frozen=True)
class EvaluateConfig:
    num_samples: int = 16
    guidance_scale: float = 1.0  # classifier-free guidance w (1 = none; needs a model trained with cond_dropout)
    sampler: SamplerName = "ddim"
    steps: int = 20
    batch_size: int = 16
    seed: int = 42
    grid_rows: int = 8


@dataclass(frozen=True)
class ExportConfig:
    opset: int = 17
    parity_atol: float = 1e-4
    parity_steps: int = 4
    tensorrt: bool = True
    # torch.onnx exporter: "dynamo" (torch.export; the one that keeps nn.MultiheadAttention shapes dynamic) or
    # "torchscript" (legacy, deprecated; fast, but bakes the markup encoder's attention shapes in).
    exporter: Literal["dynamo", "torchscript"] = "dynamo"
    trt_batch_sizes: tuple[int, ...] = (1, 8, 16)  # TensorRT profile over batch: min, opt, max
    trt_precision: Literal["fp16", "fp32"] = "fp16"  # fp16 lives in the ONNX graph (TensorRT 11 is strongly typed)


@dataclass(frozen=True)
class HcmaConfig:
    """HCMA adaptation (design §8): global and local (layout) image-markup alignment, sampling-time guidance.

    A module whose weight is 0 is not built (no parameters); guidance needs the module it uses."""

    global_weight: float = 0.0  # weight of L_global = 1 - cos(ViT [CLS] of y_t, pooled markup) in the train loss
    local_weight: float = 0.0  # weight of L_local = mean over boxes of 1 - cos(box feature, segment markup)
    guidance_global: float = 0.0  # sampling: scale of grad_x L_global added to eps (classifier guidance)
    guidance_local: float = 0.0  # sampling: scale of grad_x L_local (needs a layout)
    patch_size: int = 8  # ViT patch side in pixels; must divide the image height and width
    dim: int = 128  # ViT width
    layers: int = 2  # ViT depth
    heads: int = 4
    fourier_bands: int = 8  # frequencies per box coordinate in the Fourier box embedding
    max_boxes: int = 32  # boxes per image kept in a batch (the first ones, in layout order)
    detach_text: bool = True  # align the image side to the markup features without moving the markup encoder
    translate: bool = True  # training: move each (y_t, boxes) pair by a random in-canvas offset (grounds L_local)
    center_text: bool = True  # align to markup features minus their running mean (else 1 - cos is trivially low)


@dataclass(frozen=True)
class Params:
    """All of ``params.yaml``."""

    lambda_: float = 0.005  # params.yaml: lambda (FSA-CDM eq. 10)
    beta: float = 0.02
    tau: float = 0.1
    infonce_weight: float = 0.0  # weight of L_infonce (paper eq. 10: 1; why 0: diffusion/objectives.py)
    # InfoNCE's negatives: the other items' views, each with its own markup (SimCLR same-batch sampling, the
    # paper's citation), or the K negative images paired with the anchor's own markup (docs/decisions.md §4)
    infonce_negatives: Literal["other_items", "own_markup"] = "other_items"
    domains: tuple[str, ...] = ("math",)
    domain: dict[str, DomainConfig] = field(default_factory=_default_domain_configs)
    data: DataConfig = field(default_factory=DataConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    hcma: HcmaConfig = field(default_factory=HcmaConfig)

    def domain_config(self, domain: str) -> DomainConfig:
        if domain not in self.domain:
            raise ConfigError(f"domain.{domain}: no such domain section; known: {sorted(self.domain)}")
        return self.domain[domain]


# ----------------------------------------------------------------------------------------------------------------
# loading


def check_type(value: Any, tp: Any, key: str) -> Any:
    """Coerce/validate ``value`` against annotation ``tp``; raise ConfigError naming ``key``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        # DVC rewrites params.yaml as YAML 1.2 (`no` unquoted); PyYAML reads YAML 1.1, where `no` is False.
        if isinstance(value, bool) and "no" in get_args(tp) and value is False:
            value = "no"
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return check_type(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not match {tp}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (elem, *rest) = get_args(tp)
        return tuple(check_type(v, elem, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, vt = get_args(tp)
        return {str(k): check_type(v, vt, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'params'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for raw_key, value in raw.items():
        name = _RENAMED.get(raw_key, raw_key) if not prefix else raw_key
        dotted = f"{prefix}.{raw_key}" if prefix else str(raw_key)
        if name not in fields:
            known = sorted(_RENAMED_BACK.get(f, f) for f in fields)
            raise ConfigError(f"{dotted}: unknown params key; known keys here: {', '.join(known)}")
        if name == "domain" and cls is Params:
            merged = _default_domain_configs()
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a mapping of domain -> settings")
            for dname, dval in value.items():
                base = dataclasses.asdict(merged[dname]) if dname in merged else {}
                base.update(dval or {})
                merged[str(dname)] = _build(DomainConfig, base, f"{dotted}.{dname}")
            kwargs[name] = merged
            continue
        kwargs[name] = check_type(value, hints[name], dotted)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{prefix or 'params'}: {exc}") from exc


def params_from_dict(raw: dict[str, Any]) -> Params:
    params = _build(Params, raw, "")
    validate(params)
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found; run from the repository root or pass --params")
    with path.open() as fh:
        raw = yaml.safe_load(fh) or {}
    return params_from_dict(raw)


def draws_negatives(p: Params) -> bool:
    """Whether the objective draws negatives (``cdcd``; ``fsa_cdm`` with the contrast-augmented terms)."""
    return p.train.objective == "cdcd" or (p.train.objective == "fsa_cdm" and p.model.con_aug)


def check_batch_split(p: Params, processes: int) -> None:
    """The global ``train.batch_size`` must split evenly into ``processes`` x ``train.grad_accum`` micro-batches,
    and the objectives that draw negatives (``cdcd``; ``fsa_cdm`` with ``model.con_aug``) need more items per
    global micro-batch (every process's share: negatives are drawn across processes) than ``train.num_negatives``.

    Called by :func:`validate` with ``train.num_processes`` and again by training with the real process count
    (an accelerate config file may set another one)."""
    t = p.train
    if t.batch_size % (processes * t.grad_accum):
        raise ConfigError(
            f"train.batch_size: {t.batch_size} is not divisible by processes x train.grad_accum "
            f"({processes} x {t.grad_accum}); the batch size is global, so make it a multiple of that product"
        )
    micro = t.batch_size // t.grad_accum  # the global micro-batch: negatives come from every process's share
    if draws_negatives(p) and t.num_negatives >= micro:
        raise ConfigError(
            f"train.num_negatives: {t.num_negatives} negatives need a global micro-batch larger than that "
            f"(train.batch_size / train.grad_accum = {micro}); lower it or raise train.batch_size"
        )


def _check_divides(p: Params, key: str, side: int) -> None:
    """``key``'s patch ``side`` must divide every configured domain's image height and width."""
    for d in p.domains:
        dc = p.domain_config(d)
        if dc.height % side or dc.width % side:
            raise ConfigError(
                f"{key}: {side} does not divide domain.{d}'s {dc.height}x{dc.width} images; choose a divisor of both"
            )


def validate(p: Params) -> None:
    """Cross-field checks that must fail before any work starts."""
    for d in p.domains:
        if d not in DOMAINS:
            raise ConfigError(f"domains: unknown domain {d!r}; choose from {list(DOMAINS)}")
        p.domain_config(d)
    m = p.model
    if len(m.cross_attention_levels) != len(m.block_out_channels):
        raise ConfigError(
            "model.cross_attention_levels: needs one entry per model.block_out_channels level "
            f"({len(m.block_out_channels)}), got {len(m.cross_attention_levels)}"
        )
    if m.patch_size < 1:
        raise ConfigError(f"model.patch_size: must be at least 1, got {m.patch_size}")
    _check_divides(p, "model.patch_size", m.patch_size)
    for c in m.block_out_channels:
        if c % m.norm_num_groups:
            raise ConfigError(f"model.block_out_channels: {c} is not divisible by model.norm_num_groups")
    if p.data.max_depth < 0 or p.data.max_terms < 1:
        raise ConfigError(
            f"data.max_depth / data.max_terms: need depth >= 0 and terms >= 1, got {p.data.max_depth} / "
            f"{p.data.max_terms}"
        )
    t = p.train
    for key in ("steps", "batch_size", "grad_accum", "num_processes", "checkpoint_every", "log_every"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key}: must be at least 1, got {getattr(t, key)}")
    for key in ("sample_every", "keep_checkpoints", "warmup_steps", "epochs"):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key}: must be 0 or more, got {getattr(t, key)}")
    check_batch_split(p, t.num_processes)
    for switch in ("fsa", "con_aug"):  # modules only fsa_cdm trains; unused parameters also break DDP
        if getattr(m, switch) and t.objective != "fsa_cdm":
            raise ConfigError(
                f"model.{switch}: only train.objective fsa_cdm trains this part (objective is {t.objective}); "
                f"set model.{switch}: false or train.objective: fsa_cdm"
            )
    if p.diffusion.timestep_shift <= 0:
        raise ConfigError(f"diffusion.timestep_shift: must be > 0 (1 = uniform), got {p.diffusion.timestep_shift}")
    if p.diffusion.timestep_logit_std <= 0:
        raise ConfigError(f"diffusion.timestep_logit_std: must be > 0, got {p.diffusion.timestep_logit_std}")
    if p.diffusion.snr_gamma < 0:
        raise ConfigError(f"diffusion.snr_gamma: must be 0 (off) or more, got {p.diffusion.snr_gamma}")
    if p.evaluate.steps < 1:
        raise ConfigError("evaluate.steps: must be at least 1")
    r = p.render
    for key in ("workers", "batch_size", "max_chars"):
        if getattr(r, key) < 1:
            raise ConfigError(f"render.{key}: must be at least 1, got {getattr(r, key)}")
    if not r.timeout > 0:
        raise ConfigError(f"render.timeout: must be more than 0 seconds, got {r.timeout}")
    if not 1 <= p.tokenize.max_length <= m.max_text_length:
        raise ConfigError(
            f"tokenize.max_length: {p.tokenize.max_length} must be between 1 and model.max_text_length "
            f"({m.max_text_length}), the longest markup the model's text positions hold"
        )
    _validate_hcma(p)


def _validate_hcma(p: Params) -> None:
    h = p.hcma
    for key in ("global_weight", "local_weight", "guidance_global", "guidance_local"):
        if getattr(h, key) < 0:
            raise ConfigError(f"hcma.{key}: must be 0 or more, got {getattr(h, key)}")
    for scale, weight in (("guidance_global", "global_weight"), ("guidance_local", "local_weight")):
        if getattr(h, scale) > 0 and not getattr(h, weight) > 0:
            raise ConfigError(
                f"hcma.{scale}: guidance needs the module it uses; set hcma.{weight} > 0 or hcma.{scale}: 0"
            )
    if not (h.global_weight or h.local_weight):
        return
    if h.dim % h.heads:
        raise ConfigError(f"hcma.dim: {h.dim} is not divisible by hcma.heads={h.heads}")
    _check_divides(p, "hcma.patch_size", h.patch_size)


def to_dict(p: Any) -> Any:
    """Params back to plain YAML-able data (with ``lambda`` restored)."""
    if dataclasses.is_dataclass(p):
        return {_RENAMED_BACK.get(f.name, f.name): to_dict(getattr(p, f.name)) for f in dataclasses.fields(p)}
    if isinstance(p, dict):
        return {k: to_dict(v) for k, v in p.items()}
    if isinstance(p, tuple):
        return [to_dict(v) for v in p]
    return p
