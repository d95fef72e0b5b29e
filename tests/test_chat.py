"""/v1/chat/completions and the OpenAI fields SDG clients send, through the `openai` client against the real
tiny GPT-2; a chat request matches transformers' apply_chat_template + generate on the same weights."""
import json

import openai
import pytest
import torch

from fleetgen.model.chat_template import CHATML
from tests.server_fixtures import MODEL, build_tiny_checkpoint, reference_greedy, reference_model, serving

MESSAGES = [{"role": "system", "content": "You answer in Python."},
            {"role": "user", "content": "def decode(self, s):"}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny checkpoint with a chat template of its own, as a Hugging Face tokenizer_config.json holds it."""
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("chat"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHATML, "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "tokenizer_class": "GPT2Tokenizer"}))
    return path


@pytest.fixture(scope="module")
def served(checkpoint):
    from fleetgen.model.chat_template import model_chat_template

    with serving(checkpoint, chat_template=model_chat_template(None, str(checkpoint), None)) as served:
        yield served


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused")


@pytest.fixture(scope="module")
def hf(checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint), reference_model(checkpoint)


def hf_prompt(hf, messages) -> list[int]:
    tokenizer, _ = hf
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_greedy_chat_matches_transformers_apply_chat_template_and_generate(client, served, hf):
    tokenizer, model = hf
    prompt = hf_prompt(hf, MESSAGES)
    with torch.no_grad():
        generated = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                   pad_token_id=tokenizer.eos_token_id)[0, len(prompt):].tolist()
    assert generated == reference_greedy(model, prompt, 8)[:len(generated)]
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
    choice = chat.choices[0]
    assert chat.object == "chat.completion" and choice.message.role == "assistant"
    assert chat.usage.prompt_tokens == len(prompt)
    shown = generated[:generated.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in generated else generated
    text = tokenizer.decode(shown)
    assert choice.message.content == text.split("<|im_end|>")[0]
    assert chat.usage.completion_tokens == len(generated) or "<|im_end|>" in text


def test_stream_with_usage_gives_the_answers_text_and_usage(client):
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    assert all(c.usage is None for c in chunks[:-1])
    no_usage = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, stream=True))
    assert all(c.choices for c in no_usage)


def test_n_samples_are_seeded_as_a_batch_seeds_a_records_samples(client):
    together = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=1.0,
                                              seed=11, n=3)
    assert [c.index for c in together.choices] == [0, 1, 2]
    alone = [client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=1.0,
                                            seed=11 + j).choices[0].message.content for j in range(3)]
    assert [c.message.content for c in together.choices] == alone
    assert len(set(alone)) > 1
    one = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, seed=11)
    assert together.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once


def test_completions_n_token_id_prompts_and_echo(client, served):
    tok = served.engine.tokenizer
    ids = tok.encode("import json")
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0, echo=True)
    by_text = client.completions.create(model=MODEL, prompt="import json", max_tokens=5, temperature=0, echo=True)
    assert by_ids.choices[0].text == by_text.choices[0].text
    two = client.completions.create(model=MODEL, prompt=["a", "b"], max_tokens=4, temperature=1.0, seed=3, n=2,
                                    best_of=2)
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    third = client.completions.create(model=MODEL, prompt="b", max_tokens=4, temperature=1.0, seed=5)
    assert two.choices[2].text == third.choices[0].text  # completion k is seeded with seed + k
    assert two.usage.prompt_tokens == len(tok.encode("a")) + len(tok.encode("b"))


def test_chat_logprobs_match_a_reference_log_softmax(client, hf):
    _, model = hf
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=3)
    prompt = hf_prompt(hf, MESSAGES)
    ids = prompt + reference_greedy(model, prompt, 4)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    content = chat.choices[0].logprobs.content
    assert content and len(content) <= 4
    for t, entry in enumerate(content):
        row = expected[len(prompt) + t - 1]
        assert entry.logprob == pytest.approx(float(row[ids[len(prompt) + t]]), abs=1e-4)
        assert [e.logprob for e in entry.top_logprobs] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
        assert bytes(entry.bytes).decode() == entry.token


def test_max_tokens_null_runs_up_to_the_context(client, served):
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=None, temperature=0,
                                          extra_body={"logit_bias": None})
    total = chat.usage.prompt_tokens + chat.usage.completion_tokens
    assert total <= served.engine.max_seq_len
    assert chat.choices[0].finish_reason == "stop" or total == served.engine.max_seq_len


def test_what_clients_send_by_default_is_accepted(client):
    defaults = dict(presence_penalty=0, frequency_penalty=0, logit_bias={}, user="u", seed=None, stop=None,
                    max_tokens=None, n=1, top_p=1)
    client.completions.create(model=MODEL, prompt="a", best_of=1, suffix=None, echo=False, stream=False,
                              **{**defaults, "max_tokens": 2})
    list(client.completions.create(model=MODEL, prompt="a", max_tokens=2, stream=True,
                                   stream_options={"include_usage": True}))
    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=2, tools=None,
                                   tool_choice="none", parallel_tool_calls=True, store=False, metadata={"k": "v"},
                                   service_tier="auto", modalities=["text"], response_format=None,
                                   **{k: v for k, v in defaults.items() if k != "max_tokens"})


@pytest.mark.parametrize("route, body, field", [
    ("completions", {"prompt": "a", "suffix": "b"}, "suffix"),
    ("completions", {"prompt": "a", "best_of": 3}, "best_of"),
    ("completions", {"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options"),
    ("chat", {"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("chat", {"messages": MESSAGES, "store": True}, "store"),
    ("chat", {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
    ("chat", {"messages": MESSAGES, "max_tokens": 2, "max_completion_tokens": 3}, "max_completion_tokens"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     r"messages\[0\].content\[0\]"),
    ("chat", {"messages": MESSAGES, "logit_bias": {"99999": 1}}, "logit_bias"),
])
def test_what_cannot_be_honoured_is_a_400_naming_the_field(served, route, body, field):
    import httpx

    response = httpx.post(f"{served.url}/v1/{'chat/completions' if route == 'chat' else route}",
                          json={"model": MODEL, **body}, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"].startswith(field.replace("\\", "")[:8]) or \
        field.replace("\\", "") in response.json()["error"]["message"]


def test_a_model_without_a_template_answers_chat_with_a_400_naming_the_setting(tmp_path):
    path = build_tiny_checkpoint(tmp_path / "plain")
    with serving(path) as served:
        client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused")
        with pytest.raises(openai.BadRequestError, match="model.chat_template"):
            client.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert client.completions.create(model=MODEL, prompt="a", max_tokens=1).choices  # the server goes on
