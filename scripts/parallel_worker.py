"""Run a model file split across the ranks of torchrun and save what rank 0 computes.

test_parity.py launches it to check that tensor and expert parallelism change nothing:

    torchrun --nproc-per-node 2 scripts/parallel_worker.py gemma3 FOLDER OUT.pt [--dtype bfloat16]

Every rank loads its slices of the checkpoint in FOLDER; rank 0 saves the logits of a fixed batch
of token ids and the greedy tokens that follow a fixed prompt. `--seed` adds the tokens that
sampling draws with that seed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("module", help="model file without .py, e.g. gemma3")
    parser.add_argument("folder", type=Path, help="checkpoint folder")
    parser.add_argument("out", type=Path, help="where rank 0 saves its results (torch.save)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tokens", required=True, help="comma-separated token ids: the batch is these ids twice, reversed the second time")
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep-quantized", action="store_true", help="keep FP8/INT4/MXFP4 weights as stored (files that support it)")
    args = parser.parse_args()

    module = importlib.import_module(args.module)
    device = torch.device("cpu")
    module.init_distributed(device)
    config, _ = module.read_config(args.folder)
    options = {"keep_quantized": True} if args.keep_quantized else {}
    model = module.load_model(args.folder, config, device, module.DTYPES[args.dtype], **options)
    ids = [int(t) for t in args.tokens.split(",")]
    with torch.no_grad():
        logits = model(torch.tensor([ids, ids[::-1]]))
    greedy = list(module.generate(model, ids[:6], args.new_tokens))
    sampled = list(module.generate(model, ids[:6], args.new_tokens, temperature=1.0, seed=args.seed)) if args.seed is not None else []
    if module.rank == 0:
        torch.save({"logits": logits.float(), "greedy": greedy, "sampled": sampled, "world_size": module.world_size}, args.out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
