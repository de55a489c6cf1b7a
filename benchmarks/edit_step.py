"""Seconds per edit step on a model, split by phase, plus the one-off covariance pass.

    python benchmarks/edit_step.py --model smollm2-135m --requests 1 10 --method nmke

Prints one table row per (requests per step) and the peak resident memory of the process.
Requests are the first records of the shipped CounterFact sample.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

import torch

from nmke_lightning.data import load_cases, sample_path
from nmke_lightning.editing.editor import EditorConfig, EditState, edit_step
from nmke_lightning.editing.stats import layer_covariances
from nmke_lightning.models import load_model


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: kB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="nmke", choices=["nmke", "alphaedit", "memit"])
    parser.add_argument("--mask-mode", default="restricted", choices=["restricted", "post"])
    parser.add_argument("--layers", default="4,5,6,7,8")
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--steps", type=int, default=2, help="edit steps timed per batch size")
    parser.add_argument("--cov-tokens", type=int, default=20_000)
    parser.add_argument("--v-lr", type=float, default=0.5)
    parser.add_argument("--cache-dir", default=None, help="covariance cache (default: a fresh temp dir)")
    args = parser.parse_args()

    torch.manual_seed(0)
    lm = load_model(args.model)
    layers = [int(x) for x in args.layers.split(",")]
    text = sample_path("wikitext_cov.txt").read_text(encoding="utf-8")
    cache = args.cache_dir or tempfile.mkdtemp(prefix="nmke-bench-")
    t0 = time.perf_counter()
    cov, n_tokens = layer_covariances(lm.model, lm.spec, lm.tokenizer, text, layers, args.cov_tokens, cache_dir=cache)
    cov_s = time.perf_counter() - t0
    print(f"model {args.model}  layers {layers}  threads {torch.get_num_threads()}")
    print(f"covariance: {cov_s:.1f} s for {n_tokens} tokens, {len(layers)} layers, one pass")

    cases = load_cases(sample_path("counterfact_sample.json")).cases
    config = EditorConfig(layers=layers, method=args.method, mask_mode=args.mask_mode, v_lr=args.v_lr)
    phases = ["templates", "attribution", "z", "keys", "solve", "memory"]
    print(f"{'req/step':>8} {'s/step':>8} {'s/edit':>8} " + " ".join(f"{p:>11}" for p in phases) + "  z-steps")
    offset = 0
    for n in args.requests:
        state = EditState.create(lm.model, config, cov, lm.spec)
        state.templates = None
        for step in range(args.steps + 1):  # step 0 also generates the templates: reported apart
            requests = [c.request for c in cases[offset : offset + n]]
            offset += n
            t0 = time.perf_counter()
            result = edit_step(lm.model, lm.tokenizer, requests, config, state)
            total = time.perf_counter() - t0
            tag = "first" if step == 0 else ""
            cells = " ".join(f"{result.timings.get(p, 0.0):11.2f}" for p in phases)
            print(f"{n:>8} {total:8.2f} {total / n:8.2f} {cells}  {result.values.steps.float().mean():.1f} {tag}")
    print(f"peak RSS: {peak_rss_gb():.2f} GB")


if __name__ == "__main__":
    main()
