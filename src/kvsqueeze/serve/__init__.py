"""`kvsqueeze serve`: an OpenAI-compatible HTTP server over the engine (needs the ``serve`` extra:
``pip install 'kvsqueeze[serve]'``).

- `protocol`: the OpenAI request models, response bodies and errors naming the field
- `async_engine`: the engine's step loop in one background thread, requests as asyncio streams
- `metrics`: Prometheus metrics in vLLM's names (``kvsqueeze:*``), one registry per app
- `app`: the FastAPI app (`create_app`)

from kvsqueeze.engine import LLMEngine
from kvsqueeze.serve import create_app
app = create_app(LLMEngine.from_pretrained("smollm2-135m", kv="k4v4", kv_budget="256MiB"))
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def create_app(*args: Any, **kwargs: Any) -> Any:
    """`serve.app.create_app` (imported on first use: FastAPI loads only when serving)."""
    from .app import create_app as create

    return create(*args, **kwargs)
