"""Tokenising prompts into right-padded batches that remember where the subject ends.

Right padding keeps every real token at the position it would have alone, so a padded
forward equals the unpadded ones (position ids start at 0 for every row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PromptBatch:
    input_ids: torch.Tensor  # [B, T] long, right-padded
    attention_mask: torch.Tensor  # [B, T] long
    lookup: torch.Tensor  # [B] index of the subject's last token (or -1 when there is no subject)
    last: torch.Tensor  # [B] index of the last real token

    def to(self, device) -> "PromptBatch":
        return PromptBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.lookup, self.last)))

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    def through_lookup(self) -> "PromptBatch":
        """The batch without the columns after the last subject token of any row. A causal
        model's states at the `lookup` positions do not depend on later tokens, so forwards that
        read only there (the keys) need no more; on the CounterFact sample this drops 13-16% of
        the tokens. `last` becomes the last real token that is kept."""
        if self.lookup.numel() == 0 or bool((self.lookup < 0).any()):
            raise ValueError("PromptBatch.through_lookup: every row needs a subject position (lookup >= 0)")
        width = int(self.lookup.max()) + 1
        return PromptBatch(self.input_ids[:, :width], self.attention_mask[:, :width], self.lookup,
                           self.last.clamp(max=width - 1))


def pad_right(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists as a right-padded ``[B, T]`` batch and its attention mask."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
    return input_ids, attention_mask


def _token_at_char(offsets: list[tuple[int, int]], char: int) -> int:
    """Index of the last token whose character span contains position `char`."""
    found = -1
    for i, (start, end) in enumerate(offsets):
        if start <= char < end:
            found = i
    if found < 0:  # a token boundary exactly at `char` with zero-width specials around it
        for i, (start, end) in enumerate(offsets):
            if end > start and start <= char:
                found = i
    if found < 0:
        raise ValueError(f"no token covers character {char}")
    return found


def encode(
    tokenizer,
    texts: list[str],
    subject_ends: list[int | None] | None = None,
    suffix_ids: list[list[int]] | None = None,
    pad_id: int | None = None,
) -> PromptBatch:
    """Tokenise `texts` (with the tokenizer's special tokens), append `suffix_ids[i]` to row i,
    right-pad, and locate the token holding character ``subject_ends[i] - 1`` (the subject's
    last character).
    """
    enc = tokenizer(list(texts), add_special_tokens=True, return_offsets_mapping=subject_ends is not None)
    rows: list[list[int]] = []
    lookups: list[int] = []
    for i, ids in enumerate(enc["input_ids"]):
        ids = list(ids)
        if subject_ends is not None and subject_ends[i] is not None:
            lookups.append(_token_at_char(enc["offset_mapping"][i], subject_ends[i] - 1))
        else:
            lookups.append(-1)
        if suffix_ids is not None:
            ids = ids + list(suffix_ids[i])
        rows.append(ids)
    if pad_id is None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids, attention_mask = pad_right(rows, pad_id)
    return PromptBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        lookup=torch.tensor(lookups, dtype=torch.long),
        last=attention_mask.sum(1) - 1,
    )


def target_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a continuation, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {text!r} tokenises to nothing")
    return list(ids)
