"""The lifelong benchmark runner on the tiny model: one session per combination, resumable."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_SESSION = """
import os, signal, sys, time
from pathlib import Path
out, status = Path(sys.argv[1]), int(sys.argv[2])
def stop(signum, frame):
    (out / "session-stopped").write_text(str(signum))
    sys.exit(status)
signal.signal(signal.SIGTERM, stop)
(out / "session-started").write_text(str(os.getpid()))
if status < 0:
    sys.exit(-status)
time.sleep(120)
"""
"""Stands in for a `fit` session: records that it started, and whether and how it was stopped;
it exits with argv[2] when stopped, or at once with -argv[2] when that is negative."""


def run_runner_session(tmp_path: Path, status: int, stop: bool) -> subprocess.CompletedProcess:
    """`lifelong.run_session` over the fake session in a runner process of its own, sent a SIGTERM
    (if `stop`) once the session has started."""
    script = ("import sys, lifelong\n"
              f"print('returned', lifelong.run_session('fake-T1-b1', [sys.executable, '-c', {FAKE_SESSION!r}, "
              f"{str(tmp_path)!r}, '{status}']))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT)]))
    runner = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        if stop:
            deadline = time.monotonic() + 60
            while not (tmp_path / "session-started").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            runner.send_signal(signal.SIGTERM)
        out, err = runner.communicate(timeout=60)
    finally:
        runner.kill()
    return subprocess.CompletedProcess(runner.args, runner.returncode, out, err)


@pytest.mark.parametrize("status", [3, 0])
def test_sigterm_to_the_runner_stops_its_session(tmp_path, status):
    done = run_runner_session(tmp_path, status, stop=True)
    # The session got the SIGTERM (the runner waited for it: it no longer runs).
    assert (tmp_path / "session-stopped").read_text() == str(int(signal.SIGTERM))
    if status:  # the session failed on the way out: the runner exits and says how to resume
        assert done.returncode == 1 and "returned" not in done.stdout
        assert ("[fake-T1-b1] stopped by SIGTERM; run the same command to resume it from its last checkpoint"
                in done.stderr)
    else:  # as Lightning ends a stopped session: the caller looks for its report (test below)
        assert done.returncode == 0 and done.stdout == "returned True\n"


def test_a_failed_session_stops_the_runner_with_its_status(tmp_path):
    done = run_runner_session(tmp_path, -2, stop=False)
    assert done.returncode == 1 and not (tmp_path / "session-stopped").exists()
    assert "[fake-T1-b1] session failed with exit status 2 (its output is above)" in done.stderr


def test_runner_stops_after_a_session_stopped_by_sigterm(load_benchmark, tmp_path, monkeypatch):
    runner = load_benchmark("lifelong")
    args = ["--methods", "nmke", "memit", "--T", "4", "--per-step", "2", "--config-template", "configs/tiny_cpu.yaml",
            "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    calls = []
    monkeypatch.setattr(runner, "run_session", lambda name, cmd: calls.append(name) or True)  # a SIGTERM came
    # Stopped part way (no report): nothing is collected and the next session does not start.
    with pytest.raises(SystemExit, match=re.escape("[nmke-counterfact-T4-b2] stopped by SIGTERM; run the same")):
        runner.main(args)
    assert calls == ["nmke-counterfact-T4-b2"] and not list((tmp_path / "out").glob("*.json"))
    # Finished as the SIGTERM came: its result is kept, and still the next session does not start.
    report = tmp_path / "runs" / "nmke-counterfact-T4-b2" / "lightning_logs" / "version_0" / "report.json"
    report.parent.mkdir(parents=True)
    report.write_text('{"edits": 4}')
    with pytest.raises(SystemExit, match=re.escape("[nmke-counterfact-T4-b2] finished; stopped by SIGTERM before")):
        runner.main(args)
    assert calls == ["nmke-counterfact-T4-b2"] * 2
    assert json.loads((tmp_path / "out" / "nmke-counterfact-T4-b2.json").read_text()) == {"edits": 4}


def test_runner_writes_results_and_skips_finished_sessions(load_benchmark, tmp_path, monkeypatch, capsys):
    runner = load_benchmark("lifelong")
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = ["--methods", "nmke", "memit", "--T", "4", "--per-step", "2", "--curve-points", "2",
            "--config-template", "configs/tiny_cpu.yaml",
            "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
            "--", "--model.stats.cache_dir", str(tmp_path / "stats"), "--progress.refresh_rate", "0",
            "--model.stats.n_tokens", "600"]  # MEMIT needs a full-rank covariance
    results = runner.main(args)
    assert sorted(results) == ["memit-counterfact-T4-b2", "nmke-counterfact-T4-b2"]
    for report in results.values():
        assert report["protocol"]["edits"] == 4 and report["protocol"]["edits_per_step"] == 2
        assert [p["edits"] for p in report["curve"]] == [2, 4]  # 2 steps, 2 curve points: every step
    assert {r["method"] for r in results.values()} == {"nmke", "memit"}
    # Both sessions edit the same 4 cases: the second read the first one's pre-edit baseline.
    assert len(list((tmp_path / "runs" / "baseline_cache").glob("baseline-*.pt"))) == 1
    nmke, memit = results["nmke-counterfact-T4-b2"], results["memit-counterfact-T4-b2"]
    assert json.dumps(nmke["baseline"]) == json.dumps(memit["baseline"])
    md = (tmp_path / "out" / "results.md").read_text()
    assert "nmke-counterfact-T4-b2" in md and "memit-counterfact-T4-b2" in md
    assert (tmp_path / "out" / "score_vs_T.png").read_bytes().startswith(b"\x89PNG")
    # Finished sessions are not run again.
    stamps = {p: p.stat().st_mtime for p in (tmp_path / "out").glob("*.json")}
    # The table covers every finished session in the folder (another dataset, from an earlier
    # invocation), and other JSON files there are left out.
    (tmp_path / "out" / "nmke-zsre-T4-b2.json").write_text(json.dumps(nmke))
    (tmp_path / "out" / "sweep_layers.json").write_text("{}")
    calls = []
    monkeypatch.setattr(runner, "run_session", lambda *a: calls.append(a))
    runner.main(args)
    assert not calls and all(p.stat().st_mtime == t for p, t in stamps.items())
    md = (tmp_path / "out" / "results.md").read_text()
    assert "nmke-zsre-T4-b2" in md and "sweep" not in md and md.count("\n| ") == 3  # the rows after the header

    # --status: finished sessions from their result, an unfinished one from its last checkpoint
    # (here the session's final one: the same curve as its report), the rest not started.
    (tmp_path / "out" / "nmke-counterfact-T4-b2.json").unlink()
    (tmp_path / "runs" / "memit-counterfact-T8-b2").mkdir()
    written = {p: p.stat().st_mtime for p in (tmp_path / "out").iterdir()}
    capsys.readouterr()
    assert runner.main(["--status", *args[:args.index("--T")], "--T", "4", "8", *args[args.index("--T") + 2 :]]) == {}
    lines = capsys.readouterr().out.splitlines()
    assert not calls and {p: p.stat().st_mtime for p in (tmp_path / "out").iterdir()} == written
    score = memit["metrics"]["score"]["value"]
    assert f"[memit-counterfact-T4-b2] finished: 4 edits, score {score:.3f}" in lines[4]
    assert lines[0] == "[nmke-counterfact-T4-b2] under way: 4 of 4 edits at its last checkpoint"
    for line, point in zip(lines[1:3], nmke["curve"]):
        want = ", ".join(f"{k} {point['metrics'][k]:.3f}" for k in ("score", "efficacy", "reliability"))
        assert line == f"    after {point['edits']} edits (sample of {point['n']}): {want}"
    assert lines[3] == "[nmke-counterfact-T8-b2] not started"
    assert lines[5] == "[memit-counterfact-T8-b2] not started (no checkpoint yet)" and len(lines) == 6


def test_interrupted_session_resumes_from_its_last_checkpoint(load_benchmark, tmp_path):
    runner = load_benchmark("lifelong")
    ckpt = tmp_path / "runs" / "nmke-counterfact-T4-b2" / "ckpt"
    ckpt.mkdir(parents=True)
    (ckpt / "last.ckpt").write_bytes(b"")
    args = runner.argparse.Namespace(runs=str(tmp_path / "runs"), config_template="configs/tiny_cpu.yaml",
                                     curve_points=1, extra=[])
    cmd = runner.session_command(args, "nmke", "counterfact", 4, 2)
    assert cmd[-2:] == ["--ckpt_path", str(ckpt / "last.ckpt")]
    assert cmd[cmd.index("--data.limit") + 1] == "4" and cmd[cmd.index("--data.batch_size") + 1] == "2"


def test_post_mask_variant_runs_nmke_with_the_authors_masking(load_benchmark, tmp_path):
    runner = load_benchmark("lifelong")
    args = runner.argparse.Namespace(runs=str(tmp_path / "runs"), config_template="configs/smollm2_{method}_{data}.yaml",
                                     curve_points=1, extra=[])
    cmd = runner.session_command(args, "nmke-post", "zsre", 100, 10)
    assert cmd[cmd.index("--config") + 1] == "configs/smollm2_nmke_zsre.yaml"
    assert cmd[cmd.index("--model.editor.method") + 1] == "nmke"
    assert cmd[cmd.index("--model.editor.mask_mode") + 1] == "post"
    assert str(tmp_path / "runs" / "nmke-post-zsre-T100-b10") in cmd
    assert runner.variant("nmke-post-zsre-T100-b10") == "nmke-post"
    assert runner.variant("nmke-zsre-T100-b10") == "nmke"
    assert runner.variant("memit-counterfact-T1000-b1") == "memit"
