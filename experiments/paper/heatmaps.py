"""Heat maps of per-token weights (attention, gradient importance) over chosen sentences: a self-contained
HTML page (inline CSS, no external assets) and a PNG of the same content (matplotlib, Agg backend).

Each weight row is scaled by its own maximum, so the strongest token of each row is fully coloured; the
raw value is shown on hover in the HTML page.
"""
from __future__ import annotations

import html
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

# one colour per weight row (attention, importance, ...), cycled; RGB 0-255
_PALETTE = [(214, 39, 40), (31, 119, 180), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75)]
_CHARS_PER_LINE = 110  # PNG wrapping, in monospace characters


def _weights(values, n_tokens: int, name: str, number: int) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size != n_tokens:
        raise ValueError(f"example {number}: weights {name!r} have {array.size} values for {n_tokens} tokens")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"example {number}: weights {name!r} hold NaN or infinite values")
    return array


def _scaled(weights: np.ndarray) -> np.ndarray:
    """Weights in [0, 1] relative to the row's largest magnitude (all zero stays zero)."""
    peak = float(np.abs(weights).max()) if weights.size else 0.0
    return np.abs(weights) / peak if peak > 0 else np.zeros_like(weights)


def _check(examples) -> list[tuple[list[str], dict[str, np.ndarray]]]:
    checked = []
    for number, item in enumerate(examples):
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], Mapping)):
            raise TypeError(f"example {number}: expected (tokens, {{name: weights}}), got {type(item).__name__}")
        tokens, rows = list(map(str, item[0])), item[1]
        if not rows:
            raise ValueError(f"example {number}: no weight rows")
        checked.append((tokens, {str(name): _weights(w, len(tokens), str(name), number) for name, w in rows.items()}))
    if not checked:
        raise ValueError("no examples to draw")
    return checked


def _slug(title: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", title).strip("_").lower() or "heatmaps"


def _html_page(examples, title: str) -> str:
    names = list(dict.fromkeys(name for _, rows in examples for name in rows))
    colours = {name: _PALETTE[i % len(_PALETTE)] for i, name in enumerate(names)}
    legend = " ".join(f'<span class="tok" style="background:rgba{(*colours[n], 0.85)}">{html.escape(n)}</span>'
                      for n in names)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>",
        "body{font-family:Georgia,'Times New Roman',serif;margin:2em;max-width:70em;color:#111}",
        ".example{margin:1.5em 0;padding-top:.5em;border-top:1px solid #ccc}",
        ".row{margin:.3em 0;line-height:2em}",
        ".name{display:inline-block;width:9em;font-family:monospace;font-size:.85em;color:#555}",
        ".tok{padding:.15em .2em;margin:0 .05em;border-radius:.2em}",
        "</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Colour depth = weight / largest weight of the row. Rows: {legend}</p>",
    ]
    for number, (tokens, rows) in enumerate(examples):
        parts.append(f'<div class="example"><div class="name">example {number}</div>')
        for name, weights in rows.items():
            scaled = _scaled(weights)
            spans = "".join(
                f'<span class="tok" title="{weights[i]:.4g}" style="background:rgba{(*colours[name], round(float(scaled[i]), 3))}'
                f'{";color:#fff" if scaled[i] > 0.65 else ""}">{html.escape(token)}</span> '
                for i, token in enumerate(tokens))
            parts.append(f'<div class="row"><span class="name">{html.escape(name)}</span>{spans}</div>')
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _wrap(tokens: Sequence[str]) -> list[list[int]]:
    """Token positions per PNG line, at most _CHARS_PER_LINE characters (a longer token gets a line)."""
    lines, current, width = [], [], 0
    for position, token in enumerate(tokens):
        needed = len(token) + 1
        if current and width + needed > _CHARS_PER_LINE:
            lines.append(current)
            current, width = [], 0
        current.append(position)
        width += needed
    if current or not lines:
        lines.append(current)
    return lines


def _png(examples, title: str, path: Path) -> None:
    # a bare Figure on an Agg canvas: no pyplot state, no display, whatever backend the process uses
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(dict.fromkeys(name for _, rows in examples for name in rows))
    colours = {name: np.array(_PALETTE[i % len(_PALETTE)]) / 255.0 for i, name in enumerate(names)}
    # layout in text lines: title, then per example a caption line and, per row, its wrapped token lines
    layout = [("title", title)]
    for number, (tokens, rows) in enumerate(examples):
        layout.append(("caption", f"example {number}"))
        for name, weights in rows.items():
            wrapped = _wrap(tokens)
            for line_number, positions in enumerate(wrapped):
                layout.append(("tokens", (name if line_number == 0 else "", name, tokens, _scaled(weights), positions)))
        layout.append(("gap", None))
    font_size = 10
    line_height_in = 0.28
    label_width_chars = max(len(n) for n in names) + 2
    width_in = (label_width_chars + _CHARS_PER_LINE) * font_size * 0.62 / 72 + 0.6
    height_in = line_height_in * len(layout) + 0.4
    figure = Figure(figsize=(width_in, height_in), dpi=110)
    FigureCanvasAgg(figure)
    char_w = font_size * 0.62 / 72 / width_in  # width of one monospace character, in figure fractions
    for line_number, (kind, content) in enumerate(layout):
        y = 1.0 - (0.2 + line_height_in * (line_number + 0.5)) / height_in
        if kind == "title":
            figure.text(0.01, y, content, fontsize=font_size + 3, weight="bold", va="center")
        elif kind == "caption":
            figure.text(0.01, y, content, fontsize=font_size, style="italic", color="#555555", va="center")
        elif kind == "tokens":
            label, name, tokens, scaled, positions = content
            figure.text(0.01, y, label, fontsize=font_size - 1, family="monospace", color="#555555", va="center")
            x = 0.01 + label_width_chars * char_w
            for position in positions:
                token = tokens[position]
                alpha = float(scaled[position])
                figure.text(x, y, token, fontsize=font_size, family="monospace", va="center",
                            color="white" if alpha > 0.65 else "black",
                            bbox={"boxstyle": "square,pad=0.15", "linewidth": 0,
                                  "facecolor": (*colours[name], alpha)})
                x += (len(token) + 1) * char_w
    figure.savefig(path)


def write_heatmaps(examples: Sequence[tuple[Sequence[str], Mapping[str, Sequence[float]]]], out_dir: str | os.PathLike,
                   title: str, *, stem: str | None = None) -> tuple[Path, Path]:
    """Write ``<stem>.html`` and ``<stem>.png`` (stem: from the title unless given) into ``out_dir``.

    ``examples``: (tokens, {row name: one weight per token}) per sentence, e.g.
    ``(tokens, {"attention": a, "gradient importance": g})``. Returns (html_path, png_path)."""
    checked = _check(examples)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or _slug(title)
    html_path, png_path = out_dir / f"{stem}.html", out_dir / f"{stem}.png"
    html_path.write_text(_html_page(checked, title), encoding="utf-8")
    _png(checked, title, png_path)
    return html_path, png_path
