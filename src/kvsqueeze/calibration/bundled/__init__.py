"""Calibration files shipped with kvsqueeze, used by the ``best-*`` presets for the models they fit.

``kvsqueeze calibrate`` output for the embedded SmolLM2-135M (calibration slice: the last 1024
tokens of the WikiText-2 raw test file; the quality figures are measured on its first 4096). A
``best-*`` preset name given to `SqueezedCache` resolves to the bundled file when the model's
config matches the file's fingerprint (`fingerprint`), else to the generic preset in `PRESETS`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from ...config import CacheConfig
from ...config_file import FINGERPRINT_FIELDS, fingerprint_diffs, read_json
from ...config_file import model_fingerprint as fingerprint

__all__ = ["FINGERPRINT_FIELDS", "bundled_config", "fingerprint"]

HERE = Path(__file__).resolve().parent


@functools.cache
def _files() -> tuple[tuple[str, str], ...]:
    """(preset name, path) of every bundled calibration file."""
    rows = []
    for path in sorted(HERE.glob("*.json")):
        data = read_json(path, "bundled calibration")
        rows.append((data["calibration"]["preset"], str(path)))
    return tuple(rows)


def bundled_config(name: str, model_config: Any) -> CacheConfig | None:
    """The bundled calibrated config for preset ``name`` and this model (its fingerprint matches), or None."""
    for preset, path in _files():
        if preset == name:
            config = CacheConfig.load(path)
            if not fingerprint_diffs(config.model_fingerprint, model_config):
                return config
    return None
