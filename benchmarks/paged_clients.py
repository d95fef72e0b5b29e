"""More sequences in the same KV memory (issue 24): 64 concurrent clients against a 16-slot server and a server
of 64 sequences, both holding the KV memory of 16 sequences of 2,048 positions, through `launch ... mode=serve`.

    python benchmarks/paged_clients.py [--quick] [--json PATH]

Both sides are `launch tiny mode=serve` of the GPT-2-small-shaped benchmark model (bench_model.py), fp32, with
model.kv_cache_gb set to the bytes of 16 × 2,048 positions (the KV memory of the 16-slot static cache this
replaced); they differ only in model.max_batch: 16 (today's 16 slots: at most 16 sequences at once) against 64
(paged blocks: a sequence takes only the blocks it fills). The model's context is 1,024 positions
(max_seq_len), so the 16-slot side's own default memory would be smaller: the same kv_cache_gb on both keeps
the memory equal. Each of 64 clients sends one-prompt PUT /generate requests back to back: 128-token prompts,
128 new tokens (256 positions a sequence), greedy, forced to full length. The servers take turns round by round
and each keeps its best round (benchmarks/references.py). Target: tokens/s of 64 sequences >= 1.2x 16 slots.
--quick: 32 new tokens, one round. Prints a table and writes JSON to benchmarks/results/paged_clients_<date>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
from datetime import date
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before the ranks start (as throughput.py)

import bench_model  # noqa: E402
import references  # noqa: E402
import serving  # noqa: E402

HERE = Path(__file__).resolve().parent
CLIENTS = 64
PROMPT_TOKENS = 128
SLOTS, POSITIONS = 16, 2048                        # today's memory: 16 sequences of 2,048 positions
POSITION_BYTES = 2 * 12 * 768 * 4                  # keys and values, 12 layers, hidden 768, fp32
KV_CACHE_GB = SLOTS * POSITIONS * POSITION_BYTES / 2**30
SIDES = {"16 slots": SLOTS, "64 sequences (paged)": CLIENTS}
FULL = {"new": 128, "per_client": 1, "rounds": 3}
QUICK = {"new": 32, "per_client": 1, "rounds": 1}
TARGET = 1.2


def overrides(model_dir: Path, max_batch: int) -> list[str]:
    return [f"model.checkpoint={model_dir}", f"model.max_batch={max_batch}", "model.max_seq_len=1024",
            f"model.kv_cache_gb={KV_CACHE_GB}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fleetgen-paged-clients"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    model_dir = bench_model.gpt2_small(args.workdir / "model")
    texts = bench_model.prompts(CLIENTS * sizes["per_client"], PROMPT_TOKENS)
    load = os.getloadavg()
    with contextlib.ExitStack() as stack:
        contenders = {}
        for name, max_batch in SIDES.items():
            server = stack.enter_context(serving.LaunchedServer(
                args.workdir / f"serve-{max_batch}", "tiny", overrides(model_dir, max_batch)))
            contenders[name] = serving.clients_round(server.urls, texts, CLIENTS, sizes["new"], sizes["per_client"])
        best = references.interleaved(contenders, sizes["rounds"])
    ratio = best["64 sequences (paged)"] / best["16 slots"]
    results = {"date": date.today().isoformat(), "quick": args.quick,
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average_at_start": load,
                           "load_average_at_end": os.getloadavg()},
               "sizes": {**sizes, "clients": CLIENTS, "prompt_tokens": PROMPT_TOKENS, "kv_cache_gb": KV_CACHE_GB},
               "tokens_per_s": best, "ratio": round(ratio, 2), "target": f">= {TARGET}x", "met": ratio >= TARGET}
    print(f"| server ({CLIENTS} clients, KV memory of {SLOTS} × {POSITIONS} positions) | tokens/s |\n|---|---|")
    for name, value in best.items():
        print(f"| {name} | {value:.1f} |")
    print(f"\n64 sequences / 16 slots: {ratio:.2f}x (target >= {TARGET}x: {'met' if ratio >= TARGET else 'NOT met'})")
    out = args.json or HERE / "results" / f"paged_clients_{date.today().isoformat()}{'_quick' * args.quick}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
