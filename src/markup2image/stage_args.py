"""Shared bits of the stage scripts (stages/*.py): argument parsing, logging and params loading."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from markup2image.config import ConfigError, Params, load_params
from markup2image.io import CorruptFileError


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--domain", required=True, help="one of params.yaml's domains")
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return p


@contextmanager
def user_errors() -> Iterator[None]:
    """End a stage with one ``error:`` line, no traceback, for errors that already name the file or key and the fix:
    a bad params value, a corrupt or missing input file."""
    try:
        yield
    except (ConfigError, CorruptFileError, FileNotFoundError) as exc:
        sys.exit(f"error: {exc}")


def setup(args: argparse.Namespace) -> Params:
    """Logging + params; a bad params key ends the stage with one clear line."""
    logging.basicConfig(level=os.environ.get("MARKUP2IMAGE_LOG", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    try:
        params = load_params(args.params)
        params.domain_config(args.domain)
    except ConfigError as exc:
        sys.exit(f"error: {args.params}: {exc}")
    return params
