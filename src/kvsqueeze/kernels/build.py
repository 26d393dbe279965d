"""Build (at first use) and load the C++/OpenMP CPU kernels in ``csrc/``.

The extension is compiled once per machine with ``torch.utils.cpp_extension.load`` (g++ and ninja)
and cached in torch's extensions folder (``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``);
later processes only load the cached library (~0.1 s). The name carries a digest of the sources and
of the CPU's instruction sets, because the code is compiled with ``-march=native``.

When the build fails, `cpu_extension` warns once and returns None: every caller then takes the
reference path. ``KVSQUEEZE_NATIVE=0`` disables the native kernels without trying to build them.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import warnings
from pathlib import Path
from types import ModuleType

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("bindings.cpp", "attention.cpp", "dequantize.cpp")
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno")
ENV_SWITCH = "KVSQUEEZE_NATIVE"


def native_enabled() -> bool:
    """False when the user disabled native kernels with ``KVSQUEEZE_NATIVE=0``."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def extension_name() -> str:
    """``kvsqueeze_cpu_<digest>``, the digest covering the C++ sources, the flags and the CPU."""
    digest = hashlib.sha256(_cpu_flags().encode() + " ".join(CFLAGS).encode())
    for path in sorted(CSRC.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    return f"kvsqueeze_cpu_{digest.hexdigest()[:12]}"


@functools.cache
def cpu_extension() -> ModuleType | None:
    """The compiled kernels module (``fused_attention``, ``dequantize_into``), or None if unavailable."""
    if not native_enabled():
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(
            name=extension_name(),
            sources=[str(CSRC / s) for s in SOURCES],
            extra_cflags=list(CFLAGS),
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(CSRC)],
            verbose=False,
        )
    except Exception as err:  # a missing compiler, ninja or header must not break inference
        reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        warnings.warn(
            f"kvsqueeze: the native CPU kernels could not be built ({type(err).__name__}: {reason}); "
            f"falling back to the reference path (dequantize, then attention). "
            f"Set {ENV_SWITCH}=0 to skip the build.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
