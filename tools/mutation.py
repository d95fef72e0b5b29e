"""Mutation score of the modules whose tests must fail when the code is wrong (not run by CI: CPU-heavy).

    .venv/bin/python -m pip install cosmic-ray==8.7.0
    .venv/bin/python tools/mutation.py [MODULE ...]      # default: every module below

Each module is mutated in place by cosmic-ray (restored after each mutant) and only its fast tests run per
mutant, without tests/conftest.py (its fixtures import the whole model: seconds per mutant). To keep a run
within minutes the operators are cut to one or two kinds of change each: a binary operator to its nearest
neighbour (+ to -, * to +, ...), a comparison negated or moved across its boundary, plus cosmic-ray's
numbers, `not`, booleans, and/or, exceptions and emptied loops. Prints each module's score and its
survivors (file:line, operator) to judge by hand.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = {  # module -> its fast tests
    "launcher/batch/ledger.py": ["tests/test_batch_ledger.py"],
    "launcher/batch/keys.py": ["tests/test_batch_ledger.py", "tests/test_batch_input.py"],
    "launcher/batch/formats.py": ["tests/test_batch_formats.py", "tests/test_batch_dispatch_unit.py",
                                  "tests/test_batch_input.py", "tests/test_batch_dispatch.py"],
    "launcher/batch/dispatch.py": ["tests/test_batch_dispatch_unit.py", "tests/test_batch_dispatch.py",
                                   "tests/test_batch_affinity.py"],
    "launcher/batch/affinity.py": ["tests/test_batch_affinity.py"],
    "model/sampling.py": ["tests/test_sampling.py"],
    "model/shard.py": ["tests/test_shard.py"],
    "model/serve/liveness.py": ["tests/test_liveness_unit.py"],
}
KEPT_BINARY = ["Add_Sub", "Sub_Add", "Mul_Add", "Div_Mul", "FloorDiv_Mul", "Mod_Add", "Pow_Mul",
               "LShift_RShift", "RShift_LShift", "BitAnd_BitOr", "BitOr_BitAnd", "BitXor_BitOr"]
KEPT_COMPARISON = ["Lt_GtE", "LtE_Gt", "Gt_LtE", "GtE_Lt", "Lt_LtE", "LtE_Lt", "Gt_GtE", "GtE_Gt", "Eq_NotEq",
                   "NotEq_Eq", "Is_IsNot", "IsNot_Is", "In_NotIn", "NotIn_In"]
EXCLUDED = [f"core/ReplaceBinaryOperator_(?!({'|'.join(KEPT_BINARY)})$)",
            f"core/ReplaceComparisonOperator_(?!({'|'.join(KEPT_COMPARISON)})$)",
            "core/ReplaceUnaryOperator_(?!(USub_UAdd|Delete_Not|Delete_Invert|Delete_USub)$)", "core/RemoveDecorator"]
TIMEOUT_S = 90.0  # a mutant that hangs the tests is killed this long after it started (no module takes 30 s)


def config(module: str) -> str:
    tests = " ".join(TESTS[module])
    excluded = ", ".join(json.dumps(e) for e in EXCLUDED)
    return (f'[cosmic-ray]\nmodule-path = "{ROOT / module}"\ntimeout = {TIMEOUT_S}\nexcluded-modules = []\n'
            f'test-command = "env OMP_NUM_THREADS=1 {sys.executable} -m pytest -x -q -p no:cacheprovider --noconftest '
            f'-m \'not slow\' {tests}"\n'
            f'[cosmic-ray.distributor]\nname = "local"\n'
            f'[cosmic-ray.filters.operators-filter]\nexclude-operators = [{excluded}]\n')


def mutate(module: str, workdir: Path) -> tuple[int, int, list[str]]:
    """(killed, tried, survivors) of one module."""
    cfg, session = workdir / "config.toml", workdir / f"{module.replace('/', '_')}.sqlite"
    cfg.write_text(config(module))
    bin_dir = Path(sys.executable).parent
    for command in (["cosmic-ray", "init", cfg, session], ["cr-filter-operators", session, cfg],
                    ["cosmic-ray", "exec", cfg, session]):
        subprocess.run([str(bin_dir / command[0]), *map(str, command[1:])], cwd=ROOT, check=True)
    dump = subprocess.run([str(bin_dir / "cosmic-ray"), "dump", str(session)], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    killed, tried, survivors = 0, 0, []
    for line in dump.splitlines():
        item, result = json.loads(line)
        if result is None or result.get("worker_outcome") == "skipped":
            continue
        tried += 1
        if result.get("test_outcome") == "survived":
            m = item["mutations"][0]
            survivors.append(f"{module}:{m['start_pos'][0]} {m['operator_name']} #{m['occurrence']}")
        else:
            killed += 1  # killed, or incompetent (the mutant does not even import): caught either way
    return killed, tried, survivors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", default=list(TESTS), choices=list(TESTS), metavar="MODULE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        for module in args.modules:
            killed, tried, survivors = mutate(module, Path(workdir))
            print(f"{module}: {killed}/{tried} killed ({100 * killed / max(tried, 1):.0f}%)", flush=True)
            for survivor in survivors:
                print(f"  survived: {survivor}", flush=True)
    dirty = subprocess.run(["git", "status", "--porcelain", *args.modules], cwd=ROOT, capture_output=True,
                           text=True).stdout
    if dirty:
        print(f"a module was left mutated, restore it with git checkout: {dirty}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
