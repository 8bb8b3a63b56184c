"""Qwen3-Next in one file: config, layers, checkpoint loading, tokenizer, generation, CLI.

Qwen3-Next (Qwen team, 2025; Qwen3-Next-80B-A3B-Instruct and -Thinking) is a hybrid decoder-only
mixture-of-experts transformer with:
- three Gated DeltaNet layers (linear attention with a fixed-size state) for every attention layer;
- Gated DeltaNet: a short causal depthwise convolution, L2-normalised queries and keys, a learned
  per-head decay and write strength (beta), the delta rule, and an RMSNorm gated by silu(z);
- gated attention: the query projection also yields a per-channel output gate, and sigmoid(gate)
  scales the attention output. Queries and keys get a per-head RMSNorm, and RoPE rotates the first
  quarter of each head's dims;
- zero-centred RMSNorm weights (the scale is 1 + w) in the main norms and the QK-norms;
- 512 small experts, 10 per token from a softmax router, plus a shared expert scaled by its own
  sigmoid gate.

The delta rule is written twice: a chunked form (chunks of 64 tokens, a few matrix products per
chunk) for prompts and a recurrent form (one state update per token) for decoding. The cache holds
keys and values for the attention layers and a fixed-size convolution and recurrent state for the
DeltaNet layers.

This file matches `transformers`' Qwen3NextForCausalLM logit for logit; test_parity.py proves it.
The checkpoints are large: 80B parameters, about 160 GB in bfloat16.

    python qwen3_next.py --prompt "The capital of France is"
    python qwen3_next.py --chat --prompt "Write a haiku about tea." --device cuda
    python qwen3_next.py --model ./some/local/folder --prompt "..." --dtype bfloat16 --device cuda
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_MODEL = "Qwen/Qwen3-Next-80B-A3B-Instruct"
MODEL_TYPES = ("qwen3_next",)
END_OF_TURN = "<|im_end|>"  # the chat template closes every turn with this token
LAYER_TYPES = ("linear_attention", "full_attention")  # Gated DeltaNet, gated attention
CHUNK_SIZE = 64  # tokens per chunk of the chunked delta rule, as in transformers


class UserError(Exception):
    """A problem with the user's input or checkpoint; the CLI prints it as one line, no traceback."""


# --------------------------------------------------------------------------------------------------
# Config


# Qwen3NextConfig's defaults in transformers 5.25, for keys a config.json may omit. They differ from
# the 80B flagship in intermediate_size, max_position_embeddings and rope_theta.
TRANSFORMERS_DEFAULTS = {
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 48,
    "max_position_embeddings": 32768, "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256,
    "attention_bias": False, "rope_theta": 10_000.0, "partial_rotary_factor": 0.25,
    "linear_num_key_heads": 16, "linear_key_head_dim": 128, "linear_num_value_heads": 32, "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4, "num_experts": 512, "num_experts_per_tok": 10, "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512, "norm_topk_prob": True, "decoder_sparse_step": 1,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
}


@dataclass
class Config:
    """Hyperparameters of the model; field names follow the checkpoint's config.json.

    The defaults describe the family's flagship, Qwen/Qwen3-Next-80B-A3B-Instruct (its config.json).
    """

    # sizes
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 5120  # the dense MLP of `mlp_only_layers`, which no published checkpoint has
    num_hidden_layers: int = 48
    max_position_embeddings: int = 262144
    layer_types: tuple[str, ...] = ()  # "linear_attention" or "full_attention" per layer
    # gated attention (full_attention layers)
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int = 256
    attention_bias: bool = False
    rope_theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25  # the fraction of each head's dims that RoPE rotates
    # Gated DeltaNet (linear_attention layers)
    linear_num_key_heads: int = 16  # query and key heads
    linear_key_head_dim: int = 128
    linear_num_value_heads: int = 32  # each query/key head serves value_heads / key_heads value heads
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    # mixture of experts
    num_experts: int = 512
    num_experts_per_tok: int = 10
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1  # layer i has experts if (i + 1) % decoder_sparse_step == 0 ...
    mlp_only_layers: tuple[int, ...] = ()  # ... and i is not listed here
    # norms and output
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    # special tokens: <|im_end|>
    eos_token_id: int | list[int] = 151645
    dtype: str = "bfloat16"  # the dtype the checkpoint was saved in

    def __post_init__(self):
        if not self.layer_types:
            # Without `layer_types`, every fourth layer is full attention (transformers' default interval).
            self.layer_types = tuple(
                "full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(self.num_hidden_layers)
            )
        self.layer_types = tuple(self.layer_types)
        self.mlp_only_layers = tuple(self.mlp_only_layers)
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise UserError(f"unsupported layer type {unknown[0]!r} in layer_types; qwen3_next.py supports {', '.join(LAYER_TYPES)}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise UserError(f"layer_types lists {len(self.layer_types)} layers, but num_hidden_layers is {self.num_hidden_layers}")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise UserError(
                f"linear_num_value_heads {self.linear_num_value_heads} is not a multiple of "
                f"linear_num_key_heads {self.linear_num_key_heads}"
            )

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx not in self.mlp_only_layers and self.num_experts > 0 and (layer_idx + 1) % self.decoder_sparse_step == 0

    @classmethod
    def from_hf(cls, raw: dict) -> "Config":
        """Build a Config from a config.json dict."""
        raw = dict(raw)
        if raw.get("quantization_config"):
            method = raw["quantization_config"].get("quant_method", "unknown")
            raise UserError(f"this checkpoint is quantized ({method}); qwen3_next.py loads the bfloat16 repos, not the -FP8 ones")
        if raw.get("hidden_act", "silu") != "silu":
            raise UserError(f"unsupported hidden_act {raw['hidden_act']!r}; qwen3_next.py supports 'silu'")
        # Hub files give the period of the layer pattern instead of `layer_types`.
        if not raw.get("layer_types") and "full_attention_interval" in raw:
            period = raw["full_attention_interval"]
            layers = raw.get("num_hidden_layers") or TRANSFORMERS_DEFAULTS["num_hidden_layers"]
            raw["layer_types"] = ["full_attention" if (i + 1) % period == 0 else "linear_attention" for i in range(layers)]
        # RoPE settings come as `rope_parameters` (transformers >= 5) or as the flat keys
        # `rope_theta`, `partial_rotary_factor` and `rope_scaling` (hub files).
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise UserError(f"unsupported RoPE type {rope_type!r}; qwen3_next.py supports 'default'")
        for key in ("rope_theta", "partial_rotary_factor"):
            if key in rope:
                raw[key] = rope[key]
        raw["dtype"] = raw.get("dtype") or raw.get("torch_dtype") or "float32"
        # A key that config.json leaves out means transformers' default, not this file's flagship value.
        raw = {**TRANSFORMERS_DEFAULTS, **{k: v for k, v in raw.items() if v is not None}}
        known = {f.name for f in fields(cls)}
        # None means "use the default" for every field of this family.
        kept = {k: v for k, v in raw.items() if k in known and v is not None}
        return cls(**kept)


# --------------------------------------------------------------------------------------------------
# Tensor parallelism (torchrun)
#
# Under `torchrun --nproc-per-node N qwen3_next.py ...` each of the N ranks stores 1/N of the attention
# heads, of the Gated DeltaNet heads, of the dense and shared-expert MLP columns, of the routed
# experts and of the vocabulary, and reads only those slices of the checkpoint. A column-parallel
# linear layer splits its output features across ranks, so it needs no communication. The
# row-parallel layer after it splits its input features and sums the partial products with one
# all-reduce. A mixture-of-experts layer sums its routed and shared partial outputs with one
# all-reduce. A plain `python qwen3_next.py` run keeps world_size 1 and calls no torch.distributed
# function.

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


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm, as in Gemma: the stored weight w is an offset, the scale is 1 + w.

    Normalising and scaling both happen in float32 before the cast back.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


class GatedRMSNorm(nn.Module):
    """RMSNorm of the DeltaNet output, multiplied by silu(gate).

    Unlike the main norms its weight is a plain scale (stored around 1, not 0), applied Llama-style:
    normalise in float32, cast back, multiply by w, then gate in float32.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = self.weight * h.type_as(x)
        return (h * F.silu(gate.float())).type_as(x)


def rope_inv_freq(rotary_dim: int, theta: float) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d) of RoPE (Su et al., 2021), d = the rotated dims only."""
    # Computed on the CPU even inside load_model's meta-device context, because arithmetic on meta
    # tensors imports torch._dynamo (about 1 s).
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device="cpu") / rotary_dim
    return 1.0 / (theta**exponents)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (T, rotary_dim) for the given positions, computed in float32 then cast."""
    angles = positions[:, None].float() * inv_freq[None, :]  # (T, rotary_dim/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, rotary_dim): both halves rotate by the same angle
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim dims of each head, pairing x[i] with x[i + rotary_dim/2] ("half-rotated").

    The remaining head_dim - rotary_dim dims pass through unchanged.
    """
    rotary_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


class Attention(nn.Module):
    """Gated grouped-query attention: per-head QK-norm, partial RoPE, and a sigmoid output gate.

    q_proj yields 2 * head_dim channels per head, laid out per head as [query | gate].
    """

    def __init__(self, config: Config):
        super().__init__()
        self.n_heads = split_evenly(config.num_attention_heads, "attention heads")  # this rank's query heads
        kv_first, self.n_kv_heads = kv_heads_of_rank(config.num_key_value_heads)
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        hd, kv_rows, bias = self.head_dim, config.num_key_value_heads * self.head_dim, config.attention_bias
        # The rows of q_proj come in blocks of 2 * head_dim per head, [query | gate], so this rank's
        # run of whole heads keeps the query and the gate of each head together.
        q_rows = 2 * hd
        self.q_proj = ColumnParallelLinear(
            config.hidden_size, config.num_attention_heads * q_rows, bias=bias, first=rank * self.n_heads * q_rows, local=self.n_heads * q_rows
        )
        self.k_proj = ColumnParallelLinear(config.hidden_size, kv_rows, bias=bias, first=kv_first * hd, local=self.n_kv_heads * hd)
        self.v_proj = ColumnParallelLinear(config.hidden_size, kv_rows, bias=bias, first=kv_first * hd, local=self.n_kv_heads * hd)
        self.o_proj = RowParallelLinear(config.num_attention_heads * hd, config.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: "int | torch.Tensor", kv: "LayerCache | None") -> torch.Tensor:
        B, T, _ = x.shape  # batch, new tokens, hidden size
        q, gate = self.q_proj(x).view(B, T, self.n_heads, 2 * self.head_dim).chunk(2, dim=-1)  # (B, T, nh, hd) each
        gate = gate.reshape(B, T, self.n_heads * self.head_dim)
        q = self.q_norm(q).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if isinstance(start_pos, torch.Tensor):
            k, v, mask = self.keys_of_static_step(k, v, start_pos, kv)
        else:
            k, v, mask = self.visible_keys(k, v, start_pos, kv)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=True)  # (B, nh, T, hd)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(out * torch.sigmoid(gate))

    def visible_keys(self, k: torch.Tensor, v: torch.Tensor, start_pos: int, kv: "LayerCache | None"):
        """Cache the new keys and values; return every key and value up to the new end, and the causal mask.

        The mask is None when every returned key is visible, as for one decoded token.
        """
        T = k.shape[2]
        end_pos = start_pos + T
        if kv is not None:
            k, v = kv.update(k, v, start_pos)  # (B, nkv, S, hd), S = end_pos
        if T == 1:
            return k, v, None
        q_pos = torch.arange(start_pos, end_pos, device=k.device)[:, None]
        k_pos = torch.arange(end_pos - k.shape[2], end_pos, device=k.device)[None, :]
        return k, v, k_pos <= q_pos  # (T, S) causal

    def keys_of_static_step(self, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor, kv: "LayerCache"):
        """Cache one token whose position is a tensor (the --compile decode step), as visible_keys does.

        The step writes into the cache in place and attends over the whole buffer with a mask, so
        that every position runs the same shapes and so the same compiled graph.
        """
        k, v = kv.write_at(k, v, position)  # (B, nkv, max_len, hd)
        k_pos = torch.arange(k.shape[2], device=k.device)[None, :]
        return k, v, k_pos <= position


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim; eps sits inside the root, as in the reference."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def recurrent_gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute the gated delta rule one token at a time, the form used for decoding.

    q, k (B, H, T, dk), v (B, H, T, dv), log-decay g and write strength beta (B, H, T), the state
    S (B, H, dk, dv) or None for zeros; all float32. For each token t:
        S = exp(g_t) * S                                decay the memory
        S = S + k_t outer beta_t * (v_t - S^T k_t)      replace what S stores under key k_t by v_t
        o_t = S^T q_t                                   read the memory with the query
    Returns the outputs (B, H, T, dv) and the final state.
    """
    B, H, T, dk = k.shape
    dv = v.shape[-1]
    S = torch.zeros(B, H, dk, dv, dtype=torch.float32, device=q.device) if state is None else state
    outputs = []
    for t in range(T):
        S = S * g[:, :, t].exp()[:, :, None, None]
        stored = torch.einsum("bhk,bhkv->bhv", k[:, :, t], S)  # (B, H, dv): what S returns for key k_t
        delta = beta[:, :, t, None] * (v[:, :, t] - stored)  # (B, H, dv)
        S = S + k[:, :, t, :, None] * delta[:, :, None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
    return torch.stack(outputs, dim=2), S


def chunked_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute the same rule as recurrent_gated_delta_rule chunk by chunk, the form used for prompts.

    Within a chunk, with G_t = exp(g_1 + ... + g_t) the decay since the chunk start and S0 the
    state at the chunk start, unrolling the recurrence gives the writes u_t = beta_t * (v_t - S^T k_t) as
        u_t + sum_{j<t} beta_t (G_t/G_j) (k_t . k_j) u_j = beta_t v_t - beta_t G_t S0^T k_t,
    a unit lower-triangular system (I + A) U = beta V - (beta G K) S0 (the WY/UT form of DeltaNet).
    One triangular solve per chunk replaces chunk_size sequential steps; only the small state S
    passes from chunk to chunk. Then
        o_t = G_t S0^T q_t + sum_{j<=t} (G_t/G_j) (q_t . k_j) u_j
        S   = G_C S0 + sum_j (G_C/G_j) k_j outer u_j.
    Arguments and result as in recurrent_gated_delta_rule.
    """
    B, H, T, dk = k.shape
    dv = v.shape[-1]
    C = chunk_size
    # Padded steps have k = v = 0, beta = 0 and g = 0: they neither decay nor write the state.
    pad = (-T) % C
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    n = (T + pad) // C  # chunks
    q, k, v = (x.view(B, H, n, C, -1) for x in (q, k, v))  # (B, H, n, C, d)
    g, beta = g.view(B, H, n, C), beta.view(B, H, n, C)

    log_G = g.cumsum(-1)  # (B, H, n, C): log G_t
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # decay[..., t, j] = G_t / G_j for j <= t, else 0; masked before exp, because G_t / G_j > 1 may overflow.
    decay = (log_G[..., :, None] - log_G[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # (B, H, n, C, C)
    k_beta = k * beta[..., None]  # (B, H, n, C, dk)
    A = (k_beta @ k.transpose(-1, -2)) * decay  # (B, H, n, C, C): only the strictly lower triangle is read
    U_from_values = torch.linalg.solve_triangular(A, v * beta[..., None], upper=False, unitriangular=True)  # (B, H, n, C, dv)
    U_per_state = torch.linalg.solve_triangular(A, k_beta * log_G.exp()[..., None], upper=False, unitriangular=True)  # (B, H, n, C, dk)
    scores = (q @ k.transpose(-1, -2)) * decay  # (B, H, n, C, C): intra-chunk attention, diagonal included
    q_decayed = q * log_G.exp()[..., None]  # reads S0 as decayed up to step t
    k_to_end = k * (log_G[..., -1:] - log_G).exp()[..., None]  # a write at step j decays until the chunk end
    chunk_decay = log_G[..., -1].exp()[..., None, None]  # (B, H, n, 1, 1): G_C

    S = torch.zeros(B, H, dk, dv, dtype=torch.float32, device=q.device) if state is None else state
    out = torch.empty(B, H, n, C, dv, dtype=torch.float32, device=q.device)
    for i in range(n):
        U = U_from_values[:, :, i] - U_per_state[:, :, i] @ S  # (B, H, C, dv): the writes u_t
        out[:, :, i] = q_decayed[:, :, i] @ S + scores[:, :, i] @ U
        S = S * chunk_decay[:, :, i] + k_to_end[:, :, i].transpose(-1, -2) @ U
    return out.view(B, H, n * C, dv)[:, :, :T], S


class GatedDeltaNet(nn.Module):
    """Linear attention with the gated delta rule, whose state has a fixed size whatever the length.

    in_proj_qkvz and in_proj_ba group their outputs by key head: for each of the nk key heads,
    [q (dk) | k (dk) | v (r * dv) | z (r * dv)] and [b (r) | a (r)], where r = nv / nk value heads
    share that query/key head.

    Under tensor parallelism, each rank stores whole key-head groups: n_k_heads of the key heads, the
    n_v_heads value heads that they serve, and the convolution channels, A_log and dt_bias entries
    of those heads. out_proj sums the ranks' partial outputs.
    """

    def __init__(self, config: Config):
        super().__init__()
        self.n_k_heads = split_evenly(config.linear_num_key_heads, "linear-attention key heads")  # this rank's key heads
        r = config.linear_num_value_heads // config.linear_num_key_heads  # value heads per key head
        self.n_v_heads = self.n_k_heads * r
        self.k_head_dim = config.linear_key_head_dim
        self.v_head_dim = config.linear_value_head_dim
        self.kernel_size = config.linear_conv_kernel_dim
        dk, dv, k_first = self.k_head_dim, self.v_head_dim, rank * self.n_k_heads
        key_dim = self.n_k_heads * dk
        value_dim = self.n_v_heads * dv
        self.conv_channels = 2 * key_dim + value_dim  # q, k and v pass through the convolution, z does not
        # Both projections group their rows by key head, so this rank's key heads are one run of rows.
        qkvz_group, ba_group = 2 * dk + 2 * r * dv, 2 * r
        self.in_proj_qkvz = ColumnParallelLinear(
            config.hidden_size, config.linear_num_key_heads * qkvz_group, first=k_first * qkvz_group, local=self.n_k_heads * qkvz_group
        )
        self.in_proj_ba = ColumnParallelLinear(
            config.hidden_size, config.linear_num_key_heads * ba_group, first=k_first * ba_group, local=self.n_k_heads * ba_group
        )
        # Depthwise: one kernel per channel, weight (channels, 1, kernel_size). forward calls F.conv1d
        # itself, with the cached history as left context in place of zero padding.
        self.conv1d = nn.Conv1d(self.conv_channels, self.conv_channels, self.kernel_size, groups=self.conv_channels, bias=False)
        # The checkpoint orders the channels [all q heads | all k heads | all v heads], so this rank's
        # channels are three runs, which the loader reads one by one.
        all_key_dim = config.linear_num_key_heads * dk
        all_channels = 2 * all_key_dim + config.linear_num_value_heads * dv
        self.conv1d.shard = (0, k_first * dk, all_channels)
        self.conv1d.runs = ((k_first * dk, key_dim), (all_key_dim + k_first * dk, key_dim), (2 * all_key_dim + k_first * r * dv, value_dim))
        self.dt_bias = nn.Parameter(torch.ones(self.n_v_heads))
        self.A_log = nn.Parameter(torch.zeros(self.n_v_heads))  # the decay rate is exp(A_log)
        self.shard = (0, k_first * r, config.linear_num_value_heads)  # dt_bias and A_log have one entry per value head
        self.norm = GatedRMSNorm(self.v_head_dim, config.rms_norm_eps)
        self.out_proj = RowParallelLinear(config.linear_num_value_heads * dv, config.hidden_size)

    def forward(self, x: torch.Tensor, start_pos: "int | torch.Tensor", state: "DeltaNetState | None") -> torch.Tensor:
        B, T, _ = x.shape
        nk, nv, dk, dv = self.n_k_heads, self.n_v_heads, self.k_head_dim, self.v_head_dim
        r = nv // nk  # value heads per key head
        q, k, v, z = self.in_proj_qkvz(x).view(B, T, nk, 2 * dk + 2 * r * dv).split([dk, dk, r * dv, r * dv], dim=-1)
        b, a = self.in_proj_ba(x).view(B, T, nk, 2 * r).split([r, r], dim=-1)
        z = z.reshape(B, T, nv, dv)
        b, a = b.reshape(B, T, nv), a.reshape(B, T, nv)

        # The convolution takes its channels in the order [all q heads | all k heads | all v heads].
        qkv = torch.cat((q.reshape(B, T, nk * dk), k.reshape(B, T, nk * dk), v.reshape(B, T, nv * dv)), dim=-1)
        qkv = self.causal_conv(qkv, start_pos, state)  # (B, T, conv channels)
        q, k, v = qkv.split([nk * dk, nk * dk, nv * dv], dim=-1)

        # The rule runs in float32 with heads first. Each query/key head serves r consecutive value heads.
        q = l2_normalize(q.reshape(B, T, nk, dk).float()) * dk**-0.5
        k = l2_normalize(k.reshape(B, T, nk, dk).float())
        q = q.repeat_interleave(r, dim=2).transpose(1, 2)  # (B, nv, T, dk)
        k = k.repeat_interleave(r, dim=2).transpose(1, 2)  # (B, nv, T, dk)
        v = v.reshape(B, T, nv, dv).float().transpose(1, 2)  # (B, nv, T, dv)
        beta = b.sigmoid().float().transpose(1, 2)  # (B, nv, T): how strongly each token writes
        # Log-decay g <= 0 per token and head, in float32 so that exp(A_log) stays finite in float16.
        g = (-self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)).transpose(1, 2)  # (B, nv, T)

        initial = None if state is None else state.recurrent
        if T == 1:
            out, final = recurrent_gated_delta_rule(q, k, v, g, beta, initial)
        else:
            out, final = chunked_gated_delta_rule(q, k, v, g, beta, initial)
        if state is not None:
            state.recurrent.copy_(final)
            state.length = start_pos + T  # a 0-d tensor in the static decode step, which must not read it on the host
        out = out.transpose(1, 2).to(x.dtype)  # (B, T, nv, dv)
        out = self.norm(out, z)  # normalised per value head
        return self.out_proj(out.reshape(B, T, nv * dv))

    def causal_conv(self, x: torch.Tensor, start_pos: "int | torch.Tensor", state: "DeltaNetState | None") -> torch.Tensor:
        """Apply the depthwise causal convolution and SiLU to x (B, T, channels), updating the cached last inputs.

        The static decode step (a tensor `start_pos`) skips the rewind check because the check would
        need a host sync per layer. Its caller, generate, passes the position where the states end.
        """
        B, T, _ = x.shape
        x = x.transpose(1, 2)  # (B, channels, T)
        if state is None:
            history = x.new_zeros(B, self.conv_channels, self.kernel_size - 1)
        else:
            if not isinstance(start_pos, torch.Tensor):
                length = int(state.length)  # a 0-d tensor after static decode steps, so one host sync here
                if length != start_pos:
                    # The states summarise exactly the tokens before state.length, so they cannot rewind.
                    raise ValueError(
                        f"invalid start_pos {start_pos}: the DeltaNet state contains {length} tokens, "
                        f"so the next call must start at position {length}"
                    )
            history = state.conv
        x = torch.cat((history, x), dim=-1)  # (B, channels, kernel_size - 1 + T)
        if state is not None:
            state.conv.copy_(x[:, :, -(self.kernel_size - 1) :])
        out = F.conv1d(x, self.conv1d.weight, groups=self.conv_channels)  # (B, channels, T)
        return F.silu(out).transpose(1, 2)


class MLP(nn.Module):
    """SwiGLU MLP, down(silu(gate(x)) * up(x)), used by the dense layers and the shared expert.

    Each rank stores a slice of the intermediate columns. The routed experts are in Experts.
    """

    def __init__(self, config: Config, intermediate_size: int):
        super().__init__()
        self.gate_proj = ColumnParallelLinear(config.hidden_size, intermediate_size)
        self.up_proj = ColumnParallelLinear(config.hidden_size, intermediate_size)
        self.down_proj = RowParallelLinear(intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def partial_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return this rank's share of forward(x) before the all-reduce, which the caller does."""
        return F.linear(F.silu(self.gate_proj(x)) * self.up_proj(x), self.down_proj.weight)


class Router(nn.Module):
    """Softmax router: the top-k experts by probability, their probabilities renormalised to sum to 1."""

    def __init__(self, config: Config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the chosen experts (N, top_k) and their weights (N, top_k) for tokens x (N, C)."""
        logits = F.linear(x, self.weight)  # (N, E), in the activation dtype as in the reference
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = probs.topk(self.top_k, dim=-1)  # (N, top_k) each
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return experts, weights.to(x.dtype)


class Experts(nn.Module):
    """The routed experts of one MoE layer as stacked SwiGLU weights: gate_proj and up_proj (E, I, C), down_proj (E, C, I).

    The checkpoint stores each expert on its own, `mlp.experts.{e}.{gate,up,down}_proj.weight`, and
    load_model copies each into its slice. Stacking lets the static decode step pick each token's
    experts by indexing. Under expert parallelism E is this rank's share: experts first ..
    first + E - 1, renumbered from 0.
    """

    def __init__(self, config: Config):
        super().__init__()
        E = split_evenly(config.num_experts, "routed experts")
        C, I = config.hidden_size, config.moe_intermediate_size
        self.first = rank * E
        self.total = config.num_experts
        self.gate_proj = nn.Parameter(torch.empty(E, I, C))
        self.up_proj = nn.Parameter(torch.empty(E, I, C))
        self.down_proj = nn.Parameter(torch.empty(E, C, I))

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Return the weighted sum of this rank's chosen experts (N, C) for tokens x (N, C), routed by experts and weights (N, k)."""
        # Sort the N * k (token, expert) assignments by expert, so that each expert that received
        # tokens runs once, on all of its tokens together.
        order = experts.flatten().argsort(stable=True)  # (N * k,)
        counts = experts.flatten().bincount(minlength=self.total).tolist()  # one host sync per layer
        tokens_by_expert = (order // experts.shape[1]).split(counts)
        weights_by_expert = weights.flatten()[order].split(counts)
        own_experts = slice(self.first, self.first + self.gate_proj.shape[0])
        routed = torch.zeros_like(x)
        for expert, (tokens, token_weights) in enumerate(zip(tokens_by_expert[own_experts], weights_by_expert[own_experts])):
            if tokens.numel() == 0:
                continue
            rows = x[tokens]
            hidden = F.silu(F.linear(rows, self.gate_proj[expert])) * F.linear(rows, self.up_proj[expert])
            routed.index_add_(0, tokens, F.linear(hidden, self.down_proj[expert]) * token_weights[:, None])
        return routed

    def forward_gathered(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Compute forward() with fixed shapes and no host sync, for the static decode step.

        Indexing the stacked weights with the (N, k) expert ids gathers each token's k experts,
        which run as batched matrix-vector products. So a step reads k experts per token, not all
        of them, and the graph has no loop over experts. Assignments to another rank's experts get
        weight 0.
        """
        E = self.gate_proj.shape[0]
        local = experts - self.first  # (N, k): index among this rank's experts
        own = (local >= 0) & (local < E)
        local = local.clamp(0, E - 1)
        weights = weights.masked_fill(~own, 0)
        rows = x[:, None, :, None]  # (N, 1, C, 1)
        gate = (self.gate_proj[local] @ rows).squeeze(-1)  # (N, k, I)
        up = (self.up_proj[local] @ rows).squeeze(-1)  # (N, k, I)
        out = (self.down_proj[local] @ (F.silu(gate) * up)[..., None]).squeeze(-1)  # (N, k, C)
        return (out * weights[..., None]).sum(dim=1)


class MoE(nn.Module):
    """Routed experts plus a shared expert whose output a per-token sigmoid gate scales.

    Under expert parallelism, each rank stores a run of the routed experts (see Experts) and a
    slice of the shared expert's columns. The router and the shared expert's (1, hidden) gate stay
    whole on every rank.
    """

    def __init__(self, config: Config):
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config)
        self.shared_expert = MLP(config, config.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor, static: bool = False) -> torch.Tensor:
        """Return the layer's output for x (B, T, C); `static` selects the form of the static decode step."""
        B, T, C = x.shape
        x = x.reshape(B * T, C)  # (N, C), N = B * T tokens
        experts, weights = self.gate(x)  # (N, k) each, k = num_experts_per_tok
        if static:
            routed = self.experts.forward_gathered(x, experts, weights)
        else:
            routed = self.experts(x, experts, weights)
        # The per-token gate scales every rank's partial shared output alike, so it commutes with the sum.
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert.partial_forward(x)  # (N, C)
        # The routed sum and the shared expert's output are both partial on each rank, so one all-reduce adds them.
        return all_reduce(routed + shared).view(B, T, C)


class Block(nn.Module):
    """One pre-norm decoder layer: Gated DeltaNet or gated attention, then experts (or a dense MLP)."""

    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        # Exactly one of the two token mixers exists, under the checkpoint's name.
        is_full = config.layer_types[layer_idx] == "full_attention"
        self.self_attn = Attention(config) if is_full else None
        self.linear_attn = None if is_full else GatedDeltaNet(config)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, start_pos, cache):
        if self.self_attn is not None:
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, start_pos, cache)
        else:
            x = x + self.linear_attn(self.input_layernorm(x), start_pos, cache)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            x = x + self.mlp(h, static=isinstance(start_pos, torch.Tensor))
        else:
            x = x + self.mlp(h)
        return x


class Model(nn.Module):
    """The Qwen3-Next decoder with its LM head; module names match the checkpoint's tensor names."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.embed_tokens = ParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # The LM head reuses the embedding matrix only if the config ties them (no Qwen3-Next checkpoint does).
        # Both are split by vocabulary.
        self.lm_head = None if config.tie_word_embeddings else ColumnParallelLinear(config.hidden_size, config.vocab_size)
        self.register_buffer("inv_freq", rope_inv_freq(config.rotary_dim, config.rope_theta), persistent=False)

    def forward(self, tokens: torch.Tensor, cache: "KVCache | None" = None, start_pos: "int | torch.Tensor" = 0, last_only: bool = False) -> torch.Tensor:
        """Return logits (B, T, vocab) for `tokens` (B, T) at positions start_pos.. (only the last one if `last_only`).

        With a cache, calls must continue where the previous one ended: the DeltaNet states cannot rewind.
        A 0-d tensor `start_pos` runs the static-shape decode step of --compile: one token, with a cache.
        """
        x = self.embed_tokens(tokens)  # (B, T, C)
        positions = start_pos + torch.arange(tokens.shape[1], device=tokens.device)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)  # (T, rotary_dim) each
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
]
# The multi-token prediction (MTP) module, used by other engines for speculative decoding, is stored
# under this prefix; transformers ignores it too.
MTP_PREFIX = "mtp."
EXPERT_KEY = re.compile(r"(model\.layers\.\d+\.mlp\.experts\.)(\d+)\.")
# The name of one routed expert's matrix, as parameter_name returns it: a slice of the stacked weight.
EXPERT_SLICE = re.compile(r"(?P<experts>.+\.mlp\.experts)\.(?P<expert>\d+)\.(?P<part>\w+)\.weight")


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
    raise UserError(f"{source} is a {found!r} checkpoint, not Qwen3-Next ({', '.join(MODEL_TYPES)}); use the model file for its family")


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
    if key == "lm_head.weight":
        return None if config.tie_word_embeddings else "lm_head.weight"
    match = EXPERT_KEY.match(key)
    if match is not None and int(match.group(2)) < config.num_experts:
        # Under expert parallelism, this rank stores a run of the routed experts, renumbered from 0 in
        # Experts. The tensors of other ranks' experts are skipped unread.
        local = split_evenly(config.num_experts, "routed experts")
        expert = int(match.group(2)) - rank * local
        if not 0 <= expert < local:
            return None
        key = f"{match.group(1)}{expert}.{key[match.end() :]}"
    return key.removeprefix("model.")


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
    stays near the size of the weights in the target dtype. A routed expert's matrix is read on its
    own, then copied into its slice of the stacked expert weights. Under torchrun each rank reads
    only its own slices and routed experts. Loading is strict: a missing, unexpected or misshapen tensor
    raises an error that names it. `max_memory` (GiB per rank) replaces the device's free memory in
    the fit check.
    """
    with torch.device("meta"):
        model = Model(config)
    check_fit(sum(p.numel() for p in model.parameters()) * dtype.itemsize, device, max_memory)
    expected = checkpoint_tensors(model)
    allocate_experts(model, dtype, device)
    loaded, skipped = set(), 0
    for file in checkpoint_files(folder):
        with SafetensorsFile(file) as f:
            for key in f.keys():
                if key.startswith(MTP_PREFIX):
                    skipped += 1
                    continue
                name = parameter_name(key, config)
                if name is None:
                    continue
                if name not in expected:
                    raise UserError(f"unexpected tensor {key} in {file.name}; is this a Qwen3-Next checkpoint?")
                expert = EXPERT_SLICE.fullmatch(name)
                full_shape, shard = checkpoint_slice(model, name) if expert is None else (expected[name], None)
                if f.shape(key) != full_shape:
                    raise UserError(f"tensor {key} has shape {f.shape(key)}, expected {full_shape} from config.json")
                loaded.add(name)
                if expert is not None:  # one routed expert's matrix, read whole into its slice of the stacked weight
                    stacked = model.get_parameter(f"{expert['experts']}.{expert['part']}")
                    stacked[int(expert["expert"])].copy_(f.read(key, dtype, device))
                    continue
                runs = getattr(model.get_submodule(name.rpartition(".")[0]), "runs", None)
                if runs is None:
                    tensor = f.read(key, dtype, device, column_major=use_column_major(f.shape(key), dtype, device), shard=shard)
                else:  # several runs along dim 0: the DeltaNet convolution's q, k and v channels
                    tensor = torch.cat([f.read(key, dtype, device, shard=(0, first, length)) for first, length in runs])
                set_parameter(model, name, tensor)
    missing = sorted(set(expected) - loaded)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"checkpoint {folder} lacks tensor {missing[0]}{more}")
    if skipped:
        log(f"skipped {skipped} tensors of the multi-token prediction (MTP) module: this file decodes one token per step")
    # rope_inv_freq computed the RoPE frequencies on the CPU, so compute them again on the weights' device.
    model.inv_freq = rope_inv_freq(config.rotary_dim, config.rope_theta).to(device)
    return model.eval()


def checkpoint_tensors(model: Model) -> dict[str, tuple[int, ...]]:
    """Return the names and shapes of the tensors this rank loads, one per matrix of each routed expert.

    The names are those of parameter_name: a parameter's own name, or for a slice of the stacked
    experts `layers.N.mlp.experts.{e}.{part}.weight`, with e counted among this rank's experts.
    """
    shapes = {}
    for name, param in model.named_parameters():
        module_name, _, part = name.rpartition(".")
        if isinstance(model.get_submodule(module_name), Experts):
            for expert in range(param.shape[0]):
                shapes[f"{module_name}.{expert}.{part}.weight"] = tuple(param.shape[1:])
        else:
            shapes[name] = tuple(param.shape)
    return shapes


def allocate_experts(model: Model, dtype: torch.dtype, device: torch.device) -> None:
    """Allocate the stacked routed-expert weights, which load_model fills one expert at a time.

    Each expert's (out, in) slice gets the layout that use_column_major picks for a matrix of its shape.
    """
    for module in model.modules():
        if not isinstance(module, Experts):
            continue
        for part in ("gate_proj", "up_proj", "down_proj"):
            E, rows, columns = getattr(module, part).shape
            if use_column_major((rows, columns), dtype, device):
                weight = torch.empty(E, columns, rows, dtype=dtype, device=device).transpose(1, 2)
            else:
                weight = torch.empty(E, rows, columns, dtype=dtype, device=device)
            setattr(module, part, nn.Parameter(weight, requires_grad=False))


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
        template_file = folder / "chat_template.jinja"
        self.chat_template = template_file.read_text() if template_file.exists() else self.settings.get("chat_template")
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
            self.chat_template = {t["name"]: t["template"] for t in self.chat_template}.get("default")

    def encode(self, text: str) -> list[int]:
        # tokenizer.json's post-processor decides on special tokens; Qwen's adds none (no BOS).
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

        The template writes every special token itself, so the text is encoded without adding any.
        `template_variables` reach the template as is (for example enable_thinking=False).
        """
        if not self.chat_template:
            raise UserError("this checkpoint has no chat template (chat_template.jinja or tokenizer_config.json); drop --chat and --interactive")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
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
    """Preallocated keys and values of one attention layer: (B, n_kv_heads, max_len, head_dim) each."""

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

    def update(self, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys and values at start_pos, return all of them up to the new end."""
        end_pos = start_pos + k.shape[2]
        self.k[:, :, start_pos:end_pos] = k
        self.v[:, :, start_pos:end_pos] = v
        return self.k[:, :, :end_pos], self.v[:, :, :end_pos]

    def write_at(self, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one token's keys and values at `position` (a 0-d tensor); return the whole buffers."""
        self.k.index_copy_(2, position.view(1), k)
        self.v.index_copy_(2, position.view(1), v)
        return self.k, self.v


class DeltaNetState:
    """The fixed-size state of one Gated DeltaNet layer, whatever the number of tokens seen.

    `conv` contains the last kernel_size - 1 inputs of the convolution (B, channels, kernel_size - 1)
    in the activation dtype. `recurrent` is the delta-rule memory S (B, nv, dk, dv) in float32, the
    dtype the rule runs in. `length` counts the tokens that both summarise: an int, or a 0-d tensor
    after a static decode step, which records it without a host sync. Both states contain only the
    heads (and their channels) that this rank stores.
    """

    def __init__(self, config: Config, batch: int, dtype: torch.dtype, device: torch.device):
        k_heads = split_evenly(config.linear_num_key_heads, "linear-attention key heads")
        v_heads = k_heads * (config.linear_num_value_heads // config.linear_num_key_heads)
        channels = 2 * k_heads * config.linear_key_head_dim + v_heads * config.linear_value_head_dim
        self.conv = torch.zeros(batch, channels, config.linear_conv_kernel_dim - 1, dtype=dtype, device=device)
        shape = (batch, v_heads, config.linear_key_head_dim, config.linear_value_head_dim)
        self.recurrent = torch.zeros(shape, dtype=torch.float32, device=device)
        self.length = 0


class KVCache:
    """Per layer: a LayerCache for gated attention (positions 0 .. max_len - 1), a DeltaNetState for Gated DeltaNet.

    Both contain only the heads that this rank stores.
    """

    def __init__(self, config: Config, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (batch, kv_heads_of_rank(config.num_key_value_heads)[1], max_len, config.head_dim)
        self.layers = [
            LayerCache(shape, dtype, device) if kind == "full_attention" else DeltaNetState(config, batch, dtype, device)
            for kind in config.layer_types
        ]
        self.max_len = max_len

    def ensure(self, length: int) -> None:
        """Make room for `length` positions, doubling the buffers so that a long chat grows them rarely.

        Only the attention layers grow: a DeltaNet state has the same size for any length.
        """
        if length > self.max_len:
            self.max_len = max(length, 2 * self.max_len)
            for layer in self.layers:
                if isinstance(layer, LayerCache):
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
    `prompt` continues from start_pos and only it is prefilled. The DeltaNet states cannot rewind,
    so start_pos must be the number of tokens the cache has seen. The last token yielded is not
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


def describe(config: Config) -> dict:
    """Return parameter counts, layer kinds, attention layout and memory figures for `config`.

    Nothing is loaded: the model is built on the meta device, where parameters have shapes but no
    storage. The counts leave out the multi-token prediction (MTP) layer that the checkpoints also
    hold, as the loader does. Only the gated attention layers keep keys and values per token. Each
    Gated DeltaNet layer keeps a fixed state, counted as KVCache stores it, with the convolution
    history in bfloat16 and the delta-rule memory in float32.
    """
    with torch.device("meta"):
        model = Model(config)
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    # Each token runs the shared expert and num_experts_per_tok of the routed experts of each MoE layer.
    active = total - routed + routed * config.num_experts_per_tok // config.num_experts
    kv_per_position = 2 * config.num_key_value_heads * config.head_dim * BFLOAT16_BYTES  # keys and values
    full = config.layer_types.count("full_attention")
    linear = config.layer_types.count("linear_attention")
    conv_channels = 2 * config.linear_num_key_heads * config.linear_key_head_dim + config.linear_num_value_heads * config.linear_value_head_dim
    float32_bytes = 4
    delta_state = (
        conv_channels * (config.linear_conv_kernel_dim - 1) * BFLOAT16_BYTES
        + config.linear_num_value_heads * config.linear_key_head_dim * config.linear_value_head_dim * float32_bytes
    )
    return {
        "family": "Qwen3-Next",
        "total_parameters": total,
        "active_parameters": active,
        "layers": f"{config.num_hidden_layers}: {linear} linear attention (Gated DeltaNet), {full} full (gated attention)",
        "attention": (
            f"gated GQA, {config.num_attention_heads} query / {config.num_key_value_heads} KV heads of {config.head_dim} "
            f"(RoPE on {config.rotary_dim}); DeltaNet, {config.linear_num_key_heads} QK / {config.linear_num_value_heads} V heads"
        ),
        "kv_bytes_per_token": full * kv_per_position,
        "kv_bytes_long_context": full * LONG_CONTEXT * kv_per_position + linear * delta_state,
        "weight_bytes": total * DTYPE_BYTES.get(config.dtype, BFLOAT16_BYTES),
        "weight_format": config.dtype,
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
    stops = {token for token in (eos if isinstance(eos, list) else [eos]) if token is not None}
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
    parser = argparse.ArgumentParser(description="Generate text with a Qwen3-Next checkpoint.")
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
    render an earlier reply differently from the ids the model produced (for example with thinking
    removed). The attention caches could be reused up to the first difference, but the DeltaNet
    states summarise every cached token and cannot rewind. So unless the new rendering starts with
    all the cached ids, the turn starts a fresh cache and prefills the whole conversation.
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
        # The DeltaNet states contain all of self.cached, so a shorter reuse would need a rewind; at
        # least one token must be prefilled to get logits, which is a rewind as well when reused == len(ids).
        if reused < len(self.cached) or reused == len(ids):
            self.cache = None
            reused = 0
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
