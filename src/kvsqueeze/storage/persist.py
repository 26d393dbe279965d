"""Files of saved blocks: safetensors with a checked header, written atomically.

A kvsqueeze file is a safetensors file (https://github.com/huggingface/safetensors): an 8-byte
little-endian header length, a JSON header (each tensor's dtype, shape and byte range, plus a
``__metadata__`` map of strings), then the tensors' bytes. kvsqueeze's metadata keys:

* ``format``: what the file holds (``kvsqueeze.prompt_cache``, ``kvsqueeze.prefix_blocks``);
* ``format_version``: `FORMAT_VERSION` of the writer (an integer, as text);
* ``writer``: the kvsqueeze version that wrote it (informational);
* ``checksum``: ``sha256:<hex>`` over the other metadata and every tensor (`checksum`);
* the writer's own keys, each a JSON text (cache config, model fingerprint, token ids, ...).

`write_file` serialises once, computes the checksum over the serialised header entries and bytes,
writes it into the header's placeholder (same length), and writes a temporary file in the target's
directory, fsyncs it and renames it over the target (`os.replace`): readers see the old file or
the new one, never half of one. `read_file` refuses, with `CacheFileError` (a ValueError whose
``reason`` names the kind), a missing or unreadable path, a file that is not safetensors, another
kind of file, a format version it does not read, a truncated file and one whose checksum does not
match (any flipped byte in the metadata or the tensors), before any tensor reaches a cache.
The layout and the version policy are in docs/persistence.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
"""The layout this version writes; it reads files of versions `MIN_FORMAT_VERSION` .. `FORMAT_VERSION`."""
MIN_FORMAT_VERSION = 1
RESERVED_KEYS = ("format", "format_version", "writer", "checksum")
_PLACEHOLDER = "sha256:" + "0" * 64
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


class CacheFileError(ValueError):
    """A file refused by `read_file` (or by a loader that checks its contents against a model).

    ``reason`` says why, one of: ``"missing"``, ``"unreadable"``, ``"not_safetensors"``, ``"kind"`` (not
    a kvsqueeze file of this kind), ``"version"``, ``"truncated"``, ``"corrupted"`` (checksum),
    ``"model"`` (made for another model), ``"config"`` (another cache config), ``"state"`` (contents
    that do not fit the cache).
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def checksum(header: dict, data: memoryview | bytes) -> str:
    """``sha256:<hex>`` over the header's ``__metadata__`` without ``checksum`` (canonical JSON: sorted
    keys, no spaces) and, for every tensor in name order, its name, dtype, shape and bytes (``data``:
    the bytes after the header)."""
    meta = {k: v for k, v in (header.get("__metadata__") or {}).items() if k != "checksum"}
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
    view = memoryview(data)
    for name in sorted(k for k in header if k != "__metadata__"):
        info = header[name]
        begin, end = info["data_offsets"]
        h.update(f"\0{name}\0{info['dtype']}\0{info['shape']}\0".encode())
        h.update(view[begin:end])
    return "sha256:" + h.hexdigest()


def label(kind: str) -> str:
    """How messages name a file of ``kind``: ``"kvsqueeze.prompt_cache"`` -> ``"prompt cache file"``."""
    return kind.removeprefix("kvsqueeze.").replace("_", " ") + " file"


def write_file(
    path: str | os.PathLike, kind: str, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]
) -> int:
    """Write ``tensors`` (contiguous CPU tensors) and ``metadata`` (JSON-able values under keys other
    than `RESERVED_KEYS`) to ``path`` as a kvsqueeze file of ``kind``, atomically; returns the bytes
    written. Raises ValueError for a path that is a directory or in a missing directory."""
    from safetensors.torch import save

    from .. import __version__

    target = Path(path).expanduser()
    if target.is_dir():
        raise ValueError(f"{label(kind)}: {str(path)!r} is a directory; allowed: a file path")
    if not target.parent.is_dir():
        raise ValueError(f"{label(kind)}: {str(path)!r}: the directory {str(target.parent)!r} does not exist")
    clash = [k for k in metadata if k in RESERVED_KEYS]
    assert not clash, f"metadata keys {clash} are reserved"
    meta = {k: json.dumps(v, separators=(",", ":")) for k, v in metadata.items()}
    meta.update(format=kind, format_version=str(FORMAT_VERSION), writer=__version__, checksum=_PLACEHOLDER)
    blob = save(_unshared(tensors), metadata=meta)
    size = struct.unpack("<Q", blob[:8])[0]
    header_bytes = blob[8 : 8 + size]
    at = header_bytes.find(_PLACEHOLDER.encode())
    assert at >= 0 and header_bytes.count(_PLACEHOLDER.encode()) == 1, (
        "the checksum placeholder must appear once"
    )
    digest = checksum(json.loads(header_bytes), memoryview(blob)[8 + size :]).encode()
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(memoryview(blob)[: 8 + at])
            f.write(digest)
            f.write(memoryview(blob)[8 + at + len(digest) :])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # the rename itself reaches the disk (POSIX; a no-op elsewhere)
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return len(blob)


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with a copy of each one whose storage an earlier one uses (safetensors refuses shared
    storage: e.g. the token roles every layer of a cache holds)."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        out[name] = t.clone() if ptr in seen else t
        if ptr is not None:
            seen.add(ptr)
    return out


def read_header(raw: bytes, name: str, kind: str) -> tuple[dict, int]:
    """The parsed header of the file bytes ``raw`` and where its data starts, with the format and
    version checked; CacheFileError otherwise (``name``: the path, for messages)."""
    what = f"{label(kind)} {name!r}"
    if len(raw) < 8:
        raise CacheFileError(
            f"{what} is not a safetensors file ({len(raw)} bytes; a safetensors file starts with an 8-byte "
            "header length)",
            "not_safetensors",
        )
    size = struct.unpack("<Q", raw[:8])[0]
    if size > _MAX_HEADER_BYTES:
        raise CacheFileError(
            f"{what} is not a safetensors file (its first 8 bytes give a header of {size} bytes)",
            "not_safetensors",
        )
    if 8 + size > len(raw):
        raise CacheFileError(
            f"{what} is truncated or not a safetensors file: its header needs {size} bytes, the file has "
            f"{len(raw) - 8} after the length",
            "truncated",
        )
    try:
        header = json.loads(raw[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CacheFileError(
            f"{what} is not a safetensors file, or its header is corrupted (not JSON: {err})",
            "not_safetensors",
        ) from None
    if not isinstance(header, dict):
        raise CacheFileError(
            f"{what} is not a safetensors file (its header is not a JSON object)", "not_safetensors"
        )
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or "format" not in meta:
        raise CacheFileError(
            f"{what} is a safetensors file without kvsqueeze metadata (no 'format' entry); allowed: a file "
            f"written by kvsqueeze ({kind})",
            "kind",
        )
    if meta["format"] != kind:
        raise CacheFileError(f"{what} holds {meta['format']!r}; allowed: {kind!r}", "kind")
    version = meta.get("format_version")
    if not (isinstance(version, str) and version.isdigit()):
        raise CacheFileError(f"{what} has format_version {version!r}; allowed: an integer", "corrupted")
    if int(version) > FORMAT_VERSION:
        raise CacheFileError(
            f"{what} was written by format {int(version)}, this version reads {FORMAT_VERSION} (the file comes "
            f"from kvsqueeze {meta.get('writer', '?')}); upgrade kvsqueeze, or delete the file to recompute it",
            "version",
        )
    if int(version) < MIN_FORMAT_VERSION:
        raise CacheFileError(
            f"{what} was written by format {int(version)}, which this version no longer reads (it reads "
            f"{MIN_FORMAT_VERSION} .. {FORMAT_VERSION}); delete the file to recompute it",
            "version",
        )
    return header, 8 + size


def read_file(path: str | os.PathLike, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors (CPU) and metadata (the writer's keys JSON-decoded, plus ``format_version`` as an
    int and ``writer``) of the kvsqueeze file ``path`` of ``kind``, after every check of the module
    docstring; CacheFileError (``reason``) otherwise."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    name = str(path)
    file = Path(path).expanduser()
    if file.is_dir():
        raise CacheFileError(f"{label(kind)} {name!r} is a directory; allowed: a file", "unreadable")
    if not file.exists():
        raise CacheFileError(f"{label(kind)} {name!r} does not exist", "missing")
    try:
        raw = file.read_bytes()
    except OSError as err:
        raise CacheFileError(
            f"{label(kind)} {name!r} cannot be read ({err.strerror or err})", "unreadable"
        ) from None
    header, start = read_header(raw, name, kind)
    what = f"{label(kind)} {name!r}"
    try:
        ends = [int(info["data_offsets"][1]) for key, info in header.items() if key != "__metadata__"]
    except (TypeError, KeyError, IndexError, ValueError):
        raise CacheFileError(
            f"{what} is corrupted (a tensor entry of its header has no data_offsets)", "corrupted"
        ) from None
    needed, held = max(ends, default=0), len(raw) - start
    if held < needed:
        raise CacheFileError(
            f"{what} is truncated: its tensors need {needed} bytes of data, the file holds {held}",
            "truncated",
        )
    meta = header["__metadata__"]
    try:
        found = checksum(header, memoryview(raw)[start:])
    except (TypeError, KeyError, ValueError):
        found = None
    if held != needed or meta.get("checksum") != found:
        extra = f" ({held - needed} bytes after its tensors)" if held > needed else ""
        raise CacheFileError(
            f"{what} is corrupted: its checksum does not match its contents{extra}; it was damaged after "
            "it was written — delete it to recompute it",
            "corrupted",
        )
    try:
        tensors = load(raw)
    except SafetensorError as err:
        raise CacheFileError(f"{what} is corrupted ({err})", "corrupted") from None
    out: dict[str, Any] = {"format_version": int(meta["format_version"]), "writer": meta.get("writer")}
    for key, text in meta.items():
        if key in RESERVED_KEYS:
            continue
        try:
            out[key] = json.loads(text)
        except (TypeError, json.JSONDecodeError):
            raise CacheFileError(f"{what}: metadata {key!r} is not JSON", "corrupted") from None
    return tensors, out
