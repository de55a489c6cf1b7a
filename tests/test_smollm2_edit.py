"""A real edit on the built-in SmolLM2-135M: Eiffel Tower -> Rome, paraphrase follows, France stays."""

import pytest
import torch

from nmke_lightning.data import sample_path
from nmke_lightning.editing.editor import EditorConfig, EditState, edit_step
from nmke_lightning.editing.requests import EditRequest
from nmke_lightning.editing.stats import layer_covariances
from nmke_lightning.models import load_model

pytestmark = pytest.mark.slow

LAYERS = [4, 5, 6, 7, 8]


def next_token_probs(lm, prompt):
    ids = torch.tensor([lm.tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        return lm.model(input_ids=ids).logits[0, -1].softmax(-1)


def token(lm, text):
    (tid,) = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    return tid


@pytest.mark.parametrize("method", ["nmke", "alphaedit"])
def test_eiffel_tower_moves_to_rome(smollm2, tmp_path_factory, method):
    # A private copy from the cache the fixture filled: the fixture's model must stay unedited.
    lm = load_model("smollm2-135m")
    text = sample_path("wikitext_cov.txt").read_text(encoding="utf-8")
    cov, n_tokens = layer_covariances(lm.model, lm.spec, lm.tokenizer, text, LAYERS, n_tokens=20_000,
                                      cache_dir=tmp_path_factory.getbasetemp() / "stats")
    assert n_tokens == 20_000
    config = EditorConfig(layers=LAYERS, method=method, v_lr=0.5)
    state = EditState.create(lm.model, config, cov, lm.spec)
    request = EditRequest("The Eiffel Tower is located in the city of", "The Eiffel Tower", "Rome", "Paris")
    edit_step(lm.model, lm.tokenizer, [request], config, state)

    rome, paris = token(lm, " Rome"), token(lm, " Paris")
    edited = next_token_probs(lm, request.prompt)
    assert int(edited.argmax()) == rome
    paraphrase = next_token_probs(lm, "The Eiffel Tower can be found in the city of")
    assert paraphrase[rome] > paraphrase[paris]
    assert int(next_token_probs(lm, "The capital of France is").argmax()) == paris

