"""Token roles: which tokens are text, image/video/audio placeholders or marked instructions.

Vision-language models in transformers expand each image (video, audio) into a run of
placeholder token ids in ``input_ids`` (LLaVA ``image_token_index``, Qwen2-VL ``image_token_id``
and ``video_token_id``, ...); the model config names those ids. `roles_from_ids` turns
``input_ids`` into a role per position; callers can mark instruction spans on top
(`mark_spans`). The roles are handed to the cache before the prefill
(`SqueezedCache.set_roles`); tokens past the marked length (generated tokens) are text.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .classes import Precision, Role, precision, role

TOKEN_ID_FIELDS: dict[Role, tuple[str, ...]] = {
    Role.IMAGE: ("image_token_id", "image_token_index", "image_pad_token_id"),
    Role.VIDEO: ("video_token_id", "video_token_index"),
    Role.AUDIO: ("audio_token_id", "audio_token_index"),
}


def modality_token_ids(model_config: Any) -> dict[Role, list[int]]:
    """Special token ids of each modality found on ``model_config`` (and its sub-configs)."""
    configs = [model_config, *(getattr(model_config, n, None) for n in ("text_config", "vision_config"))]
    found: dict[Role, list[int]] = {}
    for kind, names in TOKEN_ID_FIELDS.items():
        for cfg in configs:
            for name in names:
                value = getattr(cfg, name, None) if cfg is not None else None
                if isinstance(value, int) and value not in found.get(kind, []):
                    found.setdefault(kind, []).append(value)
    return found


def roles_from_ids(input_ids: torch.Tensor, model_config: Any) -> torch.Tensor:
    """Roles (batch, tokens) int8 of ``input_ids`` (batch, tokens): modality placeholders, else text."""
    roles = torch.full(input_ids.shape, int(Role.TEXT), dtype=torch.int8, device=input_ids.device)
    for kind, ids in modality_token_ids(model_config).items():
        roles[torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))] = int(kind)
    return roles


def mark_spans(
    roles: torch.Tensor, spans: Iterable[tuple[int, int]], kind: Role = Role.INSTRUCTION
) -> torch.Tensor:
    """Copy of ``roles`` (batch, tokens) with every ``[start, end)`` span set to ``kind`` (all rows)."""
    out = roles.clone()
    for start, end in spans:
        if not 0 <= start <= end <= roles.shape[-1]:
            raise ValueError(f"spans: ({start}, {end}) is outside [0, {roles.shape[-1]}]")
        out[..., start:end] = int(kind)
    return out


@dataclass(frozen=True)
class RolePolicy:
    """Precision forced by role: ``rules`` pairs (role name, precision name), e.g.
    ``(("text", "exact"), ("image", "low"))``. Roles not listed are left to the other policies."""

    rules: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for i, (r, p) in enumerate(self.rules):
            role(r, f"roles[{i}]")
            precision(p, f"roles[{i}]")

    def classes(self, roles: torch.Tensor) -> torch.Tensor:
        """Forced class (batch, tokens) int8 of ``roles`` (batch, tokens); -1 where not forced."""
        out = torch.full(roles.shape, -1, dtype=torch.int8, device=roles.device)
        for r, p in self.rules:
            out[roles == int(role(r, "roles"))] = int(precision(p, "roles"))
        return out

    def to_dict(self) -> dict[str, str]:
        return dict(self.rules)

    @classmethod
    def from_value(cls, value: object) -> RolePolicy:
        """From a dict {role: precision}, a sequence of pairs, or a RolePolicy."""
        if isinstance(value, RolePolicy):
            return value
        if isinstance(value, dict):
            return cls(tuple((str(k), str(v)) for k, v in value.items()))
        if isinstance(value, (list, tuple)):
            return cls(tuple((str(k), str(v)) for k, v in value))
        raise ValueError(f"roles: {value!r} must be a dict {{role: precision}}, e.g. {{'image': 'low'}}")


EXACT_TEXT = RolePolicy(
    (("text", "exact"), ("instruction", "exact"), ("image", "low"), ("video", "low"), ("audio", "low"))
)
"""Text-centric: text and instructions exact, image/video/audio tokens low-bit."""

__all__ = [
    "EXACT_TEXT",
    "Precision",
    "Role",
    "RolePolicy",
    "mark_spans",
    "modality_token_ids",
    "roles_from_ids",
]
