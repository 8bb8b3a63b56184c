"""Llama 4 text model in one file: config, layers, checkpoint loading, tokenizer, generation, CLI.

Llama 4 (Meta, "The Llama 4 herd", 2025) is a decoder-only mixture-of-experts transformer with:
- "iRoPE": most layers use RoPE with chunked local attention (a query attends only to the keys of its own
  chunk of `attention_chunk_size` positions). Every fourth layer has no position encoding at all
  (NoPE) and attends to the whole causal context;
- RoPE rotating interleaved pairs (x[2i], x[2i+1]), with llama3 frequency scaling;
- parameter-free RMS normalisation of queries and keys on the RoPE layers, and on the NoPE layers a
  query scale that grows with the log of the position ("temperature tuning", Nakanishi, "Scalable-Softmax
  Is Superior for Attention", 2025);
- MoE feed-forward layers with one routed expert per token, chosen by a sigmoid router whose score
  scales the expert's input, plus a shared expert; dense SwiGLU layers where the MoE layers skip;
- Llama-style RMSNorm, pre-norm blocks and an untied LM head.

This file matches `transformers`' Llama4ForCausalLM (and the text part of
Llama4ForConditionalGeneration) logit for logit; test_parity.py proves it.

    python llama4.py --prompt "The capital of France is"
    python llama4.py --model meta-llama/Llama-4-Maverick-17B-128E-Instruct --chat --prompt "Write a haiku about tea."
    python llama4.py --model ./some/local/folder --prompt "..." --dtype bfloat16 --device cuda
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_MODEL = "meta-llama/Llama-4-Scout-17B-16E-Instruct"
MODEL_TYPES = ("llama4", "llama4_text")  # multimodal checkpoints, text-only checkpoints
END_OF_TURN = "<|eot|>"  # the chat template closes every turn with this token


class UserError(Exception):
    """A problem with the user's input or checkpoint; the CLI prints it as one line, no traceback."""


# --------------------------------------------------------------------------------------------------
# Config


# Llama4TextConfig's defaults in transformers 5.25, for keys a config.json may omit. They describe
# Scout's text model, except the context (131072) and the special tokens (1 and 2).
TRANSFORMERS_DEFAULTS = {
    "vocab_size": 202048, "hidden_size": 5120, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
    "num_hidden_layers": 48, "max_position_embeddings": 131072, "num_attention_heads": 40, "num_key_value_heads": 8,
    "head_dim": 128, "attention_chunk_size": 8192, "no_rope_layer_interval": 4, "use_qk_norm": True,
    "attn_temperature_tuning": True, "floor_scale": 8192, "attn_scale": 0.1, "num_local_experts": 16,
    "num_experts_per_tok": 1, "interleave_moe_layer_step": 1, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2,
}
# Llama4VisionConfig's defaults in transformers 5.25, for the vision keys a config.json may omit.
VISION_TRANSFORMERS_DEFAULTS = {
    "hidden_size": 768, "intermediate_size": 5632, "num_hidden_layers": 34, "num_channels": 3, "image_size": 448,
    "patch_size": 14, "projector_input_dim": 4096, "projector_output_dim": 4096, "vision_output_dim": 7680,
}
# The vision_config of Maverick's (and Scout's) config.json, as far as the parameter count needs it.
VISION_CONFIG = {
    "hidden_size": 1408, "intermediate_size": 5632, "num_hidden_layers": 34, "num_channels": 3, "image_size": 336,
    "patch_size": 14, "projector_input_dim": 4096, "projector_output_dim": 4096, "vision_output_dim": 4096,
}


@dataclass
class Config:
    """Hyperparameters of the text model; field names follow the checkpoint's config.json.

    The defaults describe the family's flagship, meta-llama/Llama-4-Maverick-17B-128E-Instruct
    (its config.json's text_config and vision_config). Scout differs in 16 experts in every layer,
    use_qk_norm, llama3 RoPE scaling by 16 and a context of 10485760 tokens.
    """

    # sizes
    vocab_size: int = 202048
    hidden_size: int = 5120
    intermediate_size: int = 8192  # each routed expert and the shared expert
    intermediate_size_mlp: int = 16384  # the dense MLP of non-MoE layers
    num_hidden_layers: int = 48
    max_position_embeddings: int = 1048576
    # attention
    num_attention_heads: int = 40
    num_key_value_heads: int = 8
    head_dim: int = 128
    attention_chunk_size: int | None = 8192  # None: every layer attends to the whole causal context
    no_rope_layers: tuple[int, ...] = ()  # per layer: 1 uses RoPE (and chunked attention), 0 is a NoPE layer
    no_rope_layer_interval: int = 4  # without `no_rope_layers`, every fourth layer is NoPE
    layer_types: tuple[str, ...] = ()  # "chunked_attention" or "full_attention" per layer
    use_qk_norm: bool = False  # RoPE layers only
    attn_temperature_tuning: bool = True  # NoPE layers only
    floor_scale: int = 8192
    attn_scale: float = 0.1
    # RoPE: llama3 scaling divides the low frequencies by `rope_scaling_factor` and blends the middle ones
    rope_theta: float = 500_000.0
    rope_type: str = "default"  # "llama3" or "default" (no scaling)
    rope_scaling_factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 1.0
    original_max_position_embeddings: int = 8192
    # mixture of experts
    num_local_experts: int = 128
    num_experts_per_tok: int = 1
    interleave_moe_layer_step: int = 2  # without `moe_layers`, every step-th layer is MoE
    moe_layers: tuple[int, ...] | None = None
    # norms and output
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    # special tokens
    bos_token_id: int = 200000  # <|begin_of_text|>
    eos_token_id: int | list[int] = field(default_factory=lambda: [200001, 200007, 200008])  # <|end_of_text|>, <|eom|>, <|eot|>
    dtype: str = "bfloat16"  # the dtype the checkpoint was saved in
    # The vision tower's config.json settings (None for text-only checkpoints). Only describe() reads
    # them, to count the parameters that the published sizes include.
    vision_config: dict | None = field(default_factory=lambda: dict(VISION_CONFIG))

    def __post_init__(self):
        # Derive the per-layer lists as transformers' Llama4TextConfig does (an empty `no_rope_layers` counts as missing there too).
        if not self.no_rope_layers:
            self.no_rope_layers = tuple(int((i + 1) % self.no_rope_layer_interval != 0) for i in range(self.num_hidden_layers))
        self.no_rope_layers = tuple(self.no_rope_layers)
        if not self.layer_types:
            chunked = self.attention_chunk_size is not None
            self.layer_types = tuple("chunked_attention" if rope and chunked else "full_attention" for rope in self.no_rope_layers)
        self.layer_types = tuple(self.layer_types)
        if self.moe_layers is None:
            step = self.interleave_moe_layer_step
            self.moe_layers = tuple(range(step - 1, self.num_hidden_layers, step))
        self.moe_layers = tuple(self.moe_layers)
        # Only the truth value matters, so an integer is accepted too (transformers 5.25 would reject it).
        self.attn_temperature_tuning = bool(self.attn_temperature_tuning)

    @classmethod
    def from_hf(cls, raw: dict) -> "Config":
        """Build a Config from a config.json dict, either Llama4ForCausalLM's or the multimodal wrapper's."""
        text = dict(raw.get("text_config") or raw)
        if text.get("hidden_act", "silu") != "silu":
            raise UserError(f"unsupported activation {text['hidden_act']!r}; llama4.py supports 'silu'")
        # RoPE settings come in two formats: `rope_parameters` (transformers >= 5) or the flat
        # `rope_theta` plus `rope_scaling` (hub files). Neither means plain RoPE.
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise UserError(f"unsupported RoPE type {rope_type!r}; llama4.py supports 'default' and 'llama3'")
        text["rope_type"] = rope_type
        text["rope_theta"] = rope.get("rope_theta", text.get("rope_theta", 500_000.0))
        if rope_type == "llama3":
            text["rope_scaling_factor"] = rope["factor"]
            text["low_freq_factor"] = rope["low_freq_factor"]
            text["high_freq_factor"] = rope["high_freq_factor"]
            text["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
        text["dtype"] = text.get("dtype") or text.get("torch_dtype") or raw.get("torch_dtype") or "float32"
        # Only the multimodal wrapper has a vision tower; its missing keys take Llama4VisionConfig's defaults.
        vision = raw.get("vision_config") if "text_config" in raw else None
        text["vision_config"] = {**VISION_TRANSFORMERS_DEFAULTS, **vision} if vision is not None else None
        # As in transformers, an explicit null head_dim means hidden_size / num_attention_heads; a missing one means 128.
        explicit_null_head_dim = "head_dim" in text and text["head_dim"] is None
        # A key that config.json leaves out means transformers' default, not this file's flagship value.
        text = {**TRANSFORMERS_DEFAULTS, **{k: v for k, v in text.items() if v is not None or k in ("attention_chunk_size", "vision_config")}}
        if explicit_null_head_dim:
            text["head_dim"] = text["hidden_size"] // text["num_attention_heads"]
        known = {f.name for f in fields(cls)}
        # None stays only where it has a meaning (no chunking, no vision tower); elsewhere it means "use the default".
        kept = {k: v for k, v in text.items() if k in known and (v is not None or k in ("attention_chunk_size", "vision_config"))}
        return cls(**kept)


# --------------------------------------------------------------------------------------------------
# Tensor parallelism (torchrun)
#
# Under `torchrun --nproc-per-node N llama4.py ...` each of the N ranks stores 1/N of the attention
# heads, of the MLP columns and of the vocabulary, and reads only those slices of the checkpoint.
# A column-parallel linear layer splits its output features across ranks, so it needs no
# communication. The row-parallel layer after it splits its input features and sums the partial
# products with one all-reduce. A plain `python llama4.py` run keeps world_size 1 and calls no
# torch.distributed function.

world_size, rank = 1, 0  # set by init_distributed() under torchrun


def is_rank_zero() -> bool:
    """Return whether this process prints: rank 0 under torchrun, or a plain run.

    torchrun sets the RANK variable before the process group exists, so errors raised before
    init_distributed() also print once.
    """
    return os.environ.get("RANK", "0") == "0"


def init_distributed(device: torch.device) -> None:
    """Join the process group that torchrun describes in the environment (NCCL on GPUs, gloo on CPUs)."""
    global world_size, rank
    import torch.distributed as dist

    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    world_size, rank = dist.get_world_size(), dist.get_rank()


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the ranks in place (nothing to do in a single process)."""
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `x` along the last dimension, in rank order."""
    if world_size == 1:
        return x
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def broadcast_object(value):
    """Return rank 0's `value` on every rank (a sampled token, a line of user input)."""
    if world_size == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def split_evenly(total: int, quantity: str) -> int:
    """Return this rank's share of `total` units (heads, columns, vocabulary rows), which must divide evenly."""
    if total % world_size:
        raise UserError(f"{quantity} ({total}) cannot be split evenly across {world_size} ranks; use a --nproc-per-node that divides {total}")
    return total // world_size


def kv_heads_of_rank(total: int) -> tuple[int, int]:
    """Return (first, count) of the KV heads this rank needs.

    With fewer KV heads than ranks (grouped-query attention on many GPUs), each KV head is copied
    to the world_size / total ranks whose query heads read it.
    """
    if total % world_size == 0:
        count = total // world_size
        return rank * count, count
    if world_size % total == 0:
        return rank // (world_size // total), 1
    raise UserError(f"{total} KV heads cannot be shared evenly by {world_size} ranks; use a --nproc-per-node that divides or is a multiple of {total}")


class ColumnParallelLinear(nn.Linear):
    """A linear layer whose output features are split across ranks; each rank computes its own slice.

    `shard` = (dim, first, total): this rank's weight is rows first .. first + local - 1 of the
    checkpoint's `total` rows; the loader reads only those.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, first: int | None = None, local: int | None = None):
        local = local if local is not None else split_evenly(out_features, "output features")
        super().__init__(in_features, local, bias=bias)
        self.shard = (0, rank * local if first is None else first, out_features)


class RowParallelLinear(nn.Linear):
    """A linear layer whose input features are split across ranks; one all-reduce sums the partial products."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        local = split_evenly(in_features, "input features")
        super().__init__(local, out_features, bias=bias)
        self.shard = (1, rank * local, in_features)  # the bias is not split: it is added once, after the sum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if world_size == 1:  # one fused call, so that the bias rounds as in nn.Linear (bit for bit in bfloat16)
            return super().forward(x)
        y = all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class UnreducedRowParallelLinear(RowParallelLinear):
    """A RowParallelLinear without bias that returns this rank's partial product unsummed.

    The caller adds it to other partial outputs and sums them all with one all-reduce (MoE adds the
    shared experts' output to the routed one).
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

class ParallelEmbedding(nn.Embedding):
    """An embedding whose vocabulary rows are split across ranks; each rank looks up the ids in its slice."""

    def __init__(self, vocab_size: int, dim: int):
        local = split_evenly(vocab_size, "vocabulary size")
        super().__init__(local, dim)
        self.shard = (0, rank * local, vocab_size)

    def reset_parameters(self) -> None:
        # The loader fills the weight from the checkpoint, so nn.Embedding's random init is skipped.
        # On the meta device, normal_() imports torch._dynamo (about 1 s), after which the torchrun
        # process group outlives destroy_process_group and gloo can abort at exit.
        pass

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if world_size == 1:
            return super().forward(tokens)
        first = self.shard[1]
        outside = (tokens < first) | (tokens >= first + self.num_embeddings)
        x = F.embedding((tokens - first).masked_fill(outside, 0), self.weight)
        return all_reduce(x.masked_fill(outside[..., None], 0))


# --------------------------------------------------------------------------------------------------
# Layers


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last dimension, computed in float32 and cast back."""
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class RMSNorm(nn.Module):
    """Llama-style RMSNorm: normalise in float32, cast back, then scale by the weight.

    Casting before scaling is the Llama order (Gemma scales first); the two differ in bfloat16.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_normalize(x, self.eps) * self.weight


def rope_inv_freq(config: Config) -> torch.Tensor:
    """Compute RoPE's inverse frequencies theta^(-2i/d) (Su et al., 2021), with llama3 scaling if configured.

    llama3 scaling (Llama 3.1) keeps the frequencies whose wavelength is shorter than
    original_max_position_embeddings / high_freq_factor, divides those with a wavelength longer than
    original_max_position_embeddings / low_freq_factor by the factor, and blends linearly in between.
    """
    # Computed on the CPU even inside load_model's meta-device context, because arithmetic on meta
    # tensors imports torch._dynamo (about 1 s).
    exponents = torch.arange(0, config.head_dim, 2, dtype=torch.float32, device="cpu") / config.head_dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    if config.rope_type != "llama3":
        return inv_freq
    factor, context = config.rope_scaling_factor, config.original_max_position_embeddings
    low_freq_wavelen = context / config.low_freq_factor
    high_freq_wavelen = context / config.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    # With low_freq_factor == high_freq_factor no wavelength is in between, so the division by
    # zero below makes only values that torch.where discards.
    smooth = (context / wavelen - config.low_freq_factor) / (config.high_freq_factor - config.low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_between = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_between, blended, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (T, head_dim/2) for the given positions, one angle per rotated pair."""
    angles = positions[:, None].float() * inv_freq[None, :]  # (T, head_dim/2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of each head by the position's angle ("interleaved" layout).

    This equals the complex product (x[2i] + j x[2i+1]) * e^(j angle) that transformers computes,
    in float32 and cast back, as there.
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # (..., head_dim/2, 2)
    real, imag = pairs.unbind(-1)
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
    """Grouped-query attention: chunked with RoPE and QK-norm, or full and position-free (NoPE)."""

    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        self.n_heads = split_evenly(config.num_attention_heads, "attention heads")  # this rank's query heads
        kv_first, self.n_kv_heads = kv_heads_of_rank(config.num_key_value_heads)
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.eps = config.rms_norm_eps
        self.use_rope = bool(config.no_rope_layers[layer_idx])
        is_chunked = config.layer_types[layer_idx] == "chunked_attention"
        self.chunk = config.attention_chunk_size if is_chunked else None
        self.use_qk_norm = config.use_qk_norm and self.use_rope
        self.temperature_tuning = config.attn_temperature_tuning and not self.use_rope
        self.floor_scale = config.floor_scale
        self.attn_scale = config.attn_scale
        hd, kv_rows = self.head_dim, config.num_key_value_heads * self.head_dim
        self.q_proj = ColumnParallelLinear(config.hidden_size, config.num_attention_heads * hd)
        self.k_proj = ColumnParallelLinear(config.hidden_size, kv_rows, first=kv_first * hd, local=self.n_kv_heads * hd)
        self.v_proj = ColumnParallelLinear(config.hidden_size, kv_rows, first=kv_first * hd, local=self.n_kv_heads * hd)
        self.o_proj = RowParallelLinear(config.num_attention_heads * hd, config.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: "int | torch.Tensor", kv: "LayerCache | None") -> torch.Tensor:
        B, T, _ = x.shape  # batch, new tokens, hidden size
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        if self.use_rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.use_qk_norm:
            # No learned weight: every head of q and k is scaled to unit RMS, after RoPE.
            q, k = rms_normalize(q, self.eps), rms_normalize(k, self.eps)
        if self.temperature_tuning:
            # NoPE layers have no positions, so they sharpen attention at long range by scaling the
            # queries by 1 + attn_scale * ln(1 + floor((pos + 1) / floor_scale)). Below floor_scale the scale is 1.
            positions = (start_pos + torch.arange(T, device=x.device)).float()
            scales = torch.log1p(torch.floor((positions + 1.0) / self.floor_scale)) * self.attn_scale + 1.0  # (T,)
            q = (q * scales[:, None]).to(q.dtype)
        if isinstance(start_pos, torch.Tensor):
            k, v, mask = self.keys_of_static_step(k, v, start_pos, kv)
        else:
            k, v, mask = self.visible_keys(k, v, start_pos, kv)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=True)  # (B, nh, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def visible_keys(self, k: torch.Tensor, v: torch.Tensor, start_pos: int, kv: "LayerCache | None"):
        """Cache the new keys and values; return the keys and values the new queries may see, and the mask.

        Keys before the first query's chunk are outside every new query's chunk, so they are not read at all.
        The mask is None when every returned key is visible, as for one decoded token.
        """
        T = k.shape[2]
        end_pos = start_pos + T
        first_key = 0 if self.chunk is None else start_pos // self.chunk * self.chunk
        if kv is not None:
            k, v = kv.update(k, v, start_pos, first_key)  # (B, nkv, S, hd), S = end_pos - first_key
        if T == 1:
            return k, v, None
        q_pos = torch.arange(start_pos, end_pos, device=k.device)[:, None]
        k_pos = torch.arange(first_key, end_pos, device=k.device)[None, :]
        mask = k_pos <= q_pos  # (T, S) causal
        if self.chunk is not None:
            mask &= k_pos // self.chunk == q_pos // self.chunk  # chunks are fixed blocks of positions, not a sliding window
        return k, v, mask

    def keys_of_static_step(self, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor, kv: "LayerCache"):
        """Cache one token whose position is a tensor (the --compile decode step), as visible_keys does.

        The step writes into the cache in place and attends over the whole buffer with a mask, so
        that every position runs the same shapes and so the same compiled graph.
        """
        k, v = kv.write_at(k, v, position)  # (B, nkv, max_len, hd)
        k_pos = torch.arange(k.shape[2], device=k.device)[None, :]
        mask = k_pos <= position
        if self.chunk is not None:
            mask &= k_pos // self.chunk == position // self.chunk
        return k, v, mask


class MLP(nn.Module):
    """Gated MLP with SiLU (SwiGLU): down(silu(gate(x)) * up(x)).

    As the shared expert (`partial`), it returns this rank's partial output and leaves the sum over
    ranks to the MoE.
    """

    def __init__(self, config: Config, intermediate_size: int, partial: bool = False):
        super().__init__()
        self.gate_proj = ColumnParallelLinear(config.hidden_size, intermediate_size)
        self.up_proj = ColumnParallelLinear(config.hidden_size, intermediate_size)
        down = UnreducedRowParallelLinear if partial else RowParallelLinear
        self.down_proj = down(intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """The routed experts' SwiGLU weights, stacked along a first expert axis as the checkpoint stores them.

    Unlike nn.Linear the matrices are (in, out): an expert computes x @ W. The first
    intermediate_size columns of gate_up_proj are the gate, the rest the up projection. Under
    torchrun each rank stores 1/N of the experts, each one whole (expert parallelism).
    """

    def __init__(self, config: Config):
        super().__init__()
        E = split_evenly(config.num_local_experts, "routed experts")  # this rank's experts
        C, I = config.hidden_size, config.intermediate_size  # hidden, expert width
        self.gate_up_proj = nn.Parameter(torch.empty(E, C, 2 * I))
        self.down_proj = nn.Parameter(torch.empty(E, I, C))
        self.shard = (0, rank * E, config.num_local_experts)  # the checkpoint's experts first .. first + E - 1

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Run rows of x (N, C), sorted by expert, through this rank's experts: counts[e] rows go to local expert e."""
        out = torch.empty_like(x)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = slice(start, start + count)
            gate, up = (x[rows] @ self.gate_up_proj[expert]).chunk(2, dim=-1)  # (count, I) each
            out[rows] = (F.silu(gate) * up) @ self.down_proj[expert]
            start += count
        return out

    def forward_static(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Run each row of x (N, k, C) through the local expert that `experts` (N, k) names, as batched products.

        Run eagerly, the indexing copies the chosen experts' weights. Inductor (torch 2.13, CPU) fuses
        the indexing into the products instead, so the compiled step reads each weight once.
        """
        gate, up = (x[..., None, :] @ self.gate_up_proj[experts]).squeeze(-2).chunk(2, dim=-1)  # (N, k, I) each
        return ((F.silu(gate) * up)[..., None, :] @ self.down_proj[experts]).squeeze(-2)  # (N, k, C)


class MoE(nn.Module):
    """Mixture of experts: a shared expert for every token plus its top-k routed experts (k = 1 in Llama 4).

    The router's score is sigmoid(logit) of each chosen expert, not a softmax over experts, and it
    scales the token before the expert (expert(score * x)), not the expert's output.
    """

    def __init__(self, config: Config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_experts = config.num_local_experts
        self.router = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = Experts(config)
        self.shared_expert = MLP(config, config.intermediate_size, partial=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        x = x.reshape(B * T, C)  # (N, C), N = B * T tokens
        top_logits, chosen = self.router(x).topk(self.top_k, dim=-1)  # (N, k) each
        scores = torch.sigmoid(top_logits.float()).to(x.dtype)  # (N, k)
        # Sort the N * k (token, expert) assignments by expert so that each expert runs one matrix product.
        expert_of = chosen.flatten()  # (N * k,)
        order = expert_of.argsort(stable=True)
        token_of = order // self.top_k  # the token of each sorted assignment
        counts = torch.bincount(expert_of, minlength=self.n_experts).tolist()
        # This rank runs only the assignments of its own experts, a contiguous run of the sorted ones.
        first, local = self.experts.shard[1], self.experts.down_proj.shape[0]
        local_rows = slice(sum(counts[:first]), sum(counts[: first + local]))
        routed = self.experts(x[token_of[local_rows]] * scores.flatten()[order[local_rows], None], counts[first : first + local])
        out = self.shared_expert(x).index_add(0, token_of[local_rows], routed)  # (N, C): this rank's share of the output
        return all_reduce(out).view(B, T, C)  # one sum over ranks for both the shared and the routed experts

    def forward_static(self, x: torch.Tensor) -> torch.Tensor:
        """Compute forward(x) with fixed shapes and no host sync, for the --compile decode step.

        Each token's chosen experts are gathered by index, and a chosen expert that another rank
        stores adds zero here.
        """
        B, T, C = x.shape
        x = x.reshape(B * T, C)  # (N, C), N = B * T tokens
        top_logits, chosen = self.router(x).topk(self.top_k, dim=-1)  # (N, k) each
        scores = torch.sigmoid(top_logits.float()).to(x.dtype)  # (N, k)
        # forward adds a token's routed outputs in expert order, so the sums below take the same order.
        chosen, order = chosen.sort(dim=-1)
        scores = scores.gather(1, order)
        first, local = self.experts.shard[1], self.experts.down_proj.shape[0]
        experts = chosen - first  # (N, k): indices into this rank's experts
        own = (experts >= 0) & (experts < local)
        routed = self.experts.forward_static(x[:, None] * scores[..., None], experts.clamp(0, local - 1))  # (N, k, C)
        out = self.shared_expert(x)
        for i in range(self.top_k):
            out = out + torch.where(own[:, i, None], routed[:, i], 0)
        return all_reduce(out).view(B, T, C)


class Block(nn.Module):
    """One pre-norm decoder layer; its feed-forward part is an MoE or a dense MLP, as the config assigns."""

    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        if layer_idx in config.moe_layers:
            self.feed_forward = MoE(config)
        else:
            self.feed_forward = MLP(config, config.intermediate_size_mlp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, start_pos, kv):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start_pos, kv)
        if isinstance(self.feed_forward, MoE) and isinstance(start_pos, torch.Tensor):
            x = x + self.feed_forward.forward_static(self.post_attention_layernorm(x))
        else:
            x = x + self.feed_forward(self.post_attention_layernorm(x))
        return x


class Model(nn.Module):
    """The Llama 4 text decoder with its LM head; module names match the checkpoint's tensor names."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.embed_tokens = ParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # The LM head is a separate matrix unless the config ties it to the embedding; both are split by vocabulary.
        self.lm_head = None if config.tie_word_embeddings else ColumnParallelLinear(config.hidden_size, config.vocab_size)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def forward(self, tokens: torch.Tensor, cache: "KVCache | None" = None, start_pos: "int | torch.Tensor" = 0, last_only: bool = False) -> torch.Tensor:
        """Return logits (B, T, vocab) for `tokens` (B, T) at positions start_pos.. (only the last one if `last_only`).

        A 0-d tensor `start_pos` runs the static-shape decode step of --compile: one token, with a cache.
        """
        x = self.embed_tokens(tokens)  # (B, T, C)
        positions = start_pos + torch.arange(tokens.shape[1], device=tokens.device)
        # float32 tables: apply_rope rotates in float32 whatever the activation dtype.
        cos, sin = rope_cos_sin(self.inv_freq, positions, torch.float32)  # (T, head_dim/2) each
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, start_pos, None if cache is None else cache.layers[i])
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        logits = F.linear(x, self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight)
        return all_gather_last_dim(logits)  # each rank computed the logits of its vocabulary slice


# --------------------------------------------------------------------------------------------------
# Checkpoint loading

HUB_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
]
# Multimodal checkpoints (Llama4ForConditionalGeneration) keep the text model under
# `language_model.`: `language_model.model.*` and `language_model.lm_head.weight`, both on the hub
# and in transformers 5.25's own state_dict. Text-only checkpoints use `model.*` and `lm_head.weight`.
TEXT_PREFIXES = ("language_model.model.", "model.")
LM_HEAD_KEYS = ("lm_head.weight", "language_model.lm_head.weight")
VISION_PREFIXES = ("vision_model.", "multi_modal_projector.")

def log(message: str) -> None:
    if is_rank_zero():  # under torchrun, rank 0 alone prints
        print(message, file=sys.stderr, flush=True)


def resolve_checkpoint(model: str) -> Path:
    """Return a local folder holding the checkpoint: `model` itself, or its hub download."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"--model {model} is a file; pass the folder that contains config.json")
        return path
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise UserError(f"--model {model}: no such folder, and not a hub repo id of the form owner/name")
    return download(model)


def download(repo_id: str) -> Path:
    """Download the files this loader needs from the hub into its usual cache (HF_TOKEN is honoured)."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        # config.json first, so that a checkpoint of another family fails before gigabytes arrive.
        check_architecture(json.loads(Path(hf_hub_download(repo_id, "config.json")).read_text()), repo_id)
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except GatedRepoError:
        raise UserError(
            f"{repo_id} is gated: accept its license at https://huggingface.co/{repo_id}, "
            "then run `huggingface-cli login` or set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(f"{repo_id} not found on the Hugging Face hub (or it is private and HF_TOKEN is not set)") from None
    except LocalEntryNotFoundError:
        raise UserError(f"cannot download {repo_id}: the hub is unreachable and it is not in the local cache; pass a local folder with --model") from None
    except HfHubHTTPError as error:
        raise UserError(f"cannot download {repo_id}: {str(error).splitlines()[0]}") from None


def check_architecture(raw: dict, source: str) -> None:
    if raw.get("model_type") in MODEL_TYPES:
        return
    found = raw.get("model_type") or raw.get("architectures") or "unknown"
    raise UserError(f"{source} is a {found!r} checkpoint, not Llama 4 ({', '.join(MODEL_TYPES)}); use the model file for its family")


def read_json(file: Path) -> dict:
    """Parse one of the checkpoint's JSON files, raising a UserError for a damaged one (an interrupted download)."""
    try:
        return json.loads(file.read_text())
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors.
        raise UserError(f"invalid JSON in {file} ({error}): download it again") from None


def read_config(folder: Path) -> tuple[Config, dict]:
    """Return the Config and the generation settings (generation_config.json, or {}) of a checkpoint folder."""
    config_file = folder / "config.json"
    if not config_file.exists():
        raise UserError(f"{folder} has no config.json; pass a Hugging Face checkpoint folder")
    raw = read_json(config_file)
    check_architecture(raw, str(folder))
    generation_file = folder / "generation_config.json"
    generation = read_json(generation_file) if generation_file.exists() else {}
    return Config.from_hf(raw), generation


def checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(read_json(index)["weight_map"].values()))
        missing = [name for name in shards if not (folder / name).exists()]
        if missing:
            raise UserError(f"{folder} is incomplete: {missing[0]} (named in model.safetensors.index.json) is missing")
        return [folder / name for name in shards]
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    raise UserError(f"{folder} has no model.safetensors or model.safetensors.index.json; only safetensors checkpoints load")


def parameter_name(key: str, config: Config) -> str | None:
    """Map a checkpoint tensor name to this file's parameter name; None means the tensor is not used."""
    if key in LM_HEAD_KEYS:
        return None if config.tie_word_embeddings else "lm_head.weight"
    for prefix in TEXT_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


# safetensors dtype names -> torch dtypes
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
READ_CHUNK_BYTES = 16 * 2**20  # the only transient buffer of loading, so kept small


class SafetensorsFile:
    """A .safetensors file, read with plain reads rather than mmap.

    The format is an 8-byte little-endian header size, a JSON header mapping each tensor name to
    its dtype, shape and byte range, then the raw little-endian data. Reading a tensor in chunks of
    rows straight into its destination (of any dtype, device and layout) means that memory never
    holds a second copy of a tensor, and that no mapped file pages linger in the process's memory.
    """

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "rb")
        size = path.stat().st_size
        header_size = int.from_bytes(self.file.read(8), "little")
        try:
            if size < 8 + header_size:
                raise ValueError("header longer than the file")
            self.header = json.loads(self.file.read(header_size))
        except ValueError:
            self.file.close()
            raise UserError(f"invalid safetensors file {path} (damaged or truncated): download it again") from None
        self.header.pop("__metadata__", None)
        self.data_start = 8 + header_size
        needed = self.data_start + max((entry["data_offsets"][1] for entry in self.header.values()), default=0)
        # Reading past the end would leave parts of the tensors unwritten.
        if size < needed:
            self.file.close()
            raise UserError(f"truncated safetensors file {path}: {size} bytes, but its header describes {needed}. Download it again")

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.header[key]["dtype"]]

    def read(
        self,
        key: str,
        dtype: torch.dtype | None = None,
        device: torch.device = torch.device("cpu"),
        column_major: bool = False,
        shard: tuple[int, int, int] | None = None,
    ) -> torch.Tensor:
        """Read tensor `key`, cast to `dtype` (default: as stored), onto `device`.

        `shard` = (dim, first, length) reads only indices first .. first + length - 1 along `dim`
        (a tensor-parallel rank's slice); the other bytes are never read. A column-major matrix
        keeps its (out, in) shape; only its strides differ.
        """
        shape = self.shape(key) or (1,)  # a scalar is read as one element
        source_dtype = self.dtype(key)
        dtype = dtype or source_dtype
        dim, first, length = shard or (0, 0, shape[0])
        local_shape = (*shape[:dim], length, *shape[dim + 1 :])
        if column_major:
            out = torch.empty(local_shape[::-1], dtype=dtype, device=device).t()  # (out, in) view of (in, out) storage
        else:
            out = torch.empty(local_shape, dtype=dtype, device=device)
        if not self.shape(key):
            out = out.view(())  # a scalar; written below through a one-element view
        if out.numel() == 0:
            return out
        # View the tensor as (outer, shape[dim], inner): the slice is one contiguous run of bytes per
        # outer index, read in pieces of at most READ_CHUNK_BYTES straight into `out`.
        outer, inner = math.prod(shape[:dim]), math.prod(shape[dim + 1 :])
        if out.is_contiguous():
            target = out.reshape(outer, length, inner)  # a view: `out` is contiguous
        else:  # a column-major matrix: the same view through its strides
            target = out.unsqueeze(0) if dim == 0 else out.unsqueeze(-1)
        item = source_dtype.itemsize
        begin = self.data_start + self.header[key]["data_offsets"][0]
        rows_per_read = max(1, READ_CHUNK_BYTES // (inner * item))  # along `dim`, within one outer index
        outers_per_read = max(1, rows_per_read // length)  # whole slices of several outer indices at once
        for o in range(0, outer, outers_per_read):
            o_count = min(outers_per_read, outer - o)
            for r in range(0, length, rows_per_read):
                r_count = min(rows_per_read, length - r)
                run = r_count * inner * item
                buffer = bytearray(o_count * run)
                for i in range(o_count):
                    self.file.seek(begin + (((o + i) * shape[dim] + first + r) * inner) * item)
                    self.file.readinto(memoryview(buffer)[i * run : (i + 1) * run])
                target[o : o + o_count, r : r + r_count] = torch.frombuffer(buffer, dtype=source_dtype).view(o_count, r_count, inner)
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def load_model(folder: Path, config: Config, device: torch.device, dtype: torch.dtype, max_memory: float | None = None) -> Model:
    """Build the model on the meta device, then fill it tensor by tensor from the safetensors files.

    Each tensor is read in chunks straight into its final dtype, device and layout, so peak memory
    stays near the size of the weights in the target dtype. Under torchrun each rank reads only
    its own slices. Loading is strict: a missing, unexpected or misshapen tensor raises an error
    that names it. `max_memory` (GiB per rank) replaces the device's free memory in the fit check.
    """
    with torch.device("meta"):
        model = Model(config)
    check_fit(sum(p.numel() for p in model.parameters()) * dtype.itemsize, device, max_memory)
    expected = dict(model.named_parameters())
    loaded, skipped = set(), 0
    for file in checkpoint_files(folder):
        with SafetensorsFile(file) as f:
            for key in f.keys():
                if key.startswith(VISION_PREFIXES):
                    skipped += 1
                    continue
                name = parameter_name(key, config)
                if name is None:
                    continue
                if name not in expected:
                    raise UserError(f"unexpected tensor {key} in {file.name}; is this a Llama 4 checkpoint?")
                full_shape, shard = checkpoint_slice(model, name)
                if f.shape(key) != full_shape:
                    raise UserError(f"tensor {key} has shape {f.shape(key)}, expected {full_shape} from config.json")
                tensor = f.read(key, dtype, device, column_major=use_column_major(f.shape(key), dtype, device), shard=shard)
                set_parameter(model, name, tensor)
                loaded.add(name)
    missing = sorted(set(expected) - loaded)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"checkpoint {folder} lacks tensor {missing[0]}{more}")
    if skipped:
        log(f"skipped {skipped} vision-model and projector tensors: this file runs the text model only")
    # rope_inv_freq computed the RoPE frequencies on the CPU, so compute them again on the weights' device.
    model.inv_freq = rope_inv_freq(config).to(device)
    return model.eval()


def checkpoint_slice(model: nn.Module, name: str) -> tuple[tuple[int, ...], tuple[int, int, int] | None]:
    """Return the checkpoint shape of parameter `name` and the (dim, first, length) slice this rank stores."""
    shape = tuple(model.get_parameter(name).shape)
    module_name, _, _ = name.rpartition(".")
    shard = getattr(model.get_submodule(module_name), "shard", None)
    if shard is None or shard[0] >= len(shape):  # not split (a row-parallel bias is added whole)
        return shape, None
    dim, first, total = shard
    return (*shape[:dim], total, *shape[dim + 1 :]), (dim, first, shape[dim])


def free_memory(device: torch.device) -> int | None:
    """Return the bytes this rank may fill on `device`: free GPU memory, or available RAM shared by this machine's ranks."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu" and Path("/proc/meminfo").exists():
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return None  # unknown (MPS, or a CPU without /proc): no check


def check_fit(weight_bytes: int, device: torch.device, max_memory: float | None) -> None:
    """Raise a UserError before any weight is read when this rank's `weight_bytes` exceed its memory.

    Every rank takes part, so that all of them stop together when any one of them lacks room.
    """
    available = free_memory(device) if max_memory is None else int(max_memory * 2**30)
    ratio = torch.tensor([0.0 if available is None else weight_bytes / max(available, 1)], dtype=torch.float64, device=device)
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(ratio, op=dist.ReduceOp.MAX)
    if ratio.item() > 1:
        source = "--max-memory" if max_memory is not None else f"free on {device.type}"
        needed = math.ceil(world_size * ratio.item())
        raise UserError(
            f"the weights need {weight_bytes / 2**30:.2f} GiB per rank but a rank has only {weight_bytes / ratio.item() / 2**30:.2f} GiB "
            f"({source}); run on at least {needed} devices (torchrun --nproc-per-node N, with N >= {needed} dividing the attention heads, "
            "experts and vocabulary size), or pick a smaller --dtype"
        )


def use_column_major(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> bool:
    """Return whether to store a weight column-major: only float32 matrices on the CPU.

    A matrix-vector product reads a column-major float32 (out, in) weight about twice as fast as a
    row-major one with this torch on x86 CPUs (measured: 21 GB/s against 11 GB/s for the 262144 x 640
    LM head). In bfloat16 the row-major layout is the fast one. The shape does not change, only
    the strides, so every other line of the file is unaware of it.
    """
    return len(shape) == 2 and dtype == torch.float32 and device.type == "cpu"


def set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(module_name), attr, nn.Parameter(tensor, requires_grad=False))


# --------------------------------------------------------------------------------------------------
# Tokenizer and chat template


class Tokenizer:
    """The checkpoint's tokenizer.json (via `tokenizers`) and its chat template (via jinja2)."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer as HFTokenizer

        file = folder / "tokenizer.json"
        if not file.exists():
            raise UserError(f"{folder} has no tokenizer.json")
        self.tokenizer = HFTokenizer.from_file(str(file))
        config_file = folder / "tokenizer_config.json"
        self.settings = read_json(config_file) if config_file.exists() else {}
        # The tokenizer's order in transformers: chat_template.jinja, then tokenizer_config.json. Failing
        # both, the chat_template.json that AutoProcessor reads in multimodal repos.
        template_file = folder / "chat_template.jinja"
        processor_file = folder / "chat_template.json"
        self.chat_template = template_file.read_text() if template_file.exists() else self.settings.get("chat_template")
        if not self.chat_template and processor_file.exists():
            self.chat_template = json.loads(processor_file.read_text()).get("chat_template")
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
            self.chat_template = {t["name"]: t["template"] for t in self.chat_template}.get("default")

    def encode(self, text: str) -> list[int]:
        # tokenizer.json's post-processor adds <|begin_of_text|>, exactly as transformers does.
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def special_token(self, name: str) -> str:
        value = self.settings.get(name) or ""
        return value.get("content", "") if isinstance(value, dict) else value

    def encode_chat(self, messages: list[dict], **template_variables) -> list[int]:
        """Render the checkpoint's chat template with a generation prompt, then encode it.

        The template writes <|begin_of_text|> itself, so the text is encoded without special tokens:
        one <|begin_of_text|>.
        `template_variables` reach the template as is (for example enable_thinking=False).
        """
        if not self.chat_template:
            raise UserError("this checkpoint has no chat template (chat_template.jinja, tokenizer_config.json or chat_template.json); drop --chat and --interactive")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        # transformers' apply_chat_template defines strftime_now as well; Llama 3 templates date their system header with it.
        env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
        try:
            text = env.from_string(self.chat_template).render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=self.special_token("bos_token"),
                eos_token=self.special_token("eos_token"),
                **template_variables,
            )
        except TemplateError as error:
            raise UserError(f"the chat template rejected the conversation: {error}") from None
        return self.tokenizer.encode(text, add_special_tokens=False).ids


class StreamDecoder:
    """Turn token ids into text pieces as they arrive, holding back incomplete UTF-8 characters."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.printed = 0  # characters of decode(self.ids) already returned

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # the token ends inside a multi-byte character: wait for the rest
            return ""
        piece = text[self.printed :]
        self.printed = len(text)
        return piece

    def flush(self) -> str:
        """Return what push() held back, such as a replacement character the model really produced."""
        text = self.tokenizer.decode(self.ids)
        piece = text[self.printed :]
        self.printed = len(text)
        return piece


# --------------------------------------------------------------------------------------------------
# KV cache and generation


class LayerCache:
    """Preallocated keys and values of one layer: (B, n_kv_heads, max_len, head_dim) each."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def grow(self, max_len: int) -> None:
        """Reallocate for max_len positions, keeping what is cached."""
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:2], max_len, old.shape[3])
            new[:, :, : old.shape[2]] = old
            setattr(self, name, new)

    def update(self, k: torch.Tensor, v: torch.Tensor, start_pos: int, first_key: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys and values at start_pos, return those from first_key to the end."""
        end_pos = start_pos + k.shape[2]
        self.k[:, :, start_pos:end_pos] = k
        self.v[:, :, start_pos:end_pos] = v
        return self.k[:, :, first_key:end_pos], self.v[:, :, first_key:end_pos]

    def write_at(self, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one token's keys and values at `position` (a 0-d tensor); return the whole buffers."""
        self.k.index_copy_(2, position.view(1), k)
        self.v.index_copy_(2, position.view(1), v)
        return self.k, self.v


class KVCache:
    """One LayerCache per layer, for positions 0 .. max_len - 1, of the KV heads this rank stores."""

    def __init__(self, config: Config, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (batch, kv_heads_of_rank(config.num_key_value_heads)[1], max_len, config.head_dim)
        self.layers = [LayerCache(shape, dtype, device) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len

    def ensure(self, length: int) -> None:
        """Make room for `length` positions, doubling the buffers so that a long chat grows them rarely."""
        if length > self.max_len:
            self.max_len = max(length, 2 * self.max_len)
            for layer in self.layers:
                layer.grow(self.max_len)


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None) -> int:
    """Pick the next token from a (vocab,) logit vector: argmax at temperature 0, else top-k/top-p sampling."""
    if not torch.isfinite(logits).all():
        raise UserError(f"the logits contain NaN or infinity ({logits.dtype}): the activations overflow; use --dtype bfloat16 or float32")
    if temperature == 0:
        return int(logits.argmax())
    scaled = logits.float() / temperature
    if not torch.isfinite(scaled).all():  # The temperature is so close to 0 that the division overflows.
        return int(logits.argmax())
    logits = scaled
    if top_k > 0:
        kth_largest = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Drop a token once the more likely ones already cover top_p; the most likely always stays.
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p
        logits[order[drop]] = float("-inf")
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


@torch.inference_mode()
def generate(
    model: Model,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_tokens: set[int] = frozenset(),
    seed: int | None = None,
    cache: KVCache | None = None,
    start_pos: int = 0,
    decode_step: Callable | None = None,
) -> Iterator[int]:
    """Yield new token ids: one prefill pass over the prompt, then one decode pass per token.

    With a `cache` that already contains positions 0 .. start_pos - 1 (an earlier turn of a chat),
    `prompt` continues from start_pos and only it is prefilled. The last token yielded is not
    written to the cache. `decode_step` (from compile_decode_step) replaces the model for the
    one-token steps.
    """
    device, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    end_pos = start_pos + len(prompt) + max_new_tokens
    if cache is None:
        cache = KVCache(model.config, 1, end_pos, dtype, device)
    cache.ensure(end_pos)
    logits = model(torch.tensor([prompt], device=device), cache, start_pos=start_pos, last_only=True)
    for pos in range(start_pos + len(prompt), end_pos):
        token = broadcast_object(sample(logits[0, -1], temperature, top_k, top_p, generator))  # rank 0's draw
        yield token
        if token in stop_tokens or pos + 1 == end_pos:
            return
        if decode_step is None:
            logits = model(torch.tensor([[token]], device=device), cache, start_pos=pos)
        else:
            logits = decode_step(torch.tensor([[token]], device=device), cache, torch.tensor(pos, device=device))


def compile_decode_step(model: Model) -> Callable:
    """Return `model` compiled by torch.compile for the one-token decode steps (--compile).

    Inductor fuses the many small per-token operations into a few kernels and, with freezing,
    treats the weights as constants that it prepacks for its own matrix kernels. Each step passes
    its position as a tensor, so every step has the same shapes and reuses one graph; the prompt
    still runs eagerly. Measured on 2 CPU cores with Gemma 3 270M in bfloat16 (scripts/benchmark.py):
    17.6 -> 32.0 tokens/s after about 30 s of compilation on the first step of every run (inductor's on-disk graph cache
    cannot store the prepacked weights, so it is skipped); in float32, bound by reading the
    weights, it gained about 6%. So it pays for long generations and chats in
    bfloat16, not for a short reply.

    Freezing applies to half-precision weights only, because the prepacked copy sits next to the
    weights: Gemma 3 270M peaked at 1627 MB instead of 929 MB in bfloat16, and in float32 at
    3.5x the weight bytes for a 7% gain, so float32 compiles without it.
    """
    torch._inductor.config.freezing = model.embed_tokens.weight.dtype != torch.float32
    return torch.compile(model, fullgraph=True, dynamic=False)


# --------------------------------------------------------------------------------------------------
# Architecture summary (--info): sizes computed from the config alone, on the meta device

BFLOAT16_BYTES = 2
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LONG_CONTEXT = 128 * 1024


def vision_tower_parameters(vision: dict, text_hidden_size: int) -> int:
    """Count the parameters of transformers' Llama4VisionModel and the projector into the text model.

    The formula follows the modules of transformers 5.25. The embeddings are a patch embedding
    without bias, a class embedding, one position embedding per patch plus the class token, and two
    LayerNorms. Each ViT layer has attention and an MLP with biases, and two LayerNorms. The
    pixel-shuffle adapter's two linears and the projector's linear have no bias.
    """
    h, i, channels, patch = vision["hidden_size"], vision["intermediate_size"], vision["num_channels"], vision["patch_size"]
    positions = (vision["image_size"] // patch) ** 2 + 1
    embeddings = channels * patch * patch * h + h + positions * h + 2 * 2 * h
    layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 2 * 2 * h
    adapter = i * vision["projector_input_dim"] + vision["projector_output_dim"] ** 2
    projector = vision["vision_output_dim"] * text_hidden_size
    return embeddings + vision["num_hidden_layers"] * layer + adapter + projector


def describe(config: Config) -> dict:
    """Return parameter counts, layer kinds, attention layout and memory figures for `config`.

    Nothing is loaded: the text model is built on the meta device, where parameters have shapes
    but no storage. The total counts the vision tower too, as Meta's published sizes do (109B for
    Scout, 400B for Maverick). The active count is the text model's, which Meta gives as 17B. The
    KV cache figures are what the architecture needs in bfloat16: a chunked layer never needs more
    than `attention_chunk_size` positions, the keys of the current chunk.
    """
    with torch.device("meta"):
        model = Model(config)
    text_total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    # Each token runs the shared expert and num_experts_per_tok of the routed experts of each MoE layer.
    active = text_total - routed + routed * config.num_experts_per_tok // config.num_local_experts
    vision = 0 if config.vision_config is None else vision_tower_parameters(config.vision_config, config.hidden_size)
    total = text_total + vision
    kv_per_position = 2 * config.num_key_value_heads * config.head_dim * BFLOAT16_BYTES  # keys and values
    full = config.layer_types.count("full_attention")
    chunked = config.layer_types.count("chunked_attention")
    nope = config.no_rope_layers.count(0)
    chunk = config.attention_chunk_size or 0
    return {
        "family": "Llama 4",
        "total_parameters": total,
        "active_parameters": active,
        "layers": f"{config.num_hidden_layers}: {chunked} chunked ({chunk}), {full} full ({nope} NoPE); {len(config.moe_layers)} MoE",
        "attention": f"GQA, {config.num_attention_heads} query / {config.num_key_value_heads} KV heads of {config.head_dim}",
        "kv_bytes_per_token": full * kv_per_position,
        "kv_bytes_long_context": (full * LONG_CONTEXT + chunked * min(chunk, LONG_CONTEXT)) * kv_per_position,
        "weight_bytes": total * DTYPE_BYTES.get(config.dtype, BFLOAT16_BYTES),
        "weight_format": config.dtype if config.vision_config is None else f"{config.dtype}, vision tower included",
    }


def format_description(description: dict) -> str:
    def gigabytes(n: int) -> str:
        return f"{n / 1e9:.2f} GB"

    lines = [
        f"{description['family']}",
        f"parameters:          {description['total_parameters'] / 1e9:.2f} B total, {description['active_parameters'] / 1e9:.2f} B active per token",
        f"layers:              {description['layers']}",
        f"attention:           {description['attention']}",
        f"KV cache (bfloat16): {description['kv_bytes_per_token']:,} bytes per token of context (window layers capped at their window); {gigabytes(description['kv_bytes_long_context'])} at {LONG_CONTEXT:,} tokens",
        f"weights as published: {gigabytes(description['weight_bytes'])} ({description['weight_format']})",
    ]
    return "\n".join(lines)


def read_config_only(model: str | None) -> Config:
    """Return the Config of a folder or hub repo, fetching config.json alone (the flagship's defaults without `model`)."""
    if model is None:
        return Config()
    path = Path(model).expanduser()
    if path.exists() or model.count("/") != 1 or model.startswith((".", "/", "~")):
        return read_config(resolve_checkpoint(model))[0]  # A local path gets a run's checks and no download.
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        raw = json.loads(Path(hf_hub_download(model, "config.json")).read_text())
    except (LocalEntryNotFoundError, HfHubHTTPError) as error:
        raise UserError(f"cannot read config.json of {model}: {str(error).splitlines()[0]}") from None
    check_architecture(raw, model)
    return Config.from_hf(raw)


# --------------------------------------------------------------------------------------------------
# CLI

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))  # torchrun gives each rank of a machine its own GPU
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to torch; use --device cpu")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: MPS is not available on this machine; use --device cpu")
    return torch.device(name)


def pick_dtype(name: str, config: Config, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    # The checkpoint's own dtype, except that CPUs without fast half precision get float32.
    dtype = DTYPES.get(config.dtype, torch.float32)
    return torch.float32 if device.type == "cpu" and dtype == torch.float16 else dtype


def stop_tokens(config: Config, generation: dict, tokenizer: Tokenizer, chat: bool) -> set[int]:
    """Token ids that end generation: generation_config.json's EOS list (else config.json's), plus end-of-turn when chatting."""
    eos = generation.get("eos_token_id", config.eos_token_id)
    stops = set(eos if isinstance(eos, list) else [eos])
    end_of_turn = tokenizer.token_id(END_OF_TURN)
    if chat and end_of_turn is not None:
        stops.add(end_of_turn)
    return stops


def sampling_settings(args: argparse.Namespace, generation: dict) -> tuple[float, int, float]:
    """Temperature, top-k and top-p: the flags, else generation_config.json when it samples, else greedy."""
    samples = generation.get("do_sample", False)
    temperature = args.temperature if args.temperature is not None else (generation.get("temperature", 1.0) if samples else 0.0)
    top_k = args.top_k if args.top_k is not None else (generation.get("top_k", 0) if samples else 0)
    top_p = args.top_p if args.top_p is not None else (generation.get("top_p", 1.0) if samples else 1.0)
    if not 0 <= temperature < math.inf:  # also rejects NaN
        raise UserError(f"invalid --temperature {temperature}: use a finite number >= 0 (0 is greedy)")
    if args.seed is not None and not 0 <= args.seed < 2**64:
        raise UserError(f"invalid --seed {args.seed}: use an integer in [0, 2**64)")
    if top_k < 0:
        raise UserError(f"--top-k {top_k}: must be >= 0 (0 keeps every token)")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p {top_p}: must be in (0, 1]")
    return temperature, top_k or 0, top_p if top_p is not None else 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Generate text with a Llama 4 checkpoint.")
    parser.add_argument("--prompt", help="the prompt (with --chat: the user message); required unless --interactive")
    parser.add_argument("--model", default=None, help=f"hub repo id or local folder (default: {DEFAULT_MODEL})")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most, per reply with --interactive (default: 128)")
    parser.add_argument("--temperature", type=float, default=None, help="0 is greedy; default: the checkpoint's generation_config.json, else 0")
    parser.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens, 0 for all; default: generation_config.json, else 0")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]; default: generation_config.json, else 1")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="default: the checkpoint's dtype (float32 for float16 on CPU)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    parser.add_argument("--interactive", action="store_true", help=f"multi-turn chat in the terminal; {CLEAR_COMMAND} starts over, Ctrl-D or Ctrl-C quits")
    parser.add_argument("--compile", action="store_true", help="compile the decode step with torch.compile: faster tokens after a slow first one (see compile_decode_step)")
    parser.add_argument("--max-memory", type=float, default=None, help="GiB each rank may fill with weights (default: the device's free memory)")
    parser.add_argument("--info", action="store_true", help="print sizes computed from the config without loading weights (default: the flagship checkpoint)")
    return parser.parse_args(argv)


CLEAR_COMMAND = "/clear"


def check_context(config: Config, prompt_length: int, max_new_tokens: int) -> None:
    if prompt_length + max_new_tokens > config.max_position_embeddings:
        raise UserError(
            f"prompt ({prompt_length} tokens) plus --max-new-tokens {max_new_tokens} exceeds the context of "
            f"{config.max_position_embeddings} tokens; shorten the prompt or lower --max-new-tokens"
        )


@dataclass
class Session:
    """A loaded checkpoint and the settings every generation call of the CLI shares."""

    model: Model
    tokenizer: Tokenizer
    config: Config
    max_new_tokens: int
    sampling: tuple[float, int, float]  # temperature, top-k, top-p
    stop_tokens: set[int]
    seed: int | None

    load_seconds: float
    decode_step: Callable | None = None  # the compiled model of --compile

    def check_fits(self, prompt_length: int) -> None:
        check_context(self.config, prompt_length, self.max_new_tokens)

    def generate(self, prompt: list[int], cache: KVCache | None = None, start_pos: int = 0) -> Iterator[int]:
        self.check_fits(start_pos + len(prompt))
        beyond = [token for token in prompt if not 0 <= token < self.config.vocab_size]
        if beyond:  # The embedding has no row for this id, so the tokenizer belongs to another checkpoint.
            raise UserError(f"invalid token id {beyond[0]} from the tokenizer: the embedding has {self.config.vocab_size} rows. Use the tokenizer of this checkpoint")
        return generate(self.model, prompt, self.max_new_tokens, *self.sampling, self.stop_tokens, self.seed, cache, start_pos, self.decode_step)


def release_freed_memory() -> None:
    """Hand the heap memory that Python and the tokenizer have freed back to the OS.

    Building a large tokenizer (Gemma's 262k-token tokenizer.json) peaks at a few hundred MB; glibc
    keeps that memory in the process unless asked, where it would sit next to the weights.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to hand back
        pass


def load_session(args: argparse.Namespace) -> Session:
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    folder = resolve_checkpoint(args.model)
    config, generation = read_config(folder)
    sampling = sampling_settings(args, generation)
    if args.max_new_tokens >= config.max_position_embeddings:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the context of {config.max_position_embeddings} tokens")
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, config, device)
    if args.max_memory is not None and not 0 < args.max_memory < math.inf:
        raise UserError(f"--max-memory {args.max_memory}: must be a positive, finite number of GiB")
    if "RANK" in os.environ:  # launched by torchrun
        if args.compile:
            raise UserError("--compile runs in a single process only; drop it under torchrun")
        init_distributed(device)

    started = time.perf_counter()
    # The tokenizer comes first, so that a checkpoint without a chat template or a prompt too long
    # for the context fails before the weights are read (hundreds of gigabytes for some families).
    checkpoint_files(folder)  # a folder without weights fails here, before anything is read
    tokenizer = Tokenizer(folder)
    release_freed_memory()
    if (args.chat or args.interactive) and not tokenizer.chat_template:
        raise UserError(f"{folder} has no chat template (chat_template.jinja or tokenizer_config.json); drop --chat and --interactive")
    if args.prompt is not None:
        # The plain encoding is a lower bound of the chat-rendered one, so this check is safe early.
        check_context(config, len(tokenizer.encode(args.prompt)), args.max_new_tokens)
    model = load_model(folder, config, device, dtype, args.max_memory)
    chat = args.chat or args.interactive
    stops = stop_tokens(config, generation, tokenizer, chat)
    decode_step = compile_decode_step(model) if args.compile else None
    if args.compile:
        log("--compile: torch.compile builds the decode step while the second token is generated (tens of seconds); the tokens/s figure includes that time")
    return Session(model, tokenizer, config, args.max_new_tokens, sampling, stops, args.seed, time.perf_counter() - started, decode_step)


def log_loaded(session: Session, folder: str) -> None:
    weight = session.model.embed_tokens.weight
    log(f"loaded {folder} in {session.load_seconds:.1f}s ({weight.dtype}, {weight.device})")


def stream_reply(session: Session, tokens: Iterator[int]) -> tuple[list[int], float, float]:
    """Print the tokens as text while they arrive; return them with the prefill and decode seconds."""
    stream = StreamDecoder(session.tokenizer)
    reply: list[int] = []
    started = time.perf_counter()
    prefill_seconds = 0.0
    for token in tokens:
        if not reply:
            prefill_seconds = time.perf_counter() - started
            started = time.perf_counter()
        reply.append(token)
        if is_rank_zero():
            print(stream.push(token), end="", flush=True)
    if is_rank_zero():
        print(stream.flush())
    return reply, prefill_seconds, time.perf_counter() - started


def complete(session: Session, args: argparse.Namespace) -> None:
    tokenizer = session.tokenizer
    prompt = tokenizer.encode_chat([{"role": "user", "content": args.prompt}]) if args.chat else tokenizer.encode(args.prompt)
    session.check_fits(len(prompt))
    log_loaded(session, args.model)
    reply, prefill_seconds, decode_seconds = stream_reply(session, session.generate(prompt))
    decode_rate = f"{(len(reply) - 1) / decode_seconds:.1f} tokens/s" if len(reply) > 1 else "n/a"
    log(f"prompt: {len(prompt)} tokens, {len(prompt) / prefill_seconds:.1f} tokens/s; generation: {len(reply)} tokens, {decode_rate}")


def common_prefix(a: list[int], b: list[int]) -> int:
    length = 0
    while length < min(len(a), len(b)) and a[length] == b[length]:
        length += 1
    return length


class Chat:
    """A conversation whose KV cache survives between turns, so each turn prefills only its new tokens.

    Each turn renders the whole conversation with the chat template, then reuses the cached
    positions that the new rendering shares with the ids already in the cache. The template may
    render an earlier reply differently from the ids the model produced, for example with thinking
    removed. The cache is then reused up to the first difference.
    """

    def __init__(self, session: Session):
        self.session = session
        self.clear()

    def clear(self) -> None:
        self.messages: list[dict] = []
        self.cache: KVCache | None = None
        self.cached: list[int] = []  # ids whose keys and values the cache holds, from position 0

    def reply(self, text: str) -> Iterator[int]:
        """Add a user message and yield the reply's token ids as they are generated."""
        self.messages.append({"role": "user", "content": text})
        ids = self.session.tokenizer.encode_chat(self.messages)
        reused = common_prefix(self.cached, ids)
        if reused == len(ids):  # at least one token must be prefilled to get logits
            reused -= 1
        if self.cache is None:
            model = self.session.model
            self.cache = KVCache(model.config, 1, len(ids) + self.session.max_new_tokens, model.embed_tokens.weight.dtype, model.embed_tokens.weight.device)
        reply: list[int] = []
        for token in self.session.generate(ids[reused:], self.cache, start_pos=reused):
            reply.append(token)
            yield token
        # The last reply token was yielded but never fed back, so the cache ends just before it.
        self.cached = ids + reply[:-1]
        text_ids = [t for t in reply if t not in self.session.stop_tokens]
        self.messages.append({"role": "assistant", "content": self.session.tokenizer.decode(text_ids)})


def read_line(prompt: str) -> str | None:
    """Read a line on rank 0 and share it with every rank; None at end of input or Ctrl-C."""
    text = None
    if is_rank_zero():
        try:
            text = input(prompt)
        except (EOFError, KeyboardInterrupt):
            print()
    return broadcast_object(text)


def interactive(session: Session) -> None:
    chat = Chat(session)
    log(f"interactive chat: {CLEAR_COMMAND} starts over, Ctrl-D or Ctrl-C quits")
    while True:
        text = read_line("> ")
        if text is None:
            return
        if text.strip() == CLEAR_COMMAND:
            chat.clear()
            log("conversation cleared")
            continue
        if not text.strip():
            continue
        try:
            stream_reply(session, chat.reply(text))
        except KeyboardInterrupt:  # stop this reply, keep the session
            print()
            chat.clear()
            log("reply interrupted; conversation cleared")
        except UserError as error:  # for example the conversation no longer fits the context
            print()
            log(f"error: {error}; {CLEAR_COMMAND} starts a new conversation")
            chat.messages.pop()  # forget the turn that failed; its partial reply may have overwritten cached positions
            chat.cache, chat.cached = None, []


def run(args: argparse.Namespace) -> None:
    if args.info:
        if is_rank_zero():
            print(format_description(describe(read_config_only(args.model))))
        return
    if args.model is not None and not args.model.strip():
        raise UserError("empty --model: pass a checkpoint folder or a hub repo id, or leave --model out for the default")
    args.model = args.model or DEFAULT_MODEL
    if args.prompt is None and not args.interactive:
        raise UserError("--prompt is required (or use --interactive)")
    if args.prompt is not None and args.interactive:
        raise UserError("--prompt cannot be used with --interactive, which reads its prompts from the terminal: drop one of them")
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("--prompt is empty; give some text to continue")
    session = load_session(args)
    if args.interactive:
        log_loaded(session, args.model)
        interactive(session)
    else:
        complete(session, args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except UserError as error:
        if is_rank_zero():
            print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    finally:
        if "RANK" in os.environ and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
