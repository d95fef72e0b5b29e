"""The references, in this process on the same threads: transformers' generate and CTranslate2's
generate_batch, both greedy and forced to exactly `new` tokens per prompt (as fleetgen is)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from collections.abc import Callable


def transformers_runner(directory: Path) -> Callable[[list[list[int]], int], None]:
    import torch
    from transformers import GPT2LMHeadModel

    return generate_runner(GPT2LMHeadModel.from_pretrained(directory, dtype=torch.float32).eval())


def generate_runner(model) -> Callable[[list[list[int]], int], None]:
    """A transformers model's generate, on whatever device and dtype the model has."""
    import torch

    def run(prompts: list[list[int]], new: int) -> None:
        with torch.no_grad():  # equal lengths: no padding, so no attention mask to build
            model.generate(torch.tensor(prompts, device=model.device), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
    return run


def ctranslate2_runner(directory: Path, threads: int) -> Callable[[list[list[int]], int], None]:
    """None when ctranslate2 is not installed (pip install 'fleetgen[bench]')."""
    try:
        import ctranslate2
    except ImportError:
        return None
    converted = directory.parent / (directory.name + "-ct2")
    if not (converted / "model.bin").is_file():
        ctranslate2.converters.TransformersConverter(str(directory)).convert(str(converted), quantization="float32",
                                                                              force=True)
    generator = ctranslate2.Generator(str(converted), device="cpu", intra_threads=threads,
                                      compute_type="float32")
    vocabulary = json.loads((converted / "vocabulary.json").read_text())

    def run(prompts: list[list[int]], new: int) -> None:
        tokens = [[vocabulary[i] for i in p] for p in prompts]  # it takes token strings
        generator.generate_batch(tokens, max_length=new, min_length=new, sampling_topk=1,
                                 include_prompt_in_result=False, end_token=[])
    return run


def one_round(run: Callable, prompts: list[list[int]], new: int) -> Callable[[], float]:
    """After one warm-up of run: a round's tokens/s, for interleaved() to call."""
    run(prompts, min(new, 4))

    def measure() -> float:
        start = time.perf_counter()
        run(prompts, new)
        return len(prompts) * new / (time.perf_counter() - start)
    return measure


def interleaved(contenders: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Each contender's best tokens/s over rounds (interference only ever slows a round), the contenders taking
    turns within every round, in an order that rotates. This machine's speed drifts over minutes (its memory
    bandwidth is shared with other machines): one contender's rounds back to back and the next one's minutes
    later would compare two different machines."""
    best = dict.fromkeys(contenders, 0.0)
    names = list(contenders)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            best[name] = max(best[name], contenders[name]())
    return best
