"""``kvsqueeze generate --prompt-cache FILE``: llama.cpp's prompt-cache habit over a squeezed cache.

The file holds the prompt's tokens but the last, prefilled (every run computes at least the last
prompt token, whose logits give the first new token; llama.cpp re-evaluates the last prompt token
too). On the first run the file does not exist: the prompt is prefilled and the file written. On
later runs it is loaded; when its tokens are a prefix of the new prompt, only the rest is prefilled
(and the file is rewritten when it grew); when the prompt differs, the run says so, recomputes the
prompt and overwrites the file. A file made for another model, --kv config or format version, or a
damaged one, is refused (exit 2) and left as it is: delete it, or pick another FILE.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import console

FLAG = "--prompt-cache"


def check_path(value: str) -> Path:
    """The file of ``--prompt-cache`` (checked before the model loads): not a directory, in an
    existing directory; ValueError naming the flag otherwise."""
    path = Path(value).expanduser()
    if not value.strip() or path.is_dir():
        raise ValueError(
            f"{FLAG}: {value!r} is a directory or empty; allowed: a file path, e.g. prompt.safetensors"
        )
    if not path.parent.is_dir():
        raise ValueError(
            f"{FLAG}: {value!r}: its directory {str(path.parent)!r} does not exist; create it first"
        )
    return path


def prepared_cache(path: Path, model: Any, kv: Any, input_ids: Any, new_cache: Callable[[], Any]) -> Any:
    """A cache holding every token of ``input_ids`` (1, n) but the last: loaded from ``path`` and
    completed, or computed (``new_cache()`` builds an empty one); ``path`` is (re)written when it
    changed. ``kv``: the --kv config, which the file must have been made with."""
    import torch

    from ..integrations.prompt_cache import load_prompt_cache, save_prompt_cache
    from ..storage.persist import CacheFileError

    ids = input_ids[0].tolist()
    keep = len(ids) - 1  # the last prompt token is computed by generate
    cache, held = None, 0
    if path.exists():
        try:
            loaded = load_prompt_cache(path, model, config=kv)
        except CacheFileError as err:
            raise ValueError(f"{FLAG}: {err}") from None
        saved = loaded.token_ids
        if len(saved) <= keep and ids[: len(saved)] == saved:
            cache, held = loaded.cache, len(saved)
            console.print(f"[dim]prompt cache {path}: reusing {held} of the prompt's {len(ids)} tokens[/dim]")
        else:
            loaded.cache.reset()
            same = next(
                (i for i, (a, b) in enumerate(zip(saved, ids, strict=False)) if a != b),
                min(len(saved), len(ids)),
            )
            console.print(
                f"[dim]prompt cache {path} holds another prompt ({same} of its {len(saved)} tokens match this "
                f"one's {len(ids)}): recomputing the prompt and overwriting the file[/dim]"
            )
    else:
        console.print(f"[dim]prompt cache {path} does not exist yet: it will hold this prompt[/dim]")
    if cache is None:
        cache = new_cache()
    if held < keep:
        with torch.inference_mode():
            model(input_ids[:, held:keep], cache=cache, logits_to_keep=1)
        size = save_prompt_cache(path, cache, model, ids[:keep])
        console.print(f"[dim]prompt cache {path}: saved {keep} tokens ({size:,} bytes)[/dim]")
    elif keep == 0:
        console.print(f"[dim]prompt cache {path}: a one-token prompt leaves nothing to save[/dim]")
    return cache
