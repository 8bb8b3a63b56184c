"""Compare a model file with `transformers` and llama.cpp on the same weights: load time, memory, speed.

Each measurement runs in a fresh subprocess, so peak RSS and start-up time belong to one engine
only; the engines alternate, and the table reports the median of the repeats (with min-max).

    python scripts/benchmark.py                                  # gemma3.py on the converted Gemma 3 270M
    python scripts/benchmark.py --file smollm3 --model smollm2 --dtype bfloat16 --repeats 5

--model is a name that scripts/convert_gguf.py knows (gemma3, smollm2), or a folder (then
llama.cpp is left out). llama.cpp runs through llama-cpp-python, a benchmark-only dependency
(`pip install llama-cpp-python`, built from source in a few minutes); its GGUF file at the same
precision is written once from the shipped quantised one with llama.cpp's own quantize API.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()  # the worker measures start-to-first-token from here
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

PROMPT_TEXT = (
    "The history of computing is a story of people who wanted machines to do arithmetic for them, "
    "and of the ideas that made those machines smaller, faster and cheaper every decade. "
)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def prompt_ids(encode, length: int) -> list[int]:
    ids = encode(PROMPT_TEXT * (length // 8 + 1))
    return ids[:length]


def run_ours(file: str, folder: Path, dtype_name: str, prompt_len: int, new_tokens: int, compile_step: bool = False) -> dict:
    import torch

    module = importlib.import_module(file)
    start = time.perf_counter()
    config, _ = module.read_config(folder)
    dtype = module.DTYPES[dtype_name]
    # The same order as the model files' command line: tokenizer first, its freed memory returned.
    tokenizer = module.Tokenizer(folder)
    module.release_freed_memory()
    model = module.load_model(folder, config, torch.device("cpu"), dtype)
    load_seconds = time.perf_counter() - start

    prompt = prompt_ids(tokenizer.encode, prompt_len)
    cache = module.KVCache(config, 1, len(prompt) + new_tokens, dtype, torch.device("cpu"))
    decode_step, compile_seconds = None, 0.0
    if compile_step:
        # Compile on a short warm-up run with the same cache shapes, so the timed run reuses the graph.
        start = time.perf_counter()
        decode_step = module.compile_decode_step(model)
        list(module.generate(model, prompt, 3, cache=cache, decode_step=decode_step))
        compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    tokens = module.generate(model, prompt, new_tokens, cache=cache, decode_step=decode_step)
    next(tokens)
    first_token = time.perf_counter()
    count = 1 + sum(1 for _ in tokens)
    end = time.perf_counter()
    return {
        "load_s": load_seconds,
        "prefill_tok_s": len(prompt) / (first_token - start),
        "decode_tok_s": (count - 1) / (end - first_token),
        "first_token_s": first_token - STARTED - compile_seconds,
        "peak_rss_mb": peak_rss_mb(),
        "compile_s": compile_seconds,
    }


def run_transformers(folder: Path, dtype_name: str, prompt_len: int, new_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype_name)).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    load_seconds = time.perf_counter() - start

    prompt = torch.tensor([prompt_ids(tokenizer.encode, prompt_len)])
    settings = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=1, **settings)
        first_token = time.perf_counter()
        start_full = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens, **settings)
        end = time.perf_counter()
    prefill_seconds = first_token - start
    return {
        "load_s": load_seconds,
        "prefill_tok_s": prompt.shape[1] / prefill_seconds,
        # The second call repeats the prefill; subtract it to leave the decode steps alone.
        "decode_tok_s": (new_tokens - 1) / (end - start_full - prefill_seconds),
        "first_token_s": first_token - STARTED,
        "peak_rss_mb": peak_rss_mb(),
    }


def precision_gguf(name: str, dtype_name: str) -> Path:
    """Return the shipped GGUF of checkpoint `name` rewritten by llama.cpp at float32 or bfloat16, written once."""
    import convert_gguf
    import llama_cpp

    target = convert_gguf.CACHE_ROOT / "gguf" / f"{name}-{dtype_name}.gguf"
    if not target.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32 if dtype_name == "float32" else llama_cpp.LLAMA_FTYPE_MOSTLY_BF16
        params.allow_requantize = True
        partial = target.with_suffix(".partial")
        status = llama_cpp.llama_model_quantize(str(convert_gguf.CHECKPOINTS[name]()).encode(), str(partial).encode(), params)
        if status != 0:
            raise SystemExit(f"error: llama.cpp could not write {target} (status {status})")
        partial.rename(target)
    return target


def run_llama_cpp(gguf: Path, prompt_len: int, new_tokens: int) -> dict:
    import os

    from llama_cpp import Llama

    start = time.perf_counter()
    llm = Llama(str(gguf), n_ctx=prompt_len + new_tokens + 8, n_threads=os.cpu_count(), n_batch=512, verbose=False)
    load_seconds = time.perf_counter() - start

    prompt = prompt_ids(lambda text: llm.tokenize(text.encode()), prompt_len)
    start = time.perf_counter()
    tokens = llm.generate(prompt, top_k=1, temp=0.0, reset=True)
    next(tokens)
    first_token = time.perf_counter()
    count = 1
    for _ in tokens:
        count += 1
        if count == new_tokens:
            break
    end = time.perf_counter()
    return {
        "load_s": load_seconds,
        "prefill_tok_s": len(prompt) / (first_token - start),
        "decode_tok_s": (count - 1) / (end - first_token),
        "first_token_s": first_token - STARTED,
        "peak_rss_mb": peak_rss_mb(),
    }


def measure(engine: str, args: argparse.Namespace, folder: Path) -> dict:
    command = [sys.executable, __file__, "--worker", engine, "--file", args.file, "--model", str(folder)]
    command += ["--dtype", args.dtype, "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens)]
    command += ["--compile"] if args.compile else []
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def print_table(results: dict[str, list[dict]], weights_mb: float) -> None:
    engines = list(results)
    rows = [
        ("load time (s)", "load_s"),
        ("start to first token (s)", "first_token_s"),
        ("prefill (tokens/s)", "prefill_tok_s"),
        ("decode (tokens/s)", "decode_tok_s"),
        ("peak RSS (MB)", "peak_rss_mb"),
    ]
    others = engines[1:]
    print("| metric | " + " | ".join(engines) + " | " + " | ".join(f"ours / {e}" for e in others) + " |")
    print("|---" * (len(engines) + len(others) + 1) + "|")
    for label, key in rows:
        values = {e: [r[key] for r in results[e]] for e in engines}
        ratios = [statistics.median(values["ours"]) / statistics.median(values[e]) for e in others]
        print(f"| {label} | " + " | ".join(summary(values[e]) for e in engines) + " | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    compile_seconds = [r["compile_s"] for r in results["ours"]]
    if any(compile_seconds):
        print(f"\ncompile time of our decode step (s): {summary(compile_seconds)}")
    ours_rss = statistics.median(r["peak_rss_mb"] for r in results["ours"])
    print(f"\nweights in the target dtype: {weights_mb:.0f} MB; our peak RSS / weights = {ours_rss / weights_mb:.2f}")


def weight_megabytes(folder: Path, dtype_name: str) -> float:
    from safetensors import safe_open

    bytes_per_value = 4 if dtype_name == "float32" else 2
    count = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                count += math.prod(f.get_slice(key).get_shape())
    return count * bytes_per_value / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", default="gemma3", help="model file to run, without .py (default: gemma3)")
    parser.add_argument("--model", default="gemma3", help="checkpoint folder, or gemma3 / smollm2 for the converted GGUF weights")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="run our decode steps compiled (the model files' --compile); the compile time is reported apart and left out of start-to-first-token")
    parser.add_argument("--worker", choices=["ours", "transformers", "llama.cpp"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    folder = Path(args.model)
    if args.worker == "ours":
        print(json.dumps(run_ours(args.file, folder, args.dtype, args.prompt_len, args.new_tokens, args.compile)))
        return
    if args.worker == "transformers":
        print(json.dumps(run_transformers(folder, args.dtype, args.prompt_len, args.new_tokens)))
        return
    if args.worker == "llama.cpp":
        print(json.dumps(run_llama_cpp(folder, args.prompt_len, args.new_tokens)))
        return

    results = {"ours": [], "transformers": []}
    gguf = None
    if not folder.is_dir():
        import convert_gguf

        folder = convert_gguf.convert(args.model)
        if importlib.util.find_spec("llama_cpp") is not None:
            gguf = precision_gguf(args.model, args.dtype)
            results["llama.cpp"] = []
    for _ in range(args.repeats):
        for engine in results:
            results[engine].append(measure(engine, args, gguf if engine == "llama.cpp" else folder))
    compiled = " with --compile" if args.compile else ""
    print(f"{args.file}.py{compiled} vs transformers on {folder}, {args.dtype}, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, median (min-max) of {args.repeats}\n")
    print_table(results, weight_megabytes(folder, args.dtype))


if __name__ == "__main__":
    main()
