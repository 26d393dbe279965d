"""The native kernel build (issue 12, item 4): keyed so that checkouts and environments do not
rebuild each other's kernel, built by ``make install``, and never waiting silently on a lock.

Most tests replace ``torch.utils.cpp_extension.load`` by a fake that records its arguments and
"builds" (writes the library file) when the library is missing, in a private TORCH_EXTENSIONS_DIR;
`test_a_second_checkout_loads_the_first_ones_kernel` uses the real build, in subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from kvsqueeze.kernels import build, cpu

ROOT = Path(__file__).resolve().parents[1]


def checkout(tmp_path: Path, name: str) -> Path:
    """A copy of the kernel sources at another install path."""
    return Path(shutil.copytree(build.CSRC, tmp_path / name / "kvsqueeze" / "kernels" / "csrc"))


@pytest.fixture
def fake_load(monkeypatch, tmp_path) -> list[dict]:
    """A private extensions folder and a fake ``load``; returns the recorded calls."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    monkeypatch.delenv(build.ENV_SWITCH, raising=False)
    calls: list[dict] = []

    def load(name, sources, build_directory, **kwargs):
        library = Path(build_directory) / f"{name}.so"
        calls.append(
            {"name": name, "sources": sources, "build_directory": build_directory, **kwargs}
            | {"lock_held": (Path(build_directory) / "lock").exists(), "built": not library.exists()}
        )
        if not library.exists():
            library.write_bytes(b"")
        return types.ModuleType(name)

    monkeypatch.setattr("torch.utils.cpp_extension.load", load)
    return calls


def test_two_checkouts_resolve_to_one_build(tmp_path, fake_load, capsys) -> None:
    first, second = checkout(tmp_path, "a"), checkout(tmp_path, "b")
    a = build.load_extension(first)
    b = build.load_extension(second)
    assert a.module is not None and b.module is not None and not a.error
    assert a.name == b.name and a.directory == b.directory
    assert (a.compiled, b.compiled) == (True, False)
    # what torch writes into build.ninja is the same: sources and -I in the staged copy, not the checkouts
    assert fake_load[0] == {**fake_load[1], "built": True}
    src = a.directory / "src"
    assert all(Path(s).parent == src for s in fake_load[0]["sources"])
    assert fake_load[0]["extra_include_paths"] == [str(src)]
    assert sorted(p.name for p in src.iterdir()) == sorted(p.name for p in build.CSRC.iterdir())
    err = capsys.readouterr().err
    assert err.count("building the native kernel (first use only") == 1


def test_staging_leaves_an_existing_copy_untouched(tmp_path) -> None:
    """New mtimes on the staged sources would make ninja rebuild."""
    directory = tmp_path / "kvsqueeze_cpu_x"
    src = build.stage_sources(checkout(tmp_path, "a"), directory)
    stamps = {p.name: p.stat().st_mtime_ns for p in src.iterdir()}
    time.sleep(0.01)
    assert build.stage_sources(checkout(tmp_path, "b"), directory) == src
    assert {p.name: p.stat().st_mtime_ns for p in src.iterdir()} == stamps
    assert [p.name for p in directory.iterdir()] == ["src"]  # no staging folder left behind


@pytest.mark.parametrize("change", ["source", "header", "torch install", "compiler"])
def test_other_sources_or_environments_get_their_own_build(tmp_path, monkeypatch, change) -> None:
    csrc = checkout(tmp_path, "a")
    before = build.extension_name(csrc)
    if change == "source":
        (csrc / "attention.cpp").write_text((csrc / "attention.cpp").read_text() + "\n// edit\n")
    elif change == "header":
        (csrc / "simd.h").write_text((csrc / "simd.h").read_text() + "\n// edit\n")
    elif change == "torch install":
        toolchain = build._toolchain()
        monkeypatch.setattr(
            build, "_toolchain", lambda: [p.replace("/torch", "/other/torch") for p in toolchain]
        )
    else:
        monkeypatch.setenv("CXX", "clang++")
    assert build.extension_name(csrc) != before


def test_waiting_on_a_held_lock_says_so_once(tmp_path, fake_load, monkeypatch, capsys) -> None:
    monkeypatch.setattr(build, "LOCK_GRACE_SECONDS", 0.0)
    csrc = checkout(tmp_path, "a")
    directory = build.build_directory(build.extension_name(csrc))
    directory.mkdir(parents=True)
    lock = directory / "lock"
    lock.touch()  # the file torch's FileBaton holds while another process builds
    release = threading.Timer(0.5, lock.unlink)
    release.start()
    try:
        result = build.load_extension(csrc)
    finally:
        release.join()
    assert result.module is not None and not fake_load[0]["lock_held"]
    err = capsys.readouterr().err
    assert err.count("waiting for another process to finish building the native kernel") == 1
    assert str(lock) in err


def test_a_stale_lock_is_refused_with_its_path(tmp_path, fake_load, monkeypatch, capsys) -> None:
    csrc = checkout(tmp_path, "a")
    directory = build.build_directory(build.extension_name(csrc))
    directory.mkdir(parents=True)
    lock = directory / "lock"
    lock.touch()
    old = time.time() - build.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    result = build.load_extension(csrc)
    assert result.module is None and fake_load == []
    assert "TimeoutError" in result.error and str(lock) in result.error and "delete it" in result.error


def test_main_reports_a_failed_build_and_exits_0(fake_load, monkeypatch, capsys) -> None:
    def broken(**kwargs):
        raise RuntimeError("Error building extension: no compiler here")

    monkeypatch.setattr("torch.utils.cpp_extension.load", broken)
    assert build.main() == 0
    err = capsys.readouterr().err
    assert "could not be built" in err and "no compiler here" in err and "reference path" in err


def test_main_reports_an_existing_build(fake_load, capsys) -> None:
    assert build.main() == 0  # builds (the fake)
    capsys.readouterr()
    assert build.main() == 0
    assert "already built" in capsys.readouterr().out


def test_python_m_entry_point_with_native_kernels_off() -> None:
    env = {**os.environ, build.ENV_SWITCH: "0"}
    done = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", "kvsqueeze.kernels.build"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "disabled" in done.stdout and done.stderr == ""


def test_make_install_builds_the_kernel() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("define install_venv", 1)[1].split("endef", 1)[0]
    lines = [line.strip() for line in recipe.strip().splitlines() if not line.strip().startswith("#")]
    project = next(i for i, line in enumerate(lines) if "-e '.[dev]'" in line)
    assert lines[project + 1] == "$(1)/bin/python -m kvsqueeze.kernels.build"


LOAD_FROM = """
import json, sys
from pathlib import Path
from kvsqueeze.kernels import build
result = build.load_extension(Path(sys.argv[1]))
ok = result.module is not None and hasattr(result.module, "fused_attention")
print(json.dumps({"name": result.name, "compiled": result.compiled, "ok": ok, "error": result.error}))
"""


@pytest.mark.skipif(not cpu.available(), reason="native CPU kernels could not be built")
def test_a_second_checkout_loads_the_first_ones_kernel(tmp_path) -> None:
    """The issue's figure: two more checkouts of the same sources (other paths) load the kernel
    this checkout built, in fresh processes, without compiling anything."""
    results = []
    for name in ("a", "b"):
        done = subprocess.run(
            [sys.executable, "-c", LOAD_FROM, str(checkout(tmp_path, name))],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        assert "building the native kernel" not in done.stderr
    for result in results:
        assert result == {"name": build.extension_name(), "compiled": False, "ok": True, "error": ""}
