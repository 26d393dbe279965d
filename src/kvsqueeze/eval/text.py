"""Evaluation text: where it lives, how it is read and how it becomes one long row of token ids.

The project keeps the WikiText-2 raw test split next to the repository (``../shared/data``), so the
evaluation runs offline; :func:`load_hub_wikitext` is the online fallback for users who have the
``datasets`` package.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_TEXT_FILE = REPO_ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"


def default_text_file() -> Path | None:
    """Return :data:`DEFAULT_TEXT_FILE` when it exists, else ``None``."""
    return DEFAULT_TEXT_FILE if DEFAULT_TEXT_FILE.is_file() else None


def read_text_file(flag: str, path: str | Path) -> str:
    """The UTF-8 text of the file given to ``flag`` (a CLI flag or an argument name). Raises
    ValueError naming the flag and the file when it is missing, a directory, unreadable, not UTF-8
    (binary or another encoding), or empty or whitespace only."""
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ValueError(f"{flag}: {path!r} is not a file path; allowed: a UTF-8 text file")
    file = Path(path)
    if file.is_dir():
        raise ValueError(f"{flag}: {str(path)!r} is a directory; allowed: a UTF-8 text file")
    if not file.exists():
        raise ValueError(f"{flag}: {str(path)!r} does not exist")
    try:
        data = file.read_bytes()
    except OSError as err:
        raise ValueError(f"{flag}: {str(path)!r} cannot be read ({err.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{flag}: {str(path)!r} is not UTF-8 text (byte {err.start}: {data[err.start : err.start + 1]!r}); "
            "allowed: a UTF-8 text file (convert it, e.g. iconv -f latin1 -t utf-8)"
        ) from None
    if not text.strip():
        raise ValueError(f"{flag}: {str(path)!r} holds no text (empty or whitespace only)")
    return text


def load_text(path: str | Path, flag: str = "text_file") -> str:
    """Read a UTF-8 text file (line endings normalised to ``\\n``).

    Raises ``ValueError`` naming ``flag`` and the file when it is missing, a directory, not UTF-8
    or holds only whitespace (`read_text_file`).
    """
    return read_text_file(flag, path).replace("\r\n", "\n").replace("\r", "\n")


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """Tokenize ``text`` as one sequence, without special tokens and without truncation.

    The text is usually far longer than ``tokenizer.model_max_length``; ``verbose=False`` silences the
    tokenizer's "sequence length is longer than the specified maximum" warning, which does not apply
    because the ids are later cut into windows.

    Returns:
        ``torch.long`` tensor of shape ``(num_tokens,)``.
    """
    encoding = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)
    return torch.tensor(encoding["input_ids"], dtype=torch.long)


def load_hub_wikitext() -> str:
    """Download the WikiText-2 raw test split with ``datasets`` and join its lines into one string.

    Raises ``ValueError`` when ``datasets`` is not installed.
    """
    try:
        import datasets
    except ImportError as error:
        raise ValueError(
            "text_file is not set and the 'datasets' package is not installed; "
            "install it (pip install datasets) or pass --text-file PATH"
        ) from error
    split = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    return "".join(split["text"])
