"""Train fleetgen's tiny default model from scratch on the bundled Jane Austen novels, on CPU.

    python tools/train_tiny_model.py --out recipes/data/tiny-gpt2

Writes a GPT-2 byte-level BPE tokenizer (vocab.json + merges.txt, `<|endoftext|>` as the last id) and a
4-layer Hugging Face GPT-2 (config.json + model.safetensors in fp16). The corpus, its provenance and the
held-out split are described in recipes/data/tiny-gpt2/README.md. Every step is seeded, so the same
machine and thread count give the same files.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2Config, GPT2LMHeadModel

CORPUS_DIR = Path(__file__).resolve().parent.parent / "recipes" / "data" / "corpus"
BOOKS = ("pride_and_prejudice", "persuasion", "sense_and_sensibility")
EOT = "<|endoftext|>"
HELDOUT_CHARS = 20_000  # the tail of every book, cut at a paragraph, is never trained on
VOCAB_SIZE = 2048
SEQ_LEN = 512


def read_books(corpus_dir: Path = CORPUS_DIR) -> dict[str, str]:
    books = {}
    for name in BOOKS:
        path = corpus_dir / f"{name}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: corpus book is missing")
        books[name] = path.read_text(encoding="utf-8")
    return books


def split_book(text: str) -> tuple[str, str]:
    """(train, held-out): the held-out part is the last HELDOUT_CHARS characters, from a paragraph start."""
    cut = text.rfind("\n", 0, len(text) - HELDOUT_CHARS) + 1
    return text[:cut], text[cut:]


def train_tokenizer(texts: list[str], out: Path) -> ByteLevelBPETokenizer:
    """Byte-level BPE with VOCAB_SIZE - 1 learned entries; `<|endoftext|>` takes the last id, as in GPT-2."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=VOCAB_SIZE - 1, min_frequency=2, show_progress=False)
    vocab = bpe.get_vocab()
    if len(vocab) != VOCAB_SIZE - 1:
        raise RuntimeError(f"tokenizer training gave {len(vocab)} entries, expected {VOCAB_SIZE - 1}")
    vocab[EOT] = VOCAB_SIZE - 1
    bpe.model.save(str(out))  # writes vocab.json (overwritten below, with EOT) and merges.txt
    ordered = dict(sorted(vocab.items(), key=lambda item: item[1]))
    (out / "vocab.json").write_text(json.dumps(ordered, ensure_ascii=False), encoding="utf-8")
    return load_tokenizer(out)


def load_tokenizer(model_dir: Path) -> ByteLevelBPETokenizer:
    tokenizer = ByteLevelBPETokenizer.from_file(str(model_dir / "vocab.json"), str(model_dir / "merges.txt"))
    tokenizer.add_special_tokens([EOT])  # already in vocab.json: keeps its id, stops it splitting into bytes
    return tokenizer


def token_stream(tokenizer: ByteLevelBPETokenizer, texts: list[str]) -> torch.Tensor:
    """All texts as one id stream, each preceded by EOT (GPT-2's document separator)."""
    eot = tokenizer.token_to_id(EOT)
    ids: list[int] = []
    for text in texts:
        ids.append(eot)
        ids.extend(tokenizer.encode(text).ids)
    return torch.tensor(ids, dtype=torch.long)


def build_model(seed: int, n_embd: int, dropout: float) -> GPT2LMHeadModel:
    """GPT-2 with the fused tanh-GELU kernel for training; save() renames it to GPT-2's own "gelu_new"."""
    torch.manual_seed(seed)
    # No attention dropout: with it, SDPA leaves the CPU flash kernel for the math path, which materialises
    # [batch, heads, T, T] scores and a dropout mask (the whole step ran 2-4x slower).
    config = GPT2Config(vocab_size=VOCAB_SIZE, n_positions=SEQ_LEN, n_embd=n_embd, n_layer=4, n_head=4,
                        activation_function="gelu_pytorch_tanh", bos_token_id=VOCAB_SIZE - 1,
                        eos_token_id=VOCAB_SIZE - 1, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def save(model: GPT2LMHeadModel, out: Path) -> None:
    """fp16 weights (half the shipped size; loaders upcast) under GPT-2's activation name.

    gelu_pytorch_tanh and gelu_new compute the same tanh approximation; every GPT-2 reader knows "gelu_new".
    """
    model.config.activation_function = "gelu_new"
    model.to(torch.float16).save_pretrained(out)


def sample_batch(stream: torch.Tensor, batch: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - SEQ_LEN, (batch,), generator=generator)
    return torch.stack([stream[s:s + SEQ_LEN] for s in starts.tolist()])  # [batch, SEQ_LEN]


@torch.no_grad()
def heldout_loss(model: GPT2LMHeadModel, stream: torch.Tensor) -> float:
    """Mean next-token loss over non-overlapping SEQ_LEN windows of the stream."""
    was_training = model.training
    model.eval()
    windows = stream[: len(stream) // SEQ_LEN * SEQ_LEN].view(-1, SEQ_LEN)  # [n, SEQ_LEN]
    losses = [model(input_ids=w.unsqueeze(0), labels=w.unsqueeze(0)).loss.item() for w in windows]
    model.train(was_training)
    return sum(losses) / len(losses)


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model: GPT2LMHeadModel, train_ids: torch.Tensor, heldout_ids: torch.Tensor,
          args: argparse.Namespace) -> float:
    """Runs args.steps AdamW steps on random windows, printing the loss curve; returns the held-out loss."""
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    start, running = time.time(), 0.0
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        batch = sample_batch(train_ids, args.batch, generator)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.item()
        if (step + 1) % args.log_every == 0:
            lr = optimizer.param_groups[0]["lr"]
            line = f"step {step + 1:5d}  train {running / args.log_every:.3f}  lr {lr:.2e}"
            if (step + 1) % args.eval_every == 0:
                line += f"  heldout {heldout_loss(model, heldout_ids):.3f}"
            print(f"{line}  {time.time() - start:6.0f}s", flush=True)
            running = 0.0
    return heldout_loss(model, heldout_ids)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the tokenizer and model")
    parser.add_argument("--corpus", type=Path, default=CORPUS_DIR)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--n-embd", type=int, default=160)
    parser.add_argument("--dropout", type=float, default=0.1, help="residual and embedding dropout")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the reference machine has 2)")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--eval-every", type=int, default=200)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    splits = [split_book(text) for text in read_books(args.corpus).values()]
    tokenizer = train_tokenizer([train for train, _ in splits], args.out)
    train_ids = token_stream(tokenizer, [train for train, _ in splits])
    heldout_ids = token_stream(tokenizer, [heldout for _, heldout in splits])
    print(f"tokens: train {len(train_ids)}, held-out {len(heldout_ids)}; uniform loss {math.log(VOCAB_SIZE):.3f}")
    model = build_model(args.seed, args.n_embd, args.dropout)
    print(f"parameters: {sum(p.numel() for p in model.parameters())}")
    started = time.time()
    final = train(model, train_ids, heldout_ids, args)
    print(f"final held-out loss {final:.3f} after {time.time() - started:.0f}s")
    save(model, args.out)


if __name__ == "__main__":
    main()
