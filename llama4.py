"""Llama 4 text model in one file: config, layers, checkpoint loading, tokenizer, generation, CLI.

Llama 4 (Meta, "The Llama 4 herd", 2025) is a decoder-only mixture-of-experts transformer with:
- "iRoPE": most layers use RoPE with chunked local attention (a query sees only the keys of its own
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
import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Iterator

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


@dataclass
class Config:
    """Hyperparameters of the text model; field names follow the checkpoint's config.json.

    The defaults are those of transformers' Llama4TextConfig, which describes
    meta-llama/Llama-4-Scout-17B-16E, plus Scout's llama3 RoPE scaling and special tokens.
    """

    # sizes
    vocab_size: int = 202048
    hidden_size: int = 5120
    intermediate_size: int = 8192  # each routed expert and the shared expert
    intermediate_size_mlp: int = 16384  # the dense MLP of non-MoE layers
    num_hidden_layers: int = 48
    max_position_embeddings: int = 131072
    # attention
    num_attention_heads: int = 40
    num_key_value_heads: int = 8
    head_dim: int = 128
    attention_chunk_size: int | None = 8192  # None: every layer attends to the whole causal context
    no_rope_layers: tuple[int, ...] = ()  # per layer: 1 uses RoPE (and chunked attention), 0 is a NoPE layer
    no_rope_layer_interval: int = 4  # without `no_rope_layers`, every fourth layer is NoPE
    layer_types: tuple[str, ...] = ()  # "chunked_attention" or "full_attention" per layer
    use_qk_norm: bool = True  # RoPE layers only
    attn_temperature_tuning: bool = True  # NoPE layers only
    floor_scale: int = 8192
    attn_scale: float = 0.1
    # RoPE: llama3 scaling divides the low frequencies by `rope_scaling_factor` and blends the middle ones
    rope_theta: float = 500_000.0
    rope_type: str = "llama3"  # "llama3" or "default" (no scaling)
    rope_scaling_factor: float = 16.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 1.0
    original_max_position_embeddings: int = 8192
    # mixture of experts
    num_local_experts: int = 16
    num_experts_per_tok: int = 1
    interleave_moe_layer_step: int = 1  # without `moe_layers`, every step-th layer is MoE
    moe_layers: tuple[int, ...] | None = None
    # norms and output
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    # special tokens
    bos_token_id: int = 200000  # <|begin_of_text|>
    eos_token_id: int | list[int] = 200001  # <|end_of_text|>
    dtype: str = "bfloat16"  # the dtype the checkpoint was saved in

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
        if text.get("head_dim") is None and "hidden_size" in text and "num_attention_heads" in text:
            text["head_dim"] = text["hidden_size"] // text["num_attention_heads"]
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
        known = {f.name for f in fields(cls)}
        # None stays only where it has a meaning (no chunking); elsewhere it means "use the default".
        kept = {k: v for k, v in text.items() if k in known and (v is not None or k == "attention_chunk_size")}
        return cls(**kept)


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
    exponents = torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim
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
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
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
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int, kv: "LayerCache | None") -> torch.Tensor:
        B, T, _ = x.shape  # batch, new tokens, hidden size
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        end_pos = start_pos + T
        if self.use_rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.use_qk_norm:
            # No learned weight: every head of q and k is scaled to unit RMS, after RoPE.
            q, k = rms_normalize(q, self.eps), rms_normalize(k, self.eps)
        if self.temperature_tuning:
            # NoPE layers have no positions, so they sharpen attention at long range by scaling the
            # queries by 1 + attn_scale * ln(1 + floor((pos + 1) / floor_scale)). Below floor_scale the scale is 1.
            positions = torch.arange(start_pos, end_pos, device=x.device, dtype=torch.float32)
            scales = torch.log1p(torch.floor((positions + 1.0) / self.floor_scale)) * self.attn_scale + 1.0  # (T,)
            q = (q * scales[:, None]).to(q.dtype)

        # Keys before the first query's chunk are outside every new query's chunk, so they are not read at all.
        first_key = 0 if self.chunk is None else start_pos // self.chunk * self.chunk
        if kv is not None:
            k, v = kv.update(k, v, start_pos, first_key)  # (B, nkv, S, hd), S = end_pos - first_key
        q_pos = torch.arange(start_pos, end_pos, device=x.device)[:, None]
        k_pos = torch.arange(first_key, end_pos, device=x.device)[None, :]
        mask = k_pos <= q_pos  # (T, S) causal
        if self.chunk is not None:
            mask &= k_pos // self.chunk == q_pos // self.chunk  # chunks are fixed blocks of positions, not a sliding window
        # One decoded token sees every key it is given, so it needs no mask.
        attn_mask = None if mask.all() else mask
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale, enable_gqa=True)  # (B, nh, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """Gated MLP with SiLU (SwiGLU): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: Config, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """The routed experts' SwiGLU weights, stacked along a first expert axis as the checkpoint stores them.

    Unlike nn.Linear the matrices are (in, out): an expert computes x @ W. The first
    intermediate_size columns of gate_up_proj are the gate, the rest the up projection.
    """

    def __init__(self, config: Config):
        super().__init__()
        E, C, I = config.num_local_experts, config.hidden_size, config.intermediate_size  # experts, hidden, expert width
        self.gate_up_proj = nn.Parameter(torch.empty(E, C, 2 * I))
        self.down_proj = nn.Parameter(torch.empty(E, I, C))

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Run rows of x (N, C), sorted by expert, through their experts: counts[e] rows go to expert e."""
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
        self.shared_expert = MLP(config, config.intermediate_size)

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
        routed = self.experts(x[token_of] * scores.flatten()[order, None], counts)  # (N * k, C)
        out = self.shared_expert(x).index_add(0, token_of, routed)  # (N, C)
        return out.view(B, T, C)


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
        x = x + self.feed_forward(self.post_attention_layernorm(x))
        return x


class Model(nn.Module):
    """The Llama 4 text decoder with its LM head; module names match the checkpoint's tensor names."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # The LM head is a separate matrix unless the config ties it to the embedding.
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def forward(self, tokens: torch.Tensor, cache: "KVCache | None" = None, start_pos: int = 0, last_only: bool = False) -> torch.Tensor:
        """Return logits (B, T, vocab) for `tokens` (B, T) at positions start_pos.. (only the last one if `last_only`)."""
        x = self.embed_tokens(tokens)  # (B, T, C)
        positions = torch.arange(start_pos, start_pos + tokens.shape[1], device=tokens.device)
        # float32 tables: apply_rope rotates in float32 whatever the activation dtype.
        cos, sin = rope_cos_sin(self.inv_freq, positions, torch.float32)  # (T, head_dim/2) each
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, start_pos, None if cache is None else cache.layers[i])
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        return F.linear(x, self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight)


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


def read_config(folder: Path) -> tuple[Config, dict]:
    """Return the Config and the generation settings (generation_config.json, or {}) of a checkpoint folder."""
    config_file = folder / "config.json"
    if not config_file.exists():
        raise UserError(f"{folder} has no config.json; pass a Hugging Face checkpoint folder")
    raw = json.loads(config_file.read_text())
    check_architecture(raw, str(folder))
    generation_file = folder / "generation_config.json"
    generation = json.loads(generation_file.read_text()) if generation_file.exists() else {}
    return Config.from_hf(raw), generation


def checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
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
READ_CHUNK_BYTES = 64 * 2**20


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
        header_size = int.from_bytes(self.file.read(8), "little")
        self.header = json.loads(self.file.read(header_size))
        self.header.pop("__metadata__", None)
        self.data_start = 8 + header_size

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.header[key]["dtype"]]

    def read(self, key: str, dtype: torch.dtype | None = None, device: torch.device = torch.device("cpu"), column_major: bool = False) -> torch.Tensor:
        """Read tensor `key`, cast to `dtype` (default: as stored), onto `device`.

        A column-major matrix keeps its (out, in) shape; only its strides differ.
        """
        entry = self.header[key]
        shape = self.shape(key)
        source_dtype = self.dtype(key)
        dtype = dtype or source_dtype
        begin, end = entry["data_offsets"]
        if column_major:
            out = torch.empty(shape[::-1], dtype=dtype, device=device).t()  # (out, in) view of (in, out) storage
        else:
            out = torch.empty(shape, dtype=dtype, device=device)
        if out.numel() == 0:
            return out
        rows = out.view(1, -1) if out.ndim == 0 else out  # a scalar is one row
        row_bytes = (end - begin) // rows.shape[0]
        step = max(1, READ_CHUNK_BYTES // row_bytes)
        for first in range(0, rows.shape[0], step):
            count = min(step, rows.shape[0] - first)
            buffer = bytearray(count * row_bytes)
            self.file.seek(self.data_start + begin + first * row_bytes)
            self.file.readinto(buffer)
            rows[first : first + count] = torch.frombuffer(buffer, dtype=source_dtype).view(count, *rows.shape[1:])
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def load_model(folder: Path, config: Config, device: torch.device, dtype: torch.dtype) -> Model:
    """Build the model on the meta device, then fill it tensor by tensor from the safetensors files.

    Each tensor is read in chunks straight into its final dtype, device and layout, so peak memory
    stays near the size of the weights in the target dtype. Loading is strict: a missing, unexpected or
    misshapen tensor raises an error that names it.
    """
    with torch.device("meta"):
        model = Model(config)
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
                if f.shape(key) != expected[name].shape:
                    raise UserError(f"tensor {key} has shape {f.shape(key)}, expected {tuple(expected[name].shape)} from config.json")
                tensor = f.read(key, dtype, device, column_major=use_column_major(f.shape(key), dtype, device))
                set_parameter(model, name, tensor)
                loaded.add(name)
    missing = sorted(set(expected) - loaded)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"checkpoint {folder} lacks tensor {missing[0]}{more}")
    if skipped:
        log(f"skipped {skipped} vision-model and projector tensors: this file runs the text model only")
    # Buffers (RoPE frequencies) were built on the meta device; recompute them where the weights live.
    model.inv_freq = rope_inv_freq(config).to(device)
    return model.eval()


def use_column_major(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> bool:
    """Whether to store a weight column-major: float32 matrices on the CPU, nothing else.

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
        self.settings = json.loads(config_file.read_text()) if config_file.exists() else {}
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
            raise UserError("this checkpoint has no chat template (chat_template.jinja, tokenizer_config.json or chat_template.json); drop --chat")
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


# --------------------------------------------------------------------------------------------------
# KV cache and generation


class LayerCache:
    """Preallocated keys and values of one layer: (B, n_kv_heads, max_len, head_dim) each."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, k: torch.Tensor, v: torch.Tensor, start_pos: int, first_key: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys and values at start_pos, return those from first_key to the end."""
        end_pos = start_pos + k.shape[2]
        self.k[:, :, start_pos:end_pos] = k
        self.v[:, :, start_pos:end_pos] = v
        return self.k[:, :, first_key:end_pos], self.v[:, :, first_key:end_pos]


class KVCache:
    def __init__(self, config: Config, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        self.layers = [LayerCache(shape, dtype, device) for _ in range(config.num_hidden_layers)]


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None) -> int:
    """Pick the next token from a (vocab,) logit vector: argmax at temperature 0, else top-k/top-p sampling."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
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
) -> Iterator[int]:
    """Yield new token ids: one prefill pass over the prompt, then one decode pass per token."""
    device, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    cache = KVCache(model.config, 1, len(prompt) + max_new_tokens, dtype, device)
    logits = model(torch.tensor([prompt], device=device), cache, start_pos=0, last_only=True)
    for pos in range(len(prompt), len(prompt) + max_new_tokens):
        token = sample(logits[0, -1], temperature, top_k, top_p, generator)
        yield token
        if token in stop_tokens or pos + 1 == len(prompt) + max_new_tokens:
            return
        logits = model(torch.tensor([[token]], device=device), cache, start_pos=pos)


# --------------------------------------------------------------------------------------------------
# CLI

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to torch; use --device cpu")
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
    if temperature < 0:
        raise UserError(f"--temperature {temperature}: must be >= 0 (0 is greedy)")
    if top_k < 0:
        raise UserError(f"--top-k {top_k}: must be >= 0 (0 keeps every token)")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p {top_p}: must be in (0, 1]")
    return temperature, top_k or 0, top_p if top_p is not None else 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Generate text with a Llama 4 checkpoint.")
    parser.add_argument("--prompt", required=True, help="the prompt (with --chat: the user message)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"hub repo id or local folder (default: {DEFAULT_MODEL})")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default: 128)")
    parser.add_argument("--temperature", type=float, default=None, help="0 is greedy; default: the checkpoint's generation_config.json, else 0")
    parser.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens, 0 for all; default: generation_config.json, else 0")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]; default: generation_config.json, else 1")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="default: the checkpoint's dtype (float32 for float16 on CPU)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    if not args.prompt.strip():
        raise UserError("--prompt is empty; give some text to continue")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    folder = resolve_checkpoint(args.model)
    config, generation = read_config(folder)
    temperature, top_k, top_p = sampling_settings(args, generation)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, config, device)

    started = time.perf_counter()
    with ThreadPoolExecutor(1) as pool:  # the tokenizer loads while the weights do
        tokenizer_job = pool.submit(Tokenizer, folder)
        model = load_model(folder, config, device, dtype)
        tokenizer = tokenizer_job.result()
    prompt = tokenizer.encode_chat([{"role": "user", "content": args.prompt}]) if args.chat else tokenizer.encode(args.prompt)
    if len(prompt) + args.max_new_tokens > config.max_position_embeddings:
        raise UserError(
            f"prompt ({len(prompt)} tokens) plus --max-new-tokens {args.max_new_tokens} exceeds the context of "
            f"{config.max_position_embeddings} tokens; shorten the prompt or lower --max-new-tokens"
        )
    log(f"loaded {folder} in {time.perf_counter() - started:.1f}s ({dtype}, {device})")

    stream = StreamDecoder(tokenizer)
    tokens = generate(model, prompt, args.max_new_tokens, temperature, top_k, top_p, stop_tokens(config, generation, tokenizer, args.chat), args.seed)
    started = time.perf_counter()
    count = 0
    for token in tokens:
        if count == 0:
            prefill_seconds = time.perf_counter() - started
            started = time.perf_counter()
        count += 1
        print(stream.push(token), end="", flush=True)
    decode_seconds = time.perf_counter() - started
    print()
    decode_rate = f"{(count - 1) / decode_seconds:.1f} tokens/s" if count > 1 else "n/a"
    log(f"prompt: {len(prompt)} tokens, {len(prompt) / prefill_seconds:.1f} tokens/s; generation: {count} tokens, {decode_rate}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
