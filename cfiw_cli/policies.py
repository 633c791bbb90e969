"""Kept policies: the checkpoint each iteration of a loop started from, for paired replays.

Layout (recorded in the run's config as `loop.keep_policies = k`):

    RUN/policies/                config.json (or adapter_config.json), tokenizer files, ...: what every
                                 checkpoint shares, once
    RUN/policies/iter-NNNN/      weights, optimizer state, schedule state and manifest of the
                                 policy iteration NNNN started from (NNNN = k, 2k, ...)

    RUN/best/                    the run's policy that scored best so far on the probe (mean
                                 reward of its samples), or on greedy accuracy without a probe,
                                 without optimizer state; best.json says which iteration

With `loop.keep_checkpoints = N` only the newest N kept policies stay. Iteration 0 starts
from the run's `model.id`, which is neither copied nor a candidate for best/. A kept policy is the loop's
`RUN/policy/` at the start of the iteration, copied file by file, so `policy_at` rebuilds a
directory that `cfiw train --model` loads exactly as the loop's update did, optimizer state
included, or without the optimizer state for a fresh one.
"""

from __future__ import annotations

import json
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from cfiw_cli.artifacts import recorded_value, staged_directory
from cfiw_cli.checkpoint import STATE_FILES
from cfiw_cli.errors import CfiwError
from cfiw_cli.modeling import holds_model
from cfiw_cli.runs import RunLayout

BEST_RECORD = "best.json"  # in RUN/best/: the iteration, the metric and its value
# files of one checkpoint that change from iteration to iteration; everything else is shared
PER_ITERATION = ("*.safetensors", "*.safetensors.index.json", *STATE_FILES, "cfiw_manifest.json")


@dataclass(frozen=True)
class KeepConfig:
    policy: str  # the loop's policy directory
    out: str  # RUN/policies/iter-NNNN


def _per_iteration(path: Path) -> bool:
    return any(path.match(pattern) for pattern in PER_ITERATION)


def keep(config: KeepConfig) -> Path:
    """Copy the policy's per-iteration files to `out` (atomically) and its shared files to the
    parent once; a kept policy is never rewritten."""
    source, out = Path(config.policy), Path(config.out)
    if out.exists():
        return out
    if not holds_model(source):
        raise CfiwError(f"no policy to keep in {source}", "keep policies from a run's policy/ directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    for file in sorted(p for p in source.iterdir() if p.is_file() and not _per_iteration(p)):
        if not (out.parent / file.name).exists():
            shutil.copyfile(file, out.parent / file.name)
    with staged_directory(out) as tmp:
        for file in sorted(p for p in source.iterdir() if p.is_file() and _per_iteration(p)):
            shutil.copyfile(file, tmp / file.name)
    return out


def prune_kept(run: Path, newest: int) -> list[Path]:
    """Remove all but the `newest` kept policies (and nothing when `newest` is 0); returns the
    removed directories. The shared files stay with the ones left."""
    kept = kept_directories(run)
    removed = kept[:-newest] if newest and len(kept) > newest else []
    for directory in removed:
        shutil.rmtree(directory)
    return removed


def update_best(policy: Path, best: Path, iteration: int, metric: str, value: float) -> bool:
    """Copy the policy (weights, tokenizer and manifest; no optimizer state) to `best`,
    atomically, when `value` beats the value `best` records; returns whether it did. Ties keep
    the earlier policy."""
    record = best / BEST_RECORD
    if record.exists() and best_value(record) >= value:
        return False
    with staged_directory(best) as tmp:
        for file in sorted(p for p in policy.iterdir() if p.is_file() and p.name not in STATE_FILES):
            shutil.copyfile(file, tmp / file.name)
        (tmp / BEST_RECORD).write_text(
            json.dumps({"iteration": iteration, "metric": metric, "value": value}, indent=2) + "\n"
        )
    return True


def best_value(record: Path) -> float:
    """The value a best.json records."""
    hint = f"delete {record.parent}: the loop then keeps the next evaluated policy there"
    return float(recorded_value(record, "value", lambda value: isinstance(value, int | float), hint))


def keep_command(config: KeepConfig) -> str:
    """The shell line that does what `keep` does (for `cfiw loop --dry-run`)."""
    source, out = shlex.quote(config.policy), shlex.quote(config.out)
    tmp, shared = shlex.quote(config.out + ".tmp"), shlex.quote(str(Path(config.out).parent))
    patterns = "|".join(PER_ITERATION)
    return (
        f'test -d {out} || (set -e; rm -rf {tmp}; mkdir -p {tmp}; for f in {source}/*; do case "${{f##*/}}" in '
        f'{patterns}) cp "$f" {tmp}/ ;; *) if test -f "$f" && ! test -e {shared}/"${{f##*/}}"; then cp "$f" '
        f"{shared}/; fi ;; esac; done; mv {tmp} {out})"
    )


def kept_directories(run: Path) -> list[Path]:
    """RUN/policies/iter-NNNN, oldest first."""
    return sorted(p for p in RunLayout(run).policies.glob("iter-[0-9][0-9][0-9][0-9]") if p.is_dir())


def kept_iterations(run: Path) -> list[int]:
    """Iterations whose starting policy can be rebuilt: 0 and every kept one."""
    return [0, *(int(p.name[5:]) for p in kept_directories(run))]


def policy_at(run: Path, iteration: int, base: str, optimizer: bool, work: Path, build: bool = True) -> str:
    """A model directory (or hub id) holding the policy iteration `iteration` started from.

    Iteration 0 is the run's starting model `base`. Others are rebuilt in `work` (replaced on
    every call: one at a time) from symbolic links to the kept files, so nothing is copied;
    without `optimizer` the optimizer and schedule state are left out (a fresh AdamW). With
    `build` off only the path is returned (the other processes of a sharded replay)."""
    if iteration == 0:
        local = Path(base)
        if optimizer or not local.is_dir() or not any((local / name).exists() for name in STATE_FILES):
            return base
        files, shared_dir = [p for p in local.iterdir() if p.is_file()], None
    else:
        kept = RunLayout(run).kept_policy(iteration)
        if not kept.is_dir():
            raise CfiwError(
                f"{run} kept no policy for iteration {iteration}",
                f"kept iterations: {', '.join(map(str, kept_iterations(run)))}",
            )
        shared_dir = kept.parent
        files = [p for p in kept.iterdir() if p.is_file()]
        files += [p for p in shared_dir.iterdir() if p.is_file() and not _per_iteration(p)]
    if not build:
        return str(work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for file in files:
        if not optimizer and file.name in STATE_FILES:
            continue
        (work / file.name).symlink_to(file.resolve())
    return str(work)
