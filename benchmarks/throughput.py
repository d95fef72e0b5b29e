"""Tokens per second of fleetgen against transformers and CTranslate2, on one machine, in one run.

    python benchmarks/throughput.py [--quick] [--json PATH]

Same GPT-2-small-shaped random weights and 32-token prompts everywhere (bench_model.py), greedy, every
sequence forced to its full length. Rows: fleetgen in process (Generator.generate_greedy), transformers
generate and CTranslate2 generate_batch at batch 1 and 16; fleetgen through `launch ... mode=serve` with 1 and
16 concurrent clients; a `launch` batch of 256 prompts end to end; the scaling table (16 clients, one thread a
rank unless said); and launch-to-healthy of the tiny recipe. Read the ratios: the CPU is shared, so absolute
numbers move from run to run, and within a run from minute to minute; so the rows compared take turns, round
by round, and each keeps its best round. Prints a table and writes JSON (atomically).
"""
from __future__ import annotations

import argparse
import contextlib
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

FULL = {"new": 128, "scaling_new": 64, "per_client": 2, "batch_prompts": 256, "rounds": 3}
QUICK = {"new": 32, "scaling_new": 16, "per_client": 1, "batch_prompts": 64, "rounds": 1}
SECTIONS = ("in_process", "server", "scaling", "startup")
CLIENTS = 16
SCALING = {  # name: launch overrides; one thread a rank unless said
    "1 rank": ["cluster.cpus_per_task=1"],
    "1 rank, 2 threads": ["cluster.cpus_per_task=2"],
    "2 replicas": ["cluster.cpus_per_task=1", "parallel.replicas=2"],
    "tensor 2": ["cluster.cpus_per_task=1", "parallel.tensor=2"],
    "pipeline 2": ["cluster.cpus_per_task=1", "parallel.pipeline=2"],
}


def engines(model_dir: Path, texts: list[str], ids: list[list[int]], sizes: dict, workdir: Path,
            sections: list[str]) -> dict:
    """The in-process engines and the server at batch 1 and 16, taking turns round by round (the server idles
    while the others run); then the launch batch. {"in_process": {...}, "server": {...}}, as sections ask."""
    from fleetgen.model.checkpoint.hf import HFSource
    from fleetgen.model.load import build_generator
    from fleetgen.model.parallel import ParallelState

    new, out = sizes["new"], {"in_process": {}, "server": {}}
    with contextlib.ExitStack() as stack:
        contenders = {}
        if "in_process" in sections:
            generator = build_generator(HFSource(model_dir), ParallelState.single(), "fp32", CLIENTS,
                                        bench_model.PROMPT_TOKENS + new)
            runners = {"fleetgen": generator.generate_greedy,
                       "transformers": references.transformers_runner(model_dir),
                       "ctranslate2": references.ctranslate2_runner(model_dir, torch.get_num_threads())}
            contenders |= {("in_process", f"{name}, batch {batch}"): references.one_round(run, ids[:batch], new)
                           for batch in (1, CLIENTS) for name, run in runners.items() if run is not None}
        if "server" in sections:
            server = stack.enter_context(serving.LaunchedServer(workdir / "serve", "tiny",
                                                                model_overrides(model_dir, new)))
            contenders |= {("server", f"server, {clients} client{'s' * (clients > 1)}"):
                           serving.clients_round(server.urls, texts, clients, new, sizes["per_client"])
                           for clients in (1, CLIENTS)}
            walls = []

            def batch_round() -> float:  # its own job, while the server idles
                run = serving.launch_batch(workdir / "batch", "tiny", model_overrides(model_dir, new),
                                           texts[:sizes["batch_prompts"]], new, CLIENTS)
                walls.append(run["wall_s"])
                return run["tokens_per_s"]
            contenders[("server", batch_name(sizes))] = batch_round
        for (section, name), value in references.interleaved(contenders, sizes["rounds"]).items():
            out[section][name] = value
    if "server" in sections:
        out["server"]["launch batch wall time (s, end to end, quickest)"] = min(walls)
    return out


def model_overrides(model_dir: Path, new: int) -> list[str]:
    return [f"model.checkpoint={model_dir}", f"model.max_batch={CLIENTS}",
            f"model.max_seq_len={bench_model.PROMPT_TOKENS + new}"]


def scaling(model_dir: Path, texts: list[str], sizes: dict, workdir: Path) -> dict:
    """Every layout served at once, idle but for its turn: 16 clients on each in turn, round by round."""
    with contextlib.ExitStack() as stack:
        contenders = {}
        for name, overrides in SCALING.items():
            folder = workdir / ("scaling-" + name.replace(" ", "").replace(",", "-"))
            server = stack.enter_context(serving.LaunchedServer(
                folder, "tiny", model_overrides(model_dir, sizes["scaling_new"]) + overrides))
            contenders[name] = serving.clients_round(server.urls, texts, CLIENTS, sizes["scaling_new"],
                                                     sizes["per_client"])
        return references.interleaved(contenders, sizes["rounds"])


def startup(workdir: Path) -> dict:
    with serving.LaunchedServer(workdir / "startup", "tiny", []) as server:
        return serving.startup_breakdown(server)


def batch_name(sizes: dict) -> str:
    return f"launch batch, {sizes['batch_prompts']} prompts, {CLIENTS} in flight"


def ratios(r: dict, sizes: dict) -> dict:
    """The issue's targets: name -> (measured ratio, target)."""
    def ratio(a: str, b: str):
        return round(r[a] / r[b], 2) if a in r and b in r else None
    return {
        "server 16 clients / CTranslate2 batch 16": (ratio("server, 16 clients", "ctranslate2, batch 16"), 1.1),
        "server 16 clients / transformers batch 16": (ratio("server, 16 clients", "transformers, batch 16"), 1.5),
        "server 1 client / CTranslate2 batch 1": (ratio("server, 1 client", "ctranslate2, batch 1"), 0.9),
        "tensor 2 / 1 rank": (ratio("tensor 2", "1 rank"), 1.25),
        "pipeline 2 / 1 rank": (ratio("pipeline 2", "1 rank"), 1.25),
        "2 replicas / 1 rank": (ratio("2 replicas", "1 rank"), None),
        "1 rank 2 threads / 1 rank": (ratio("1 rank, 2 threads", "1 rank"), None),
        "launch batch / server 16 clients": (ratio(batch_name(sizes), "server, 16 clients"), 0.9),
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
    texts = bench_model.prompts(sizes["batch_prompts"], bench_model.PROMPT_TOKENS)
    ids = bench_model.token_ids(model_dir, texts)
    started = time.monotonic()
    results = {"machine": {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                           "platform": platform.platform(), "load_average_at_start": os.getloadavg(),
                           "OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"]},
               "sizes": {**sizes, "prompt_tokens": bench_model.PROMPT_TOKENS, "clients": CLIENTS}}
    if {"in_process", "server"} & set(args.sections):
        results |= engines(model_dir, texts, ids, sizes, workdir, args.sections)
    for section, measure in (("scaling", lambda: scaling(model_dir, texts, sizes, workdir)),
                             ("startup", lambda: startup(workdir))):
        results[section] = measure() if section in args.sections else {}
    for section in SECTIONS:
        results.setdefault(section, {})
        print(section, {name: round(value, 2) for name, value in results[section].items() if value is not None},
              flush=True)
    results["ratios"] = ratios({**results["in_process"], **results["server"], **results["scaling"]},
                               sizes)
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
