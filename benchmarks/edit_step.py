"""Seconds per edit step on a model, split by phase, plus the one-off covariance pass.

    python benchmarks/edit_step.py --model smollm2-135m --requests 1 10 --method nmke

Prints one table row per (requests per step) and the peak resident memory of the process.
Requests are the first records of the shipped CounterFact sample.

With ``--z-profile`` it then runs the z optimisation of one more step of the largest batch
three times: once timed, once under ``FlopCounterMode`` (matmul FLOPs, forward and backward)
and once under the torch profiler, and prints its achieved FLOP/s against a float32 matmul
peak measured in the same process, plus the operators the time goes to.
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
from nmke_lightning.editing.values import compute_values
from nmke_lightning.models import load_model
from sweep import mask_bounds, mask_config  # benchmarks/ is on sys.path: the directory of the running script


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: kB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="nmke", choices=["nmke", "alphaedit", "memit"])
    parser.add_argument("--mask-mode", default="restricted", choices=["restricted", "post"])
    parser.add_argument("--mask-bounds", type=mask_bounds, default=None,
                        help="NMKE: lo,hi bounds of both mask ratios (default: MaskConfig's, the paper's 0.3,0.4)")
    parser.add_argument("--layers", default="4,5,6,7,8")
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--steps", type=int, default=2, help="edit steps timed per batch size")
    parser.add_argument("--cov-tokens", type=int, default=20_000)
    parser.add_argument("--v-lr", type=float, default=0.5)
    parser.add_argument("--cache-dir", default=None, help="covariance cache (default: a fresh temp dir)")
    parser.add_argument("--z-profile", action="store_true", help="FLOP/s and operator profile of the z optimisation")
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
    config = EditorConfig(layers=layers, method=args.method, mask_mode=args.mask_mode, v_lr=args.v_lr,
                          mask=mask_config(args.mask_bounds))
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
    if args.z_profile:
        requests = [c.request for c in cases[offset : offset + max(args.requests)]]
        z_profile(lm, requests, state.templates, config)


def matmul_peak_gflops(repeats: int = 20) -> float:
    """Best float32 GEMM rate over a few shapes, measured here (the z loop's largest matmuls
    are [tokens, d] x [d, d_ff]-like; the square one is the library's best case)."""
    best = 0.0
    for m, k, n in [(2048, 2048, 2048), (1024, 576, 1536), (1024, 1536, 576)]:
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            a @ b
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * m * k * n * repeats / (time.perf_counter() - t0) / 1e9)
    return best


def z_profile(lm, requests, templates, config) -> None:
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    def run():
        return compute_values(
            lm.model, lm.spec, lm.tokenizer, requests, templates, config.layers[-1], lr=config.v_lr,
            num_steps=config.v_num_grad_steps, clamp_norm_factor=config.clamp_norm_factor,
            kl_factor=config.kl_factor, weight_decay=config.v_weight_decay, stop_loss=config.v_loss_stop,
        )

    peak = matmul_peak_gflops()
    t0 = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - t0
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    flops = counter.get_total_flops()
    achieved = flops / seconds / 1e9
    print(f"z profile: {len(requests)} requests, {result.steps.float().mean():.1f} mean Adam steps, {seconds:.2f} s")
    print(f"  matmul FLOPs {flops / 1e9:.1f} G -> {achieved:.1f} GFLOP/s; float32 matmul peak here {peak:.1f} GFLOP/s "
          f"-> {100 * achieved / peak:.1f}% of peak")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    print(f"  profiled: matmul kernels {100 * matmul / total:.1f}% of operator self time; top operators:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]:
        print(f"    {e.key:<40} {e.self_cpu_time_total / 1e6:7.2f} s  {100 * e.self_cpu_time_total / total:5.1f}%  "
              f"{e.count} calls")


if __name__ == "__main__":
    main()
