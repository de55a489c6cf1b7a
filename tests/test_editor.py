"""The editing core end to end on tiny random models: values, keys, attribution inputs, one step."""

import pytest
import torch

from nmke_lightning.editing.arch import get_module
from nmke_lightning.editing.attribution import attribution_scores
from nmke_lightning.editing.editor import EditorConfig, EditState, compute_masks, edit_step
from nmke_lightning.editing.keys import read_attribution_inputs, read_keys
from nmke_lightning.editing.masks import neuron_mask
from nmke_lightning.editing.requests import EditRequest
from nmke_lightning.editing.stats import accumulate, corpus_chunks
from nmke_lightning.editing.values import compute_values, generate_context_templates, prompt_batch
from nmke_lightning.models import load_model

CORPUS = "\n".join(
    f"In {1900 + i} the council of town {i % 7} met about the {['river', 'bridge', 'school'][i % 3]}."
    for i in range(40)
)
# Random models route little information through attention, so the tiny-model requests put the
# subject at the end of the prompt (the edited position is the one that predicts the target).
REQUESTS = [
    EditRequest("We walked towards the Eiffel Tower", "the Eiffel Tower", "city"),
    EditRequest("Tomorrow we fly to Japan", "Japan", "the"),
]


def no_hooks_left(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def tiny(request):
    return load_model(request.param, seed=0)


@pytest.fixture(scope="module")
def templates(tiny):
    return generate_context_templates(tiny.model, tiny.tokenizer, per_start=1, length=5, seed=3)


def fresh(tiny):
    return load_model(tiny.name, seed=0)


def covariances(lm, layers, n_tokens=60):
    chunks = corpus_chunks(lm.tokenizer, CORPUS, seq_len=30, n_tokens=n_tokens)
    state = accumulate(lm.model, lm.spec, chunks, layers, pad_id=lm.tokenizer.pad_token_id)
    return {l: state.mean(l) for l in layers}


def test_context_templates_are_seeded(tiny, templates):
    again = generate_context_templates(tiny.model, tiny.tokenizer, per_start=1, length=5, seed=3)
    other = generate_context_templates(tiny.model, tiny.tokenizer, per_start=1, length=5, seed=4)
    assert templates == again and templates != other
    assert templates[0] == "{}" and len(templates) == 6
    assert all(t.endswith(". {}") and t.count("{}") == 1 for t in templates[1:])


def test_batched_values_equal_one_request_at_a_time(tiny, templates):
    kwargs = dict(layer=2, lr=0.05, num_steps=8, clamp_norm_factor=2.0, stop_loss=0.0)
    together = compute_values(tiny.model, tiny.spec, tiny.tokenizer, REQUESTS, templates, **kwargs)
    for i, request in enumerate(REQUESTS):
        alone = compute_values(tiny.model, tiny.spec, tiny.tokenizer, [request], templates, **kwargs)
        assert torch.allclose(together.h_init[i], alone.h_init[0], atol=1e-5)
        assert torch.allclose(together.z[i], alone.z[0], atol=1e-4, rtol=1e-4)
        assert torch.allclose(together.loss[i], alone.loss[0], atol=1e-4)
    assert no_hooks_left(tiny.model)


def test_values_stop_early_per_request_and_respect_the_clamp(tiny, templates):
    probe = compute_values(tiny.model, tiny.spec, tiny.tokenizer, REQUESTS, templates, layer=2, num_steps=1)
    first_loss = probe.history[0]
    # A stopping threshold between the two initial losses stops exactly one request at once.
    stop = float(first_loss.mean())
    res = compute_values(tiny.model, tiny.spec, tiny.tokenizer, REQUESTS, templates, layer=2, lr=0.5,
                         num_steps=6, clamp_norm_factor=0.1, stop_loss=stop)
    done_at_once = first_loss < stop
    assert done_at_once.sum() == 1
    assert torch.equal(res.steps[done_at_once], torch.tensor([0]))
    assert torch.equal(res.z[done_at_once], res.h_init[done_at_once])
    assert int(res.steps[~done_at_once]) >= 1
    shift = (res.z - res.h_init).norm(dim=1)
    assert torch.all(shift <= 0.1 * res.h_init.norm(dim=1) * (1 + 1e-5))


# Subjects in the middle of the prompt, as in most CounterFact records: the keys read at the
# subject must not depend on the tokens after it.
MID_SUBJECT = [
    EditRequest("The Eiffel Tower stands in the middle of", "The Eiffel Tower", "Paris"),
    EditRequest("Japan is an island nation whose capital is", "Japan", "Tokyo"),
]


def loop_keys(tiny, requests, templates, layer, out_layer):
    """Template-mean keys and the bare prompt's layer output at the subject's last token, one
    unpadded prompt at a time over its whole text (a plain loop)."""
    from nmke_lightning.editing.hooks import trace

    name, out_name = tiny.spec.down_proj.format(layer), f"{tiny.spec.layers}.{out_layer}"
    keys, outs = [], []
    for request in requests:
        per_template = []
        for t in templates:
            head = t.split("{}")[0]
            text = t.replace("{}", request.prompt)
            n_subject = len(tiny.tokenizer(head + request.prompt[: request.subject_end])["input_ids"])
            with trace(tiny.model, inputs=[name], outputs=[out_name]) as rec, torch.no_grad():
                tiny.model(input_ids=torch.tensor([tiny.tokenizer(text)["input_ids"]]))
            per_template.append(rec.inputs[name][0, n_subject - 1])
            if t == "{}":
                outs.append(rec.outputs[out_name][0, n_subject - 1])
        keys.append(torch.stack(per_template).mean(0))
    return torch.stack(keys), torch.stack(outs)


@pytest.mark.parametrize("requests", [REQUESTS, MID_SUBJECT], ids=["subject-last", "subject-inside"])
@pytest.mark.parametrize("cut", [False, True], ids=["whole", "through-lookup"])
def test_keys_are_template_means_at_the_subject(tiny, templates, requests, cut):
    batch = prompt_batch(tiny.tokenizer, requests, templates)
    if cut:  # what edit_step reads the keys from
        whole = batch.input_ids.shape[1]
        batch = batch.through_lookup()
        assert batch.input_ids.shape[1] == int(batch.lookup.max()) + 1
        assert (batch.input_ids.shape[1] < whole) == (requests is MID_SUBJECT)
        assert bool((batch.last <= batch.input_ids.shape[1] - 1).all())
    keys, out = read_keys(tiny.model, tiny.spec, batch, [1, 3], len(templates), out_layer=3)
    want_keys, want_out = loop_keys(tiny, requests, templates, 1, 3)
    torch.testing.assert_close(keys[1], want_keys, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)


def test_cutting_a_batch_needs_a_subject_in_every_row(tiny):
    from nmke_lightning.editing.tokens import encode

    batch = encode(tiny.tokenizer, ["a b c", "d e"], [3, None])
    with pytest.raises(ValueError, match="through_lookup: every row needs a subject position"):
        batch.through_lookup()


@pytest.mark.parametrize("layers", [[1, 2, 3], [0, 2]])
def test_keys_read_between_edits_equal_full_forwards(tiny, templates, layers):
    # edit_step reads each layer's keys, edits that layer, reads the next: each read replays the
    # output kept by the one before. Every read must equal a full forward of the model as it is.
    from nmke_lightning.editing.editor import _LayerKeys

    torch.manual_seed(2)
    shape = lambda l: tiny.spec.read_weight(tiny.model, l).shape  # noqa: E731
    changes = {l: torch.randn(shape(l)) * 0.3 for l in layers}
    lm = fresh(tiny)
    want = {}
    for layer in layers:  # plain loop: unpadded full prompts on the model as edited so far
        want[layer] = loop_keys(lm, MID_SUBJECT, templates, layer, 3)
        lm.spec.add_to_weight(lm.model, layer, changes[layer])
    lm = fresh(tiny)
    batch = prompt_batch(lm.tokenizer, MID_SUBJECT, templates).through_lookup()
    read = _LayerKeys(lm.model, lm.spec, batch, len(templates), out_layer=3)
    got = {}
    for layer in layers:
        got[layer] = read(layer)
        lm.spec.add_to_weight(lm.model, layer, changes[layer])
    assert no_hooks_left(lm.model)
    for layer in layers:
        torch.testing.assert_close(got[layer][0], want[layer][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[layer][1], want[layer][1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(want[layers[0]][1], want[layers[-1]][1], atol=1e-3)  # the edits mattered


def test_attribution_inputs_reproduce_the_logits(tiny, templates):
    """lens(final layer output) read at the last real token equals the model's own logits."""
    batch = prompt_batch(tiny.tokenizer, REQUESTS, templates)
    inputs = read_attribution_inputs(tiny.model, tiny.spec, batch, [2], "last_real")
    norm = get_module(tiny.model, tiny.spec.final_norm)
    with torch.no_grad():
        logits = tiny.model(**batch.model_inputs()).logits
    rows = torch.arange(len(batch.last))
    expected = logits[rows, batch.last]
    from nmke_lightning.editing.hooks import trace
    with trace(tiny.model, inputs=[tiny.spec.final_norm]) as rec, torch.no_grad():
        tiny.model(**batch.model_inputs())
    final = rec.inputs[tiny.spec.final_norm][rows, batch.last]
    if tiny.spec.norm_kind == "layer":  # the lens omits LayerNorm's centring and bias; add them back
        final = final - final.mean(-1, keepdim=True)
    lens = (norm.weight * final / inputs.final_scale[:, None]) @ get_module(tiny.model, tiny.spec.unembed).weight.T
    if tiny.spec.norm_kind == "layer":
        lens = lens + norm.bias @ get_module(tiny.model, tiny.spec.unembed).weight.T
    assert torch.allclose(lens, expected, atol=1e-4)
    assert torch.equal(inputs.targets, expected.argmax(-1))
    padded = read_attribution_inputs(tiny.model, tiny.spec, batch, [2], "padded_last")
    shorter = batch.last < batch.input_ids.shape[1] - 1
    assert shorter.any() and not torch.allclose(padded.resid[2][shorter], inputs.resid[2][shorter])
    assert torch.equal(padded.targets, logits[:, -1].argmax(-1))


@pytest.mark.parametrize("method,mask_mode", [("memit", "restricted"), ("alphaedit", "restricted"),
                                              ("nmke", "restricted"), ("nmke", "post")])
def test_one_step_makes_the_new_target_top1(tiny, method, mask_mode):
    lm = fresh(tiny)
    layers = [1, 2]
    config = EditorConfig(layers=layers, method=method, mask_mode=mask_mode, v_lr=0.1, v_num_grad_steps=30,
                          clamp_norm_factor=4.0, kl_factor=0.0, v_weight_decay=0.0, l2=1e-4,
                          mom2_update_weight=1e-3, nullspace_threshold=1e-8, context_length=5)
    # MEMIT needs a full-rank C0 (more corpus tokens than neurons); the projected methods need a
    # null space to write into (fewer).
    n_tokens = 600 if method == "memit" else 60
    state = EditState.create(lm.model, config, covariances(lm, layers, n_tokens), lm.spec)
    before = {l: lm.spec.read_weight(lm.model, l).clone() for l in layers}
    result = edit_step(lm.model, lm.tokenizer, REQUESTS, config, state)
    assert no_hooks_left(lm.model)
    for request in REQUESTS:
        ids = lm.tokenizer(request.prompt)["input_ids"]
        target = lm.tokenizer(request.target_text, add_special_tokens=False)["input_ids"]
        assert len(target) == 1, "tiny-model requests use single-token targets"
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([ids])).logits[0, -1]
        assert int(logits.argmax()) == target[0], request
    for l in layers:  # the step's deltas are exactly what changed, and the state adds them up
        changed = lm.spec.read_weight(lm.model, l) - before[l]
        assert torch.allclose(changed, result.deltas[l], atol=1e-6)
        assert torch.allclose(state.deltas[l], result.deltas[l])
    assert state.steps == 1 and state.edits == 2
    if method == "nmke":
        assert set(result.masks) == set(layers)
        for l in layers:
            zero_rows = result.deltas[l].abs().sum(0) == 0  # columns of delta W = neurons
            assert torch.all(zero_rows[~result.masks[l].mask])
    if method != "memit":  # the memory holds the keys of the edited model (a plain loop over it)
        for l in layers:
            k = loop_keys(lm, REQUESTS, state.templates, l, layers[-1])[0].double()  # [n, d_ff]
            torch.testing.assert_close(state.past_cov[l], k.T @ k, atol=1e-6, rtol=1e-5)


def test_projected_methods_leave_corpus_keys_untouched(tiny):
    """||delta W K0|| ~ 0 for AlphaEdit and restricted NMKE on the model's own corpus keys."""
    layers = [1, 2]
    leaks = {}
    for method, mode in [("alphaedit", "restricted"), ("nmke", "restricted"), ("nmke", "post")]:
        lm = fresh(tiny)
        cov = covariances(lm, layers, n_tokens=60)  # 60 tokens < d_ff: a real null space
        config = EditorConfig(layers=layers, method=method, mask_mode=mode, v_num_grad_steps=5,
                              nullspace_threshold=1e-9, l2=1e-4, context_length=5)
        state = EditState.create(lm.model, config, cov, lm.spec)
        result = edit_step(lm.model, lm.tokenizer, REQUESTS, config, state)
        chunks = corpus_chunks(lm.tokenizer, CORPUS, seq_len=30, n_tokens=60)
        from nmke_lightning.editing.hooks import trace
        name = lm.spec.down_proj.format(1)
        base = load_model(tiny.name, seed=0)
        with trace(base.model, inputs=[name]) as rec, torch.no_grad():
            base.model(input_ids=torch.tensor(chunks))
        k0 = rec.inputs[name].reshape(-1, rec.inputs[name].shape[-1])  # [tokens, d_ff]
        dw = result.deltas[1]
        leaks[(method, mode)] = float((k0 @ dw.T).norm() / (k0.norm() * dw.norm()))
    assert leaks[("alphaedit", "restricted")] < 1e-5
    assert leaks[("nmke", "restricted")] < 1e-5
    assert leaks[("nmke", "post")] > 100 * max(leaks[("alphaedit", "restricted")], 1e-7)


def test_state_round_trip(tiny):
    lm = fresh(tiny)
    config = EditorConfig(layers=[1], method="alphaedit", v_num_grad_steps=3, context_length=3)
    state = EditState.create(lm.model, config, covariances(lm, [1]), lm.spec)
    edit_step(lm.model, lm.tokenizer, REQUESTS[:1], config, state)
    other = EditState.create(lm.model, config, covariances(lm, [1]), lm.spec)
    other.load_state_dict(state.state_dict(include_stats=False))
    assert other.templates == state.templates and other.steps == 1 and other.edits == 1
    assert torch.equal(other.past_cov[1], state.past_cov[1]) and torch.equal(other.deltas[1], state.deltas[1])
    assert torch.equal(state.past_cov[1], state.past_cov[1].T)  # stored as one triangle, restored exactly
    sd = state.state_dict(include_stats=False)
    d_ff = lm.spec.d_ff(lm.model, 1)
    assert sd["past_cov_triu"][1].numel() == d_ff * (d_ff + 1) // 2
    with pytest.raises(ValueError, match="layers"):
        EditState.create(lm.model, EditorConfig(layers=[2]), covariances(lm, [2]), lm.spec).load_state_dict(
            state.state_dict())


def test_config_errors_name_the_option():
    with pytest.raises(ValueError, match="editor.layers must be non-empty"):
        EditorConfig(layers=[])
    with pytest.raises(ValueError, match="editor.method"):
        EditorConfig(layers=[1], method="rome")
    with pytest.raises(ValueError, match="editor.mask_mode"):
        EditorConfig(layers=[1], mask_mode="exact")
    with pytest.raises(ValueError, match="editor.v_lr"):
        EditorConfig(layers=[1], v_lr=0)


def test_masks_on_the_tiny_model(tiny, templates):
    config = EditorConfig(layers=[1, 2])
    masks = compute_masks(tiny.model, tiny.tokenizer, REQUESTS, config, templates)
    for l, m in masks.items():
        assert m.mask.shape == (tiny.spec.d_ff(tiny.model, l),)
        assert torch.equal(m.mask, m.general | m.specific)
        assert 0.3 <= m.general_ratio <= 0.4 and 0.3 <= m.specific_ratio <= 0.4
        assert 0.3 <= m.kept_share <= 0.8
    # Against each layer scored alone, straight from its own inputs and weight.
    spec = tiny.spec
    inputs = read_attribution_inputs(tiny.model, spec, prompt_batch(tiny.tokenizer, REQUESTS, templates), [1, 2])
    norm, unembed = get_module(tiny.model, spec.final_norm), get_module(tiny.model, spec.unembed)
    for l in (1, 2):
        scores = attribution_scores(inputs.resid[l], inputs.keys[l], inputs.final_scale, spec.read_weight(tiny.model, l),
                                    norm.weight, unembed.weight, getattr(unembed, "bias", None), inputs.targets)
        assert torch.equal(masks[l].mask, neuron_mask(scores, config.mask).mask)


def test_step_masks_with_series_and_lens_cache_equal_exact_masks(tiny):
    # edit_step scores neurons with the moment series and a W_U diag(g) W_l kept from the last
    # step; after an edit, its masks must equal exact scoring from scratch on the same model.
    lm = fresh(tiny)
    layers = [1, 2]
    config = EditorConfig(layers=layers, v_lr=0.5, attribution_series_terms=4)
    exact = EditorConfig(layers=layers, attribution_series_terms=0, lens_cache_bytes=0)
    state = EditState.create(lm.model, config, covariances(lm, layers), lm.spec)
    more = [EditRequest("They moved to the old Berlin", "the old Berlin", "river"),
            EditRequest("She sang about Paris", "Paris", "snow")]
    edit_step(lm.model, lm.tokenizer, REQUESTS, config, state)
    assert state.lens_cache is not None and state.lens_cache.builds == len(layers)
    want = compute_masks(lm.model, lm.tokenizer, more, exact, state.templates)
    result = edit_step(lm.model, lm.tokenizer, more, config, state)
    assert state.lens_cache.builds == len(layers) and state.lens_cache.low_rank_updates == len(layers)
    for l in layers:
        assert torch.equal(result.masks[l].mask, want[l].mask)
        assert result.masks[l].general_ratio == pytest.approx(want[l].general_ratio, abs=1e-6)
