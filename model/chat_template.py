"""Chat messages to prompt text: a checkpoint's own jinja chat template, a built-in one, or a jinja file.

Rendered the way transformers' apply_chat_template renders (a sandboxed jinja2 environment with trim_blocks and
lstrip_blocks, its tojson, raise_exception and strftime_now, the tokenizer's special tokens as variables), so
the prompt the model sees is the one it was trained on. No torch: the launcher renders batch records with it
to count their tokens before submission. A template's stop strings are its turn markers: where an assistant
turn ends, the model would start the next turn.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Nemotron-4-340B-Instruct's format (its model card): a system turn always, then User and Assistant turns
NEMOTRON4 = (
    "{{ '<extra_id_0>System\n' }}"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% endif %}"
    "{{ '\n\n' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<extra_id_1>User\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<extra_id_1>Assistant\n' + message['content'] + '\n' }}"
    "{% elif message['role'] != 'system' or not loop.first %}"
    "{{ raise_exception('a ' + message['role'] + ' message: this template has one system message, first, then "
    "user and assistant messages') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<extra_id_1>Assistant\n' }}{% endif %}"
)
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BUILT_IN = {"nemotron4": (NEMOTRON4, ("<extra_id_1>",)), "chatml": (CHATML, ("<|im_end|>",))}
TEMPLATE_FILES = ("chat_template.jinja", "tokenizer_config.json")  # where a checkpoint keeps its own
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """A template that cannot be found, compiled or rendered for these messages; the message says which."""


@dataclass(frozen=True)
class ChatTemplate:
    text: str
    source: str                        # where it came from, for messages
    stops: tuple[str, ...]             # its turn markers: generation stops at them
    variables: tuple[tuple[str, str], ...] = ()  # the tokenizer's special tokens (bos_token, ...)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        try:
            return _compile(self.text).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                               **dict(self.variables))
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template ({self.source}) refused these messages: {e}") from None


ROLES = ("system", "developer", "user", "assistant", "tool")


def plain_messages(messages: Any, where: str = "messages") -> list[dict[str, str]]:
    """OpenAI's chat messages as templates read them: {"role", "content": text} each. Content given as parts
    is joined from its text parts; "developer" (OpenAI's newer name for system) becomes "system". Raises
    ChatTemplateError naming the message and field."""
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError(f"{where}: a non-empty list of messages is needed")
    plain = []
    for i, message in enumerate(messages):
        at = f"{where}[{i}]"
        if not isinstance(message, dict):
            raise ChatTemplateError(f"{at}: a message is an object with a role and a content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ChatTemplateError(f"{at}.role: {role!r} is not one of {', '.join(ROLES)}")
        if isinstance(content, list):
            content = "".join(_text_part(part, f"{at}.content[{j}]") for j, part in enumerate(content))
        elif content is None and role == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise ChatTemplateError(f"{at}.content: text, or a list of text parts, is needed")
        plain.append({"role": "system" if role == "developer" else role, "content": content})
    return plain


def _text_part(part: Any, where: str) -> str:
    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return part["text"]
    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
    raise ChatTemplateError(f"{where}: a {kind!r} part; only text parts are served")


def model_chat_template(setting: Optional[str], checkpoint: str, tokenizer: Optional[str]) -> Optional[ChatTemplate]:
    """The template of model.chat_template for this model's checkpoint and model.tokenizer (conf/schema.py)."""
    places = [Path(checkpoint).expanduser()]
    if tokenizer is not None:
        places.insert(0, Path(tokenizer).expanduser())
    folders = [p if p.is_dir() else p.parent for p in places if p.is_dir() or p.suffix in (".json", ".model")]
    return find_chat_template(setting, *folders)


def find_chat_template(setting: Optional[str], *places: Optional[Path]) -> Optional[ChatTemplate]:
    """model.chat_template: None takes the first of places (the checkpoint, the tokenizer's folder) that has
    its own template; else a built-in name or a jinja file. None when there is no template at all."""
    if setting in BUILT_IN:
        text, stops = BUILT_IN[setting]
        return ChatTemplate(text, f"model.chat_template={setting}", stops)
    if setting is not None:
        path = Path(setting).expanduser()
        if not path.is_file():
            raise ChatTemplateError(f"model.chat_template={setting}: neither a built-in template "
                                    f"({', '.join(BUILT_IN)}) nor a jinja file")
        return _checked(path.read_text(encoding="utf-8"), f"model.chat_template={setting}", {})
    for place in places:
        found = _own_template(place) if place is not None else None
        if found is not None:
            return found
    return None


def _own_template(place: Path) -> Optional[ChatTemplate]:
    """A folder's template: chat_template.jinja (newer transformers) or tokenizer_config.json's chat_template,
    with that config's special tokens."""
    folder = place
    config_path = folder / "tokenizer_config.json"
    config = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ChatTemplateError(f"{config_path}: not valid JSON: {e}") from None
    if (folder / "chat_template.jinja").is_file():
        return _checked((folder / "chat_template.jinja").read_text(encoding="utf-8"),
                        str(folder / "chat_template.jinja"), config)
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: transformers takes "default"
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return _checked(template, str(config_path), config) if isinstance(template, str) else None


def _checked(text: str, source: str, config: dict) -> ChatTemplate:
    try:
        _compile(text)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"{source}: the chat template does not compile: line {e.lineno}: {e.message}") \
            from None
    variables = tuple((name, _token_text(config[name])) for name in SPECIAL_TOKENS
                      if config.get(name) is not None)
    template = ChatTemplate(text, source, (), variables)
    return ChatTemplate(text, source, _turn_markers(template), variables)


def _token_text(token: Any) -> str:
    return token.get("content", "") if isinstance(token, dict) else str(token)


def _turn_markers(template: ChatTemplate) -> tuple[str, ...]:
    """Where an assistant turn ends: what the template writes after a conversation's last assistant message
    (<|im_end|>, <|eot_id|>, </s>, ...); a template that writes nothing there ends the turn with the next
    user turn's header."""
    answer, question = "\x00ANSWER\x00", "\x00QUESTION\x00"
    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": answer}]
    try:
        ended = template.render(turn, add_generation_prompt=False)
        followed = template.render(turn + [{"role": "user", "content": question}], add_generation_prompt=False)
    except ChatTemplateError:
        return ()
    if answer not in ended or question not in followed:
        return ()
    marker = ended[ended.index(answer) + len(answer):].strip() or \
        followed[followed.index(answer) + len(answer):followed.index(question)].strip()
    return (marker.splitlines()[0],) if marker else ()


_COMPILED: dict[str, jinja2.Template] = {}


def _compile(text: str) -> jinja2.Template:
    if text not in _COMPILED:
        _COMPILED[text] = _environment().from_string(text)
    return _COMPILED[text]


def _environment() -> ImmutableSandboxedEnvironment:
    """transformers' environment: chat templates from the Hub are untrusted code, hence the sandbox."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja's own tojson escapes HTML characters, which a prompt must not have
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)
