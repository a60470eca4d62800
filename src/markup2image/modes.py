"""Every mode the project offers, each listed once as a ``Literal`` and the tuple derived from it.

A leaf module (standard library only): the typed config, the CLI's choices, the registries and the torch-free
runtime all read their lists from here, and the runtime stays free of ``config.py`` (and so of PyYAML).
"""

from __future__ import annotations

from typing import Literal, get_args

Domain = Literal["math", "tables", "music", "molecules"]
DOMAINS: tuple[str, ...] = get_args(Domain)
SamplerName = Literal["ddpm", "ddim", "dpm_solver"]
SAMPLERS: tuple[str, ...] = get_args(SamplerName)
ObjectiveName = Literal["ddpm", "ss_dm", "cdcd", "fsa_cdm"]
OBJECTIVE_NAMES: tuple[str, ...] = get_args(ObjectiveName)
TokenizerKind = Literal["bpe", "word", "char"]
TOKENIZER_KINDS: tuple[str, ...] = get_args(TokenizerKind)
