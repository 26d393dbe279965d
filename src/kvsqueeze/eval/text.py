"""Evaluation text: where it lives, how it is read and how it becomes one long row of token ids.

The project keeps the WikiText-2 raw test split next to the repository (``../shared/data``), so the
evaluation runs offline; :func:`load_hub_wikitext` is the online fallback for users who have the
``datasets`` package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_TEXT_FILE = REPO_ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"


def default_text_file() -> Path | None:
    """Return :data:`DEFAULT_TEXT_FILE` when it exists, else ``None``."""
    return DEFAULT_TEXT_FILE if DEFAULT_TEXT_FILE.is_file() else None


def load_text(path: str | Path) -> str:
    """Read a UTF-8 text file (line endings normalised to ``\\n``).

    Raises ``ValueError`` naming ``text_file`` when the file is missing or holds only whitespace.
    """
    file = Path(path)
    if not file.is_file():
        raise ValueError(
            f"text_file={str(path)!r} does not exist or is not a file; pass an existing text file"
        )
    text = file.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"text_file={str(path)!r} is empty; pass a file that contains text")
    return text


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
