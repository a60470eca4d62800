"""Markers that skip with a reason where the hardware or tool is absent (CI has no GPU and no TensorRT).

In CI (``CI=true``) the TeX Live and LilyPond tests must run: a missing tool there fails instead of skipping.
"""

import importlib.util
import os
import shutil

import pytest


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _shares_a_module_fixture(item) -> bool:
    """True when the test uses a module- or wider-scoped fixture defined by the project's tests (not pytest's own
    session fixtures such as tmp_path_factory): its module's tests then stay on one xdist worker."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    for defs in info.name2fixturedefs.values():
        for d in defs:
            if d.scope != "function" and "tests" in str(getattr(d, "baseid", "") or "").split("/")[0:1]:
                return True
    return False


def pytest_collection_modifyitems(config, items):
    in_ci = os.environ.get("CI", "").lower() == "true"
    reasons = {
        "gpu": None if _cuda() else "needs a CUDA GPU; none on this machine",
        "tensorrt": None if importlib.util.find_spec("tensorrt") else "needs TensorRT (not on PyPI here)",
    }
    tools = {"latex": ("latex", "dvipng"), "lilypond": ("lilypond",)}
    for marker, needed in tools.items():
        missing = [t for t in needed if shutil.which(t) is None]
        reasons[marker] = f"needs {', '.join(missing)} (apt-get install via scripts/setup.sh)" if missing else None
    for item in items:
        if _shares_a_module_fixture(item):  # scripts/test.sh runs --dist loadgroup: build such fixtures once
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
        for marker, reason in reasons.items():
            if reason and marker in item.keywords and not (in_ci and marker in tools):
                item.add_marker(pytest.mark.skip(reason=reason))
