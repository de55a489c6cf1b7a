"""Context templates and the target values z (METHOD.md, "One edit step", items 1-2)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .arch import ArchSpec, get_module
from .hooks import StopForward, edit_output, first_output
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


@torch.no_grad()
def _record_output(model: nn.Module, name: str, inputs: dict):
    """The raw output (tensor or tuple) of module `name`, stopping the forward right after it."""
    seen = {}

    def hook(module, args, output):
        seen["output"] = output
        raise StopForward

    handle = get_module(model, name).register_forward_hook(hook)
    try:
        model(**inputs, use_cache=False)
    except StopForward:
        pass
    finally:
        handle.remove()
    return seen["output"]


@dataclass
class ValueResult:
    z: torch.Tensor  # [n, d] float32: target output of the last edited layer at the subject token
    h_init: torch.Tensor  # [n, d] that output before editing
    loss: torch.Tensor  # [n] final total loss per request
    nll: torch.Tensor  # [n] final target NLL per request (mean over templates)
    steps: torch.Tensor  # [n] long: Adam steps taken per request
    history: torch.Tensor  # [n_evals, n] total loss at every evaluation (nan once a request stopped)


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
) -> ValueResult:
    """Optimise one additive vector per request at `layer`'s output, all requests in one batch.

    Loss per request (METHOD.md): NLL of ``target_new`` averaged over its tokens and the
    templates, plus ``kl_factor * KL(p_now || p_init)`` on "{subject} is a", plus
    ``weight_decay * ||delta|| / ||h_init||^2``. Adam runs per request (elementwise, so one
    optimiser state for all); a request stops as soon as its loss < `stop_loss`, and its delta
    is frozen from then on. After each step ``||delta|| <= clamp_norm_factor * ||h_init||``.
    `num_steps` counts loss evaluations; the last one takes no step (as in ROME/MEMIT).
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
    rows = torch.arange(len(texts), device=device)

    # Teacher-forced target positions: the prompt's last real token predicts the first target token.
    prompt_lens = batch.last[:n_rw] + 1 - torch.tensor([len(s) for s in suffixes[:n_rw]], device=device)
    max_t = max(len(t) for t in targets)
    tgt_ids = torch.zeros(n_rw, max_t, dtype=torch.long, device=device)
    tgt_mask = torch.zeros(n_rw, max_t, dtype=torch.bool, device=device)
    for i, tgt in enumerate(targets):
        tgt_ids[i * n_t : (i + 1) * n_t, : len(tgt)] = torch.tensor(tgt, device=device)
        tgt_mask[i * n_t : (i + 1) * n_t, : len(tgt)] = True
    pred_pos = (prompt_lens - 1).unsqueeze(1) + torch.arange(max_t, device=device)  # [n_rw, max_t]
    pred_pos = pred_pos.clamp(max=batch.input_ids.shape[1] - 1)

    d = spec.read_weight(model, layer).shape[0]
    delta = torch.zeros(n, d, device=device, dtype=torch.float32, requires_grad=True)
    layer_name = f"{spec.layers}.{layer}"
    base = model.base_model  # the decoder stack without the LM head
    unembed = get_module(model, spec.unembed)
    prefix = _record_output(model, layer_name, batch.model_inputs())
    bare_rows = torch.arange(n, device=device) * n_t  # template 0 is "{}": the bare prompt
    h_init = first_output(prefix)[bare_rows, batch.lookup[bare_rows]].detach().float()  # [n, d]

    def add_delta(h: torch.Tensor) -> torch.Tensor:
        picked = h[rows, batch.lookup] + delta[row_req].to(h.dtype)
        return h.index_put((rows, batch.lookup), picked)

    kl_rows = n_rw + torch.arange(n, device=device)
    m = torch.zeros_like(delta)
    v = torch.zeros_like(delta)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    active = torch.ones(n, dtype=torch.bool, device=device)
    steps = torch.zeros(n, dtype=torch.long, device=device)
    kl_init = None
    history = []
    for it in range(num_steps):
        # Layers up to `layer` are replayed, and the LM head runs only where a loss reads it:
        # the target positions and the KL position (most of the cost otherwise).
        with replay_prefix(model, spec, layer, prefix), edit_output(model, layer_name, add_delta):
            hidden = base(**batch.model_inputs(), use_cache=False).last_hidden_state
        tgt_hidden = hidden[:n_rw].gather(1, pred_pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        tok_logp = unembed(tgt_hidden).float().log_softmax(-1).gather(2, tgt_ids.unsqueeze(-1)).squeeze(-1)
        nll_rows = -(tok_logp * tgt_mask).sum(1) / tgt_mask.sum(1)
        nll = nll_rows.view(n, n_t).mean(1)
        kl_logp = unembed(hidden[kl_rows, batch.lookup[n_rw:]]).float().log_softmax(-1)
        if kl_init is None:
            kl_init = kl_logp.detach()
        kl = (kl_logp.exp() * (kl_logp - kl_init)).sum(-1)
        decay = weight_decay * delta.norm(dim=1) / h_init.norm(dim=1).square()
        loss = nll + kl_factor * kl + decay
        history.append(torch.where(active, loss.detach(), torch.full_like(loss, float("nan"))))
        final_loss = torch.where(active, loss.detach(), final_loss) if it else loss.detach()
        final_nll = torch.where(active, nll.detach(), final_nll) if it else nll.detach()
        active = active & (loss.detach() >= stop_loss)
        if it == num_steps - 1 or not bool(active.any()):
            break
        (grad,) = torch.autograd.grad(loss[active].sum(), delta)
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
    return ValueResult(z, h_init, final_loss, final_nll, steps, torch.stack(history))
