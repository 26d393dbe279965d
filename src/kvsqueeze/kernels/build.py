"""Build (once per machine and torch install) and load the C++/OpenMP CPU kernels in ``csrc/``.

``make install`` builds them (``python -m kvsqueeze.kernels.build``); otherwise the first use does,
saying so on stderr ("building the native kernel (first use only, ~1 min)"). Later processes only
load the cached library (~0.1 s).

Where the build lives, and why checkouts do not collide: ``torch.utils.cpp_extension.load`` runs
ninja in ``<TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions>/kvsqueeze/<name>/``, and ninja
rebuilds whenever a command line of ``build.ninja`` changes. Those lines hold absolute paths: the
sources and ``-I csrc`` (different in every checkout) and torch's and Python's headers and libraries
(different in every environment). So

* the sources are first copied into ``<name>/src/`` and compiled from there: every checkout with
  the same sources writes the same ``build.ninja`` and loads the same library, without a rebuild;
* ``<name>`` is ``kvsqueeze_cpu_<digest>``, the digest covering the sources, the flags, the CPU's
  instruction sets (``-march=native``), the compiler, torch's version and its include and library
  folders, and Python's headers: another environment or torch version gets its own folder instead
  of rebuilding (and breaking) this one.

torch holds a lock file (``<name>/lock``) while a process builds; another process waits for it,
saying once on stderr what it waits for, and gives up (reference path) on a lock older than
`STALE_LOCK_SECONDS`, left behind by a killed build.

When the build fails, `cpu_extension` warns once and returns None: every caller then takes the
reference path. ``KVSQUEEZE_NATIVE=0`` disables the native kernels without trying to build them.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("bindings.cpp", "attention.cpp", "dequantize.cpp")
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno")
LDFLAGS = ("-fopenmp",)
ENV_SWITCH = "KVSQUEEZE_NATIVE"
BUILDING = "kvsqueeze: building the native kernel (first use only, ~1 min) ..."
LOCK_GRACE_SECONDS = 1.0  # every process holds the lock briefly (ninja finds nothing to do)
STALE_LOCK_SECONDS = 15 * 60  # a build takes 1-2 minutes; an older lock was left by a killed build


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


def _toolchain() -> list[str]:
    """What else goes into the compile and link commands: compiler, torch and Python headers."""
    import torch
    from torch.utils.cpp_extension import get_cxx_compiler, include_paths, library_paths

    python_include = sysconfig.get_paths()["include"]
    return [get_cxx_compiler(), torch.__version__, *include_paths(), *library_paths(), python_include]


def extension_name(csrc: Path = CSRC) -> str:
    """``kvsqueeze_cpu_<digest>`` of the sources in ``csrc``, the flags, the CPU and the toolchain;
    the same for every checkout of the same sources in the same environment."""
    digest = hashlib.sha256()
    for part in (_cpu_flags(), *CFLAGS, *LDFLAGS, *_toolchain()):
        digest.update(part.encode() + b"\0")
    for path in sorted(p for p in csrc.iterdir() if p.is_file()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return f"kvsqueeze_cpu_{digest.hexdigest()[:12]}"


def build_directory(name: str) -> Path:
    """``<TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions>/kvsqueeze/<name>``."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / "kvsqueeze" / name


def stage_sources(csrc: Path, directory: Path) -> Path:
    """``directory/src``: a copy of ``csrc``, made once and atomically (a folder renamed into place);
    an existing copy is left as it is (its content is what the name digests, and new mtimes would
    make ninja rebuild)."""
    target = directory / "src"
    if not target.is_dir():
        directory.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".src-", dir=directory))
        staging.chmod(0o755)
        for path in csrc.iterdir():
            if path.is_file():
                shutil.copyfile(path, staging / path.name)
        try:
            staging.rename(target)
        except OSError:  # another process staged the same sources first
            shutil.rmtree(staging, ignore_errors=True)
    return target


def wait_for_lock(lock: Path, poll_seconds: float = 0.1) -> None:
    """Wait while another process builds (``lock`` exists), saying so once on stderr after
    `LOCK_GRACE_SECONDS`. Raises TimeoutError when the lock is older than `STALE_LOCK_SECONDS`."""
    said = False
    start = time.monotonic()
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age > STALE_LOCK_SECONDS:
            raise TimeoutError(
                f"the build lock {lock} is {age / 60:.0f} min old, left by a build that was killed; "
                "delete it to build again"
            )
        if not said and time.monotonic() - start >= LOCK_GRACE_SECONDS:
            print(
                f"kvsqueeze: waiting for another process to finish building the native kernel "
                f"(lock {lock}, {age:.0f} s old; if no build is running, delete it)",
                file=sys.stderr,
                flush=True,
            )
            said = True
        time.sleep(poll_seconds)


@dataclass(frozen=True)
class BuildResult:
    """What `load_extension` did: ``module`` (None when it failed, with ``error``), whether it
    compiled anything (False when the library was already built), and where."""

    name: str
    directory: Path
    module: ModuleType | None
    compiled: bool
    seconds: float
    error: str = ""


def load_extension(csrc: Path = CSRC) -> BuildResult:
    """Build the kernels of ``csrc`` if needed and load them; never raises (see ``error``)."""
    start = time.perf_counter()
    name, directory, compiled = "?", Path("?"), False
    try:
        from torch.utils.cpp_extension import LIB_EXT, load

        name = extension_name(csrc)
        directory = build_directory(name)
        library = directory / f"{name}{LIB_EXT}"
        src = stage_sources(csrc, directory)
        wait_for_lock(directory / "lock")
        before = library.stat().st_mtime_ns if library.exists() else None
        if before is None:
            print(BUILDING, file=sys.stderr, flush=True)
        module = load(
            name=name,
            sources=[str(src / s) for s in SOURCES],
            extra_cflags=list(CFLAGS),
            extra_ldflags=list(LDFLAGS),
            extra_include_paths=[str(src)],
            build_directory=str(directory),
            verbose=False,
        )
        compiled = before != (library.stat().st_mtime_ns if library.exists() else None)
        seconds = time.perf_counter() - start
        if compiled:
            print(f"kvsqueeze: native kernel built in {seconds:.0f} s ({directory})", file=sys.stderr)
        return BuildResult(name, directory, module, compiled, seconds)
    except Exception as err:  # a missing compiler, ninja or header must not break inference
        error = f"{type(err).__name__}: {str(err).strip()}"
        return BuildResult(name, directory, None, compiled, time.perf_counter() - start, error)


@functools.cache
def cpu_extension() -> ModuleType | None:
    """The compiled kernels module (``fused_attention``, ``dequantize_into``), or None if unavailable."""
    if not native_enabled():
        return None
    result = load_extension()
    if result.module is None:
        warnings.warn(
            f"kvsqueeze: the native CPU kernels could not be built ({result.error.splitlines()[0][:300]}); "
            f"falling back to the reference path (dequantize, then attention). "
            f"Set {ENV_SWITCH}=0 to skip the build; `python -m kvsqueeze.kernels.build` shows the error.",
            RuntimeWarning,
            stacklevel=2,
        )
    return result.module


def main() -> int:
    """``python -m kvsqueeze.kernels.build``: build (if needed) and report; exit 0 even on failure."""
    if not native_enabled():
        print(f"kvsqueeze: native kernels disabled ({ENV_SWITCH}=0); nothing built")
        return 0
    result = load_extension()
    if result.module is None:
        tail = "\n".join(result.error.splitlines()[-40:])
        print(
            f"kvsqueeze: the native CPU kernel could not be built; kvsqueeze will run the reference "
            f"path (slower, same results).\n{tail}",
            file=sys.stderr,
        )
        return 0
    if not result.compiled:  # a build has said so already
        print(f"kvsqueeze: native CPU kernel already built: {result.directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
