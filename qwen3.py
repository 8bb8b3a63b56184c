"""Qwen 3 in one file, dense and mixture-of-experts: config, layers, checkpoint loading, tokenizer, generation, CLI.

Qwen 3 (Qwen team, "Qwen3 Technical Report", arXiv:2505.09388, 2025) is a decoder-only transformer with:
- Llama's pre-norm block: RMSNorm, attention, residual; RMSNorm, SwiGLU MLP, residual;
- grouped-query attention with an explicit head_dim (Qwen3-0.6B: 16 heads of 128 on a hidden size of 1024)
  and a per-head RMSNorm on queries and keys before RoPE;
- in the MoE models (Qwen3-30B-A3B, Qwen3-235B-A22B) a softmax router that sends each token to its
  top-k experts, with no shared expert;
- optional YaRN RoPE scaling (Peng et al., arXiv:2309.00071) and sliding-window attention, both off
  in the published configs;
- optional dual chunk attention (DCA; An et al., "Training-Free Long-Context Scaling of Large Language
  Models", arXiv:2402.17463, 2024), which the 1M-token configs of the 2507 releases turn on with a
  `dual_chunk_attention_config`. transformers lacks it, so it follows vLLM's implementation instead.

This file matches `transformers`' Qwen3ForCausalLM and Qwen3MoeForCausalLM logit for logit;
test_parity.py proves it. Dual chunk attention is tested against a literal float64 version of the method.

    python qwen3.py --prompt "The capital of France is"
    python qwen3.py --chat --no-think --prompt "Write a haiku about tea."
    python qwen3.py --model Qwen/Qwen3-30B-A3B --chat --prompt "..." --device cuda
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_MODEL = "Qwen/Qwen3-0.6B"
MODEL_TYPES = ("qwen3", "qwen3_moe")  # dense checkpoints, mixture-of-experts checkpoints
END_OF_TURN = "<|im_end|>"  # the chat template closes every turn with this token


class UserError(Exception):
    """A problem with the user's input or checkpoint; the CLI prints it as one line, no traceback."""


# --------------------------------------------------------------------------------------------------
# Config


# Defaults of transformers' Qwen3Config and Qwen3MoeConfig (5.25), for keys a config.json may omit.
# Qwen3MoeConfig has no head_dim, so the MoE model uses hidden_size // num_attention_heads (None here).
# Neither has a default rope_theta of its own, so both take transformers' 10000.
QWEN3_DEFAULTS = {
    "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
    "max_position_embeddings": 32768, "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128,
    "attention_bias": False, "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28,
    "rope_theta": 10_000.0, "hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "bos_token_id": None, "eos_token_id": None,
}
QWEN3_MOE_DEFAULTS = {
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24,
    "max_position_embeddings": 32768, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": None,
    "attention_bias": False, "use_sliding_window": False, "sliding_window": 4096, "rope_theta": 10_000.0,
    "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": False,
    "decoder_sparse_step": 1, "mlp_only_layers": (), "hidden_act": "silu", "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "bos_token_id": None, "eos_token_id": None,
}


@dataclass
class Config:
    """Hyperparameters of a dense or MoE model; field names follow the checkpoint's config.json.

    The defaults describe the family's flagship, Qwen/Qwen3-235B-A22B.
    NOTE: they are its config.json values as recalled here, not read from the hub file. The
    parameter-count test checks them against Qwen's published sizes.
    """

    model_type: str = "qwen3_moe"
    # sizes
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 12288  # the dense MLP, also in the dense layers of MoE models
    num_hidden_layers: int = 94
    max_position_embeddings: int = 40960
    # attention
    num_attention_heads: int = 64
    num_key_value_heads: int = 4
    head_dim: int | None = 128  # None: hidden_size // num_attention_heads
    attention_bias: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 94  # dense models: layers from this index on slide when use_sliding_window is set
    layer_types: tuple[str, ...] = ()  # "sliding_attention" or "full_attention" per layer
    # RoPE
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None  # YaRN parameters ("factor", "original_max_position_embeddings", ...), or None
    # dual chunk attention: {"chunk_size", "local_size", "original_max_position_embeddings", ...}, or None
    dual_chunk_attention_config: dict | None = None
    # mixture of experts (num_experts = 0: every layer is dense)
    num_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 1536
    norm_topk_prob: bool = True  # rescale the top-k router probabilities to sum to 1
    decoder_sparse_step: int = 1  # layer i is sparse when (i + 1) % decoder_sparse_step == 0 ...
    mlp_only_layers: tuple[int, ...] = ()  # ... and i is not listed here
    # norms and output
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    # special tokens
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    dtype: str = "bfloat16"  # the dtype the checkpoint was saved in

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.mlp_only_layers = tuple(self.mlp_only_layers)
        if not self.use_sliding_window:
            self.sliding_window = None
        if not self.layer_types:
            if self.model_type == "qwen3_moe":
                # transformers' Qwen3-MoE applies the window to every layer and ignores max_window_layers.
                slides = [self.sliding_window is not None] * self.num_hidden_layers
            else:
                slides = [self.sliding_window is not None and i >= self.max_window_layers for i in range(self.num_hidden_layers)]
            self.layer_types = tuple("sliding_attention" if s else "full_attention" for s in slides)
        self.layer_types = tuple(self.layer_types)
        if self.dual_chunk_attention_config is not None:
            check_dual_chunk_config(self.dual_chunk_attention_config, self.sliding_window)

    def is_sparse(self, layer_idx: int) -> bool:
        """Return whether layer `layer_idx` has a mixture of experts in place of the dense MLP."""
        return (
            self.num_experts > 0
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    @classmethod
    def from_hf(cls, raw: dict) -> "Config":
        """Build a Config from a config.json dict of Qwen3ForCausalLM or Qwen3MoeForCausalLM."""
        raw = dict(raw)
        # RoPE settings come in two formats: `rope_parameters` (transformers >= 5) or the flat keys
        # `rope_theta` and `rope_scaling` (hub files).
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        if "rope_theta" in rope:
            raw["rope_theta"] = rope.pop("rope_theta")
        if rope_type == "yarn":
            raw["rope_scaling"] = rope
        elif rope_type == "default":
            raw["rope_scaling"] = None
        else:
            raise UserError(f"unsupported RoPE type {rope_type!r}; qwen3.py supports 'default' and 'yarn'")
        if raw.get("hidden_act", "silu") != "silu":
            raise UserError(f"unsupported activation {raw['hidden_act']!r}; Qwen 3 uses 'silu'")
        # transformers writes the expert count as `num_local_experts`, the hub files as `num_experts`.
        if "num_local_experts" in raw:
            raw.setdefault("num_experts", raw["num_local_experts"])

        raw["model_type"] = raw.get("model_type") or "qwen3"
        is_moe = raw["model_type"] == "qwen3_moe"
        # None stays only where it has a meaning; elsewhere it means "use the default".
        nullable = {"head_dim", "sliding_window", "rope_scaling", "dual_chunk_attention_config", "bos_token_id", "eos_token_id"}
        # A key that config.json leaves out means transformers' default for its model type, not this
        # file's flagship value.
        defaults = QWEN3_MOE_DEFAULTS if is_moe else QWEN3_DEFAULTS
        raw = {**defaults, **{k: v for k, v in raw.items() if v is not None or k in nullable}}
        if not is_moe:
            raw["num_experts"] = 0
        raw["dtype"] = raw.get("dtype") or raw.get("torch_dtype") or "float32"
        known = {f.name for f in fields(cls)}
        kept = {k: v for k, v in raw.items() if k in known and (v is not None or k in nullable)}
        return cls(**kept)


# --------------------------------------------------------------------------------------------------
# Tensor parallelism (torchrun)
#
# Under `torchrun --nproc-per-node N qwen3.py ...` each of the N ranks stores 1/N of the attention
# heads, of the MLP columns and of the vocabulary, and reads only those slices of the checkpoint.
# A column-parallel linear layer splits its output features across ranks, so it needs no
# communication. The row-parallel layer after it splits its input features and sums the partial
# products with one all-reduce. A mixture-of-experts layer splits its experts instead (expert
# parallelism): each rank runs its 1/N of them, and one all-reduce sums their outputs. A plain
# `python qwen3.py` run keeps world_size 1 and calls no torch.distributed function.

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
    """RMSNorm as in Llama: normalise in float32, cast back to the input dtype, then scale by w.

    (Gemma scales while still in float32; the two differ in bfloat16.)
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.type_as(x)


def rope_inv_freq(config: Config) -> tuple[torch.Tensor, float]:
    """Return RoPE's inverse frequencies theta^(-2i/d) (Su et al., 2021) and the factor on cos and sin.

    YaRN divides the low frequencies (long wavelengths) by `factor` and keeps the high ones. Between
    the dimensions that turn `beta_fast` and `beta_slow` times over the original context, a linear
    ramp blends the two. cos and sin are then scaled by the attention factor, 0.1 ln(factor) + 1 unless
    the config sets it (`attention_factor`, or `mscale` with `mscale_all_dim`).
    """
    dim, base = config.head_dim, config.rope_theta
    # Computed on the CPU even inside load_model's meta-device context, because arithmetic on meta
    # tensors imports torch._dynamo (about 1 s).
    wavelengths = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)  # each pair's wavelength / (2 pi)
    yarn = config.rope_scaling
    # Dual chunk attention keeps every relative position within the trained range, so it uses the
    # unscaled frequencies and ignores `rope_scaling`, as vLLM's get_rope does.
    if yarn is None or config.dual_chunk_attention_config is not None:
        return 1.0 / wavelengths, 1.0
    original = yarn.get("original_max_position_embeddings") or config.max_position_embeddings
    factor = yarn.get("factor") or config.max_position_embeddings / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = yarn.get("attention_factor")
    if attention_factor is None:
        if yarn.get("mscale") and yarn.get("mscale_all_dim"):
            attention_factor = mscale(factor, yarn["mscale"]) / mscale(factor, yarn["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)

    def dim_turning(turns: float) -> float:  # the dimension whose wavelength fits `turns` times into `original`
        return dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_turning(yarn.get("beta_fast") or 32), dim_turning(yarn.get("beta_slow") or 1)
    if yarn.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp
    # `keep` is 1 for the frequencies left as they are and 0 for those divided by `factor`.
    # The blend follows transformers' order of operations, so the result matches it bit for bit.
    keep = 1 - ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    inv_freq = 1.0 / (factor * wavelengths) * (1 - keep) + 1.0 / wavelengths * keep
    return inv_freq, float(attention_factor)


def rope_cos_sin(inv_freq: torch.Tensor, scale: float, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (T, head_dim) for the given positions, computed in float32, scaled, then cast."""
    angles = positions[:, None].float() * inv_freq[None, :]  # (T, head_dim/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, head_dim): both halves rotate by the same angle
    return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + d/2]) of each head by the position's angle ("half-rotated" layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


# --------------------------------------------------------------------------------------------------
# Dual chunk attention
#
# DCA (An et al., arXiv:2402.17463) lets a model attend over far more tokens than it was trained on
# without retraining: no query-key pair gets a relative position beyond `chunk_size`. The sequence
# is cut into chunks of chunk_len = chunk_size - local_size tokens. Keys rotate by their position
# within their chunk (position % chunk_len), and each query attends in three parts, with one rotation
# per part:
#   intra: the keys of its own chunk, causally. The query rotates by position % chunk_len as well, so
#          these relative positions are the true distances.
#   succ:  all keys of the previous chunk. The query rotates by min(position % chunk_len + chunk_len,
#          chunk_size). Queries up to `local_size` tokens into their chunk thus see the true distances,
#          and later queries are held at chunk_size, so no distance exceeds chunk_size.
#   inter: all keys of the chunks before that. The query rotates by min(2 * chunk_len - 1, chunk_size),
#          the same for every query, so every such key is seen at a distance of at most chunk_size.
# The three partial softmaxes are merged by their log-sum-exp. All of this follows vLLM's
# DualChunkRotaryEmbedding (vllm/model_executor/layers/rotary_embedding/dual_chunk_rope.py) and
# DualChunkFlashAttentionImpl (vllm/attention/backends/dual_chunk_flash_attn.py).
#
# NOTE: vLLM pairs DCA with a vertical-and-slash sparse attention (MInference) for prompts longer than
# `sparse_attention_threshold`, to make the prefill faster. It is left out here: every part attends
# to all of its keys, and the `sparse_attention_*` keys of the config are ignored.

# vLLM's defaults for keys that `dual_chunk_attention_config` leaves out (DualChunkFlashAttentionImpl);
# --dual-chunk-attention uses them for a checkpoint without the config.
DUAL_CHUNK_DEFAULTS = {"chunk_size": 8192, "local_size": 1024, "original_max_position_embeddings": 0}
SCORE_ELEMENTS = 2**26  # attention scores a DCA query block may hold at once (256 MiB in float32)
# The static decode step of --compile has no DCA version, because DCA computes its length factor and
# the key range of each part on the host from the position.
DCA_COMPILE_ERROR = "--compile does not support dual chunk attention (dual_chunk_attention_config or --dual-chunk-attention); drop --compile"


@dataclass(frozen=True)
class DualChunk:
    """Dual chunk attention settings, read from config.json's `dual_chunk_attention_config`."""

    chunk_size: int
    local_size: int
    original_max_position_embeddings: int  # 0: no length-dependent attention scaling

    @classmethod
    def from_config(cls, raw: dict) -> "DualChunk":
        return cls(**{key: int(raw.get(key, default)) for key, default in DUAL_CHUNK_DEFAULTS.items()})

    @property
    def chunk_len(self) -> int:
        """Tokens per chunk; the last `local_size` positions of a chunk are kept for the successive part."""
        return self.chunk_size - self.local_size

    def length_factor(self, seq_len: int) -> float:
        """vLLM's factor on queries and keys for a sequence of seq_len tokens: 0.1 ln(seq_len / original) + 1, at least 1.

        It is YaRN's attention factor with the scale taken from the actual length, and it is 1
        while the sequence fits in original_max_position_embeddings, or when that is 0.
        """
        if self.original_max_position_embeddings <= 0 or seq_len <= self.original_max_position_embeddings:
            return 1.0
        return 0.1 * math.log(seq_len / self.original_max_position_embeddings) + 1.0


def check_dual_chunk_config(raw: dict, sliding_window: int | None) -> None:
    """Raise UserError unless `dual_chunk_attention_config` describes chunks this file can run."""
    if not isinstance(raw, dict):
        raise UserError(f"dual_chunk_attention_config must be a JSON object, got {raw!r}")
    for key, default in DUAL_CHUNK_DEFAULTS.items():
        value = raw.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise UserError(f"dual_chunk_attention_config: {key} = {value!r} is invalid; it must be an integer >= 0")
    settings = DualChunk.from_config(raw)
    if settings.chunk_len <= 0:
        raise UserError(
            f"dual_chunk_attention_config: local_size {settings.local_size} must be smaller than chunk_size {settings.chunk_size}"
        )
    if sliding_window is not None:
        # vLLM's dual-chunk backend rejects sliding windows too.
        raise UserError("dual chunk attention cannot be combined with sliding-window attention; set use_sliding_window to false")


def dual_chunk_rope(inv_freq: torch.Tensor, positions: torch.Tensor, dca: DualChunk, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Return cos and sin tables (T, head_dim) for the keys and intra-chunk queries, the successive-chunk queries and the inter-chunk queries.

    The rotated positions are those of vLLM's DualChunkRotaryEmbedding: the key and intra position
    is position % chunk_len, and the successive-chunk position adds chunk_len to it, clamped at
    chunk_size. The inter-chunk position is the successive-chunk position of a chunk's last token.
    """
    within = positions % dca.chunk_len  # (T,)
    succ = (within + dca.chunk_len).clamp(max=dca.chunk_size)
    inter = torch.full_like(within, min(2 * dca.chunk_len - 1, dca.chunk_size))
    return [rope_cos_sin(inv_freq, 1.0, p, dtype) for p in (within, succ, inter)]


def attention_part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal_from: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of queries q (B, nh, Tq, hd) over keys and values (B, nkv, Sk, hd), in float32.

    Returns the output (B, nh, Tq, hd) and the log-sum-exp of the scaled scores (B, nh, Tq), which
    merge_attention_parts needs. With `causal_from` = c, query i attends to keys 0..c + i only.
    """
    B, nh, Tq, hd = q.shape
    nkv, Sk = k.shape[1], k.shape[2]
    q = q.float().view(B, nkv, nh // nkv, Tq, hd)  # each key head serves nh // nkv query heads
    scores = q @ k.float()[:, :, None].transpose(-1, -2) * scale  # (B, nkv, nh // nkv, Tq, Sk)
    if causal_from is not None:
        key_index = torch.arange(Sk, device=q.device)
        query_index = torch.arange(Tq, device=q.device)[:, None]
        scores = scores.masked_fill(key_index > causal_from + query_index, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # (B, nkv, nh // nkv, Tq, 1)
    out = torch.exp(scores - lse) @ v.float()[:, :, None]  # (B, nkv, nh // nkv, Tq, hd)
    return out.view(B, nh, Tq, hd), lse.view(B, nh, Tq)


def merge_attention_parts(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Combine attention over disjoint key sets into attention over their union.

    Each part (out, lse) is a softmax over its own keys, so its weight in the union is
    exp(lse - logsumexp(all lse)): the share of the total exponentiated score that its keys hold.
    """
    outs = torch.stack([out for out, _ in parts])  # (parts, B, nh, Tq, hd)
    lses = torch.stack([lse for _, lse in parts])  # (parts, B, nh, Tq)
    weights = torch.exp(lses - torch.logsumexp(lses, dim=0))  # (parts, B, nh, Tq), summing to 1
    return (outs * weights[..., None]).sum(dim=0)


def dual_chunk_attention(
    q: torch.Tensor, q_succ: torch.Tensor, q_inter: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int, chunk_len: int, scale: float
) -> torch.Tensor:
    """Dual chunk attention of the new tokens at positions start_pos.. over every key of the sequence.

    q, q_succ and q_inter (B, nh, T, hd) are the queries rotated for the intra-chunk, successive-chunk
    and inter-chunk parts. k and v (B, nkv, S, hd) cover positions 0..S-1, with S = start_pos + T.
    Returns the output (B, nh, T, hd) in float32. Queries go in blocks that stay within one chunk,
    so that the keys of each part are the same for every query of a block.
    """
    B, nh, T, _ = q.shape
    end_pos = start_pos + T
    rows_per_block = max(1, SCORE_ELEMENTS // (B * nh * end_pos))
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    first = start_pos  # position of the block's first query
    while first < end_pos:
        chunk_start = first // chunk_len * chunk_len
        last = min(chunk_start + chunk_len, end_pos, first + rows_per_block)  # one past the block's last query
        rows = slice(first - start_pos, last - start_pos)
        # intra: the query's own chunk, up to the query itself
        parts = [attention_part(q[:, :, rows], k[:, :, chunk_start:last], v[:, :, chunk_start:last], scale, first - chunk_start)]
        if chunk_start >= chunk_len:  # succ: the whole previous chunk
            previous = slice(chunk_start - chunk_len, chunk_start)
            parts.append(attention_part(q_succ[:, :, rows], k[:, :, previous], v[:, :, previous], scale, None))
        if chunk_start >= 2 * chunk_len:  # inter: every chunk before the previous one
            earlier = slice(0, chunk_start - chunk_len)
            parts.append(attention_part(q_inter[:, :, rows], k[:, :, earlier], v[:, :, earlier], scale, None))
        out[:, :, rows] = merge_attention_parts(parts)
        first = last
    return out


class Attention(nn.Module):
    """Grouped-query attention with per-head QK-norm before RoPE and an optional sliding window or dual chunk attention."""

    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        self.n_heads = split_evenly(config.num_attention_heads, "attention heads")  # this rank's query heads
        kv_first, self.n_kv_heads = kv_heads_of_rank(config.num_key_value_heads)
        self.head_dim = config.head_dim
        is_sliding = config.layer_types[layer_idx] == "sliding_attention"
        self.window = config.sliding_window if is_sliding else None
        dca = config.dual_chunk_attention_config
        self.dual_chunk = None if dca is None else DualChunk.from_config(dca)
        bias = config.attention_bias
        hd, kv_rows = self.head_dim, config.num_key_value_heads * self.head_dim
        self.q_proj = ColumnParallelLinear(config.hidden_size, config.num_attention_heads * hd, bias=bias)
        self.k_proj = ColumnParallelLinear(config.hidden_size, kv_rows, bias=bias, first=kv_first * hd, local=self.n_kv_heads * hd)
        self.v_proj = ColumnParallelLinear(config.hidden_size, kv_rows, bias=bias, first=kv_first * hd, local=self.n_kv_heads * hd)
        self.o_proj = RowParallelLinear(config.num_attention_heads * hd, config.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: "int | torch.Tensor", kv: "LayerCache | None", dca_query_rope: list | None = None
    ) -> torch.Tensor:
        """Attend from the T new tokens at positions start_pos.. to themselves and the cached ones.

        With dual chunk attention, cos and sin rotate the keys and intra-chunk queries, and
        dca_query_rope contains the (cos, sin) tables of the successive-chunk and inter-chunk queries.
        """
        B, T, _ = x.shape  # batch, new tokens, hidden size
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = self.q_norm(q), self.k_norm(k)  # each head is normalised on its own, before RoPE
        end_pos = start_pos + T
        # DCA's length factor multiplies the keys before they are cached, and the queries through the
        # softmax scale, as in vLLM's DualChunkFlashAttentionImpl.forward and _dual_chunk_flash_attn_prefill_func.
        # A cached key thus keeps the factor of the step that wrote it.
        # NOTE: the factor depends on the whole length, so once it exceeds 1, cached decoding no longer
        # equals a full pass over the same tokens, in vLLM as here. A prompt prefilled in several calls
        # also gets the factor of each call's end, where vLLM uses the whole prompt's length.
        # The static decode step runs without DCA (Model.forward rejects it), so its factor is 1.
        factor = 1.0 if self.dual_chunk is None else self.dual_chunk.length_factor(end_pos)
        if self.dual_chunk is not None and end_pos > self.dual_chunk.chunk_len:
            out = self.attend_dual_chunk(q, k, v, cos, sin, dca_query_rope, start_pos, kv, factor)
            return self.o_proj(out.to(x.dtype).transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
        # Without DCA, or while the sequence fits in DCA's first chunk: there only the intra-chunk part
        # exists, and its rotation by position % chunk_len is the plain one, so plain causal attention
        # is dual chunk attention.
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        scale = None  # SDPA's default, 1 / sqrt(head_dim)
        if factor != 1.0:
            k, scale = k * factor, factor / math.sqrt(self.head_dim)
        if isinstance(start_pos, torch.Tensor):
            k, v, mask = self.keys_of_static_step(k, v, start_pos, kv)
        else:
            k, v, mask = self.visible_keys(k, v, start_pos, kv)
        # Without a mask, a prompt that starts the sequence and fits the window needs the plain causal
        # mask, which the fused kernels build themselves.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, scale=scale, enable_gqa=True)  # (B, nh, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def visible_keys(self, k: torch.Tensor, v: torch.Tensor, start_pos: int, kv: "LayerCache | None"):
        """Cache the new keys and values; return the keys and values the new queries may see, and the mask.

        Keys before `first_key` are outside every new query's window, so they are not read at all.
        The mask is None when every returned key is visible, as for one decoded token, and for a
        prompt that starts the sequence and fits the window, which needs only the causal mask.
        """
        T = k.shape[2]
        end_pos = start_pos + T
        first_key = 0 if self.window is None else max(0, start_pos - self.window + 1)
        if kv is not None:
            k, v = kv.update(k, v, start_pos, first_key)  # (B, nkv, S, hd), S = end_pos - first_key
        if T == 1 or (start_pos == 0 and (self.window is None or T <= self.window)):
            return k, v, None
        q_pos = torch.arange(start_pos, end_pos, device=k.device)[:, None]
        k_pos = torch.arange(first_key, end_pos, device=k.device)[None, :]
        mask = k_pos <= q_pos  # (T, S) causal
        if self.window is not None:
            mask &= k_pos > q_pos - self.window  # the window covers `window` keys, the query's own included
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

    def attend_dual_chunk(self, q, k, v, cos, sin, dca_query_rope, start_pos, kv, factor: float) -> torch.Tensor:
        """Dual chunk attention for a sequence longer than one chunk; returns (B, nh, T, hd) in float32."""
        (succ_cos, succ_sin), (inter_cos, inter_sin) = dca_query_rope
        q_intra, q_succ, q_inter = apply_rope(q, cos, sin), apply_rope(q, succ_cos, succ_sin), apply_rope(q, inter_cos, inter_sin)
        k = apply_rope(k, cos, sin)  # each key rotates by its position within its chunk
        if factor != 1.0:
            k = k * factor
        if kv is not None:
            k, v = kv.update(k, v, start_pos, 0)  # (B, nkv, S, hd), S = end_pos: the inter part reads every earlier key
        scale = factor / math.sqrt(self.head_dim)
        return dual_chunk_attention(q_intra, q_succ, q_inter, k, v, start_pos, self.dual_chunk.chunk_len, scale)


class MLP(nn.Module):
    """SwiGLU MLP (Shazeer, 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = ColumnParallelLinear(hidden_size, intermediate_size)
        self.up_proj = ColumnParallelLinear(hidden_size, intermediate_size)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """All experts of one MoE layer as stacked SwiGLU weights, in the layout transformers keeps in memory.

    gate_up_proj is (E, 2I, H): each expert's gate rows, then its up rows. down_proj is (E, H, I).
    The hub files store every expert separately; load_model stacks them. Under expert parallelism
    E is this rank's share of the experts: `shard` = (0, first, total) as for the parallel layers.
    """

    def __init__(self, config: Config):
        super().__init__()
        E, I, H = split_evenly(config.num_experts, "experts"), config.moe_intermediate_size, config.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))
        self.shard = (0, rank * E, config.num_experts)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Mix the outputs of this rank's chosen experts for tokens x (N, H), with expert_ids and weights (N, k).

        Pairs routed to another rank's experts are left out; SparseMoE sums the ranks' outputs.
        """
        N, k = expert_ids.shape
        E = self.gate_up_proj.shape[0]
        local_ids = expert_ids.flatten() - self.shard[1]  # index among this rank's experts
        local_ids = local_ids.masked_fill((local_ids < 0) | (local_ids >= E), E)  # another rank's expert becomes E, which sorts last
        # Group the N * k (token, expert) pairs by expert, so each expert runs once on all of its tokens.
        order = local_ids.argsort(stable=True)  # (N * k,) pair indices, grouped by expert
        counts = torch.bincount(local_ids, minlength=E + 1).tolist()
        order = order[: order.numel() - counts.pop()]  # this rank's pairs only
        tokens = order // k  # the token of each pair
        rows = x[tokens]  # (pairs, H)
        out = torch.empty_like(rows)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            end = start + count
            gate, up = F.linear(rows[start:end], self.gate_up_proj[expert]).chunk(2, dim=-1)  # (count, I) each
            out[start:end] = F.linear(F.silu(gate) * up, self.down_proj[expert])
            start = end
        out = out * weights.flatten()[order, None]
        return torch.zeros_like(x).index_add_(0, tokens, out)  # (N, H): each token sums its k experts

    def forward_chosen(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Like forward, for the static decode step: no count of tokens per expert reaches the host.

        The chosen experts' matrices are gathered by indexing and multiplied in one batch, so the
        shapes do not depend on the routing.
        """
        E = self.gate_up_proj.shape[0]
        local_ids = expert_ids - self.shard[1]  # (N, k)
        mine = (local_ids >= 0) & (local_ids < E)  # under expert parallelism, the other experts are on other ranks
        local_ids = local_ids.clamp(0, E - 1)
        gate_up = (self.gate_up_proj[local_ids] @ x[:, None, :, None]).squeeze(-1)  # (N, k, 2I)
        gate, up = gate_up.chunk(2, dim=-1)  # (N, k, I) each
        out = (self.down_proj[local_ids] @ (F.silu(gate) * up)[..., None]).squeeze(-1)  # (N, k, H)
        return (out * (weights * mine)[..., None]).sum(dim=1)  # (N, H)


class SparseMoE(nn.Module):
    """Softmax router over all experts, then each token's top-k experts, weighted by their probabilities."""

    def __init__(self, config: Config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)  # the router, whole on every rank
        self.experts = Experts(config)

    def forward(self, x: torch.Tensor, static: bool = False) -> torch.Tensor:
        """Mix each token's top-k experts. With `static` (the --compile decode step), they run without a host sync."""
        B, T, C = x.shape
        x = x.reshape(B * T, C)
        probs = torch.softmax(self.gate(x), dim=-1, dtype=torch.float32)  # (N, E), softmax in float32
        weights, expert_ids = torch.topk(probs, self.top_k, dim=-1)  # (N, k)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        experts = self.experts.forward_chosen if static else self.experts
        return all_reduce(experts(x, expert_ids, weights.to(x.dtype))).view(B, T, C)  # the sum of every rank's experts


class Block(nn.Module):
    """One pre-norm decoder layer: attention, then a dense MLP or a mixture of experts."""

    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = SparseMoE(config) if config.is_sparse(layer_idx) else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, start_pos, kv, dca_query_rope=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start_pos, kv, dca_query_rope)
        if isinstance(self.mlp, SparseMoE):
            # A tensor start_pos is the static decode step, whose routing must stay on the device.
            return x + self.mlp(self.post_attention_layernorm(x), static=isinstance(start_pos, torch.Tensor))
        return x + self.mlp(self.post_attention_layernorm(x))


class Model(nn.Module):
    """The Qwen 3 decoder with its LM head; module names match the checkpoint's tensor names."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.embed_tokens = ParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # The LM head reuses the embedding matrix unless the checkpoint has its own; both are split by vocabulary.
        self.lm_head = None if config.tie_word_embeddings else ColumnParallelLinear(config.hidden_size, config.vocab_size)
        inv_freq, self.rope_scale = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        dca = config.dual_chunk_attention_config
        self.dual_chunk = None if dca is None else DualChunk.from_config(dca)

    def forward(self, tokens: torch.Tensor, cache: "KVCache | None" = None, start_pos: "int | torch.Tensor" = 0, last_only: bool = False) -> torch.Tensor:
        """Return logits (B, T, vocab) for `tokens` (B, T) at positions start_pos.. (only the last one if `last_only`).

        A 0-d tensor `start_pos` runs the static-shape decode step of --compile: one token, with a
        cache, and without dual chunk attention.
        """
        if isinstance(start_pos, torch.Tensor) and self.dual_chunk is not None:
            raise UserError(DCA_COMPILE_ERROR)
        x = self.embed_tokens(tokens)  # (B, T, C)
        positions = start_pos + torch.arange(tokens.shape[1], device=tokens.device)
        dca_query_rope = None
        if self.dual_chunk is None:
            cos, sin = rope_cos_sin(self.inv_freq, self.rope_scale, positions, x.dtype)
        else:
            (cos, sin), *dca_query_rope = dual_chunk_rope(self.inv_freq, positions, self.dual_chunk, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, start_pos, None if cache is None else cache.layers[i], dca_query_rope)
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
PREFIX = "model."  # every tensor but lm_head.weight lives under it
EXPERT_PARTS = ("gate_proj", "up_proj", "down_proj")


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
    if raw.get("model_type") not in MODEL_TYPES:
        found = raw.get("model_type") or raw.get("architectures") or "unknown"
        raise UserError(f"{source} is a {found!r} checkpoint, not Qwen 3 ({', '.join(MODEL_TYPES)}); use the model file for its family")
    if raw.get("quantization_config"):
        method = raw["quantization_config"].get("quant_method", "quantised")
        raise UserError(f"{source} contains {method}-quantised weights, which qwen3.py cannot load; use the bfloat16 checkpoint")


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


def parameter_name(key: str, config: Config) -> tuple[str, tuple | None] | None:
    """Map a checkpoint tensor name to (this file's parameter name, the part of it the tensor fills).

    The part is None for a whole parameter. The hub stores each expert on its own,
    `layers.N.mlp.experts.{e}.{gate,up,down}_proj.weight`; those fill one slice of the stacked
    `gate_up_proj` (gate rows first, then up rows) or `down_proj`. None means the tensor is not used,
    as for the experts of another rank under expert parallelism.
    """
    if key == "lm_head.weight":
        return None if config.tie_word_embeddings else ("lm_head.weight", None)
    name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
    head, sep, tail = name.partition(".mlp.experts.")
    expert, _, part = tail.partition(".")
    if sep and expert.isdigit() and int(expert) < config.num_experts and part.removesuffix(".weight") in EXPERT_PARTS:
        local = split_evenly(config.num_experts, "experts")
        e, part, I = int(expert) - rank * local, part.removesuffix(".weight"), config.moe_intermediate_size
        if not 0 <= e < local:  # another rank's expert
            return None
        if part == "down_proj":
            return f"{head}.mlp.experts.down_proj", (e,)
        rows = slice(0, I) if part == "gate_proj" else slice(I, 2 * I)
        return f"{head}.mlp.experts.gate_up_proj", (e, rows)
    return name, None


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
    stays near the size of the weights in the target dtype. A per-expert tensor is read on its own,
    then copied into its slice of the stacked expert weights. Under torchrun each rank reads only
    its own slices and experts. Loading is strict: a missing, unexpected or misshapen tensor raises
    an error that names it. `max_memory` (GiB per rank) replaces the device's free memory in the fit check.
    """
    with torch.device("meta"):
        model = Model(config)
    check_fit(sum(p.numel() for p in model.parameters()) * dtype.itemsize, device, max_memory)
    expected = dict(model.named_parameters())
    filled: dict[str, int] = {}  # parameter name -> elements written so far
    for file in checkpoint_files(folder):
        with SafetensorsFile(file) as f:
            for key in f.keys():
                target = parameter_name(key, config)
                if target is None:
                    continue
                name, part = target
                if name not in expected:
                    raise UserError(f"unexpected tensor {key} in {file.name}; is this a Qwen 3 checkpoint?")
                full_shape, shard = checkpoint_slice(model, name)
                want = full_shape if part is None else tuple(expected[name][part].shape)
                if f.shape(key) != want:
                    raise UserError(f"tensor {key} has shape {f.shape(key)}, expected {want} from config.json")
                if part is None:
                    set_parameter(model, name, f.read(key, dtype, device, column_major=use_column_major(want, dtype, device), shard=shard))
                else:
                    if name not in filled:  # the first expert of this layer: allocate the stacked tensor
                        set_parameter(model, name, torch.empty(expected[name].shape, dtype=dtype, device=device))
                    model.get_parameter(name)[part].copy_(f.read(key, dtype, device))
                filled[name] = filled.get(name, 0) + (expected[name].numel() if part is None else math.prod(want))
    missing = sorted(name for name, param in expected.items() if filled.get(name, 0) < param.numel())
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"checkpoint {folder} lacks tensor {missing[0]}{more}")
    # rope_inv_freq computed the RoPE frequencies on the CPU, so compute them again on the weights' device.
    model.inv_freq = rope_inv_freq(config)[0].to(device)
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
    if model.dual_chunk is not None:
        raise UserError(DCA_COMPILE_ERROR)
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
    storage. The counts include the embedding and the LM head, as Qwen's published sizes do
    (Qwen3-235B-A22B: 235B total, 22B activated). The active count takes every parameter outside
    the experts, plus num_experts_per_tok of the num_experts experts in each MoE layer. The KV cache
    figures are what the architecture needs in bfloat16: a sliding-window layer never needs more
    than `sliding_window` positions. Dual chunk attention keeps every key, so it caches as full
    attention does.
    """
    with torch.device("meta"):
        model = Model(config)
    total = sum(p.numel() for p in model.parameters())  # a tied LM head is the embedding, counted once
    unused_experts = 0
    for layer in model.layers:
        if isinstance(layer.mlp, SparseMoE):
            experts = sum(p.numel() for p in layer.mlp.experts.parameters())
            unused_experts += experts // config.num_experts * (config.num_experts - config.num_experts_per_tok)
    kv_per_position = 2 * config.num_key_value_heads * config.head_dim * BFLOAT16_BYTES  # keys and values
    full = config.layer_types.count("full_attention")
    sliding = config.layer_types.count("sliding_attention")
    if config.dual_chunk_attention_config is not None:
        attention_kind = f"all dual chunk attention (chunks of {DualChunk.from_config(config.dual_chunk_attention_config).chunk_size})"
    elif sliding:
        attention_kind = f"{sliding} sliding-window ({config.sliding_window}), {full} full"
    else:
        attention_kind = "all full attention"
    sparse = sum(config.is_sparse(i) for i in range(config.num_hidden_layers))
    experts = f"; {sparse} MoE ({config.num_experts_per_tok} of {config.num_experts} experts per token)" if sparse else ""
    window = min(config.sliding_window or 0, LONG_CONTEXT)
    return {
        "family": "Qwen 3 MoE" if sparse else "Qwen 3",
        "total_parameters": total,
        "active_parameters": total - unused_experts,
        "layers": f"{config.num_hidden_layers}: {attention_kind}{experts}",
        "attention": f"GQA, {config.num_attention_heads} query / {config.num_key_value_heads} KV heads of {config.head_dim}, QK-norm",
        "kv_bytes_per_token": full * kv_per_position,
        "kv_bytes_long_context": (full * LONG_CONTEXT + sliding * window) * kv_per_position,
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
    parser = argparse.ArgumentParser(description="Generate text with a Qwen 3 checkpoint, dense or MoE.")
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
    parser.add_argument(
        "--no-think",
        action="store_true",
        help="with --chat or --interactive: render the template with enable_thinking=False, so the model replies without a thinking block",
    )
    parser.add_argument(
        "--dual-chunk-attention",
        action="store_true",
        help="use dual chunk attention even if config.json has no dual_chunk_attention_config, with vLLM's defaults "
        f"(chunk_size {DUAL_CHUNK_DEFAULTS['chunk_size']}, local_size {DUAL_CHUNK_DEFAULTS['local_size']} tokens); "
        "the context limit stays max_position_embeddings",
    )
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
    template_variables: dict = field(default_factory=dict)  # passed to the chat template, e.g. enable_thinking=False
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
    if args.dual_chunk_attention and config.dual_chunk_attention_config is None:
        config = replace(config, dual_chunk_attention_config=dict(DUAL_CHUNK_DEFAULTS))
    if args.compile and config.dual_chunk_attention_config is not None:
        raise UserError(DCA_COMPILE_ERROR)  # before the weights are read
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
    template_variables = {"enable_thinking": False} if args.no_think else {}
    decode_step = compile_decode_step(model) if args.compile else None
    if args.compile:
        log("--compile: torch.compile builds the decode step while the second token is generated (tens of seconds); the tokens/s figure includes that time")
    return Session(model, tokenizer, config, args.max_new_tokens, sampling, stops, args.seed, time.perf_counter() - started, template_variables, decode_step)


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
    if args.chat:
        prompt = tokenizer.encode_chat([{"role": "user", "content": args.prompt}], **session.template_variables)
    else:
        prompt = tokenizer.encode(args.prompt)
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
        ids = self.session.tokenizer.encode_chat(self.messages, **self.session.template_variables)
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
        config = read_config_only(args.model)
        if args.dual_chunk_attention and config.dual_chunk_attention_config is None:
            config = replace(config, dual_chunk_attention_config=dict(DUAL_CHUNK_DEFAULTS))
        if is_rank_zero():
            print(format_description(describe(config)))
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
    if args.no_think and not (args.chat or args.interactive):
        raise UserError("--no-think only changes the chat template; add --chat (or use --interactive)")
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
