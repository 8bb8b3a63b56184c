"""Slow float64 reference for dual chunk attention (DCA), computed the way vLLM computes it for Qwen.

DCA ("Training-Free Long-Context Scaling of Large Language Models", An et al., 2024) splits the keys
into chunks of `chunk_len = chunk_size - local_size` tokens and remaps RoPE positions so that no
query-key distance exceeds `chunk_size`:

- a key at absolute position j is rotated to `j % chunk_len`;
- a query at absolute position p, with `offset = p % chunk_len`, is rotated three ways:
  intra-chunk to `offset`, successive-chunk to `min(offset + chunk_len, chunk_size)`, and
  inter-chunk to the constant `min(2 * chunk_len - 1, chunk_size)`;
- the query attends causally to the keys of its own chunk with the intra-chunk rotation, to every
  key of the previous chunk with the successive-chunk rotation, and to every key of all earlier
  chunks with the inter-chunk rotation. The three partial softmaxes are merged by log-sum-exp,
  which equals one softmax over all of the query's keys.

Sources, as stored copies of vllm-project/vllm: the position tables follow
`DualChunkRotaryEmbedding._compute_cos_sin_cache` and `forward_native` in
vllm/model_executor/layers/rotary_embedding/dual_chunk_rope.py (commit 07b13497), and the chunk
boundaries and the merge follow `_dual_chunk_flash_attn_prefill_func`, `_merge_attn_outputs` and the
decode metadata in vllm/attention/backends/dual_chunk_flash_attn.py (commit cff7e054). HKUNLP/ChunkLlama
(chunkqwen_attn_replace.py) uses the same position tables.

    python -m pytest references/dual_chunk_attention.py    # the self-checks below
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

FLOAT = torch.float64


class DcaPositions(NamedTuple):
    """RoPE positions that DCA uses for the token at one absolute position."""

    key: int
    intra: int
    successive: int
    inter: int


def dca_positions(position: int, chunk_size: int, local_size: int) -> DcaPositions:
    """Map an absolute position to its DCA key position and its three query positions."""
    chunk_len = _chunk_len(chunk_size, local_size)
    offset = position % chunk_len

    # vLLM clamps the successive-chunk position at chunk_size, so the largest query-key distance is
    # chunk_size itself. The paper keeps distances at most c - 1 for pretraining length c (its
    # Figure 2: c = 10, distances up to 9). This follows vLLM.
    successive = min(offset + chunk_len, chunk_size)

    # vLLM rotates every inter-chunk query with the successive-chunk entry of offset chunk_len - 1.
    inter = min(2 * chunk_len - 1, chunk_size)
    return DcaPositions(key=offset, intra=offset, successive=successive, inter=inter)


def dca_length_scaling_factor(sequence_length: int, original_max_position_embeddings: int) -> float:
    """Return vLLM's DCA logit factor, `max(1, 0.1 * ln(sequence_length / original) + 1)`.

    The factor is 1 when `original_max_position_embeddings` is 0 and for sequences no longer than
    it. `reference_dca_attention` takes no such factor, so fold it into `scale`.
    NOTE: in vLLM (commit cff7e054) the prefill path multiplies the keys by the factor before they
    are cached and also multiplies the softmax scale by it, so prefill logits carry factor**2. The
    decode path multiplies the query by the current factor and reads keys that were scaled by the
    factor of the step that cached them. Which of these a port should copy is a decision for its
    tests, not for this reference.
    """
    if original_max_position_embeddings <= 0:
        return 1.0
    return max(1.0, 0.1 * math.log(sequence_length / original_max_position_embeddings) + 1.0)


def apply_rope(x: torch.Tensor, position: float, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (..., head_dim) to `position` in float64, in the rotate_half (GPT-NeoX) layout.

    The first `2 * len(inv_freq)` features are rotated and the rest pass through unchanged.
    """
    x = x.to(FLOAT)
    inv_freq = inv_freq.to(FLOAT)
    half = inv_freq.numel()
    rotary_dim = 2 * half

    angles = float(position) * inv_freq
    cos = torch.cat((angles.cos(), angles.cos()))
    sin = torch.cat((angles.sin(), angles.sin()))

    x_rot = x[..., :rotary_dim]
    x_pass = x[..., rotary_dim:]
    rotated_half = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    return torch.cat((x_rot * cos + rotated_half * sin, x_pass), dim=-1)


def attend(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attend one rotated query (head_dim,) to keys (n, head_dim) and values (n, value_dim).

    Returns the softmax-weighted values and the log-sum-exp of the scaled logits.
    """
    logits = scale * (keys @ query)
    lse = torch.logsumexp(logits, dim=0)
    weights = torch.exp(logits - lse)
    return weights @ values, lse


def merge_partial_attention(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Merge partial attention outputs over disjoint key sets by their log-sum-exps."""
    lses = torch.stack([lse for _, lse in parts])
    total_lse = torch.logsumexp(lses, dim=0)
    merged = torch.zeros_like(parts[0][0])
    for output, lse in parts:
        merged = merged + torch.exp(lse - total_lse) * output
    return merged


def reference_dca_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor | Sequence[int],
    chunk_size: int,
    local_size: int,
    inv_freq: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Compute causal dual chunk attention in float64, one query and one head at a time.

    q is (T, n_heads, head_dim) before RoPE, at the absolute `positions` (T,). k (before RoPE) and v
    are (S, n_kv_heads, dim), at positions 0..S-1, and every query position must be below S. Query
    head h reads kv head `h // (n_heads // n_kv_heads)`. `scale` multiplies every logit. Returns
    (T, n_heads, value_dim) in float64.
    """
    position_list = _check_inputs(q, k, v, positions, inv_freq)
    chunk_len = _chunk_len(chunk_size, local_size)
    n_heads = q.shape[1]
    group_size = n_heads // k.shape[1]
    values = v.to(FLOAT)

    # Each key has one DCA rotation, so rotate every key once.
    rotated_keys = torch.empty(k.shape, dtype=FLOAT)
    for j in range(k.shape[0]):
        key_position = dca_positions(j, chunk_size, local_size).key
        for g in range(k.shape[1]):
            rotated_keys[j, g] = apply_rope(k[j, g], key_position, inv_freq)

    output = torch.empty(q.shape[0], n_heads, v.shape[2], dtype=FLOAT)
    for t, position in enumerate(position_list):
        query_positions = dca_positions(position, chunk_size, local_size)
        chunk_index = position // chunk_len
        chunk_start = chunk_index * chunk_len
        previous_start = chunk_start - chunk_len

        for h in range(n_heads):
            g = h // group_size
            parts = []

            # Intra-chunk: the query's own chunk, causal.
            intra_query = apply_rope(q[t, h], query_positions.intra, inv_freq)
            keys = rotated_keys[chunk_start : position + 1, g]
            parts.append(attend(intra_query, keys, values[chunk_start : position + 1, g], scale))

            # Successive-chunk: every key of the previous chunk.
            if chunk_index >= 1:
                successive_query = apply_rope(q[t, h], query_positions.successive, inv_freq)
                keys = rotated_keys[previous_start:chunk_start, g]
                parts.append(attend(successive_query, keys, values[previous_start:chunk_start, g], scale))

            # Inter-chunk: every key before the previous chunk.
            if chunk_index >= 2:
                inter_query = apply_rope(q[t, h], query_positions.inter, inv_freq)
                keys = rotated_keys[:previous_start, g]
                parts.append(attend(inter_query, keys, values[:previous_start, g], scale))

            output[t, h] = merge_partial_attention(parts)
    return output


def reference_plain_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor | Sequence[int],
    inv_freq: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Compute ordinary causal RoPE attention at absolute positions in float64.

    Takes the same tensors, layout and grouped-query rule as `reference_dca_attention`.
    """
    position_list = _check_inputs(q, k, v, positions, inv_freq)
    n_heads = q.shape[1]
    group_size = n_heads // k.shape[1]
    values = v.to(FLOAT)

    rotated_keys = torch.empty(k.shape, dtype=FLOAT)
    for j in range(k.shape[0]):
        for g in range(k.shape[1]):
            rotated_keys[j, g] = apply_rope(k[j, g], j, inv_freq)

    output = torch.empty(q.shape[0], n_heads, v.shape[2], dtype=FLOAT)
    for t, position in enumerate(position_list):
        for h in range(n_heads):
            g = h // group_size
            query = apply_rope(q[t, h], position, inv_freq)
            output[t, h], _ = attend(query, rotated_keys[: position + 1, g], values[: position + 1, g], scale)
    return output


def reference_dca_attention_joint_softmax(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor | Sequence[int],
    chunk_size: int,
    local_size: int,
    inv_freq: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Compute DCA a second way: one softmax over all keys, each logit at its own remapped positions.

    This shares no chunk slicing or merging with `reference_dca_attention`, so the two check each other.
    """
    position_list = _check_inputs(q, k, v, positions, inv_freq)
    chunk_len = _chunk_len(chunk_size, local_size)
    n_heads = q.shape[1]
    group_size = n_heads // k.shape[1]
    values = v.to(FLOAT)

    output = torch.empty(q.shape[0], n_heads, v.shape[2], dtype=FLOAT)
    for t, position in enumerate(position_list):
        query_positions = dca_positions(position, chunk_size, local_size)
        for h in range(n_heads):
            g = h // group_size
            logits = torch.empty(position + 1, dtype=FLOAT)
            for j in range(position + 1):
                chunk_distance = position // chunk_len - j // chunk_len
                if chunk_distance == 0:
                    query_position = query_positions.intra
                elif chunk_distance == 1:
                    query_position = query_positions.successive
                else:
                    query_position = query_positions.inter
                query = apply_rope(q[t, h], query_position, inv_freq)
                key = apply_rope(k[j, g], j % chunk_len, inv_freq)
                logits[j] = scale * torch.dot(query, key)
            output[t, h] = torch.softmax(logits, dim=0) @ values[: position + 1, g]
    return output


def default_inv_freq(rotary_dim: int, base: float = 10_000.0) -> torch.Tensor:
    """Return the standard RoPE inverse frequencies `base ** (-2i / rotary_dim)` in float64."""
    return 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=FLOAT) / rotary_dim)


def random_attention_inputs(
    sequence_length: int, n_heads: int, n_kv_heads: int, head_dim: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return seeded float64 q (S, n_heads, head_dim), k and v (S, n_kv_heads, head_dim)."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(sequence_length, n_heads, head_dim, generator=generator, dtype=FLOAT)
    k = torch.randn(sequence_length, n_kv_heads, head_dim, generator=generator, dtype=FLOAT)
    v = torch.randn(sequence_length, n_kv_heads, head_dim, generator=generator, dtype=FLOAT)
    return q, k, v


def check_dca_matches_plain_attention(
    chunk_size: int = 12,
    local_size: int = 4,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    head_dim: int = 16,
    rotary_dim: int | None = None,
    seed: int = 0,
    tolerance: float = 1e-12,
) -> float:
    """Check that DCA equals plain causal RoPE attention for every query position up to chunk_size.

    A query at p <= chunk_size sits in chunk 0 or 1. In chunk 1 its offset p - chunk_len is at most
    local_size, so the successive-chunk position `offset + chunk_len` is p, not clamped, and every
    query-key distance is the true one. Chunk 2 starts at 2 * chunk_len > chunk_size because
    local_size < chunk_len. The outputs then differ only by float64 rounding of the rotations.
    Uses a full sequence of chunk_size + 1 tokens, which covers every T <= chunk_size + 1.
    Raises AssertionError on a larger difference and returns the max absolute difference.
    """
    if not 0 <= local_size < chunk_size - local_size:
        raise ValueError(
            f"local_size={local_size} must satisfy 0 <= local_size < chunk_size - local_size "
            f"(chunk_size={chunk_size}); otherwise a third chunk starts before chunk_size"
        )
    sequence_length = chunk_size + 1
    q, k, v = random_attention_inputs(sequence_length, n_heads, n_kv_heads, head_dim, seed)
    inv_freq = default_inv_freq(rotary_dim if rotary_dim is not None else head_dim)
    positions = list(range(sequence_length))
    scale = head_dim**-0.5

    dca = reference_dca_attention(q, k, v, positions, chunk_size, local_size, inv_freq, scale)
    plain = reference_plain_attention(q, k, v, positions, inv_freq, scale)
    max_difference = (dca - plain).abs().max().item()
    assert max_difference <= tolerance, (
        f"DCA differs from plain attention by {max_difference:.3e} (> {tolerance:.0e}) with "
        f"chunk_size={chunk_size}, local_size={local_size}, positions 0..{sequence_length - 1}"
    )
    return max_difference


def _chunk_len(chunk_size: int, local_size: int) -> int:
    if local_size < 0 or chunk_size - local_size < 1:
        raise ValueError(
            f"invalid DCA sizes chunk_size={chunk_size}, local_size={local_size}: "
            "expected 0 <= local_size < chunk_size"
        )
    return chunk_size - local_size


def _check_inputs(q, k, v, positions, inv_freq) -> list[int]:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"expected q (T, n_heads, head_dim), k and v (S, n_kv_heads, dim); "
            f"got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q head_dim {q.shape[2]} does not match k head_dim {k.shape[2]}")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"k shape {tuple(k.shape)} and v shape {tuple(v.shape)} differ in (S, n_kv_heads)")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"n_heads={q.shape[1]} is not a multiple of n_kv_heads={k.shape[1]}")
    if 2 * inv_freq.numel() > q.shape[2]:
        raise ValueError(f"inv_freq has {inv_freq.numel()} entries, more than head_dim / 2 = {q.shape[2] // 2}")

    position_list = [int(p) for p in positions]
    if len(position_list) != q.shape[0]:
        raise ValueError(f"got {len(position_list)} positions for {q.shape[0]} queries")
    for p in position_list:
        if not 0 <= p < k.shape[0]:
            raise ValueError(f"query position {p} has no key; expected 0 <= position < S = {k.shape[0]}")
    return position_list


def test_dca_matches_plain_within_chunk_size():
    for chunk_size, local_size in [(12, 4), (9, 0), (8, 3)]:
        assert check_dca_matches_plain_attention(chunk_size, local_size) <= 1e-12


def test_dca_matches_plain_partial_rotary():
    assert check_dca_matches_plain_attention(rotary_dim=8) <= 1e-12


def test_dca_differs_past_chunk_size():
    chunk_size, local_size, head_dim = 12, 4, 16
    q, k, v = random_attention_inputs(chunk_size + 2, 2, 1, head_dim, seed=1)
    inv_freq = default_inv_freq(head_dim)
    positions = [chunk_size + 1]  # offset local_size + 1, so the successive-chunk position is clamped

    dca = reference_dca_attention(q[-1:], k, v, positions, chunk_size, local_size, inv_freq, head_dim**-0.5)
    plain = reference_plain_attention(q[-1:], k, v, positions, inv_freq, head_dim**-0.5)
    assert (dca - plain).abs().max().item() > 1e-6


def test_dca_merge_equals_joint_softmax():
    chunk_size, local_size, head_dim = 8, 3, 16
    sequence_length = 31  # chunk_len 5: six full chunks and one partial chunk
    q, k, v = random_attention_inputs(sequence_length, 4, 2, head_dim, seed=2)
    inv_freq = default_inv_freq(head_dim)
    positions = [0, 4, 5, 9, 10, 14, 22, 29, 30]  # chunk starts and ends, and a decode-like last token
    queries = q[positions]

    merged = reference_dca_attention(queries, k, v, positions, chunk_size, local_size, inv_freq, 0.3)
    joint = reference_dca_attention_joint_softmax(
        queries, k, v, positions, chunk_size, local_size, inv_freq, 0.3
    )
    assert (merged - joint).abs().max().item() <= 1e-12


def test_dca_output_independent_of_query_batch():
    chunk_size, local_size, head_dim = 8, 3, 16
    q, k, v = random_attention_inputs(23, 2, 2, head_dim, seed=3)
    inv_freq = default_inv_freq(head_dim)
    positions = list(range(23))

    full = reference_dca_attention(q, k, v, positions, chunk_size, local_size, inv_freq, 0.25)
    last = reference_dca_attention(q[-1:], k, v, [22], chunk_size, local_size, inv_freq, 0.25)
    assert torch.equal(full[-1:], last)


def test_dca_grouped_query_matches_repeated_kv():
    chunk_size, local_size, head_dim = 8, 3, 16
    q, k, v = random_attention_inputs(20, 4, 2, head_dim, seed=4)
    inv_freq = default_inv_freq(head_dim)
    positions = list(range(20))

    grouped = reference_dca_attention(q, k, v, positions, chunk_size, local_size, inv_freq, 0.25)
    repeated_k = k.repeat_interleave(2, dim=1)
    repeated_v = v.repeat_interleave(2, dim=1)
    repeated = reference_dca_attention(
        q, repeated_k, repeated_v, positions, chunk_size, local_size, inv_freq, 0.25
    )
    assert torch.equal(grouped, repeated)


def test_dca_positions_table():
    # chunk_size 8, local_size 3, chunk_len 5: successive position offset + 5 clamped at 8,
    # inter-chunk position min(9, 8) = 8.
    expected = {
        0: DcaPositions(key=0, intra=0, successive=5, inter=8),
        3: DcaPositions(key=3, intra=3, successive=8, inter=8),
        4: DcaPositions(key=4, intra=4, successive=8, inter=8),
        7: DcaPositions(key=2, intra=2, successive=7, inter=8),
        12: DcaPositions(key=2, intra=2, successive=7, inter=8),
    }
    for position, positions in expected.items():
        assert dca_positions(position, 8, 3) == positions, position

    # With local_size >= chunk_len the inter-chunk position is 2 * chunk_len - 1, below chunk_size.
    assert dca_positions(0, 8, 5).inter == 5


def test_dca_distances_within_chunk_size():
    for chunk_size, local_size in [(8, 3), (8, 5), (7, 0), (6, 5)]:
        chunk_len = chunk_size - local_size
        for p in range(40):
            query_positions = dca_positions(p, chunk_size, local_size)
            for j in range(p + 1):
                chunk_distance = p // chunk_len - j // chunk_len
                by_chunk_distance = (query_positions.intra, query_positions.successive, query_positions.inter)
                query_position = by_chunk_distance[min(chunk_distance, 2)]
                distance = query_position - dca_positions(j, chunk_size, local_size).key
                assert 0 <= distance <= chunk_size, (chunk_size, local_size, p, j, distance)


def test_dca_length_scaling_factor():
    assert dca_length_scaling_factor(1000, 0) == 1.0
    assert dca_length_scaling_factor(1000, 4096) == 1.0
    assert math.isclose(dca_length_scaling_factor(4096 * 4, 4096), 0.1 * math.log(4) + 1.0)


def test_dca_rejects_invalid_inputs():
    q, k, v = random_attention_inputs(6, 2, 1, 8, seed=5)
    inv_freq = default_inv_freq(8)
    cases = [
        dict(positions=list(range(6)), chunk_size=4, local_size=4),  # chunk_len 0
        dict(positions=list(range(5)), chunk_size=4, local_size=1),  # 5 positions for 6 queries
        dict(positions=[0, 1, 2, 3, 4, 6], chunk_size=4, local_size=1),  # position 6 has no key
    ]
    for case in cases:
        try:
            reference_dca_attention(
                q, k, v, case["positions"], case["chunk_size"], case["local_size"], inv_freq, 1.0
            )
        except ValueError:
            continue
        raise AssertionError(f"no ValueError for {case}")
