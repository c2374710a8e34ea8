"""The scores-dir report: look at what a scorer (oracle/reference pair or token RM) scored.

``write_report(scores_dir, out_dir, k, num_pairs, seed)`` (``python -m openrlhf_sepo.cli.score_report``) writes
``SCORES_DIR/report/`` (or ``out_dir``):

- ``index.html``: run summary, the histograms, and ``--num_pairs`` pairs side by side, every response token
  shaded by its score (green: the oracle likes it more than the reference, red: less; the scale is clipped at
  the 99th percentile of |score|), the tokens SePO would train at ratio ``--k`` marked (chosen: the top n,
  rejected: the bottom n, n = max(1, floor(k * N))), exact scores in each token's tooltip.
- ``scores.png``: token scores of chosen vs rejected responses; the pair margin sum_t r(chosen) - sum_t r(rejected);
  the scores of the selected tokens at ``--k``.
"""

import html
import os
import random

import numpy as np
import torch

from openrlhf_sepo.scores_dir import ScoreDataError, read_rows
from openrlhf_sepo.scoring import select_key_tokens

CHOSEN_COLOR, REJECTED_COLOR = "#1f7a4d", "#b4332b"


def load_scores(scores_dir):
    """Manifest and rows (list of dicts, by index) of a score_tokens output dir, finished or not
    (``scores_dir.read_rows``); a clear error for anything else."""
    try:
        manifest, rows = read_rows(scores_dir)
    except ScoreDataError as e:
        raise SystemExit(str(e)) from None
    if not manifest.get("complete"):
        print(f"[warning] {scores_dir}: the scoring run is not complete; reporting the shards written so far")
    return manifest, rows


def selected_mask(scores, k, largest):
    return select_key_tokens(torch.tensor(scores, dtype=torch.float32), k, largest).tolist() if scores else []


def token_pieces(tokenizer, ids):
    """Readable text of each token (SentencePiece / byte-level markers turned back into spaces and newlines)."""
    if tokenizer is None:
        return [f"[{i}]" for i in ids]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    return [str(p).replace("\u2581", " ").replace("\u0120", " ").replace("\u010a", "\n") for p in pieces]


def shade(score, scale):
    """Background colour of a token: white at 0, towards green (positive) or red (negative), clipped at scale."""
    import matplotlib

    x = 0.5 + 0.5 * max(-1.0, min(1.0, score / scale))
    r, g, b, _ = matplotlib.colormaps["RdYlGn"](x)
    t = abs(x - 0.5) * 2 * 0.85  # light tints for small scores keep the text readable
    r, g, b = (1 - t) + t * r, (1 - t) + t * g, (1 - t) + t * b
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


def write_histograms(rows, k, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = np.concatenate([r["chosen_scores"] for r in rows])
    rejected = np.concatenate([r["rejected_scores"] for r in rows])
    margins = np.array([sum(r["chosen_scores"]) - sum(r["rejected_scores"]) for r in rows])
    sel_c = np.concatenate([np.array(r["chosen_scores"])[selected_mask(r["chosen_scores"], k, True)] for r in rows])
    sel_r = np.concatenate([np.array(r["rejected_scores"])[selected_mask(r["rejected_scores"], k, False)] for r in rows])

    plt.rcParams.update({"font.size": 10, "axes.spines.top": False, "axes.spines.right": False})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=110)
    lo, hi = np.percentile(np.concatenate([chosen, rejected]), [0.5, 99.5])
    bins = np.linspace(lo, hi, 60)
    ax = axes[0]
    for values, color, name in ((chosen, CHOSEN_COLOR, "chosen"), (rejected, REJECTED_COLOR, "rejected")):
        ax.hist(np.clip(values, lo, hi), bins=bins, color=color, alpha=0.35, label=f"{name} (mean {values.mean():+.3f})")
        ax.hist(np.clip(values, lo, hi), bins=bins, color=color, histtype="step", linewidth=1.4)
        ax.axvline(values.mean(), color=color, linestyle="--", linewidth=1)
    ax.set_title("token scores r(y_t)")
    ax.set_xlabel("log pi_oracle - log pi_ref")
    ax.set_ylabel("tokens")
    ax.legend(frameon=False)

    ax = axes[1]
    ax.hist(margins, bins=40, color="#4c6ef5", alpha=0.75)
    ax.axvline(0, color="black", linewidth=1)
    ax.set_title(f"pair margin: {100 * (margins > 0).mean():.0f}% of pairs above 0")
    ax.set_xlabel("sum r(chosen) - sum r(rejected)")
    ax.set_ylabel("pairs")

    ax = axes[2]
    bins = np.linspace(min(sel_c.min(), sel_r.min()), max(sel_c.max(), sel_r.max()), 50)
    ax.hist(sel_c, bins=bins, color=CHOSEN_COLOR, alpha=0.55, label=f"chosen, top {k:g} ({len(sel_c)} tokens)")
    ax.hist(sel_r, bins=bins, color=REJECTED_COLOR, alpha=0.55, label=f"rejected, bottom {k:g} ({len(sel_r)} tokens)")
    ax.set_title(f"selected key tokens at k = {k:g}")
    ax.set_xlabel("token score")
    ax.set_ylabel("tokens")
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def response_html(pieces, scores, mask, scale, side):
    spans = []
    for piece, score, selected in zip(pieces, scores, mask):
        cls = f"tok sel-{side}" if selected else "tok"
        text = html.escape(piece).replace("\n", "\u21b5<br>")
        spans.append(f'<span class="{cls}" style="background:{shade(score, scale)}" title="{score:+.4f}">{text}</span>')
    return "".join(spans)


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>SePO token scores: {title}</title>
<style>
body {{ font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2rem auto; max-width: 1200px;
       color: #1d2433; background: #fafbfc; }}
h1 {{ font-size: 1.5rem; margin-bottom: .2rem; }} .sub {{ color: #5b6478; margin-top: 0; }}
.cards {{ display: flex; flex-wrap: wrap; gap: .8rem; margin: 1.2rem 0; }}
.card {{ background: white; border: 1px solid #e3e7ee; border-radius: 10px; padding: .7rem 1rem; min-width: 130px; }}
.card b {{ display: block; font-size: 1.35rem; }} .card span {{ color: #5b6478; font-size: .8rem; }}
img {{ width: 100%; background: white; border: 1px solid #e3e7ee; border-radius: 10px; }}
.legend {{ display: flex; align-items: center; gap: .6rem; font-size: .85rem; color: #5b6478; margin: 1rem 0; }}
.bar {{ width: 220px; height: 12px; border-radius: 6px; background: linear-gradient(90deg, {neg}, #ffffff, {pos}); }}
.pair {{ background: white; border: 1px solid #e3e7ee; border-radius: 10px; padding: 1rem; margin: 1rem 0; }}
.pair h3 {{ margin: 0 0 .4rem 0; font-size: .95rem; }} .pair h3 small {{ color: #5b6478; font-weight: normal; }}
.prompt {{ color: #5b6478; font-size: .85rem; white-space: pre-wrap; border-left: 3px solid #e3e7ee;
          padding-left: .6rem; margin-bottom: .7rem; max-height: 6em; overflow: auto; }}
.cols {{ display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; }}
.col h4 {{ margin: 0 0 .3rem 0; font-size: .85rem; }} .col.chosen h4 {{ color: {chosen}; }} .col.rejected h4 {{ color: {rejected}; }}
.text {{ line-height: 1.9; font-size: .92rem; }}
.tok {{ white-space: pre-wrap; border-radius: 3px; padding: 1px 0; }}
.sel-chosen {{ box-shadow: inset 0 -3px 0 {chosen}; font-weight: 600; }}
.sel-rejected {{ box-shadow: inset 0 -3px 0 {rejected}; font-weight: 600; }}
</style></head><body>
<h1>SePO token scores</h1>
<p class="sub">{scorer} &middot; data <code>{data}</code></p>
<div class="cards">{cards}</div>
<img src="scores.png" alt="histograms of token scores">
<div class="legend">score <span>&minus;{scale:.2f}</span><div class="bar"></div><span>+{scale:.2f}</span>
&nbsp;&middot;&nbsp;<span class="tok sel-chosen">underlined</span>: the chosen tokens trained at k = {k:g} (highest scores)
&nbsp;&middot;&nbsp;<span class="tok sel-rejected">underlined</span>: the rejected tokens trained (lowest scores)
&nbsp;&middot;&nbsp;hover a token for its score</div>
{pairs}
</body></html>"""


def write_report(scores_dir, out_dir=None, k=0.3, num_pairs=12, seed=0):
    """Write index.html and scores.png for a score_tokens output dir; returns the HTML path."""
    manifest, rows = load_scores(scores_dir)
    out_dir = out_dir or os.path.join(scores_dir, "report")
    os.makedirs(out_dir, exist_ok=True)
    write_histograms(rows, k, os.path.join(out_dir, "scores.png"))

    tokenizer = None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(manifest["tokenizer"]["name_or_path"], trust_remote_code=True)
    except Exception as e:  # noqa: BLE001  (the page still shows token ids)
        print(f"[warning] cannot load the tokenizer ({e}); showing token ids")

    all_scores = np.abs(np.concatenate([r["chosen_scores"] + r["rejected_scores"] for r in rows]))
    scale = float(np.percentile(all_scores, 99)) or 1.0
    shown = sorted(random.Random(seed).sample(rows, min(num_pairs, len(rows))), key=lambda r: r["index"])
    pairs = []
    for r in shown:
        p = r["prompt_len"]
        prompt = "".join(token_pieces(tokenizer, r["chosen_input_ids"][:p]))
        cols = []
        for side, largest in (("chosen", True), ("rejected", False)):
            scores = r[f"{side}_scores"]
            mask = selected_mask(scores, k, largest)
            body = response_html(token_pieces(tokenizer, r[f"{side}_input_ids"][p:]), scores, mask, scale, side)
            cols.append(f'<div class="col {side}"><h4>{side} &middot; {len(scores)} tokens, {sum(mask)} trained, '
                        f'sum r = {sum(scores):+.2f}</h4><div class="text">{body}</div></div>')
        margin = sum(r["chosen_scores"]) - sum(r["rejected_scores"])
        pairs.append(f'<div class="pair"><h3>pair {r["index"]} <small>margin {margin:+.2f}</small></h3>'
                     f'<div class="prompt">{html.escape(prompt)}</div><div class="cols">{"".join(cols)}</div></div>')

    counts, stats = manifest.get("counts", {}), manifest.get("score_stats", {})
    card_values = [
        (f"{counts.get('pairs_kept', len(rows))}", f"pairs kept of {counts.get('pairs_read', '?')}"),
        (f"{counts.get('pairs_skipped', 0)}", "pairs skipped: " + ", ".join(
            f"{n} {reason}" for reason, n in counts.get("skipped_by_reason", {}).items() if n) or "pairs skipped"),
        (f"{stats.get('chosen', {}).get('mean', float('nan')):+.3f}", "mean chosen token score"),
        (f"{stats.get('rejected', {}).get('mean', float('nan')):+.3f}", "mean rejected token score"),
        (f"{100 * (stats.get('pair_accuracy') or 0):.0f}%", "pairs with sum r(chosen) > sum r(rejected)"),
        (f"{manifest.get('timing', {}).get('tokens_per_s', 0):.0f}", "tokens / s (last run)"),
    ]
    cards = "".join(f"<div class='card'><b>{html.escape(v)}</b><span>{html.escape(t)}</span></div>" for v, t in card_values)
    if manifest.get("scorer", "oracle_ref") == "token_rm":
        scorer = f"token reward model <code>{html.escape(manifest['token_rm']['name_or_path'])}</code>"
    else:
        scorer = (f"oracle <code>{html.escape(manifest['oracle']['name_or_path'])}</code> &minus; reference "
                  f"<code>{html.escape(manifest['ref']['name_or_path'])}</code>")
    page = PAGE.format(
        title=html.escape(scores_dir), scorer=scorer, data=html.escape(str(manifest["data"]["dataset"])),
        cards=cards, scale=scale, k=k, pairs="\n".join(pairs), chosen=CHOSEN_COLOR, rejected=REJECTED_COLOR,
        neg=shade(-1, 1), pos=shade(1, 1),
    )
    path = os.path.join(out_dir, "index.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path
