"""Lifelong benchmark runner: methods x datasets x T x edits-per-step, resumable.

    python benchmarks/lifelong.py --methods nmke alphaedit memit --datasets counterfact \\
        --T 100 500 1000 --per-step 1 10

Each combination is one `python -m nmke_lightning fit` session built from a config template
(default `configs/smollm2_{method}_{data}.yaml`) with `data.limit = T` and
`data.batch_size = edits per step`. A session that was interrupted resumes from its
`last.ckpt`; a finished one (its result file exists) is skipped. Results: one
`<out>/<run>.json` per session (its report.json), a markdown table `<out>/results.md` and
`<out>/score_vs_T.png`. Sessions over the same cases (every method and edits-per-step of one T
and dataset) compute the pre-edit baseline once: it is kept in `<runs>/baseline_cache`.
Arguments after `--` are passed to every session. `--status` runs nothing: it prints, for each
session of the grid, whether it is finished, under way (edits and periodic curve so far, from its
last checkpoint) or not started.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

VARIANTS = {
    "nmke": ("nmke", []),
    "nmke-post": ("nmke", ["--model.editor.mask_mode", "post"]),  # the authors' masking, side by side
    "alphaedit": ("alphaedit", []),
    "memit": ("memit", []),
}
"""Benchmark method -> (editor.method, extra options); configs are looked up by editor.method."""

COLUMNS = ("score", "efficacy", "generalization", "specificity", "reliability", "token_generalization",
           "locality_unedited", "fluency", "perplexity", "retention")


def run_id(method: str, data: str, T: int, per_step: int) -> str:
    return f"{method}-{data}-T{T}-b{per_step}"


def session_command(args, method: str, data: str, T: int, per_step: int) -> list[str]:
    run_dir = Path(args.runs) / run_id(method, data, T, per_step)
    editor_method, options = VARIANTS[method]
    config = args.config_template.format(method=editor_method, data=data)
    cmd = [sys.executable, "-m", "nmke_lightning", "fit", "--config", config,
           "--model.editor.method", editor_method, *options, "--data.limit", str(T), "--data.batch_size", str(per_step),
           "--trainer.default_root_dir", str(run_dir), "--checkpoint.dirpath", str(run_dir / "ckpt"),
           "--model.evaluation.every_n_steps", str(max(1, T // per_step // args.curve_points)),
           "--model.evaluation.baseline_cache", str(Path(args.runs) / "baseline_cache")]
    if (run_dir / "ckpt" / "last.ckpt").exists():
        cmd += ["--ckpt_path", str(run_dir / "ckpt" / "last.ckpt")]
    return cmd + list(args.extra)


def variant(name: str) -> str:
    """The benchmark method of a run id (its part before the dataset)."""
    return next(v for v in sorted(VARIANTS, key=len, reverse=True) if name.startswith(v + "-"))


def dataset(name: str) -> str:
    """The dataset of a run id (its part between the method and ``-T``)."""
    return name[len(variant(name)) + 1 :].rsplit("-T", 1)[0]


def series_label(name: str, report: dict) -> str:
    """A run's line in the plot: its method and edits per step."""
    return f"{variant(name)} ({report['protocol']['edits_per_step']}/step)"


def newest_report(run_dir: Path) -> Path | None:
    reports = sorted(run_dir.rglob("report.json"), key=lambda p: p.stat().st_mtime)
    return reports[-1] if reports else None


def session_status(runs: Path, out: Path, name: str, T: int) -> str:
    """One line on a session: finished (its score), under way (its edits and periodic curve so
    far, read from its last checkpoint) or not started. Reads nothing but files."""
    result = out / f"{name}.json"
    if result.exists():
        report = json.loads(result.read_text())
        score = (report["metrics"].get("score") or {}).get("value")
        reliability = (report["metrics"].get("reliability") or {}).get("value")
        return (f"[{name}] finished: {report['protocol']['edits']} edits, score "
                f"{'-' if score is None else f'{score:.3f}'}, reliability "
                f"{'-' if reliability is None else f'{reliability:.3f}'}")
    last = runs / name / "ckpt" / "last.ckpt"
    if not last.exists():
        return f"[{name}] not started" + (" (no checkpoint yet)" if (runs / name).exists() else "")
    import torch

    from nmke_lightning.module import CHECKPOINT_KEY

    saved = torch.load(last, map_location="cpu", weights_only=False, mmap=True)[CHECKPOINT_KEY]
    line = f"[{name}] under way: {saved['edit_state']['edits']} of {T} edits at its last checkpoint"
    for point in (saved.get("evaluation") or {}).get("curve") or []:
        metrics = point["metrics"]
        shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in ("score", "efficacy", "reliability")
                          if metrics.get(k) is not None)
        line += f"\n    after {point['edits']} edits (sample of {point['n']}): {shown}"
    return line


def run_session(name: str, cmd: list[str]) -> bool:
    """Run session `name`'s command to its end; the session never outlives the runner.

    A SIGTERM to the runner (``kill``, a job scheduler's stop) is passed on to the session, which
    ends after its current edit step (Lightning's SIGTERM handling) with its checkpoints kept; the
    runner then exits, and the same command resumes the session from its last checkpoint. An
    interrupt (Ctrl-C) reaches the session from the terminal; should the runner stop any other way
    while the session runs, the session gets a SIGTERM and the runner waits for it to end.
    A session that fails stops the runner (exit status 1) with a message naming the session's status.

    Returns whether a SIGTERM came while the session ran. Lightning ends a session it stopped
    with exit status 0, so the caller tells stopped from finished by the session's report.
    """
    received: list[int] = []
    child = None

    def forward(signum, frame):
        received.append(signum)
        if child is not None:
            child.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)  # before the session starts: no window without it
    try:
        child = subprocess.Popen(cmd)
        if received:  # came while the session was being started
            child.send_signal(signal.SIGTERM)
        status = child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if child is not None and child.poll() is None:
            child.terminate()
            child.wait()
    if status != 0:
        raise SystemExit(stopped(name) if received else
                         f"[{name}] session failed with exit status {status} (its output is above)")
    return bool(received)


def stopped(name: str) -> str:
    return f"[{name}] stopped by SIGTERM; run the same command to resume it from its last checkpoint"


def table(results: dict[str, dict]) -> str:
    head = "| run | method | T | edits/step | " + " | ".join(COLUMNS) + " | s/edit |"
    rows = [head, "|" + "---|" * (len(COLUMNS) + 5)]
    for name, report in sorted(results.items()):
        proto, metrics = report["protocol"], report["metrics"]
        cells = []
        for column in COLUMNS:
            value = (metrics.get(column) or {}).get("value")
            cells.append("-" if value is None else f"{value:.3g}")
        per_edit = sum(report["timings"]["seconds_per_edit"].values())
        rows.append(f"| {name} | {variant(name)} | {proto['steps'] * proto['edits_per_step']} | "
                    f"{proto['edits_per_step']} | " + " | ".join(cells) + f" | {per_edit:.2f} |")
    return "\n".join(rows) + "\n"


def collect(out: Path) -> dict[str, dict]:
    """Every finished session's report in `out` (files named like a run id), by run id."""
    pattern = re.compile(rf"({'|'.join(map(re.escape, VARIANTS))})-(\w+)-T(\d+)-b(\d+)")
    return {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if pattern.fullmatch(p.stem)}


def plot(results: dict[str, dict], path: Path) -> None:
    """One panel per dataset: the harmonic-mean score after all edits against T (reliability
    where a dataset has no score, as zsRE without true targets), a line per method and
    edits-per-step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    datasets = sorted({dataset(name) for name in results}) or ["none"]
    fig = Figure(figsize=(7 * len(datasets), 4))
    FigureCanvasAgg(fig)
    labels = sorted({series_label(n, r) for n, r in results.items()})
    color = {label: f"C{i % 10}" for i, label in enumerate(labels)}  # one colour per method in every panel
    for i, data in enumerate(datasets):
        ax = fig.add_subplot(1, len(datasets), i + 1)
        runs = {n: r for n, r in results.items() if dataset(n) == data}
        metric = "score" if any((r["metrics"].get("score") or {}).get("value") is not None
                                for r in runs.values()) else "reliability"
        series: dict[str, list[tuple[int, float]]] = {}
        for name, report in runs.items():
            value = (report["metrics"].get(metric) or {}).get("value")
            if value is not None:
                series.setdefault(series_label(name, report), []).append((report["protocol"]["edits"], value))
        for label, points in sorted(series.items()):
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=label, color=color[label])
        ax.set_title(data)
        ax.set_xlabel("T (edits)")
        ax.set_ylabel(f"{'harmonic-mean score' if metric == 'score' else metric} after all edits")
        ax.set_ylim(0, 1)
        if series:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["nmke", "alphaedit", "memit"],
                        choices=list(VARIANTS))
    parser.add_argument("--datasets", nargs="+", default=["counterfact"], choices=["counterfact", "zsre"])
    parser.add_argument("--T", nargs="+", type=int, default=[100, 500, 1000], dest="T")
    parser.add_argument("--per-step", nargs="+", type=int, default=[1, 10])
    parser.add_argument("--config-template", default="configs/smollm2_{method}_{data}.yaml")
    parser.add_argument("--curve-points", type=int, default=5, help="periodic evaluations per session")
    parser.add_argument("--runs", default="benchmarks/runs", help="session folders (checkpoints, logs)")
    parser.add_argument("--out", default="benchmarks/results", help="result JSONs, table and plot")
    parser.add_argument("--status", action="store_true",
                        help="only print how far each session is (finished, under way with its curve so far, "
                             "not started); runs nothing and writes nothing")
    args = parser.parse_args(argv)
    args.extra = extra
    for t in args.T + args.per_step:
        if t < 1:
            raise SystemExit(f"--T and --per-step take positive integers, got {t}")
    out = Path(args.out)
    grid = [(method, data, T, per_step) for data in args.datasets for method in args.methods
            for per_step in args.per_step for T in args.T]
    if args.status:
        for method, data, T, per_step in grid:
            print(session_status(Path(args.runs), out, run_id(method, data, T, per_step), T))
        return {}
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    for method, data, T, per_step in grid:
        name = run_id(method, data, T, per_step)
        result = out / f"{name}.json"
        if not result.exists():
            cmd = session_command(args, method, data, T, per_step)
            print(f"[{name}] {' '.join(cmd)}", flush=True)
            stop = run_session(name, cmd)
            report = newest_report(Path(args.runs) / name)
            if report is None:
                raise SystemExit(stopped(name) if stop else f"[{name}] finished without a report.json")
            shutil.copyfile(report, result)
            if stop:
                raise SystemExit(f"[{name}] finished; stopped by SIGTERM before the next session")
        results[name] = json.loads(result.read_text())
    # The table and the plot cover every finished session in `out`, not only this invocation's.
    everything = collect(out)
    (out / "results.md").write_text(table(everything), encoding="utf-8")
    plot(everything, out / "score_vs_T.png")
    print(table(everything))
    return results


if __name__ == "__main__":
    main()
