"""What `calibrate` and `inspect` read before they load a model's weights: its tokenizer and the
text's token ids, so that every token count is checked against the text and the model's context
before any work starts (the model's config: `common.load_model_config`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import read_text_file


def load_tokenizer(flag: str, name: str) -> Any:
    """The tokenizer of the model given to ``flag`` (checked first by `common.load_model_config`); a
    GGUF file's is read from the file, as `models.load_model` reads it."""
    from transformers import AutoTokenizer

    from ..models import resolve_model

    try:
        source, extra = resolve_model(name), {}
        if isinstance(source, Path) and source.is_file():  # a GGUF file
            source, extra = source.parent, {"gguf_file": source.name}
        return AutoTokenizer.from_pretrained(source, **extra)
    except Exception as err:  # transformers' OSError / ValueError for a folder without a tokenizer
        reason = (str(err).strip().splitlines() or [""])[0][:300]
        raise ValueError(
            f"{flag}: {name!r} has no usable tokenizer ({type(err).__name__}: {reason})"
        ) from None


def read_text(flag: str, path: str | Path | None) -> tuple[Path, str]:
    """(file, text) of the UTF-8 text file given to ``flag`` (None: the WikiText-2 test file), line
    endings normalised to ``\\n`` as `eval.text.load_text` reads them."""
    from ..eval.text import default_text_file

    file = Path(path) if path is not None else default_text_file()
    if file is None:
        raise ValueError(f"{flag}: not given and no default text found; allowed: a UTF-8 text file")
    return file, read_text_file(flag, file).replace("\r\n", "\n").replace("\r", "\n")


def context_tokens(model_config: Any) -> tuple[int | None, str]:
    """(most positions the model supports or None, where that number comes from)."""
    from ..integrations.context import context_limit

    limit = context_limit(model_config.get_text_config(decoder=True))
    return limit.tokens, limit.source
