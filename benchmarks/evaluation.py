"""Seconds of the evaluation on the built-in model, split by part.

    python benchmarks/evaluation.py --cases 40 --repeats 2

Times, on the unedited model and the first `--cases` records of the shipped CounterFact sample:
the case metrics (`update_case_metrics`: rewrite, paraphrase and neighbourhood prompts under
teacher forcing), the locality baseline (`locality_predictions`) and general capability
(`update_capability`: fluency, held-out perplexity, fact retention). Prints the figures of each
repeat, the number of teacher-forced rows and their tokens, and the peak resident memory.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from nmke_lightning.data import load_cases, sample_path
from nmke_lightning.evaluation import (
    EvalConfig,
    capability_metrics,
    case_metrics,
    facts_known,
    heldout_facts,
    locality_pairs,
    locality_predictions,
    update_capability,
    update_case_metrics,
)
from nmke_lightning.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=EvalConfig.batch_size)
    args = parser.parse_args()

    lm = load_model(args.model)
    cases = load_cases(sample_path("counterfact_sample.json")).cases[: args.cases]
    config = EvalConfig(batch_size=args.batch_size)
    rows = sum(1 + len(c.paraphrases) + len(locality_pairs(c)) for c in cases)
    print(f"model {args.model}  cases {len(cases)}  threads {torch.get_num_threads()}  batch {config.batch_size}")
    print(f"  ~{rows} prompts (each scored against one to three targets)")
    for repeat in range(args.repeats):
        t0 = time.perf_counter()
        unedited = locality_predictions(lm.model, lm.tokenizer, cases, config.batch_size)
        t1 = time.perf_counter()
        update_case_metrics(case_metrics(), lm.model, lm.tokenizer, cases, unedited, config.batch_size)
        t2 = time.perf_counter()
        facts = heldout_facts(config)
        known = facts_known(lm.model, lm.tokenizer, facts, config.batch_size) if facts else None
        update_capability(capability_metrics(), lm.model, lm.tokenizer, config, [c.prompt for c in cases], facts,
                          known, (0, 1))
        t3 = time.perf_counter()
        print(f"repeat {repeat}: locality baseline {t1 - t0:.2f} s  case metrics {t2 - t1:.2f} s "
              f"({(t2 - t1) / len(cases):.3f} s/case)  capability {t3 - t2:.2f} s")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2:.2f} GB")


if __name__ == "__main__":
    main()
