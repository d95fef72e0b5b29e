"""What a batch knows about its prompts before any server sees them: chat messages rendered with the model's
template, and every prompt's length in tokens, counted with the model's own tokenizer against the context
window. batch.long_prompts says what a prompt too long for the window (with its new tokens) becomes: an error
before submission naming the lines, a record in the errors file, or a prompt cut from the left."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from fleetgen.conf.schema import LaunchConfig
from fleetgen.launcher.errors import LaunchError
from fleetgen.model.chat_template import ChatTemplate, ChatTemplateError, model_chat_template, plain_messages

LONG_PROMPT_HINT = "batch.long_prompts=skip puts them in the errors file; batch.long_prompts=truncate_left cuts them"


@dataclass(frozen=True)
class Fit:
    """A prompt against the context window: its length, and when too long what to do (one of the two)."""
    length: int
    new_tokens: Optional[int] = None
    too_long: bool = False
    keep: Optional[int] = None       # truncate_left: send only the prompt's last keep tokens
    refusal: Optional[str] = None    # skip (or nothing would fit): the record's error


class PromptRules:
    def __init__(self, tokenizer, template: Optional[ChatTemplate], context: int, policy: str, measure: bool = True):
        """measure: count each prompt's tokens (the validation pass; a run only where the policy acts on them)."""
        self.tokenizer, self.template, self.context, self.policy = tokenizer, template, context, policy
        self.measure = measure

    @classmethod
    def load(cls, cfg: LaunchConfig) -> PromptRules:
        """The model's tokenizer and chat template as the servers will have them; model.max_seq_len must be
        settled (launcher/validate.py fit_to_model)."""
        from fleetgen.model.checkpoint.open import read_tokenizer
        from fleetgen.model.checkpoint.source import CheckpointError

        model = cfg.model
        try:
            tokenizer = read_tokenizer(model.checkpoint, format=model.format, tokenizer=model.tokenizer)
            template = model_chat_template(model.chat_template, model.checkpoint, model.tokenizer)
        except (CheckpointError, ChatTemplateError) as e:
            raise LaunchError(str(e)) from None
        return cls(tokenizer, template, model.max_seq_len, cfg.batch.long_prompts)

    def for_run(self) -> PromptRules:
        """The rules for the run after the validation pass, which measures prompts again only to skip or cut
        them (batch.long_prompts=error let none through)."""
        return PromptRules(self.tokenizer, self.template, self.context, self.policy, measure=self.policy != "error")

    def render(self, messages: Any, where: str) -> str:
        """A record's messages as the prompt text the chat template makes of them."""
        if self.template is None:
            raise LaunchError(f"{where}: \"messages\" need a chat template, and the model has none: set "
                              "model.chat_template to a built-in one (nemotron4, chatml) or to a jinja file")
        try:
            return self.template.render(plain_messages(messages))
        except ChatTemplateError as e:
            raise LaunchError(f"{where}: {e}") from None

    @property
    def stops(self) -> tuple[str, ...]:
        return self.template.stops if self.template is not None else ()

    def fit(self, text: str, new_tokens: Optional[int], extra: int = 0) -> Fit:
        """text's tokens (+ extra, an added BOS) and new_tokens (None: whatever room is left) against the
        context window."""
        length = len(self.tokenizer.encode(text)) + extra
        room = self.context - (new_tokens or 1)
        if length <= room:
            return Fit(length, new_tokens)
        if self.policy == "truncate_left" and room >= 1 + extra:
            return Fit(length, new_tokens, True, keep=room - extra)
        return Fit(length, new_tokens, True, refusal=f"the prompt is too long: {_asked(length, new_tokens)} > the "
                                                     f"context window of {self.context} (model.max_seq_len)")


def _asked(length: int, new_tokens: Optional[int]) -> str:
    return f"{length} tokens" + (f" + {new_tokens} new" if new_tokens else "")


class LongPrompts:
    """The validation pass's account of prompts too long under batch.long_prompts=error: the first few and
    how many, refused all at once at the pass's end."""
    SHOWN = 5

    def __init__(self, context: int):
        self.context, self.count, self.first = context, 0, []

    def add(self, line: int, fit: Fit) -> None:
        self.count += 1
        if len(self.first) < self.SHOWN:
            self.first.append(f"line {line} ({_asked(fit.length, fit.new_tokens)})")

    def check(self, path) -> None:
        if self.count:
            raise LaunchError(f"{path}: {self.count} prompt(s) too long for the context window of {self.context} "
                              f"tokens (model.max_seq_len) with their new tokens: {', '.join(self.first)}"
                              f"{', ...' if self.count > self.SHOWN else ''}; {LONG_PROMPT_HINT}")
