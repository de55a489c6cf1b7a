"""The z optimisation's windowed forward (prefix key/value cache, stopped requests dropped) gives
the same values as the full-sequence forward, on every tiny architecture."""

import functools
import math

import pytest
import torch

from nmke_lightning.editing import values
from nmke_lightning.editing.keys import read_attribution_inputs
from nmke_lightning.editing.tokens import encode
from nmke_lightning.editing.values import (
    _record_output,
    _run_window_groups,
    _run_windows,
    compute_values,
    generate_context_templates,
    prompt_batch,
    window_groups,
)
from nmke_lightning.editing.requests import EditRequest
from nmke_lightning.models import BUILTIN_MODELS, load_model

TINY = sorted(name for name in BUILTIN_MODELS if name.startswith("tiny-"))
# Subjects at the end, the start and the middle of the prompt; targets of 1, 1, 11 and 6 tokens
# (tiny tokenizer).
REQUESTS = [
    EditRequest("We walked towards the Eiffel Tower", "the Eiffel Tower", "city"),
    EditRequest("Tomorrow we fly to Japan", "Japan", "the"),
    EditRequest("Danielle Darrieux was born in the town of", "Danielle Darrieux", "Paris and Rome, of course"),
    EditRequest("In the river near the old school, the council met", "the council", "about the bridge"),
]
# A smooth descent (no weight decay, a small lr) so that float rounding is not amplified by Adam.
KWARGS = dict(layer=2, lr=0.1, num_steps=12, clamp_norm_factor=2.0, weight_decay=0.0, kl_factor=0.5)


@pytest.fixture(scope="module", params=TINY)
def tiny(request):
    return load_model(request.param, seed=0)


def forward_shapes(lm):
    """A list that receives (rows, length) of every forward of the decoder stack, and its hook."""
    shapes = []

    def hook(module, args, kwargs):
        shapes.append(tuple((args[0] if args else kwargs["input_ids"]).shape))

    return shapes, lm.model.base_model.register_forward_pre_hook(hook, with_kwargs=True)


def test_windows_equal_the_full_forward(tiny):
    """Every window position, including the subject token that carries the shift."""
    texts = ["We walked towards the Eiffel Tower and the city", "Japan is a",
             "Danielle Darrieux was born in the town of Paris", "In the river near the old school"]
    subjects = ["We walked towards the Eiffel Tower", "Japan", "Danielle Darrieux", "In the river"]
    batch = encode(tiny.tokenizer, texts, [len(s) for s in subjects])
    layer, rows = 1, torch.tensor([3, 0, 2, 1])  # a permutation: rows are picked, not assumed in order
    prefix, cache = _record_output(tiny.model, f"{tiny.spec.layers}.{layer}", batch.model_inputs(), cache=True)
    prefix_kv = [(keys, values) for keys, values, *_ in cache]
    shift = torch.randn(len(rows), tiny.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    seq_len = batch.input_ids.shape[1]
    zeros = torch.zeros(len(rows), dtype=torch.long)
    full = _run_windows(tiny.model, tiny.spec, layer, batch, prefix, None, rows, zeros, zeros + seq_len, shift)
    start, end = batch.lookup[rows], batch.last[rows] + 1
    assert len(set(start.tolist())) == len(rows) and int((end - start).max()) < seq_len
    window = _run_windows(tiny.model, tiny.spec, layer, batch, prefix, prefix_kv, rows, start, end, shift)
    for i in range(len(rows)):
        expected = full[i, start[i] : end[i]]
        assert torch.allclose(window[i, : end[i] - start[i]], expected, atol=1e-5, rtol=1e-5)


def brute_force_groups(width: list[int], overhead: float) -> float:
    """Least padded tokens + overhead over every partition of the rows (set partitions)."""
    best = math.inf

    def walk(i, groups):
        nonlocal best
        if i == len(width):
            best = min(best, sum(overhead + max(g) * len(g) for g in groups))
            return
        for g in groups:
            g.append(width[i])
            walk(i + 1, groups)
            g.pop()
        groups.append([width[i]])
        walk(i + 1, groups)
        groups.pop()

    walk(0, [])
    return best


@pytest.mark.parametrize("overhead", [0, 3, 8, 100])
def test_window_groups_minimise_padding_over_every_partition(overhead):
    gen = torch.Generator().manual_seed(overhead)
    for _ in range(6):
        width = torch.randint(1, 9, (7,), generator=gen)
        groups = window_groups(width, overhead)
        assert sorted(torch.cat(groups).tolist()) == list(range(len(width)))  # a partition of the rows
        cost = sum(overhead + int(width[g].max()) * len(g) for g in groups)
        assert cost == brute_force_groups(width.tolist(), overhead)
    assert len(window_groups(torch.tensor([4, 4, 4]), 0)) == 1


def test_grouped_windows_equal_one_padded_batch(tiny, monkeypatch):
    monkeypatch.setattr(values, "GROUP_OVERHEAD_TOKENS", 0)  # tiny windows: split wherever it saves padding
    texts = ["We walked towards the Eiffel Tower and the city", "Japan is a", "Japan",
             "Danielle Darrieux was born in the town of Paris", "In the river near the old school"]
    subjects = ["We walked towards the Eiffel Tower", "Japan", "Japan", "Danielle Darrieux", "In the river"]
    batch = encode(tiny.tokenizer, texts, [len(s) for s in subjects])
    layer, rows = 1, torch.tensor([3, 0, 4, 2, 1])
    prefix, cache = _record_output(tiny.model, f"{tiny.spec.layers}.{layer}", batch.model_inputs(), cache=True)
    prefix_kv = [(keys, values) for keys, values, *_ in cache]
    shift = torch.randn(len(rows), tiny.model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    start, end = batch.lookup[rows], batch.last[rows] + 1
    assert len(window_groups(end - start, 0)) > 1
    one = _run_windows(tiny.model, tiny.spec, layer, batch, prefix, prefix_kv, rows, start, end, shift)
    run = functools.partial(_run_windows, tiny.model, tiny.spec, layer, batch, prefix, prefix_kv)
    grouped = _run_window_groups(run, rows, start, end, shift)
    assert grouped.shape == one.shape
    for i in range(len(rows)):
        n = int(end[i] - start[i])
        assert torch.allclose(grouped[i, :n], one[i, :n], atol=1e-5, rtol=1e-5)


def test_prefix_cache_gives_the_full_sequence_values(tiny, monkeypatch):
    monkeypatch.setattr(values, "GROUP_OVERHEAD_TOKENS", 0)
    templates = generate_context_templates(tiny.model, tiny.tokenizer, per_start=1, length=5, seed=3)
    reference = compute_values(tiny.model, tiny.spec, tiny.tokenizer, REQUESTS, templates, stop_loss=0.0, **KWARGS)
    # Halfway between the two lowest final losses: one request stops part-way, the others go on.
    stop = float(reference.loss.sort().values[:2].mean())
    results, shapes = {}, {}
    for prefix_cache in (False, True):
        shapes[prefix_cache], handle = forward_shapes(tiny)
        try:
            results[prefix_cache] = compute_values(tiny.model, tiny.spec, tiny.tokenizer, REQUESTS, templates,
                                                   stop_loss=stop, prefix_cache=prefix_cache, **KWARGS)
        finally:
            handle.remove()
    full, fast = results[False], results[True]
    last = KWARGS["num_steps"] - 1
    assert torch.equal(full.steps, fast.steps)
    assert ((fast.steps > 0) & (fast.steps < last)).any() and (fast.steps == last).any()
    assert torch.allclose(fast.h_init, full.h_init, atol=1e-6)
    assert torch.allclose(fast.z, full.z, atol=1e-5, rtol=1e-5)
    for name in ("loss", "nll", "history"):
        assert torch.allclose(getattr(fast, name), getattr(full, name), atol=1e-5, rtol=1e-5, equal_nan=True), name
    assert torch.equal(fast.history.isnan(), full.history.isnan())

    # After the set-up forward, the loss evaluations run the rows of the requests still active
    # (their templates and their KL prompt): one forward each over the full prompts, or one per
    # window-width group, and then a KL row (a single-token window) is never padded.
    n_t = len(templates)
    live = (~fast.history.isnan()).sum(1)
    assert [b for b, _ in shapes[False][1:]] == (live * (n_t + 1)).tolist()
    assert sum(b for b, _ in shapes[True][1:]) == int((live * (n_t + 1)).sum())
    assert len(shapes[True]) > len(shapes[False]) and any(t == 1 for _, t in shapes[True][1:])
    full_len = shapes[False][0][1]
    assert all(t == full_len for _, t in shapes[False])
    assert all(t < full_len for _, t in shapes[True][1:])


def test_set_up_forward_records_the_attribution_inputs(tiny):
    """The prompts with the target appended give the attribution inputs of the bare prompts."""
    templates = generate_context_templates(tiny.model, tiny.tokenizer, per_start=1, length=5, seed=3)
    layers = [1, 2]
    result = compute_values(tiny.model, tiny.spec, tiny.tokenizer, REQUESTS, templates,
                            **dict(KWARGS, num_steps=2), attribution_layers=layers)
    want = read_attribution_inputs(tiny.model, tiny.spec, prompt_batch(tiny.tokenizer, REQUESTS, templates), layers)
    got = result.attribution
    assert torch.equal(got.targets, want.targets)
    torch.testing.assert_close(got.final_scale, want.final_scale, atol=1e-5, rtol=1e-5)
    for l in layers:
        torch.testing.assert_close(got.resid[l], want.resid[l], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.keys[l], want.keys[l], atol=1e-5, rtol=1e-5)
    full = compute_values(tiny.model, tiny.spec, tiny.tokenizer, REQUESTS, templates, **dict(KWARGS, num_steps=2),
                          attribution_layers=layers, prefix_cache=False)
    assert full.attribution is None  # no whole-stack set-up forward to read them from


def test_a_binding_sliding_window_takes_the_full_sequence_path():
    lm = load_model("tiny-mistral", seed=0)
    lm.model.config.sliding_window = 4
    templates = ["{}", "The river. {}"]
    kwargs = dict(KWARGS, num_steps=3, stop_loss=0.0)
    shapes, handle = forward_shapes(lm)
    try:
        default = compute_values(lm.model, lm.spec, lm.tokenizer, REQUESTS, templates, **kwargs)
    finally:
        handle.remove()
    full = compute_values(lm.model, lm.spec, lm.tokenizer, REQUESTS, templates, prefix_cache=False, **kwargs)
    assert torch.equal(default.z, full.z) and torch.equal(default.history, full.history)
    assert len({t for _, t in shapes}) == 1  # every forward over the full padded prompts


def test_the_cache_goes_in_and_out_under_the_installed_transformers_name():
    from types import SimpleNamespace

    from nmke_lightning.editing.values import cache_kwargs, output_cache

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return None

    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, use_cache=None):
            return None

    marker = object()
    for base, name in ((Old(), "past_key_values"), (New(), "cache")):
        assert cache_kwargs(SimpleNamespace(base_model=base), marker) == {name: marker}
        assert output_cache({name: marker}) is marker
