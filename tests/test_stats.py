"""Covariance statistics: one pass for all layers, shards add up, resume, cache, projector."""

import pytest
import torch

from nmke_lightning.editing.hooks import trace
from nmke_lightning.editing.solve import nullspace_basis
from nmke_lightning.editing.stats import (
    CovarianceState,
    accumulate,
    corpus_chunks,
    layer_covariances,
)
from nmke_lightning.models import load_model

TEXT = "\n".join(
    f"Line {i}: the quick brown fox number {i * 7 % 13} jumps over the lazy dog in town {i % 5}."
    for i in range(60)
)
LAYERS = (1, 3)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama", seed=0)


def brute_force_cov(lm, chunks, layer):
    """Plain loop: one sequence at a time, every token's key added separately."""
    name = lm.spec.down_proj.format(layer)
    total = torch.zeros(lm.spec.d_ff(lm.model, layer), lm.spec.d_ff(lm.model, layer), dtype=torch.float64)
    count = 0
    for chunk in chunks:
        with trace(lm.model, inputs=[name]) as rec, torch.no_grad():
            lm.model(input_ids=torch.tensor([chunk]))
        for k in rec.inputs[name][0].to(torch.float64):
            total += torch.outer(k, k)
            count += 1
    return total / count, count


def test_one_pass_equals_per_token_loop(tiny):
    chunks = corpus_chunks(tiny.tokenizer, TEXT, seq_len=40, n_tokens=300)
    assert sum(map(len, chunks)) == 300 and len(chunks[-1]) == 300 - 40 * 7
    state = accumulate(tiny.model, tiny.spec, chunks, LAYERS, batch_size=3, pad_id=tiny.tokenizer.pad_token_id)
    assert state.count == 300 and state.done
    for layer in LAYERS:
        expected, count = brute_force_cov(tiny, chunks, layer)
        assert count == 300
        assert torch.allclose(state.mean(layer), expected, rtol=1e-5, atol=1e-9)


def test_two_shards_add_up_to_one_pass(tiny):
    chunks = corpus_chunks(tiny.tokenizer, TEXT, seq_len=32, n_tokens=250)
    pad = tiny.tokenizer.pad_token_id
    whole = accumulate(tiny.model, tiny.spec, chunks, LAYERS, batch_size=1, pad_id=pad)
    shards = [accumulate(tiny.model, tiny.spec, chunks, LAYERS, batch_size=1, shard=(r, 2), pad_id=pad) for r in range(2)]
    merged = shards[0] + shards[1]
    assert merged.count == whole.count == 250
    for layer in LAYERS:
        assert torch.allclose(merged.sums[layer], whole.sums[layer], rtol=1e-12, atol=1e-12)


def test_resume_mid_pass_equals_uninterrupted(tiny, tmp_path):
    chunks = corpus_chunks(tiny.tokenizer, TEXT, seq_len=32, n_tokens=256)
    pad = tiny.tokenizer.pad_token_id
    whole = accumulate(tiny.model, tiny.spec, chunks, LAYERS, batch_size=2, pad_id=pad)

    class Killed(Exception):
        pass

    def kill_after_two(state):
        state.save(tmp_path / "partial.safetensors")
        if state.next_chunk == 4:
            raise Killed

    with pytest.raises(Killed):
        accumulate(tiny.model, tiny.spec, chunks, LAYERS, batch_size=2, on_batch=kill_after_two, pad_id=pad)
    saved = CovarianceState.load(tmp_path / "partial.safetensors")
    assert saved.next_chunk == 4 and not saved.done
    resumed = accumulate(tiny.model, tiny.spec, chunks, LAYERS, batch_size=2, state=saved, pad_id=pad)
    assert resumed.count == whole.count
    for layer in LAYERS:  # BLAS may round differently on the reloaded (differently aligned) buffer
        assert torch.allclose(resumed.sums[layer], whole.sums[layer], rtol=1e-12, atol=1e-15)


def test_cache_is_reused_and_keyed(tiny, tmp_path):
    cov, n = layer_covariances(tiny.model, tiny.spec, tiny.tokenizer, TEXT, LAYERS, 200, 32, cache_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.rglob("*.safetensors"))
    assert files == ["layer1.safetensors", "layer3.safetensors"] and n == 200
    # A second call reads the cache: identical tensors, and no forward pass (hooks would fail).
    calls = []
    handle = tiny.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        again, n2 = layer_covariances(tiny.model, tiny.spec, tiny.tokenizer, TEXT, LAYERS, 200, 32, cache_dir=tmp_path)
    finally:
        handle.remove()
    assert not calls and n2 == 200
    assert all(torch.equal(cov[l], again[l].to(cov[l].device)) for l in LAYERS)
    # Another token budget is another cache entry.
    layer_covariances(tiny.model, tiny.spec, tiny.tokenizer, TEXT, (1,), 120, 32, cache_dir=tmp_path)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 3


def test_projector_annihilates_corpus_keys(tiny):
    # 100 tokens < d_ff: the keys span a proper subspace, and the projector removes all of it.
    chunks = corpus_chunks(tiny.tokenizer, TEXT, seq_len=50, n_tokens=100)
    name = tiny.spec.down_proj.format(2)
    state = accumulate(tiny.model, tiny.spec, chunks, (2,), pad_id=tiny.tokenizer.pad_token_id)
    threshold = 1e-9
    basis = nullspace_basis(state.mean(2), threshold)
    k = basis.shape[1]
    assert tiny.spec.d_ff(tiny.model, 2) - 100 <= k < tiny.spec.d_ff(tiny.model, 2)
    projector = basis @ basis.T
    with trace(tiny.model, inputs=[name]) as rec, torch.no_grad():
        tiny.model(input_ids=torch.tensor(chunks))
    keys = rec.inputs[name].reshape(-1, projector.shape[0]).to(torch.float64)  # [tokens, d_ff]
    # ||K0 P||^2 = N * (sum of the eigenvalues below the threshold) <= N * k * threshold.
    leaked = float((keys @ projector).square().sum())
    assert leaked <= 100 * k * threshold
    assert leaked / float(keys.square().sum()) < 1e-8
