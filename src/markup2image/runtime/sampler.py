"""Sampling from an exported folder with numpy + ONNX Runtime (or TensorRT): the deployable piece (design §7).

No torch here. The loop is ``diffusion.sampling.sample_images`` with the numpy steppers of
:mod:`markup2image.runtime.schedulers`: ``x_T`` from ``np.random.default_rng(seed)``, the markup encoded once per
batch, one U-Net call per step, ddpm noise drawn after each call. Same seed -> the same image as the torch sampler.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from markup2image.runtime.manifest import load_manifest
from markup2image.runtime.onnx_runner import Denoiser, OnnxRuntimeDenoiser
from markup2image.runtime.schedulers import make_stepper
from markup2image.runtime.tensorrt_runner import TensorRTDenoiser
from markup2image.text.tokenizer import empty_markup_like, encode_batch, load_tokenizer

log = logging.getLogger(__name__)

Backend = Literal["onnxruntime", "tensorrt"]
BACKENDS: tuple[str, ...] = ("onnxruntime", "tensorrt")


class ExportedModel:
    """An exported folder ready to sample: manifest, tokenizer and a backend.

    Args:
        folder: what the export stage wrote (``export/<domain>``).
        backend: ``onnxruntime`` or ``tensorrt`` (needs the engine built by the export stage and TensorRT).
        threads: ONNX Runtime intra-op threads.
        verify: check every file's sha256 against the manifest before loading (default; sizes are always checked):
            a flipped byte in a graph gives wrong images, not an error.
        manifest: use this manifest instead of reading ``manifest.json`` (the export stage, before it writes one).
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        backend: str = "onnxruntime",
        threads: int | None = None,
        verify: bool = True,
        providers: Sequence[str] | None = None,
        manifest: dict[str, Any] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.manifest = manifest if manifest is not None else load_manifest(self.folder, verify=verify)
        image = self.manifest["image"]
        self.image_shape: tuple[int, int, int] = (image["channels"], image["height"], image["width"])
        self.scheduler_config: dict[str, Any] = self.manifest["scheduler"]
        self.max_text_length: int = self.manifest["max_text_length"]
        self.tokenizer = load_tokenizer(self.folder / self.manifest["tokenizer"])
        if backend == "onnxruntime":
            self.backend: Denoiser = OnnxRuntimeDenoiser(self.folder, self.manifest, threads, providers)
        elif backend == "tensorrt":
            self.backend = TensorRTDenoiser(self.folder, self.manifest)
        else:
            raise ValueError(f"backend: unknown backend {backend!r}; choose from {list(BACKENDS)}")
        self.backend_name = backend

    def tokenize(self, markups: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Markup strings -> ``input_ids, attention_mask [B, N]`` int64 (as the train stage tokenized them)."""
        return encode_batch(self.tokenizer, markups, self.max_text_length)

    def sample(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        *,
        sampler: str,
        steps: int,
        seed: int,
        progress: bool = False,
        guidance_scale: float | None = None,
    ) -> np.ndarray:
        """One batch: ``[B, N]`` ids and mask -> images in [-1, 1], ``[B, C, H, W]`` float32.

        ``guidance_scale``: classifier-free guidance (default: the manifest's, i.e. the evaluate stage's)."""
        w = self.manifest.get("defaults", {}).get("guidance_scale", 1.0) if guidance_scale is None else guidance_scale
        return sample_numpy(
            self.backend,
            input_ids,
            attention_mask,
            image_shape=self.image_shape,
            scheduler_config=self.scheduler_config,
            sampler=sampler,
            steps=steps,
            seed=seed,
            progress=progress,
            guidance_scale=w,
            uncond=empty_markup_like(self.tokenizer, input_ids) if w != 1.0 else None,
        )

    def generate(
        self,
        markups: Sequence[str],
        *,
        sampler: str,
        steps: int,
        seed: int,
        batch_size: int = 8,
        progress: bool = False,
    ) -> list[np.ndarray]:
        """Markup strings -> uint8 images (``[H, W]`` or ``[H, W, 3]``); batch ``b`` uses seed ``seed + b``.

        That is the evaluate stage's convention, so the same markup in the same batch position gives its image.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size: must be at least 1, got {batch_size}")
        out: list[np.ndarray] = []
        for b, start in enumerate(range(0, len(markups), batch_size)):
            ids, mask = self.tokenize(markups[start : start + batch_size])
            images = self.sample(ids, mask, sampler=sampler, steps=steps, seed=seed + b, progress=progress)
            out.extend(to_uint8(images))
        return out


def sample_numpy(
    denoiser: Denoiser,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    *,
    image_shape: tuple[int, int, int],
    scheduler_config: dict[str, Any],
    sampler: str,
    steps: int,
    seed: int,
    progress: bool = False,
    guidance_scale: float = 1.0,
    uncond: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """The torch-free twin of ``diffusion.sampling.sample_images``: ``[B, N]`` -> ``[B, C, H, W]`` in [-1, 1]
    (with the same classifier-free guidance: ``uncond`` the empty markup's ids and mask when ``guidance_scale``
    is not 1)."""
    stepper = make_stepper(sampler, scheduler_config, steps)
    shape = (input_ids.shape[0], *image_shape)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape, dtype=np.float32)  # x_T: the generator's first draw
    hidden = denoiser.encode(input_ids, attention_mask)  # (B, N, D), once per batch
    guided = guidance_scale != 1.0
    if guided:
        if uncond is None:
            raise ValueError("guidance_scale: classifier-free guidance needs the empty markup's ids")
        hidden = np.concatenate([hidden, denoiser.encode(*uncond)])  # (2B, N, D)
        attention_mask = np.concatenate([attention_mask, uncond[1]])
    for t in tqdm(stepper.timesteps, desc=f"{sampler} sampling", disable=not progress, leave=False):
        tt = np.full((hidden.shape[0],), t, dtype=np.int64)
        if guided:
            eps_markup, eps_empty = np.split(denoiser.denoise(np.concatenate([x, x]), tt, hidden, attention_mask), 2)
            eps = eps_empty + np.float32(guidance_scale) * (eps_markup - eps_empty)
        else:
            eps = denoiser.denoise(x, tt, hidden, attention_mask)
        noise = rng.standard_normal(shape, dtype=np.float32) if stepper.needs_noise else None
        x = stepper.step(eps, int(t), x, noise)
    return np.clip(x, -1.0, 1.0)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """``[B, C, H, W]`` in [-1, 1] -> uint8 ``[B, H, W]`` (C=1) or ``[B, H, W, 3]``, rounding half to even as torch."""
    arr = np.round((np.clip(images.astype(np.float32), -1, 1) + np.float32(1)) * np.float32(127.5)).astype(np.uint8)
    arr = arr.transpose(0, 2, 3, 1)
    return arr[..., 0] if arr.shape[-1] == 1 else arr
