"""Chat templates render as transformers renders them, built-ins give their model's exact format, and a
template's turn markers become stop strings."""
import json

import pytest

from fleetgen.model.chat_template import (ChatTemplateError, find_chat_template, model_chat_template,
                                          plain_messages)

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Sum 2+2."}]
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
          "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}"
          "\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
          "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
STRICT = ("{% for message in messages %}{% if message['role'] not in ['user', 'assistant'] %}"
          "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
          "{{ message['role'] + ': ' + message['content'] | tojson + '\n' }}{% endfor %}")


def test_nemotron4_is_the_model_cards_format_and_stops_at_the_next_turn():
    template = find_chat_template("nemotron4")
    assert template.render(CONVERSATION) == ("<extra_id_0>System\nBe brief.\n\n<extra_id_1>User\nHi?\n"
                                             "<extra_id_1>Assistant\nHello.\n<extra_id_1>User\nSum 2+2.\n"
                                             "<extra_id_1>Assistant\n")
    assert template.render(CONVERSATION[1:2]) == ("<extra_id_0>System\n\n\n<extra_id_1>User\nHi?\n"
                                                  "<extra_id_1>Assistant\n")
    assert template.stops == ("<extra_id_1>",)
    with pytest.raises(ChatTemplateError, match="one system message, first"):
        template.render(CONVERSATION[1:] + [{"role": "system", "content": "late"}])


def test_chatml_and_its_stop():
    template = find_chat_template("chatml")
    assert template.render(CONVERSATION[1:2]) == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    assert template.render(CONVERSATION[1:2], add_generation_prompt=False) == "<|im_start|>user\nHi?<|im_end|>\n"
    assert template.stops == ("<|im_end|>",)


@pytest.mark.parametrize("text, stop", [(LLAMA3, "<|eot_id|>"), (ZEPHYR, "</s>"), (STRICT, "")])
def test_a_checkpoints_template_renders_as_transformers_does(tmp_path, text, stop):
    from transformers.utils.chat_template_utils import render_jinja_template

    config = {"chat_template": text, "bos_token": "<s>", "eos_token": {"content": "</s>", "lstrip": False}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    template = model_chat_template(None, str(tmp_path), None)
    messages = CONVERSATION[1:] if text is STRICT else CONVERSATION
    for generation_prompt in (True, False):
        expected, _ = render_jinja_template([messages], chat_template=text, add_generation_prompt=generation_prompt,
                                            bos_token="<s>", eos_token="</s>")
        assert template.render(messages, generation_prompt) == expected[0]
    assert template.stops == ((stop,) if stop else ())
    with pytest.raises(ChatTemplateError, match="Only user and assistant roles") if text is STRICT else \
            _nothing():
        template.render(CONVERSATION)


def _nothing():
    from contextlib import nullcontext
    return nullcontext()


def test_where_a_template_comes_from(tmp_path):
    assert model_chat_template(None, str(tmp_path), None) is None  # none: chat is refused by the server
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "chat_template.jinja").write_text(find_chat_template("chatml").text)
    assert model_chat_template(None, str(tmp_path), str(tmp_path / "tok")).stops == ("<|im_end|>",)
    jinja = tmp_path / "mine.jinja"
    jinja.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert model_chat_template(str(jinja), str(tmp_path), None).render(CONVERSATION[1:2]) == "Hi?"
    with pytest.raises(ChatTemplateError, match="model.chat_template=llama9: neither a built-in"):
        model_chat_template("llama9", str(tmp_path), None)
    jinja.write_text("{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="does not compile: line 1"):
        model_chat_template(str(jinja), str(tmp_path), None)


def test_messages_are_checked_and_text_parts_joined():
    parts = [{"role": "developer", "content": "Rules."},
             {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
             {"role": "assistant", "content": None}]
    assert plain_messages(parts) == [{"role": "system", "content": "Rules."}, {"role": "user", "content": "ab"},
                                     {"role": "assistant", "content": ""}]
    for bad, match in [([], "non-empty list"), ([{"role": "king", "content": "x"}], r"messages\[0\].role"),
                       ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
                        r"messages\[0\].content\[0\]: a 'image_url' part"),
                       ([{"role": "user", "content": 3}], r"messages\[0\].content")]:
        with pytest.raises(ChatTemplateError, match=match):
            plain_messages(bad)
