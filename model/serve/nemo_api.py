"""NeMo's PUT /generate: a request's sentences become engine sequences, finished ones NeMo's response
(megatron_gpt_eval.py's field names, defaults and answer)."""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from fleetgen.conf.schema import END_OF_DOCUMENT
from fleetgen.model.checkpoint.source import Tokenizer
from fleetgen.model.serve.detokenize import token_spans
from fleetgen.model.serve.engine import Engine, Sampling, SequenceRequest, SequenceResult, StopCondition
from fleetgen.model.serve.request_schemas import GenerateRequest, RequestError, check_prompt
from fleetgen.model.serve.structured import nemo_constraint


def nemo_sequences(request: GenerateRequest, engine: Engine) -> list[SequenceRequest]:
    tokenizer = engine.tokenizer
    if request.add_BOS and tokenizer.bos_id is None:
        raise RequestError(400, "add_BOS: the model's tokenizer has no BOS token")
    if any(not s for s in request.end_strings):
        raise RequestError(400, "end_strings: an end string is empty")
    sampling = Sampling(greedy=request.greedy, temperature=request.temperature, top_k=request.top_k,
                        top_p=request.top_p, repetition_penalty=request.repetition_penalty,
                        min_tokens=request.min_tokens_to_generate)
    stop = nemo_stop(request.end_strings, tokenizer, engine.eos_id)
    constraint = nemo_constraint(request, engine)
    sequences = []
    for i, sentence in enumerate(request.sentences):
        encoded = tokenizer.encode(sentence)
        if request.truncate_prompt_tokens is not None:  # the BOS is added before the kept tokens, not counted
            encoded = encoded[-request.truncate_prompt_tokens:]
        prompt = [tokenizer.bos_id] * request.add_BOS + encoded
        check_prompt(prompt, f"sentences[{i}]", request.tokens_to_generate, "tokens_to_generate", engine)
        seed = None if request.random_seed is None else request.random_seed + i
        sequences.append(SequenceRequest(tuple(prompt), request.tokens_to_generate, replace(sampling, seed=seed),
                                         stop, logprobs=request.compute_logprob, full_logprobs=request.all_probs,
                                         constraint=constraint))
    return sequences


def nemo_stop(end_strings: list[str], tokenizer: Tokenizer, eos_id: Optional[int]) -> StopCondition:
    """As NeMo: the end-of-document token always ends a sequence; an end string that is one token (or the
    end-of-document piece) also ends it as that token; every other string ends it once the text holds it."""
    ids = set() if eos_id is None else {eos_id}
    strings = []
    for s in end_strings:
        if eos_id is not None and s in (END_OF_DOCUMENT, tokenizer.id_to_piece(eos_id)):
            continue
        encoded = tokenizer.encode(s)
        if len(encoded) == 1:
            ids.add(encoded[0])
        strings.append(s)
    return StopCondition(frozenset(ids), tuple(strings))


def nemo_response(request: GenerateRequest, results: list[SequenceResult], tokenizer: Tokenizer) -> dict:
    # cached_tokens: fleetgen's own field (NeMo has none), each sentence's leading prompt tokens found in the KV cache
    answer = {"sentences": [], "tokens": [], "logprob": None, "token_ids": [], "offsets": [], "cached_tokens": []}
    for result in results:
        ids = result.prompt + result.tokens
        pieces, offsets, text = token_spans(tokenizer, ids, hidden=int(request.add_BOS))
        answer["sentences"].append(text)
        answer["tokens"].append(pieces)
        answer["token_ids"].append(ids)
        answer["offsets"].append(offsets)
        answer["cached_tokens"].append(result.cached_tokens)
    if request.compute_logprob:
        answer["logprob"] = [r.logprobs for r in results]
    if request.all_probs:
        answer["full_logprob"] = [r.full_logprobs.tolist() for r in results]
    return answer
