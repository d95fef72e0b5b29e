"""The one-command GPU check: parity with transformers on the device, the decode roofline, the server against
transformers generate, and launch-to-healthy, in that order; a table and JSON at the end.

    python benchmarks/gpu.py [--out gpu_check.json] [--steps parity roofline serving startup]
    python benchmarks/gpu.py --smoke      # tiny shapes on this machine's CPU (--device cpu does the same)

Steps (most important first), each in a process of its own under its own time budget, so that a step that
fails or hangs is recorded (its error, or "timed out") and the next one runs:
- parity: each seed family's tiny model (tests/hf_reference.py) in its real on-disk format (GPT-2 and GPT-J
  as Hugging Face directories, GPT-2 also as Megatron-LM, NeMo GPT as .nemo, Nemotron-4 as a NeMo distributed
  checkpoint), opened and run by fleetgen at tensor 1 x pipeline 1 beside transformers on the same device.
  fp32: log-probabilities of a prefill within 1e-3 and greedy tokens identical. bf16: the largest log-prob
  difference from transformers' fp32 over the logits' scale (their standard deviation) within 0.1 or twice
  transformers' own bf16 difference; greedy agreement with transformers' bf16 reported.
- roofline: benchmarks/roofline.py's GPT-2B-001 shape, random bf16 weights, batch 1 and 64; the bandwidth
  from the GPU's name (H200 4800 GB/s, H100 3350) unless --bandwidth-gbs. Target >= 50% at batch 1.
- serving: a GPT-2-architecture 1.3 B model (24 layers, hidden 2048, random bf16 weights) served by `launch
  tiny ... mode=serve`, 1 and then 64 concurrent clients, against transformers generate at batch 1 and 64
  on the same device and weights; greedy, every sequence exactly --new tokens. Targets 2x and 3x.
- startup: a random GPT-2B-001-shaped .nemo served by `launch gpt2b_001` on this machine: launch to
  /health 200 (target <= 60 s), the server's own breakdown, then one request.
The ranks' logs of each launched job land in OUT's folder under rank_logs/STEP/. Exit status 0 when every
step completed (targets met or not), 1 otherwise.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("parity", "roofline", "serving", "startup")
BANDWIDTH_GBS = {"H200": 4800.0, "H100": 3350.0}  # HBM bandwidth by GPU name (H100: the SXM part)
FP32_TOLERANCE = 1e-3   # max |log-prob difference| from transformers in fp32
# bf16: max |log-prob difference| from transformers in fp32, over the logits' standard deviation, within this or
# twice what transformers' own bf16 run differs by (tiny random models: bf16 alone costs about 0.05-0.13)
BF16_TOLERANCE = 0.1
PARITY_CASES = {  # name: (family, layers, query groups, on-disk format)
    "gpt2": ("gpt2", 2, 4, "hf"),
    "gpt2_megatron": ("gpt2", 2, 4, "megatron"),
    "gptj": ("gptj", 3, 4, "hf"),
    "nemo_gpt": ("nemo_gpt", 2, 4, "nemo"),
    "nemotron": ("nemotron", 2, 2, "distckpt"),
}
STOP_GRACE_S = 30  # a step over its budget gets SIGINT (Ctrl-C), then SIGKILL this much later


@dataclasses.dataclass(frozen=True)
class Sizes:
    budgets: dict               # step -> seconds
    parity_new: int             # greedy tokens compared per prompt
    roofline_layers: int
    roofline_vocab: Optional[int]  # None: GPT-2B-001's 256000
    roofline_batches: tuple
    new: int                    # tokens generated per sequence (roofline, serving)
    rounds: int                 # each throughput keeps its best round
    serve_model: dict           # transformers GPT2Config fields
    clients: tuple              # (1, N): N is also the server's model.max_batch and transformers' batch
    gpt2b: dict                 # ModelConfig fields that change roofline.gpt2b_config()


FULL = Sizes(budgets={"parity": 60, "roofline": 100, "serving": 150, "startup": 120}, parity_new=16,
             roofline_layers=24, roofline_vocab=None, roofline_batches=(1, 64), new=128, rounds=2,
             serve_model=dict(n_layer=24, n_embd=2048, n_head=16, n_positions=1024), clients=(1, 64), gpt2b={})
SMOKE = Sizes(budgets={"parity": 60, "roofline": 60, "serving": 90, "startup": 60}, parity_new=16,
              roofline_layers=2, roofline_vocab=2048, roofline_batches=(1, 4), new=8, rounds=1,
              serve_model=dict(n_layer=2, n_embd=64, n_head=4, n_positions=256), clients=(1, 4),
              gpt2b=dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                         num_query_groups=4, head_dim=16, vocab_size=1024))


# ---- the steps (each runs in its own process: python benchmarks/gpu.py ... --run-step NAME) ----------------

class Record(dict):
    """A step's results, rewritten atomically on every top-level assignment: what a killed step measured stays."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        write_json(self.path, dict(self))


def step_parity(args, sizes: Sizes, workdir: Path, record: Record) -> None:
    sys.path.insert(0, str(ROOT))  # tests/: the reference models and the checkpoint writers
    import torch
    import transformers

    from fleetgen.model.checkpoint.open import open_checkpoint
    from fleetgen.model.generate import greedy_plan
    from fleetgen.model.load import build_generator
    from fleetgen.model.parallel import ParallelState
    from tests import hf_reference as ref
    from tests.checkpoint_writers import train_sentencepiece

    device = torch.device(args.device)
    record["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                          "device": device_name(device)}
    sp = train_sentencepiece(workdir / "sp", vocab_size=ref.VOCAB)  # bos 1, eos 2 like the HF models
    tokens, lengths = ref.padded_batch(ref.PROMPTS)
    for name, (family, layers, groups, layout) in PARITY_CASES.items():
        started = time.monotonic()
        model = ref.build(family, layers=layers, groups=groups)
        path = write_parity_checkpoint(ref, model, layout, sp, workdir / name)
        result, scale, fp32_logits = {"format": layout}, None, None
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            model.to(device=device, dtype=dtype)
            want_logits, want_tokens = ref.reference_logits(model), ref.reference_greedy(model, sizes.parity_new)
            source = open_checkpoint(path, tokenizer=sp if layout == "megatron" else None, cache_dir=workdir / "cache")
            generator = build_generator(source, ParallelState.single(device), precision, max_batch=len(ref.PROMPTS),
                                        max_seq_len=int(lengths.max()) + sizes.parity_new)
            plan = greedy_plan("prefill", torch.arange(len(ref.PROMPTS)), tokens, lengths)
            plan.full_logprobs = True
            got = generator.step(plan).full_logprobs
            rows = [got[i, :len(want)] for i, want in enumerate(want_logits)]  # each prompt's own length
            agree, total = token_agreement(generator.generate_greedy(ref.PROMPTS, sizes.parity_new), want_tokens)
            result[precision] = {"max_abs_logprob_diff": max_logprob_diff(rows, want_logits), "tokens_agree": agree,
                                 "tokens": total}
            if precision == "fp32":
                fp32_logits = want_logits
                scale = sum(w.std().item() for w in want_logits) / len(want_logits)
            else:  # against the fp32 reference, beside what bf16 costs transformers itself
                result[precision] |= {
                    "logit_scale": scale, "error": max_logprob_diff(rows, fp32_logits) / scale,
                    "transformers_error": max_logprob_diff([w.log_softmax(-1) for w in want_logits],
                                                           fp32_logits) / scale}
            del generator, source
        result["seconds"] = time.monotonic() - started
        record[name] = result
        print(f"parity {name}: {json.dumps(result)}", flush=True)


def max_logprob_diff(logprobs: list, reference_logits: list) -> float:
    return max((got - want.log_softmax(-1)).abs().max().item() for got, want in zip(logprobs, reference_logits))


def write_parity_checkpoint(ref, model, layout: str, sp: Path, directory: Path) -> Path:
    """The HF model's weights in the family's own on-disk format (as tests/test_open.py writes them)."""
    from tests.checkpoint_writers import write_distckpt, write_megatron, write_nemo

    saved = ref.save(model, directory / "hf")
    if layout == "hf":
        return saved
    source = ref.open_source(saved)
    tensors = {name: source.read(name) for name in source.names()}
    if layout == "megatron":
        return write_megatron(directory / "megatron", source.config, tensors)
    if layout == "nemo":
        return write_nemo(directory / "model.nemo", source.config, tensors, sp, archive="tar")
    return write_distckpt(directory / "distckpt", source.config, tensors, sp, backend="zarr")


def step_roofline(args, sizes: Sizes, workdir: Path, record: Record) -> None:
    import torch

    import roofline

    device = torch.device(args.device)
    bandwidth, where = pick_bandwidth(device_name(device), args.bandwidth_gbs)
    config = roofline.gpt2b_config(sizes.roofline_layers)
    if sizes.roofline_vocab:
        config = dataclasses.replace(config, vocab_size=sizes.roofline_vocab)
    variants = {"auto": [False, True] if device.type == "cuda" else [False], "on": [True], "off": [False]}
    record["setup"] = {"device": device_name(device), "bandwidth_gbs": bandwidth, "bandwidth_from": where,
                       "layers": config.num_layers, "vocab": config.vocab_size,
                       "compile": variants[args.compile], "prompt_tokens": roofline.PROMPT_TOKENS, "new": sizes.new}
    for compiled in variants[args.compile]:  # the server's default (graphs of eager layers) first
        prefix = "compiled_" if compiled else ""
        started = time.monotonic()
        generator = roofline.random_generator(config, "bf16", device, max(sizes.roofline_batches),
                                              roofline.PROMPT_TOKENS + sizes.new, compiled)
        record[f"{prefix}build_s"] = time.monotonic() - started
        record[f"{prefix}capture_s"] = generator.capture_s
        for batch in sizes.roofline_batches:
            started = time.monotonic()
            measured = roofline.measure(generator, batch, sizes.new, bandwidth or 1.0)
            if bandwidth is None:
                measured["roofline_fraction"] = None
            record[f"{prefix}batch_{batch}"] = {**measured, "seconds_with_warm_up": time.monotonic() - started}
            print(f"roofline {prefix}batch {batch}: {json.dumps(record[f'{prefix}batch_{batch}'])}", flush=True)
        if device.type == "cuda":  # where the time goes, for the next optimisation (the JSON only)
            try:
                record[f"{prefix}kernels_batch_1"] = roofline.kernel_profile(generator, 1)
            except Exception as e:  # a profiler that does not work here must not cost the measurements
                record[f"{prefix}kernels_batch_1"] = f"{type(e).__name__}: {e}"
        del generator


def step_serving(args, sizes: Sizes, workdir: Path, record: Record) -> None:
    import torch

    import bench_model
    import references
    import serving

    device = torch.device(args.device)
    started = time.monotonic()
    model_dir = workdir / "gpt2-random"
    model = write_gpt2(model_dir, sizes.serve_model, device)
    record["checkpoint"] = {**sizes.serve_model, "vocab": bench_model.VOCAB, "precision": "bf16",
                            "gb": folder_gb(model_dir), "write_s": time.monotonic() - started}
    texts = bench_model.prompts(max(sizes.clients), bench_model.PROMPT_TOKENS)
    ids = bench_model.token_ids(model_dir, texts)
    run = references.generate_runner(model)
    record["transformers"] = references.interleaved(
        {f"batch {n}": references.one_round(run, ids[:n], sizes.new) for n in sizes.clients}, sizes.rounds)
    print(f"transformers generate, tokens/s: {record['transformers']}", flush=True)
    del model, run
    if device.type == "cuda":
        torch.cuda.empty_cache()
    overrides = [f"model.checkpoint={model_dir}", "model.precision=bf16", f"model.max_batch={max(sizes.clients)}",
                 *device_overrides(device)]
    with serving.LaunchedServer(workdir / "serve", "tiny", overrides, stop_signal=signal.SIGINT) as server:
        record["launch"] = launch_report(server, device)
        print(f"served: {json.dumps(record['launch'])}", flush=True)
        record["server"] = references.interleaved(
            {f"{n} clients": serving.clients_round(server.urls, texts, n, sizes.new, 1) for n in sizes.clients},
            sizes.rounds)
        print(f"server, tokens/s: {record['server']}", flush=True)
    record["stop"] = {"launch_exit_code": server.returncode}


def write_gpt2(directory: Path, fields: dict, device):
    """A random GPT-2-architecture model saved in bf16 with bench_model's 50257-token tokenizer (a prompt of n
    letters is n tokens), and the model itself on the device, for transformers' side."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import bench_model

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=bench_model.VOCAB, bos_token_id=bench_model.VOCAB - 1,
                        eos_token_id=bench_model.VOCAB - 1, **fields)
    model = GPT2LMHeadModel(config).to(device=device, dtype=torch.bfloat16).eval()
    model.save_pretrained(directory)
    bench_model.write_tokenizer(directory)
    return model


def step_startup(args, sizes: Sizes, workdir: Path, record: Record) -> None:
    sys.path.insert(0, str(ROOT))  # tests/: the checkpoint writers
    import httpx
    import torch

    import roofline
    import serving
    from tests.checkpoint_writers import canonical_tensors, train_sentencepiece, write_nemo

    device = torch.device(args.device)
    started = time.monotonic()
    config = dataclasses.replace(roofline.gpt2b_config(), **sizes.gpt2b)
    tensors = {name: t.cpu() for name, t in canonical_tensors(config, dtype=torch.bfloat16, device=device).items()}
    path = write_nemo(workdir / "gpt2b", config, tensors, train_sentencepiece(workdir / "sp"))
    del tensors
    record["checkpoint"] = {"layers": config.num_layers, "hidden": config.hidden_size, "vocab": config.vocab_size,
                            "gb": folder_gb(path), "write_s": time.monotonic() - started}
    print(f"GPT-2B-001-shaped .nemo: {json.dumps(record['checkpoint'])}", flush=True)
    overrides = ["cluster=local", "container=none", f"model.checkpoint={path}", "server.port=0",
                 f"model.architecture.num_layers={config.num_layers}",
                 f"model.architecture.hidden_size={config.hidden_size}",
                 f"model.architecture.num_attention_heads={config.num_attention_heads}", *device_overrides(device)]
    with serving.LaunchedServer(workdir / "serve", "gpt2b_001", overrides, stop_signal=signal.SIGINT) as server:
        record["launch"] = launch_report(server, device)
        print(f"served: {json.dumps(record['launch'])}", flush=True)
        asked = time.monotonic()
        response = httpx.put(f"{server.urls[0]}/generate", json=serving.generate_body("the quick brown fox", 8),
                             timeout=60)
        record["first_request"] = {"status": response.status_code, "seconds": time.monotonic() - asked,
                                   "body": response.text[:500]}
    record["stop"] = {"launch_exit_code": server.returncode}


def launch_report(server, device) -> dict:
    """Launch to healthy as the launcher saw it, the breakdown rank 0 logged, where rank 0 ran, and /health's own
    body (which may carry startup_s and devices)."""
    import httpx

    import serving

    logged = serving.startup_breakdown(server)
    logged.pop("healthy_s")
    placed = re.search(r" on (\S+ \(\w+\));", server.rank_log(0))  # ParallelState.describe(): "cuda:0 (nccl)"
    health = httpx.get(f"{server.urls[0]}/health", timeout=10)
    return {"healthy_s": server.healthy_s, "rank0_log": logged, "rank0_device": placed and placed.group(1),
            "wanted_device": device.type, "health_status": health.status_code, "health": health.json()}


def device_overrides(device) -> list[str]:
    """One rank on one GPU, or on the CPU: said explicitly, so that the check runs where it was asked to."""
    return ["cluster.gpus_per_node=1"] if device.type == "cuda" else ["cluster.gpus_per_node=0"]


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def folder_gb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e9


STEP_FUNCTIONS = {"parity": step_parity, "roofline": step_roofline, "serving": step_serving,
                  "startup": step_startup}


# ---- pure helpers: bandwidth, agreement, targets, the table ---------------------------------------------------

def pick_bandwidth(name: str, override: Optional[float]) -> tuple[Optional[float], Optional[str]]:
    """(GB/s, where it came from): the override, else the GPU's name, else none (the fraction is then n/a)."""
    if override:
        return override, "--bandwidth-gbs"
    for key, gbs in BANDWIDTH_GBS.items():
        if key in name.upper():
            return gbs, key
    return None, None


def token_agreement(got: list[list[int]], want: list[list[int]]) -> tuple[int, int]:
    """(tokens up to each row's first difference, all tokens wanted): after a difference the rows go apart."""
    agree = 0
    for a, b in zip(got, want):
        same = 0
        while same < min(len(a), len(b)) and a[same] == b[same]:
            same += 1
        agree += same
    return agree, sum(len(b) for b in want)


def checks(steps: dict, sizes: Sizes, smoke: bool = False) -> list[dict]:
    """The table's rows: {check, value, target, met} with met True, False or None (nothing to judge; in a smoke
    run, the speed targets)."""
    rows = []
    for name in steps:
        step = steps[name]
        if step.get("status") != "ok":
            rows.append(row(f"{name}: step", f"{step.get('status')}: {step.get('error', '')}"[:90], "completes",
                            False))
        rows += ROW_MAKERS[name](step.get("result", {}), sizes)
    return [dict(r, met=None) if r.pop("speed") and smoke else r for r in rows]


def row(check: str, value: str, target: str, met: Optional[bool], speed: bool = False) -> dict:
    return {"check": check, "value": value, "target": target, "met": met, "speed": speed}


def parity_rows(result: dict, sizes: Sizes) -> list[dict]:
    rows = []
    for name in PARITY_CASES:
        case = result.get(name)
        if not case:
            continue
        fp32, bf16 = case["fp32"], case["bf16"]
        rows.append(row(f"parity fp32 {name} ({case['format']})",
                        f"max |d logprob| {fp32['max_abs_logprob_diff']:.1e}, tokens {fp32['tokens_agree']}/"
                        f"{fp32['tokens']}", f"<= {FP32_TOLERANCE:g}, identical",
                        fp32["max_abs_logprob_diff"] <= FP32_TOLERANCE and fp32["tokens_agree"] == fp32["tokens"]))
        rows.append(row(f"parity bf16 {name}", f"error {bf16['error']:.3f} of scale (transformers' "
                        f"{bf16['transformers_error']:.3f}), tokens {bf16['tokens_agree']}/{bf16['tokens']}",
                        f"<= max({BF16_TOLERANCE:g}, 2x transformers')",
                        bf16["error"] <= max(BF16_TOLERANCE, 2 * bf16["transformers_error"])))
    return rows


def roofline_rows(result: dict, sizes: Sizes) -> list[dict]:
    rows = []
    for prefix, what in (("", "roofline"), ("compiled_", "roofline, compiled layers")):
        for batch in sizes.roofline_batches:
            r = result.get(f"{prefix}batch_{batch}")
            if not r:
                continue
            fraction = r["roofline_fraction"]
            shown = "n/a" if fraction is None else f"{100 * fraction:.1f}%"
            step = f"; step {r['step_ms']:.2f} ms" if r.get("step_ms") else ""
            graph = f", graph alone {r['graph_ms']:.2f} ms" if r.get("graph_ms") else ""
            target = fraction is not None and batch == 1
            rows.append(row(f"{what} batch {batch}", f"{r['tokens_per_s']:.0f} tokens/s, {shown} of roofline"
                            f"{step}{graph}", ">= 50%" if batch == 1 else "", fraction >= 0.5 if target else None,
                            speed=True))
    return rows


def serving_rows(result: dict, sizes: Sizes) -> list[dict]:
    rows = []
    for n, target in zip(sizes.clients, (2.0, 3.0)):
        ours, theirs = result.get("server", {}).get(f"{n} clients"), result.get("transformers", {}).get(f"batch {n}")
        if ours is None or theirs is None:
            continue
        rows.append(row(f"server {n} client{'s' * (n > 1)} / transformers batch {n}",
                        f"{ours:.0f} / {theirs:.0f} tokens/s = {ours / theirs:.2f}x", f">= {target:g}x",
                        ours / theirs >= target, speed=True))
    if "launch" in result:
        shape = result["checkpoint"]
        name = f"GPT-2 {shape['n_layer']} x {shape['n_embd']}"
        rows += [row(f"{name}: launch to healthy", startup_text(result["launch"]), "", None),
                 *placement_rows(name, result["launch"])]
    return rows


def startup_rows(result: dict, sizes: Sizes) -> list[dict]:
    rows = []
    shape = f"GPT-2B-001 shape, {result['checkpoint']['layers']} layers" if "checkpoint" in result else ""
    if "launch" in result:
        healthy = result["launch"]["healthy_s"]
        rows.append(row(f"{shape}: launch to healthy", startup_text(result["launch"]), "<= 60 s", healthy <= 60,
                        speed=True))
        rows += placement_rows(shape, result["launch"])
    if "first_request" in result:
        first = result["first_request"]
        rows.append(row(f"{shape}: first request", f"HTTP {first['status']} in {first['seconds']:.1f} s",
                        "HTTP 200", first["status"] == 200))
    return rows


def placement_rows(name: str, launch: dict) -> list[dict]:
    """A row only when rank 0 ran elsewhere than asked (cluster=local ignores a GPU it was not given)."""
    placed, wanted = launch.get("rank0_device"), launch.get("wanted_device")
    if not placed or not wanted or placed.startswith(wanted):
        return []
    return [row(f"{name}: rank 0 device", placed, wanted, False)]


ROW_MAKERS = {"parity": parity_rows, "roofline": roofline_rows, "serving": serving_rows, "startup": startup_rows}


def startup_text(launch: dict) -> str:
    """'31.0 s (imports 2.1, load 4.0, warm_up 12.5, capture n/a)': /health's startup_s when the server
    reports it, else what rank 0 logged."""
    def shown(parts: dict) -> str:
        return ", ".join(f"{k} {f'{v:.1f}' if isinstance(v, (int, float)) else 'n/a' if v is None else v}"
                         for k, v in parts.items())

    health = launch.get("health", {})
    devices = health.get("devices") or launch.get("rank0_device") or "n/a"
    where = f"; on {devices if isinstance(devices, str) else json.dumps(devices)}"
    reported = health.get("startup_s")
    if isinstance(reported, dict):
        parts = {name: reported.get(name) for name in ("imports", "load", "warm_up", "capture")}
        return f"{launch['healthy_s']:.1f} s ({shown(parts | reported)}{where})"
    logged = launch.get("rank0_log", {})
    parts = {"imports+rendezvous": logged.get("imports_and_rendezvous_s"), "load": logged.get("load_s"),
             "warm_up": logged.get("warm_up_s")}
    return f"{launch['healthy_s']:.1f} s (/health startup_s n/a; rank 0 log: {shown(parts)}{where})"


def table(rows: list[dict]) -> str:
    widths = [max(len(str(r[key])) for r in rows + [dict(check="check", value="value", target="target")])
              for key in ("check", "value", "target")]
    mark = {True: "yes", False: "NO", None: "-"}
    lines = [f"{'check':{widths[0]}}  {'value':{widths[1]}}  {'target':{widths[2]}}  met"]
    lines += [f"{r['check']:{widths[0]}}  {r['value']:{widths[1]}}  {r['target']:{widths[2]}}  {mark[r['met']]}"
              for r in rows]
    return "\n".join(lines)


def write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


# ---- the driver ---------------------------------------------------------------------------------------------

def run_step(name: str, argv: list[str], budget_s: float, workdir: Path, env: dict) -> dict:
    """The step in a process group of its own; past its budget SIGINT (the launcher's Ctrl-C), then SIGKILL."""
    partial = workdir / f"{name}.json"
    step_dir = workdir / name
    step_dir.mkdir(parents=True)
    print(f"\n=== {name} (budget {budget_s:.0f} s) ===", flush=True)
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv, "--run-step", name,
                                "--partial", str(partial), "--step-dir", str(step_dir)],
                               start_new_session=True, env=env)
    try:
        status = "ok" if process.wait(timeout=budget_s) == 0 else "failed"
    except subprocess.TimeoutExpired:
        status = "timeout"
    except KeyboardInterrupt:  # this process was stopped (Ctrl-C, or SIGTERM from `timeout`)
        status = "interrupted"
    stop_group(process)
    result = json.loads(partial.read_text()) if partial.exists() else {}
    error = result.pop("error", None)
    if status == "timeout":
        error = f"over its budget of {budget_s:.0f} s"
    out = {"status": status, "seconds": time.monotonic() - started, "budget_s": budget_s, "result": result}
    if error or status != "ok":
        out["error"] = error or f"exit status {process.returncode}"
    print(f"=== {name}: {status} in {out['seconds']:.0f} s{': ' + out['error'] if 'error' in out else ''}",
          flush=True)
    return out


def stop_group(process: subprocess.Popen) -> None:
    """Every process the step started (the launcher, its ranks): SIGINT while the step runs, then SIGKILL."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # leftovers, if any
    except ProcessLookupError:
        pass
    process.wait()


def copy_rank_logs(step_dir: Path, destination: Path) -> int:
    """Each launched job's rank logs (*_log.out, *_log.err) and the launcher's stderr, flat."""
    found = list(step_dir.rglob("*_log.out")) + list(step_dir.rglob("*_log.err")) + \
        list(step_dir.rglob("launcher.err"))
    shutil.rmtree(destination, ignore_errors=True)  # an earlier run's
    for path in found:
        destination.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, destination / "_".join(path.relative_to(step_dir).parts))
    return len(found)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON; rank logs beside it")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (on the CPU unless --device says)")
    parser.add_argument("--device", default=None, help="cuda (default) or cpu; cpu implies --smoke")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--bandwidth-gbs", type=float, default=None, help="default: from the GPU's name")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="the roofline's decode step (auto: on GPUs); the servers follow model.compile")
    parser.add_argument("--budget", action="append", default=[], metavar="STEP=SECONDS",
                        help="change a step's time budget (repeatable)")
    parser.add_argument("--workdir", type=Path, default=None, help="for checkpoints and jobs (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (checkpoints, jobs)")
    parser.add_argument("--run-step", choices=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--partial", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--step-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.smoke = args.smoke or args.device == "cpu"
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    args.budgets = dict((SMOKE if args.smoke else FULL).budgets)
    for given in args.budget:
        step, _, seconds = given.partition("=")
        if step not in STEPS or not seconds.replace(".", "", 1).isdigit():
            parser.error(f"--budget {given}: want STEP=SECONDS, STEP one of {', '.join(STEPS)}")
        args.budgets[step] = float(seconds)
    return args


def run_one_step(args: argparse.Namespace) -> int:
    record = Record(args.partial)
    sizes = SMOKE if args.smoke else FULL
    try:
        STEP_FUNCTIONS[args.run_step](args, sizes, args.step_dir, record)
    except (Exception, KeyboardInterrupt) as e:  # KeyboardInterrupt: the budget ran out
        traceback.print_exc()
        record["error"] = f"{type(e).__name__}: {e}"[:3000]
        return 1
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.run_step:
        return run_one_step(args)
    signal.signal(signal.SIGTERM, _interrupt)  # `timeout` stops this script: the JSON is still written
    sizes = SMOKE if args.smoke else FULL
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="fleetgen-gpu-", dir=args.workdir))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.device == "cpu":  # shared cores: spinning OpenMP threads take the working ones' cycles
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    results = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": args.device, "smoke": args.smoke,
               "machine": {"platform": platform.platform(), "python": platform.python_version(),
                           "cpus": os.cpu_count()},
               "sizes": dataclasses.asdict(sizes) | {"budgets": args.budgets}, "workdir": str(workdir),
               "steps": {}, "checks": []}
    started = time.monotonic()
    try:
        for name in args.steps:
            step = results["steps"][name] = run_step(name, argv, args.budgets[name], workdir, env)
            step["rank_logs"] = copy_rank_logs(workdir / name, out.parent / "rank_logs" / name)
            results["checks"] = checks(results["steps"], sizes, args.smoke)
            write_json(out, results)
            if step["status"] == "interrupted":
                break
    finally:
        results["seconds"] = time.monotonic() - started
        write_json(out, results)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n{table(results['checks']) if results['checks'] else '(no checks)'}\n\n"
          f"{'smoke run (tiny shapes): speed targets not judged; ' if args.smoke else ''}"
          f"{results['seconds']:.0f} s in all; written {out}", flush=True)
    complete = len(results["steps"]) == len(args.steps) and all(
        s["status"] == "ok" for s in results["steps"].values())
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
