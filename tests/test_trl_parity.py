"""One batch TRL generated, logged to Parquet by the integration, then run through `cfiw segment`,
`score` and `train`: the same spans, scores, token weights and per-token loss, in every mode.

The per-token loss is read off each side's own loss function, not re-derived: both losses are
homogeneous of degree 1 in the per-token multiplier (TRL's (B, T) advantage A, cfiw's weight w),
so x * dL/dx recovers each token's term of the loss, L_t / N, exactly, for x = A or w."""

import math

import pyarrow.parquet as pq
import pytest

from cfiw_cli.integrations.trl import CFIWConfig

MODES = [("uniform", "cfiw"), ("cfiw", "cfiw"), ("inverted", "cfiw"), ("shuffled", "cfiw"), ("random", "cfiw")]
MODES += [("cfiw", "authors")]
PROMPT = "Tom has 1 apple and gets 2 more. How many apples does Tom have?"


def per_token_terms(loss, multiplier):
    """x * dL/dx: each token's term of a loss that is homogeneous of degree 1 in x."""
    import torch

    (grad,) = torch.autograd.grad(loss, multiplier, retain_graph=True)
    return (multiplier * grad).detach()


def trl_batch(policy, log_dir, mode, profile, monkeypatch):
    """One TRL step in `mode`: (the per-token loss terms by rollout id, TRL's loss)."""
    import trl.trainer.grpo_trainer as grpo_module
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from cfiw_cli.integrations.trl import CFIWGRPOTrainer, load_tokenizer

    captured = {}
    compute_loss = GRPOTrainer._compute_loss

    def spy(self, model, inputs):
        advantages = inputs["advantages"]  # [B, T] (or [B] in uniform mode)
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1).expand_as(inputs["completion_mask"]).contiguous()
        leaf = advantages.detach().clone().requires_grad_(True)
        loss = compute_loss(self, model, {**inputs, "advantages": leaf})
        captured["terms"] = per_token_terms(loss, leaf)  # [B, T], left aligned
        captured["mask"] = inputs["completion_mask"]
        captured["loss"] = float(loss.detach())
        return loss

    monkeypatch.setattr(GRPOTrainer, "_compute_loss", spy)
    monkeypatch.setattr(grpo_module, "shuffle_sequence_dict", lambda batch: batch)  # rows stay in sampled order
    tokenizer = load_tokenizer(str(policy))
    data = Dataset.from_list([{"prompt": PROMPT, "answer": "3"}] * 16)

    def reward(completions, answer, **_):
        return [1.0 if c.strip().endswith(a) else 0.0 for c, a in zip(completions, answer, strict=True)]

    args = GRPOConfig(
        output_dir=str(log_dir.parent / "out"), per_device_train_batch_size=16, num_generations=4,
        max_completion_length=24, max_steps=1, learning_rate=0.0, report_to="none", use_cpu=True, seed=0,
        save_strategy="no", bf16=False, temperature=1.0, loss_type="dapo", beta=0.0, epsilon=0.2,
        epsilon_high=0.28, mask_truncated_completions=True, scale_rewards="group", disable_tqdm=True,
    )  # fmt: skip
    trainer = CFIWGRPOTrainer(
        model=str(policy), reward_funcs=reward, args=args, train_dataset=data, processing_class=tokenizer,
        cfiw=CFIWConfig(weighting=mode, profile=profile, log_dir=str(log_dir)),
    )  # fmt: skip
    trainer.train()
    monkeypatch.undo()
    ids = [f"0:0:{row}" for row in range(captured["terms"].shape[0])]
    lengths = captured["mask"].sum(1).tolist()
    terms = {i: row[: int(n)].tolist() for i, row, n in zip(ids, captured["terms"], lengths, strict=True)}
    return terms, captured["loss"]


def cfiw_train_batch(cli, policy, log_dir, run, mode, profile, monkeypatch):
    """`cfiw segment`, `score` and `train` on the logged rollouts: (per-token terms by id, loss)."""
    from cfiw_cli import update

    rollouts = log_dir / "iter-0000" / "rollouts.parquet"
    spans, scores = run / "spans.parquet", run / "scores.parquet"
    common = ["--model", policy, "--rollouts", rollouts]
    for step in (
        ["segment", *common, "--profile", profile, "--out", spans],
        ["score", *common, "--spans", spans, "--profile", profile, "--out", scores],
    ):
        done = cli(*step)
        assert done.exit_code == 0, done.stderr
    terms, losses, batch_ids = {}, [], []
    accumulate, policy_loss = update._accumulate, update.policy_loss

    def remember_ids(policy_, batch, *args, **kwargs):
        batch_ids.append([s.rollout_id for s in batch])
        return accumulate(policy_, batch, *args, **kwargs)

    def spy(logprobs, old, advantages, mask, normalizer, weights, *args, **kwargs):
        leaf = weights.detach().clone().requires_grad_(True)  # [B, C], right aligned
        loss, metrics = policy_loss(logprobs, old, advantages, mask, normalizer, leaf, *args, **kwargs)
        found = per_token_terms(loss, leaf)
        for rollout_id, row, row_mask in zip(batch_ids[-1], found, mask, strict=True):
            terms[rollout_id] = row[row.shape[0] - int(row_mask.sum()) :].tolist()
        losses.append(float(loss.detach()))
        return loss, metrics

    monkeypatch.setattr(update, "_accumulate", remember_ids)
    monkeypatch.setattr(update, "policy_loss", spy)
    done = cli(
        "train", *common, "--spans", spans, "--scores", scores, "--weighting", mode, "--profile", profile,
        "--no-dynamic-sampling", "--lr", "0", "--loss-type", "dapo", "--beta", "0", "--eps-low", "0.2",
        "--eps-high", "0.28", "--scale-rewards", "group", "--mask-truncated", "--epochs", "1", "--minibatches", "1",
        "--out", run / "policy",
    )  # fmt: skip
    monkeypatch.undo()
    assert done.exit_code == 0, done.stderr
    return terms, sum(losses)


def close(a, b, tolerance=1e-6):
    return len(a) == len(b) and all(abs(x - y) <= tolerance for x, y in zip(a, b, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "profile"), MODES, ids=[f"{m}-{p}" for m, p in MODES])
def test_logged_batch_gives_cfiw_trains_weights_and_per_token_loss(
    sharpening_task, cli, tmp_path, monkeypatch, mode, profile
):
    policy, _ = sharpening_task
    log_dir = tmp_path / "log"
    trl_terms, trl_loss = trl_batch(policy, log_dir, mode, profile, monkeypatch)
    logged = log_dir / "iter-0000"
    kinds = ["rollouts", "spans", "weights"] + (["scores"] if mode != "uniform" else [])
    assert sorted(p.name for p in logged.iterdir()) == sorted(f"{k}.parquet" for k in kinds)
    for kind in kinds:  # each logged file is a valid artifact of its kind
        done = cli("validate", logged / f"{kind}.parquet", "--kind", kind)
        assert done.exit_code == 0 and f"valid {kind} file" in done.stdout, done.stderr
    rollouts = pq.read_table(logged / "rollouts.parquet").to_pylist()
    assert len(rollouts) == 16 and {r["reward"] for r in rollouts} <= {0.0, 1.0}
    assert all(r["gold"] == "3" and len(r["completion_logprobs"]) == len(r["completion_ids"]) for r in rollouts)
    assert all(r["correct"] == (r["pred"] == "3") for r in rollouts)

    run = tmp_path / "stages"
    cfiw_terms, cfiw_loss = cfiw_train_batch(cli, policy, log_dir, run, mode, profile, monkeypatch)

    # the stages cut and score the logged rollouts as the trainer did
    by_key = lambda rows: {(r["rollout_id"], r["span_idx"]): r for r in rows}  # noqa: E731
    for kind, columns in (("spans", ("kind", "tok_start", "tok_end", "text")), ("scores", ("delta",))):
        if kind == "scores" and mode == "uniform":
            continue
        ours = by_key(pq.read_table(logged / f"{kind}.parquet").to_pylist())
        theirs = by_key(pq.read_table(run / f"{kind}.parquet").to_pylist())
        assert ours.keys() == theirs.keys() and ours
        for key, row in theirs.items():
            for column in columns:
                mine, expected = ours[key][column], row[column]
                assert mine == expected if isinstance(expected, str | int) else abs(mine - expected) < 1e-5

    # the token weights and TRL's advantage, as train writes them
    written = {r["rollout_id"]: r for r in pq.read_table(run / "policy" / "weights.parquet").to_pylist()}
    logged_weights = {r["rollout_id"]: r for r in pq.read_table(logged / "weights.parquet").to_pylist()}
    assert written.keys() == logged_weights.keys()
    for rollout_id, row in written.items():
        assert close(row["token_weights"], logged_weights[rollout_id]["token_weights"]), rollout_id
        assert abs(row["advantage"] - logged_weights[rollout_id]["advantage"]) < 1e-5
    if mode != "uniform":
        assert any(w != 1.0 for r in written.values() for w in r["token_weights"])

    # the per-token loss: every kept token's term, and the loss they sum to
    assert cfiw_terms.keys() <= trl_terms.keys()
    for rollout_id, terms in trl_terms.items():
        expected = cfiw_terms.get(rollout_id, [0.0] * len(terms))  # a masked (truncated) rollout adds nothing
        assert close(terms, expected), rollout_id
    assert any(t != 0.0 for terms in trl_terms.values() for t in terms)  # some group's rewards differed
    assert math.isclose(trl_loss, cfiw_loss, abs_tol=1e-6)


@pytest.mark.slow
def test_logged_batches_read_as_a_run(sharpening_task, cli, tmp_path, monkeypatch):
    """`cfiw sql` and `cfiw analyze` read a log directory; a second trainer never overwrites it."""
    from cfiw_cli.errors import CfiwError

    policy, _ = sharpening_task
    log_dir = tmp_path / "log"
    trl_batch(policy, log_dir, "cfiw", "cfiw", monkeypatch)
    query = (
        "select count(distinct r.rollout_id) as rollouts, count(*) as spans, sum(c.delta is not null::int) as scored"
        " from rollouts r join spans s using (iteration, rollout_id)"
        " left join scores c using (iteration, rollout_id, span_idx)"
    )
    done = cli("sql", log_dir, query, "--format", "csv")
    assert done.exit_code == 0, done.stderr
    header, values = done.stdout.strip().splitlines()[:2]
    rollouts, spans, scored = map(int, values.split(","))
    assert header == "rollouts,spans,scored" and rollouts > 0 and spans >= rollouts and 0 < scored <= spans
    done = cli("analyze", log_dir, "--out", tmp_path / "report", "--format", "md")
    assert done.exit_code == 0, done.stderr
    assert (tmp_path / "report" / "report.md").exists()
    with pytest.raises(CfiwError, match="already holds logged batches"):
        trl_batch(policy, log_dir, "cfiw", "cfiw", monkeypatch)
