"""The architecture table against real (tiny, random) transformers models of every family."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, BertConfig

from nmke_lightning.editing.arch import ARCHITECTURES, arch_for, get_module, supported_model_types
from nmke_lightning.editing.hooks import StopForward, run_until_stop, trace
from nmke_lightning.models import BUILTIN_MODELS, load_model

TINY = [name for name in BUILTIN_MODELS if name.startswith("tiny-")]


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _reference_norm(module: nn.Module, x: torch.Tensor, kind: str) -> torch.Tensor:
    eps = getattr(module, "eps", None) or module.variance_epsilon
    if kind == "rms":
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    else:
        y = F.layer_norm(x, x.shape[-1:], eps=eps)
    y = y * module.weight
    return y + module.bias if getattr(module, "bias", None) is not None else y


@pytest.fixture(scope="module", params=TINY)
def tiny(request):
    return load_model(request.param)


def test_every_family_has_a_tiny_model():
    families = {load_model(name).spec.family for name in TINY}
    assert families == {spec.family for spec in ARCHITECTURES}
    assert set(supported_model_types()) >= {"llama", "gpt2", "gptj", "gpt_neox"}


def test_templates_resolve(tiny):
    model, spec, config = tiny.model, tiny.spec, tiny.model.config
    assert arch_for(model) is spec
    assert spec.num_layers(model) == config.num_hidden_layers
    for layer in range(spec.num_layers(model)):
        for template in (spec.down_proj, spec.mlp, spec.residual_in):
            get_module(model, template.format(layer))
        assert spec.layer(model, layer) is get_module(model, f"{spec.layers}.{layer}")
    assert get_module(model, spec.unembed) is model.get_output_embeddings()
    assert get_module(model, spec.final_norm).weight.shape == (config.hidden_size,)


def test_norm_kind_matches_the_modules(tiny):
    spec, model = tiny.spec, tiny.model
    x = torch.randn(3, model.config.hidden_size) + 2.0  # non-zero mean tells rms from layer norm
    for path in (spec.final_norm, spec.residual_in.format(0)):
        module = get_module(model, path)
        torch.testing.assert_close(module(x), _reference_norm(module, x, spec.norm_kind))


def test_read_weight_is_d_by_d_ff_and_maps_key_to_output(tiny):
    spec, model = tiny.spec, tiny.model
    d = model.config.hidden_size
    d_ff = spec.d_ff(model)
    assert d_ff in (128, 256)
    down = spec.down_proj_module(model, 1)
    weight = spec.read_weight(model, 1)  # [d, d_ff]
    assert weight.shape == (d, d_ff)
    keys = torch.randn(5, d_ff)  # [n, d_ff]
    bias = down(torch.zeros(1, d_ff))
    torch.testing.assert_close(down(keys) - bias, keys @ weight.T)


def test_add_to_weight_adds_delta_times_key(tiny):
    loaded = load_model(tiny.name)  # a private copy: this test writes into the weights
    model, spec = loaded.model.double(), loaded.spec  # float64: the check below is exact
    d, d_ff = model.config.hidden_size, spec.d_ff(model)
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(7, d_ff, generator=generator, dtype=torch.float64)  # [n, d_ff]
    delta = torch.randn(d, d_ff, generator=generator, dtype=torch.float64)  # [d, d_ff]
    layer = spec.num_layers(model) - 1
    down = spec.down_proj_module(model, layer)
    weights_before = [spec.read_weight(model, i).clone() for i in range(spec.num_layers(model))]
    before = down(keys)
    spec.add_to_weight(model, layer, delta)
    after = down(keys)
    torch.testing.assert_close(after - before, keys @ delta.T, rtol=0, atol=1e-12)
    for i, weight in enumerate(weights_before):
        expected = weight + delta if i == layer else weight
        torch.testing.assert_close(spec.read_weight(model, i), expected, rtol=0, atol=0)


def test_residual_in_feeds_the_mlp(tiny):
    model, spec, tokenizer = tiny.model, tiny.spec, tiny.tokenizer
    batch = tokenizer(["The capital of France is", "Hi"], return_tensors="pt", padding=True)
    B, T = batch["input_ids"].shape
    d, d_ff = model.config.hidden_size, spec.d_ff(model)
    layer = 1
    residual, mlp, down = (t.format(layer) for t in (spec.residual_in, spec.mlp, spec.down_proj))
    with torch.no_grad(), trace(model, inputs=[residual, mlp, down], outputs=[residual]) as acts:
        model(**batch, use_cache=False)
    assert acts.inputs[residual].shape == (B, T, d)
    assert acts.inputs[down].shape == (B, T, d_ff)
    # The pre-MLP norm's output is exactly what the MLP reads.
    torch.testing.assert_close(acts.outputs[residual], acts.inputs[mlp], rtol=0, atol=0)
    assert _hook_count(model) == 0


def test_trace_leaves_no_hook_behind(tiny):
    model, spec, tokenizer = tiny.model, tiny.spec, tiny.tokenizer
    assert _hook_count(model) == 0
    names = [spec.residual_in.format(i) for i in range(spec.num_layers(model))]
    batch = tokenizer(["hello"], return_tensors="pt")

    # Stopped early: only layers up to the stop ran.
    with torch.no_grad(), trace(model, inputs=names, stop_after=spec.mlp.format(0)) as acts:
        run_until_stop(model, **batch)
    assert list(acts.inputs) == names[:1]
    assert _hook_count(model) == 0

    # A forward that fails for real.
    bad = torch.full_like(batch["input_ids"], model.config.vocab_size + 10)
    with pytest.raises(IndexError):
        with torch.no_grad(), trace(model, inputs=names, outputs=names):
            model(input_ids=bad)
    assert _hook_count(model) == 0

    # StopForward escaping the block (no run_until_stop).
    with pytest.raises(StopForward):
        with torch.no_grad(), trace(model, inputs=names, stop_after=spec.mlp.format(0)):
            model(**batch, use_cache=False)
    assert _hook_count(model) == 0


class _ModuleWithConfig(nn.Module):
    def __init__(self, model_type: str):
        super().__init__()
        self.config = SimpleNamespace(model_type=model_type)


@pytest.mark.parametrize(
    ("model", "shown_type"),
    [
        pytest.param(
            lambda: AutoModelForCausalLM.from_config(BertConfig(
                vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64, is_decoder=True,
            )),
            "'bert'",
            id="tiny-bert",
        ),
        pytest.param(lambda: _ModuleWithConfig("bert"), "'bert'", id="module-with-bert-config"),
        pytest.param(lambda: nn.Linear(2, 2), "None", id="module-without-config"),
    ],
)
def test_unsupported_model_lists_the_families(model, shown_type):
    with pytest.raises(ValueError) as info:
        arch_for(model())
    message = str(info.value)
    assert f"model type {shown_type} is not supported" in message
    for spec in ARCHITECTURES:
        assert spec.family in message
        for model_type in spec.model_types:
            assert model_type in message
