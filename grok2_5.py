"""Grok 2.5 in one file: config, layers, checkpoint loading, tokenizer, generation, CLI.

Grok 2.5 (xAI, 2024; open weights published in 2025 as xai-org/grok-2) is a decoder-only
mixture-of-experts transformer with:
- "sandwich" normalisation: RMSNorm before and after both attention and the feed-forward part;
- grouped-query attention whose scores are soft-capped with tanh and then sharpened by a
  log-length temperature for queries past `attn_temperature_len`;
- a feed-forward part of 8 GELU-gated experts (top-2, soft-capped softmax router, weights not
  renormalised) that runs beside a dense GELU-gated MLP, the two summed and divided by sqrt(2);
- embeddings scaled by `embedding_multiplier_scale`, logits by `output_multiplier_scale`, then soft-capped.

No `transformers` class exists for it, so this file follows sglang's implementation: in
sgl-project/sglang, python/sglang/srt/models/grok.py, layers/moe/router.py, the triton attention
kernels in layers/attention/triton_ops/ and tokenizer/tiktoken_tokenizer.py. The tests compare it
with an independent float64 reference written from the same sources.

    python grok2_5.py --prompt "The capital of France is"
    python grok2_5.py --chat --prompt "Write a haiku about tea."
    python grok2_5.py --model ./some/local/folder --prompt "..." --dtype bfloat16 --device cuda
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
from contextlib import ExitStack
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_MODEL = "xai-org/grok-2"
# xai-org/grok-2's config.json sets model_type "git", which is also the model_type of Microsoft's GIT
# captioning models, so check_architecture decides by the `architectures` list (sglang's class names).
MODEL_TYPES = ("git",)
ARCHITECTURES = ("Grok1ForCausalLM", "Grok1ModelForCausalLM")
END_OF_TURN = "<|separator|>"  # the chat format closes every turn with this token
EOS = "<|eos|>"


class UserError(Exception):
    """A problem with the user's input or checkpoint; the CLI prints it as one line, no traceback."""


# --------------------------------------------------------------------------------------------------
# Config


# The values that sglang's grok.py and its kernels fall back to when config.json omits a key. They
# mean no length temperature, no dense MLP beside the experts and plain RoPE. Attention scores and
# router logits are capped at 30, the final logits not at all.
# NOTE: sglang has no fallback for the sizes (hidden_size, num_hidden_layers and the like), so a
# config.json without them gets this file's grok-2 values.
SGLANG_DEFAULTS = {
    "attn_temperature_len": -1, "residual_moe": False, "rope_type": None,
    "attn_logit_softcapping": 30.0, "router_logit_softcapping": 30.0, "final_logit_softcapping": None,
}


@dataclass
class Config:
    """Hyperparameters of the model; field names follow the checkpoint's config.json.

    The defaults describe the family's flagship, xai-org/grok-2 (its config.json). Keys that
    config.json may leave out fall back to SGLANG_DEFAULTS in `from_hf`, which differ from these in a
    few places.
    """

    # sizes
    vocab_size: int = 131072
    hidden_size: int = 8192
    intermediate_size: int = 32768  # the dense MLP beside the experts
    moe_intermediate_size: int = 16384  # each expert
    num_hidden_layers: int = 64
    max_position_embeddings: int = 131072
    # attention
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 128
    attn_logit_softcapping: float | None = 30.0  # None or <= 0 turns it off
    attn_temperature_len: int = 1024  # <= 0 turns the length temperature off
    rope_theta: float = 208533496.0
    rope_type: str | None = "original"  # sglang reads "original" as plain, unscaled RoPE
    # mixture of experts
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    router_logit_softcapping: float | None = 30.0
    residual_moe: bool = True  # a dense MLP runs beside the experts
    # norms, scales and output
    rms_norm_eps: float = 1e-5
    embedding_multiplier_scale: float = 90.50966799187809  # sqrt(8192)
    output_multiplier_scale: float = 0.5
    final_logit_softcapping: float | None = 50.0
    tie_word_embeddings: bool = False
    # special tokens
    eos_token_id: int | list[int] = 2  # <|eos|> in tokenizer.tok.json
    dtype: str = "bfloat16"  # the dtype the checkpoint was saved in

    @classmethod
    def from_hf(cls, raw: dict) -> "Config":
        """Build a Config from a config.json dict, filling absent keys the way sglang's grok.py does."""
        # A key that config.json leaves out means sglang's fallback, not this file's flagship value.
        text = {**SGLANG_DEFAULTS, **raw}
        text.setdefault("moe_intermediate_size", text.get("intermediate_size"))  # experts as wide as the dense MLP
        if text["rope_type"] not in (None, "", "original"):
            raise UserError(
                f"unsupported rope_type {text['rope_type']!r}; grok2_5.py supports 'original' (plain RoPE, as sglang reads it)"
            )
        if text.get("rope_rotate_half_dims"):
            raise UserError("rope_rotate_half_dims is set; grok2_5.py rotates the full head_dim only")
        method = text.get("attn_logit_softcapping_method", "tanh")
        if method != "tanh":
            raise UserError(f"unsupported attn_logit_softcapping_method {method!r}; grok2_5.py supports 'tanh'")
        if not text.get("num_local_experts"):
            raise UserError("num_local_experts is 0 or missing; grok2_5.py supports the mixture-of-experts models only")
        text["dtype"] = text.get("dtype") or text.get("torch_dtype") or "float32"
        known = {f.name for f in fields(cls)}
        # None stays only where it has a meaning (soft-capping off, plain RoPE); elsewhere it means "use the default".
        kept = {k: v for k, v in text.items() if k in known and (v is not None or k.endswith("softcapping") or k == "rope_type")}
        return cls(**kept)


# --------------------------------------------------------------------------------------------------
# Tensor parallelism (torchrun)
#
# Under `torchrun --nproc-per-node N grok2_5.py ...` each of the N ranks stores 1/N of the attention
# heads, of the dense MLP columns, of the experts and of the vocabulary, and reads only those slices
# of the checkpoint. A column-parallel linear layer splits its output features across ranks, so it
# needs no communication. The row-parallel layer after it splits its input features and sums the
# partial products with one all-reduce. The feed-forward part sums the experts' and the dense MLP's
# partial outputs with one all-reduce. A plain `python grok2_5.py` run keeps world_size 1 and calls
# no torch.distributed function.

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
    """RMSNorm with the weight applied in float32 before the cast back, as sglang's triton kernel does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * self.weight.float()).type_as(x)


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d) of RoPE (Su et al., 2021), with theta truncated to an integer as sglang does."""
    # Computed on the CPU even inside load_model's meta-device context, because arithmetic on meta
    # tensors imports torch._dynamo (about 1 s).
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim
    return 1.0 / (int(theta) ** exponents)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (T, head_dim) for the given positions, computed in float32 then cast."""
    angles = positions[:, None].float() * inv_freq[None, :]  # (T, head_dim/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, head_dim): both halves rotate by the same angle
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + d/2]) of each head by the position's angle ("half-rotated" layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Grouped-query attention with RoPE, tanh soft-capped scores and a log-length temperature."""

    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        self.n_heads = split_evenly(config.num_attention_heads, "attention heads")  # this rank's query heads
        kv_first, self.n_kv_heads = kv_heads_of_rank(config.num_key_value_heads)
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.softcap = config.attn_logit_softcapping if (config.attn_logit_softcapping or 0) > 0 else None
        self.temperature_len = config.attn_temperature_len
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
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if isinstance(start_pos, torch.Tensor):
            k, v, mask = self.keys_of_static_step(k, v, start_pos, kv)
        else:
            k, v, mask = self.visible_keys(k, v, start_pos, kv)
        q_pos = start_pos + torch.arange(T, device=x.device)  # for the length temperature
        out = self.attend(q, k, v, mask, q_pos)  # (B, nh, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def visible_keys(self, k: torch.Tensor, v: torch.Tensor, start_pos: int, kv: "LayerCache | None"):
        """Cache the new keys and values; return the keys and values the new queries may see, and the mask.

        The mask is None when every returned key is visible, as for one decoded token.
        """
        T = k.shape[2]
        end_pos = start_pos + T
        if kv is not None:
            k, v = kv.update(k, v, start_pos, 0)  # (B, nkv, S, hd), S = end_pos
        if T == 1:
            return k, v, None
        q_pos = torch.arange(start_pos, end_pos, device=k.device)[:, None]
        k_pos = torch.arange(0, end_pos, device=k.device)[None, :]
        return k, v, k_pos <= q_pos  # (T, S) causal

    def keys_of_static_step(self, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor, kv: "LayerCache"):
        """Cache one token whose position is a tensor (the --compile decode step), as visible_keys does.

        The step writes into the cache in place and attends over the whole buffer with a mask, so
        that every position runs the same shapes and so the same compiled graph.
        """
        k, v = kv.write_at(k, v, position)  # (B, nkv, max_len, hd)
        k_pos = torch.arange(k.shape[2], device=k.device)[None, :]
        return k, v, k_pos <= position

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, q_pos: torch.Tensor) -> torch.Tensor:
        # Soft-capping and the temperature bend the scores before the softmax, which the fused kernel cannot do.
        B, _, T, hd = q.shape
        S, groups = k.shape[2], self.n_heads // self.n_kv_heads
        # The `groups` query heads that share a key/value head sit next to each other, so a view
        # lines them up with their key/value head without copying the cache.
        q = q.reshape(B, self.n_kv_heads, groups * T, hd)
        # Scores stay in float32 from the matmul on, as in sglang's kernels (float32 accumulators).
        scores = (q.float() @ k.float().transpose(-2, -1)) * self.scale  # (B, nkv, groups*T, S)
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        scores = scores.view(B, self.n_kv_heads, groups, T, S)
        if self.temperature_len > 0:
            # After the cap, a query at 0-based position p > attn_temperature_len has its scores
            # multiplied by log2(p) / log2(attn_temperature_len) (sglang's extend and decode kernels).
            length = self.temperature_len
            factor = torch.where(q_pos > length, torch.log2(q_pos.float()) / math.log2(length), 1.0)  # (T,)
            scores = scores * factor[:, None]
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype).view(B, self.n_kv_heads, groups * T, S)
        return (probs @ v).view(B, self.n_heads, T, hd)


class MLP(nn.Module):
    """The dense gated MLP beside the experts, with exact (erf) GELU: down(gelu(gate(x)) * up(x))."""

    def __init__(self, config: Config):
        super().__init__()
        self.gate_proj = ColumnParallelLinear(config.hidden_size, config.intermediate_size)
        self.up_proj = ColumnParallelLinear(config.hidden_size, config.intermediate_size)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # sglang's CUDA path (gelu_and_mul_triton) uses erf GELU. Only its NPU path uses the tanh approximation.
        return self.down_proj(F.gelu(self.gate_proj(x)) * self.up_proj(x))

    def partial_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return this rank's share of forward(x) before the all-reduce, which the caller does."""
        return F.linear(F.gelu(self.gate_proj(x)) * self.up_proj(x), self.down_proj.weight)


class Expert(nn.Module):
    """One expert, a gated MLP with exact GELU: w2(gelu(w1(x)) * w3(x)); w1 is the gate, w3 the up projection."""

    def __init__(self, config: Config):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.moe_intermediate_size, bias=False)
        self.w2 = nn.Linear(config.moe_intermediate_size, config.hidden_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.moe_intermediate_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Soft-capped softmax router over all experts; each token's top-k experts weighted by their probabilities.

    The weights are the softmax probabilities over all experts, not renormalised over the chosen
    k, so a token's expert weights sum to less than 1 (sglang's fused router kernel). Under expert
    parallelism, each rank stores experts first_expert .. first_expert + len(experts) - 1
    (renumbered from 0 in `experts`). The router stays whole on every rank, so that all of them
    choose the same experts.
    """

    def __init__(self, config: Config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.softcap = config.router_logit_softcapping
        # The router weight stays float32 whatever the model dtype, as sglang keeps it.
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        local = split_evenly(config.num_local_experts, "experts")
        self.first_expert = rank * local
        self.experts = nn.ModuleList(Expert(config) for _ in range(local))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.partial_forward(x))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the float32 weights (N, k) and the ids (N, k) of the experts chosen for tokens x (N, C)."""
        logits = F.linear(x.float(), self.gate.weight.float())  # (N, E), in float32
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        probs = torch.softmax(logits, dim=-1)
        return torch.topk(probs, self.top_k, dim=-1)

    def partial_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the weighted outputs of this rank's experts, summed per token, before the all-reduce."""
        B, T, C = x.shape
        x = x.reshape(B * T, C)  # (N, C)
        weights, expert_ids = self.route(x)  # (N, k)

        # Group the N * k (token, expert) pairs by expert, so each expert runs once on all of its tokens.
        order = expert_ids.flatten().argsort(stable=True)  # (N * k,) pair indices, grouped by expert
        tokens = order // self.top_k  # the token of each pair
        counts = torch.bincount(expert_ids.flatten(), minlength=self.gate.out_features).tolist()
        out = torch.zeros(B * T, C, dtype=torch.float32, device=x.device)
        start = 0
        for expert, count in enumerate(counts):
            end = start + count
            local = expert - self.first_expert  # the expert's index in self.experts, if this rank stores it
            if count > 0 and 0 <= local < len(self.experts):
                rows = tokens[start:end]
                y = self.experts[local](x[rows]).float() * weights.flatten()[order[start:end], None]  # (count, C)
                out.index_add_(0, rows, y)  # each token sums its k experts
            start = end
        return out.to(x.dtype).view(B, T, C)

    def partial_forward_static(self, x: torch.Tensor) -> torch.Tensor:
        """Compute partial_forward(x) with fixed shapes and no host sync, for the --compile decode step.

        Every expert of this rank runs on every token, weighted by its routing weight, which is zero
        where the router did not choose it. The float32 sums run in expert order, as in partial_forward.
        NOTE: so each token reads all of the rank's experts, num_local_experts / num_experts_per_tok
        times the expert weights that partial_forward reads (4 times on grok-2). Gathering the chosen
        experts' weights instead would need the experts stacked in one tensor.
        """
        B, T, C = x.shape
        x = x.reshape(B * T, C)  # (N, C)
        weights, expert_ids = self.route(x)  # (N, k)
        dense_weights = weights.new_zeros(x.shape[0], self.gate.out_features).scatter_(1, expert_ids, weights)  # (N, E)
        dense_weights = dense_weights[:, self.first_expert : self.first_expert + len(self.experts)]  # this rank's experts
        out = torch.zeros(B * T, C, dtype=torch.float32, device=x.device)
        for i, expert in enumerate(self.experts):
            weight = dense_weights[:, i, None]  # (N, 1)
            # where() rather than a product with 0, so that an expert that overflows on a token it was
            # not chosen for cannot turn the sum into NaN.
            out = out + torch.where(weight > 0, expert(x).float() * weight, 0.0)
        return out.to(x.dtype).view(B, T, C)


class Block(nn.Module):
    """One decoder layer: sandwich norms around attention and around the experts (plus the dense MLP)."""

    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.block_sparse_moe = MoE(config)
        self.mlp = MLP(config) if config.residual_moe else None
        self.pre_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.pre_moe_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_moe_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, start_pos, kv):
        x = x + self.post_attn_norm(self.self_attn(self.pre_attn_norm(x), cos, sin, start_pos, kv))
        x = x + self.post_moe_norm(self.feed_forward(self.pre_moe_norm(x), static=isinstance(start_pos, torch.Tensor)))
        return x

    def feed_forward(self, x: torch.Tensor, static: bool = False) -> torch.Tensor:
        """Return the experts' output (plus the dense MLP's); `static` selects the fixed-shape experts of the --compile decode step."""
        moe = self.block_sparse_moe.partial_forward_static if static else self.block_sparse_moe.partial_forward
        if self.mlp is None:
            return all_reduce(moe(x))
        # Both branches are partial sums on each rank, so one all-reduce adds them. Dividing the sum
        # by sqrt(2) keeps its scale that of one branch.
        return all_reduce(self.mlp.partial_forward(x) + moe(x)) / math.sqrt(2)


class Model(nn.Module):
    """The Grok 2.5 decoder with its LM head; module names match the checkpoint's tensor names."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.embed_tokens = ParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # The LM head reuses the embedding matrix unless the checkpoint has its own (xai-org/grok-2 has).
        # Both are split by vocabulary.
        self.lm_head = None if config.tie_word_embeddings else ColumnParallelLinear(config.hidden_size, config.vocab_size)
        self.register_buffer("inv_freq", rope_inv_freq(config.head_dim, config.rope_theta), persistent=False)

    def forward(self, tokens: torch.Tensor, cache: "KVCache | None" = None, start_pos: "int | torch.Tensor" = 0, last_only: bool = False) -> torch.Tensor:
        """Return float32 logits (B, T, vocab) for `tokens` (B, T) at positions start_pos.. (only the last one if `last_only`).

        A 0-d tensor `start_pos` runs the static-shape decode step of --compile: one token, with a cache.
        """
        x = self.embed_tokens(tokens)  # (B, T, C)
        # A Python float factor: the product is rounded once, in the activation dtype, as sglang's mul_ does.
        x = x * self.config.embedding_multiplier_scale
        positions = start_pos + torch.arange(tokens.shape[1], device=tokens.device)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, start_pos, None if cache is None else cache.layers[i])
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        logits = F.linear(x, self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight).float()
        logits = all_gather_last_dim(logits)  # each rank computed the logits of its vocabulary slice
        # sglang folds output_multiplier_scale into the LM head weights at load time. The published
        # 0.5 is a power of two, so scaling the logits instead gives the same numbers.
        logits = logits * self.config.output_multiplier_scale
        if self.config.final_logit_softcapping:
            cap = self.config.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits


# --------------------------------------------------------------------------------------------------
# Checkpoint loading

HUB_FILES = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.tok.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
]
# xai-org/grok-2 is saved for 8-way tensor parallelism: pytorch_model-000NN-TP-common.safetensors hold
# whole tensors, and each expert matrix is cut into 8 pieces, one per pytorch_model-000NN-TP-00R.safetensors.
TP_RANK = re.compile(r"-TP-(\d+)\.safetensors$")
# The dimension along which an expert matrix was cut: rows of w1 (gate) and w3 (up), columns of w2 (down).
EXPERT_SPLIT_DIMS = {".w1.weight": 0, ".w3.weight": 0, ".w2.weight": 1}
EXPERT_INFIX = ".block_sparse_moe.experts."
EXPERT_NAME = re.compile(r"(layers\.\d+\.block_sparse_moe\.experts\.)(\d+)\.")
ROUTER_SUFFIX = "block_sparse_moe.gate.weight"


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
    # sglang picks its model class by `architectures`, not by model_type.
    if any(name in ARCHITECTURES for name in raw.get("architectures") or []):
        return
    found = repr(raw.get("model_type") or "unknown")
    if raw.get("architectures"):
        found += f" ({', '.join(raw['architectures'])})"
    raise UserError(
        f"{source} is a {found} checkpoint, not Grok 2.5 (model_type {MODEL_TYPES[0]!r} with architectures "
        f"{' or '.join(ARCHITECTURES)}); use the model file for its family"
    )


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
    """Return every .safetensors file of the folder; the loader reads each header, because the published layout may have no index."""
    for index in folder.glob("*.safetensors.index.json"):
        shards = sorted(set(read_json(index)["weight_map"].values()))
        missing = [name for name in shards if not (folder / name).exists()]
        if missing:
            raise UserError(f"{folder} is incomplete: {missing[0]} (named in {index.name}) is missing")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} has no .safetensors files; only safetensors checkpoints load")
    return files


def parameter_name(key: str, config: Config) -> str | None:
    """Map a checkpoint tensor name to this file's parameter name; None means the tensor is not used."""
    if key == "lm_head.weight":
        return None if config.tie_word_embeddings else "lm_head.weight"
    name = key[len("model.") :] if key.startswith("model.") else key
    match = EXPERT_NAME.match(name)
    if match is not None and int(match.group(2)) < config.num_local_experts:
        # Under expert parallelism, this rank stores a run of the experts, renumbered from 0 in
        # MoE.experts. The tensors (or pieces) of other ranks' experts are skipped unread.
        local = split_evenly(config.num_local_experts, "experts")
        expert = int(match.group(2)) - rank * local
        if not 0 <= expert < local:
            return None
        name = f"{match.group(1)}{expert}.{name[match.end() :]}"
    return name


def tp_rank(file: Path) -> int | None:
    """Return the tensor-parallel rank in a file name such as pytorch_model-00006-TP-003.safetensors, else None."""
    match = TP_RANK.search(file.name)
    return int(match.group(1)) if match else None


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
    rows straight into its destination (of any dtype, device and layout, or a slice of a larger
    tensor) means that memory never contains a second copy of a tensor, and that no mapped file pages
    linger in the process's memory.
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

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Copy the whole tensor `key` into `out`, a tensor or a view (such as a slice) of its shape, casting as it goes."""
        entry = self.header[key]
        source_dtype = self.dtype(key)
        begin, end = entry["data_offsets"]
        if out.numel() == 0:
            return
        rows = out.view(1, -1) if out.ndim == 0 else out  # a scalar is one row
        row_bytes = (end - begin) // rows.shape[0]
        step = max(1, READ_CHUNK_BYTES // row_bytes)
        for first in range(0, rows.shape[0], step):
            count = min(step, rows.shape[0] - first)
            buffer = bytearray(count * row_bytes)
            self.file.seek(self.data_start + begin + first * row_bytes)
            self.file.readinto(buffer)
            rows[first : first + count] = torch.frombuffer(buffer, dtype=source_dtype).view(count, *rows.shape[1:])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def empty_tensor(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, column_major: bool) -> torch.Tensor:
    if column_major:
        return torch.empty(shape[::-1], dtype=dtype, device=device).t()  # (out, in) view of (in, out) storage
    return torch.empty(shape, dtype=dtype, device=device)


def load_model(folder: Path, config: Config, device: torch.device, dtype: torch.dtype, max_memory: float | None = None) -> Model:
    """Build the model on the meta device, then fill it tensor by tensor from the safetensors files.

    Each tensor is read in chunks straight into its final dtype, device and layout, so peak memory
    stays near the size of the weights in the target dtype. An expert matrix cut into one piece per
    tensor-parallel file is put together by reading each piece into its slice, in rank order.
    Under torchrun each rank reads only its own slices and the pieces of its own experts. Loading
    is strict: a missing, unexpected or misshapen tensor raises an error that names it.
    `max_memory` (GiB per rank) replaces the device's free memory in the fit check.
    """
    with torch.device("meta"):
        model = Model(config)
    check_fit(sum(p.numel() for p in model.parameters()) * dtype.itemsize, device, max_memory)
    expected = dict(model.named_parameters())
    with ExitStack() as stack:
        # Every header first: where each tensor is, whole or in pieces.
        pieces: dict[str, list[tuple[int | None, SafetensorsFile]]] = {}
        for file in checkpoint_files(folder):
            f = stack.enter_context(SafetensorsFile(file))
            for key in f.keys():
                pieces.setdefault(key, []).append((tp_rank(file), f))

        loaded = set()
        for key, places in pieces.items():
            name = parameter_name(key, config)
            if name is None:
                continue
            if name not in expected:
                raise UserError(f"unexpected tensor {key} in {places[0][1].path.name}; is this a Grok 2.5 checkpoint?")
            full_shape, shard = checkpoint_slice(model, name)
            # The router stays in float32, as sglang keeps it; every other tensor takes the model dtype.
            target_dtype = torch.float32 if name.endswith(ROUTER_SUFFIX) else dtype
            column_major = use_column_major(full_shape, target_dtype, device)
            if len(places) == 1:
                f = places[0][1]
                if f.shape(key) != full_shape:
                    raise UserError(f"tensor {key} has shape {f.shape(key)}, expected {full_shape} from config.json")
                tensor = f.read(key, target_dtype, device, column_major=column_major, shard=shard)
            else:
                # An expert matrix in pieces: a rank stores whole experts, so it reads every piece of its own.
                tensor = empty_tensor(full_shape, target_dtype, device, column_major)
                read_pieces(key, places, tensor)
            set_parameter(model, name, tensor)
            loaded.add(name)
    missing = sorted(set(expected) - loaded)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"checkpoint {folder} lacks tensor {missing[0]}{more}")
    # rope_inv_freq computed the RoPE frequencies on the CPU, so compute them again on the weights' device.
    model.inv_freq = rope_inv_freq(config.head_dim, config.rope_theta).to(device)
    return model.eval()


def read_pieces(key: str, places: list[tuple[int | None, SafetensorsFile]], out: torch.Tensor) -> None:
    """Fill `out` with the tensor-parallel pieces of expert matrix `key`, concatenated in rank order."""
    names = ", ".join(f.path.name for _, f in places)
    dim = next((d for suffix, d in EXPERT_SPLIT_DIMS.items() if EXPERT_INFIX in key and key.endswith(suffix)), None)
    ranks = [rank for rank, _ in places]
    if dim is None or None in ranks:
        raise UserError(f"tensor {key} appears in several files ({names}); only expert matrices in -TP-00R files may be split")
    if len(set(ranks)) != len(ranks):
        raise UserError(f"tensor {key} appears twice for one tensor-parallel rank ({names})")
    places = sorted(places, key=lambda place: place[0])
    shapes = [f.shape(key) for _, f in places]
    joined = list(shapes[0])
    joined[dim] = sum(shape[dim] for shape in shapes)
    others_match = all(shape[:dim] + shape[dim + 1 :] == shapes[0][:dim] + shapes[0][dim + 1 :] for shape in shapes)
    if not others_match or tuple(joined) != tuple(out.shape):
        raise UserError(f"tensor {key} is split into pieces {', '.join(map(str, shapes))} that do not join into {tuple(out.shape)} along dim {dim}")
    start = 0
    for (_, f), shape in zip(places, shapes):
        f.read_into(key, out.narrow(dim, start, shape[dim]))
        start += shape[dim]


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

# The pre-tokeniser pattern of word_split "V1" (sglang's PAT_STR_B): GPT-4's split, except that
# every digit is a piece of its own.
WORD_SPLIT_V1 = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# sglang's chat format for tokenizer.tok.json, which ships no template: "Human: ..." and
# "Assistant: ..." turns, each closed by <|separator|> and a blank line.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'Human: ' + message['content'].strip() + '<|separator|>\n\n' }}"
    "{% elif message['role'] == 'system' %}{{ 'System: ' + message['content'].strip() + '<|separator|>\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + '<|separator|>\n\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as a printable character, so BPE works on text strings."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def tokenizer_from_tiktoken(path: Path):
    """Build a `tokenizers` BPE tokenizer equal to the tiktoken encoding in an xAI tokenizer.tok.json.

    The file lists regular tokens and special tokens as {"bytes": [...], "token": id}. tiktoken
    merges the adjacent pair whose joined bytes have the lowest rank (the id), so the equivalent
    BPE lists, for each token in rank order, every split of it into two tokens as a merge.
    """
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    data = json.loads(path.read_text())
    word_split = data.get("word_split")
    if word_split != "V1":
        raise UserError(f"{path.name}: unsupported word_split {word_split!r}; grok2_5.py supports 'V1'")
    pattern = data.get("pat_str") or WORD_SPLIT_V1  # sglang lets an explicit pat_str win

    alphabet = byte_to_unicode()
    ranks = {"".join(alphabet[b] for b in item["bytes"]): item["token"] for item in data["regular_tokens"]}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += sorted(splits, key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
    specials = {bytes(item["bytes"]).decode(): item["token"] for item in data["special_tokens"]}
    clashes = [text for text in specials if text in ranks]
    if clashes:
        raise UserError(f"{path.name}: special token {clashes[0]!r} is also a regular token")
    # Special tokens join the vocabulary with their own ids, so that adding them below keeps those ids.
    vocab = {**ranks, **specials}

    tokenizer = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    # NOTE: sglang's encode recognises only <|pad|>, <|separator|>, <|eos|>, <|controlN|> and
    # <|reserved_N|> in text, which are all the special tokens xai-org/grok-2 lists; here every
    # special token of the file is recognised.
    tokenizer.add_special_tokens([AddedToken(text, special=True, normalized=False) for text in specials])
    return tokenizer


class Tokenizer:
    """The checkpoint's tokenizer (tokenizer.tok.json, else tokenizer.json, via `tokenizers`) and its chat template (via jinja2)."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer as HFTokenizer

        if (folder / "tokenizer.tok.json").exists():
            self.tokenizer = tokenizer_from_tiktoken(folder / "tokenizer.tok.json")
        elif (folder / "tokenizer.json").exists():
            self.tokenizer = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        else:
            raise UserError(f"{folder} has no tokenizer.tok.json or tokenizer.json")
        config_file = folder / "tokenizer_config.json"
        self.settings = read_json(config_file) if config_file.exists() else {}
        template_file = folder / "chat_template.jinja"
        self.chat_template = template_file.read_text() if template_file.exists() else self.settings.get("chat_template")
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
            self.chat_template = {t["name"]: t["template"] for t in self.chat_template}.get("default")
        self.chat_template = self.chat_template or DEFAULT_CHAT_TEMPLATE

    def encode(self, text: str) -> list[int]:
        # Grok has no BOS token: the text is encoded as is, special tokens written in it included.
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def special_token(self, name: str) -> str:
        value = self.settings.get(name) or ""
        return value.get("content", "") if isinstance(value, dict) else value

    def encode_chat(self, messages: list[dict], **template_variables) -> list[int]:
        """Render the chat template with a generation prompt, then encode it.

        `template_variables` reach the template as is.
        """
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


def describe(config: Config) -> dict:
    """Return parameter counts, layer kinds, attention layout and memory figures for `config`.

    Nothing is loaded: the model is built on the meta device, where parameters have shapes but no
    storage. Every layer attends to the whole context, so the KV cache grows with it in every layer.
    """
    with torch.device("meta"):
        model = Model(config)
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    # Each token runs the attention, the dense MLP beside the experts and num_experts_per_tok experts.
    active = total - routed + routed * config.num_experts_per_tok // config.num_local_experts
    kv_per_position = 2 * config.num_key_value_heads * config.head_dim * BFLOAT16_BYTES  # keys and values
    kv_per_token = config.num_hidden_layers * kv_per_position
    dense = ", dense MLP beside the experts" if config.residual_moe else ""
    return {
        "family": "Grok 2.5",
        "total_parameters": total,
        "active_parameters": active,
        "layers": f"{config.num_hidden_layers}: all full; MoE ({config.num_experts_per_tok} of {config.num_local_experts} experts{dense})",
        "attention": f"GQA, {config.num_attention_heads} query / {config.num_key_value_heads} KV heads of {config.head_dim}, soft-capped",
        "kv_bytes_per_token": kv_per_token,
        "kv_bytes_long_context": kv_per_token * LONG_CONTEXT,
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
    """Token ids that end generation: the EOS ids of generation_config.json (else config.json) and <|eos|>, plus end-of-turn when chatting."""
    eos = generation.get("eos_token_id", config.eos_token_id)
    stops = set(eos if isinstance(eos, list) else [eos])
    for token in (EOS, END_OF_TURN) if chat else (EOS,):
        token_id = tokenizer.token_id(token)
        if token_id is not None:
            stops.add(token_id)
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
    parser = argparse.ArgumentParser(description="Generate text with a Grok 2.5 checkpoint.")
    parser.add_argument("--prompt", help="the prompt (with --chat: the user message); required unless --interactive")
    parser.add_argument("--model", default=None, help=f"hub repo id or local folder (default: {DEFAULT_MODEL})")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most, per reply with --interactive (default: 128)")
    parser.add_argument("--temperature", type=float, default=None, help="0 is greedy; default: the checkpoint's generation_config.json, else 0")
    parser.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens, 0 for all; default: generation_config.json, else 0")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]; default: generation_config.json, else 1")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="default: the checkpoint's dtype (float32 for float16 on CPU)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat format (the checkpoint's template, else sglang's Human:/Assistant: format)")
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
