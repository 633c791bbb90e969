"""`cfiw sql`'s sealed connection against a plain DuckDB connection over the same files.

`cfiw sql` reads a run through a read-only fsspec filesystem (DuckDB's local filesystem is
switched off, so no query can write). This measures what that costs: a synthetic run shaped
like a real one (ITERATIONS x 512 rollouts of ~300 completion tokens with their ids and
log-probs, ~7 spans and scores per rollout, zstd Parquet with page checksums, as the stages
write them), three typical queries, each timed from connect to result, through

  plain:  duckdb.connect() and read_parquet over the local paths (what a user would type);
  sealed: what `cfiw sql` runs: cfiw_cli.report.sql.connect(run) (the manifests table is built
          only for a query that names it, as here for none).

Prints the median of `--repeats` runs of each and the sealed/plain ratio.

    python benchmarks/sql_bench.py [--iterations 24] [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from cfiw_cli.artifacts import build_manifest, write_table
from cfiw_cli.report.sql import connect as sealed_connect

QUERIES = {
    "mean reward by iteration": "select iteration, avg(reward) from rollouts group by 1 order by 1",
    "delta by span kind": "select kind, count(*), avg(delta) from spans join scores using (rollout_id, span_idx, "
    "iteration) group by kind order by kind",
    "tokens and log-probs": "select iteration, avg(len(completion_ids)), avg(list_sum(completion_logprobs)) "
    "from rollouts group by 1 order by 1",
}


def make_run(root: Path, iterations: int, rollouts: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for iteration in range(iterations):
        directory = root / f"iter-{iteration:04d}"
        directory.mkdir(parents=True)
        ids = [f"{iteration}:q-{i // 8}:{i % 8}" for i in range(rollouts)]
        lengths = rng.integers(150, 450, rollouts)
        table = pa.table(
            {
                "rollout_id": ids,
                "iteration": pa.array([iteration] * rollouts, pa.int32()),
                "prompt_id": [f"q-{i // 8}" for i in range(rollouts)],
                "reward": pa.array(rng.integers(0, 2, rollouts).astype(np.float32)),
                "completion_ids": pa.array([rng.integers(0, 151_936, n).astype(np.int32) for n in lengths]),
                "completion_logprobs": pa.array([rng.normal(-0.5, 0.5, n).astype(np.float32) for n in lengths]),
                "completion_text": ["x" * (4 * int(n)) for n in lengths],
            }
        )
        write_table(table, directory / "rollouts.parquet", build_manifest("rollout", {}, {}, rows=rollouts, seconds=0))
        spans_per = 7
        span_ids = [rollout for rollout in ids for _ in range(spans_per)]
        index = pa.array(list(range(spans_per)) * rollouts, pa.int32())
        kinds = rng.choice(["calculation", "numeric", "scaffolding"], len(span_ids))
        spans = pa.table({"rollout_id": span_ids, "span_idx": index, "kind": kinds})
        scores = pa.table(
            {"rollout_id": span_ids, "span_idx": index, "delta": rng.normal(0, 1, len(span_ids)).astype(np.float32)}
        )
        write_table(spans, directory / "spans.parquet", build_manifest("segment", {}, {}, rows=len(spans), seconds=0))
        write_table(scores, directory / "scores.parquet", build_manifest("score", {}, {}, rows=len(scores), seconds=0))


def plain(run: Path):
    """The same views over local paths, on an unsealed connection."""
    con = duckdb.connect()
    for kind in ("rollouts", "spans", "scores"):
        files = sorted(str(p) for p in run.glob(f"iter-*/{kind}.parquet"))
        iteration = "cast(regexp_extract(filename, 'iter-(\\d+)/', 1) as integer) as iteration"
        if kind == "rollouts":
            con.execute(
                f"create view rollouts as select * exclude (filename) from read_parquet({files}, filename = true)"
            )
        else:
            con.execute(
                f"create view {kind} as select * exclude (filename), {iteration} from read_parquet({files}, "
                "filename = true)"
            )
    return con


def connect(run: Path):
    return sealed_connect(run, manifests=False)


def timed(make, run: Path, query: str) -> float:
    started = time.perf_counter()
    make(run).execute(query).fetchall()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=24)
    parser.add_argument("--rollouts", type=int, default=512, help="rollouts per iteration")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="4 iterations of 64 rollouts, 2 repeats (a smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.iterations, args.rollouts, args.repeats = 4, 64, 2
    with tempfile.TemporaryDirectory(prefix="cfiw-sql-bench-") as scratch:
        run = Path(scratch) / "run"
        make_run(run, args.iterations, args.rollouts)
        size = sum(p.stat().st_size for p in run.rglob("*.parquet")) / 2**20
        print(f"run: {args.iterations} iterations x {args.rollouts} rollouts, {size:.1f} MiB of Parquet; "
              f"median of {args.repeats}, connect to result")  # fmt: skip
        print(f"{'query':<28} {'plain s':>9} {'sealed s':>9} {'ratio sealed/plain':>19}")
        for name, query in QUERIES.items():
            assert sorted(plain(run).execute(query).fetchall()) == sorted(connect(run).execute(query).fetchall())
            base = statistics.median(timed(plain, run, query) for _ in range(args.repeats))
            sealed = statistics.median(timed(connect, run, query) for _ in range(args.repeats))
            print(f"{name:<28} {base:>9.3f} {sealed:>9.3f} {sealed / base:>19.2f}")


if __name__ == "__main__":
    main()
