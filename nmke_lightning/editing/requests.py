"""The unit of editing: one fact rewrite."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EditRequest:
    """Rewrite what the model says after `prompt` (which contains `subject`) to `target_new`."""

    prompt: str
    """Full prompt text, containing `subject` verbatim, e.g. "The Eiffel Tower is located in"."""
    subject: str
    """The entity whose last token carries the edit, e.g. "The Eiffel Tower"."""
    target_new: str
    """The new answer, e.g. "Rome" (a leading space is added when the prompt needs one)."""
    target_true: str | None = None
    """The answer being replaced, if known (evaluation only)."""

    def __post_init__(self) -> None:
        for name in ("prompt", "subject", "target_new"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"EditRequest.{name} must be a non-empty string, got {value!r}")
        if self.subject not in self.prompt:
            raise ValueError(
                f"EditRequest.subject {self.subject!r} does not occur in prompt {self.prompt!r}"
            )

    @property
    def subject_end(self) -> int:
        """Character offset just past the first occurrence of the subject in the prompt."""
        return self.prompt.index(self.subject) + len(self.subject)

    @property
    def target_text(self) -> str:
        """`target_new` as it continues the prompt: with a separating space unless one exists."""
        if self.prompt.endswith((" ", "\n")) or self.target_new.startswith((" ", "\n")):
            return self.target_new
        return " " + self.target_new
