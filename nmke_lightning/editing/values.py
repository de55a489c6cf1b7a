"""Context templates and the target values z (METHOD.md, "One edit step", items 1-2)."""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from .arch import ArchSpec, get_module
from .hooks import StopForward, first_output, trace
from .keys import AttributionInputs, attribution_inputs_from_trace, attribution_trace_names
from .requests import EditRequest
from .tokens import PromptBatch, encode, target_ids

DEFAULT_STARTS = ("The", "Therefore", "Because", "I", "You")


@torch.no_grad()
def generate_context_templates(
    model: nn.Module,
    tokenizer,
    starts: tuple[str, ...] = DEFAULT_STARTS,
    per_start: int = 1,
    length: int = 10,
    top_k: int = 5,
    seed: int = 0,
) -> list[str]:
    """``["{}"]`` plus `per_start` top-k samples of `length` tokens from each start word, each
    followed by ". {}". Sampling uses a CPU generator seeded with `seed`, so the templates are
    the same on every device and process; store them with the run.
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    templates = ["{}"]
    for start in starts:
        ids = tokenizer([start] * per_start, add_special_tokens=True, return_tensors="pt")["input_ids"].to(device)
        prompt_len = ids.shape[1]
        for _ in range(length):
            logits = model(input_ids=ids, use_cache=False).logits[:, -1].float().cpu()
            top = logits.topk(top_k, dim=-1)
            choice = torch.multinomial(top.values.softmax(-1), 1, generator=generator)
            ids = torch.cat([ids, top.indices.gather(1, choice).to(device)], dim=1)
        for row in ids:
            text = start + tokenizer.decode(row[prompt_len:], skip_special_tokens=True)
            # Braces would be read as format fields later.
            templates.append(text.replace("{", " ").replace("}", " ") + ". {}")
    return templates


def fill(template: str, request: EditRequest) -> tuple[str, int]:
    """The template with the prompt in place of "{}", and where the subject ends in it."""
    head, tail = template.split("{}", 1)
    return head + request.prompt + tail, len(head) + request.subject_end


def prompt_batch(tokenizer, requests: list[EditRequest], templates: list[str]) -> PromptBatch:
    """Rows ordered request-major: row ``i * len(templates) + t`` is request i in template t."""
    texts, ends = [], []
    for request in requests:
        for template in templates:
            text, end = fill(template, request)
            texts.append(text)
            ends.append(end)
    return encode(tokenizer, texts, ends)


class _Replay(nn.Module):
    """Stands in for a decoder layer: returns a recorded output instead of computing one."""

    def __init__(self, output) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output


@contextlib.contextmanager
def replay_prefix(model: nn.Module, spec: ArchSpec, layer: int, output) -> Iterator[None]:
    """Skip decoder layers ``0..layer`` during the block: they do not depend on the optimised
    delta, so their output is recorded once and replayed (layers below `layer` return it too; the
    model loop only passes it on)."""
    layers = get_module(model, spec.layers)
    originals = [layers[i] for i in range(layer + 1)]
    try:
        for i in range(layer + 1):
            layers[i] = _Replay(output)
        yield
    finally:
        for i, module in enumerate(originals):
            layers[i] = module


@contextlib.contextmanager
def keep_output(model: nn.Module, name: str) -> Iterator[dict]:
    """The raw output (tensor or tuple) of module `name` in the forwards inside the block, the
    last one's under ``"output"`` of the dict yielded (for `replay_prefix`)."""
    kept: dict = {}

    def hook(module, args, output):
        kept["output"] = output

    handle = get_module(model, name).register_forward_hook(hook)
    try:
        yield kept
    finally:
        handle.remove()


def cache_kwargs(model: nn.Module, cache) -> dict:
    """The keyword that hands `cache` to `model.base_model`'s forward: ``cache`` from transformers
    5.2x on, ``past_key_values`` before (the old name warns now and goes in 5.40)."""
    name = "cache" if "cache" in inspect.signature(model.base_model.forward).parameters else "past_key_values"
    return {name: cache}


def output_cache(output):
    """The cache a forward with ``use_cache=True`` returned, under either transformers name."""
    return output["cache"] if "cache" in output.keys() else output["past_key_values"]


@torch.no_grad()
def _record_output(model: nn.Module, name: str, inputs: dict, cache: bool = False):
    """The raw output (tensor or tuple) of module `name`, and the decoder stack's cache.

    Without `cache` the forward stops right after the module and the cache is ``None``; with it,
    the decoder stack (no LM head) runs to the end with ``use_cache=True`` and the cache holds
    every layer's keys and values.
    """
    seen = {}

    def hook(module, args, output):
        seen["output"] = output
        if not cache:
            raise StopForward

    handle = get_module(model, name).register_forward_hook(hook)
    try:
        if cache:
            past = output_cache(model.base_model(**inputs, use_cache=True))
        else:
            past = None
            with contextlib.suppress(StopForward):
                model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return seen["output"], past


def _run_windows(
    model: nn.Module,
    spec: ArchSpec,
    layer: int,
    batch: PromptBatch,
    prefix,
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None,
    rows: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    shift: torch.Tensor,
) -> torch.Tensor:
    """Last hidden states ``[len(rows), S, d]`` of batch `rows` over the position windows
    ``[start, end)``, with `shift` added to `layer`'s output at each row's subject token.

    Window index i of row r is position ``start[r] + i`` (its position id too); windows are
    right-padded to the longest, S, and must hold the subject token. Layers ``0..layer`` are
    replayed from `prefix` (their recorded output for the whole batch). The later layers see
    the positions before a window through a cache made from `prefix_kv` (every layer's keys and
    values from a no-grad forward of the batch; the replayed layers' entries only give the cache
    its length): its slots ``[0, max(start))`` hold positions 0.., and slot j of row r is masked
    unless ``j < start[r]`` (the others are the row's own window positions, stale). Causal
    attention makes the result equal to a full forward at every window position. With all
    ``start == 0`` no cache is used and this is a plain forward of the rows.
    """
    width = int((end - start).max())
    n_past = int(start.max())
    index = torch.arange(width, device=start.device)
    pos = (start[:, None] + index).clamp(max=batch.input_ids.shape[1] - 1)  # [B, S]
    take = (rows[:, None], pos)
    valid = (index < (end - start)[:, None]) & batch.attention_mask[take].bool()
    past_valid = torch.arange(n_past, device=start.device) < start[:, None]
    hidden = first_output(prefix)[take]
    at = (torch.arange(len(rows), device=start.device), batch.lookup[rows] - start)
    hidden = hidden.index_put(at, hidden[at] + shift.to(hidden.dtype))
    output = (hidden, *prefix[1:]) if isinstance(prefix, (tuple, list)) else hidden
    # A fresh cache per call: the layers concatenate the window's (grad-carrying) keys onto it.
    past = DynamicCache([(k[rows, :, :n_past], v[rows, :, :n_past]) for k, v in prefix_kv]) if n_past else None
    with replay_prefix(model, spec, layer, output):
        return model.base_model(
            input_ids=batch.input_ids[take],
            attention_mask=torch.cat([past_valid, valid], dim=1),
            position_ids=pos,
            use_cache=past is not None,
            **cache_kwargs(model, past),
        ).last_hidden_state


GROUP_OVERHEAD_TOKENS = 48
"""What one more padded forward (and its backward) of the windowed layers costs, in tokens: the
windows are split into groups of similar width where that saves more padded tokens than this.
Small batches multiply by every weight matrix for few rows; on SmolLM2 with 2 CPU threads, four
groups of 238 padded tokens in all took about as long as one batch of 420, so a group costs
about 45 tokens (with 48, 10 requests run as two groups and z takes ~12% less time)."""


def window_groups(width: torch.Tensor, overhead: float = GROUP_OVERHEAD_TOKENS) -> list[torch.Tensor]:
    """Partition of the rows (indices into `width`) into groups, each run as one batch padded to
    its widest row, that minimises padded tokens + `overhead` per group.

    An optimal partition only ever groups rows of consecutive widths, so a dynamic programme over
    the distinct widths (ascending) finds it: ``best[b] = min_a best[a] + overhead + w_b * n(a, b]``.
    """
    w = width.cpu()
    values, counts = torch.unique(w, sorted=True, return_counts=True)
    widths, below = values.tolist(), [0, *torch.cumsum(counts, 0).tolist()]
    best, cut = [0.0] + [math.inf] * len(widths), [0] * (len(widths) + 1)
    for b in range(1, len(widths) + 1):
        for a in range(b):
            cost = best[a] + overhead + widths[b - 1] * (below[b] - below[a])
            if cost < best[b]:
                best[b], cut[b] = cost, a
    bounds, b = [], len(widths)
    while b > 0:
        bounds.append((widths[cut[b]], widths[b - 1]))
        b = cut[b]
    return [((w >= lo) & (w <= hi)).nonzero().squeeze(1).to(width.device) for lo, hi in reversed(bounds)]


def _run_window_groups(
    run: Callable[..., torch.Tensor], rows: torch.Tensor, start: torch.Tensor, end: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    """``run(rows, start, end, shift)`` (`_run_windows` with its model, batch and prefix bound) over
    groups of rows of similar window width (`window_groups`), so that short windows (a KL row's
    single token) are not padded to the longest; the result is the same ``[len(rows), S, d]``
    (positions past a row's window hold padding, as there)."""
    groups = window_groups(end - start, GROUP_OVERHEAD_TOKENS)
    if len(groups) == 1:
        return run(rows, start, end, shift)
    width = int((end - start).max())
    parts = []
    for g in groups:
        part = run(rows[g], start[g], end[g], shift[g])
        parts.append(torch.nn.functional.pad(part, (0, 0, 0, width - part.shape[1])))
    order = torch.cat(groups)
    return torch.cat(parts)[torch.argsort(order)]


@dataclass
class ValueResult:
    z: torch.Tensor  # [n, d] float32: target output of the last edited layer at the subject token
    h_init: torch.Tensor  # [n, d] that output before editing
    loss: torch.Tensor  # [n] final total loss per request
    nll: torch.Tensor  # [n] final target NLL per request (mean over templates)
    steps: torch.Tensor  # [n] long: Adam steps taken per request
    history: torch.Tensor  # [n_evals, n] total loss at every evaluation (nan once a request stopped)
    attribution: AttributionInputs | None = None  # read off the set-up forward when asked for


def compute_values(
    model: nn.Module,
    spec: ArchSpec,
    tokenizer,
    requests: list[EditRequest],
    templates: list[str],
    layer: int,
    lr: float = 0.1,
    num_steps: int = 25,
    clamp_norm_factor: float = 0.75,
    kl_factor: float = 0.0625,
    weight_decay: float = 0.5,
    stop_loss: float = 5e-2,
    prefix_cache: bool = True,
    attribution_layers: list[int] | None = None,
) -> ValueResult:
    """Optimise one additive vector per request at `layer`'s output, all requests in one batch.

    Loss per request (METHOD.md): NLL of ``target_new`` averaged over its tokens and the
    templates, plus ``kl_factor * KL(p_now || p_init)`` on "{subject} is a", plus
    ``weight_decay * ||delta|| / ||h_init||^2``. Adam runs per request (elementwise, so one
    optimiser state for all); a request stops as soon as its loss < `stop_loss`, and its delta
    is frozen from then on. After each step ``||delta|| <= clamp_norm_factor * ||h_init||``.
    `num_steps` counts loss evaluations; the last one takes no step (as in ROME/MEMIT).

    Each evaluation runs only the rows of still-active requests, and only the layers after
    `layer` (the earlier ones are replayed from one recorded forward). With `prefix_cache` it
    also runs them only over the positions the delta reaches and a loss reads: from the subject
    token to the last target position (a KL row: the subject token alone), the positions before
    it attending from a key/value cache recorded once (`_run_windows`), in groups of rows of
    similar window width so that little is padded (`window_groups`). ``prefix_cache=False``
    runs the full padded prompts instead; so does a model whose sliding attention window could
    cut into the prompts (the cache's slots are not at their positions' distances). Both give
    the same result up to float rounding.

    With `attribution_layers`, the set-up forward (which runs the whole stack over every
    template of every request when the prefix cache is used) also records the NMKE attribution
    inputs of those layers at each prompt's last token, before the target: the same numbers as
    `read_attribution_inputs` on `prompt_batch` (causal attention: the appended target changes
    nothing before it), without a forward of its own. They are in ``result.attribution`` (None
    when the full-sequence path runs).
    """
    device = next(model.parameters()).device
    n, n_t = len(requests), len(templates)
    if n == 0:
        raise ValueError("compute_values needs at least one request")
    targets = [target_ids(tokenizer, r.target_text) for r in requests]
    texts, ends, suffixes = [], [], []
    for request, tgt in zip(requests, targets):
        for template in templates:
            text, end = fill(template, request)
            texts.append(text)
            ends.append(end)
            suffixes.append(tgt[:-1])
    for request in requests:  # KL prompts, one per request, after all rewriting rows
        texts.append(f"{request.subject} is a")
        ends.append(len(request.subject))
        suffixes.append([])
    batch = encode(tokenizer, texts, ends, suffixes).to(device)
    n_rw = n * n_t
    row_req = torch.cat([torch.arange(n).repeat_interleave(n_t), torch.arange(n)]).to(device)
    seq_len = batch.input_ids.shape[1]

    # Teacher-forced target positions: the prompt's last real token predicts the first target token.
    prompt_lens = batch.last[:n_rw] + 1 - torch.tensor([len(s) for s in suffixes[:n_rw]], device=device)
    max_t = max(len(t) for t in targets)
    tgt_ids = torch.zeros(n_rw, max_t, dtype=torch.long, device=device)
    tgt_mask = torch.zeros(n_rw, max_t, dtype=torch.bool, device=device)
    for i, tgt in enumerate(targets):
        tgt_ids[i * n_t : (i + 1) * n_t, : len(tgt)] = torch.tensor(tgt, device=device)
        tgt_mask[i * n_t : (i + 1) * n_t, : len(tgt)] = True
    pred_pos = (prompt_lens - 1).unsqueeze(1) + torch.arange(max_t, device=device)  # [n_rw, max_t]
    pred_pos = pred_pos.clamp(max=seq_len - 1)

    # Windows of positions each row runs through the layers after `layer`: from the subject token
    # (the delta changes nothing before it) to the last position a loss reads (the last target
    # position of a rewriting row, which is its last real token; the subject token of a KL row).
    start = batch.lookup
    end = torch.cat([batch.last[:n_rw], batch.lookup[n_rw:]]) + 1
    window = getattr(getattr(model, "config", None), "sliding_window", None)
    if window is not None and window < max(seq_len, int(start.max() + (end - start).max())):
        prefix_cache = False
    if not prefix_cache:
        start, end = torch.zeros_like(start), torch.full_like(end, seq_len)

    d = spec.read_weight(model, layer).shape[0]
    delta = torch.zeros(n, d, device=device, dtype=torch.float32, requires_grad=True)
    unembed = get_module(model, spec.unembed)
    names = attribution_trace_names(spec, attribution_layers) if attribution_layers and prefix_cache else []
    with trace(model, inputs=names) as rec:
        prefix, cache = _record_output(model, f"{spec.layers}.{layer}", batch.model_inputs(), cache=prefix_cache)
    attribution = None
    if names:  # the rewriting rows are prompt_batch's rows, in its order, with the target appended
        attribution = attribution_inputs_from_trace(model, spec, rec, attribution_layers,
                                                    torch.arange(n_rw, device=device), prompt_lens - 1)
    del rec
    prefix_kv = [(keys, values) for keys, values, *_ in cache] if prefix_cache else None
    bare_rows = torch.arange(n, device=device) * n_t  # template 0 is "{}": the bare prompt
    h_init = first_output(prefix)[bare_rows, batch.lookup[bare_rows]].detach().float()  # [n, d]

    run = functools.partial(_run_windows, model, spec, layer, batch, prefix, prefix_kv)
    m = torch.zeros_like(delta)
    v = torch.zeros_like(delta)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    active = torch.ones(n, dtype=torch.bool, device=device)
    steps = torch.zeros(n, dtype=torch.long, device=device)
    final_loss = torch.zeros(n, device=device, dtype=torch.float32)
    final_nll = torch.zeros(n, device=device, dtype=torch.float32)
    kl_init = None
    history = []
    for it in range(num_steps):
        # Only the requests still optimised (a stopped one's delta and results are frozen); the
        # LM head runs only where a loss reads it: the target positions and the KL position.
        live = active.nonzero().squeeze(1)
        rw_rows = (live[:, None] * n_t + torch.arange(n_t, device=device)).flatten()
        rows = torch.cat([rw_rows, n_rw + live])
        hidden = _run_window_groups(run, rows, start[rows], end[rows], delta[row_req[rows]])
        n_live_rw = len(rw_rows)
        read = (pred_pos[rw_rows] - start[rw_rows, None]).clamp(max=hidden.shape[1] - 1)
        tgt_hidden = hidden[:n_live_rw].gather(1, read.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        live_ids, live_mask = tgt_ids[rw_rows], tgt_mask[rw_rows]
        tok_logp = unembed(tgt_hidden).float().log_softmax(-1).gather(2, live_ids.unsqueeze(-1)).squeeze(-1)
        nll_rows = -(tok_logp * live_mask).sum(1) / live_mask.sum(1)
        nll = nll_rows.view(len(live), n_t).mean(1)
        kl_rows = rows[n_live_rw:]
        kl_at = torch.arange(n_live_rw, len(rows), device=device), batch.lookup[kl_rows] - start[kl_rows]
        kl_logp = unembed(hidden[kl_at]).float().log_softmax(-1)
        if kl_init is None:
            kl_init = kl_logp.detach()  # the first evaluation has every request, delta = 0
        kl = (kl_logp.exp() * (kl_logp - kl_init[live])).sum(-1)
        decay = weight_decay * delta[live].norm(dim=1) / h_init[live].norm(dim=1).square()
        loss = nll + kl_factor * kl + decay  # [len(live)]
        history.append(final_loss.new_full((n,), float("nan")).index_copy(0, live, loss.detach()))
        final_loss[live] = loss.detach()
        final_nll[live] = nll.detach()
        going = loss.detach() >= stop_loss
        active[live] = going
        if it == num_steps - 1 or not bool(going.any()):
            break
        (grad,) = torch.autograd.grad(loss[going].sum(), delta)
        with torch.no_grad():
            t = it + 1  # every still-active request has taken exactly `it` steps
            a = active.unsqueeze(1)
            m.copy_(torch.where(a, beta1 * m + (1 - beta1) * grad, m))
            v.copy_(torch.where(a, beta2 * v + (1 - beta2) * grad.square(), v))
            step = lr * (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
            new = delta - step
            max_norm = clamp_norm_factor * h_init.norm(dim=1, keepdim=True)
            norm = new.norm(dim=1, keepdim=True)
            new = torch.where(norm > max_norm, new * max_norm / norm, new)
            delta.copy_(torch.where(a, new, delta))
            steps += active.long()
    z = (h_init + delta.detach()).float()
    return ValueResult(z, h_init, final_loss, final_nll, steps, torch.stack(history), attribution)
