"""Terminal output for the query commands: plain tables and a one-feature dashboard.

Colour goes through click.style, so it disappears when output is not a terminal.
"""

from __future__ import annotations

import math
import shutil
import textwrap
from itertools import zip_longest
from typing import Any

import click
import polars as pl

_SPARK = "▁▂▃▄▅▆▇█"


_NAMED_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def printable(text: str) -> str:
    """`text` with every control character drawn as an escape (`\\n`, `\\x07`, `\\u202e`): stored
    tokens and descriptions come from data, and a raw BEL, ESC or bidi override would act on the
    terminal instead of being shown."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable() or ch == " ":
            out.append(ch)
        elif ch in _NAMED_ESCAPES:
            out.append(_NAMED_ESCAPES[ch])
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


def _width() -> int:
    return max(60, shutil.get_terminal_size((120, 24)).columns)


def format_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}" if abs(value) < 1 else f"{value:.3f}".rstrip("0").rstrip(".")
        return f"{value:.2e}"
    if isinstance(value, (list, tuple)):
        return ", ".join(format_cell(v) for v in value)
    return printable(str(value))


def table(frame: pl.DataFrame, columns: list[str], headers: list[str] | None = None, wrap_last: bool = True) -> str:
    """A left-aligned text table; the last column is cut to fit the terminal."""
    headers = headers or columns
    rows = [[format_cell(row.get(c)) for c in columns] for row in frame.iter_rows(named=True)]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    if wrap_last and columns:
        room = _width() - sum(w + 2 for w in widths[:-1])
        widths[-1] = max(10, min(widths[-1], room))
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    for r in rows:
        cells = [c if len(c) <= w else c[: max(1, w - 1)] + "…" for c, w in zip(r, widths)]
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
    return "\n".join(lines)


def results(frame: pl.DataFrame, score: str = "score") -> str:
    if frame.height == 0:
        return "no matching features"
    columns = ["score", "coder_id", "feature", "layer", "site", "density", "max_activation", "description"]
    headers = [score, "coder_id", "feature", "layer", "site", "density", "max", "description"]
    if "description_score" in frame.columns:  # the description's own score (embedding AUROC), "-" if none
        columns.insert(-1, "description_score")
        headers.insert(-1, "desc.score")
    if "duplicates" in frame.columns and frame["duplicates"].sum():
        # a search shows features of one coder with the same statistics and description once: the
        # count of the others beside it (their numbers: --json, `duplicate_features`)
        frame = frame.with_columns(pl.when(pl.col("duplicates") > 0).then(pl.format("+{}", "duplicates"))
                                   .otherwise(pl.lit("")).alias("_dups"))
        columns.insert(3, "_dups")
        headers.insert(3, "dups")
    return table(frame, columns, headers)


def sparkline(counts: list[int]) -> str:
    if not counts or max(counts) == 0:
        return ""
    top = max(counts)
    return "".join(" " if c == 0 else _SPARK[min(len(_SPARK) - 1, int(c / top * (len(_SPARK) - 1) + 0.5))] for c in counts)


def context(tokens: list[str], values: list[float], peak: int, radius: int = 12) -> str:
    """Tokens around the peak, the peak highlighted, active tokens underlined with their values."""
    lo, hi = max(0, peak - radius), min(len(tokens), peak + radius + 1)
    out = []
    for i in range(lo, hi):
        text = printable(tokens[i])
        if i == peak:
            out.append(click.style(f"[{text}]", fg="red", bold=True))
        elif values[i] > 0:
            out.append(click.style(text, fg="yellow") + click.style(f"({values[i]:.2g})", dim=True))
        else:
            out.append(text)
    return ("…" if lo > 0 else "") + "".join(out) + ("…" if hi < len(tokens) else "")


def dashboard(feature: dict, examples: int = 5) -> str:
    lines = []
    title = printable(f"{feature['coder_id']}/{feature['feature']}")
    lines.append(click.style(title, bold=True) + printable(f"  ({feature['model']}, layer {feature['layer']}, "
                                                           f"{feature['site']}, {feature['hook']})"))
    lines.append(f"description: {printable(feature['description'] or '(none yet)')}")
    score = feature.get("description_score")
    if score is not None:  # the description's own score and the method that made it
        current = next((d for d in feature["descriptions"] if d.get("current")), None)
        details = ((current or {}).get("scores") or {}).get("embedding_details") or {}
        against = (f" ({details['activating']} activating vs {details['hard_negatives'] + details['random_negatives']} "
                   f"non-activating contexts)") if "activating" in details else ""
        lines.append(f"description score: {score['value']:.3f} by {printable(str(score['method']))} AUROC{against}")
    for extra in feature["descriptions"]:
        source = ", ".join(str(extra[k]) for k in ("method", "model") if extra.get(k))
        if source:
            lines.append(f"  ({printable(source)})")
    lines.append(f"density {format_cell(feature['density'])}  max {format_cell(feature['max_activation'])}  "
                 f"mean {format_cell(feature['mean_activation'])}  std {format_cell(feature['std_activation'])}  "
                 f"active tokens {feature['active_count']:,}")
    hist = feature["histogram"]
    if hist["counts"]:
        lines.append(f"histogram [0, {format_cell(hist['max'])}]: {sparkline(hist['counts'])}")
    if feature["layer_write"]:  # a multi-layer coder's feature: its decoder norm at each output layer
        writes = feature["layer_write"]
        most = sorted(writes, key=lambda w: -w["share"])[:4]
        lines.append(f"writes to layers {writes[0]['layer']}..{writes[-1]['layer']}: "
                     f"{sparkline([w['norm'] for w in writes])}  ("
                     + ", ".join(f"L{w['layer']} {w['share']:.0%}" for w in most) + ")")
    top = feature["logits"]["top"]
    bottom = feature["logits"]["bottom"]
    if top:
        lines.append("promotes:   " + "  ".join(f"{t['token']!r} {t['value']:+.2f}" for t in top))
    if bottom:
        lines.append("suppresses: " + "  ".join(f"{t['token']!r} {t['value']:+.2f}" for t in bottom))
    if feature["top_tokens"]:
        lines.append("fires on:   " + "  ".join(f"{t['token']!r}×{t['count']}" for t in feature["top_tokens"]))
    if feature["neighbours"]:
        lines.append("neighbours: " + "  ".join(f"{n['feature']} ({n['cosine']:.2f})" for n in feature["neighbours"][:10]))
    counted = feature.get("cooccurrence")
    if counted is not None:
        sample = f"a sample of {counted['tokens']:,} of {counted['tokens_indexed']:,} tokens" if counted["sampled"] \
            else f"all {counted['tokens']:,} tokens"
        lines.append(click.style(f"fires together with (Jaccard, on {sample})", bold=True))
        for p in feature["cooccurring"][:10]:
            text = printable(p["description"] or "(no description)")
            lines.append(f"  {p['jaccard']:.3f}  ×{p['count']:<6} {printable(p['coder_id'])}/{p['feature']}  "
                         f"L{p['layer']}  {text[:70] + '…' if len(text) > 70 else text}")
        if not feature["cooccurring"]:
            lines.append("  (none fired with it on at least 2 tokens)")
    if feature["top_examples"]:
        lines.append(click.style("top examples", bold=True))
        for ex in feature["top_examples"][:examples]:
            lines.append(f"  {ex['max_value']:7.3g}  " + context(ex["tokens"], ex["values"], ex["max_position"]))
    if feature["interval_examples"]:
        lines.append(click.style("interval examples", bold=True))
        for ex in feature["interval_examples"][:examples]:
            lines.append(f"  [{ex['bin_min']:.3g}, {ex['bin_max']:.3g})  {ex['max_value']:7.3g}  "
                         + context(ex["tokens"], ex["values"], ex["max_position"]))
    return "\n".join(lines)


def fires(result, per_token_rows: int = 3) -> str:
    lines = [printable(f"model {result.model}: {len(result.tokens)} tokens (BOS not counted)")]
    lines.append("  ".join(f"{i}:{t!r}" for i, t in enumerate(result.tokens)))
    lines.append("")
    if result.features.height == 0:
        lines.append("no feature fires")
        return "\n".join(lines)
    lines.append(table(result.features, ["activation", "coder_id", "feature", "position", "density", "description"],
                       [result.by, "coder_id", "feature", "pos", "density", "description"]))
    if result.per_token.height:
        lines.append("")
        lines.append(click.style("per token", bold=True))
        for (position,), group in result.per_token.group_by("position", maintain_order=True):
            top = group.head(per_token_rows).iter_rows(named=True)
            cells = "  ".join(f"{r['coder_id']}/{r['feature']} {r['activation']:.3g}" for r in top)
            lines.append(f"  {position:>4} {result.tokens[position]!r:<14} {cells}")
    return "\n".join(lines)


def find_results(frame: pl.DataFrame, by: str) -> str:
    """`find`'s ranked features: score, how many marked / other tokens each fires on, and why."""
    if frame.height == 0:
        return "no feature fires on a marked token"
    shown = frame.with_columns(
        marked=pl.format("{}/{}", "marked_fired", "marked_tokens"), other=pl.format("{}/{}", "other_fired", "other_tokens"))
    return table(shown, ["score", "coder_id", "feature", "layer", "marked", "other", "mean_marked", "description"],
                 [by, "coder_id", "feature", "layer", "marked", "other", "mean act", "description"])


def steered(result) -> str:
    """`steer`'s two continuations side by side, under the prompt and the features that steer."""
    sampling = "greedy" if result.temperature == 0 else f"temperature {result.temperature:g}, seed {result.seed}"
    lines = [printable(f"model {result.model}: {result.prompt_tokens} prompt tokens, up to {result.tokens} new, "
                       f"{sampling}"),
             "prompt: " + printable(result.prompt)]
    for f in result.features:
        sites = ", ".join(f"{w['hook']} (|v| {w['norm']:.3g})" for w in f["writes"]) or "nowhere (an all-zero direction)"
        lines.append(printable(f"steer:  {f['coder_id']}/{f['feature']} x{f['strength']:g} of max "
                               f"{f['max_activation']:.4g} at {sites}: {f['description'] or '(no description)'}"))
    width = max(20, (_width() - 3) // 2)
    left, right = _wrapped(result.unsteered, width), _wrapped(result.steered, width)
    lines += ["", click.style("unsteered".ljust(width), bold=True) + " │ " + click.style("steered", bold=True),
              "─" * width + "─┼─" + "─" * width]
    lines += [a.ljust(width) + " │ " + b for a, b in zip_longest(left, right, fillvalue="")]
    generated = len(result.unsteered_ids) + len(result.steered_ids)
    lines += ["", f"{generated} tokens generated in {result.seconds:.1f} s ({result.tokens_per_second:.2f} tokens/s)"]
    return "\n".join(line.rstrip() for line in lines)


def _wrapped(text: str, width: int) -> list[str]:
    """`text` cut into lines of at most `width` characters, its own line breaks kept."""
    out = []
    for line in text.split("\n"):
        out += textwrap.wrap(printable(line), width, drop_whitespace=False) or [""]
    return out


def json_safe(value: Any) -> Any:
    """NaN/inf -> None so the output is valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
