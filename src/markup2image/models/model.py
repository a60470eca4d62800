"""The conditional denoiser: markup encoder + diffusers ``UNet2DConditionModel`` (design §4).

``MarkupToImageModel`` is what training, sampling, evaluation and export share. It is saved as a folder holding
``model_config.json`` (everything needed to rebuild it) and ``model.safetensors``.

Parts that exist only when their switch is on (paper Table 2 ablations), so switching one off removes both its
parameters and its compute:

* ``model.fsa``: :class:`FineGrainedSequenceAlignment` (``self.alignment``), training only;
* ``model.con_aug``: the projection head of the InfoNCE term (``self.contrastive_head``), training only;
* ``model.ccam``: CCAM processors inside the U-Net (used at sampling time too);
* ``hcma.global_weight`` / ``hcma.local_weight``: the HCMA alignment module (``self.hcma``, design §8), trained
  jointly through ``forward(..., hcma_batch=...)`` and used for guidance at sampling time.

Training objectives call the model only through ``forward`` (one call per step with gradients), so a
``DistributedDataParallel`` wrapper sees every parameter it has to reduce.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from markup2image.config import DiffusionConfig, DomainConfig, HcmaConfig, ModelConfig, check_type
from markup2image.data.layout_tensors import HcmaBatch
from markup2image.io import CorruptFileError, atomic_open, read_json
from markup2image.models.encoder import PretrainedMarkupEncoder, TransformerMarkupEncoder
from markup2image.models.fsa import FineGrainedSequenceAlignment
from markup2image.models.hcma import HcmaModule, build_hcma, hcma_loss
from markup2image.models.parameterization import EpsilonFromPrediction
from markup2image.models.unet_parts import build_unet

__all__ = [
    "DenoiserOutput",
    "MarkupToImageModel",
    "build_encoder",
    "build_unet",
    "diffusion_of",
    "load_model",
    "model_from_config",
    "trained_diffusion",
    "unwrap_model",
]

MODEL_CONFIG = "model_config.json"
MODEL_WEIGHTS = "model.safetensors"


def build_encoder(cfg: ModelConfig, vocab_size: int, pad_id: int, load_pretrained: bool = True) -> nn.Module:
    """The markup encoder of ``cfg.encoder``; ``load_pretrained=False`` builds a pretrained LM from its config only."""
    if cfg.encoder == "pretrained":
        if not cfg.pretrained_encoder:
            raise ValueError("model.pretrained_encoder: set a local folder or hub id when model.encoder is pretrained")
        return PretrainedMarkupEncoder(
            path_or_id=cfg.pretrained_encoder,
            dim=cfg.encoder_dim,
            num_adapter_layers=cfg.encoder_adapter_layers,
            num_heads=cfg.encoder_heads,
            load_weights=load_pretrained,
        )
    return TransformerMarkupEncoder(
        vocab_size=vocab_size,
        dim=cfg.encoder_dim,
        num_layers=cfg.encoder_layers,
        num_heads=cfg.encoder_heads,
        max_length=cfg.max_text_length,
        pad_id=pad_id,
    )


class ContrastiveHead(nn.Module):
    """Pooled U-Net mid-block features ``[B, C, h, w]`` -> L2-normalised projections ``[B, P]``."""

    def __init__(self, channels: int, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.net(features.mean(dim=(2, 3))), dim=-1)


@dataclass
class DenoiserOutput:
    """What a training forward returns when it is asked for more than the noise prediction.

    sample: ``eps_theta [B', C, H, W]``; alignment_loss: scalar ``L_fa`` (``align_images`` given);
    mid_projection: ``[B', P]`` normalised projections of pooled mid-block features (``return_mid``);
    hcma_loss: scalar weighted HCMA loss and hcma_terms its logged terms (``hcma_batch`` given, model with HCMA).
    """

    sample: torch.Tensor
    alignment_loss: torch.Tensor | None = None
    mid_projection: torch.Tensor | None = None
    hcma_loss: torch.Tensor | None = None
    hcma_terms: dict[str, float] = dataclasses.field(default_factory=dict)


def unwrap_model(model: nn.Module) -> MarkupToImageModel:
    """The ``MarkupToImageModel`` inside DDP / ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


class MarkupToImageModel(nn.Module):
    """``eps_theta(y_t, t, markup)``.

    Args:
        model_cfg: the ``model`` params section.
        image: geometry of the domain's images.
        vocab_size / pad_id: from the tokenizer.
        load_pretrained: False builds a pretrained encoder from its config without weights (parameter counts).
        hcma: the ``hcma`` params section; an HCMA module is built only when one of its weights is > 0 (and after
            every other part, so the others initialise exactly as without it).
        diffusion: the ``diffusion`` section; with ``prediction_type`` ``v_prediction`` or ``sample`` the U-Net
            predicts that and :meth:`denoise` turns it into ``eps`` (no parameters; None = ``epsilon``).
    """

    def __init__(
        self,
        *,
        model_cfg: ModelConfig,
        image: DomainConfig,
        vocab_size: int,
        pad_id: int = 0,
        load_pretrained: bool = True,
        hcma: HcmaConfig | None = None,
        diffusion: DiffusionConfig | None = None,
    ) -> None:
        super().__init__()
        self.model_cfg = model_cfg
        self.image = image
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.encoder = build_encoder(model_cfg, vocab_size, pad_id, load_pretrained=load_pretrained)
        self.unet: UNet2DConditionModel = build_unet(model_cfg, image)
        self.alignment = FineGrainedSequenceAlignment(model_cfg, image) if model_cfg.fsa else None
        mid_channels = model_cfg.block_out_channels[-1]
        self.contrastive_head = ContrastiveHead(mid_channels, model_cfg.contrastive_dim) if model_cfg.con_aug else None
        self.hcma: HcmaModule | None = (
            build_hcma(hcma, image=image, text_dim=model_cfg.encoder_dim) if hcma is not None else None
        )
        self.diffusion = diffusion or DiffusionConfig()
        native = self.diffusion.prediction_type != "epsilon"
        self.to_epsilon = EpsilonFromPrediction(self.diffusion) if native else None

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` ids and mask -> markup features ``t [B, N, D]``."""
        return self.encoder(input_ids, attention_mask)

    def denoise(
        self, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """``sample [B, C, H, W]``, ``timestep [B]``, ``hidden [B, N, D]``, mask ``[B, N]`` -> ``eps [B, C, H, W]``."""
        out = self.unet(sample, timestep, encoder_hidden_states=hidden, encoder_attention_mask=attention_mask).sample
        return out if self.to_epsilon is None else self.to_epsilon(out, sample, timestep)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        text_index: torch.Tensor | None = None,
        align_images: torch.Tensor | None = None,
        return_mid: bool = False,
        hcma_batch: HcmaBatch | None = None,
    ) -> torch.Tensor | DenoiserOutput:
        """``eps_theta``; with any keyword option a :class:`DenoiserOutput`.

        Args:
            sample: ``y_t [B', C, H, W]``; timestep ``[B']``.
            input_ids, attention_mask: ``[B, N]`` markup, encoded once.
            text_index: ``[B']`` row of the markup batch each sample is conditioned on (default: ``B' = B``,
                sample ``i`` on markup ``i``). Lets K+2 views of a batch share one encoding and one U-Net call.
            align_images: clean images ``y0 [B, C, H, W]`` for the FSA loss (needs ``model.fsa``).
            return_mid: also return the contrastive projections of the mid-block features (needs ``model.con_aug``).
            hcma_batch: layouts and generator for the HCMA loss (needs the HCMA module), computed on the first
                ``B`` rows of ``sample``: the noisy images of markup ``i`` (``text_index[:B]`` must be ``0..B-1``).
        """
        hidden = self.encode(input_ids, attention_mask)  # (B, N, D)
        out = DenoiserOutput(sample)  # .sample is replaced by eps below
        if align_images is not None:
            if self.alignment is None:
                raise ValueError("model.fsa: the FSA loss was requested but model.fsa is false")
            out.alignment_loss = self.alignment(align_images, hidden, attention_mask)
        if hcma_batch is not None:
            out.hcma_loss, out.hcma_terms = self._hcma_loss(sample, timestep, hidden, attention_mask, hcma_batch)
        mask = attention_mask
        if text_index is not None:
            hidden, mask = hidden[text_index], attention_mask[text_index]  # (B', N, D), (B', N)
        if not return_mid:
            out.sample = self.denoise(sample, timestep, hidden, mask)
            return out.sample if align_images is None and hcma_batch is None else out
        if self.contrastive_head is None:
            raise ValueError("model.con_aug: mid-block projections were requested but model.con_aug is false")
        captured: list[torch.Tensor] = []
        handle = self.unet.mid_block.register_forward_hook(lambda _m, _i, o: captured.append(o))
        try:
            out.sample = self.denoise(sample, timestep, hidden, mask)
        finally:
            handle.remove()
        out.mid_projection = self.contrastive_head(captured[0])
        return out

    def _hcma_loss(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        hcma_batch: HcmaBatch,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """:func:`~markup2image.models.hcma.hcma_loss` on the anchors ``y_t = sample[:B]`` (``B`` = markup rows)."""
        if self.hcma is None:
            raise ValueError("hcma.global_weight / hcma.local_weight: an HCMA loss was requested but both are 0")
        b = hidden.shape[0]
        return hcma_loss(self.hcma, sample[:b], timestep[:b], hidden, mask, hcma_batch.layout, hcma_batch.generator)

    # -- persistence --------------------------------------------------------------------------------------------

    def config_dict(self) -> dict[str, Any]:
        """Everything :func:`model_from_config` needs; ``hcma_module`` only for a model with an HCMA module (what
        :func:`markup2image.models.hcma.load_hcma` reads, with the ``hcma.*`` weights)."""
        cfg = {
            "model": dataclasses.asdict(self.model_cfg),
            "image": dataclasses.asdict(self.image),
            "vocab_size": self.vocab_size,
            "pad_id": self.pad_id,
            "diffusion": dataclasses.asdict(self.diffusion),
        }
        if self.hcma is not None:
            cfg["hcma_module"] = self.hcma.config_dict()
        return cfg

    def save(self, folder: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Write ``model_config.json`` and ``model.safetensors`` into ``folder`` (atomically, file by file)."""
        from safetensors.torch import save

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = self.config_dict() | (extra or {})
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_open(folder / MODEL_WEIGHTS, "wb") as fh:
            fh.write(save(state))
        with atomic_open(folder / MODEL_CONFIG) as fh:
            json.dump(cfg, fh, indent=2)


def model_from_config(cfg: dict[str, Any]) -> MarkupToImageModel:
    """Rebuild an (untrained) model from a ``model_config.json`` dict."""

    model_cfg = check_type(cfg["model"], ModelConfig, "model_config.model")
    image = check_type(cfg["image"], DomainConfig, "model_config.image")
    hcma = None
    if cfg.get("hcma_module"):
        hcma = check_type(cfg["hcma_module"]["hcma"], HcmaConfig, "model_config.hcma_module.hcma")
    return MarkupToImageModel(
        model_cfg=model_cfg,
        image=image,
        vocab_size=cfg["vocab_size"],
        pad_id=cfg["pad_id"],
        hcma=hcma,
        diffusion=diffusion_of(cfg),
    )


def diffusion_of(cfg: dict[str, Any]) -> DiffusionConfig:
    """The diffusion config (schedule, parameterisation) of a ``model_config.json`` dict: its own ``diffusion``
    entry, else (folders written before it existed) the saved params', else the defaults."""

    saved = cfg.get("diffusion") or cfg.get("params", {}).get("diffusion")
    return check_type(saved, DiffusionConfig, "model_config.diffusion") if saved else DiffusionConfig()


def trained_diffusion(folder: str | Path) -> DiffusionConfig:
    """The diffusion config a saved model folder was trained with (:func:`diffusion_of` its config)."""
    path = Path(folder) / MODEL_CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{folder}: no {MODEL_CONFIG}; point --model at a trained model folder")
    return diffusion_of(json.loads(path.read_text()))


def load_model(folder: str | Path, map_location: str | torch.device = "cpu") -> MarkupToImageModel:
    """Load a model saved by :meth:`MarkupToImageModel.save`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path = folder / MODEL_CONFIG
    if not cfg_path.exists():
        raise FileNotFoundError(
            f"{folder}: no {MODEL_CONFIG}; point --model at a trained model folder (models/<domain>/model)"
        )
    cfg = read_json(cfg_path, fix="copy the model folder again or retrain")
    model = model_from_config(cfg)
    weights = folder / MODEL_WEIGHTS
    if not weights.exists():
        raise FileNotFoundError(f"{weights}: missing; copy the whole model folder or retrain (dvc repro train)")
    try:
        state = load_file(str(weights), device=str(map_location))
        model.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type; a wrong tensor: RuntimeError
        raise CorruptFileError(
            f"{weights}: cannot be loaded ({type(exc).__name__}: {str(exc)[:200]}); the file is damaged or from "
            "another model: copy the model folder again or retrain (dvc repro train)"
        ) from exc
    return model.eval()
