"""`cfiw sql`: DuckDB views over every iteration of a run, and the manifests."""

import json

import pyarrow as pa
from test_errors import assert_clean_error

from cfiw_cli.artifacts import build_manifest, write_table


def make_run(root):
    for iteration, deltas in ((0, [1.0, 3.0]), (1, [5.0, 7.0])):
        directory = root / f"iter-{iteration:04d}"
        directory.mkdir(parents=True)
        spans = pa.table(
            {
                "rollout_id": [f"{iteration}:p:0"] * 2,
                "span_idx": pa.array([0, 1], pa.int32()),
                "kind": ["calculation", "scaffolding"],
            }
        )
        scores = pa.table(
            {
                "rollout_id": [f"{iteration}:p:0"] * 2,
                "span_idx": pa.array([0, 1], pa.int32()),
                "delta": pa.array(deltas, pa.float32()),
            }
        )
        write_table(spans, directory / "spans.parquet", build_manifest("segment", {}, {}, rows=2, seconds=0))
        write_table(scores, directory / "scores.parquet", build_manifest("score", {}, {}, rows=2, seconds=0))
    (root / "eval").mkdir()
    write_table(
        pa.table({"prompt_id": ["a", "b"], "correct": [True, False]}),
        root / "eval" / "iter-0002.parquet",
        build_manifest("eval", {}, {}, rows=2, seconds=0),
    )
    (root / "probe").mkdir()
    write_table(
        pa.table({"prompt_id": ["a", "a", "b", "b"], "correct": [True, True, True, False]}),
        root / "probe" / "iter-0004.parquet",
        build_manifest("eval", {}, {}, rows=4, seconds=0),
    )
    return root


def test_views_join_across_iterations(cli, tmp_path):
    run = make_run(tmp_path / "run")
    query = (
        "select kind, avg(delta) as mean from spans join scores using (rollout_id, span_idx, iteration) group "
        "by kind order by kind"
    )
    result = cli("sql", run, query, "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == [{"kind": "calculation", "mean": 3.0}, {"kind": "scaffolding", "mean": 5.0}]
    by_iteration = cli("sql", run, "select iteration, sum(delta) from scores group by 1 order by 1", "--format", "csv")
    assert by_iteration.stdout.splitlines() == ["iteration,sum(delta)", "0,4.0", "1,12.0"]
    evals = cli("sql", run, "select iteration, avg(correct::int) as accuracy from eval group by 1", "--format", "json")
    assert json.loads(evals.stdout) == [{"iteration": 2, "accuracy": 0.5}]
    probe = cli("sql", run, "select iteration, avg(correct::int) as reward from probe group by 1", "--format", "json")
    assert json.loads(probe.stdout) == [{"iteration": 4, "reward": 0.75}]
    manifests = cli("sql", run, "select stage, count(*) as n from manifests group by 1 order by 1", "--format", "csv")
    assert manifests.stdout.splitlines() == ["stage,n", "eval,2", "score,2", "segment,2"]
    table = cli("sql", run, "select count(*) as n from spans")
    assert table.exit_code == 0 and "n" in table.stdout and "4" in table.stdout


def test_the_readme_query_works(cli, tmp_path):
    run = make_run(tmp_path / "run")
    result = cli(
        "sql", run, "select kind, avg(delta) from spans join scores using (rollout_id, span_idx) group by kind"
    )
    assert result.exit_code == 0 and "calculation" in result.stdout


def test_bad_queries_and_runs(cli, tmp_path):
    run = make_run(tmp_path / "run")
    unknown = cli("sql", run, "select * from nope")
    assert_clean_error(unknown, "query failed")
    # the hint names the views this run has, probe included, and no others
    assert "Hint: this run's views: eval, manifests, probe, scores, spans" in unknown.stderr
    assert_clean_error(cli("sql", tmp_path / "missing", "select 1"), "run directory not found")
    xml = cli("sql", run, "select 1", "--format", "xml")
    assert xml.exit_code == 2 and "csv" in xml.stderr


def test_replay_view(cli, tmp_path):
    run = make_run(tmp_path / "run")
    (run / "replay").mkdir()
    rows = pa.table({"iteration": [0, 0], "mode": ["uniform", "cfiw"], "reward_gain": [0.25, 0.5]})
    write_table(rows, run / "replay" / "replay.parquet", build_manifest("replay", {}, {}, rows=2, seconds=0))
    result = cli("sql", run, "select mode, reward_gain from replay order by mode", "--format", "csv")
    assert result.stdout.splitlines() == ["mode,reward_gain", "cfiw,0.5", "uniform,0.25"]


def test_reads_at_an_offset_are_right_from_many_threads(tmp_path):
    """DuckDB's scan threads share one handle of a run's file and read it as seek + read. With
    the interpreter switching threads as often as it can, every read still returns the bytes
    at its own offset (an ordinary file object returned wrong bytes for hundreds of 12,000
    reads here), and a query over list columns returns the same rows each time."""
    import sys
    import threading

    import pyarrow.parquet as pq

    from cfiw_cli import views

    (tmp_path / "iter-0000").mkdir()
    table = pa.table(
        {"rollout_id": [f"r{i}" for i in range(4000)], "w": [[i * 1.0] * (i % 50 + 1) for i in range(4000)]}
    )
    pq.write_table(table, tmp_path / "iter-0000" / "weights.parquet", row_group_size=100)
    data = (tmp_path / "iter-0000" / "weights.parquet").read_bytes()
    handle = views._filesystem(0, tmp_path).open("iter-0000/weights.parquet", "rb")
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    wrong = []
    try:

        def reader(k: int) -> None:
            for i in range(3000):
                offset = (i * 7919 + k * 104729) % (len(data) - 64)
                handle.seek(offset)
                if handle.read(64) != data[offset : offset + 64]:
                    wrong.append(offset)

        threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not wrong
        handle.seek(-10, 2)
        assert (handle.tell(), handle.read(), handle.read(5)) == (len(data) - 10, data[-10:], b"")
        con = views.connect([tmp_path])
        source = "read_parquet('cfiwrun0://iter-0000/weights.parquet')"
        query = f"select rollout_id, list_sum(w) as s from {source} order by s desc limit 5"
        expected = con.execute(query).fetchall()
        assert expected[0] == ("r3999", 3999.0 * 50)
        for _ in range(20):
            assert con.execute(query).fetchall() == expected
    finally:
        sys.setswitchinterval(interval)
        handle.close()
