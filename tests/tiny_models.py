"""The tiny model configuration the unit tests share (importable: pytest puts this folder on ``sys.path``)."""

from __future__ import annotations

from markup2image.config import DomainConfig, ModelConfig

TINY_IMAGE = DomainConfig(height=8, width=16, channels=1)
TINY_MODEL = ModelConfig(
    block_out_channels=(8, 16),
    cross_attention_levels=(True, True),
    layers_per_block=1,
    attention_head_dim=2,
    norm_num_groups=4,
    encoder_dim=16,
    encoder_layers=1,
    encoder_heads=2,
    max_text_length=12,
    ccam_blocks=2,
    ccam_rank=4,
    fsa_channels=(4, 8),
    fsa_hidden=8,
    contrastive_dim=8,
)
