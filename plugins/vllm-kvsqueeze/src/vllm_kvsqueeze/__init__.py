"""kvsqueeze formats in vLLM (a skeleton; design in ``docs/vllm_plugin.md`` of kvsqueeze).

- `layout`: the byte layout of one vLLM page in a kvsqueeze format, and the exact staging beside it
- `plugin`: `register`, the ``vllm.general_plugins`` entry point (KV cache dtypes; no backend yet)

Nothing here imports vLLM until `plugin.register` runs.
"""

from .layout import PageLayout, Region

__all__ = ["PageLayout", "Region"]
