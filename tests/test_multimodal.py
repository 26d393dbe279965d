"""Text-centric precision in vision-language models: tiny random LLaVA and Qwen2-VL from configs.

Image placeholder tokens (found from the model config's special token ids) must land in the
low-bit class, text tokens in the exact class, the bytes must be those held, and ``generate``
must run with images.
"""

from __future__ import annotations

import pytest
import torch
from held import reachable_tensor_bytes
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from kvsqueeze.config import QuantSpec, preset
from kvsqueeze.eval.memory import store_tensor_bytes
from kvsqueeze.integrations import SqueezedCache
from kvsqueeze.policies import Precision, Role, roles_from_ids
from kvsqueeze.policies.roles import modality_token_ids

IMAGE_ID = 100
NUM_IMAGE_TOKENS = 64
TEXT_BEFORE, TEXT_AFTER, NEW_TOKENS = 20, 20, 8
# text-centric, scaled down so that a 104-token prompt crosses blocks: sinks 2, window 16, blocks 16
CONFIG = preset("text-centric").replace(
    key=QuantSpec(bits=2, axis="channel", group_size=16),
    value=QuantSpec(bits=2, axis="token", group_size=32),
    sink_tokens=2,
    residual_window=16,
    block_size=16,
    page_tokens=32,
)
TEXT = dict(
    vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, head_dim=64, max_position_embeddings=512, bos_token_id=None, eos_token_id=None,
    pad_token_id=0,
)  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def prompt_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(1, 90, (1, n), generator=g)  # noqa: E731
    image = torch.full((1, NUM_IMAGE_TOKENS), IMAGE_ID)
    return torch.cat([text(TEXT_BEFORE), image, text(TEXT_AFTER)], dim=1)


def llava() -> tuple[torch.nn.Module, dict]:
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
        patch_size=4, projection_dim=32,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision, text_config=LlamaConfig(**TEXT), image_token_index=IMAGE_ID,
        image_seq_length=NUM_IMAGE_TOKENS, vision_feature_layer=-1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    return model, {"pixel_values": torch.randn(1, 3, 32, 32)}


def qwen2_vl() -> tuple[torch.nn.Module, dict]:
    text = {
        **TEXT,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [16, 8, 8]},
    }
    vision = dict(
        depth=1, embed_dim=32, hidden_size=128, mlp_ratio=2, num_heads=2, patch_size=14, spatial_merge_size=1,
        temporal_patch_size=2,
    )  # fmt: skip
    config = Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=IMAGE_ID, video_token_id=IMAGE_ID + 1,
        vision_start_token_id=IMAGE_ID + 2, vision_end_token_id=IMAGE_ID + 3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).eval()
    patches = torch.randn(NUM_IMAGE_TOKENS, 3 * 2 * 14 * 14)
    return model, {"pixel_values": patches, "image_grid_thw": torch.tensor([[1, 8, 8]])}


MODELS = {"llava": llava, "qwen2-vl": qwen2_vl}


def held_bytes(cache: SqueezedCache) -> int:
    return store_tensor_bytes(layer.store for layer in cache.layers)


@pytest.mark.parametrize("name", MODELS)
def test_image_tokens_low_bit_text_exact_generate_runs(name) -> None:
    model, images = MODELS[name]()
    assert modality_token_ids(model.config)[Role.IMAGE] == [IMAGE_ID]
    input_ids = prompt_ids()
    cache = SqueezedCache.from_model(model, CONFIG)
    cache.set_roles(roles_from_ids(input_ids, model.config))
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), cache=cache,
            max_new_tokens=NEW_TOKENS, do_sample=False, **images,
        )  # fmt: skip
    assert out.shape[-1] == input_ids.shape[-1] + NEW_TOKENS
    seen = input_ids.shape[-1] + NEW_TOKENS - 1
    assert cache.get_seq_length() == seen
    for layer in cache.layers:
        store = layer.store
        assert store.classes[Precision.LOW].num_tokens == NUM_IMAGE_TOKENS  # every image token, none else
        exact = store.classes[Precision.EXACT].num_tokens
        assert exact == seen - NUM_IMAGE_TOKENS - store.sink_k.num_tokens - store.window_k.num_tokens
        assert store.classes[Precision.HIGH].num_tokens == 0
    report = cache.memory_report()
    assert report.total_bytes == cache.nbytes() == held_bytes(cache) == reachable_tensor_bytes(cache)
    assert report.parts["low_keys"] > 0 and report.parts["exact_keys"] > 0
