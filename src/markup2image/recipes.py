"""Paper recipes: files of dotted ``params.yaml`` overrides, queued as ``dvc exp run -S key=value ...``.

Every key a recipe sets must exist in ``params.yaml`` (DVC's ``-S`` edits keys, it does not add them).

A recipe (``configs/paper/<domain>.yaml``) is ``{"name": str, "set": {dotted.key: value}}``. It is not a second
code path: :func:`dvc_command` turns it into the ``-S`` overrides of ``dvc exp run``, and :func:`recipe_params`
applies the same overrides to a params file in memory (what DVC will write), so a recipe is checked, and its
model built on the meta device, before any GPU time is spent (``markup2image recipe ... --check``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml

from markup2image.config import ConfigError, Params, params_from_dict
from markup2image.models.summary import attention_layout, parameter_summary

PAPER_RECIPES = Path("configs") / "paper"


def load_recipe(path: str | Path) -> tuple[str, dict[str, Any]]:
    """``(name, overrides)`` of a recipe file; a clear :class:`ConfigError` for a malformed one."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the recipe ({exc})") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("set"), dict) or not raw.get("name"):
        raise ConfigError(f"{path}: a recipe needs 'name' and a 'set' mapping of dotted params keys to values")
    return str(raw["name"]), dict(raw["set"])


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of the params mapping ``raw`` with each ``dotted.key: value`` set (intermediate mappings created)."""
    out = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        node = out
        *parents, leaf = str(dotted).split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{dotted}: {part!r} is not a mapping in params.yaml")
            node = child
        node[leaf] = value
    return out


def recipe_params(recipe: str | Path, params_file: str | Path = "params.yaml") -> Params:
    """The validated :class:`Params` that ``dvc exp run`` with the recipe's overrides would train with."""
    base = yaml.safe_load(Path(params_file).read_text()) if Path(params_file).exists() else {}
    _, overrides = load_recipe(recipe)
    return params_from_dict(apply_overrides(base or {}, overrides))


def _value(value: Any) -> str:
    """A ``-S`` value as DVC parses it back (Hydra's override grammar): JSON, so strings are double-quoted and stay
    strings (``no`` would not survive YAML) and lists / booleans / numbers keep their types."""
    return json.dumps(value)


def dvc_command(recipe: str | Path, queue: bool = True, name: str | None = None) -> list[str]:
    """``dvc exp run [--queue] -n NAME -S key=value ...`` for the recipe file."""
    default_name, overrides = load_recipe(recipe)
    cmd = ["dvc", "exp", "run", *(["--queue"] if queue else []), "-n", name or default_name]
    for key, value in overrides.items():
        cmd += ["-S", f"{key}={_value(value)}"]
    return cmd


def recipe_check(recipe: str | Path, params_file: str | Path = "params.yaml") -> dict[str, Any]:
    """Validate a recipe against ``params_file`` and build its model on the meta device: the training budget,
    the attention layout (head count, cross-attention and CCAM sites) and the parameter groups, as JSON."""

    name, _ = load_recipe(recipe)
    params = recipe_params(recipe, params_file)
    domain = params.domains[0]
    t = params.train
    try:
        summary = parameter_summary(params, domain, vocab_size=512)
        layout = attention_layout(params, domain)
    except OSError as exc:  # a hub id for the pretrained encoder with no network and no cache
        raise ConfigError(
            f"{recipe}: cannot read the config of model.pretrained_encoder {params.model.pretrained_encoder!r} "
            f"({exc}); set it to a local folder (-S model.pretrained_encoder=PATH) or allow the hub"
        ) from exc
    return {
        "recipe": name,
        "domain": domain,
        "train": {
            "objective": t.objective,
            "global_batch": t.batch_size,
            "processes": t.num_processes,
            "epochs": t.epochs,
            "lr": t.lr,
            "warmup_steps": t.warmup_steps,
            "lr_schedule": t.lr_schedule,
        },
        "attention": layout,
        "parameters": summary,
    }
