"""prepare(): everything about a batch that can be checked before a job is submitted."""
from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from fleetgen.conf.schema import LaunchConfig
from fleetgen.launcher.batch.formats import FleetgenFormat, OpenAIFormat
from fleetgen.launcher.batch.inputs import detect_format, scan
from fleetgen.launcher.batch.ledger import check_header, ledger_path, make_header
from fleetgen.launcher.batch.prompts import LongPrompts, PromptRules
from fleetgen.launcher.batch.progress import progress_path
from fleetgen.launcher.errors import LaunchError

RESTART_HINT = "batch.restart=true starts over (the ledger's results are dropped), or give another batch.output"


@dataclass
class BatchPlan:
    """A checked batch: the config, the input's format ("fleetgen" | "openai"), its record and item counts
    (items = records × batch.samples) and the ledger header that ties OUTPUT.ledger.jsonl to this input and
    these settings. Plain data (picklable): a driver may prepare on the login node and run elsewhere."""
    cfg: LaunchConfig
    format: str
    records: int
    items: int
    keyed_by_id: bool
    header: dict
    command: str = ""  # the `launch` command line that reruns (and so resumes) this batch, shown when it stops
    measured: bool = False  # prepared with the model's prompt rules: the run renders and measures with them too
    _rules: Optional[PromptRules] = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:  # the rules hold a tokenizer: a driver elsewhere loads its own
        return {**self.__dict__, "_rules": None}

    @property
    def shards(self) -> int:
        return self.cfg.batch.shards

    def ledger(self, shard: int = 0) -> Path:
        return ledger_path(self.output, shard, self.shards)

    def shard_items(self, shard: int) -> int:
        """Items of the records inputs.shard_of gives this shard: every shards-th from the shard-th."""
        return len(range(shard, self.records, self.shards)) * self.cfg.batch.samples

    @property
    def input(self) -> Path:
        return Path(self.cfg.batch.input)

    @property
    def output(self) -> Path:
        return Path(self.cfg.batch.output)

    def make_format(self) -> FleetgenFormat | OpenAIFormat:
        if self.measured and self._rules is None:
            self._rules = PromptRules.load(self.cfg)
        return make_format(self.format, self.cfg, self._rules.for_run() if self._rules else None)


def make_format(name: str, cfg: LaunchConfig, rules: Optional[PromptRules] = None) -> FleetgenFormat | OpenAIFormat:
    if name == "openai":
        return OpenAIFormat(cfg.batch.seed, rules)
    return FleetgenFormat(cfg.generation, cfg.batch.seed, rules)


def run_files(output: Path) -> list[Path]:
    """Every file a run writes beside OUTPUT, OUTPUT included (every shard's too, whatever batch.shards was)."""
    shards = sorted(output.parent.glob(f"{glob.escape(output.name)}.shard-*-of-*.*"))
    return [output, ledger_path(output), errors_path(output), summary_path(output), progress_path(output), *shards]

def errors_path(output: Path) -> Path:
    return output.with_name(output.name + ".errors.jsonl")


def summary_path(output: Path) -> Path:
    return output.with_name(output.name + ".summary.json")


def prepare(cfg: LaunchConfig, rules: Optional[PromptRules] = None) -> BatchPlan:
    """Check a batch before submission: one streaming pass over batch.input (JSON, the format's fields, the
    id rules: ids on every record or none, none repeated; with the model's prompt rules, chat messages
    rendered and every prompt's length against the context window), then the ledger against this input and
    these settings. Raises LaunchError naming the file and line. batch.restart=true removes the previous run's
    files here, so a driver that prepares again after a requeue must not pass it again."""
    if not cfg.batch.input:
        raise LaunchError("batch.input is not set: give batch.input=PATH (a JSONL file), or mode=serve")
    source, output = Path(cfg.batch.input), Path(cfg.batch.output)
    name = detect_format(source)
    if cfg.batch.shards > cfg.parallel.replicas:
        raise LaunchError(f"batch.shards={cfg.batch.shards}: more drivers than parallel.replicas="
                          f"{cfg.parallel.replicas}; each driver feeds replicas of its own")
    if name == "openai" and cfg.batch.samples > 1:
        raise LaunchError(f"batch.samples={cfg.batch.samples}: {source} is in OpenAI's batch format, where a "
                          "request's completions are its own (one output line per custom_id); use batch.samples=1")
    long_prompts = LongPrompts(cfg.model.max_seq_len) if rules is not None and rules.policy == "error" else None
    scanned = scan(source, make_format(name, cfg, rules), long_prompts)
    items = scanned.records * cfg.batch.samples
    settings = {"format": name, "generation": cfg.generation.model_dump(), "samples": cfg.batch.samples,
                "seed": cfg.batch.seed, "checkpoint": cfg.model.checkpoint,
                "chat_template": cfg.model.chat_template, "long_prompts": cfg.batch.long_prompts,
                "shards": cfg.batch.shards}
    header = make_header(scanned.fingerprint, settings, items)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LaunchError(f"batch.output={output}: cannot create its folder ({e.strerror})") from None
    if cfg.batch.restart:
        for path in run_files(output):
            path.unlink(missing_ok=True)
    else:  # every ledger there, of whatever sharding: another batch.shards is another layout of the ledgers
        for path in run_files(output):
            if path.name.endswith(".ledger.jsonl"):
                check_header(path, header, RESTART_HINT)
    return BatchPlan(cfg, name, scanned.records, items, scanned.keyed_by_id, header, measured=rules is not None,
                     _rules=rules)
