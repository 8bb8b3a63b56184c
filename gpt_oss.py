"""gpt-oss in one file: config, layers, MXFP4 checkpoint loading, tokenizer, harmony chat, generation, CLI.

gpt-oss (OpenAI, "gpt-oss-120b & gpt-oss-20b Model Card", 2025) is a mixture-of-experts decoder-only
transformer with:
- sliding-window (128 tokens) and full attention layers in turn, grouped-query attention with biases;
- a learned attention sink per head: one more softmax logit that takes probability mass but adds no value;
- RoPE stretched by YaRN (Peng et al., 2023) from a 4096-token to a 131072-token context;
- in every layer, a router that picks 4 experts per token, each a clamped SwiGLU MLP with biases;
- expert weights published in MXFP4 (4-bit floats, one power-of-two scale per 32 values), kept packed in
  memory and dequantised per matmul with --dtype auto, or dequantised on load with an explicit --dtype;
- the harmony chat format: the reply's chain of thought goes to the `analysis` channel, the answer to `final`.

This file matches `transformers`' GptOssForCausalLM logit for logit; test_parity.py proves it.

    python gpt_oss.py --chat --prompt "Explain attention sinks in one paragraph."
    python gpt_oss.py --model openai/gpt-oss-120b --chat --show-reasoning --prompt "Is 391 prime?"
    python gpt_oss.py --model ./some/local/folder --prompt "..." --dtype bfloat16 --device cuda
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_MODEL = "openai/gpt-oss-20b"
MODEL_TYPES = ("gpt_oss",)
END_OF_TURN = "<|return|>"  # the end of the final answer
TOOL_CALL = "<|call|>"  # ends a message addressed to a tool; this CLI runs no tools, so it stops there too


class UserError(Exception):
    """A problem with the user's input or checkpoint; the CLI prints it as one line, no traceback."""


# --------------------------------------------------------------------------------------------------
# Config


# GptOssConfig's defaults in transformers 5.25, for keys a config.json may omit. They equal
# gpt-oss-120b's values; the special tokens have no default there and keep this file's.
TRANSFORMERS_DEFAULTS = {
    "vocab_size": 201088, "hidden_size": 2880, "intermediate_size": 2880, "num_hidden_layers": 36,
    "max_position_embeddings": 131072, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
    "sliding_window": 128, "rope_theta": 150_000.0, "num_local_experts": 128, "num_experts_per_tok": 4,
    "swiglu_alpha": 1.702, "swiglu_limit": 7.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}
TRANSFORMERS_DEFAULT_ROPE = {
    "rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
    "original_max_position_embeddings": 4096,
}


@dataclass
class Config:
    """Hyperparameters of the model; field names follow the checkpoint's config.json.

    The defaults describe the family's flagship, openai/gpt-oss-120b (its config.json); gpt-oss-20b
    has 24 layers and 32 experts.
    """

    # sizes
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880  # of each expert
    num_hidden_layers: int = 36
    max_position_embeddings: int = 131072
    # attention
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 64  # heads * head_dim (4096) differs from hidden_size
    sliding_window: int = 128
    layer_types: tuple[str, ...] = ()  # "sliding_attention" or "full_attention" per layer
    # RoPE with YaRN scaling (config.json's `rope_scaling` or `rope_parameters`)
    rope_theta: float = 150_000.0
    rope_scaling_factor: float = 32.0
    rope_original_max_position_embeddings: int = 4096
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_truncate: bool = False  # gpt-oss keeps the ramp bounds fractional; YaRN's default rounds them
    rope_attention_factor: float | None = None  # None: 0.1 * ln(factor) + 1
    # mixture of experts
    num_local_experts: int = 128
    num_experts_per_tok: int = 4
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    # norms and output
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    # special tokens
    eos_token_id: int | list[int] = 200002
    dtype: str = "bfloat16"  # the dtype the checkpoint was saved in (of the non-quantised tensors)
    quant_method: str | None = "mxfp4"  # how the expert weights are stored; None: plain tensors

    def __post_init__(self):
        if not self.layer_types:
            # Without `layer_types`, even layers (0, 2, ...) are sliding and odd layers full, as on the hub.
            self.layer_types = tuple(
                "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(self.num_hidden_layers)
            )
        self.layer_types = tuple(self.layer_types)

    @classmethod
    def from_hf(cls, raw: dict) -> "Config":
        """Build a Config from a config.json dict, in the hub's format or as transformers >= 5 saves it."""
        text = dict(raw)

        # RoPE settings come as `rope_parameters` (transformers >= 5, rope_theta inside)
        # or as `rope_scaling` plus a top-level `rope_theta` (hub files).
        # Neither key means transformers' default, the YaRN settings of the published checkpoints.
        rope = text.get("rope_parameters") or text.get("rope_scaling") or TRANSFORMERS_DEFAULT_ROPE
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "yarn"):
            raise UserError(f"unsupported RoPE type {rope_type!r}; gpt_oss.py supports 'yarn' and 'default'")
        if "rope_theta" in rope:
            text["rope_theta"] = rope["rope_theta"]
        if rope_type == "yarn":
            original = rope.get("original_max_position_embeddings")
            if not original:
                raise UserError("config.json's YaRN RoPE settings lack original_max_position_embeddings")
            text["rope_original_max_position_embeddings"] = original
            context = text.get("max_position_embeddings") or cls.max_position_embeddings
            text["rope_scaling_factor"] = rope.get("factor") or context / original
            # A missing or zero beta means the YaRN paper's value, as in transformers.
            text["rope_beta_fast"] = rope.get("beta_fast") or 32.0
            text["rope_beta_slow"] = rope.get("beta_slow") or 1.0
            text["rope_truncate"] = rope.get("truncate", True)
            text["rope_attention_factor"] = rope.get("attention_factor")
        else:
            text["rope_scaling_factor"] = 1.0  # YaRN with factor 1 is plain RoPE

        quantization = text.get("quantization_config") or {}
        text["quant_method"] = quantization.get("quant_method")
        if text["quant_method"] not in (None, "mxfp4"):
            raise UserError(f"unsupported quantization {text['quant_method']!r}; gpt_oss.py reads 'mxfp4' and unquantised checkpoints")
        # MXFP4 checkpoints are dequantised to bfloat16 unless config.json names another dtype.
        fallback = "bfloat16" if text["quant_method"] else "float32"
        text["dtype"] = text.get("dtype") or text.get("torch_dtype") or fallback

        # A key that config.json leaves out means transformers' default, not this file's flagship value.
        text = {**TRANSFORMERS_DEFAULTS, **{k: v for k, v in text.items() if v is not None or k in ("quant_method", "rope_attention_factor")}}
        known = {f.name for f in fields(cls)}
        # None stays only where it has a meaning (no quantisation, the default attention factor).
        kept = {k: v for k, v in text.items() if k in known and (v is not None or k in ("quant_method", "rope_attention_factor"))}
        return cls(**kept)


# --------------------------------------------------------------------------------------------------
# Tensor parallelism (torchrun)
#
# Under `torchrun --nproc-per-node N gpt_oss.py ...` each of the N ranks stores 1/N of the attention
# heads, of the experts and of the vocabulary, and reads only those slices of the checkpoint.
# A column-parallel linear layer splits its output features across ranks, so it needs no
# communication. The row-parallel layer after it splits its input features and sums the partial
# products with one all-reduce. Every rank routes every token but runs only its own experts, and
# one all-reduce sums the experts' outputs (expert parallelism). A plain `python gpt_oss.py` run
# keeps world_size 1 and calls no torch.distributed function.

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
    """RMSNorm whose weight multiplies while the activations are still float32 (as in OLMo 2).

    Llama casts back to the activation dtype first, then scales; the two differ in bfloat16.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * h).type_as(x)


def rope_inv_freq(config: Config) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d) of RoPE (Su et al., 2021), stretched by YaRN.

    YaRN ("YaRN: Efficient Context Window Extension of Large Language Models", Peng et al., 2023)
    divides a frequency by `factor` only where it turns slowly. Pairs of dimensions that complete
    more than beta_fast rotations over the original context keep their frequency (they encode
    local order), pairs with fewer than beta_slow rotations are divided fully, and a linear ramp
    blends the pairs in between.
    """
    dim, theta, factor = config.head_dim, config.rope_theta, config.rope_scaling_factor
    original = config.rope_original_max_position_embeddings
    # Computed on the CPU even inside load_model's meta-device context, because arithmetic on meta
    # tensors imports torch._dynamo (about 1 s).
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))  # (dim/2,)

    def pair_index(rotations: float) -> float:
        # The pair i whose wavelength 2*pi*theta^(2i/dim) fits `rotations` times into the original context.
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_index(config.rope_beta_fast), pair_index(config.rope_beta_slow)
    if config.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # keeps the ramp finite
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # share of the original frequency: 1 for fast pairs, 0 for slow ones
    return (inv_freq / factor) * (1 - keep) + inv_freq * keep


def rope_attention_factor(config: Config) -> float:
    """YaRN's factor on cos and sin, so the attention logits grow by its square: 0.1 * ln(factor) + 1.

    config.json may set it directly; gpt-oss does not (1.3466 for factor 32).
    """
    if config.rope_attention_factor is not None:
        return config.rope_attention_factor
    factor = config.rope_scaling_factor
    return 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype, attention_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (T, head_dim) for the given positions, scaled by YaRN's factor in float32, then cast."""
    angles = positions[:, None].float() * inv_freq[None, :]  # (T, head_dim/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, head_dim): both halves rotate by the same angle
    return (angles.cos() * attention_factor).to(dtype), (angles.sin() * attention_factor).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + d/2]) of each head by the position's angle ("half-rotated" layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Grouped-query attention with biases, RoPE, an optional sliding window and a learned sink per head."""

    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        self.n_heads = split_evenly(config.num_attention_heads, "attention heads")  # this rank's query heads
        kv_first, self.n_kv_heads = kv_heads_of_rank(config.num_key_value_heads)
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        is_sliding = config.layer_types[layer_idx] == "sliding_attention"
        self.window = config.sliding_window if is_sliding else None
        hd, kv_rows = self.head_dim, config.num_key_value_heads * self.head_dim
        self.q_proj = ColumnParallelLinear(config.hidden_size, config.num_attention_heads * hd, bias=True)
        self.k_proj = ColumnParallelLinear(config.hidden_size, kv_rows, bias=True, first=kv_first * hd, local=self.n_kv_heads * hd)
        self.v_proj = ColumnParallelLinear(config.hidden_size, kv_rows, bias=True, first=kv_first * hd, local=self.n_kv_heads * hd)
        self.o_proj = RowParallelLinear(config.num_attention_heads * hd, config.hidden_size, bias=True)
        self.sinks = nn.Parameter(torch.zeros(self.n_heads))
        self.shard = (0, rank * self.n_heads, config.num_attention_heads)  # of `sinks`: one per query head, split like the heads

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: "int | torch.Tensor", kv: "LayerCache | None") -> torch.Tensor:
        B, T, _ = x.shape  # batch, new tokens, hidden size
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if isinstance(start_pos, torch.Tensor):
            k, v, mask = self.keys_of_static_step(k, v, start_pos, kv)
        else:
            k, v, mask = self.visible_keys(k, v, start_pos, kv)
        out = self.attend(q, k, v, mask)  # (B, nh, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def visible_keys(self, k: torch.Tensor, v: torch.Tensor, start_pos: int, kv: "LayerCache | None"):
        """Cache the new keys and values; return the keys and values the new queries may see, and the mask.

        Keys before `first_key` are outside every new query's window, so they are not read at all.
        The mask is None when every returned key is visible, as for one decoded token.
        """
        T = k.shape[2]
        end_pos = start_pos + T
        first_key = 0 if self.window is None else max(0, start_pos - self.window + 1)
        if kv is not None:
            k, v = kv.update(k, v, start_pos, first_key)  # (B, nkv, S, hd), S = end_pos - first_key
        if T == 1:
            return k, v, None
        q_pos = torch.arange(start_pos, end_pos, device=k.device)[:, None]
        k_pos = torch.arange(first_key, end_pos, device=k.device)[None, :]
        mask = k_pos <= q_pos  # (T, S) causal
        if self.window is not None:
            mask &= k_pos > q_pos - self.window  # the window contains `window` keys, the query's own included
        return k, v, mask

    def keys_of_static_step(self, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor, kv: "LayerCache"):
        """Cache one token whose position is a tensor (the --compile decode step), as visible_keys does.

        The step writes into the cache in place and attends over the whole buffer with a mask, so
        that every position runs the same shapes and so the same compiled graph.
        """
        k, v = kv.write_at(k, v, position)  # (B, nkv, max_len, hd)
        k_pos = torch.arange(k.shape[2], device=k.device)[None, :]
        mask = k_pos <= position
        if self.window is not None:
            mask &= k_pos > position - self.window
        return k, v, mask

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # The sink logit has no key, which the fused scaled_dot_product_attention cannot express,
        # so the softmax is written out. Memory grows with T x S per head: generate() feeds long
        # prompts in chunks for that reason.
        B, _, T, hd = q.shape
        S = k.shape[2]
        groups = self.n_heads // self.n_kv_heads
        # The `groups` query heads of one key/value head are folded into its query axis, so the
        # cached keys and values are read in place instead of being copied `groups` times.
        q = q.reshape(B, self.n_kv_heads, groups * T, hd)
        scores = (q @ k.transpose(-2, -1)) * self.scale  # (B, nkv, groups*T, S)
        scores = scores.view(B, self.n_heads, T, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        # The sink is one extra logit per head with no value behind it: the probability it takes
        # is simply dropped, so a head can give little weight to every key.
        sinks = self.sinks.to(scores.dtype).view(1, self.n_heads, 1, 1).expand(B, -1, T, 1)
        probs = torch.softmax(torch.cat((scores, sinks), dim=-1), dim=-1, dtype=torch.float32)[..., :-1]  # (B, nh, T, S)
        out = probs.to(v.dtype).view(B, self.n_kv_heads, groups * T, S) @ v  # (B, nkv, groups*T, hd)
        return out.view(B, self.n_heads, T, hd)


def clamped_swiglu(h: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """Apply gpt-oss's SwiGLU variant to the gate/up projection h (..., 2I), whose columns interleave the two halves.

    Both halves are clamped, the sigmoid is sharpened by alpha (x * sigmoid(1.702 x) approximates
    GELU), and the linear half is shifted by one.
    """
    gate, up = h[..., 0::2], h[..., 1::2]  # even columns are the gate, odd ones the linear half
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


class Experts(nn.Module):
    """This rank's experts, stacked on a leading expert axis in the x @ W layout of the checkpoint."""

    def __init__(self, config: Config):
        super().__init__()
        E = self.n_experts = split_evenly(config.num_local_experts, "experts")
        C, I = config.hidden_size, config.intermediate_size
        self.shard = (0, rank * E, config.num_local_experts)  # every tensor's leading axis: rank r has experts r*E .. r*E + E - 1
        self.gate_up_proj = nn.Parameter(torch.empty(E, C, 2 * I))  # gate and up columns interleaved
        self.gate_up_proj_bias = nn.Parameter(torch.empty(E, 2 * I))
        self.down_proj = nn.Parameter(torch.empty(E, I, C))
        self.down_proj_bias = nn.Parameter(torch.empty(E, C))
        self.alpha = config.swiglu_alpha
        self.limit = config.swiglu_limit

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """Run local expert `expert` on the rows x (N, C) routed to it."""
        h = x @ self.gate_up_proj[expert] + self.gate_up_proj_bias[expert]  # (N, 2I)
        return clamped_swiglu(h, self.alpha, self.limit) @ self.down_proj[expert] + self.down_proj_bias[expert]  # (N, C)

    def forward_chosen(self, x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Run each row of x (N, C) through its local experts `chosen` (N, k) at once and return the outputs (N, k, C).

        The static decode step's formulation: the chosen experts' matrices are gathered by indexing
        and multiplied in one batch, so no count of tokens per expert has to reach the host.
        """
        h = (x[:, None, None, :] @ self.gate_up_proj[chosen]).squeeze(-2) + self.gate_up_proj_bias[chosen]  # (N, k, 2I)
        y = clamped_swiglu(h, self.alpha, self.limit)[..., None, :] @ self.down_proj[chosen]  # (N, k, 1, C)
        return y.squeeze(-2) + self.down_proj_bias[chosen]


class QuantizedExperts(nn.Module):
    """This rank's experts with their matrices kept in MXFP4 as published, dequantised one expert per matmul.

    The tensors are the checkpoint's: `*_blocks` (E, out, in/32, 16) and `*_scales` (E, out, in/32)
    in uint8, with output features as rows (see dequantize_mxfp4). Splitting by expert cuts only the
    leading axis, so a rank always holds whole 32-value blocks with their scales.
    """

    def __init__(self, config: Config):
        super().__init__()
        E = self.n_experts = split_evenly(config.num_local_experts, "experts")
        C, I = config.hidden_size, config.intermediate_size
        if C % 32 or I % 32:
            raise UserError(f"invalid MXFP4 config: hidden_size {C} and intermediate_size {I} must be multiples of 32, the MXFP4 block size")
        self.shard = (0, rank * E, config.num_local_experts)  # every tensor's leading axis, as in Experts
        # Integer parameters (requires_grad=False), so that the strict loader fills and checks them like the others.
        self.gate_up_proj_blocks = nn.Parameter(torch.empty(E, 2 * I, C // 32, 16, dtype=torch.uint8), requires_grad=False)
        self.gate_up_proj_scales = nn.Parameter(torch.empty(E, 2 * I, C // 32, dtype=torch.uint8), requires_grad=False)
        self.gate_up_proj_bias = nn.Parameter(torch.empty(E, 2 * I))
        self.down_proj_blocks = nn.Parameter(torch.empty(E, C, I // 32, 16, dtype=torch.uint8), requires_grad=False)
        self.down_proj_scales = nn.Parameter(torch.empty(E, C, I // 32, dtype=torch.uint8), requires_grad=False)
        self.down_proj_bias = nn.Parameter(torch.empty(E, C))
        self.alpha = config.swiglu_alpha
        self.limit = config.swiglu_limit

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """Run local expert `expert` on the rows x (N, C) routed to it."""
        gate_up = dequantize_mxfp4_expert(self.gate_up_proj_blocks[expert], self.gate_up_proj_scales[expert], x.dtype)  # (2I, C)
        h = F.linear(x, gate_up, self.gate_up_proj_bias[expert])  # (N, 2I)
        down = dequantize_mxfp4_expert(self.down_proj_blocks[expert], self.down_proj_scales[expert], x.dtype)  # (C, I)
        return F.linear(clamped_swiglu(h, self.alpha, self.limit), down, self.down_proj_bias[expert])  # (N, C)

    def forward_chosen(self, x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Run each row of x (N, C) through its local experts `chosen` (N, k) at once and return the outputs (N, k, C).

        As Experts.forward_chosen, for the static decode step: only the chosen experts' blocks are
        gathered and dequantised, as many as the eager path dequantises for one token.
        """
        N, k = chosen.shape
        chosen = chosen.flatten()  # (N*k,): pair n*k + j is token n with its j-th expert
        rows = x[:, None, :].expand(N, k, x.shape[1]).reshape(N * k, 1, x.shape[1])  # (N*k, 1, C)
        gate_up = dequantize_mxfp4_expert(self.gate_up_proj_blocks[chosen], self.gate_up_proj_scales[chosen], x.dtype)  # (N*k, 2I, C)
        # baddbmm adds the bias inside the product and rounds once, as F.linear does on the eager path.
        # Adding it afterwards rounds twice, which changes bfloat16 logits visibly.
        h = torch.baddbmm(self.gate_up_proj_bias[chosen][:, None, :], rows, gate_up.transpose(1, 2))  # (N*k, 1, 2I)
        down = dequantize_mxfp4_expert(self.down_proj_blocks[chosen], self.down_proj_scales[chosen], x.dtype)  # (N*k, C, I)
        y = torch.baddbmm(self.down_proj_bias[chosen][:, None, :], clamped_swiglu(h, self.alpha, self.limit), down.transpose(1, 2))  # (N*k, 1, C)
        return y.view(N, k, -1)


class MLP(nn.Module):
    """Mixture of experts: a router picks num_experts_per_tok experts per token and mixes their outputs."""

    def __init__(self, config: Config):
        super().__init__()
        self.n_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.router = nn.Linear(config.hidden_size, self.n_experts, bias=True)  # whole on every rank, which routes every token
        self.experts = Experts(config)  # this rank's experts; load_model swaps in QuantizedExperts to keep MXFP4 resident

    def forward(self, x: torch.Tensor, static: bool = False) -> torch.Tensor:
        """Mix the outputs of each token's chosen experts. With `static` (the --compile decode step), no host sync occurs."""
        B, T, C = x.shape
        x = x.reshape(B * T, C)  # (N, C), N tokens
        top_logits, chosen = torch.topk(self.router(x), self.top_k, dim=-1)  # (N, k) each
        weights = torch.softmax(top_logits, dim=-1)  # (N, k): over the chosen experts' logits only
        if static:
            # Every chosen expert runs at once on its token, so the shapes do not depend on the routing.
            local = chosen - self.experts.shard[1]
            mine = (local >= 0) & (local < self.experts.n_experts)  # under torchrun, other ranks run the other experts
            y = self.experts.forward_chosen(x, local.clamp(0, self.experts.n_experts - 1))  # (N, k, C)
            out = torch.where(mine[..., None], y * weights[..., None], 0).sum(dim=1)
            return all_reduce(out).view(B, T, C)

        # Sort the N*k (token, expert) pairs by expert, so each expert runs once, on all its tokens.
        chosen, weights = chosen.flatten(), weights.flatten()  # (N*k,)
        order = torch.argsort(chosen, stable=True)
        counts = torch.bincount(chosen, minlength=self.n_experts).tolist()
        out = torch.zeros_like(x)
        first = self.experts.shard[1]  # this rank runs experts first .. first + experts.n_experts - 1
        start = sum(counts[:first])  # the sorted pairs of lower-numbered experts come first
        for local, count in enumerate(counts[first : first + self.experts.n_experts]):
            if count == 0:
                continue
            pairs = order[start : start + count]
            tokens = pairs // self.top_k  # pair p belongs to token p // k
            y = self.experts(x[tokens], local)  # (count, C)
            out.index_add_(0, tokens, y * weights[pairs, None])
            start += count
        return all_reduce(out).view(B, T, C)  # the sum over every rank's experts


class Block(nn.Module):
    """One decoder layer: pre-norm attention, then the pre-norm mixture of experts."""

    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, start_pos, kv):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start_pos, kv)
        x = x + self.mlp(self.post_attention_layernorm(x), static=isinstance(start_pos, torch.Tensor))
        return x


class Model(nn.Module):
    """The gpt-oss decoder with its LM head; module names match the checkpoint's tensor names."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.embed_tokens = ParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # The LM head is its own matrix on the hub; a tied checkpoint would reuse the embedding. Both are split by vocabulary.
        self.lm_head = None if config.tie_word_embeddings else ColumnParallelLinear(config.hidden_size, config.vocab_size)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.attention_factor = rope_attention_factor(config)

    def forward(self, tokens: torch.Tensor, cache: "KVCache | None" = None, start_pos: "int | torch.Tensor" = 0, last_only: bool = False) -> torch.Tensor:
        """Return logits (B, T, vocab) for `tokens` (B, T) at positions start_pos.. (only the last one if `last_only`).

        A 0-d tensor `start_pos` runs the static-shape decode step of --compile: one token, with a cache.
        """
        x = self.embed_tokens(tokens)  # (B, T, C)
        positions = start_pos + torch.arange(tokens.shape[1], device=tokens.device)
        # Both layer kinds share one RoPE.
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype, self.attention_factor)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, start_pos, None if cache is None else cache.layers[i])
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        logits = F.linear(x, self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight)
        return all_gather_last_dim(logits)  # each rank computed the logits of its vocabulary slice


# --------------------------------------------------------------------------------------------------
# Checkpoint loading

# The hub repos also hold original/ (OpenAI's own format) and metal/; neither is downloaded or read.
HUB_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",  # gpt-oss numbers its shards from 0: model-00000-of-00002.safetensors
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
]
PREFIX = "model."  # every tensor but lm_head.weight
LM_HEAD_KEY = "lm_head.weight"

# The 16 values of a 4-bit E2M1 float, indexed by its code: bit 3 is the sign, bits 0-2 the magnitude.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# The two values of each packed byte, the earlier weight (low nibble) first, so that one lookup decodes a byte.
FP4_PAIRS = torch.tensor([(FP4_VALUES[byte & 0x0F], FP4_VALUES[byte >> 4]) for byte in range(256)])  # (256, 2)


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
    raise UserError(f"{source} is a {found!r} checkpoint, not gpt-oss ({', '.join(MODEL_TYPES)}); use the model file for its family")


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
    if key == LM_HEAD_KEY:
        return None if config.tie_word_embeddings else "lm_head.weight"
    return key.removeprefix(PREFIX)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Unpack MXFP4 expert weights into (E, in, out) matrices of `dtype` on `device`.

    MXFP4 (OCP Microscaling Formats specification 1.0) stores each weight as a 4-bit E2M1 float
    (FP4_VALUES) and gives each run of 32 consecutive weights of a row one shared scale, an E8M0
    byte s that means 2^(s - 127). The checkpoint stores two uint8 tensors for E experts:
        blocks (E, out, in/32, 16), two codes per byte, the earlier weight in the low nibble
        scales (E, out, in/32), one exponent per 32 weights
    Rows are output features, so each expert's matrix is transposed to the x @ W layout (in, out).
    """
    E, rows, groups, _ = blocks.shape
    out = torch.empty(E, groups * 32, rows, dtype=dtype, device=device)
    for e in range(E):  # one expert at a time, so the float32 intermediate stays small
        out[e] = dequantize_mxfp4_expert(blocks[e].to(device), scales[e].to(device), dtype).t()
    return out


def dequantize_mxfp4_expert(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Unpack one expert's MXFP4 matrix, blocks (out, in/32, 16) and scales (out, in/32), into (out, in) of `dtype`.

    Leading axes before `out` are kept: the static decode step passes the blocks of several experts.

    An E2M1 value times a power of two is exact in bfloat16 and float32, which share the exponent
    range of E8M0, so the product is computed in `dtype` itself. float16 goes through float32.
    """
    # NOTE: QuantizedExperts calls this before every expert matmul. A GPU with native FP4 matmul
    # (e.g. torch._scaled_mm with MXFP4 scales) could multiply the packed blocks directly. That
    # path is not written here, and it would need checking against this one first.
    compute = torch.float32 if dtype == torch.float16 else dtype
    values = F.embedding(blocks.int(), FP4_PAIRS.to(blocks.device, compute)).view(*blocks.shape[:-1], 32)  # a lookup per byte
    values *= torch.exp2(scales.float() - 127).to(compute)[..., None]  # E8M0: 2^(s - 127) per 32 values
    return values.flatten(-2).to(dtype)


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


def load_model(
    folder: Path, config: Config, device: torch.device, dtype: torch.dtype, max_memory: float | None = None, keep_quantized: bool = False
) -> Model:
    """Build the model on the meta device, then fill it tensor by tensor from the safetensors files.

    Each tensor is read, cast to `dtype` and moved to `device` on its own, so peak memory stays
    near the size of the weights in the target dtype. MXFP4 expert weights are dequantised to
    `dtype`, unless `keep_quantized`: then they stay packed as published (QuantizedExperts) and
    only the other weights and the activations take `dtype`. Under torchrun each rank reads only
    its own slices. Loading is strict: a missing, unexpected or misshapen tensor raises an error
    that names it. `max_memory` (GiB per rank) replaces the device's free memory in the fit check.
    """
    resident = keep_quantized and config.quant_method == "mxfp4"
    with torch.device("meta"):
        model = Model(config)
        if resident:
            for layer in model.layers:
                layer.mlp.experts = QuantizedExperts(config)
    # Packed MXFP4 blocks and scales take one byte per element, whatever `dtype` is.
    check_fit(sum(p.numel() * (1 if p.dtype == torch.uint8 else dtype.itemsize) for p in model.parameters()), device, max_memory)
    expected = dict(model.named_parameters())
    loaded = set()
    files = checkpoint_files(folder)
    with ExitStack() as stack:
        handles = [stack.enter_context(SafetensorsFile(file)) for file in files]
        # An MXFP4 weight is two tensors, `<name>_blocks` and `<name>_scales`, possibly in different shards.
        located = {key: (file, handle) for file, handle in zip(files, handles) for key in handle.keys()}
        for key, (file, handle) in located.items():
            if key.endswith("_scales") and key.removesuffix("_scales") + "_blocks" not in located:
                raise UserError(f"tensor {key} in {file.name} has no matching {key.removesuffix('_scales')}_blocks")
            scales_key = key.removesuffix("_blocks") + "_scales"
            if key.endswith("_blocks") and scales_key not in located:
                raise UserError(f"checkpoint {folder} has {key} but lacks {scales_key}")
            dequantize = key.endswith("_blocks") and not resident
            if key.endswith("_scales") and not resident:
                continue  # read together with its blocks
            name = parameter_name(key.removesuffix("_blocks") if dequantize else key, config)
            if name is None:
                continue
            if name not in expected:
                raise UserError(f"unexpected tensor {key} in {file.name}; is this a gpt-oss checkpoint?")
            full_shape, shard = checkpoint_slice(model, name)
            if dequantize:
                E, n_in, n_out = full_shape  # of the dequantised (E, in, out) matrices
                scales_handle = located[scales_key][1]
                if n_in % 32 or handle.shape(key) != (E, n_out, n_in // 32, 16) or scales_handle.shape(scales_key) != (E, n_out, n_in // 32):
                    raise UserError(
                        f"MXFP4 tensors {key} {handle.shape(key)} and {scales_key} {scales_handle.shape(scales_key)} do not fit "
                        f"(E, out, in/32, 16) and (E, out, in/32) for the (E, in, out) = {full_shape} of config.json"
                    )
                # Splitting by expert slices the leading axis of both tensors alike.
                tensor = dequantize_mxfp4(handle.read(key, shard=shard), scales_handle.read(scales_key, shard=shard), dtype, device)
            else:
                if handle.shape(key) != full_shape:
                    raise UserError(f"tensor {key} has shape {handle.shape(key)}, expected {full_shape} from config.json")
                target = expected[name].dtype if expected[name].dtype == torch.uint8 else dtype  # packed MXFP4 stays uint8
                tensor = handle.read(key, target, device, column_major=use_column_major(handle.shape(key), target, device), shard=shard)
            set_parameter(model, name, tensor)
            loaded.add(name)
    missing = sorted(set(expected) - loaded)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"checkpoint {folder} lacks tensor {missing[0]}{more}")
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
        template_file = folder / "chat_template.jinja"
        self.chat_template = template_file.read_text() if template_file.exists() else self.settings.get("chat_template")
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
            self.chat_template = {t["name"]: t["template"] for t in self.chat_template}.get("default")

    def encode(self, text: str) -> list[int]:
        # Special tokens are whatever tokenizer.json's post-processor adds, exactly as in transformers.
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

        The harmony template writes every special token itself, so the text is encoded without
        adding any. `template_variables` reach the template as is (for example reasoning_effort="high").
        """
        if not self.chat_template:
            raise UserError("this checkpoint has no chat template (chat_template.jinja or tokenizer_config.json); drop --chat and --interactive")
        from datetime import datetime

        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        def strftime_now(format: str) -> str:
            # The harmony template writes "Current date: ..." into the system message.
            return datetime.now().strftime(format)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
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


class ChannelFilter:
    """Turn a harmony reply into the text of its `final` channel (and of every channel with show_reasoning).

    A harmony reply is a series of messages `<|channel|>NAME<|message|>TEXT`. <|end|> closes a
    message that another one follows (opened by `<|start|>assistant`), <|return|> closes the
    answer and <|call|> a tool call. gpt-oss writes its chain of thought to `analysis`, tool
    calls to `commentary` and the answer to `final`. Decoding skips special tokens, so the
    structure is tracked on token ids.
    """

    def __init__(self, tokenizer: Tokenizer, show_reasoning: bool):
        self.tokenizer = tokenizer
        self.show_reasoning = show_reasoning
        self.channel_id = tokenizer.token_id("<|channel|>")
        self.message_id = tokenizer.token_id("<|message|>")
        self.end_id = tokenizer.token_id("<|end|>")  # another message follows
        self.end_ids = {self.end_id, tokenizer.token_id(END_OF_TURN), tokenizer.token_id(TOOL_CALL)} - {None}
        self.header: list[int] = []  # ids since the last message closed
        self.body: StreamDecoder | None = None  # the open message's text, None between messages
        self.shown = False  # whether the open message is printed
        self.hidden_tokens = 0

    def push(self, token_id: int) -> str:
        if token_id in self.end_ids:
            was_shown = self.body is not None and self.shown
            self.body = None
            self.header = []
            # With show_reasoning, a newline separates a shown message from the next one.
            return "\n" if was_shown and self.show_reasoning and token_id == self.end_id else ""
        if token_id == self.message_id and self.body is None:
            channel = self.channel_name()
            self.body = StreamDecoder(self.tokenizer)
            # A message without a channel is not harmony's structure; it is printed rather than lost.
            self.shown = channel in ("final", "") or self.show_reasoning
            return f"[{channel}] " if self.show_reasoning and channel else ""
        if self.body is None:
            self.header.append(token_id)
            return ""
        if not self.shown:
            self.hidden_tokens += 1
            return ""
        return self.body.push(token_id)

    def channel_name(self) -> str:
        """Return the first word after the header's last <|channel|> ("commentary json" -> "commentary"), else ""."""
        if self.channel_id not in self.header:
            return ""
        last = len(self.header) - 1 - self.header[::-1].index(self.channel_id)
        words = self.tokenizer.decode(self.header[last + 1 :]).split()
        return words[0] if words else ""

    def flush(self) -> str:
        """Return what the open message's decoder held back, if that message is shown."""
        return self.body.flush() if self.body is not None and self.shown else ""


# --------------------------------------------------------------------------------------------------
# KV cache and generation

PREFILL_CHUNK = 1024  # prompt tokens per forward pass; attention scores take heads x chunk x context floats


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

    # NOTE: sliding-window layers read only their last `sliding_window` keys but get a full-length
    # buffer like the others, which keeps positions simple at the cost of memory on long contexts.
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
    """Yield new token ids: prefill passes over the prompt (PREFILL_CHUNK tokens each), then one decode pass per token.

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
    for offset in range(0, len(prompt), PREFILL_CHUNK):
        chunk = prompt[offset : offset + PREFILL_CHUNK]
        logits = model(torch.tensor([chunk], device=device), cache, start_pos=start_pos + offset, last_only=True)
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


MXFP4_BITS = 4.25  # per expert weight: a 4-bit value plus an 8-bit scale shared by 32 values


def describe(config: Config) -> dict:
    """Return parameter counts, layer kinds, attention layout and memory figures for `config`.

    Nothing is loaded: the model is built on the meta device, where parameters have shapes but no
    storage. The counts follow OpenAI's model card: the total includes the embedding and the
    unembedding, the active count excludes the embedding (116.83B and 5.13B for gpt-oss-120b). The KV
    cache figures are what the architecture needs in bfloat16: a sliding-window layer never needs
    more than `sliding_window` positions, although KVCache gives it a full-length buffer.
    """
    with torch.device("meta"):
        model = Model(config)
    total = sum(p.numel() for p in model.parameters())
    named = dict(model.named_parameters())
    routed = sum(p.numel() for name, p in named.items() if ".experts." in name)
    # Each token runs num_experts_per_tok of the experts of each layer; an embedding row is a lookup.
    active = total - routed + routed * config.num_experts_per_tok // config.num_local_experts - model.embed_tokens.weight.numel()
    kv_per_position = 2 * config.num_key_value_heads * config.head_dim * BFLOAT16_BYTES  # keys and values
    full = config.layer_types.count("full_attention")
    sliding = config.layer_types.count("sliding_attention")
    dtype_bytes = DTYPE_BYTES.get(config.dtype, BFLOAT16_BYTES)
    if config.quant_method == "mxfp4":
        # Only the expert matrices are MXFP4; their biases and everything else keep the checkpoint dtype.
        quantised = sum(p.numel() for name, p in named.items() if name.endswith(("experts.gate_up_proj", "experts.down_proj")))
        weight_bytes = round(quantised * MXFP4_BITS / 8) + (total - quantised) * dtype_bytes
        weight_format = f"MXFP4 experts, {config.dtype} elsewhere"
    else:
        weight_bytes = total * dtype_bytes
        weight_format = config.dtype
    return {
        "family": "gpt-oss",
        "total_parameters": total,
        "active_parameters": active,
        "layers": f"{config.num_hidden_layers}: {sliding} sliding-window ({config.sliding_window}), {full} full; MoE ({config.num_experts_per_tok} of {config.num_local_experts} experts)",
        "attention": f"GQA with sinks, {config.num_attention_heads} query / {config.num_key_value_heads} KV heads of {config.head_dim}",
        "kv_bytes_per_token": full * kv_per_position,
        "kv_bytes_long_context": (full * LONG_CONTEXT + sliding * min(config.sliding_window, LONG_CONTEXT)) * kv_per_position,
        "weight_bytes": weight_bytes,
        "weight_format": weight_format,
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
    """Token ids that end generation: generation_config.json's EOS list (else config.json's), plus <|return|> and <|call|> when chatting.

    <|end|> is no stop: it closes the analysis message, and the final answer comes after it.
    """
    eos = generation.get("eos_token_id", config.eos_token_id)
    stops = set(eos if isinstance(eos, list) else [eos])
    if chat:
        stops |= {tokenizer.token_id(END_OF_TURN), tokenizer.token_id(TOOL_CALL)} - {None}
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
    parser = argparse.ArgumentParser(description="Generate text with a gpt-oss checkpoint.")
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
    parser.add_argument(
        "--show-reasoning",
        action="store_true",
        help="with --chat or --interactive: print every channel of the reply, the analysis channel (chain of thought) included; default: the final answer only",
    )
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
    show_reasoning: bool = False  # print every harmony channel of a chat reply, not only `final`
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
    # --dtype auto keeps MXFP4 experts packed as published; an explicit --dtype dequantises them on load.
    model = load_model(folder, config, device, dtype, args.max_memory, keep_quantized=args.dtype == "auto")
    chat = args.chat or args.interactive
    stops = stop_tokens(config, generation, tokenizer, chat)
    decode_step = compile_decode_step(model) if args.compile else None
    if args.compile:
        log("--compile: torch.compile builds the decode step while the second token is generated (tens of seconds); the tokens/s figure includes that time")
    return Session(model, tokenizer, config, args.max_new_tokens, sampling, stops, args.seed, time.perf_counter() - started, args.show_reasoning, decode_step)


def log_loaded(session: Session, folder: str) -> None:
    weight = session.model.embed_tokens.weight
    log(f"loaded {folder} in {session.load_seconds:.1f}s ({weight.dtype}, {weight.device})")


def stream_reply(session: Session, tokens: Iterator[int], harmony: bool) -> tuple[list[int], float, float]:
    """Print the tokens as text while they arrive; return them with the prefill and decode seconds.

    A `harmony` reply (a chat reply) shows its final channel only, unless session.show_reasoning.
    """
    stream = ChannelFilter(session.tokenizer, session.show_reasoning) if harmony else StreamDecoder(session.tokenizer)
    reply: list[int] = []
    started = time.perf_counter()
    prefill_seconds = 0.0
    announced = False
    for token in tokens:
        if not reply:
            prefill_seconds = time.perf_counter() - started
            started = time.perf_counter()
        reply.append(token)
        if is_rank_zero():
            print(stream.push(token), end="", flush=True)
        if harmony and stream.hidden_tokens and not announced:
            log("(the reply starts with a hidden channel, usually its reasoning; --show-reasoning prints it)")
            announced = True
    if is_rank_zero():
        print(stream.flush())
    if harmony and stream.hidden_tokens:
        log(f"hid {stream.hidden_tokens} tokens of channels other than final; --show-reasoning prints them")
    return reply, prefill_seconds, time.perf_counter() - started


def complete(session: Session, args: argparse.Namespace) -> None:
    tokenizer = session.tokenizer
    prompt = tokenizer.encode_chat([{"role": "user", "content": args.prompt}]) if args.chat else tokenizer.encode(args.prompt)
    session.check_fits(len(prompt))
    log_loaded(session, args.model)
    # A chat reply is harmony-formatted; a plain continuation is printed as it comes.
    reply, prefill_seconds, decode_seconds = stream_reply(session, session.generate(prompt), harmony=args.chat)
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
        self.messages.append({"role": "assistant", "content": self.answer_text(reply)})

    def answer_text(self, reply: list[int]) -> str:
        """Return the reply's final-channel text, which the template renders as the assistant's message.

        A reply without harmony's <|message|> token (another chat template) is decoded whole.
        """
        tokenizer = self.session.tokenizer
        if tokenizer.token_id("<|message|>") not in reply:
            return tokenizer.decode([t for t in reply if t not in self.session.stop_tokens])
        final = ChannelFilter(tokenizer, show_reasoning=False)
        return "".join(final.push(t) for t in reply) + final.flush()


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
            stream_reply(session, chat.reply(text), harmony=True)
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
