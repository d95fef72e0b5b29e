"""Tiny random Hugging Face models of each family, saved with save_pretrained, and their reference outputs.

Randomly initialised HF models have tiny weights and near-uniform logits; every parameter is redrawn with
std 0.3 (plain LayerNorm weights around 1) so argmax decisions are clear-cut. GPT-2B-001's architecture
(nemo_gpt) has no HF class; StableLM configured to match stands in, converted to canonical tensors here.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from fleetgen.model.checkpoint.hf import HFSource
from fleetgen.model.checkpoint.memory import StateDictSource
from fleetgen.model.config import ModelConfig
from fleetgen.model.generate import StepPlan, greedy_plan

VOCAB = 250          # pads to 256: the last 6 logits are Megatron padding
HIDDEN, HEADS, POSITIONS = 64, 4, 64
BOS, EOS = 1, 2
PROMPTS = [[5, 17, 42, 8, 99], [3, 200, 7], [11, 12, 13, 14, 15, 16, 249]]  # odd, different lengths


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
                if type(module) is torch.nn.LayerNorm and name == "weight":  # LayerNorm1P stays zero-centred
                    param.add_(1.0)
    return model.eval()


def build(family: str, layers: int = 2, groups: int = 2, seed: int = 0) -> torch.nn.Module:
    """A tiny HF model of family gpt2 | gptj | nemo_gpt (StableLM) | nemotron."""
    # imported here: spawned ranks import this module for open_source and would pay ~5 s each for transformers
    from transformers import (GPT2Config, GPT2LMHeadModel, GPTJConfig, GPTJForCausalLM, NemotronConfig,
                              NemotronForCausalLM, StableLmConfig, StableLmForCausalLM)
    common = dict(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=None)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=HIDDEN, n_layer=layers, n_head=HEADS, vocab_size=VOCAB,
                                           n_positions=POSITIONS, **common))
    elif family == "gptj":
        model = GPTJForCausalLM(GPTJConfig(n_embd=HIDDEN, n_layer=layers, n_head=HEADS, vocab_size=VOCAB,
                                           n_positions=POSITIONS, rotary_dim=8, **common))
    elif family == "nemo_gpt":
        model = StableLmForCausalLM(StableLmConfig(
            hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=HEADS,
            num_key_value_heads=HEADS, vocab_size=VOCAB, max_position_embeddings=POSITIONS, hidden_act="silu",
            partial_rotary_factor=0.5, use_qkv_bias=False, use_parallel_residual=False, qk_layernorm=False,
            tie_word_embeddings=False, **common))
    elif family == "nemotron":
        model = NemotronForCausalLM(NemotronConfig(
            hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=HEADS,
            num_key_value_heads=groups, vocab_size=VOCAB, max_position_embeddings=POSITIONS,
            partial_rotary_factor=0.5, **common))
    else:
        raise ValueError(f"unknown family {family!r}")
    model.generation_config.eos_token_id = None  # greedy references run their full length
    return _randomize(model, seed)


def save(model: torch.nn.Module, directory: Path) -> Path:
    model.save_pretrained(directory)
    return directory


def open_source(directory: Path):
    """HFSource, or for a saved StableLM the canonical conversion to nemo_gpt."""
    model_type = json.loads((directory / "config.json").read_text())["model_type"]
    return stablelm_source(directory) if model_type == "stablelm" else HFSource(directory)


def stablelm_source(directory: Path) -> StateDictSource:
    """A saved StableLM as GPT-2B-001's architecture: LayerNorm weights w become LayerNorm1P's w - 1,
    separate q/k/v and gate/up become the canonical names."""
    c = json.loads((directory / "config.json").read_text())
    heads = c["num_attention_heads"]
    config = ModelConfig(
        family="nemo_gpt", num_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"],
        ffn_hidden_size=c["intermediate_size"], num_attention_heads=heads, num_query_groups=c["num_key_value_heads"],
        head_dim=c["hidden_size"] // heads, vocab_size=c["vocab_size"],
        max_position_embeddings=c["max_position_embeddings"], position_embedding="rope",
        rotary_percent=c["rope_parameters"]["partial_rotary_factor"],
        rotary_base=c["rope_parameters"]["rope_theta"], normalization="layernorm1p",
        layernorm_eps=c["layer_norm_eps"], activation="swiglu", qkv_bias=False, proj_bias=False, mlp_bias=False,
        tie_word_embeddings=False, bos_id=c["bos_token_id"], eos_id=c["eos_token_id"])
    hf = load_file(directory / "model.safetensors")
    tensors = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
               "output_layer.weight": hf["lm_head.weight"],
               "final_layernorm.weight": hf["model.norm.weight"] - 1, "final_layernorm.bias": hf["model.norm.bias"]}
    renames = {"input_layernorm": "input_layernorm", "post_attention_layernorm": "pre_mlp_layernorm",
               "self_attn.q_proj": "self_attention.query", "self_attn.k_proj": "self_attention.key",
               "self_attn.v_proj": "self_attention.value", "self_attn.o_proj": "self_attention.linear_proj",
               "mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.linear_fc1", "mlp.down_proj": "mlp.linear_fc2"}
    for i in range(config.num_layers):
        for stored, canonical in renames.items():
            for kind in ("weight", "bias"):
                key = f"model.layers.{i}.{stored}.{kind}"
                if key in hf:
                    norm_weight = "layernorm" in stored and kind == "weight"
                    tensors[f"layers.{i}.{canonical}.{kind}"] = hf[key] - 1 if norm_weight else hf[key]
    return StateDictSource(config, tensors)


def reference_logits(model: torch.nn.Module, prompts=PROMPTS) -> list[torch.Tensor]:
    """Each prompt alone: [len, vocab] fp32 logits, on the CPU (the model may be on any device)."""
    with torch.no_grad():
        return [model(torch.tensor([p], device=model.device)).logits[0].float().cpu() for p in prompts]


def reference_greedy(model: torch.nn.Module, new_tokens: int, prompts=PROMPTS) -> list[list[int]]:
    """HF generate(do_sample=False) of each prompt alone; the new tokens only."""
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = model.generate(torch.tensor([p], device=model.device), max_new_tokens=new_tokens, min_new_tokens=0,
                                 do_sample=False, pad_token_id=0)
            out.append(ids[0, len(p):].tolist())
    return out


def padded_batch(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(p) for p in prompts])
    tokens = torch.full((len(prompts), int(lengths.max())), 7, dtype=torch.long)  # any pad id will do
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = torch.tensor(prompt)
    return tokens, lengths


def step_plan(kind, slots, tokens, lengths, **changes) -> StepPlan:
    plan = greedy_plan(kind, torch.tensor(slots), tokens, torch.tensor(lengths))
    n = len(slots)
    for name, value in changes.items():
        if name in ("logprobs", "full_logprobs"):
            setattr(plan, name, value)
        else:
            dtype = getattr(plan, name).dtype
            setattr(plan, name, torch.tensor(value, dtype=dtype).expand(n).clone())
    return plan


def decode_logprobs(generator) -> torch.Tensor:
    """Log-probabilities of one decode step after each of PROMPTS (what the wire protocol carries): how the
    decode paths (eager, compiled, graphs) are compared with one another."""
    tokens, lengths = padded_batch(PROMPTS)
    slots = torch.arange(len(PROMPTS))
    first = generator.step(greedy_plan("prefill", slots, tokens, lengths)).tokens
    plan = greedy_plan("decode", slots, first[:, None], lengths)
    plan.full_logprobs = True
    return generator.step(plan).full_logprobs
