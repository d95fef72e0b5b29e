"""The batch driver's memory and start-up over 1 M and 5 M records, against a stand-in server (no model).

For each size: a synthetic fleetgen JSONL input (short prompts, ids), then a fresh driver process runs what
`launch` runs on the login node: validate() (the checkpoint's metadata, the bundled tiny GPT-2's, and the
split), prepare() (the validation pass over the input) and run() (dispatch, ledger, final merge and audit)
against tests/batch_stub.py's server in this process. Printed per size: peak RSS of the driver (VmHWM, whole run),
RSS after prepare, seconds of prepare, seconds from run() to its first request, and the run's wall time.
The reference, in the same run: the RSS of holding the 1 M records in memory the way the launcher did before
(a list of parsed records), so the ratio shows what streaming saves. Target: peak < 150 MB, flat in size;
the driver imports no torch (the line printed says so).

    python -m benchmarks.batch_memory [--sizes 1000000 5000000] [--workdir DIR]   (from the repository root)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.batch_stub import StubServer

MB = 1 << 20
CHILD = """
import json, sys, time
from pathlib import Path
start = time.perf_counter()
from fleetgen.launcher.batch import prepare, run
from fleetgen.launcher.batch.prompts import PromptRules
from fleetgen.launcher.config import DATA_DIR
from fleetgen.launcher.validate import validate
from tests.batch_stub import batch_config

def rss(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024

workdir, url = Path(sys.argv[1]), sys.argv[2]
cfg = batch_config(workdir / "in.jsonl", workdir / "out.jsonl", checkpoint=DATA_DIR / "tiny-gpt2",
                   concurrency=8, prompts_per_request=128, restart=True, generation={"tokens_to_generate": 3})
t0 = time.perf_counter()
validate(cfg, [])
plan = prepare(cfg, PromptRules.load(cfg))  # every prompt's tokens counted, as launch does
prepared_s, after_prepare = time.perf_counter() - t0, rss("VmRSS:")
summary = run(plan, [url], None)
print(json.dumps({"items": summary.items, "complete": summary.complete, "audit_ok": summary.audit["ok"],
                  "prepare_s": prepared_s, "first_request_s": summary.first_request_s, "run_s": summary.wall_s,
                  "rss_after_prepare": after_prepare, "peak_rss": rss("VmHWM:"),
                  "torch": "torch" in sys.modules}))
"""
REFERENCE = """
import json, sys
from pathlib import Path
records = [json.loads(line) for line in open(sys.argv[1])]
peak = [int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:")]
print(json.dumps({"records": len(records), "peak_rss": peak[0]}))
"""


def write_input(path: Path, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"rec-{i:08d}", "prompt": f"Write a short story about topic number {i}."})
                    + "\n")


def child(script: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 5_000_000])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    stub = StubServer()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        workdir = Path(tmp)
        rows = []
        for n in args.sizes:
            started = time.perf_counter()
            write_input(workdir / "in.jsonl", n)
            print(f"{n:>9,} records: input {(workdir / 'in.jsonl').stat().st_size / MB:.0f} MB written in "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
            result = child(CHILD, str(workdir), stub.url)
            assert result["complete"] and result["audit_ok"] and result["items"] == n, result
            rows.append((n, result))
            if n == args.sizes[0]:
                reference = child(REFERENCE, str(workdir / "in.jsonl"))
            for name in ("out.jsonl", "out.jsonl.ledger.jsonl"):
                (workdir / name).unlink()
    stub.close()
    print(f"\n{'records':>10} {'peak RSS':>9} {'after prepare':>14} {'prepare':>8} {'1st request':>12} {'run':>7}")
    for n, r in rows:
        print(f"{n:>10,} {r['peak_rss'] / MB:>6.0f} MB {r['rss_after_prepare'] / MB:>11.0f} MB "
              f"{r['prepare_s']:>6.1f} s {r['first_request_s']:>10.2f} s {r['run_s']:>5.0f} s"
              f"{'   (torch imported)' if r['torch'] else ''}")
    first = rows[0][1]
    print(f"\nreference: {args.sizes[0]:,} records held in memory (the previous launcher): peak RSS "
          f"{reference['peak_rss'] / MB:.0f} MB; the streaming driver's peak is "
          f"{first['peak_rss'] / reference['peak_rss']:.2f}× that")
    if len(rows) > 1:
        print(f"peak RSS at {rows[-1][0]:,} over {rows[0][0]:,} records: "
              f"{rows[-1][1]['peak_rss'] / rows[0][1]['peak_rss']:.2f}×")


if __name__ == "__main__":
    main()
