"""Determinism by construction: which items, noise and timesteps a training step uses, on any process layout.

The global batch at optimizer step ``s`` is a fixed slice of a per-epoch permutation seeded by ``(train.seed,
epoch)``, and the noise and timestep of the item at position ``j`` of that global batch come from a generator seeded
by ``(train.seed, s, j)``. Each process takes its positions of each micro-step. So:

* ``train.batch_size`` is the global batch at any process count: each of W processes runs
  ``batch_size / (W * grad_accum)`` items per micro-step, and DDP averages the gradients;
* for ``ddpm`` a run on W processes with A accumulation micro-steps computes the same gradients as 1 process with
  1 micro-step (same items, same noise; up to float summation order);
* a resumed run continues exactly as if never stopped: the batch and noise of a step depend on nothing but the
  step (the checkpoint holds every other state, :mod:`markup2image.training.checkpoints`).

Randomness an objective draws itself (negatives, augmentation, scheduled-sampling ``m`` and its noise) comes from a
generator seeded by ``(train.seed, s, micro_step, rank)``: independent per process, so with W > 1 those objectives
match a 1-process run in distribution, not bit for bit (negatives are also chosen within a process's shard). The
``hcma.translate`` offsets come from a generator seeded by ``(train.seed, s, micro_step, rank, 2)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.training_utils import compute_density_for_timestep_sampling

from markup2image.config import DiffusionConfig, TrainConfig


class BatchIndexer:
    """Dataset indices of the global batch at optimizer step ``s``: consecutive slices of per-epoch
    permutations seeded by ``(seed, epoch)``. Stateless in ``s``, so resuming needs no sampler state."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def __call__(self, step: int, batch_size: int) -> np.ndarray:
        """Indices ``[batch_size]`` (int64) of the global batch at optimizer step ``step``."""
        pos = np.arange(step * batch_size, (step + 1) * batch_size)
        return np.array([self._perm(int(p // self.n))[int(p % self.n)] for p in pos], dtype=np.int64)


def _seed(*keys: int) -> int:
    """A 64-bit seed mixed from ``keys`` (distinct keys never collide the way ``a * K + b`` sums do)."""
    entropy = [int(k) % 2**64 for k in keys]  # SeedSequence takes non-negative ints only
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


def draw_timestep(g: torch.Generator, cfg: DiffusionConfig) -> int:
    """One training timestep in ``0..T-1`` from ``g`` by ``cfg.timestep_sampling`` (``uniform``: DDPM's ``U{0..T-1}``).

    ``shifted`` and ``logit_normal`` draw a fraction ``u`` in (0, 1) and return ``floor(T u)``: ``shifted`` maps a
    uniform ``u`` to ``s u / (1 + (s - 1) u)`` (SD3's timestep shift; ``s = 1`` is uniform), ``logit_normal`` is
    diffusers' ``compute_density_for_timestep_sampling`` (SD3's ``sigmoid(N(mean, std))``).
    """
    steps = cfg.num_train_timesteps
    if cfg.timestep_sampling == "uniform":
        return int(torch.randint(0, steps, (1,), generator=g)[0])
    if cfg.timestep_sampling == "shifted":
        u = float(torch.rand(1, generator=g)[0])
        u = cfg.timestep_shift * u / (1.0 + (cfg.timestep_shift - 1.0) * u)
    else:
        u = float(
            compute_density_for_timestep_sampling(
                "logit_normal", 1, logit_mean=cfg.timestep_logit_mean, logit_std=cfg.timestep_logit_std, generator=g
            )[0]
        )
    return min(steps - 1, int(steps * u))


def draw_noise(
    step: int, seed: int, positions: np.ndarray, image_shape: tuple[int, int, int], diffusion: DiffusionConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise ``eps [b, C, H, W]`` and timesteps ``[b]`` (:func:`draw_timestep`) of the global-batch ``positions
    [b]`` at step ``step``.

    Position ``j`` draws from its own generator seeded by ``(seed, step, j)``, so however the global batch is split
    over processes and micro-steps, every item gets the same noise; a process draws only its own items.
    """
    noise = torch.empty((len(positions), *image_shape))
    timesteps = torch.empty(len(positions), dtype=torch.long)
    for i, j in enumerate(positions):
        g = torch.Generator().manual_seed(_seed(seed, step, j))
        timesteps[i] = draw_timestep(g, diffusion)
        noise[i] = torch.randn(image_shape, generator=g)
    return noise, timesteps


def extras_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The generator an objective draws its own randomness from: one per (seed, step, micro-step, rank)."""
    return torch.Generator().manual_seed(_seed(seed, step, micro, rank, 1))


def hcma_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The generator of the ``hcma.translate`` offsets: one per (seed, step, micro-step, rank), apart from the
    objective's, so switching HCMA on leaves every draw of the objective as it was."""
    return torch.Generator().manual_seed(_seed(seed, step, micro, rank, 2))


@dataclass(frozen=True)
class MicroBatchShare:
    """One process's share of one global micro-batch: dataset indices ``[b]``, noise ``eps [b, C, H, W]`` and
    timesteps ``[b]``, with ``b = train.batch_size / (train.grad_accum * world)``."""

    indices: np.ndarray
    noise: torch.Tensor
    timesteps: torch.Tensor
    positions: np.ndarray  # (b,) positions in the global batch


def condition_dropout(seed: int, step: int, positions: np.ndarray, p: float) -> torch.Tensor:
    """``[b]`` bool: which global-batch ``positions`` train without their markup at ``step`` (``train.cond_dropout``).

    Drawn per position from its own generator (like :func:`draw_noise`), so any process split drops the same items.
    """
    if p <= 0:
        return torch.zeros(len(positions), dtype=torch.bool)
    draws = [
        torch.rand(1, generator=torch.Generator().manual_seed(_seed(seed, step, int(j), 7)))[0] for j in positions
    ]
    return torch.stack(draws) < p


def drop_markup(ids: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor, null: Sequence[int], pad: int):
    """``ids, mask [B, N]`` with the rows in ``drop`` replaced by the empty markup ``null`` (e.g. [BOS, EOS])."""
    if not bool(drop.any()):
        return ids, mask
    ids, mask = ids.clone(), mask.clone()
    n = min(len(null), ids.shape[1])
    ids[drop] = pad
    ids[drop, :n] = torch.tensor(list(null[:n]), dtype=ids.dtype)
    mask[drop] = 0
    mask[drop, :n] = 1
    return ids, mask


def micro_batch_share(
    cfg: TrainConfig,
    batch_indices: np.ndarray,
    step: int,
    micro: int,
    rank: int,
    world: int,
    image_shape: tuple[int, int, int],
    diffusion: DiffusionConfig,
) -> MicroBatchShare:
    """Micro-step ``micro`` of optimizer step ``step`` for process ``rank`` of ``world``.

    ``batch_indices [train.batch_size]`` is the global batch (:class:`BatchIndexer`); ``image_shape`` is (C, H, W);
    ``diffusion`` says how timesteps are drawn (:func:`draw_timestep`).
    The global batch is cut into ``grad_accum`` micro-batches, each into ``world`` equal shares, in that order.
    """
    local = cfg.batch_size // (cfg.grad_accum * world)
    first = (micro * world + rank) * local
    positions = np.arange(first, first + local)  # (b,) positions in the global batch
    noise, timesteps = draw_noise(step, cfg.seed, positions, image_shape, diffusion)
    return MicroBatchShare(batch_indices[positions], noise, timesteps, positions)
