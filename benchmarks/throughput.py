"""Tokens per second of fleetgen against transformers and CTranslate2, on one machine, in one run.

    python benchmarks/throughput.py [--quick] [--json PATH]

Same GPT-2-small-shaped random weights and 32-token prompts everywhere (bench_model.py), greedy, every
sequence forced to its full length. Rows: fleetgen in process (Generator.generate_greedy), transformers
generate and CTranslate2 generate_batch at batch 1 and 16; fleetgen through `launch ... mode=serve` with 1 and
16 concurrent clients; a `launch` batch of 256 prompts end to end; the scaling table (16 clients, one thread a
rank unless said); and launch-to-healthy of the tiny recipe. Read the ratios: the CPU is shared, so absolute
numbers move from run to run. Prints a table and writes JSON (atomically).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

# Before any OpenMP runtime starts, for every engine alike (torch's and CTranslate2's libgomp, and the ranks,
# which inherit it): on shared cores, spin-waiting threads take the cycles the working ones need (5x slower).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import bench_model  # noqa: E402
import references  # noqa: E402
import serving  # noqa: E402

FULL = {"new": 128, "scaling_new": 64, "per_client": 2, "batch_prompts": 256, "rounds": 2}
QUICK = {"new": 32, "scaling_new": 16, "per_client": 1, "batch_prompts": 64, "rounds": 1}
PROMPT_TOKENS = 32
SECTIONS = ("in_process", "server", "scaling", "startup")
CLIENTS = 16
SCALING = {  # name: launch overrides; one thread a rank unless said
    "1 rank": ["cluster.cpus_per_task=1"],
    "1 rank, 2 threads": ["cluster.cpus_per_task=2"],
    "2 replicas": ["cluster.cpus_per_task=1", "parallel.replicas=2"],
    "tensor 2": ["cluster.cpus_per_task=1", "parallel.tensor=2"],
    "pipeline 2": ["cluster.cpus_per_task=1", "parallel.pipeline=2"],
}


def in_process(model_dir: Path, prompts: list[list[int]], sizes: dict) -> dict:
    from fleetgen.model.checkpoint.hf import HFSource
    from fleetgen.model.load import build_generator
    from fleetgen.model.parallel import ParallelState

    generator = build_generator(HFSource(model_dir), ParallelState.single(), "fp32", CLIENTS,
                                PROMPT_TOKENS + sizes["new"])
    runners = {"fleetgen": generator.generate_greedy, "transformers": references.transformers_runner(model_dir),
               "ctranslate2": references.ctranslate2_runner(model_dir, torch.get_num_threads())}
    out = {}
    for batch in (1, CLIENTS):
        for name, run in runners.items():
            if run is not None:
                out[f"{name}, batch {batch}"] = references.tokens_per_second(run, prompts[:batch], sizes["new"],
                                                                              sizes["rounds"])
    return out


def model_overrides(model_dir: Path, new: int) -> list[str]:
    return [f"model.checkpoint={model_dir}", f"model.max_batch={CLIENTS}",
            f"model.max_seq_len={PROMPT_TOKENS + new}"]


def through_server(model_dir: Path, texts: list[str], sizes: dict, workdir: Path) -> dict:
    out = {}
    with serving.LaunchedServer(workdir / "serve", "tiny", model_overrides(model_dir, sizes["new"])) as server:
        for clients in (1, CLIENTS):
            out[f"server, {clients} client{'s' * (clients > 1)}"] = serving.clients_tokens_per_second(
                server.urls, texts, clients, sizes["new"], sizes["per_client"], sizes["rounds"])
    batch = serving.launch_batch(workdir / "batch", "tiny", model_overrides(model_dir, sizes["new"]),
                                 texts[:sizes["batch_prompts"]], sizes["new"], CLIENTS)
    out[f"launch batch, {sizes['batch_prompts']} prompts, {CLIENTS} in flight"] = batch["tokens_per_s"]
    out["launch batch wall time (s, end to end)"] = batch["wall_s"]
    return out


def scaling(model_dir: Path, texts: list[str], sizes: dict, workdir: Path) -> dict:
    out = {}
    for name, overrides in SCALING.items():
        folder = workdir / ("scaling-" + name.replace(" ", "").replace(",", "-"))
        with serving.LaunchedServer(folder, "tiny", model_overrides(model_dir, sizes["scaling_new"]) + overrides) \
                as server:
            out[name] = serving.clients_tokens_per_second(server.urls, texts, CLIENTS, sizes["scaling_new"],
                                                          sizes["per_client"], sizes["rounds"])
    return out


def startup(workdir: Path) -> dict:
    with serving.LaunchedServer(workdir / "startup", "tiny", []) as server:
        return serving.startup_breakdown(server)


def ratios(r: dict, batch_prompts: int) -> dict:
    """The issue's targets: name -> (measured ratio, target)."""
    def ratio(a: str, b: str):
        return round(r[a] / r[b], 2) if a in r and b in r else None
    batch = f"launch batch, {batch_prompts} prompts, {CLIENTS} in flight"
    return {
        "server 16 clients / CTranslate2 batch 16": (ratio("server, 16 clients", "ctranslate2, batch 16"), 1.1),
        "server 16 clients / transformers batch 16": (ratio("server, 16 clients", "transformers, batch 16"), 1.5),
        "server 1 client / CTranslate2 batch 1": (ratio("server, 1 client", "ctranslate2, batch 1"), 0.9),
        "tensor 2 / 1 rank": (ratio("tensor 2", "1 rank"), 1.25),
        "pipeline 2 / 1 rank": (ratio("pipeline 2", "1 rank"), 1.25),
        "2 replicas / 1 rank": (ratio("2 replicas", "1 rank"), None),
        "1 rank 2 threads / 1 rank": (ratio("1 rank, 2 threads", "1 rank"), None),
        "launch batch / server 16 clients": (ratio(batch, "server, 16 clients"), 0.9),
    }


def table(results: dict) -> str:
    lines = ["| measurement | value |", "|---|---|"]
    for section in SECTIONS:
        unit = "s" if section == "startup" else "tokens/s"
        for name, value in results[section].items():
            shown = "n/a" if value is None else f"{value:.1f}" if "wall" not in name else f"{value:.1f} s"
            lines.append(f"| {section.replace('_', ' ')}: {name} | {shown} {'' if 'wall' in name else unit} |")
    lines += ["", "| ratio | measured | target | met |", "|---|---|---|---|"]
    for name, (value, target) in results["ratios"].items():
        met = "" if target is None or value is None else ("yes" if value >= target else "no")
        lines.append(f"| {name} | {value if value is not None else 'n/a'} | {target or ''} | {met} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (32 new tokens, 64-prompt batch)")
    parser.add_argument("--workdir", type=Path, default=Path(".fleetgen/bench"), help="model, jobs, results")
    parser.add_argument("--json", type=Path, default=None, help="default: WORKDIR/throughput.json")
    parser.add_argument("--sections", type=lambda text: text.split(","), default=SECTIONS,
                        help=f"a comma-separated subset of {','.join(SECTIONS)}")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    workdir = args.workdir.resolve()
    model_dir = bench_model.gpt2_small(workdir / "gpt2-small")
    texts = bench_model.prompts(sizes["batch_prompts"], PROMPT_TOKENS)
    ids = bench_model.token_ids(model_dir, texts)
    started = time.monotonic()
    results = {"machine": {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                           "platform": platform.platform(), "load_average_at_start": os.getloadavg(),
                           "OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"]},
               "sizes": {**sizes, "prompt_tokens": PROMPT_TOKENS, "clients": CLIENTS}}
    for section, measure in (("in_process", lambda: in_process(model_dir, ids, sizes)),
                             ("server", lambda: through_server(model_dir, texts, sizes, workdir)),
                             ("scaling", lambda: scaling(model_dir, texts, sizes, workdir)),
                             ("startup", lambda: startup(workdir))):
        if section not in args.sections:
            results[section] = {}
            continue
        results[section] = measure()
        print(section, {name: round(value, 2) for name, value in results[section].items() if value is not None},
              flush=True)
    results["ratios"] = ratios({**results["in_process"], **results["server"], **results["scaling"]},
                               sizes["batch_prompts"])
    results["seconds"] = time.monotonic() - started
    results["machine"]["load_average_at_end"] = os.getloadavg()  # others' work on the same cores skews rows
    print(table(results))
    path = args.json or workdir / "throughput.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, path)
    print(f"\nload average {results['machine']['load_average_at_start'][0]:.1f} at the start, "
          f"{results['machine']['load_average_at_end'][0]:.1f} at the end; written {path} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
