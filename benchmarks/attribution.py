"""Seconds of the NMKE neuron attribution per edited layer, on the built-in model's real inputs.

    python benchmarks/attribution.py --requests 10 --repeats 3

Reads the attribution inputs of the first `--requests` records of the shipped CounterFact
sample (every context template: the prompts an edit step scores), builds each layer's lens
product ``W_U diag(g) W_l`` once (as the lens cache holds it between steps), then times
`attribution_scores` per layer: the moment series as configured, and with ``--exact`` also
every pair exactly. Prints, per layer, the seconds of each repeat, the terms the series plan
gives each neuron on average, the share of (prompt, neuron) pairs left to the exact path, and
the largest score difference between the two paths. With ``--update-rank R`` it then times the
lens cache following random rank-R changes of every layer's weight (an edit step of R requests).
"""

from __future__ import annotations

import argparse
import time

import torch

from nmke_lightning.data import load_cases, sample_path
from nmke_lightning.editing.arch import get_module
from nmke_lightning.editing.attribution import LensProductCache, attribution_scores, series_plan, series_radii
from nmke_lightning.editing.editor import EditorConfig
from nmke_lightning.editing.keys import read_attribution_inputs
from nmke_lightning.editing.values import generate_context_templates, prompt_batch
from nmke_lightning.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", default="4,5,6,7,8")
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--exact", action="store_true", help="also time every pair exact, and compare")
    parser.add_argument("--update-rank", type=int, default=0,
                        help="then time the lens cache following `--repeats` random edits of this rank per layer")
    args = parser.parse_args()

    torch.manual_seed(0)
    lm = load_model(args.model)
    model, spec = lm.model, lm.spec
    config = EditorConfig(layers=[int(x) for x in args.layers.split(",")])
    templates = generate_context_templates(model, lm.tokenizer, config.context_starts, config.context_per_start,
                                           config.context_length, seed=config.context_seed)
    requests = [c.request for c in load_cases(sample_path("counterfact_sample.json")).cases[: args.requests]]
    batch = prompt_batch(lm.tokenizer, requests, templates)
    inputs = read_attribution_inputs(model, spec, batch, config.layers)
    norm, unembed = get_module(model, spec.final_norm), get_module(model, spec.unembed)
    n_prompts = int(inputs.targets.numel())
    terms, tol = config.attribution_series_terms, config.attribution_series_tol
    print(f"model {args.model}  prompts {n_prompts}  series terms {terms}  tol {tol}  "
          f"threads {torch.get_num_threads()}")
    cache = LensProductCache()
    radii = torch.tensor(series_radii(terms, tol))
    total = 0.0
    for layer in config.layers:
        weight = spec.read_weight(model, layer)
        t0 = time.perf_counter()
        product = cache.get(layer, weight, norm.weight, unembed.weight)
        build = time.perf_counter() - t0
        common = dict(resid=inputs.resid[layer], keys=inputs.keys[layer], final_scale=inputs.final_scale,
                      weight=weight, norm_weight=norm.weight, unembed=unembed.weight,
                      unembed_bias=getattr(unembed, "bias", None), targets=inputs.targets,
                      amplify=config.amplify_factor, prob_floor=config.prob_floor, lens_product=product,
                      lens_range=cache.row_range(layer))
        seconds = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            scores = attribution_scores(**common, series_terms=terms, series_tol=tol)
            seconds.append(time.perf_counter() - t0)
        total += min(seconds)
        lo, hi = cache.row_range(layer)
        half = (hi - lo) / 2  # [d_ff]
        rho = (config.amplify_factor * inputs.keys[layer] / inputs.final_scale[:, None]).abs() * half
        need, use_series = series_plan(rho, radii, torch.ones(n_prompts, 1, dtype=torch.bool))
        line = (f"layer {layer}: " + " ".join(f"{s:.3f}" for s in seconds) + f" s  (lens product {build:.2f} s)  "
                f"terms/neuron {need.float().mean():.2f}  exact pairs {(~use_series).float().mean():.2%}")
        if args.exact:
            t0 = time.perf_counter()
            exact = attribution_scores(**common, series_terms=0)
            line += f"  exact path {time.perf_counter() - t0:.3f} s, max |diff| {(scores - exact).abs().max():.2e}"
        print(line)
    print(f"attribution of {len(config.layers)} layers (best repeat each): {total:.2f} s")
    if args.update_rank:
        follow_edits(model, spec, cache, config.layers, norm.weight, unembed.weight, args.update_rank, args.repeats)


def follow_edits(model, spec, cache, layers, norm_weight, unembed_weight, rank: int, repeats: int) -> None:
    """Seconds for the lens cache to follow an edit step: every layer's weight gets a seeded
    random change of rank `rank` (the rank an edit step of that many requests writes), then
    `LensProductCache.get` brings each product up to date."""
    generator = torch.Generator().manual_seed(1)
    seconds = []
    for _ in range(repeats):
        with torch.no_grad():
            for layer in layers:
                w = spec.read_weight(model, layer)
                left = torch.randn(w.shape[0], rank, generator=generator) * 1e-3
                spec.add_to_weight(model, layer, left @ torch.randn(rank, w.shape[1], generator=generator))
        t0 = time.perf_counter()
        for layer in layers:
            cache.get(layer, spec.read_weight(model, layer), norm_weight, unembed_weight)
        seconds.append(time.perf_counter() - t0)
    print(f"lens cache after rank-{rank} edits of {len(layers)} layers: " + " ".join(f"{s:.3f}" for s in seconds)
          + f" s  (low-rank updates {cache.low_rank_updates}, rebuilds {cache.builds - len(layers)})")


if __name__ == "__main__":
    main()
