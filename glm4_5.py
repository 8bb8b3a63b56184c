"""GLM-4.5 in one file: config, layers, checkpoint loading, tokenizer, generation, CLI.

GLM-4.5 (Zhipu AI / Z.ai, "GLM-4.5: Agentic, Reasoning, and Coding (ARC) Foundation Models", 2025),
GLM-4.5-Air and GLM-4.6 are decoder-only mixture-of-experts transformers with:
- pre-norm blocks with Llama-style RMSNorm;
- grouped-query attention with biases on q, k and v, an explicit head_dim and, on GLM-4.5 and
  GLM-4.6, per-head RMSNorm on queries and keys;
- partial RoPE: only the first half of each head's dims is rotated;
- a dense SwiGLU MLP in the first layers, then DeepSeek-V3-style mixture-of-experts layers: a sigmoid
  router whose correction bias steers the choice of experts only, group-limited top-k selection,
  renormalised and scaled weights, and a shared expert that processes every token.

This file matches `transformers`' Glm4MoeForCausalLM logit for logit; test_parity.py proves it.
The checkpoints are large: GLM-4.5-Air has 106B parameters (about 220 GB in bfloat16), GLM-4.5 355B.

    python glm4_5.py --prompt "The capital of France is"
    python glm4_5.py --model zai-org/GLM-4.5 --chat --prompt "Write a haiku about tea."
    python glm4_5.py --model ./some/local/folder --prompt "..." --dtype bfloat16 --device cuda
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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_MODEL = "zai-org/GLM-4.5-Air"
MODEL_TYPES = ("glm4_moe",)
END_OF_TURN = "<|user|>"  # the model ends its turn by opening the user's next one


class UserError(Exception):
    """A problem with the user's input or checkpoint; the CLI prints it as one line, no traceback."""


# --------------------------------------------------------------------------------------------------
# Config


# Glm4MoeConfig's defaults in transformers 5.25, for keys a config.json may omit. They are mostly
# GLM-4.5-Air's values, but without its attention biases and RoPE base, and with no EOS token.
TRANSFORMERS_DEFAULTS = {
    "vocab_size": 151552, "hidden_size": 4096, "intermediate_size": 10944, "num_hidden_layers": 46,
    "max_position_embeddings": 131072, "num_attention_heads": 96, "num_key_value_heads": 8, "attention_bias": False,
    "use_qk_norm": False, "rope_theta": 10_000.0, "partial_rotary_factor": 0.5, "first_k_dense_replace": 1,
    "n_routed_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 1408, "n_shared_experts": 1,
    "n_group": 1, "topk_group": 1, "norm_topk_prob": True, "routed_scaling_factor": 1.0, "num_nextn_predict_layers": 1,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "eos_token_id": None,
}


@dataclass
class Config:
    """Hyperparameters of the model; field names follow the checkpoint's config.json.

    The defaults describe the family's flagship, zai-org/GLM-4.5. GLM-4.5-Air has 46 layers of width
    4096, 128 experts of 1408, no QK-norm, 1 dense layer and routed_scaling_factor 1.
    NOTE: the values are from the published config.json as recalled here, not read from the hub
    file; describe() lands within 1% of Z.ai's published 355B total and 32B active with them.
    """

    # sizes
    vocab_size: int = 151552
    hidden_size: int = 5120
    intermediate_size: int = 12288  # the dense MLP of the first `first_k_dense_replace` layers
    num_hidden_layers: int = 92
    max_position_embeddings: int = 131072
    # attention
    num_attention_heads: int = 96
    num_key_value_heads: int = 8
    head_dim: int = 128  # explicit: 96 heads x 128 is wider than hidden_size
    attention_bias: bool = True  # on q_proj, k_proj and v_proj; o_proj has none
    use_qk_norm: bool = True
    # RoPE
    rope_theta: float = 1_000_000.0
    partial_rotary_factor: float = 0.5  # the fraction of each head's dims that RoPE rotates
    # mixture of experts
    first_k_dense_replace: int = 3  # layers before this index have a dense MLP, the rest MoE
    n_routed_experts: int = 160
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 1536
    n_shared_experts: int = 1
    n_group: int = 1  # experts are split into n_group groups, and a token may use topk_group of them
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    num_nextn_predict_layers: int = 1  # MTP layers stored after the decoder layers, unused here
    # norms and output
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    # special tokens: <|endoftext|>, <|user|>, <|observation|>; None: generation stops only at the token limit
    eos_token_id: int | list[int] | None = field(default_factory=lambda: [151329, 151336, 151338])
    dtype: str = "bfloat16"  # the dtype the checkpoint was saved in

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_hf(cls, raw: dict) -> "Config":
        """Build a Config from a config.json dict."""
        raw = dict(raw)
        if raw.get("quantization_config"):
            method = raw["quantization_config"].get("quant_method", "unknown")
            raise UserError(f"this checkpoint is quantized ({method}); glm4_5.py loads the bfloat16 repos, not the -FP8 ones")
        if raw.get("hidden_act", "silu") != "silu":
            raise UserError(f"unsupported hidden_act {raw['hidden_act']!r}; glm4_5.py supports 'silu'")
        # RoPE settings come as `rope_parameters` (transformers >= 5) or as the flat keys
        # `rope_theta`, `partial_rotary_factor` and `rope_scaling` (hub files).
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise UserError(f"unsupported RoPE type {rope_type!r}; glm4_5.py supports 'default'")
        for key in ("rope_theta", "partial_rotary_factor"):
            if key in rope:
                raw[key] = rope[key]
        raw["dtype"] = raw.get("dtype") or raw.get("torch_dtype") or "float32"
        # A key that config.json leaves out means transformers' default, not this file's flagship value.
        # None means "use the default" too, except for eos_token_id, where it means no EOS token.
        settings = {**TRANSFORMERS_DEFAULTS, **{k: v for k, v in raw.items() if v is not None}}
        if "eos_token_id" in raw:
            settings["eos_token_id"] = raw["eos_token_id"]
        if not settings.get("head_dim"):
            settings["head_dim"] = settings["hidden_size"] // settings["num_attention_heads"]
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in settings.items() if k in known})


# --------------------------------------------------------------------------------------------------
# Tensor parallelism (torchrun)
#
# Under `torchrun --nproc-per-node N glm4_5.py ...` each of the N ranks stores 1/N of the attention
# heads, of the dense and shared-expert MLP columns, of the routed experts and of the vocabulary,
# and reads only those slices of the checkpoint. A column-parallel linear layer splits its output
# features across ranks, so it needs no communication. The row-parallel layer after it splits its
# input features and sums the partial products with one all-reduce. A mixture-of-experts layer sums
# its routed and shared partial outputs with one all-reduce. A plain `python glm4_5.py` run keeps
# world_size 1 and calls no torch.distributed function.

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
    """Llama-style RMSNorm: normalise in float32, cast back to the input dtype, then multiply by w."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.type_as(x)


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
    """Grouped-query attention with biased q/k/v projections, optional per-head QK-norm and partial RoPE."""

    def __init__(self, config: Config):
        super().__init__()
        self.n_heads = split_evenly(config.num_attention_heads, "attention heads")  # this rank's query heads
        kv_first, self.n_kv_heads = kv_heads_of_rank(config.num_key_value_heads)
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        # The q/k/v biases are split like the weight rows, so each rank reads the biases of its own heads.
        hd, kv_rows, bias = self.head_dim, config.num_key_value_heads * self.head_dim, config.attention_bias
        self.q_proj = ColumnParallelLinear(config.hidden_size, config.num_attention_heads * hd, bias=bias)
        self.k_proj = ColumnParallelLinear(config.hidden_size, kv_rows, bias=bias, first=kv_first * hd, local=self.n_kv_heads * hd)
        self.v_proj = ColumnParallelLinear(config.hidden_size, kv_rows, bias=bias, first=kv_first * hd, local=self.n_kv_heads * hd)
        self.o_proj = RowParallelLinear(config.num_attention_heads * hd, config.hidden_size)
        # GLM-4.5 and GLM-4.6 normalise each head of q and k before RoPE; GLM-4.5-Air does not.
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.use_qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.use_qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: "int | torch.Tensor", kv: "LayerCache | None") -> torch.Tensor:
        B, T, _ = x.shape  # batch, new tokens, hidden size
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if isinstance(start_pos, torch.Tensor):
            k, v, mask = self.keys_of_static_step(k, v, start_pos, kv)
        else:
            k, v, mask = self.visible_keys(k, v, start_pos, kv)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=True)  # (B, nh, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def visible_keys(self, k: torch.Tensor, v: torch.Tensor, start_pos: int, kv: "LayerCache | None"):
        """Cache the new keys and values; return the keys and values the new queries may see, and the mask.

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


class MLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)); the dense layers, each expert and the shared experts use it.

    With `parallel` (the dense layers and the shared experts), each rank stores a slice of the
    intermediate columns. A routed expert is stored whole on one rank.
    """

    def __init__(self, config: Config, intermediate_size: int, parallel: bool = True):
        super().__init__()
        if parallel:
            self.gate_proj = ColumnParallelLinear(config.hidden_size, intermediate_size)
            self.up_proj = ColumnParallelLinear(config.hidden_size, intermediate_size)
            self.down_proj = RowParallelLinear(intermediate_size, config.hidden_size)
        else:
            self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
            self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
            self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def partial_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return this rank's share of forward(x) before the all-reduce, which the caller does."""
        return F.linear(F.silu(self.gate_proj(x)) * self.up_proj(x), self.down_proj.weight)


class Router(nn.Module):
    """Sigmoid router with group-limited top-k selection, as in DeepSeek-V3, computed in float32.

    `e_score_correction_bias` (set during training to balance the load across experts) is added to
    the scores only to choose the experts. The chosen experts are weighted by their unbiased scores.
    """

    def __init__(self, config: Config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        # Both stay in float32 in every dtype (load_model keeps them so), because small differences
        # between scores decide which experts run.
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size, dtype=torch.float32))
        # A buffer in the reference; a parameter here, so that loading treats it like every other tensor.
        self.e_score_correction_bias = nn.Parameter(torch.zeros(config.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the chosen experts (N, top_k) and their float32 weights (N, top_k) for tokens x (N, C)."""
        N, E = x.shape[0], self.weight.shape[0]  # tokens, routed experts
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # (N, E)
        choice = scores + self.e_score_correction_bias  # (N, E)
        # Rank the groups by the sum of their two best biased scores and hide every expert outside the
        # topk_group best groups.
        group_scores = choice.view(N, self.n_group, E // self.n_group).topk(2, dim=-1).values.sum(-1)  # (N, n_group)
        best_groups = group_scores.topk(self.topk_group, dim=-1).indices  # (N, topk_group)
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
        expert_mask = group_mask.repeat_interleave(E // self.n_group, dim=1)  # (N, E)
        experts = choice.masked_fill(~expert_mask, float("-inf")).topk(self.top_k, dim=-1).indices  # (N, top_k)
        weights = scores.gather(1, experts)  # (N, top_k)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return experts, weights * self.routed_scaling_factor


class MoE(nn.Module):
    """Routed experts plus shared experts that every token passes through.

    Under expert parallelism, each rank stores the routed experts first_expert .. first_expert +
    len(experts) - 1 (renumbered from 0 in `experts`) and a slice of the shared experts' columns.
    The router stays whole on every rank, so that all of them choose the same experts.
    """

    def __init__(self, config: Config):
        super().__init__()
        self.gate = Router(config)
        local = split_evenly(config.n_routed_experts, "routed experts")
        self.first_expert = rank * local
        self.experts = nn.ModuleList(MLP(config, config.moe_intermediate_size, parallel=False) for _ in range(local))
        self.shared_experts = MLP(config, config.moe_intermediate_size * config.n_shared_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        x = x.reshape(B * T, C)  # (N, C), N = B * T tokens
        experts, weights = self.gate(x)  # (N, k) each, k = num_experts_per_tok
        # Sort the N * k (token, expert) assignments by expert, so that each expert that received
        # tokens runs once, on all of its tokens together.
        order = experts.flatten().argsort(stable=True)  # (N * k,)
        counts = experts.flatten().bincount(minlength=self.gate.weight.shape[0]).tolist()  # one host sync per layer
        tokens_by_expert = (order // experts.shape[1]).split(counts)
        weights_by_expert = weights.flatten()[order].split(counts)
        own_experts = slice(self.first_expert, self.first_expert + len(self.experts))
        routed = torch.zeros_like(x)
        for expert, tokens, token_weights in zip(self.experts, tokens_by_expert[own_experts], weights_by_expert[own_experts]):
            if tokens.numel() == 0:
                continue
            # The float32 weight promotes the product, which is cast back as in the reference.
            out = expert(x[tokens]) * token_weights[:, None]  # (n, C)
            routed.index_add_(0, tokens, out.to(x.dtype))
        # The routed sum and the shared experts' output are both partial on each rank, so one all-reduce adds them.
        return all_reduce(routed + self.shared_experts.partial_forward(x)).view(B, T, C)

    def forward_static(self, x: torch.Tensor) -> torch.Tensor:
        """Compute forward(x) with fixed shapes and no host sync, for the --compile decode step.

        Every expert of this rank runs on every token, weighted by its routing weight, which is zero
        where the router did not choose it. The sums run in expert order, as in forward.
        NOTE: so each token reads all of the rank's routed experts, n_routed_experts / num_experts_per_tok
        times the expert weights that forward reads (16 times on GLM-4.5-Air). Gathering the chosen
        experts' weights instead would need the experts stacked in one tensor.
        """
        B, T, C = x.shape
        x = x.reshape(B * T, C)  # (N, C), N = B * T tokens
        experts, weights = self.gate(x)  # (N, k) each
        dense_weights = weights.new_zeros(x.shape[0], self.gate.weight.shape[0]).scatter_(1, experts, weights)  # (N, E)
        dense_weights = dense_weights[:, self.first_expert : self.first_expert + len(self.experts)]  # this rank's experts
        routed = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            weight = dense_weights[:, i, None]  # (N, 1)
            # where() rather than a product with 0, so that an expert that overflows on a token it was
            # not chosen for cannot turn the sum into NaN.
            routed = routed + torch.where(weight > 0, expert(x) * weight, 0.0).to(x.dtype)
        return all_reduce(routed + self.shared_experts.partial_forward(x)).view(B, T, C)


class Block(nn.Module):
    """One pre-norm decoder layer: attention, then a dense MLP (first layers) or a mixture of experts."""

    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config, config.intermediate_size) if layer_idx < config.first_k_dense_replace else MoE(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, start_pos, kv):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start_pos, kv)
        if isinstance(self.mlp, MoE) and isinstance(start_pos, torch.Tensor):
            x = x + self.mlp.forward_static(self.post_attention_layernorm(x))
        else:
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class Model(nn.Module):
    """The GLM-4.5 decoder with its LM head; module names match the checkpoint's tensor names."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.embed_tokens = ParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # The LM head reuses the embedding matrix only if the config ties them (no GLM-4.5 checkpoint does).
        # Both are split by vocabulary.
        self.lm_head = None if config.tie_word_embeddings else ColumnParallelLinear(config.hidden_size, config.vocab_size)
        self.register_buffer("inv_freq", rope_inv_freq(config.rotary_dim, config.rope_theta), persistent=False)

    def forward(self, tokens: torch.Tensor, cache: "KVCache | None" = None, start_pos: "int | torch.Tensor" = 0, last_only: bool = False) -> torch.Tensor:
        """Return logits (B, T, vocab) for `tokens` (B, T) at positions start_pos.. (only the last one if `last_only`).

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
# The multi-token prediction (MTP) layers, used by other engines for speculative decoding, are stored
# as model.layers.{num_hidden_layers}.* and up, after the decoder layers.
LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")
EXPERT_KEY = re.compile(r"(model\.layers\.\d+\.mlp\.experts\.)(\d+)\.")
# The router's tensors stay in float32 whatever dtype the rest of the model runs in, as in the reference.
FLOAT32_SUFFIXES = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")


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
    raise UserError(f"{source} is a {found!r} checkpoint, not GLM-4.5 ({', '.join(MODEL_TYPES)}); use the model file for its family")


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
    if match is not None and int(match.group(2)) < config.n_routed_experts:
        # Under expert parallelism, this rank stores a run of the routed experts, renumbered from 0 in
        # MoE.experts. The tensors of other ranks' experts are skipped unread.
        local = split_evenly(config.n_routed_experts, "routed experts")
        expert = int(match.group(2)) - rank * local
        if not 0 <= expert < local:
            return None
        key = f"{match.group(1)}{expert}.{key[match.end() :]}"
    return key.removeprefix("model.")


def is_mtp_tensor(key: str, config: Config) -> bool:
    match = LAYER_KEY.match(key)
    first_mtp = config.num_hidden_layers
    return match is not None and first_mtp <= int(match.group(1)) < first_mtp + config.num_nextn_predict_layers


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
    stays near the size of the weights in the target dtype (the router's small tensors stay in
    float32). Under torchrun each rank reads only its own slices and routed experts. Loading is
    strict: a missing, unexpected or misshapen tensor raises an error that names it. `max_memory`
    (GiB per rank) replaces the device's free memory in the fit check.
    """
    with torch.device("meta"):
        model = Model(config)
    expected = dict(model.named_parameters())
    weight_bytes = sum(p.numel() * (4 if name.endswith(FLOAT32_SUFFIXES) else dtype.itemsize) for name, p in expected.items())
    check_fit(weight_bytes, device, max_memory)
    loaded, skipped = set(), 0
    for file in checkpoint_files(folder):
        with SafetensorsFile(file) as f:
            for key in f.keys():
                if is_mtp_tensor(key, config):
                    skipped += 1
                    continue
                name = parameter_name(key, config)
                if name is None:
                    continue
                if name not in expected:
                    raise UserError(f"unexpected tensor {key} in {file.name}; is this a GLM-4.5 checkpoint?")
                full_shape, shard = checkpoint_slice(model, name)
                if f.shape(key) != full_shape:
                    raise UserError(f"tensor {key} has shape {f.shape(key)}, expected {full_shape} from config.json")
                target_dtype = torch.float32 if name.endswith(FLOAT32_SUFFIXES) else dtype
                column_major = use_column_major(f.shape(key), target_dtype, device)
                set_parameter(model, name, f.read(key, target_dtype, device, column_major=column_major, shard=shard))
                loaded.add(name)
    missing = sorted(set(expected) - loaded)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"checkpoint {folder} lacks tensor {missing[0]}{more}")
    if skipped:
        log(f"skipped {skipped} tensors of the multi-token prediction (MTP) layers: this file decodes one token per step")
    # rope_inv_freq computed the RoPE frequencies on the CPU, so compute them again on the weights' device.
    model.inv_freq = rope_inv_freq(config.rotary_dim, config.rope_theta).to(device)
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
        # tokenizer.json's post-processor decides which special tokens to add, exactly as in transformers.
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

        The template writes its prefix [gMASK]<sop> itself, so the text is encoded without special tokens.
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
    storage. The counts follow Z.ai's convention for GLM-4.5 ("355B total, 32B active") and
    GLM-4.5-Air ("106B total, 12B active"). The total leaves out the MTP layers, which Model does
    not build (352.8B and 106.9B here). The active count leaves out the embedding and the LM head
    (32.1B and 12.2B here). Counting either of them instead would put GLM-4.5 at 32.9B or more.
    The KV cache figures are what the architecture needs in bfloat16: every layer is full attention.
    """
    with torch.device("meta"):
        model = Model(config)
    total = sum(p.numel() for p in model.parameters())
    moe_layers = [layer.mlp for layer in model.layers if isinstance(layer.mlp, MoE)]
    routed = sum(p.numel() for moe in moe_layers for p in moe.experts.parameters())
    used_routed = routed * config.num_experts_per_tok // config.n_routed_experts
    embedding_and_head = sum(p.numel() for p in model.embed_tokens.parameters())
    if model.lm_head is not None:
        embedding_and_head += model.lm_head.weight.numel()
    kv_per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * BFLOAT16_BYTES  # keys and values
    dense = config.num_hidden_layers - len(moe_layers)
    qk_norm = ", QK-norm" if config.use_qk_norm else ""
    return {
        "family": "GLM-4.5",
        "total_parameters": total,
        "active_parameters": total - routed + used_routed - embedding_and_head,
        "layers": (
            f"{config.num_hidden_layers}: all full attention; {dense} dense, {len(moe_layers)} MoE "
            f"({config.n_routed_experts} routed experts, top {config.num_experts_per_tok}, {config.n_shared_experts} shared)"
        ),
        "attention": (
            f"GQA, {config.num_attention_heads} query / {config.num_key_value_heads} KV heads of {config.head_dim}, "
            f"RoPE on {config.rotary_dim} dims{qk_norm}"
        ),
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
    """Token ids that end generation: generation_config.json's EOS list (else config.json's), plus <|user|> when chatting."""
    eos = generation.get("eos_token_id", config.eos_token_id)
    stops = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
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
    parser = argparse.ArgumentParser(description="Generate text with a GLM-4.5, GLM-4.5-Air or GLM-4.6 checkpoint.")
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
