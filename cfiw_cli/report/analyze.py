"""`cfiw analyze`: did weighting help, and which spans mattered? Tables, plots and a report.

Every aggregate is DuckDB SQL over the runs' Parquet files. Tables: greedy accuracy per
evaluated iteration per run with its 95% Wilson interval and the optimizer step it was taken
at; the probe (sampled reward at the rollout temperature on fixed questions) likewise, with a
95% interval over questions; `curves.parquet` and `curves_by_mode.parquet` hold both curves;
per run the probe's gain from the first to the last evaluation with its standard error paired
by question; per weighting mode over seeds, the final probe reward, the area under the probe
curve and the steps to reach uniform's final probe reward, and each mode minus uniform paired by seed with a
95% t interval (see `probe_tables`); mean reward per iteration; delta by span kind (count, mean,
median, share of negative deltas); share of the total token weight per span kind; the first
iteration at which each run reaches the final accuracy of the `uniform` run(s); with several
runs per weighting mode (seeds), accuracy per mode and iteration with its spread over runs.

Paired replays (`cfiw replay`, `RUN/replay/replay.parquet`): each mode's update minus
uniform's from the same policy on the same rollouts, per iteration and over all pairs with a
95% t interval (see `replay_tables`).

Ground truth: when the rollouts carry the `labels` column of a `cfiw synth` dataset, a span
that has the form of a reference solution sentence (the same words; any numbers, so a wrong
calculation is still a calculation; whitespace and outer full stops ignored) takes that
sentence's label. Spans of no reference form (merged sentences, garbled text) are
`unmatched`. Tables then add mean delta per label and, per iteration, the AUROC of delta for
`calculation` (positive) against `filler` spans: the probability that a random calculation
span has a larger delta than a random filler span, ties counting one half.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import time
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from cfiw_cli.artifacts import (
    build_manifest,
    lies_inside,
    same_path,
    staged_directory,
    write_directory_manifest,
    written_files,
)
from cfiw_cli.configs import TrainConfig
from cfiw_cli.errors import CfiwError
from cfiw_cli.page.explorer import DEFAULT_ROLLOUTS, EXPLORER_STYLE, explorer_data, explorer_html
from cfiw_cli.page.summary import Summary, summarize
from cfiw_cli.runs import EVALUATION_KINDS, ITERATION_KINDS, RunLayout
from cfiw_cli.stage import OutputLocks, guard_outputs, keep_files_not_ours
from cfiw_cli.stats import t_quantile
from cfiw_cli.tasks.arith import FILLER_RUN
from cfiw_cli.views import connect as connect_views
from cfiw_cli.views import has_column, has_view, labels_of, layout_files, message_of, sql_string

Z = 1.959963984540054
WILSON = (
    f"(acc + {Z}^2 / (2 * n)) / (1 + {Z}^2 / n) {{sign}} "
    f"{Z} * sqrt(acc * (1 - acc) / n + {Z}^2 / (4 * n * n)) / (1 + {Z}^2 / n)"
)


# A sentence's form (`cfiw_cli.tasks.arith.sentence_form`): whitespace collapsed, every run of
# dial words as W, outer spaces and full stops dropped, every number as N.
_NORMALIZED = (
    "regexp_replace(trim(regexp_replace(regexp_replace({text}, '\\s+', ' ', 'g'), "
    + sql_string(FILLER_RUN).replace("{", "{{").replace("}", "}}")  # a template: {text} is filled in
    + ", 'W', 'g'), ' .'), '\\d+', 'N', 'g')"
)


def connect(runs: list[Path]) -> Any:
    """Views over all runs, each with `run` (the run's label: its directory name, with as many
    parent directories as tell two runs of one name apart) and `iteration` columns."""
    labels = labels_of(runs)
    con = connect_views(runs, labels=labels)
    if has_view(con, "spans") and has_view(con, "rollouts") and has_column(con, "rollouts", "labels"):
        # A label is a function of the sentence's form, so one run-wide lookup serves every span.
        con.execute(
            f"""create view span_labels as
            with reference as (
                select {_NORMALIZED.format(text="l.text")} as sentence, min(l.label) as label
                from (select unnest(labels) as l from rollouts) group by all having count(distinct l.label) = 1)
            select s.run, s.iteration, s.rollout_id, s.span_idx, r.label
            from spans s join reference r on {_NORMALIZED.format(text="s.text")} = r.sentence"""
        )
    con.execute("create table modes (run varchar, mode varchar, seed integer, dataset varchar)")
    con.executemany(
        "insert into modes values (?, ?, ?, ?)",
        [(label, *_mode_and_seed(run), _dataset(run)) for label, run in zip(labels, runs, strict=True)],
    )
    _create_steps(con)
    return con


def _dataset(run: Path) -> str | None:
    """The dataset a loop run trained on (its config's data.dataset), else None."""
    config = RunLayout(run).config
    return tomllib.loads(config.read_text()).get("data", {}).get("dataset") if config.exists() else None


# train's default --importance-floor; a run at another floor is mode `MODE@F` in the tables
DEFAULT_FLOOR = next(f.default for f in fields(TrainConfig) if f.name == "importance_floor")


def _mode_and_seed(run: Path) -> tuple[str, int]:

    config = RunLayout(run).config
    if config.exists():
        settings = tomllib.loads(config.read_text())
        loop, train = settings.get("loop", {}), settings.get("train", {})
        mode = loop.get("weighting", "cfiw")
        if train.get("importance_floor", DEFAULT_FLOOR) != DEFAULT_FLOOR:  # a compare over the mapping's dial
            mode += f"@{train['importance_floor']:g}"
        return mode, int(loop.get("seed", 0))
    manifests = sorted(run.glob("policy/cfiw_manifest.json"))
    if manifests:
        settings = json.loads(manifests[0].read_text()).get("config", {})
        return settings.get("weighting", "cfiw"), int(settings.get("seed", 0))
    return "unknown", 0


def _create_steps(con: Any) -> None:
    """`steps(run, iteration, step)`: optimizer steps taken before each evaluated iteration,
    counted from the train_metrics rows (one per step); the iteration itself without them."""
    evaluated = " union ".join(
        f"select distinct run, iteration from {v}" for v in ("eval", "probe") if has_view(con, v)
    )
    if not evaluated:
        return
    if has_view(con, "train_metrics"):
        con.execute(
            f"""create view steps as
            with per_iteration as (select run, iteration, count(*) as n from train_metrics group by all)
            select e.run, e.iteration,
                   coalesce((select sum(n) from per_iteration p where p.run = e.run and p.iteration < e.iteration),
                       0)::integer as step
            from ({evaluated}) e"""
        )
    else:
        con.execute(f"create view steps as select run, iteration, iteration as step from ({evaluated})")


def _rows(con: Any, sql: str) -> list[dict]:
    result = con.execute(sql)
    columns = [d[0] for d in result.description]
    return [dict(zip(columns, row, strict=True)) for row in result.fetchall()]


AUROC = """
    with d as (
        select l.run, l.iteration, l.label = 'calculation' as positive, c.delta
        from span_labels l join scores c using (run, iteration, rollout_id, span_idx)
        where l.label in ('calculation', 'filler')),
    ranked as (
        select *, rank() over w + (count(*) over (partition by run, iteration, delta) - 1) / 2.0 as mid_rank
        from d window w as (partition by run, iteration order by delta)),
    sums as (
        select run, iteration, count(*) filter (positive) as calculation_spans, count(*) filter (not positive) as
            filler_spans,
               sum(mid_rank) filter (positive) as rank_sum
        from ranked group by run, iteration)
    select run, mode, iteration, calculation_spans, filler_spans,
           (rank_sum - calculation_spans * (calculation_spans + 1) / 2.0) / (calculation_spans * filler_spans) as auroc
    from sums join modes using (run) where calculation_spans > 0 and filler_spans > 0
    order by run, iteration"""


# Each question's share of correct samples per run and evaluation: the unit of every probe interval.
PROBE_QUESTIONS = "select run, iteration, prompt_id, avg(correct::int) as share, count(*) as k from probe group by all"

PROBE_BY_RUN = f"""
    with per_iteration as (
        select run, iteration, count(*) as questions, max(k) as samples, avg(share) as reward,
               coalesce(stddev_samp(share) / sqrt(count(*)), 0) as se
        from probe_questions group by all)
    select run, mode, seed, iteration, step, questions, samples, reward,
           greatest(0, reward - {Z} * se) as ci_low, least(1, reward + {Z} * se) as ci_high, se
    from per_iteration join modes using (run) join steps using (run, iteration)"""

# Per run: the final probe reward, the area under its probe curve over optimizer steps divided by
# the steps (the trapezoid mean reward over training), and the first step at which it reaches the
# threshold, the mean final probe reward of the uniform runs.
RUN_SUMMARY = """
    with curve as (select *, lag(step) over w as prev_step, lag(reward) over w as prev_reward
                   from probe_by_run window w as (partition by run order by iteration)),
    threshold as (select avg(reward) as target from probe_by_run p
                  where mode = 'uniform' and iteration = (select max(iteration) from probe_by_run q where q.run =
                      p.run))
    select run, mode, seed,
           arg_min(reward, iteration) as first_reward, arg_max(reward, iteration) as final_reward,
           coalesce(sum((step - prev_step) * (reward + prev_reward) / 2) / nullif(max(step) - min(step), 0),
               avg(reward)) as auc,
           (select target from threshold) as threshold,
           min(step) filter (where reward >= (select target from threshold)) as steps_to_threshold,
           max(step) as steps
    from curve group by run, mode, seed order by mode, seed"""


def probe_tables(con: Any) -> dict[str, list[dict]]:
    """The probe's learning curves and what a comparison of weighting modes needs: per mode over
    seeds the final probe reward, the area under the curve and the steps to reach uniform's final
    reward (on the mode's mean curve); each mode minus uniform, paired by seed, with a 95% t
    interval over seeds."""

    con.execute(f"create temp table probe_questions as {PROBE_QUESTIONS}")
    con.execute(f"create temp table probe_by_run as {PROBE_BY_RUN}")
    con.execute(f"create temp table run_summary as {RUN_SUMMARY}")
    # The gain over the first probe with its standard error paired by question (each question's
    # share of correct samples at the last evaluation minus at the first).
    con.execute(
        """create temp table gains as
        with ends as (select run, min(iteration) as first, max(iteration) as last from probe_questions group by run)
        select a.run, avg(b.share - a.share) as gain, coalesce(stddev_samp(b.share - a.share) / sqrt(count(*)), 0)
            as gain_se
        from probe_questions a join ends e on a.run = e.run and a.iteration = e.first
        join probe_questions b on b.run = a.run and b.iteration = e.last and b.prompt_id = a.prompt_id group by a.run"""
    )
    con.execute("create temp table run_summary_with_gain as select * from run_summary join gains using (run)")
    out = {"probe": _rows(con, "select * from probe_by_run order by run, iteration")}
    out["probe_by_mode"] = _rows(
        con,
        """select mode, iteration, avg(step) as step, count(*) as runs, avg(reward) as mean_reward,
                  coalesce(stddev_samp(reward), 0) as std, min(reward) as min_reward, max(reward) as max_reward
           from probe_by_run group by mode, iteration order by mode, iteration""",
    )
    out["probe_runs"] = _rows(
        con, "select *, gain / nullif(gain_se, 0) as gain_in_se from run_summary_with_gain order by mode, seed"
    )
    out["mode_comparison"] = _rows(
        con,
        """with mean_curve as (select mode, iteration, avg(step) as step, avg(reward) as reward from probe_by_run
            group by all)
           select mode, count(*) as runs, avg(first_reward) as first_reward, avg(final_reward) as final_reward,
                  coalesce(stddev_samp(final_reward), 0) as final_std,
                  avg(auc) as auc, coalesce(stddev_samp(auc), 0) as auc_std, any_value(threshold) as threshold,
                  (select min(step) from mean_curve m where m.mode = r.mode and m.reward >= any_value(r.threshold))
                      as steps_to_threshold,
                  count(steps_to_threshold) as runs_reaching, median(steps_to_threshold) as
                      median_run_steps_to_threshold,
                  max(steps) as steps
           from run_summary r group by mode order by mode = 'uniform' desc, mode""",
    )
    differences = _rows(
        con,
        """select r.mode, 'final_reward' as metric, count(*) as seeds, avg(r.final_reward - u.final_reward) as
            mean_difference,
                  coalesce(stddev_samp(r.final_reward - u.final_reward), 0) as std
           from run_summary r join run_summary u on u.mode = 'uniform' and u.seed = r.seed where r.mode <> 'uniform'
               group by r.mode
           union all
           select r.mode, 'auc', count(*), avg(r.auc - u.auc), coalesce(stddev_samp(r.auc - u.auc), 0)
           from run_summary r join run_summary u on u.mode = 'uniform' and u.seed = r.seed where r.mode <> 'uniform'
               group by r.mode
           order by metric desc, mode""",
    )
    for row in differences:
        half = (
            t_quantile(0.975, row["seeds"] - 1) * row["std"] / math.sqrt(row["seeds"]) if row["seeds"] > 1 else math.nan
        )
        row.update(
            {
                "mode": f"{row['mode']} - uniform",
                "ci_low": row["mean_difference"] - half,
                "ci_high": row["mean_difference"] + half,
            }
        )
    out["paired_differences"] = differences
    return out


REPLAY_METRICS = ("reward", "loglik_per_token", "answer_loglik")


def replay_tables(con: Any) -> dict[str, list[dict]]:
    """Paired replays (`cfiw replay`): each mode's update minus uniform's from the same policy on
    the same rollouts, per iteration (mean over runs) and over all iteration x run pairs with a
    95% t interval. The pairs of one run share a trajectory, so they are not fully independent:
    the interval treats them as if they were."""

    unions = " union all ".join(
        f"select r.run, r.iteration, r.mode, '{m}' as metric, r.{m}_after - u.{m}_after as difference "
        f"from replay r join replay u on u.run = r.run and u.iteration = r.iteration "
        f"and u.optimizer = r.optimizer and u.mode = 'uniform' "
        f"where r.mode <> 'uniform'"
        for m in REPLAY_METRICS
    )
    con.execute(f"create temp table replay_pairs as {unions}")
    out = {
        "replay": _rows(
            con,
            "select r.*, m.mode as loop_mode, m.seed as loop_seed from replay r join modes m using (run) "
            "order by run, iteration, r.mode",
        ),
        "replay_differences": _rows(
            con,
            """select mode || ' - uniform' as difference, metric, iteration, count(*) as runs, avg(difference) as
                mean_difference,
                      coalesce(stddev_samp(difference), 0) as std
               from replay_pairs group by all order by metric, difference, iteration""",
        ),
    }
    summary = _rows(
        con,
        """select mode || ' - uniform' as difference, metric, count(*) as pairs, count(distinct run) as runs,
                  avg(difference) as mean_difference, coalesce(stddev_samp(difference), 0) as std
           from replay_pairs group by all order by metric, difference""",
    )
    out["replay_summary"] = _with_interval(summary)
    return out


GRADIENT_METRICS = ("reference_cosine", "uniform_cosine", "halves_cosine", "grad_norm")


def _with_interval(rows: list[dict], count: str = "pairs") -> list[dict]:
    """Adds the 95% t interval of `mean_difference` (from `std` over `count` pairs)."""
    for row in rows:
        n = row[count]
        half = t_quantile(0.975, n - 1) * row["std"] / math.sqrt(n) if n > 1 else math.nan
        row.update({"ci_low": row["mean_difference"] - half, "ci_high": row["mean_difference"] + half})
    return rows


def gradient_tables(con: Any) -> dict[str, list[dict]]:
    """`cfiw gradients`, per dataset (the runs' data.dataset: one point of the testbed dial):
    per mode, the mean of each measure; each mode minus uniform paired by run x iteration x
    minibatch, with a 95% t interval (minibatches of one policy share it, so the pairs are not
    fully independent); the mean share of each span kind and label.

    `aligned` corrects `reference_cosine` for the reference's own noise: the reference r is two
    halves whose cosine is c, so by Spearman-Brown cos(r, E r) = sqrt(2c / (1 + c)), and a
    gradient whose noise is independent of r's has cos(g, E r) = cos(g, r) / cos(r, E r).
    Where c <= 0 the reference's noise drowns its signal and the correction is undefined:
    `aligned` is null there, and the tables count only the minibatches that have it."""
    con.execute(
        """create temp view gradient_rows as
           select g.*, coalesce(m.dataset, '') as dataset,
                  case when g.reference_halves_cosine > 0 then g.reference_cosine
                      / sqrt(2 * g.reference_halves_cosine / (1 + g.reference_halves_cosine)) end as aligned
           from gradients g left join modes m using (run)"""
    )
    metrics = ("aligned", *GRADIENT_METRICS)
    keys = "r.run = u.run and r.iteration = u.iteration and r.minibatch = u.minibatch"
    unions = " union all ".join(
        f"select r.dataset, r.run, r.iteration, r.minibatch, r.mode, '{m}' as metric, r.{m} - u.{m} as difference "
        f"from gradient_rows r join gradient_rows u on {keys} and u.mode = 'uniform' "
        f"where r.mode <> 'uniform' and r.{m} is not null and u.{m} is not null"
        for m in metrics
    )
    con.execute(f"create temp table gradient_pairs as {unions}")
    means = ", ".join(f"avg({m}) as {m}" for m in metrics)
    out = {
        "gradients_by_mode": _rows(
            con,
            f"""select dataset, mode, count(*) as minibatches, count(distinct run || ':' || iteration) as policies,
                       count(distinct run) as runs, count(aligned) as aligned_minibatches, {means},
                       avg(reference_halves_cosine) as reference_halves_cosine, max(parts_residual) as parts_residual
                from gradient_rows group by dataset, mode order by dataset, aligned desc nulls last""",
        ),
        "gradient_differences": _with_interval(
            _rows(
                con,
                """select dataset, mode || ' - uniform' as difference, metric, count(*) as pairs,
                          count(distinct run || ':' || iteration) as policies, count(distinct run) as runs,
                          avg(difference) as mean_difference, coalesce(stddev_samp(difference), 0) as std
                   from gradient_pairs group by all order by dataset, metric, mean_difference desc""",
            )
        ),
    }
    shares = " union all ".join(
        f"select dataset, mode, '{p}' as partition, s.part, s.share, s.tokens "
        f"from gradient_rows, unnest({p}_shares) as t(s)"
        for p in ("kind", "label")
    )
    out["gradient_shares"] = _rows(
        con,
        f"""select dataset, mode, partition, part, count(*) as minibatches, avg(share) as mean_share,
                   sum(tokens) as tokens from ({shares}) group by all order by dataset, partition, part, mode""",
    )
    return out


def tables(con: Any) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    if has_view(con, "eval"):
        out["accuracy"] = _rows(
            con,
            f"""with a as (select run, iteration, count(*) as n, avg(correct::int) as acc from eval group by run,
                iteration)
            select run, mode, seed, iteration, step, n, acc as accuracy,
                   case when acc = 0 then 0 else greatest(0, {WILSON.format(sign="-")}) end as ci_low,
                   case when acc = 1 then 1 else least(1, {WILSON.format(sign="+")}) end as ci_high
            from a join modes using (run) join steps using (run, iteration) order by run, iteration""",
        )
        out["iterations_to_uniform"] = _rows(
            con,
            """with a as (select run, iteration, avg(correct::int) as acc from eval group by run, iteration),
                 final as (select avg(acc) as target from a join modes using (run)
                           where mode = 'uniform' and iteration = (select max(iteration) from a a2 where a2.run =
                               a.run))
            select run, mode, (select target from final) as uniform_final_accuracy,
                   min(iteration) filter (where acc >= (select target from final)) as first_iteration
            from a join modes using (run) where (select target from final) is not null group by run, mode order by
                run""",
        )
        out["accuracy_by_mode"] = _rows(
            con,
            """with a as (select run, iteration, avg(correct::int) as acc from eval group by run, iteration)
            select mode, iteration, avg(step) as step, count(*) as runs, avg(acc) as mean_accuracy,
                coalesce(stddev_samp(acc), 0) as std,
                   min(acc) as min_accuracy, max(acc) as max_accuracy
            from a join modes using (run) join steps using (run, iteration) group by mode, iteration order by mode,
                iteration""",
        )
        out["final_accuracy_by_mode"] = _rows(
            con,
            """with a as (select run, iteration, avg(correct::int) as acc from eval group by run, iteration),
                 last as (select * from a where iteration = (select max(iteration) from a a2 where a2.run = a.run))
            select mode, count(*) as runs, avg(acc) as mean_accuracy, coalesce(stddev_samp(acc), 0) as std,
                   min(acc) as min_accuracy, max(acc) as max_accuracy
            from last join modes using (run) group by mode order by mode""",
        )
    if has_view(con, "probe"):
        out.update(probe_tables(con))
    if has_view(con, "replay"):
        out.update(replay_tables(con))
    if has_view(con, "gradients"):
        out.update(gradient_tables(con))
    if has_view(con, "rollouts"):
        out["reward"] = _rows(
            con,
            "select run, mode, iteration, count(*) as rollouts, avg(reward) as mean_reward "
            "from rollouts join modes using (run) group by all order by run, iteration",
        )
    if has_view(con, "spans") and has_view(con, "scores"):
        out["delta_by_kind"] = _rows(
            con,
            """select run, mode, kind, count(*) as spans, avg(delta) as mean_delta, median(delta) as median_delta,
                      avg((delta < 0)::int) as share_negative
               from spans join scores using (run, iteration, rollout_id, span_idx) join modes using (run)
               group by all order by run, kind""",
        )
    if has_view(con, "span_labels") and has_view(con, "scores"):
        out["delta_by_label"] = _rows(
            con,
            """with labelled as (
                   select s.run, coalesce(l.label, 'unmatched') as label, c.delta
                   from spans s join scores c using (run, iteration, rollout_id, span_idx)
                   left join span_labels l using (run, iteration, rollout_id, span_idx))
               select run, mode, label, count(*) as spans, avg(delta) as mean_delta, median(delta) as median_delta
               from labelled join modes using (run) group by all order by run, label""",
        )
        out["importance_auroc"] = _rows(con, AUROC)
    if has_view(con, "spans") and has_view(con, "weights"):
        # the rollouts an update trained on: dynamic sampling drops groups with equal rewards (files
        # from other tools carry no `kept` column: all of their rows count)
        trained = "coalesce(kept, true)" if has_column(con, "weights", "kept") else "true"
        out["weight_by_kind"] = _rows(
            con,
            f"""with trained as (select * from weights where {trained}),
               per_span as (
                   select w.run, s.kind, list_sum(list_slice(w.token_weights, s.tok_start + 1, s.tok_end)) as weight
                   from trained w join spans s using (run, iteration, rollout_id)),
               totals as (select run, sum(list_sum(token_weights)) as total from trained group by run),
               kinds as (select run, kind, sum(weight) as weight from per_span group by all)
               select run, mode, kind, weight / total as share from kinds join totals using (run) join modes using (run)
               union all
               select run, mode, 'outside spans' as kind, 1 - coalesce((select sum(weight) from kinds k where k.run
                   = t.run), 0) / total
               from totals t join modes using (run)
               order by run, kind""",
        )
    return out


def _plot(tables_: dict[str, list[dict]], con: Any, out: Path) -> list[tuple[Path, str]]:
    """Every plot the tables allow, each with a caption saying what was measured and on how many
    runs, seeds or pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def curves(
        rows: list[dict],
        group: str,
        y: str,
        band: tuple[str, str] | None,
        label: Any,
        title: str,
        ylabel: str,
        name: str,
        caption: str,
        x: str = "step",
    ) -> None:
        """One line per `group` value over optimizer steps (or `x`), with an optional shaded band."""
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in sorted({r[group] for r in rows}):
            mine = [r for r in rows if r[group] == key]
            xs = [r[x] for r in mine]
            ax.plot(xs, [r[y] for r in mine], marker="o", markersize=3, label=label(key, mine))
            if band:
                ax.fill_between(xs, [r[band[0]] for r in mine], [r[band[1]] for r in mine], alpha=0.15)
        ax.set(xlabel="optimizer step" if x == "step" else x, ylabel=ylabel, title=title)
        ax.legend(fontsize=7)
        written.append((_save(fig, out / name), caption))

    written: list[tuple[Path, str]] = []
    runs_of = lambda table: len({r["run"] for r in tables_.get(table, [])})  # noqa: E731
    seeds_of = lambda table: max((r["runs"] for r in tables_.get(table, [])), default=0)  # noqa: E731
    by_run = lambda run, rows: f"{run} ({rows[0]['mode']})"  # noqa: E731
    if tables_.get("accuracy"):
        curves(
            tables_["accuracy"],
            "run",
            "accuracy",
            ("ci_low", "ci_high"),
            by_run,
            "Accuracy (95% Wilson interval)",
            "greedy accuracy (fraction correct)",
            "accuracy.png",
            f"Greedy accuracy on the evaluation questions at each evaluated step, per run ({runs_of('accuracy')} "
            "runs); band: 95% Wilson interval over questions.",
        )
    by_mode = lambda mode, rows: f"{mode} ({max(r['runs'] for r in rows)} runs)"  # noqa: E731
    if any(r["runs"] > 1 for r in tables_.get("accuracy_by_mode", [])):  # several seeds of a mode
        curves(
            tables_["accuracy_by_mode"],
            "mode",
            "mean_accuracy",
            ("min_accuracy", "max_accuracy"),
            by_mode,
            "Greedy accuracy by mode (mean over seeds; band: min to max)",
            "greedy accuracy (fraction correct)",
            "accuracy_by_mode.png",
            f"Greedy accuracy by weighting mode: mean over each mode's runs (up to {seeds_of('accuracy_by_mode')} "
            "seeds); band: the lowest to the highest run.",
        )
    if tables_.get("probe"):
        curves(
            tables_["probe"],
            "run",
            "reward",
            ("ci_low", "ci_high"),
            by_run,
            "Probe: sampled reward (95% interval over questions)",
            "probe reward (mean@k, fraction correct)",
            "probe.png",
            f"Probe reward (mean of k samples per probe question) at each evaluated step, per run "
            f"({runs_of('probe')} runs); band: 95% interval over questions.",
        )
    if any(r["runs"] > 1 for r in tables_.get("probe_by_mode", [])):
        curves(
            tables_["probe_by_mode"],
            "mode",
            "mean_reward",
            ("min_reward", "max_reward"),
            by_mode,
            "Probe reward by mode (mean over seeds; band: min to max)",
            "probe reward (mean@k, fraction correct)",
            "probe_by_mode.png",
            f"Probe reward by weighting mode: mean over each mode's runs (up to {seeds_of('probe_by_mode')} "
            "seeds); band: the lowest to the highest run.",
        )
    if tables_.get("replay_differences"):
        fig, axes = plt.subplots(1, len(REPLAY_METRICS), figsize=(12, 3.6))
        for ax, metric in zip(axes, REPLAY_METRICS, strict=True):
            mine = [r for r in tables_["replay_differences"] if r["metric"] == metric]
            for difference in sorted({r["difference"] for r in mine}):
                points = [r for r in mine if r["difference"] == difference]
                ax.plot(
                    [r["iteration"] for r in points],
                    [r["mean_difference"] for r in points],
                    marker="o",
                    markersize=3,
                    label=difference,
                )
            ax.axhline(0, color="grey", linewidth=0.5)
            ax.set(xlabel="iteration replayed", ylabel=f"{metric} after the update, minus uniform's", title=metric)
            ax.legend(fontsize=7)
        fig.suptitle("Paired replay: each mode's update minus uniform's (mean over runs)", fontsize=9)
        pairs = max((r["pairs"] for r in tables_.get("replay_summary", [])), default=0)
        caption = (
            "Paired replay: after one update of the same policy on the same rollouts, each mode's measure minus "
            f"uniform's, by replayed iteration (mean over runs; {pairs} pairs per mode in all)."
        )
        written.append((_save(fig, out / "replay_differences.png"), caption))
    if tables_.get("paired_differences"):
        written.append(_paired_plot(tables_["paired_differences"], out / "paired_differences.png"))
    if tables_.get("gradients_by_mode"):
        pairs = max((r["pairs"] for r in tables_.get("gradient_differences", [])), default=0)
        caption = (
            "Gradient alignment: cosine of each mode's minibatch gradient with the expected uniform gradient "
            f"(noise-corrected), and its paired difference from uniform with a 95% interval (up to {pairs} "
            "policy x minibatch pairs per point)."
        )
        written.append((_alignment_plot(tables_, out / "gradient_alignment.png"), caption))
    if tables_.get("reward"):
        curves(
            tables_["reward"],
            "run",
            "mean_reward",
            None,
            by_run,
            "Training reward",
            "mean reward of the rollouts (fraction correct)",
            "reward.png",
            f"Mean reward of each iteration's training rollouts, per run ({runs_of('reward')} runs).",
            x="iteration",
        )
    if has_view(con, "spans") and has_view(con, "scores"):
        rows = _rows(
            con, "select kind, delta from spans join scores using (run, iteration, rollout_id, span_idx) order by kind"
        )
        kinds = sorted({r["kind"] for r in rows})
        if kinds:
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.boxplot([[r["delta"] for r in rows if r["kind"] == k] for k in kinds], tick_labels=kinds)
            ax.axhline(0, color="grey", linewidth=0.5)
            ax.set(xlabel="span kind", ylabel="delta (answer log-prob drop, nats)", title="Span importance by kind")
            caption = f"Delta of every scored span by kind ({len(rows):,} spans of all runs and iterations)."
            written.append((_save(fig, out / "delta_by_kind.png"), caption))
    if tables_.get("weight_by_kind"):
        fig, ax = plt.subplots(figsize=(6, 4))
        rows = [r for r in tables_["weight_by_kind"] if r["share"] is not None]
        modes = sorted({r["mode"] for r in rows})
        kinds = sorted({r["kind"] for r in rows})
        width = 0.8 / max(len(modes), 1)
        for i, mode in enumerate(modes):
            mine = [r for r in rows if r["mode"] == mode]
            runs = len({r["run"] for r in mine})
            shares = [sum(r["share"] for r in mine if r["kind"] == k) / runs for k in kinds]
            ax.bar([k + i * width for k in range(len(kinds))], shares, width, label=f"{mode} ({runs} runs)")
        ax.set_xticks([k + width * (len(modes) - 1) / 2 for k in range(len(kinds))], kinds, fontsize=8)
        ax.set(xlabel="span kind", ylabel="share of total token weight", title="Token weight by span kind and mode")
        ax.legend(fontsize=7)
        caption = (
            "Share of all training token weight that falls in each span kind, by weighting mode (mean over the "
            f"mode's runs; {runs_of('weight_by_kind')} runs)."
        )
        written.append((_save(fig, out / "weight_by_kind.png"), caption))
    return written


def _paired_plot(rows: list[dict], path: Path) -> tuple[Path, str]:
    """The compare's paired differences: each mode minus uniform, per metric, with 95% intervals."""
    import matplotlib.pyplot as plt

    metrics = sorted({r["metric"] for r in rows})
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        mine = [r for r in rows if r["metric"] == metric]
        means = [r["mean_difference"] for r in mine]
        low = [m - r["ci_low"] if r["ci_low"] == r["ci_low"] else 0 for m, r in zip(means, mine, strict=True)]
        high = [r["ci_high"] - m if r["ci_high"] == r["ci_high"] else 0 for m, r in zip(means, mine, strict=True)]
        ax.errorbar(range(len(mine)), means, yerr=[low, high], fmt="o", capsize=4)
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_xticks(range(len(mine)), [r["mode"] for r in mine], fontsize=8)
        label = "area under the probe curve" if metric == "auc" else "final probe reward"
        ax.set(xlabel="mode - uniform", ylabel=f"difference in {label}", title=label)
    seeds = max((r["seeds"] for r in rows), default=0)
    caption = (
        f"Each mode minus uniform, paired by seed ({seeds} seed{'s' if seeds != 1 else ''}), mean and 95% t interval."
    )
    return _save(fig, path), caption


def _write_curves(results: dict[str, list[dict]], out: Path) -> None:
    """curves.parquet (per run) and curves_by_mode.parquet (over seeds): greedy accuracy and the
    probe reward per evaluated iteration, with the optimizer step and their intervals."""

    per_run = [
        {
            "run": r["run"],
            "mode": r["mode"],
            "seed": r["seed"],
            "metric": metric,
            "iteration": r["iteration"],
            "step": r["step"],
            "value": r[value],
            "ci_low": r["ci_low"],
            "ci_high": r["ci_high"],
        }
        for table, metric, value in (("accuracy", "greedy_accuracy", "accuracy"), ("probe", "probe_reward", "reward"))
        for r in results.get(table, [])
    ]
    by_mode = [
        {
            "mode": r["mode"],
            "metric": metric,
            "iteration": r["iteration"],
            "step": float(r["step"]),
            "runs": r["runs"],
            "mean": r[mean],
            "std": r["std"],
            "min": r[low],
            "max": r[high],
        }
        for table, metric, mean, low, high in (
            ("accuracy_by_mode", "greedy_accuracy", "mean_accuracy", "min_accuracy", "max_accuracy"),
            ("probe_by_mode", "probe_reward", "mean_reward", "min_reward", "max_reward"),
        )
        for r in results.get(table, [])
    ]
    for name, rows in (("curves", per_run), ("curves_by_mode", by_mode)):
        if rows:
            pq.write_table(pa.Table.from_pylist(rows), out / f"{name}.parquet")


def _by_numbers(text: str) -> list[str | int]:
    """A sort key that reads the digits in `text` as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _alignment_plot(tables_: dict[str, list[dict]], path: Path) -> Path:
    """Per dataset (dial point) and mode: the noise-corrected cosine with the reference
    gradient, and its paired difference from uniform's with the 95% interval."""
    import matplotlib.pyplot as plt

    rows = [r for r in tables_["gradients_by_mode"] if r["aligned"] is not None]
    differences = [r for r in tables_["gradient_differences"] if r["metric"] == "aligned"]
    datasets = sorted({r["dataset"] for r in rows}, key=_by_numbers)  # arith-L8 before arith-L32
    names = [Path(d).name or "(unknown)" for d in datasets]
    modes = sorted({r["mode"] for r in rows})
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for mode in modes:
        mine = {r["dataset"]: r["aligned"] for r in rows if r["mode"] == mode}
        xs = [i for i, d in enumerate(datasets) if d in mine]
        left.plot(xs, [mine[datasets[i]] for i in xs], marker="o", label=mode)
    others = [m for m in modes if m != "uniform"]
    for index, mode in enumerate(others):
        mine = {r["dataset"]: r for r in differences if r["difference"] == f"{mode} - uniform"}
        xs = [i for i, d in enumerate(datasets) if d in mine]
        if not xs:
            continue
        shift = (index - (len(others) - 1) / 2) * 0.6 / max(len(others), 1)
        points = [mine[datasets[i]] for i in xs]
        right.errorbar(
            [x + shift for x in xs],
            [r["mean_difference"] for r in points],
            yerr=[
                [r["mean_difference"] - r["ci_low"] for r in points],
                [r["ci_high"] - r["mean_difference"] for r in points],
            ],
            fmt="o",
            capsize=3,
            label=mode,
        )
    right.axhline(0, color="grey", linewidth=0.5)
    pairs = sorted({r["pairs"] for r in differences})
    for ax in (left, right):
        ax.set_xticks(range(len(datasets)), names, fontsize=8)
        ax.set_xlabel("dataset (dial point)")
        ax.legend(fontsize=7)
    left.set(ylabel="cosine with E[uniform gradient] (noise-corrected)", title="Alignment by mode")
    right.set(
        ylabel="minus uniform's, 95% interval",
        title=f"Paired difference ({'/'.join(map(str, pairs)) or 0} policy x minibatch pairs)",
    )
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no data)\n"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    return "\n".join(lines) + "\n"


def run(
    runs: list[str],
    out: str,
    force: bool = False,
    format: str = "all",
    explorer_rollouts: int = DEFAULT_ROLLOUTS,
) -> dict[str, list[dict]]:
    """The report of `runs` in directory `out`, built in `<out>.tmp` and swapped in whole. An
    existing `out` is replaced when it is a report (`cfiw_manifest.json` says analyze) or with
    `force`; it may never be a run nor hold one's files, whatever `force` says. `format`: both
    pages, or only report.md or report.html (with its token explorer of at most
    `explorer_rollouts` rollouts)."""
    started = time.perf_counter()
    run_dirs = [Path(r) for r in runs]
    for run in run_dirs:
        if not run.is_dir():
            what = "is a file, not a run directory" if run.exists() else "not found"
            raise CfiwError(f"run directory {what}: {run}", "pass directories written by cfiw loop")
    labels = labels_of(run_dirs)
    out_dir = Path(out)
    _guard_report(out_dir, run_dirs, force)
    locks = OutputLocks([out_dir])
    try:
        try:
            con = connect(run_dirs)
            results = tables(con)
        except duckdb.Error as exc:
            raise CfiwError(
                f"cannot read the runs' files: {message_of(exc)}",
                "check each file with `cfiw validate FILE` (a killed copy or a foreign file?)",
            ) from exc
        if not results:
            raise CfiwError("the runs hold no artifacts to analyze", "run cfiw loop first")
        runs_by_label = dict(zip(labels, run_dirs, strict=True))
        with staged_directory(out_dir) as staging:
            _write_report(results, con, runs_by_label, staging, format, explorer_rollouts)
            inputs = {label: {"path": str(run), "sha256": None} for label, run in runs_by_label.items()}
            manifest = build_manifest(
                "analyze", {"runs": labels}, inputs, rows=len(results), seconds=time.perf_counter() - started
            )
            manifest["files"] = written_files(staging)
            keep_files_not_ours(out_dir, staging, "analyze")
            write_directory_manifest(staging, manifest)
    finally:
        locks.release()
    return results


def _guard_report(out: Path, runs: list[Path], force: bool) -> None:
    """The report directory is never a run, never holds a run or a file a run's analysis reads
    (it is replaced whole), and replaces only an earlier report without `force`."""
    for run in runs:
        read = [run, run / "config.toml", RunLayout(run).policy]
        kinds = (*ITERATION_KINDS, *EVALUATION_KINDS, "replay", "gradients")
        read += [run / name for kind in kinds for name in layout_files(run, kind)]
        for path in read:
            if path.exists() and (same_path(path, out) or lies_inside(path, out)):
                where = "is" if same_path(path, out) else "holds"
                what = "the input run" if path == run else "a file of the input run"
                raise CfiwError(f"--out {out} {where} {what} {path}", "choose a new directory, e.g. RUN/report")
    guard_outputs({"--out": out}, "analyze", directory=out, replaces=True, force=force or _older_report(out))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CfiwError(f"cannot create {out.parent}: {exc.strerror or exc}", "choose a writable --out") from exc


def _older_report(out: Path) -> bool:
    """A report written before reports had a manifest: report.md, report.html and nothing but
    the tables and plots analyze writes."""
    if not out.is_dir() or not ((out / "report.md").is_file() and (out / "report.html").is_file()):
        return False
    return all(p.is_file() and p.suffix in (".json", ".png", ".parquet", ".md", ".html") for p in out.iterdir())


def _write_report(
    results: dict[str, list[dict]], con: Any, runs: dict[str, Path], out_dir: Path, format: str, rollouts: int
) -> None:
    """The answer first (the summary), then the plots with their captions, then the tables (each
    collapsible in the HTML; empty ones left out), then the token explorer (HTML only)."""
    for name, rows in results.items():
        (out_dir / f"{name}.json").write_text(json.dumps(rows, indent=2, default=str))
    _write_curves(results, out_dir)
    images = _plot(results, con, out_dir)
    summary = summarize(results, runs)
    filled = {name: rows for name, rows in results.items() if rows}
    if format in ("all", "md"):
        (out_dir / "report.md").write_text(_markdown(summary, images, filled, runs))
    if format in ("all", "html"):
        explorer = explorer_data(con, runs, rollouts)
        (out_dir / "report.html").write_text(_html(summary, images, filled, runs, explorer))


def _markdown(summary: Summary, images: list[tuple[Path, str]], tables_: dict, runs: dict[str, Path]) -> str:
    lines = ["# cfiw report", "", f"Runs: {', '.join(runs)}", "", "## Summary", ""]
    lines += [f"- {line}" for line in summary.lines] + [""]
    for title, rows in summary.comparisons:
        lines += [f"### {title}", "", _markdown_table(_interval_rows(rows))]
    lines += ["## Plots", ""]
    for path, caption in images:
        lines += [f"![{path.stem}]({path.name})", "", f"*{caption}*", ""]
    lines += ["## Tables", ""]
    for name, rows in tables_.items():
        lines += [f"### {name.replace('_', ' ')}", "", _markdown_table(rows)]
    return "\n".join(lines) + "\n"


def _interval_rows(rows: list[dict]) -> list[dict]:
    """A comparison's rows as a reader wants them: mean and interval side by side."""
    return [
        {
            "comparison": r["comparison"],
            "metric": r["metric"],
            "n": r["n"],
            "mean": r["mean"],
            "95% interval": f"{r['ci_low']:+.4f} to {r['ci_high']:+.4f}"
            if r["ci_low"] == r["ci_low"]  # not NaN
            else f"none from {r['n']} (needs 2 or more)",
        }
        for r in rows
    ]


def _html(
    summary: Summary, images: list[tuple[Path, str]], tables_: dict, runs: dict[str, Path], explorer: dict | None
) -> str:
    body = [
        f"<h1>cfiw report</h1><p>Runs: {html.escape(', '.join(runs))}</p>",
        '<section id="summary"><h2>Summary</h2>',
    ]
    body.append("<ul>" + "".join(f"<li>{_inline(line)}</li>" for line in summary.lines) + "</ul>")
    for title, rows in summary.comparisons:
        body.append(f"<h3>{html.escape(title)}</h3>" + _html_table(_interval_rows(rows)))
    body.append("</section>")
    if images:
        body.append('<section id="plots"><h2>Plots</h2>')
        for path, caption in images:
            data = base64.b64encode(path.read_bytes()).decode()
            body.append(
                f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'
                f'<figcaption class="caption">{html.escape(caption)}</figcaption></figure>'
            )
        body.append("</section>")
    body.append('<section id="tables"><h2>Tables</h2>')
    for name, rows in tables_.items():
        title = f"{name.replace('_', ' ')} ({len(rows)} rows)"
        body.append(f"<details><summary>{html.escape(title)}</summary>{_html_table(rows)}</details>")
    body.append("</section>")
    if explorer is not None:
        body.append(explorer_html(explorer))
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:auto;padding:0 1em} table{border-collapse:collapse}"
        " td,th{border:1px solid #ccc;padding:2px 6px} pre.rollout{white-space:pre-wrap;line-height:1.6}"
        " img{max-width:100%} .caption{color:#444;font-size:90%} details{margin:.3em 0}" + EXPLORER_STYLE
    )
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>cfiw report</title><style>{style}</style></head>'
        f"<body>{''.join(body)}</body></html>\n"
    )


def _inline(line: str) -> str:
    """A summary line's **bold** as <b>, the rest escaped."""
    parts = html.escape(line).split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def _html_table(rows: list[dict]) -> str:
    if not rows:
        return "<p>(no data)</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape(f'{v:.4g}' if isinstance(v, float) else str(v))}</td>" for v in row.values())
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"
