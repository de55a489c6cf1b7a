"""Hyperparameter sweep for a model's defaults, on the CounterFact *train* sample only.

    python benchmarks/sweep.py --stage values      # v_lr x clamp, z optimisation alone
    python benchmarks/sweep.py --stage layers      # edited layers x lambda, sequential NMKE edits

Never touches the evaluation sample (`counterfact_sample.json`): the cases come from
`counterfact_train_sample.json`, disjoint from it. Results are printed as markdown tables and
written to `benchmarks/results/sweep_<stage>.json`.

Stage "values": the target-value optimisation (METHOD.md, item 2) decides whether an edit can
work at all, and on a small model the reference learning rate does not converge in 25 steps.
For each (v_lr, clamp_norm_factor) it optimises z at the last edited layer for `--cases`
requests, 10 at a time, and reports the mean target probability reached (exp of minus the
mean target NLL), the Adam steps taken and the seconds.

Stage "layers": for each edited-layer window, Tikhonov weight lambda, v_lr and method (NMKE with
restricted masks at each `--mask-bounds`, MEMIT at each covariance weight `--mom2-weight`, or
AlphaEdit), it applies `--cases` edits in steps of `--per-step` and then scores the edited cases
with the probability-comparison protocol (efficacy, generalization, specificity and their
harmonic mean) plus token-accuracy reliability.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from nmke_lightning.data import load_cases, sample_path
from nmke_lightning.editing.editor import EditorConfig, EditState, edit_step
from nmke_lightning.editing.masks import MaskConfig
from nmke_lightning.editing.stats import layer_covariances
from nmke_lightning.editing.values import compute_values, generate_context_templates
from nmke_lightning.evaluation import case_metrics, summarise_metrics, update_case_metrics, write_json
from nmke_lightning.models import load_model

DEFAULT_MOM2_WEIGHT = EditorConfig.__dataclass_fields__["mom2_update_weight"].default


def values_stage(lm, cases, args, on_row=None) -> list[dict]:
    templates = generate_context_templates(lm.model, lm.tokenizer)
    layer = int(args.layers[0].split("-")[1])
    rows = []
    for lr in args.v_lr:
        for clamp in args.clamp:
            probs, steps, t0 = [], [], time.perf_counter()
            for start in range(0, len(cases), 10):
                requests = [c.request for c in cases[start : start + 10]]
                result = compute_values(lm.model, lm.spec, lm.tokenizer, requests, templates, layer, lr=lr,
                                        num_steps=args.v_steps, clamp_norm_factor=clamp)
                probs.append((-result.nll).exp())
                steps.append(result.steps.float())
            prob, step = torch.cat(probs), torch.cat(steps)
            rows.append({"v_lr": lr, "clamp": clamp, "layer": layer, "target_prob": float(prob.mean()),
                         "share_above_0.9": float((prob > 0.9).float().mean()), "steps": float(step.mean()),
                         "seconds": time.perf_counter() - t0})
            print(rows[-1], flush=True)
            if on_row:
                on_row(rows)
    return rows


def layers_stage(lm, cases, args, on_row=None) -> list[dict]:
    windows = [tuple(int(x) for x in w.split("-")) for w in args.layers]
    all_layers = sorted({l for lo, hi in windows for l in range(lo, hi + 1)})
    cache = args.cache_dir or tempfile.mkdtemp(prefix="nmke-sweep-")
    text = sample_path("wikitext_cov.txt").read_text(encoding="utf-8")
    cov, _ = layer_covariances(lm.model, lm.spec, lm.tokenizer, text, all_layers, args.cov_tokens, cache_dir=cache)
    original = {l: lm.spec.down_proj_module(lm.model, l).weight.detach().clone() for l in all_layers}
    rows = []
    bounds = [mask_bounds(b) for b in args.mask_bounds]
    # Each method's own axis: NMKE's mask bounds, MEMIT's covariance weight; AlphaEdit has none.
    axes = {"nmke": [(b, DEFAULT_MOM2_WEIGHT) for b in bounds], "memit": [(None, w) for w in args.mom2_weight]}
    methods = [(m, b, w) for m in args.methods for b, w in axes.get(m, [(None, DEFAULT_MOM2_WEIGHT)])]
    grid = [(w, l2, lr, m) for w in windows for l2 in args.l2 for lr in args.v_lr for m in methods]
    steps = -(-len(cases) // args.per_step)
    for session, ((lo, hi), l2, lr, (method, bound, weight)) in enumerate(grid, 1):
        print(f"[{session}/{len(grid)}] {method}, layers {lo}-{hi}, lambda {l2:g}, v_lr {lr:g}"
              + (f", mask bounds {bound[0]:g}-{bound[1]:g}" if bound else "")
              + (f", covariance weight {weight:g}" if method == "memit" else "")
              + f": {len(cases)} edits in {steps} steps", flush=True)
        layers = list(range(lo, hi + 1))
        config = EditorConfig(layers=layers, method=method, v_lr=lr, clamp_norm_factor=args.clamp[0], l2=l2,
                              mask=mask_config(bound), mom2_update_weight=weight)
        state = EditState.create(lm.model, config, cov, lm.spec)
        t0 = time.perf_counter()
        for step, start in enumerate(range(0, len(cases), args.per_step), 1):
            edit_step(lm.model, lm.tokenizer, [c.request for c in cases[start : start + args.per_step]],
                      config, state)
            print(f"  step {step}/{steps}, {time.perf_counter() - t0:.0f} s", flush=True)
        seconds = time.perf_counter() - t0
        metrics = case_metrics()
        update_case_metrics(metrics, lm.model, lm.tokenizer, cases, None)
        summary = summarise_metrics(metrics)
        values = {k: summary[k]["value"] for k in ("score", "efficacy", "generalization", "specificity", "reliability")}
        mask_name = "-" if bound is None else f"{bound[0]:g}-{bound[1]:g}"
        rows.append({"layers": f"{lo}-{hi}", "l2": l2, "v_lr": lr, "method": method, "mask": mask_name,
                     "mom2_weight": weight if method == "memit" else "-", **values,
                     "seconds_per_edit": seconds / len(cases)})
        print(rows[-1], flush=True)
        if on_row:
            on_row(rows)
        with torch.no_grad():  # undo the session before the next one
            for l in layers:
                lm.spec.down_proj_module(lm.model, l).weight.copy_(original[l])
    return rows


def mask_bounds(text: str) -> tuple[float, float]:
    """``"lo,hi"`` -> the (general and specific) mask ratio bounds, with a clear error."""
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise SystemExit(f"--mask-bounds: expected two comma-separated ratios like 0.3,0.4, got {text!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise SystemExit(f"--mask-bounds: need 0 <= lo <= hi <= 1, got {text!r}")
    return lo, hi


def mask_config(bound: tuple[float, float] | None) -> MaskConfig:
    """The mask with `bound` for both ratios (general and specific); MaskConfig's own for None."""
    return MaskConfig() if bound is None else MaskConfig(general_bounds=bound, specific_bounds=bound)


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["values", "layers"], required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cases", type=int, default=30, help="train cases used")
    parser.add_argument("--v-lr", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0])
    parser.add_argument("--clamp", type=float, nargs="+", default=[0.75, 1.5])
    parser.add_argument("--v-steps", type=int, default=25)
    parser.add_argument("--layers", nargs="+", default=["4-8"], help="edited-layer windows lo-hi (values: last layer of the first)")
    parser.add_argument("--l2", type=float, nargs="+", default=[10.0])
    parser.add_argument("--methods", nargs="+", default=["nmke"], choices=["nmke", "alphaedit", "memit"],
                        help="layers stage: editors compared on the same cases")
    default_bounds = MaskConfig().general_bounds
    parser.add_argument("--mask-bounds", nargs="+", default=[f"{default_bounds[0]:g},{default_bounds[1]:g}"],
                        help="layers stage, NMKE: lo,hi bounds of both mask ratios (default: MaskConfig's)")
    parser.add_argument("--mom2-weight", type=float, nargs="+", default=[DEFAULT_MOM2_WEIGHT],
                        help="layers stage, MEMIT: weights of the key covariance C0 in its solve")
    parser.add_argument("--per-step", type=int, default=10)
    parser.add_argument("--cov-tokens", type=int, default=100_000)
    parser.add_argument("--cache-dir", default=None, help="covariance cache (default: a fresh temp dir)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default=None, help="result file sweep_<name>.json (default: the stage)")
    args = parser.parse_args()

    torch.manual_seed(0)
    lm = load_model(args.model)
    cases = load_cases(sample_path("counterfact_train_sample.json")).cases[: args.cases]
    path = Path(args.out) / f"sweep_{args.name or args.stage}.json"
    stage = values_stage if args.stage == "values" else layers_stage
    # Written after every session, so a sweep stopped part-way keeps the rows it finished.
    rows = stage(lm, cases, args, on_row=lambda rows: save_rows(path, args, len(cases), rows, complete=False))
    save_rows(path, args, len(cases), rows, complete=True)
    print(markdown(rows))


def save_rows(path: Path, args, cases: int, rows: list[dict], complete: bool) -> None:
    """Writes the sweep's rows so far; `complete` says whether every grid point is among them."""
    write_json(path, {"stage": args.stage, "model": args.model, "cases": cases, "complete": complete,
                      "args": vars(args), "rows": rows})  # through a temporary file: never half written


if __name__ == "__main__":
    main()
