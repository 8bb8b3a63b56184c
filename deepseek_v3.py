"""DeepSeek-V3 in one file: config, layers, checkpoint loading, tokenizer, generation, CLI.

DeepSeek-V3 (DeepSeek-AI, "DeepSeek-V3 Technical Report", 2024; also DeepSeek-R1, V3-0324, V3.1) is a
decoder-only mixture-of-experts transformer with:
- multi-head latent attention (MLA, from "DeepSeek-V2", 2024): keys and values are up-projected from one
  small latent vector per token, plus one RoPE key shared by all heads, so decoding caches only those;
- RoPE on a separate 64-dim slice of each head, interleaved pairs, YaRN scaling with its softmax correction;
- DeepSeekMoE: sigmoid router with a load-balancing bias used for choosing experts only, group-limited
  top-k, one shared expert always on, and the first `first_k_dense_replace` layers dense;
- FP8 (e4m3) weights with one scale per 128 x 128 block, kept as FP8 in memory and dequantised per
  matrix product with the default --dtype auto, or dequantised once at load time with an explicit --dtype.

This file matches `transformers`' DeepseekV3ForCausalLM logit for logit; test_parity.py proves it.

    python deepseek_v3.py --prompt "The capital of France is"
    python deepseek_v3.py --model deepseek-ai/DeepSeek-R1 --chat --prompt "Why is the sky blue?"
    python deepseek_v3.py --model ./some/local/folder --prompt "..." --dtype bfloat16 --device cuda

The model has 671B parameters (673 GB as published in FP8, 1.3 TB in bfloat16). To spread
them over several GPUs, start the file with torchrun (see "Tensor parallelism (torchrun)" below):

    torchrun --nproc-per-node 8 deepseek_v3.py --prompt "The capital of France is"
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
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

DEFAULT_MODEL = "deepseek-ai/DeepSeek-V3"
MODEL_TYPES = ("deepseek_v3",)
END_OF_TURN = "<｜end▁of▁sentence｜>"  # the chat template closes every assistant turn with the EOS token


class UserError(Exception):
    """A problem with the user's input or checkpoint; the CLI prints it as one line, no traceback."""


# --------------------------------------------------------------------------------------------------
# Config


# DeepseekV3Config's defaults in transformers 5.25, for keys a config.json may omit. They equal the
# DeepSeek-V3 values except max_position_embeddings, and a config without rope_scaling gets plain RoPE.
TRANSFORMERS_DEFAULTS = {
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "max_position_embeddings": 4096, "num_attention_heads": 128, "q_lora_rank": 1536,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "attention_bias": False,
    "rope_theta": 10_000.0, "rope_interleave": True, "n_routed_experts": 256, "num_experts_per_tok": 8, "n_group": 8,
    "topk_group": 4, "n_shared_experts": 1, "first_k_dense_replace": 3, "norm_topk_prob": True,
    "routed_scaling_factor": 2.5, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
}


@dataclass
class Config:
    """Hyperparameters of the model; field names follow the checkpoint's config.json.

    The defaults describe deepseek-ai/DeepSeek-V3 (and R1, V3-0324, V3.1, which share its config).
    """

    # sizes
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense layers
    moe_intermediate_size: int = 2048  # each routed or shared expert
    num_hidden_layers: int = 61
    max_position_embeddings: int = 163840
    # multi-head latent attention
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536  # None: a plain q_proj instead of the low-rank query
    kv_lora_rank: int = 512  # the latent that is cached
    qk_nope_head_dim: int = 128  # per-head query/key dims without RoPE
    qk_rope_head_dim: int = 64  # per-head query dims with RoPE, and the one shared RoPE key
    v_head_dim: int = 128
    attention_bias: bool = False
    # RoPE with YaRN scaling; rope_type is "default" (plain RoPE) or "yarn"
    rope_theta: float = 10_000.0
    rope_interleave: bool = True  # pairs (x[2i], x[2i+1]) instead of (x[i], x[i + d/2])
    rope_type: str = "yarn"
    rope_factor: float = 40.0  # config.json's rope_scaling["factor"]
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    attention_factor: float | None = None  # cos/sin multiplier; None derives it from mscale and mscale_all_dim
    rope_truncate: bool = True  # round the YaRN ramp ends to whole dims
    # mixture of experts
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    n_shared_experts: int = 1
    first_k_dense_replace: int = 3  # layers before this one are dense
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    # norms and output
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    # special tokens
    bos_token_id: int = 0
    eos_token_id: int | list[int] = 1
    # storage
    dtype: str = "bfloat16"  # the dtype to run in by default (FP8 checkpoints set bfloat16)
    weight_block_size: tuple[int, int] | None = (128, 128)  # FP8 scale blocks; None: weights are not quantised

    @classmethod
    def from_hf(cls, raw: dict) -> "Config":
        """Build a Config from a config.json dict (hub files or transformers' save_pretrained)."""
        # None stays only where it has a meaning; elsewhere it means "use the default".
        meaningful_none = {"q_lora_rank", "mscale", "mscale_all_dim", "attention_factor", "weight_block_size"}
        # A key that config.json leaves out means transformers' default, not this file's flagship value.
        settings = {**TRANSFORMERS_DEFAULTS, **{k: v for k, v in raw.items() if v is not None or k in meaningful_none}}
        # RoPE settings come as `rope_parameters` (transformers >= 5) or as `rope_theta` plus
        # `rope_scaling` (hub files, which spell the type `type`).
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "yarn"):
            raise UserError(f"unsupported RoPE type {rope_type!r}; deepseek_v3.py supports 'default' and 'yarn'")
        settings["rope_type"] = rope_type
        settings["rope_theta"] = rope.get("rope_theta", settings["rope_theta"])
        if rope_type == "yarn":
            settings["rope_factor"] = rope["factor"]
            # transformers falls back to max_position_embeddings when the pretraining length is not given.
            settings["original_max_position_embeddings"] = rope.get("original_max_position_embeddings", settings["max_position_embeddings"])
            # A missing or zero beta takes YaRN's default, as in transformers.
            settings["beta_fast"] = rope.get("beta_fast") or 32.0
            settings["beta_slow"] = rope.get("beta_slow") or 1.0
            settings["mscale"] = rope.get("mscale")
            settings["mscale_all_dim"] = rope.get("mscale_all_dim")
            settings["attention_factor"] = rope.get("attention_factor")
            settings["rope_truncate"] = rope.get("truncate", True)

        quantization = raw.get("quantization_config")
        settings["weight_block_size"] = None
        if quantization:
            method = quantization.get("quant_method")
            if method != "fp8" or not quantization.get("weight_block_size"):
                raise UserError(f"unsupported quantization {method!r}; deepseek_v3.py reads FP8 checkpoints with block scales (weight_block_size)")
            settings["weight_block_size"] = tuple(quantization["weight_block_size"])

        settings["dtype"] = raw.get("dtype") or raw.get("torch_dtype") or "float32"
        known = {f.name for f in fields(cls)}
        kept = {k: v for k, v in settings.items() if k in known and (v is not None or k in meaningful_none)}
        return cls(**kept)


# --------------------------------------------------------------------------------------------------
# Tensor parallelism (torchrun)
#
# Under `torchrun --nproc-per-node N deepseek_v3.py ...` each of the N ranks stores 1/N of the attention
# heads, of the dense and shared-expert MLP columns, of the routed experts and of the vocabulary, and
# reads only those slices of the checkpoint. The small latent projections and the router stay whole
# on every rank.
# A column-parallel linear layer splits its output features across ranks, so it needs no
# communication. The row-parallel layer after it splits its input features and sums the partial
# products with one all-reduce. A plain `python deepseek_v3.py` run keeps world_size 1 and calls no
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


def experts_of_rank(total: int) -> tuple[int, int]:
    """Return (first, count) of the routed experts on this rank (expert parallelism: each expert stays whole)."""
    count = split_evenly(total, "routed experts")
    return rank * count, count


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


class RMSNorm(nn.Module):
    """Llama-style RMSNorm: normalise in float32, cast back, then scale by w (initialised to ones)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.type_as(x)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 * mscale * ln(factor) + 1 (Peng et al., 2023, eq. 21); 1 when not stretched."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_inv_freq(config: Config) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d) of RoPE (Su et al., 2021) for the d = qk_rope_head_dim dims, YaRN-scaled.

    YaRN ("YaRN: Efficient Context Window Extension of Large Language Models", Peng et al., 2023)
    keeps the fast frequencies (more than beta_fast turns over the pretraining length), divides the
    slow ones (fewer than beta_slow turns) by `rope_factor`, and blends linearly in between.
    """
    dim, theta = config.qk_rope_head_dim, config.rope_theta
    # Computed on the CPU even inside load_model's meta-device context, because arithmetic on meta
    # tensors imports torch._dynamo (about 1 s).
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    if config.rope_type != "yarn":
        return inv_freq

    def dim_with_turns(turns: float) -> float:
        # The dim index i at which the pretraining length covers `turns` full turns of frequency i.
        return dim * math.log(config.original_max_position_embeddings / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_with_turns(config.beta_fast), dim_with_turns(config.beta_slow)
    if config.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoids a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)  # 0: keep, 1: divide
    return inv_freq * (1 - ramp) + inv_freq / config.rope_factor * ramp


def rope_attention_factor(config: Config) -> float:
    """Return the factor YaRN applies to cos and sin, so to the RoPE dims of every query-key product."""
    if config.rope_type != "yarn":
        return 1.0
    if config.attention_factor is not None:
        return config.attention_factor
    if config.mscale and config.mscale_all_dim:
        return yarn_mscale(config.rope_factor, config.mscale) / yarn_mscale(config.rope_factor, config.mscale_all_dim)
    return yarn_mscale(config.rope_factor)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, factor: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (T, d/2), one angle per rotated pair, times YaRN's factor, computed in float32 then cast."""
    angles = positions[:, None].float() * inv_freq[None, :]  # (T, d/2)
    return (angles.cos() * factor).to(dtype), (angles.sin() * factor).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate each pair of the last dim by its angle: pairs (x[2i], x[2i+1]) if `interleaved`, else (x[i], x[i + d/2]).

    DeepSeek's checkpoints use the interleaved layout. transformers rotates the same pairs but writes
    the result de-interleaved; queries and keys get the same permutation, so their products agree.
    """
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    r1, r2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    if interleaved:
        return torch.stack((r1, r2), dim=-1).flatten(-2)
    return torch.cat((r1, r2), dim=-1)


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Return the float32 value of a block-quantised FP8 weight.

    Format (DeepSeek-V3, quantization_config {"quant_method": "fp8", "weight_block_size": [128, 128]}):
    `weight` is float8_e4m3fn of shape (out, in); `weight_scale_inv` is float32 of shape
    (ceil(out / 128), ceil(in / 128)), one scale per 128 x 128 block, and the real weight is
    weight * scale. Despite its name the scale multiplies: it is the inverse of the factor that
    quantised the block. Edge blocks are cut short where a dim is not a multiple of the block
    (kv_a_proj_with_mqa is 576 x 7168, so its scale is 5 x 56).
    NOTE: FP8Linear calls this before every matrix product. A GPU with native FP8 matmul could
    multiply the FP8 weight directly instead (torch._scaled_mm with block scales), once its results
    are checked against this path.
    """
    rows, cols = block
    scale = scale_inv.float().repeat_interleave(rows, dim=0)[: weight.shape[0]]
    scale = scale.repeat_interleave(cols, dim=1)[:, : weight.shape[1]]  # (out, in)
    return weight.float() * scale


class FP8Linear(nn.Module):
    """A linear layer whose weight stays FP8 in memory, with its block scales, and is dequantised per matmul.

    The loader puts it in place of a linear layer of any kind whose checkpoint weight is FP8 (with
    --dtype auto). It keeps that layer's slice (`shard`) and bias, and the all-reduce of a
    RowParallelLinear: `reduce` sums the partial products over the ranks before the bias is added.
    """

    def __init__(self, like: nn.Linear, block: tuple[int, int], dtype: torch.dtype):
        super().__init__()
        out_features, in_features = like.weight.shape  # this rank's slice
        self.block = block
        self.shard = getattr(like, "shard", None)
        self.reduce = isinstance(like, RowParallelLinear) and not isinstance(like, UnreducedRowParallelLinear)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        scale_shape = (math.ceil(out_features / block[0]), math.ceil(in_features / block[1]))
        self.register_buffer("weight_scale_inv", torch.empty(scale_shape, dtype=torch.float32))
        self.bias = like.bias

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        # Dequantised in float32 then cast, like the dequantise-on-load path, so both give the same weights.
        return dequantize_fp8(self.weight, self.weight_scale_inv, self.block).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dense_weight(x.dtype)
        if not self.reduce:
            return F.linear(x, weight, self.bias)
        y = all_reduce(F.linear(x, weight))
        return y if self.bias is None else y + self.bias


def dense_weight(linear: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """Return the weight of a linear layer in `dtype`, dequantised when it is resident FP8."""
    return linear.dense_weight(dtype) if isinstance(linear, FP8Linear) else linear.weight


class Attention(nn.Module):
    """Multi-head latent attention (MLA) with a low-rank query, a shared RoPE key and YaRN.

    Per token, kv_a_proj_with_mqa makes a latent c (kv_lora_rank) and one RoPE key k_rope shared by
    all heads. kv_b_proj up-projects c to each head's key part k_nope and value v. Two equivalent
    ways to attend, chosen by the `absorb` attribute:
    - absorbed (default): kv_b_proj is folded into the query and the output, so attention runs on
      the latent directly and the cache holds only c and k_rope: kv_lora_rank + qk_rope_head_dim
      values per token and layer;
    - expanded (`absorb = False`): full per-head keys and values are computed and cached, as in
      ordinary multi-head attention: num_attention_heads * (qk_head_dim + v_head_dim) values.
    For DeepSeek-V3 in bfloat16 over its 61 layers that is 70,272 bytes per token against 4,997,120.
    Under tensor parallelism each rank computes its own heads. The absorbed path's cache is then the
    same on every rank (the latent is shared by all heads); the expanded path caches only this
    rank's heads.
    """

    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        self.n_heads = split_evenly(config.num_attention_heads, "attention heads")  # this rank's heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.interleaved = config.rope_interleave
        self.absorb = True
        qk_head_dim = self.nope_dim + self.rope_dim
        # YaRN also sharpens the softmax by mscale(factor, mscale_all_dim)^2, across all dims
        # (transformers 5.25: yarn_apply_mscale).
        self.scale = qk_head_dim**-0.5
        if config.rope_type == "yarn" and config.mscale_all_dim:
            self.scale *= yarn_mscale(config.rope_factor, config.mscale_all_dim) ** 2

        # The projections into the latents (q_a_proj, kv_a_proj_with_mqa) and their norms are small and
        # shared by all heads, so every rank keeps a full copy. The per-head projections are split by heads.
        heads = config.num_attention_heads
        if self.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(config.hidden_size, heads * qk_head_dim)
        else:
            self.q_a_proj = nn.Linear(config.hidden_size, self.q_lora_rank, bias=config.attention_bias)
            # The latent norms use eps 1e-6 regardless of rms_norm_eps, as in transformers 5.25.
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, 1e-6)
            self.q_b_proj = ColumnParallelLinear(self.q_lora_rank, heads * qk_head_dim)
        self.kv_a_proj_with_mqa = nn.Linear(config.hidden_size, self.kv_lora_rank + self.rope_dim, bias=config.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, 1e-6)
        self.kv_b_proj = ColumnParallelLinear(self.kv_lora_rank, heads * (self.nope_dim + self.v_dim))
        self.o_proj = RowParallelLinear(heads * self.v_dim, config.hidden_size, bias=config.attention_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: "int | torch.Tensor", kv: "LayerCache | None") -> torch.Tensor:
        # Shape letters: B batch, T new tokens, S keys (cached and new), nh heads, dn and dr the
        # query/key dims without and with RoPE, dv value dim, r kv_lora_rank.
        B, T, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(B, T, self.n_heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)  # (B, T, nh, dn), (B, T, nh, dr)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)  # (B, T, r), (B, T, dr)
        latent = self.kv_a_layernorm(latent)
        q_rope = apply_rope(q_rope, cos[:, None], sin[:, None], self.interleaved)
        k_rope = apply_rope(k_rope, cos, sin, self.interleaved)

        if self.absorb:
            latent, k_rope, mask = self.cached_keys(latent, k_rope, start_pos, kv)  # (B, S, r), (B, S, dr)
            out = self.attend_latent(q_nope, q_rope, latent, k_rope, mask)  # (B, T, nh, dv)
        else:
            k_nope, v = self.kv_b_proj(latent).view(B, T, self.n_heads, -1).split([self.nope_dim, self.v_dim], dim=-1)
            k = torch.cat((k_nope, k_rope[:, :, None].expand(-1, -1, self.n_heads, -1)), dim=-1)  # (B, T, nh, dn + dr)
            k, v, mask = self.cached_keys(k, v, start_pos, kv)  # (B, S, nh, dn + dr), (B, S, nh, dv)
            q = torch.cat((q_nope, q_rope), dim=-1)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=self.scale)
            out = out.transpose(1, 2)  # (B, T, nh, dv)
        return self.o_proj(out.reshape(B, T, self.n_heads * self.v_dim))

    def cached_keys(self, keys: torch.Tensor, values: torch.Tensor, start_pos: "int | torch.Tensor", kv: "LayerCache | None"):
        """Cache the pair this path attends over, (latent, k_rope) or (k, v), and return it for the visible keys with their mask."""
        if isinstance(start_pos, torch.Tensor):
            return self.keys_of_static_step(keys, values, start_pos, kv)
        return self.visible_keys(keys, values, start_pos, kv)

    @staticmethod
    def visible_keys(keys: torch.Tensor, values: torch.Tensor, start_pos: int, kv: "LayerCache | None"):
        """Cache the new entries (B, T, ...) and return those of positions 0 .. start_pos + T - 1 with the causal mask.

        The mask is None when every returned key is visible, as for one decoded token.
        """
        T = keys.shape[1]
        end_pos = start_pos + T
        if kv is not None:
            keys, values = kv.update(start_pos, keys, values)  # (B, S, ...), S = end_pos
        if T == 1:
            return keys, values, None
        q_pos = torch.arange(start_pos, end_pos, device=keys.device)[:, None]
        k_pos = torch.arange(end_pos - keys.shape[1], end_pos, device=keys.device)[None, :]
        return keys, values, k_pos <= q_pos  # (T, S)

    @staticmethod
    def keys_of_static_step(keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor, kv: "LayerCache"):
        """Cache one token whose position is a tensor (the --compile decode step), as visible_keys does.

        The step writes into the cache in place and attends over the whole buffer with a mask, so
        that every position runs the same shapes and so the same compiled graph.
        """
        keys, values = kv.write_at(position, keys, values)  # (B, max_len, ...)
        k_pos = torch.arange(keys.shape[1], device=keys.device)[None, :]
        return keys, values, k_pos <= position  # (1, max_len)

    def attend_latent(self, q_nope, q_rope, latent, k_rope, mask) -> torch.Tensor:
        """Attention on the latent, with kv_b_proj absorbed into the query and the output.

        A head's key part is k_nope = W_uk c and its value v = W_uv c, so q_nope . k_nope equals
        (W_uk^T q_nope) . c and the softmax-weighted sum of values equals W_uv (sum of p c). The
        query moves into latent space once per new token instead of every cached key moving out.
        Einsum letters: b batch, t new tokens, s keys, h heads, d nope dim, e RoPE dim, r latent, v value dim.
        NOTE: the scores (B, nh, T, S) are materialised, which is cheap when decoding (T = 1) but takes
        nh * T * S floats per layer for a long prompt, where the expanded path's fused kernel does not.
        """
        w_kv_b = dense_weight(self.kv_b_proj, q_nope.dtype).unflatten(0, (self.n_heads, self.nope_dim + self.v_dim))  # (h, d + v, r)
        w_uk, w_uv = w_kv_b[:, : self.nope_dim], w_kv_b[:, self.nope_dim :]  # (h, d, r), (h, v, r)
        q_latent = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)
        scores = torch.einsum("bthr,bsr->bhts", q_latent, latent) + torch.einsum("bthe,bse->bhts", q_rope, k_rope)
        scores = scores * self.scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q_nope.dtype)
        out_latent = torch.einsum("bhts,bsr->bthr", probs, latent)
        return torch.einsum("bthr,hvr->bthv", out_latent, w_uv)


class MLP(nn.Module):
    """Gated MLP with SiLU (SwiGLU): down(silu(gate(x)) * up(x)). Dense layers, routed and shared experts.

    By default the columns are split across ranks (gate and up column-parallel, down row-parallel).
    With `reduce=False` the output is this rank's partial sum, which the caller all-reduces. A
    routed expert (`split=False`) stays whole on the rank that holds it.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, split: bool = True, reduce: bool = True):
        super().__init__()
        if split:
            self.gate_proj = ColumnParallelLinear(hidden_size, intermediate_size)
            self.up_proj = ColumnParallelLinear(hidden_size, intermediate_size)
            row_parallel = RowParallelLinear if reduce else UnreducedRowParallelLinear
            self.down_proj = row_parallel(intermediate_size, hidden_size)
        else:
            self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
            self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
            self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """DeepSeek-V3's router: sigmoid scores, bias-corrected group-limited top-k, weights from the raw scores.

    `e_score_correction_bias` is the auxiliary-loss-free load-balancing bias. Training nudges it to
    even out expert load, and it changes only which experts are chosen, never their weights.
    The weight and the bias stay float32 in every model dtype and the logits are computed in
    float32, as in transformers.
    """

    def __init__(self, config: Config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the routing weights (N, k) in float32 and the chosen expert ids (N, k) for tokens x (N, C)."""
        N, E = x.shape[0], self.weight.shape[0]
        scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))  # (N, E)
        choice = scores + self.e_score_correction_bias
        # Keep the topk_group groups whose two best experts score highest, then pick top_k experts in them.
        grouped = choice.view(N, self.n_group, E // self.n_group)  # (N, G, E/G)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, G)
        best_groups = group_scores.topk(self.topk_group, dim=-1).indices  # (N, topk_group)
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
        choice = grouped.masked_fill(~group_mask[:, :, None], float("-inf")).view(N, E)
        expert_ids = choice.topk(self.top_k, dim=-1).indices  # (N, k)
        weights = scores.gather(1, expert_ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, expert_ids


class MoE(nn.Module):
    """DeepSeekMoE: routed experts chosen per token plus shared experts that see every token.

    Under torchrun every rank routes all tokens (the router is whole on each rank) but loads and
    runs only its own routed experts, `experts[i]` being expert first_expert + i. The shared
    experts are split by columns. Each rank adds its partial shared output to its routed output,
    and one all-reduce sums both over the ranks.
    """

    def __init__(self, config: Config):
        super().__init__()
        self.gate = Router(config)
        self.n_routed_experts = config.n_routed_experts
        self.first_expert, local_experts = experts_of_rank(config.n_routed_experts)
        self.experts = nn.ModuleList(MLP(config.hidden_size, config.moe_intermediate_size, split=False) for _ in range(local_experts))
        # The shared experts are stored as one MLP n_shared_experts times wider.
        self.shared_experts = MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts, reduce=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        tokens = x.reshape(B * T, C)  # (N, C)
        weights, expert_ids = self.gate(tokens)  # (N, k) each
        # Sort the N * k (token, expert) assignments by expert, so each expert runs once on its tokens.
        flat_ids = expert_ids.flatten()  # (N * k,)
        order = flat_ids.argsort()
        counts = torch.bincount(flat_ids, minlength=self.n_routed_experts).tolist()
        starts = [0, *itertools.accumulate(counts)]  # expert e's assignments are order[starts[e] : starts[e + 1]]
        routed = torch.zeros_like(tokens)
        for index, expert in enumerate(self.experts):
            first_slot, end_slot = starts[self.first_expert + index], starts[self.first_expert + index + 1]
            if first_slot == end_slot:
                continue
            slots = order[first_slot:end_slot]  # positions in the flattened (N, k) assignments
            token_ids = slots // expert_ids.shape[1]
            out = expert(tokens[token_ids]) * weights.flatten()[slots, None]  # float32 product, like transformers
            routed.index_add_(0, token_ids, out.to(routed.dtype))
        return all_reduce(routed + self.shared_experts(tokens)).view(B, T, C)

    def forward_static(self, x: torch.Tensor) -> torch.Tensor:
        """Compute what forward computes, with no shape or loop that depends on the routing (the --compile decode step).

        Every local expert runs on every token and is weighted by its routing weight, which is zero
        where the router did not choose it. That costs local experts / num_experts_per_tok times the
        routed work of forward. Gathering the chosen experts' weights instead would need a stacked
        copy of every expert. The chosen experts are summed in the same order as in forward, so the
        result is the same.
        """
        B, T, C = x.shape
        tokens = x.reshape(B * T, C)  # (N, C)
        weights, expert_ids = self.gate(tokens)  # (N, k) each
        dense = weights.new_zeros(tokens.shape[0], self.n_routed_experts).scatter_(1, expert_ids, weights)  # (N, E)
        routed = torch.zeros_like(tokens)
        for index, expert in enumerate(self.experts):
            weight = dense[:, self.first_expert + index, None]  # (N, 1)
            # where() rather than a product with 0, so that an expert overflowing on a token it was
            # not chosen for cannot turn the sum into NaN.
            out = torch.where(weight > 0, expert(tokens) * weight, 0.0)  # float32 product, like forward
            routed += out.to(routed.dtype)
        return all_reduce(routed + self.shared_experts(tokens)).view(B, T, C)


class Block(nn.Module):
    """One pre-norm decoder layer: MLA, then a dense MLP (first layers) or the MoE."""

    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        if layer_idx < config.first_k_dense_replace:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)
        else:
            self.mlp = MoE(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, start_pos, kv):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start_pos, kv)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE) and isinstance(start_pos, torch.Tensor):  # the --compile decode step
            return x + self.mlp.forward_static(h)
        return x + self.mlp(h)


class Model(nn.Module):
    """The DeepSeek-V3 decoder with its LM head; module names match the checkpoint's tensor names.

    Set `layer.self_attn.absorb = False` on every layer to run the expanded attention path instead of
    the absorbed one (same logits, larger cache; see Attention).
    """

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.embed_tokens = ParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # The LM head reuses the embedding matrix unless the checkpoint has its own; both are split by vocabulary.
        self.lm_head = None if config.tie_word_embeddings else ColumnParallelLinear(config.hidden_size, config.vocab_size)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.rope_factor = rope_attention_factor(config)

    def forward(self, tokens: torch.Tensor, cache: "KVCache | None" = None, start_pos: "int | torch.Tensor" = 0, last_only: bool = False) -> torch.Tensor:
        """Return logits (B, T, vocab) for `tokens` (B, T) at positions start_pos.. (only the last one if `last_only`).

        A 0-d tensor `start_pos` runs the static-shape decode step of --compile: one token, with a cache.
        """
        x = self.embed_tokens(tokens)  # (B, T, C)
        positions = start_pos + torch.arange(tokens.shape[1], device=tokens.device)
        cos, sin = rope_cos_sin(self.inv_freq, positions, self.rope_factor, x.dtype)
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
TEXT_PREFIX = "model."
# The router stays float32 in every model dtype, as transformers keeps it (_keep_in_fp32_modules_strict).
FLOAT32_SUFFIXES = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")
SCALE_SUFFIX = "_scale_inv"  # FP8 checkpoints store `<name>.weight_scale_inv` next to `<name>.weight`
LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")
EXPERT_KEY = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")


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
    raise UserError(f"{source} is a {found!r} checkpoint, not DeepSeek-V3 ({', '.join(MODEL_TYPES)}); use the model file for its family")


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


def is_mtp_tensor(key: str, config: Config) -> bool:
    """Return whether checkpoint tensor `key` belongs to the multi-token-prediction layers (index num_hidden_layers and up)."""
    layer = LAYER_KEY.match(key)
    return layer is not None and int(layer.group(1)) >= config.num_hidden_layers


def parameter_name(key: str, config: Config) -> str | None:
    """Map a checkpoint tensor name to this file's parameter name; None means this rank does not use the tensor.

    Layers at index num_hidden_layers and above are the multi-token-prediction module (DeepSeek-V3
    trains one extra layer that predicts the token after next; `model.layers.61.*` on the hub).
    This file predicts one token at a time, so it skips them. Under torchrun a rank loads only its
    own routed experts, numbered from its first one: checkpoint expert e is this rank's
    experts[e - first], and the experts of other ranks are skipped.
    """
    if is_mtp_tensor(key, config):
        return None
    if key == "lm_head.weight":
        return None if config.tie_word_embeddings else "lm_head.weight"
    expert = EXPERT_KEY.match(key)
    if expert and int(expert.group(1)) >= config.first_k_dense_replace and int(expert.group(2)) < config.n_routed_experts:
        first, count = experts_of_rank(config.n_routed_experts)
        index = int(expert.group(2)) - first
        if not 0 <= index < count:
            return None  # another rank's expert
        key = f"model.layers.{expert.group(1)}.mlp.experts.{index}.{key[expert.end() :]}"
    if key.startswith(TEXT_PREFIX):
        return key[len(TEXT_PREFIX) :]
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


def load_model(
    folder: Path,
    config: Config,
    device: torch.device,
    dtype: torch.dtype,
    max_memory: float | None = None,
    keep_quantized: bool = False,
) -> Model:
    """Build the model on the meta device, then fill it tensor by tensor from the safetensors files.

    Each tensor is read in chunks, dequantised if it is FP8, cast to `dtype` (the router to float32)
    and moved to `device` on its own, so peak memory stays near the size of the weights in the
    target dtype. With `keep_quantized`, FP8 weights stay FP8 in memory with their block scales
    (FP8Linear) and are dequantised per matmul instead. Under torchrun each rank reads only its own
    slices. Loading is strict: a missing, unexpected or misshapen tensor raises an error that names
    it. `max_memory` (GiB per rank) replaces the device's free memory in the fit check.
    """
    with torch.device("meta"):
        model = Model(config)
    loaded, skipped = set(), 0
    with ExitStack() as stack:
        # All shards stay open because an FP8 weight and its scale may sit in different shards.
        files = checkpoint_files(folder)
        handles = [stack.enter_context(SafetensorsFile(file)) for file in files]
        where = {key: (handle, file) for handle, file in zip(handles, files) for key in handle.keys()}
        if keep_quantized:
            keep_fp8_resident(model, config, where)
        check_fit(resident_bytes(model, dtype), device, max_memory)
        # The router's correction bias and the FP8 scales are buffers (not trained by gradient), so buffers count too.
        expected = dict(model.state_dict(keep_vars=True))
        for key, (handle, file) in where.items():
            if key.endswith(SCALE_SUFFIX):
                if key.removesuffix(SCALE_SUFFIX) not in where:
                    raise UserError(f"unexpected tensor {key} in {file.name}: no {key.removesuffix(SCALE_SUFFIX)} to scale")
                continue  # read with its weight
            name = parameter_name(key, config)
            if name is None:
                skipped += is_mtp_tensor(key, config)  # the tied LM head and other ranks' experts are not worth a log line
                continue
            if name not in expected:
                raise UserError(f"unexpected tensor {key} in {file.name}; is this a DeepSeek-V3 checkpoint?")
            full_shape, shard = checkpoint_slice(model, name)
            shape = handle.shape(key)
            if shape != full_shape:
                raise UserError(f"tensor {key} has shape {shape}, expected {full_shape} from config.json")
            target = torch.float32 if name.endswith(FLOAT32_SUFFIXES) else dtype
            column_major = use_column_major(shape, target, device)
            if handle.dtype(key) in FP8_DTYPES:
                if config.weight_block_size is None or key + SCALE_SUFFIX not in where:
                    raise UserError(f"tensor {key} is FP8 but the checkpoint lacks its {key}{SCALE_SUFFIX} or config.json lacks quantization_config.weight_block_size")
                weight, scale = read_fp8(where, key, full_shape, shard, config.weight_block_size, device)
                if name + SCALE_SUFFIX in expected:  # an FP8Linear: kept as stored
                    set_parameter(model, name + SCALE_SUFFIX, scale)
                    loaded.add(name + SCALE_SUFFIX)
                    tensor = weight
                else:
                    tensor = dequantize_fp8(weight, scale, config.weight_block_size).to(target)
                    tensor = tensor.t().contiguous().t() if column_major else tensor
            else:
                tensor = handle.read(key, target, device, column_major=column_major, shard=shard)
            set_parameter(model, name, tensor)
            loaded.add(name)
    missing = sorted(set(expected) - loaded)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"checkpoint {folder} lacks tensor {missing[0]}{more}")
    if skipped:
        log(f"skipped {skipped} multi-token-prediction tensors (model.layers.{config.num_hidden_layers}.* and up): this file predicts one token at a time")
    # rope_inv_freq computed the RoPE frequencies on the CPU, so compute them again on the weights' device.
    model.inv_freq = rope_inv_freq(config).to(device)
    return model.eval()


def keep_fp8_resident(model: Model, config: Config, where: dict) -> None:
    """Put an FP8Linear in place of each linear layer whose checkpoint weight is FP8 with block scales, still on the meta device."""
    if config.weight_block_size is None:
        return  # the loading loop names the FP8 tensors that cannot be read
    for key, (handle, _) in where.items():
        if handle.dtype(key) not in FP8_DTYPES or key + SCALE_SUFFIX not in where:
            continue
        name = parameter_name(key, config)
        if name is None or not name.endswith(".weight"):
            continue
        module_name = name.removesuffix(".weight")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            continue  # not a layer of this model: the loading loop names the tensor
        if isinstance(module, nn.Linear):
            with torch.device("meta"):
                model.set_submodule(module_name, FP8Linear(module, config.weight_block_size, handle.dtype(key)))


def resident_bytes(model: Model, dtype: torch.dtype) -> int:
    """Return the bytes of this rank's weights once loaded: FP8 weights and their float32 scales as stored, the router in float32, the rest in `dtype`."""
    total = 0
    for name, tensor in model.state_dict(keep_vars=True).items():
        as_built = tensor.dtype in FP8_DTYPES or name.endswith((SCALE_SUFFIX, *FLOAT32_SUFFIXES))
        total += tensor.numel() * (tensor.element_size() if as_built else dtype.itemsize)
    return total


def read_fp8(where: dict, key: str, full_shape: tuple[int, ...], shard: tuple[int, int, int] | None, block: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Read this rank's slice of FP8 weight `key` and the block scales that cover it, both as stored."""
    rows, cols = block
    scale_key = key + SCALE_SUFFIX
    scale_handle, _ = where[scale_key]
    scale_shape = (math.ceil(full_shape[0] / rows), math.ceil(full_shape[1] / cols))
    if scale_handle.shape(scale_key) != scale_shape:
        raise UserError(f"tensor {scale_key} has shape {scale_handle.shape(scale_key)}, expected {scale_shape} for {full_shape} in {rows} x {cols} blocks")
    handle, _ = where[key]
    weight = handle.read(key, device=device, shard=shard)
    return weight, scale_handle.read(scale_key, device=device, shard=fp8_scale_slice(key, full_shape, shard, block))


def fp8_scale_slice(key: str, full_shape: tuple[int, ...], shard: tuple[int, int, int] | None, block: tuple[int, int]) -> tuple[int, int, int] | None:
    """Return the (dim, first, length) slice of the block scales that belongs to this rank's `shard` of FP8 weight `key`.

    The slice must start on a block boundary and end on one (or at the end of the tensor), so that
    this rank reads whole blocks and exactly their scales.
    """
    if shard is None:
        return None
    dim, first, length = shard
    size, end = block[dim], first + length
    if first % size or (end % size and end != full_shape[dim]):
        raise UserError(
            f"FP8 tensor {key}: this rank's slice {first}..{end - 1} of dim {dim} (size {full_shape[dim]}) does not fall on the "
            f"boundaries of its {block[0]} x {block[1]} blocks; use a --nproc-per-node that splits dim {dim} into whole blocks of {size}"
        )
    return dim, first // size, math.ceil(end / size) - first // size


def checkpoint_slice(model: nn.Module, name: str) -> tuple[tuple[int, ...], tuple[int, int, int] | None]:
    """Return the checkpoint shape of parameter `name` and the (dim, first, length) slice this rank stores."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    shape = tuple(getattr(module, attr).shape)  # a parameter or a buffer (the router's correction bias)
    shard = getattr(module, "shard", None)
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
    module = model.get_submodule(module_name)
    is_parameter = isinstance(getattr(module, attr), nn.Parameter)
    setattr(module, attr, nn.Parameter(tensor, requires_grad=False) if is_parameter else tensor)


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
        # tokenizer.json's post-processor decides whether <｜begin▁of▁sentence｜> is prepended: transformers 5.25
        # ignores tokenizer_config.json's add_bos_token when a tokenizer.json exists, and so does this file.
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

        The template writes the BOS token itself, so the text is encoded without special tokens: one BOS.
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
    """Preallocated cache of one layer: one (B, max_len, ...) buffer per cached tensor.

    What is cached depends on the attention path, so the buffers are allocated at the first write,
    shaped like what is written. The absorbed path caches the latent (B, S, kv_lora_rank) and the
    RoPE key (B, S, qk_rope_head_dim). The expanded path caches per-head keys (B, S, nh, qk_head_dim)
    and values (B, S, nh, v_head_dim).
    """

    def __init__(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        self.batch, self.max_len, self.dtype, self.device = batch, max_len, dtype, device
        self.buffers: list[torch.Tensor] = []

    def grow(self, max_len: int) -> None:
        """Reallocate for max_len positions, keeping what is cached; unallocated buffers take max_len at their first write."""
        self.max_len = max_len
        for i, old in enumerate(self.buffers):
            new = old.new_zeros(old.shape[0], max_len, *old.shape[2:])
            new[:, : old.shape[1]] = old
            self.buffers[i] = new

    def allocate(self, new: tuple[torch.Tensor, ...]) -> None:
        """Allocate the buffers at the first write, one per entry (B, T, ...) written."""
        if not self.buffers:
            self.buffers = [torch.zeros(self.batch, self.max_len, *t.shape[2:], dtype=self.dtype, device=self.device) for t in new]

    def update(self, start_pos: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write the new entries (B, T, ...) at start_pos, return each buffer's entries up to start_pos + T."""
        self.allocate(new)
        end_pos = start_pos + new[0].shape[1]
        for buffer, entries in zip(self.buffers, new):
            buffer[:, start_pos:end_pos] = entries
        return tuple(buffer[:, :end_pos] for buffer in self.buffers)

    def write_at(self, position: torch.Tensor, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write one token's entries (B, 1, ...) at `position` (a 0-d tensor); return the whole buffers."""
        self.allocate(new)
        for buffer, entries in zip(self.buffers, new):
            buffer.index_copy_(1, position.view(1), entries)
        return tuple(self.buffers)


class KVCache:
    """One LayerCache per layer, for positions 0 .. max_len - 1 (under torchrun, of the heads this rank computes)."""

    def __init__(self, config: Config, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        self.layers = [LayerCache(batch, max_len, dtype, device) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len

    def ensure(self, length: int) -> None:
        """Make room for `length` positions, doubling the buffers so that a long chat grows them rarely."""
        if length > self.max_len:
            self.max_len = max(length, 2 * self.max_len)
            for layer in self.layers:
                layer.grow(self.max_len)

    def bytes_per_token(self) -> int:
        """Bytes the allocated buffers of all layers take per cached position and batch row."""
        total = sum(buffer.numel() * buffer.element_size() for layer in self.layers for buffer in layer.buffers)
        return total // (self.layers[0].batch * self.layers[0].max_len)


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

    Freezing would also fold the dequantisation of resident FP8 weights (FP8Linear) into dense
    copies in the model dtype, kept next to the FP8 originals, so such a model compiles without it
    and each step dequantises as the eager one does.

    Freezing applies to half-precision weights only, because the prepacked copy sits next to the
    weights: Gemma 3 270M peaked at 1627 MB instead of 929 MB in bfloat16, and in float32 at
    3.5x the weight bytes for a 7% gain, so float32 compiles without it.
    """
    quantised = any(isinstance(module, FP8Linear) for module in model.modules())
    torch._inductor.config.freezing = model.embed_tokens.weight.dtype != torch.float32 and not quantised
    return torch.compile(model, fullgraph=True, dynamic=False)


# --------------------------------------------------------------------------------------------------
# Architecture summary (--info): sizes computed from the config alone, on the meta device

BFLOAT16_BYTES = 2
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LONG_CONTEXT = 128 * 1024
FP8_SCALE_BYTES = 4  # one float32 weight_scale_inv per block


def describe(config: Config) -> dict:
    """Return parameter counts, layer kinds, attention layout and memory figures for `config`.

    Nothing is loaded: the model is built on the meta device, where parameters have shapes but no
    storage. The counts follow DeepSeek's convention for "671B total, 37B activated". The total
    leaves out the multi-token-prediction layer, which Model does not build: the hub checkpoint
    holds 14B parameters more (685B). The activated count leaves out the input embedding, a table
    lookup, but counts the LM head. The same convention gives DeepSeek-V2's published 21B
    activated (20.8B). The KV cache figures are the absorbed path's: one latent and one RoPE key per
    token and layer, in bfloat16.
    """
    with torch.device("meta"):
        model = Model(config)
    total = sum(p.numel() for p in model.parameters())
    moe_layers = [layer.mlp for layer in model.layers if isinstance(layer.mlp, MoE)]
    routed = sum(p.numel() for moe in moe_layers for p in moe.experts.parameters())
    used_routed = routed * config.num_experts_per_tok // config.n_routed_experts
    embedding = 0 if config.tie_word_embeddings else model.embed_tokens.weight.numel()
    kv_per_token = config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * BFLOAT16_BYTES
    dense = config.num_hidden_layers - len(moe_layers)
    return {
        "family": "DeepSeek-V3",
        "total_parameters": total,
        "active_parameters": total - routed + used_routed - embedding,
        "layers": (
            f"{config.num_hidden_layers}: all full attention; {dense} dense, {len(moe_layers)} MoE "
            f"({config.n_routed_experts} routed experts, top {config.num_experts_per_tok}, {config.n_shared_experts} shared)"
        ),
        "attention": f"MLA, {config.num_attention_heads} heads, latent {config.kv_lora_rank} + RoPE key {config.qk_rope_head_dim}",
        "kv_bytes_per_token": kv_per_token,
        "kv_bytes_long_context": kv_per_token * LONG_CONTEXT,
        "weight_bytes": published_weight_bytes(model, config),
        "weight_format": weight_format(config),
    }


def published_weight_bytes(model: Model, config: Config) -> int:
    """Bytes of the weights as the checkpoint stores them, the multi-token-prediction layer excluded.

    An FP8 checkpoint stores every linear layer of the decoder layers in float8 (1 byte per weight)
    plus one float32 scale per block. The embedding, the LM head, the norms and the router are stored
    in config.dtype. load_model holds the same bytes with `keep_quantized` (--dtype auto), except
    for the router, which it holds in float32.
    """
    other_bytes = DTYPE_BYTES.get(config.dtype, BFLOAT16_BYTES)
    total = sum(p.numel() for p in model.parameters()) * other_bytes
    if config.weight_block_size is None:
        return total
    rows, cols = config.weight_block_size
    for module in model.layers.modules():
        if isinstance(module, nn.Linear):
            out_dim, in_dim = module.weight.shape
            scales = math.ceil(out_dim / rows) * math.ceil(in_dim / cols)
            total += module.weight.numel() * (1 - other_bytes) + scales * FP8_SCALE_BYTES
    return total


def weight_format(config: Config) -> str:
    if config.weight_block_size is None:
        return config.dtype
    rows, cols = config.weight_block_size
    return f"FP8 e4m3 linear layers with {rows} x {cols} block scales, {config.dtype} elsewhere"


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
    parser = argparse.ArgumentParser(description="Generate text with a DeepSeek-V3 checkpoint.")
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
    # With --dtype auto, FP8 weights stay FP8 in memory; an explicit --dtype dequantises them once, at load.
    model = load_model(folder, config, device, dtype, args.max_memory, keep_quantized=args.dtype == "auto")
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
