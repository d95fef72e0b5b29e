"""What a running batch shows: OUTPUT.progress.json rewritten atomically every ~2 s (for `launch status` and
scripts), a live bar in a terminal or a plain line every ~30 s elsewhere (Slurm logs, CI); and the ledger's
periodic fsync, on the same clock."""
from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from typing import Optional
from pathlib import Path
from collections.abc import Callable

from tqdm import tqdm

from fleetgen.slurm.job_folder import write_atomically

SNAPSHOT_EVERY_S = 2.0
PLAIN_LINE_EVERY_S = 30.0


def write_json_atomically(path: Path, data: dict) -> None:
    write_atomically(path, json.dumps(data, indent=1) + "\n")


def progress_path(output: Path, shard: Optional[int] = None, shards: int = 1) -> Path:
    """OUTPUT's progress, or with batch.shards > 1 that of driver `shard` (the launcher's sums them)."""
    if shard is None:
        return output.with_name(output.name + ".progress.json")
    return output.with_name(f"{output.name}.shard-{shard}-of-{shards}.progress.json")


class Reporter:
    def __init__(self, path: Path, snapshot: Callable[[], dict], sync: Callable[[], None], show: bool = True):
        """show: the bar or plain lines too (a shard's driver only writes its file; the launcher shows them)."""
        self._path, self._snapshot, self._sync, self._show = path, snapshot, sync, show
        self._stop = threading.Event()
        self._bar = None
        self._thread = threading.Thread(target=self._loop, name="fleetgen-batch-progress", daemon=True)

    def start(self) -> None:
        first = self._snapshot()
        if not self._show:
            pass
        elif _terminal_columns() > 0:
            self._bar = tqdm(total=first["total"], initial=first["done"] + first["failed"], unit="item",
                             dynamic_ncols=True, leave=False)
        else:
            print(plain_line(first), flush=True)  # where it starts, in a log; then every PLAIN_LINE_EVERY_S
        write_json_atomically(self._path, first)
        self._thread.start()

    def stop(self) -> dict:
        """The last snapshot, written once more."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        last = self._snapshot()
        write_json_atomically(self._path, last)
        if self._bar is not None:
            self._bar.close()
        return last

    def _loop(self) -> None:
        last_line = time.monotonic()
        while not self._stop.wait(SNAPSHOT_EVERY_S):
            self._sync()
            snapshot = self._snapshot()
            write_json_atomically(self._path, snapshot)
            if self._bar is not None:
                self._bar.n = snapshot["done"] + snapshot["failed"]
                self._bar.set_postfix_str(f"{snapshot['tokens_per_s']:.0f} tok/s, {snapshot['failed']} failed, "
                                          f"ETA {_duration(snapshot['eta_s'])}")
            elif self._show and time.monotonic() - last_line >= PLAIN_LINE_EVERY_S:
                print(plain_line(snapshot), flush=True)
                last_line = time.monotonic()


def _terminal_columns() -> int:
    """The terminal's width; 0 when stdout is no terminal, or one that says it has no columns (a bar there
    would be nothing but control characters)."""
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns if sys.stdout.isatty() else 0
    except (OSError, ValueError):
        return 0


def plain_line(s: dict) -> str:
    finished = s["done"] + s["failed"]
    healthy = sum(r["state"] == "healthy" for r in s["replicas"])
    return (f"batch: {finished}/{plural(s['total'], 'item')} ({100 * finished / max(s['total'], 1):.0f}%), "
            f"{s['failed']} failed, {s['retried']} retried, {s['tokens_per_s']:.0f} tokens/s, ETA "
            f"{_duration(s['eta_s'])}, {healthy}/{plural(len(s['replicas']), 'server')} healthy")


def report(summary, wall_s: float) -> int:
    """What `launch` prints at the end, and its exit code: 0 when every item was generated; 1 when some
    failed (OUTPUT.errors.jsonl) or the run stopped (a rerun resumes); 130 when Ctrl-C stopped it."""
    for error in summary.first_errors:
        print(f"launch: failed: {error}", file=sys.stderr)
    if not summary.complete:
        print(f"launch: the batch stopped ({summary.stop_reason}) after {summary.done + summary.failed} of "
              f"{plural(summary.items, 'item')}; the summary is in {summary.output}.summary.json", file=sys.stderr)
        print(_how_to_go_on(summary), file=sys.stderr)
        return 130 if summary.stop_reason.startswith("interrupted") else 1
    print(f"results: {summary.output} — {plural(summary.items, 'item')} of {plural(summary.records, 'record')}, "
          f"{summary.done} done, {summary.failed} failed (in {summary.errors}), {summary.completion_tokens} "
          f"generated tokens, {summary.tokens_per_s:.1f} tokens/s, audit {'ok' if summary.audit['ok'] else 'FAILED'}"
          f", wall time {wall_s:.1f} s")
    if summary.prompt_tokens_reused:
        print(f"prompt tokens: {summary.prompt_tokens - summary.prompt_tokens_reused} computed, "
              f"{summary.prompt_tokens_reused} reused from the servers' KV cache (model.prefix_caching)")
    for lost in summary.lost_replicas:
        print(f"launch: server {lost['url']} was lost during the run: {lost['reason']}", file=sys.stderr)
    return 1 if summary.failed or not summary.audit["ok"] else 0


def _how_to_go_on(summary) -> str:
    command = summary.resume or "the same command"
    if "batch.max_error_fraction" not in (summary.stop_reason or ""):
        return f"launch: to resume it, run: {command}"
    fraction = summary.failed / max(summary.items, 1)
    enough = min(1.0, math.ceil(fraction * 10 + 1) / 10)
    return (f"launch: {summary.failed} of {summary.items} items failed ({fraction:.2f}), see {summary.errors}; a "
            f"rerun stops again unless batch.max_error_fraction is above {fraction:.2f}. To go on anyway, run: "
            f"{command} batch.max_error_fraction={enough:g}")


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _duration(seconds) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
