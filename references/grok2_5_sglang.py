"""Float64 reference forward pass, tiny checkpoint writer and tokenizer for the Grok 2.5 tests.

Grok 2.5 (xai-org/grok-2) has no transformers class, so the tests compare grok2_5.py against this
deliberately slow, literal re-statement of sglang's code instead:

- python/sglang/srt/models/grok.py (Grok1ForCausalLM): layer order, norms, MLP/MoE combine,
  embedding and output multipliers, RoPE ("original" = unscaled inv_freq, no YaRN mscale);
- python/sglang/srt/layers/elementwise.py: fused_rmsnorm / fused_dual_residual_rmsnorm
  (x / sqrt(mean(x^2) + eps) * w) and gelu_and_mul_triton (exact erf GELU);
- python/sglang/srt/layers/moe/router.py: fused_moe_router_kernel (tanh cap, softmax over all
  experts, top-k by argmax, weights not renormalised);
- sgl-kernel csrc/elementwise/activation.cu: gelu_and_mul used by the fused MoE "gelu" path (erf);
- python/sglang/srt/layers/attention/triton_ops/{extend,decode}_attention.py: tanh logit cap, then
  the xAI length temperature log2(p) / log2(attn_temperature_len) for query positions p above it;
- python/sglang/srt/layers/logits_processor.py: final tanh soft-cap on the logits;
- python/sglang/srt/tokenizer/tiktoken_tokenizer.py: tokenizer.tok.json, the "V1" split pattern.

Everything is computed in float64 with explicit loops over layers and einsums. The checkpoint writer
produces the published file layout (TP-common files plus expert tensors split across TP files).

    python references/grok2_5_sglang.py   # runs the self-check
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import regex
import torch
from safetensors import safe_open
from safetensors.torch import save_file

# Field names as in xai-org/grok-2's config.json (taken from a config dict that an sglang-jax Grok test
# copies from it), with tiny sizes. The three caps are smaller than the published 30 / 30 / 50 so that
# they change the output of tiny random weights: attention 5, router 3, final 10.
GROK_TINY_CONFIG: dict = {
    "architectures": ["Grok1ForCausalLM"],
    "model_type": "git",
    "torch_dtype": "bfloat16",
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "max_position_embeddings": 131072,
    "num_experts_per_tok": 2,
    "num_local_experts": 4,
    "residual_moe": True,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-05,
    "final_logit_softcapping": 10.0,
    "attn_logit_softcapping": 5.0,
    "router_logit_softcapping": 3.0,
    "rope_theta": 208533496,
    "attn_temperature_len": 8,
    "sliding_window_size": -1,
    "global_attn_every_n": 1,
    "rope_type": "original",
    "original_max_position_embeddings": 8192,
    "scaling_factor": 16.0,
    "extrapolation_factor": 1.0,
    "attn_factor": 1.0,
    "beta_fast": 8,
    "beta_slow": 1,
    "embedding_multiplier_scale": 8.0,
    "output_multiplier_scale": 0.5,
}

# sglang's PAT_STR_B, selected by "word_split": "V1": GPT-4-like, but digits are split one by one.
V1_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

PAD, SEPARATOR, EOS = "<|pad|>", "<|separator|>", "<|eos|>"
SPECIAL_TOKEN_TEXTS = (PAD, SEPARATOR, EOS)  # ids 0, 1, 2 in the tiny tokenizer

# Special tokens that sglang's encode() matches whole; any other text is split and merged as bytes,
# even when it is listed in special_tokens.
SGLANG_ALLOWED_SPECIAL = frozenset(
    [PAD, SEPARATOR, EOS]
    + [f"<|control{i}|>" for i in range(1, 705)]
    + [f"<|reserved_{i}|>" for i in range(3, 128)]
)

# Published file names: file number -> tensor name suffix. Files 00006-00008 are split per TP rank.
COMMON_FILES = {
    0: ["model.embed_tokens.weight"],
    1: ["lm_head.weight"],
    2: ["model.norm.weight"],
    3: ["mlp.gate_proj.weight"],
    4: ["mlp.down_proj.weight"],
    5: ["mlp.up_proj.weight"],
    9: ["self_attn.k_proj.weight"],
    10: ["self_attn.o_proj.weight"],
    11: ["self_attn.q_proj.weight"],
    12: ["self_attn.v_proj.weight"],
    13: ["pre_attn_norm.weight"],
    14: ["post_attn_norm.weight"],
    15: ["pre_moe_norm.weight"],
    16: ["post_moe_norm.weight"],
    17: ["block_sparse_moe.gate.weight"],
}
EXPERT_FILES = {6: "w1", 7: "w2", 8: "w3"}
EXPERT_SPLIT_DIM = {"w1": 0, "w2": 1, "w3": 0}  # w1/w3 are [moe_intermediate, hidden], w2 the transpose

_SHARD_FILE = re.compile(r"^pytorch_model-(\d{5})-TP-(common|\d{3})\.safetensors$")

# English text from which write_checkpoint learns the tiny tokenizer's merges.
_MERGE_CORPUS = (
    "The quick brown fox jumps over the lazy dog. The capital of France is Paris, and the capital "
    "of Italy is Rome. Human: Tell me a story about the three little pigs. Assistant: Once upon a "
    "time there were three little pigs who wanted to build their own houses. The first pig built "
    "a house of straw, the second a house of sticks, and the third a house of bricks. "
    "In 2024 there were 365 days in the year; in 2025 there are 365 again. "
    "Then the wolf came and said: I'll huff, and I'll puff, and I'll blow your house in! "
) * 3


# --------------------------------------------------------------------------------------------------
# Checkpoint writer


def _random_weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Draw float32 weights whose scales make the tiny config's caps and temperature matter."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float32) * std

    def norm_weight(size: int) -> torch.Tensor:
        return 1.0 + normal(size, std=0.2)

    hidden = config["hidden_size"]
    head_dim = config["head_dim"]
    q_size = config["num_attention_heads"] * head_dim
    kv_size = config["num_key_value_heads"] * head_dim
    intermediate = config["intermediate_size"]
    moe_intermediate = config["moe_intermediate_size"]
    vocab = config["vocab_size"]

    weights = {
        "model.embed_tokens.weight": normal(vocab, hidden, std=0.25),
        "lm_head.weight": normal(vocab, hidden, std=1.0),
        "model.norm.weight": norm_weight(hidden),
    }
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        # Std 0.2 for q and k puts about a third of the raw attention scores above half the tiny cap of 5.
        weights[prefix + "self_attn.q_proj.weight"] = normal(q_size, hidden, std=0.2)
        weights[prefix + "self_attn.k_proj.weight"] = normal(kv_size, hidden, std=0.2)
        weights[prefix + "self_attn.v_proj.weight"] = normal(kv_size, hidden, std=hidden**-0.5)
        weights[prefix + "self_attn.o_proj.weight"] = normal(hidden, q_size, std=q_size**-0.5)
        for name in ("pre_attn_norm", "post_attn_norm", "pre_moe_norm", "post_moe_norm"):
            weights[prefix + name + ".weight"] = norm_weight(hidden)
        weights[prefix + "mlp.gate_proj.weight"] = normal(intermediate, hidden, std=hidden**-0.5)
        weights[prefix + "mlp.up_proj.weight"] = normal(intermediate, hidden, std=hidden**-0.5)
        weights[prefix + "mlp.down_proj.weight"] = normal(hidden, intermediate, std=intermediate**-0.5)
        weights[prefix + "block_sparse_moe.gate.weight"] = normal(
            config["num_local_experts"], hidden, std=0.25
        )
        for expert in range(config["num_local_experts"]):
            expert_prefix = f"{prefix}block_sparse_moe.experts.{expert}."
            weights[expert_prefix + "w1.weight"] = normal(moe_intermediate, hidden, std=hidden**-0.5)
            weights[expert_prefix + "w3.weight"] = normal(moe_intermediate, hidden, std=hidden**-0.5)
            weights[expert_prefix + "w2.weight"] = normal(
                hidden, moe_intermediate, std=moe_intermediate**-0.5
            )
    return weights


def _file_number_for(name: str) -> int:
    """Return the published file number (00000-00017) that holds tensor `name`."""
    for number, suffixes in COMMON_FILES.items():
        if any(name == suffix or name.endswith("." + suffix) for suffix in suffixes):
            return number
    for number, matrix in EXPERT_FILES.items():
        if ".block_sparse_moe.experts." in name and name.endswith(f".{matrix}.weight"):
            return number
    raise ValueError(f"no published file holds tensor {name!r}")


def _learn_merges(count: int) -> list[bytes]:
    """Learn `count` byte-pair merges from _MERGE_CORPUS, most frequent pair first.

    Ties go to the lexicographically smallest (left, right) byte pair, so the result is deterministic.
    """
    words: dict[tuple[bytes, ...], int] = {}
    for piece in regex.findall(V1_PATTERN, _MERGE_CORPUS):
        word = tuple(bytes([b]) for b in piece.encode("utf-8"))
        words[word] = words.get(word, 0) + 1

    merges: list[bytes] = []
    while len(merges) < count:
        pair_counts: dict[tuple[bytes, bytes], int] = {}
        for word, frequency in words.items():
            for left, right in zip(word, word[1:]):
                pair_counts[(left, right)] = pair_counts.get((left, right), 0) + frequency
        if not pair_counts:
            raise ValueError(
                f"the merge corpus yields only {len(merges)} merges but {count} are needed; "
                "use a smaller vocab_size"
            )
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merged = best[0] + best[1]
        merges.append(merged)

        new_words: dict[tuple[bytes, ...], int] = {}
        for word, frequency in words.items():
            parts: list[bytes] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    parts.append(merged)
                    i += 2
                else:
                    parts.append(word[i])
                    i += 1
            new_words[tuple(parts)] = new_words.get(tuple(parts), 0) + frequency
        words = new_words
    return merges


def _tokenizer_json(vocab_size: int) -> dict:
    """Build a tokenizer.tok.json dict with exactly `vocab_size` tokens.

    Ids 0-2 are <|pad|>, <|separator|>, <|eos|>; ids 3-258 the 256 single bytes in byte order; the
    rest are learned merges. tiktoken (which sglang uses) requires the token count to equal
    vocab_size and the largest id to be vocab_size - 1.
    """
    merge_count = vocab_size - len(SPECIAL_TOKEN_TEXTS) - 256
    if merge_count < 0:
        raise ValueError(
            f"vocab_size {vocab_size} is too small for 3 special tokens and 256 byte tokens; "
            f"use at least {len(SPECIAL_TOKEN_TEXTS) + 256}"
        )
    special_tokens = [
        {"bytes": list(text.encode("utf-8")), "token": token_id}
        for token_id, text in enumerate(SPECIAL_TOKEN_TEXTS)
    ]
    first_regular = len(SPECIAL_TOKEN_TEXTS)
    regular_tokens = [{"bytes": [b], "token": first_regular + b} for b in range(256)]
    for offset, merged in enumerate(_learn_merges(merge_count)):
        regular_tokens.append({"bytes": list(merged), "token": first_regular + 256 + offset})
    return {
        "regular_tokens": regular_tokens,
        "special_tokens": special_tokens,
        "word_split": "V1",
        "vocab_size": vocab_size,
    }


def write_checkpoint(
    folder: Path,
    config: dict = GROK_TINY_CONFIG,
    seed: int = 0,
    tp: int = 8,
    *,
    dtype: torch.dtype = torch.bfloat16,
) -> None:
    """Write random weights, config.json and tokenizer.tok.json in xai-org/grok-2's published layout.

    Weights are drawn in float32 and stored as `dtype` (bfloat16 by default, as published).
    Non-expert tensors go whole into pytorch_model-000NN-TP-common.safetensors. Expert matrices are
    cut into `tp` equal slices (w1, w3 on dim 0; w2 on dim 1) and slice R of every expert goes into
    pytorch_model-00006/00007/00008-TP-{R:03d}.safetensors. The same seed gives the same full
    weights for every `tp`.
    """
    folder = Path(folder)
    moe_intermediate = config["moe_intermediate_size"]
    if tp < 1 or moe_intermediate % tp != 0:
        raise ValueError(f"tp={tp} must be positive and divide moe_intermediate_size={moe_intermediate}")
    folder.mkdir(parents=True, exist_ok=True)

    files: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in _random_weights(config, seed).items():
        tensor = tensor.to(dtype)
        number = _file_number_for(name)
        if number in EXPERT_FILES:
            split_dim = EXPERT_SPLIT_DIM[EXPERT_FILES[number]]
            for rank, piece in enumerate(torch.chunk(tensor, tp, dim=split_dim)):
                file_name = f"pytorch_model-{number:05d}-TP-{rank:03d}.safetensors"
                files.setdefault(file_name, {})[name] = piece.contiguous()
        else:
            file_name = f"pytorch_model-{number:05d}-TP-common.safetensors"
            files.setdefault(file_name, {})[name] = tensor
    for file_name, tensors in files.items():
        save_file(tensors, str(folder / file_name))

    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer = _tokenizer_json(config["vocab_size"])
    (folder / "tokenizer.tok.json").write_text(json.dumps(tokenizer) + "\n")


# --------------------------------------------------------------------------------------------------
# Checkpoint reader


def load_reference_weights(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read config.json and all published-layout safetensors files, returning float64 tensors.

    Tensors in TP-common files are taken whole. A tensor that appears in the per-rank files
    (pytorch_model-NNNNN-TP-RRR) is concatenated over ranks 0..tp-1 in rank order, on dim 0 for
    w1/w3 and on dim 1 for w2, exactly as the published expert slices were cut.
    """
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())

    whole: dict[str, torch.Tensor] = {}
    slices: dict[str, dict[int, torch.Tensor]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        match = _SHARD_FILE.match(path.name)
        if match is None:
            raise ValueError(f"unexpected weight file {path.name}; expected pytorch_model-NNNNN-TP-*.safetensors")
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name).to(torch.float64)
                if match.group(2) == "common":
                    if name in whole:
                        raise ValueError(f"tensor {name} appears in more than one TP-common file")
                    whole[name] = tensor
                else:
                    rank = int(match.group(2))
                    slices.setdefault(name, {})[rank] = tensor

    for name, by_rank in slices.items():
        if name in whole:
            raise ValueError(f"tensor {name} appears both whole and split across TP files")
        ranks = sorted(by_rank)
        if ranks != list(range(len(ranks))):
            raise ValueError(f"tensor {name} has TP slices for ranks {ranks}; expected 0..{len(ranks) - 1}")
        matrix = name.split(".")[-2]
        if matrix not in EXPERT_SPLIT_DIM:
            raise ValueError(f"tensor {name} is split across TP files but is not an expert w1/w2/w3")
        whole[name] = torch.cat([by_rank[rank] for rank in ranks], dim=EXPERT_SPLIT_DIM[matrix])
    return config, whole


# --------------------------------------------------------------------------------------------------
# Forward pass


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * w, the formula of sglang's fused_rmsnorm kernel (no 1 + w)."""
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * weight


def _gelu_erf(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU, 0.5 * x * (1 + erf(x / sqrt(2))), as in gelu_and_mul_triton and sgl-kernel gelu_and_mul."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return cap * torch.tanh(x / cap)


def _rope_inv_freq(config: dict) -> tuple[torch.Tensor, int]:
    """Return RoPE inverse frequencies and the rotated width as sglang computes them for Grok.

    The base is int(rope_theta). With rope_type "original", ScalingRotaryEmbedding._compute_inv_freq
    returns the unscaled (extrapolation) frequencies and its cos/sin cache omits the YaRN mscale, so
    scaling_factor, beta_fast/slow and original_max_position_embeddings change nothing here. Without
    rope_type, get_rope builds the same plain frequencies.
    """
    rope_type = config.get("rope_type")
    if rope_type not in (None, "", "original"):
        raise NotImplementedError(f"rope_type {rope_type!r}: this reference implements only 'original'")
    head_dim = config["head_dim"]
    rotary_dim = head_dim // 2 if config.get("rope_rotate_half_dims", False) else head_dim
    base = float(int(config["rope_theta"]))
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    return 1.0 / base**exponents, rotary_dim


def _apply_rope_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + rotary_dim/2]) of the first rotary_dim dims; x is (B, T, heads, D)."""
    half = rotary_dim // 2
    x1 = x[..., :half]
    x2 = x[..., half:rotary_dim]
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return torch.cat([rotated, x[..., rotary_dim:]], dim=-1)


def _temperature_factors(config: dict, length: int) -> torch.Tensor:
    """Per-query multipliers of the xAI length temperature for 0-based positions 0..length-1.

    sglang's triton kernels use log2(p) / log2(attn_temperature_len) for p > attn_temperature_len
    and 1 otherwise; attn_temperature_len <= 0 (sglang's default is -1) turns it off.
    """
    temperature_len = config.get("attn_temperature_len", -1)
    factors = torch.ones(length, dtype=torch.float64)
    if temperature_len is None or temperature_len <= 0:
        return factors
    for position in range(length):
        if position > temperature_len:
            factors[position] = math.log2(position) / math.log2(float(temperature_len))
    return factors


def _attention(x: torch.Tensor, weights: dict, prefix: str, config: dict, trace: dict | None) -> torch.Tensor:
    """Causal GQA with RoPE, tanh soft-cap, then length temperature; x is (B, T, hidden)."""
    batch, length, _ = x.shape
    head_dim = config["head_dim"]
    num_heads = config["num_attention_heads"]
    num_kv_heads = config["num_key_value_heads"]
    group = num_heads // num_kv_heads

    q = torch.einsum("bth,oh->bto", x, weights[prefix + "q_proj.weight"]).view(batch, length, num_heads, head_dim)
    k = torch.einsum("bth,oh->bto", x, weights[prefix + "k_proj.weight"]).view(batch, length, num_kv_heads, head_dim)
    v = torch.einsum("bth,oh->bto", x, weights[prefix + "v_proj.weight"]).view(batch, length, num_kv_heads, head_dim)

    inv_freq, rotary_dim = _rope_inv_freq(config)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq[None, :]
    q = _apply_rope_neox(q, angles.cos(), angles.sin(), rotary_dim)
    k = _apply_rope_neox(k, angles.cos(), angles.sin(), rotary_dim)

    # Query head h reads kv head h // group (cur_kv_head = cur_head // kv_group_num in the kernels).
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)

    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * head_dim**-0.5
    if trace is not None:
        trace.setdefault("attention_scores", []).append(scores.detach().clone())
    logit_cap = max(config.get("attn_logit_softcapping", 30.0), 0.0)
    if logit_cap > 0:
        scores = _soft_cap(scores, logit_cap)
    scores = scores * _temperature_factors(config, length)[None, None, :, None]

    causal = torch.ones(length, length, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    probabilities = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", probabilities, v).reshape(batch, length, num_heads * head_dim)
    return torch.einsum("bti,oi->bto", out, weights[prefix + "o_proj.weight"])


def _dense_mlp(x: torch.Tensor, weights: dict, prefix: str) -> torch.Tensor:
    """down(gelu_erf(gate(x)) * up(x)), the residual MLP that runs beside the experts."""
    gate = torch.einsum("bth,ih->bti", x, weights[prefix + "mlp.gate_proj.weight"])
    up = torch.einsum("bth,ih->bti", x, weights[prefix + "mlp.up_proj.weight"])
    return torch.einsum("bti,hi->bth", _gelu_erf(gate) * up, weights[prefix + "mlp.down_proj.weight"])


def _moe(x: torch.Tensor, weights: dict, prefix: str, config: dict, trace: dict | None) -> torch.Tensor:
    """Top-k experts per token: capped router logits, softmax over all experts, no renormalisation."""
    num_experts = config["num_local_experts"]
    top_k = config["num_experts_per_tok"]
    # NOTE: sglang's Grok1MoE hard-codes router_logit_softcapping = 30.0 and never reads the config
    # field; this reference reads the field (30.0 in the published config, 3.0 in GROK_TINY_CONFIG).
    router_cap = config.get("router_logit_softcapping", 30.0)
    if top_k > num_experts:
        raise ValueError(f"num_experts_per_tok={top_k} exceeds num_local_experts={num_experts}")

    router_logits = torch.einsum("bth,eh->bte", x, weights[prefix + "block_sparse_moe.gate.weight"])
    if trace is not None:
        trace.setdefault("router_logits", []).append(router_logits.detach().clone())
    probabilities = torch.softmax(_soft_cap(router_logits, router_cap), dim=-1)

    out = torch.zeros_like(x)
    batch, length, _ = x.shape
    for b in range(batch):
        for t in range(length):
            remaining = probabilities[b, t].clone()
            for _ in range(top_k):
                # torch.argmax returns the first maximal index, like tl.argmax in the router kernel.
                expert = int(torch.argmax(remaining))
                routing_weight = probabilities[b, t, expert]
                remaining[expert] = float("-inf")
                expert_prefix = f"{prefix}block_sparse_moe.experts.{expert}."
                token = x[b, t]
                gate = weights[expert_prefix + "w1.weight"] @ token
                up = weights[expert_prefix + "w3.weight"] @ token
                out[b, t] += routing_weight * (weights[expert_prefix + "w2.weight"] @ (_gelu_erf(gate) * up))
    return out


def _forward(config: dict, weights: dict, tokens: torch.Tensor, trace: dict | None = None) -> torch.Tensor:
    """Return float64 logits (B, T, vocab); every row of `tokens` is a sequence starting at position 0."""
    if config.get("num_local_experts", 0) <= 0:
        raise NotImplementedError("sglang's Grok1DecoderLayer requires num_local_experts > 0")
    eps = config["rms_norm_eps"]
    hidden = weights["model.embed_tokens.weight"][tokens] * config["embedding_multiplier_scale"]

    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        attention_in = _rms_norm(hidden, weights[prefix + "pre_attn_norm.weight"], eps)
        attention_out = _attention(attention_in, weights, prefix + "self_attn.", config, trace)
        hidden = hidden + _rms_norm(attention_out, weights[prefix + "post_attn_norm.weight"], eps)

        ffn_in = _rms_norm(hidden, weights[prefix + "pre_moe_norm.weight"], eps)
        ffn_out = _moe(ffn_in, weights, prefix, config, trace)
        if config.get("residual_moe", False):
            ffn_out = (_dense_mlp(ffn_in, weights, prefix) + ffn_out) / math.sqrt(2.0)
        hidden = hidden + _rms_norm(ffn_out, weights[prefix + "post_moe_norm.weight"], eps)

    hidden = _rms_norm(hidden, weights["model.norm.weight"], eps)
    # sglang multiplies lm_head.weight by output_multiplier_scale while loading it.
    logits = torch.einsum("bth,vh->btv", hidden, weights["lm_head.weight"]) * config["output_multiplier_scale"]
    if trace is not None:
        trace["final_logits"] = logits.detach().clone()
    final_cap = config.get("final_logit_softcapping")
    if final_cap is not None and final_cap > 0:
        logits = _soft_cap(logits, final_cap)
    return logits


def reference_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    """Run the float64 reference on the checkpoint in `folder` and return logits (B, T, vocab).

    Each row of `tokens` (B, T) is an independent sequence at positions 0..T-1, with no padding.
    """
    config, weights = load_reference_weights(folder)
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.dim() != 2:
        raise ValueError(f"tokens must have shape (batch, length), got {tuple(tokens.shape)}")
    return _forward(config, weights, tokens)


def reference_greedy(folder: Path, prompt_ids: list[int], n: int) -> list[int]:
    """Return the `n` greedily chosen next tokens (prompt excluded), recomputing the full sequence each step.

    The argmax takes the first maximal id on ties, and generation does not stop at <|eos|>.
    """
    config, weights = load_reference_weights(folder)
    sequence = list(prompt_ids)
    generated: list[int] = []
    for _ in range(n):
        logits = _forward(config, weights, torch.tensor([sequence], dtype=torch.long))
        next_id = int(torch.argmax(logits[0, -1]))
        generated.append(next_id)
        sequence.append(next_id)
    return generated


# --------------------------------------------------------------------------------------------------
# Tokenizer


def _bpe_piece(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """Encode one pre-tokenized piece like tiktoken: the whole piece if it is a token, else merge
    the adjacent pair whose concatenation has the lowest rank (leftmost on ties) until none is a token.
    """
    if piece in ranks:
        return [ranks[piece]]
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while True:
        best_index = None
        best_rank = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best_rank is None or rank < best_rank):
                best_index, best_rank = i, rank
        if best_index is None:
            break
        parts[best_index : best_index + 2] = [parts[best_index] + parts[best_index + 1]]
    missing = [part for part in parts if part not in ranks]
    if missing:
        raise ValueError(f"bytes {missing[0]!r} have no token; the vocabulary lacks a single-byte token")
    return [ranks[part] for part in parts]


def reference_tokenizer_encode(folder: Path, text: str) -> list[int]:
    """Encode `text` with tokenizer.tok.json by brute-force byte-level BPE, as sglang's tiktoken encoder does.

    Special tokens listed in the file and allowed by sglang (pad, separator, eos, control, reserved)
    are matched whole, leftmost first; the text between them is split with the V1 pattern (or the
    file's "pat_str") and each piece is merged by rank. No BOS is added.
    """
    data = json.loads((Path(folder) / "tokenizer.tok.json").read_text())
    if data.get("word_split") != "V1":
        raise ValueError(f"unknown word_split {data.get('word_split')!r}; sglang supports only 'V1'")
    pattern = data.get("pat_str", V1_PATTERN)
    ranks = {bytes(item["bytes"]): item["token"] for item in data["regular_tokens"]}
    specials = {bytes(item["bytes"]).decode("utf-8"): item["token"] for item in data["special_tokens"]}
    matchable = {text_: token for text_, token in specials.items() if text_ in SGLANG_ALLOWED_SPECIAL}

    ids: list[int] = []
    position = 0
    while position <= len(text):
        # Find the leftmost special token; prefer the longest one starting at that index.
        next_start, next_special = len(text), None
        for special in sorted(matchable, key=len, reverse=True):
            start = text.find(special, position)
            if start != -1 and start < next_start:
                next_start, next_special = start, special
        for piece in regex.findall(pattern, text[position:next_start]):
            ids.extend(_bpe_piece(piece.encode("utf-8"), ranks))
        if next_special is None:
            break
        ids.append(matchable[next_special])
        position = next_start + len(next_special)
    return ids


# --------------------------------------------------------------------------------------------------
# Self-check


def _forward_sglang_schedule(config: dict, weights: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Recompute the logits with sglang's deferred-norm schedule (fused_dual_residual_rmsnorm calls).

    Grok1DecoderLayer returns (ffn_out, residual, post_moe_norm) and the next layer, or the final
    model.norm, applies the deferred norm. This must equal the sandwich form used by _forward.
    It assumes residual_moe and a positive final cap, as in GROK_TINY_CONFIG.
    """
    eps = config["rms_norm_eps"]

    def dual_residual_norm(x, residual, first_weight, second_weight):
        mid = residual + _rms_norm(x, first_weight, eps)
        return _rms_norm(mid, second_weight, eps), mid

    hidden = weights["model.embed_tokens.weight"][tokens] * config["embedding_multiplier_scale"]
    residual, deferred = None, None
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        if deferred is None:
            hidden, residual = _rms_norm(hidden, weights[prefix + "pre_attn_norm.weight"], eps), hidden
        else:
            hidden, residual = dual_residual_norm(hidden, residual, deferred, weights[prefix + "pre_attn_norm.weight"])
        hidden = _attention(hidden, weights, prefix + "self_attn.", config, None)
        hidden, residual = dual_residual_norm(
            hidden, residual, weights[prefix + "post_attn_norm.weight"], weights[prefix + "pre_moe_norm.weight"]
        )
        moe_out = _moe(hidden, weights, prefix, config, None)
        hidden = (_dense_mlp(hidden, weights, prefix) + moe_out) / 1.4142135623730951
        deferred = weights[prefix + "post_moe_norm.weight"]
    hidden, _ = dual_residual_norm(hidden, residual, deferred, weights["model.norm.weight"])
    logits = torch.einsum("bth,vh->btv", hidden, weights["lm_head.weight"] * config["output_multiplier_scale"])
    return _soft_cap(logits, config["final_logit_softcapping"])


def _run_self_check() -> None:
    """Write tiny checkpoints to a temporary folder and print checks of the reference's behaviour."""
    import tempfile

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_checkpoint(root / "tp8")
        write_checkpoint(root / "tp1", tp=1)
        write_checkpoint(root / "tp8_f32", dtype=torch.float32)
        no_temperature = copy.deepcopy(GROK_TINY_CONFIG)
        no_temperature["attn_temperature_len"] = -1
        write_checkpoint(root / "no_temperature", config=no_temperature)

        names = sorted(path.name for path in (root / "tp8").iterdir())
        print(f"files written for tp=8: {len(names)}; first {names[:3]}, last {names[-3:]}")

        config, weights = load_reference_weights(root / "tp8")
        print("w1/w2 shapes after concatenation:",
              tuple(weights["model.layers.0.block_sparse_moe.experts.0.w1.weight"].shape),
              tuple(weights["model.layers.0.block_sparse_moe.experts.0.w2.weight"].shape))

        tokens = torch.randint(0, config["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
        trace: dict = {}
        logits = _forward(config, weights, tokens, trace)
        print("logits:", tuple(logits.shape), logits.dtype, "finite:", bool(torch.isfinite(logits).all()))

        scores = torch.cat([s.flatten() for s in trace["attention_scores"]])
        scores = scores[torch.isfinite(scores)]
        router = torch.cat([r.flatten() for r in trace["router_logits"]])
        final = trace["final_logits"].flatten()
        for label, values, cap in (
            ("attention scores", scores, config["attn_logit_softcapping"]),
            ("router logits", router, config["router_logit_softcapping"]),
            ("final logits", final, config["final_logit_softcapping"]),
        ):
            shrink = (values - _soft_cap(values, cap)).abs()
            print(f"{label}: max |pre-cap| {values.abs().max():.2f} vs cap {cap}; "
                  f"{(values.abs() > cap / 2).double().mean():.1%} above cap/2; max shrink {shrink.max():.2f}")

        tp1_logits = reference_logits(root / "tp1", tokens)
        print("tp=1 vs tp=8 max |diff|:", float((tp1_logits - logits).abs().max()))

        f32_logits = reference_logits(root / "tp8_f32", tokens)
        print("float32 vs bfloat16 checkpoint max |diff| (expected > 0):", float((f32_logits - logits).abs().max()))

        untempered = reference_logits(root / "no_temperature", tokens)
        per_position = (untempered - logits).abs().amax(dim=(0, 2))
        temperature_len = config["attn_temperature_len"]
        print(f"temperature off: max |diff| at positions <= {temperature_len}:",
              float(per_position[: temperature_len + 1].max()),
              f"; at positions > {temperature_len}: min over positions", float(per_position[temperature_len + 1 :].min()))

        changed = tokens.clone()
        changed[:, 20:] = (changed[:, 20:] + 1) % config["vocab_size"]
        causal_diff = (_forward(config, weights, changed)[:, :20] - logits[:, :20]).abs().max()
        print("causality: max |diff| at positions < 20 after changing tokens >= 20:", float(causal_diff))

        schedule_diff = (_forward_sglang_schedule(config, weights, tokens) - logits).abs().max()
        print("sglang deferred-norm schedule vs sandwich form max |diff|:", float(schedule_diff))

        print("greedy from [3, 4, 5], 5 tokens:", reference_greedy(root / "tp8", [3, 4, 5], 5))

        text = "Human: Tell me 12345 stories!<|separator|>\n\nAssistant: Once upon a time<|eos|>"
        print("encode:", reference_tokenizer_encode(root / "tp8", text))


if __name__ == "__main__":
    _run_self_check()
