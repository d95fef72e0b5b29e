"""Prefix reuse in the paged KV cache, end to end through `launch` (issue 24): model.prefix_caching on and off.

    python benchmarks/prefix_batch.py [--quick] [--workdir DIR] [--json PATH]

Each side is a `launch tiny` batch job (mode=batch, serving.launch_batch) on the GPT-2-small-shaped benchmark
model (bench_model.py), the two sides differing only in model.prefix_caching: the same model.max_batch (16)
and the same KV memory (the default, max_batch × max_seq_len positions). Every record's prompt is one shared
512-token prefix and 32 tokens of its own, and every sequence is forced to its full length (no end string, the
end of document banned until then). Rows:
- greedy: 256 records, 32 new tokens, 16 requests of one record in flight (paged_cache.py's prefix row, but
  through launch). Targets: end-to-end wall time off/on >= 2x; prompt tokens computed <= 10% with caching on.
- sampled: batch.samples=8 (temperature 1) of 32 records, a record's 8 samples in one request, 2 requests in
  flight (16 sequences). Target: each record's prompt computed at most once, computed <= records × prompt.
--quick: 16 records (4 sampled), 8 new tokens, about a minute in all. The counts are OUTPUT.summary.json's
prompt_tokens and prompt_tokens_reused (computed = the difference; "n/a" where the summary has no reuse
count). One run a side, so wall times carry whatever else shares the CPU: read the load averages printed.
Prints a markdown table and writes JSON to benchmarks/results/prefix_batch_<date>[_quick].json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date
from pathlib import Path
from typing import Optional

# Before the launcher starts its ranks, which inherit it (as throughput.py): spinning OpenMP threads take the
# cycles of the working ones on shared cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import bench_model  # noqa: E402
import serving  # noqa: E402
from fleetgen.launcher.batch.plan import summary_path  # noqa: E402

HERE = Path(__file__).resolve().parent
PREFIX_TOKENS, SUFFIX_TOKENS = 512, 32  # one letter a token (bench_model.py)
MAX_BATCH = 16
SAMPLES = 8
FULL = {"greedy_records": 256, "sampled_records": 32, "new": 32}
QUICK = {"greedy_records": 16, "sampled_records": 4, "new": 8}
TARGETS = {"wall ratio": 2.0, "computed fraction": 0.10}


def prompts(count: int) -> list[str]:
    """count prompts: the shared prefix (its own seed, so that it is no record's suffix) and a suffix each."""
    head = bench_model.prompts(1, PREFIX_TOKENS, seed=1)[0]
    return [head + tail for tail in bench_model.prompts(count, SUFFIX_TOKENS)]


def model_overrides(model_dir: Path, new: int, caching: bool) -> list[str]:
    """The sides' only difference is prefix_caching; max_seq_len holds the prompt and its new tokens."""
    return [f"model.checkpoint={model_dir}", f"model.max_batch={MAX_BATCH}",
            f"model.max_seq_len={PREFIX_TOKENS + SUFFIX_TOKENS + new}",
            f"model.prefix_caching={str(caching).lower()}"]


def write_sampled(path: Path, texts: list[str], new: int) -> Path:
    """Sampled records, forced to full length as serving.generate_body forces a request."""
    def record(text: str) -> dict:
        forced = {k: v for k, v in serving.generate_body(text, new).items() if k != "sentences"}
        return {"prompt": text, **forced, "greedy": False, "temperature": 1.0}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record(text)) + "\n" for text in texts))
    return path


def run_side(workdir: Path, model_dir: Path, texts: list[str], new: int, caching: bool,
             sampled: bool) -> dict:
    """One `launch` batch job end to end: its wall time, its tokens/s and its summary's prompt counts."""
    overrides = model_overrides(model_dir, new, caching)
    concurrency = MAX_BATCH
    if sampled:
        # launch_batch writes greedy records; a later batch.input= wins (Hydra), so the job reads sampled ones.
        # A record's samples travel in one request, as batch.samples sends them by default; 2 requests of 8
        # keep max_batch sequences in flight.
        records = write_sampled(workdir / "sampled.jsonl", texts, new)
        overrides += [f"batch.input={records}", f"batch.samples={SAMPLES}", f"batch.prompts_per_request={SAMPLES}"]
        concurrency = MAX_BATCH // SAMPLES
    run = serving.launch_batch(workdir, "tiny", overrides, texts, new, concurrency)
    summary = json.loads(summary_path(workdir / "results.jsonl").read_text())
    return {**run, "batch_wall_s": summary.get("wall_s"), **prompt_counts(summary)}


def prompt_counts(summary: dict) -> dict:
    """Prompt tokens sent, reused from the KV cache and computed; None where the summary has no reuse count."""
    total, reused = summary["prompt_tokens"], summary.get("prompt_tokens_reused")
    computed = None if reused is None else total - reused
    return {"prompt_tokens": total, "prompt_tokens_reused": reused, "prompt_tokens_computed": computed,
            "computed_fraction": None if computed is None else computed / total}


def run_row(workdir: Path, model_dir: Path, records: int, new: int, sampled: bool) -> dict:
    """Both sides of a row, off first: {"off": ..., "on": ...}."""
    texts = prompts(records)
    name = "sampled" if sampled else "greedy"
    return {side: run_side(workdir / f"{name}-{side}", model_dir, texts, new, side == "on", sampled)
            for side in ("off", "on")}


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None or b == 0 else round(a / b, 2)


def targets(results: dict) -> list[tuple[str, Optional[float], str, Optional[bool]]]:
    """(what, measured, target, met) for the issue's targets; met None where there is no target or no count."""
    greedy, sampled = results["rows"]["greedy"], results["rows"]["sampled"]
    wall = ratio(greedy["off"]["wall_s"], greedy["on"]["wall_s"])
    fraction = greedy["on"]["computed_fraction"]
    # each record's prompt computed once: records × its length, the shared prefix saving the rest
    once = results["sizes"]["sampled_records"] * (PREFIX_TOKENS + SUFFIX_TOKENS)
    computed = sampled["on"]["prompt_tokens_computed"]

    def met(value, test) -> Optional[bool]:
        return None if value is None else test(value)
    return [
        ("greedy: wall time off/on (end to end)", wall, f">= {TARGETS['wall ratio']}x",
         met(wall, lambda v: v >= TARGETS["wall ratio"])),
        ("greedy: batch-phase time off/on", ratio(greedy["off"]["batch_wall_s"], greedy["on"]["batch_wall_s"]),
         "", None),
        ("greedy, caching on: fraction of prompt tokens computed", fraction, f"<= {TARGETS['computed fraction']:.0%}",
         met(fraction, lambda v: v <= TARGETS["computed fraction"])),
        ("sampled, caching on: prompt tokens computed", computed, f"<= {once} (records × prompt)",
         met(computed, lambda v: v <= once)),
        ("sampled: wall time off/on (end to end)", ratio(sampled["off"]["wall_s"], sampled["on"]["wall_s"]), "",
         None),
    ]


def shown(value, spec: str = "") -> str:
    """value formatted by spec; "n/a" for None (a count the summary lacks)."""
    return "n/a" if value is None else format(value, spec)


def table(results: dict) -> str:
    lines = ["| row | prefix caching | wall s (end to end) | batch s | tokens/s | prompt tokens | computed | reused |"
             " computed fraction |", "|---|---|---|---|---|---|---|---|---|"]
    for name, row in results["rows"].items():
        for side, r in row.items():
            lines.append(f"| {name} | {side} | {r['wall_s']:.1f} | {shown(r['batch_wall_s'], '.1f')} | "
                         f"{r['tokens_per_s']:.1f} | {r['prompt_tokens']} | {shown(r['prompt_tokens_computed'])} | "
                         f"{shown(r['prompt_tokens_reused'])} | {shown(r['computed_fraction'], '.1%')} |")
    lines += ["", "| target | measured | target | met |", "|---|---|---|---|"]
    for what, value, target, met in results["targets"]:
        spec = ".1%" if "fraction" in what else ".2f" if isinstance(value, float) else ""
        lines.append(f"| {what} | {shown(value, spec)} | {target} | {'' if met is None else 'yes' if met else 'no'} |")
    return "\n".join(lines)


def write_json(path: Path, results: dict) -> None:
    """Atomically, as throughput.py: a run cut short leaves the last complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 records (4 sampled), 8 new tokens")
    parser.add_argument("--workdir", type=Path, default=Path(".fleetgen/bench"), help="model, jobs, outputs")
    parser.add_argument("--json", type=Path, default=None,
                        help="default: benchmarks/results/prefix_batch_<date>[_quick].json")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    workdir = args.workdir.resolve()
    model_dir = bench_model.gpt2_small(workdir / "gpt2-small")
    started = time.monotonic()
    results = {"date": str(date.today()), "quick": args.quick,
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "load_average_at_start": os.getloadavg()},
               "sizes": {**sizes, "prefix_tokens": PREFIX_TOKENS, "suffix_tokens": SUFFIX_TOKENS,
                         "max_batch": MAX_BATCH, "samples": SAMPLES}, "rows": {}}
    for name, records in (("greedy", sizes["greedy_records"]), ("sampled", sizes["sampled_records"])):
        results["rows"][name] = run_row(workdir / "prefix_batch", model_dir, records, sizes["new"],
                                        name == "sampled")
        print(name, json.dumps(results["rows"][name]), flush=True)
    results["targets"] = targets(results)
    results["seconds"] = time.monotonic() - started
    results["machine"]["load_average_at_end"] = os.getloadavg()  # others' work on the same cores skews walls
    print(table(results))
    path = args.json or HERE / "results" / f"prefix_batch_{date.today()}{'_quick' * args.quick}.json"
    write_json(path, results)
    print(f"\nload average {results['machine']['load_average_at_start'][0]:.1f} at the start, "
          f"{results['machine']['load_average_at_end'][0]:.1f} at the end; written {path} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
