"""Seconds of one `compute_values` call (the z optimisation) and the tokens each forward runs.

    python benchmarks/values.py --model smollm2-135m --requests 10 --layer 8 --lr 0.5 --steps 25

Requests are the first records of the shipped CounterFact sample; the templates come from
`generate_context_templates` with its defaults. Every forward of the decoder stack during the
call is counted as rows x padded length: the no-grad set-up forward(s), then the forwards of the
loss evaluations (one per group of similar window width). `--full-sequence` passes
``prefix_cache=False`` (every evaluation over the full padded prompts).
"""

from __future__ import annotations

import argparse
import time

import torch

from nmke_lightning.data import load_cases, sample_path
from nmke_lightning.editing.values import compute_values, generate_context_templates
from nmke_lightning.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--layer", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--full-sequence", action="store_true", help="prefix_cache=False")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    requests = [c.request for c in load_cases(sample_path("counterfact_sample.json")).cases[: args.requests]]
    templates = generate_context_templates(lm.model, lm.tokenizer)
    shapes: list[tuple[bool, int, int]] = []  # (in a loss evaluation, rows, length)

    def count(module, args_, kwargs):
        shapes.append((torch.is_grad_enabled(), *(args_[0] if args_ else kwargs["input_ids"]).shape))

    handle = lm.model.base_model.register_forward_pre_hook(count, with_kwargs=True)
    kwargs = {"prefix_cache": False} if args.full_sequence else {}
    t0 = time.perf_counter()
    try:
        result = compute_values(lm.model, lm.spec, lm.tokenizer, requests, templates, args.layer, lr=args.lr,
                                num_steps=args.steps, **kwargs)
    finally:
        handle.remove()
    seconds = time.perf_counter() - t0
    evals = result.history.shape[0]
    setup = [(b, t) for grad, b, t in shapes if not grad]
    loop = [(b, t) for grad, b, t in shapes if grad]
    print(f"model {args.model}  layer {args.layer}  requests {len(requests)}  templates {len(templates)}  "
          f"threads {torch.get_num_threads()}")
    print(f"compute_values: {seconds:.2f} s, {evals} loss evaluations, steps per request {result.steps.tolist()}")
    print("set-up forwards (rows x length): " + ", ".join(f"{b}x{t}" for b, t in setup))
    print("evaluation forwards (rows x length): " + ", ".join(f"{b}x{t}" for b, t in loop))
    per_eval = sum(b * t for b, t in loop) / evals
    print(f"evaluation forwards: {len(loop)}, padded tokens per evaluation: mean {per_eval:.0f}")
    print(f"final loss {result.loss.tolist()}")


if __name__ == "__main__":
    main()
