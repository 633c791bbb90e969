"""The token explorer of `report.html`: one static section, its data embedded as JSON, driven
by a few lines of hand-written JavaScript (no server, no network, no library).

For each scored rollout (run, iteration, question, sample) it holds the completion's tokens
(each decoded on its own), its spans with their kind and delta, and one weight per token for
every mode the same scores give: uniform, cfiw, inverted, the authors' profile, and the oracle
where the rollouts carry synth labels. The weights are computed here with the run's own train
settings (its config.toml), exactly as `cfiw train` would weigh that rollout. The page colours
the tokens on a diverging scale around weight 1, draws span boundaries, shows a span's delta
and a token's weight on hover, toggles between modes, and can keep only the rollouts where the
modes disagree most. `--explorer-rollouts` caps how many rollouts are embedded; the page says
how many the cap left out.
"""

from __future__ import annotations

import html
import json
import random
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

from cfiw_cli.algo.spans import decode_with_offsets, feeds_the_answer
from cfiw_cli.algo.weights import ScoredSpan, WeightConfig, token_weights
from cfiw_cli.configs import TrainConfig
from cfiw_cli.modeling import load_tokenizer
from cfiw_cli.runs import RunLayout
from cfiw_cli.views import has_column, has_view

DEFAULT_ROLLOUTS = 512
# (name shown, weighting mode, profile)
MODES = (("cfiw", "cfiw", "cfiw"), ("uniform", "uniform", "cfiw"), ("inverted", "inverted", "cfiw"))
MODES += (("authors' profile", "cfiw", "authors"), ("oracle", "oracle", "cfiw"))


def weight_config(run: Path, profile: str) -> WeightConfig:
    """The weighting settings of the run's train section (train's defaults where it sets none)."""
    config = RunLayout(run).config
    train = tomllib.loads(config.read_text()).get("train", {}) if config.exists() else {}
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    names = [f.name for f in fields(WeightConfig) if f.name != "profile"]
    return WeightConfig(**{name: train.get(name, defaults[name]) for name in names}, profile=profile)


def _tokenizer(run: Path) -> Any:
    policy = RunLayout(run).policy
    return load_tokenizer(str(policy)) if (policy / "tokenizer_config.json").exists() else None


def explorer_data(con: Any, runs: dict[str, Path], limit: int = DEFAULT_ROLLOUTS) -> dict[str, Any] | None:
    """The explorer's JSON: {modes, rollouts: [...], shown, total}; None without scored spans."""
    if not all(has_view(con, view) for view in ("rollouts", "spans", "scores")):
        return None
    if not has_column(con, "rollouts", "completion_ids"):
        return None
    columns = {c[0] for c in con.execute("describe rollouts").fetchall()}
    total = con.execute("select count(distinct run || '/' || rollout_id) from spans").fetchone()[0]
    # files written by other tools may lack the columns cfiw rollout always writes
    fallback = {"prompt_id": "split_part(r.rollout_id, ':', 2)", "sample_idx": "0", "reward": "null"}
    fallback |= {"finish_reason": "'length'", "labels": "null"}
    picked = {name: f"r.{name}" if name in columns else value for name, value in fallback.items()}
    rows = con.execute(
        f"""select r.run, r.iteration, r.rollout_id, {picked["prompt_id"]}, {picked["sample_idx"]},
                   r.completion_ids, {picked["reward"]}, {picked["finish_reason"]}, {picked["labels"]},
                   list({{'kind': s.kind, 'start': s.tok_start, 'end': s.tok_end, 'delta': c.delta}}
                        order by s.span_idx) as spans
            from rollouts r join spans s using (run, iteration, rollout_id)
            left join scores c using (run, iteration, rollout_id, span_idx)
            group by all order by 1, 2, 4, 5 limit {int(limit)}"""
    ).fetchall()
    names = ["run", "iteration", "rollout_id", "prompt_id", "sample_idx", "ids", "reward", "finish", "labels", "spans"]
    tokenizers: dict[str, Any] = {}
    settings: dict[str, dict[str, WeightConfig]] = {}  # per run and profile, read once
    shown_modes: list[str] = []
    rollouts = []
    for values in rows:
        row = dict(zip(names, values, strict=True))
        run = runs[row["run"]]
        if row["run"] not in tokenizers:
            tokenizers[row["run"]] = _tokenizer(run)
            settings[row["run"]] = {profile: weight_config(run, profile) for profile in {p for _, _, p in MODES}}
        if tokenizers[row["run"]] is None:
            continue
        rollouts.append(_rollout(row, tokenizers[row["run"]], settings[row["run"]]))
        shown_modes += [m for m in rollouts[-1]["weights"] if m not in shown_modes]
    if not rollouts:
        return None
    order = [name for name, _, _ in MODES if name in shown_modes]
    return {"modes": order, "rollouts": rollouts, "shown": len(rollouts), "total": int(total)}


def _rollout(row: dict, tokenizer: Any, settings: dict[str, WeightConfig]) -> dict[str, Any]:
    ids = row["ids"]
    text, offsets = decode_with_offsets(ids, tokenizer)
    tokens = [text[a:b] for a, b in offsets]
    scored = [ScoredSpan(s["kind"], s["start"], s["end"], s["delta"]) for s in row["spans"]]
    stop = row["finish"] == "stop"
    answer = next((s for s in scored if s.kind == "answer"), None)
    weights = {}
    for name, mode, profile in MODES:
        relevant = None
        if mode == "oracle":
            if row["labels"] is None or answer is None:
                continue
            relevant = feeds_the_answer(ids, row["labels"], answer.tok_start, tokenizer)
        config = settings[profile]
        texts = [tokenizer.decode([t]) for t in ids] if profile == "authors" else None
        rng = random.Random(f"0:{row['rollout_id']}")
        values = token_weights(len(ids), scored, mode, config, stop, rng, texts, relevant)
        weights[name] = [round(w, 3) for w in values]
    spread = [max(column) - min(column) for column in zip(*weights.values(), strict=True)] if weights else []
    return {
        "run": row["run"],
        "iteration": row["iteration"],
        "question": row["prompt_id"],
        "sample": row["sample_idx"],
        "reward": row["reward"],
        "tokens": tokens,
        "spans": [
            {"kind": s.kind, "start": s.tok_start, "end": s.tok_end, "delta": s.delta}
            for s in scored
            if s.delta is not None or s.kind == "answer"
        ],
        "weights": weights,
        "disagreement": round(sum(spread) / len(spread), 4) if spread else 0.0,
    }


def explorer_html(data: dict[str, Any]) -> str:
    """The explorer's section: controls, legend, the coloured completion, the embedded data."""
    left_out = data["total"] - data["shown"]
    cap = (
        f"Showing {data['shown']} of {data['total']} scored rollouts: the first {data['shown']} by run, iteration, "
        f"question and sample; {left_out} left out (raise --explorer-rollouts to embed more)."
        if left_out > 0
        else f"All {data['shown']} scored rollouts."
    )
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    buttons = "".join(
        f'<button type="button" class="mode" data-mode="{html.escape(m)}">{html.escape(m)}</button>'
        for m in data["modes"]
    )
    return f"""<section id="explorer"><h2>Token explorer</h2>
<p class="caption">Each token of a sampled completion, coloured by the weight its mode gives it in the loss
(computed from the same span scores with the run's train settings). Hover a token for its weight and its
span's delta (the answer's log-prob drop when the span is masked). {html.escape(cap)}</p>
<div class="controls">
<label>run <select id="x-run"></select></label> <label>iteration <select id="x-iteration"></select></label>
<label>question <select id="x-question"></select></label> <label>sample <select id="x-sample"></select></label>
<label><input type="checkbox" id="x-disagree"> only the 10% where the modes disagree most</label>
</div>
<div class="controls" id="x-modes">mode: {buttons}</div>
<div class="legend"><span>0.5</span><span class="bar"></span><span>2.0</span>
<span class="note">weight (log scale; white = 1; blue below, red above); a bar marks each span's start</span></div>
<p id="x-meta"></p><pre id="x-tokens" class="rollout"></pre>
<script type="application/json" id="explorer-data">{payload}</script>
<script>{SCRIPT}</script></section>"""


EXPLORER_STYLE = """
#explorer .controls{margin:.4em 0} #explorer button.mode{margin-right:4px}
#explorer button.mode.on{font-weight:bold;border:2px solid #333}
#explorer .legend{display:flex;align-items:center;gap:6px;font-size:85%}
#explorer .legend .bar{display:inline-block;width:160px;height:12px;
  background:linear-gradient(to right,rgb(60,110,230),#fff,rgb(230,60,40))}
#explorer pre.rollout span.tok{border-radius:2px} #explorer pre.rollout span.start{border-left:2px solid #222}
"""

SCRIPT = r"""
(function () {
  const data = JSON.parse(document.getElementById('explorer-data').textContent);
  const $ = (id) => document.getElementById(id);
  const state = {mode: data.modes[0]};
  function colour(w) {
    const v = Math.max(-1, Math.min(1, Math.log2(Math.max(w, 1e-6))));
    const a = Math.abs(v) * 0.85;
    if (v >= 0) return `rgb(255,${Math.round(255 - a * 195)},${Math.round(255 - a * 215)})`;
    return `rgb(${Math.round(255 - a * 195)},${Math.round(255 - a * 145)},255)`;
  }
  function pool() {
    if (!$('x-disagree').checked) return data.rollouts;
    const sorted = [...data.rollouts].sort((a, b) => b.disagreement - a.disagreement);
    return sorted.slice(0, Math.max(1, Math.ceil(sorted.length / 10)));
  }
  function fill(select, values, keep) {
    const unique = [...new Set(values)];
    select.innerHTML = unique.map((v) => `<option>${v}</option>`).join('');
    if (unique.map(String).includes(keep)) select.value = keep;
  }
  function choose() {
    const rows = pool();
    fill($('x-run'), rows.map((r) => r.run), $('x-run').value);
    let here = rows.filter((r) => r.run === $('x-run').value);
    fill($('x-iteration'), here.map((r) => r.iteration), $('x-iteration').value);
    here = here.filter((r) => String(r.iteration) === $('x-iteration').value);
    fill($('x-question'), here.map((r) => r.question), $('x-question').value);
    here = here.filter((r) => r.question === $('x-question').value);
    fill($('x-sample'), here.map((r) => r.sample), $('x-sample').value);
    return here.find((r) => String(r.sample) === $('x-sample').value);
  }
  function render() {
    const r = choose();
    document.querySelectorAll('#x-modes button').forEach((b) => {
      b.classList.toggle('on', b.dataset.mode === state.mode);
      b.disabled = !r || !(b.dataset.mode in r.weights);
    });
    if (!r) { $('x-tokens').textContent = ''; $('x-meta').textContent = 'no rollout'; return; }
    const mode = state.mode in r.weights ? state.mode : Object.keys(r.weights)[0];
    const weights = r.weights[mode];
    const spanOf = new Array(r.tokens.length).fill(null);
    r.spans.forEach((s) => { for (let t = s.start; t < s.end && t < spanOf.length; t++) spanOf[t] = s; });
    const out = $('x-tokens');
    out.textContent = '';
    r.tokens.forEach((text, t) => {
      const el = document.createElement('span');
      el.className = 'tok';
      el.textContent = text;
      el.style.background = colour(weights[t]);
      el.dataset.weight = weights[t];
      const s = spanOf[t];
      if (s && s.start === t) el.classList.add('start');
      el.title = `weight ${weights[t].toFixed(3)}` + (s ? ` | ${s.kind} span` +
        (s.delta === null || s.delta === undefined ? '' : `, delta ${s.delta.toFixed(3)}`) : ' | outside spans');
      out.appendChild(el);
    });
    $('x-meta').textContent = `${r.run}, iteration ${r.iteration}, ${r.question}, sample ${r.sample}: ` +
      `reward ${r.reward}; mode ${mode}; modes disagree by ${r.disagreement.toFixed(3)} per token`;
  }
  ['x-run', 'x-iteration', 'x-question', 'x-sample', 'x-disagree'].forEach((id) =>
    $(id).addEventListener('change', render));
  document.querySelectorAll('#x-modes button').forEach((b) =>
    b.addEventListener('click', () => { state.mode = b.dataset.mode; render(); }));
  render();
})();
"""
