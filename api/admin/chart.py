"""The loss chart of a job, drawn on the server as an SVG string (no charting library, no JS).

Only numbers computed here and fixed labels go into the markup, so it is safe to embed as is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from models_db.models import JobEvent

WIDTH, HEIGHT = 720, 280
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 16, 40


@dataclass
class LossSeries:
    train: list[tuple[int, float]] = field(default_factory=list)
    valid: list[tuple[int, float]] = field(default_factory=list)
    total_steps: int | None = None


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def loss_series(events: Iterable[JobEvent]) -> LossSeries:
    """Train and validation loss by step, from the job's ``metrics`` events (in order)."""
    series = LossSeries()
    train: dict[int, float] = {}
    valid: dict[int, float] = {}
    for event in events:
        data = event.data or {}
        step = _number(data.get("step"))
        if step is None:
            continue
        if (loss := _number(data.get("train_loss"))) is not None:
            train[int(step)] = loss
        if (loss := _number(data.get("valid_loss"))) is not None:
            valid[int(step)] = loss
        total = _number(data.get("total_steps"))
        if total is not None:
            series.total_steps = int(total)
    series.train = sorted(train.items())
    series.valid = sorted(valid.items())
    return series


def _ticks(low: float, high: float, count: int = 4) -> list[float]:
    if high <= low:
        return [low]
    return [low + (high - low) * i / count for i in range(count + 1)]


def _label(value: float) -> str:
    return f"{value:.3g}"


def loss_chart_svg(series: LossSeries) -> str:
    """An SVG of train (and validation) loss against the step."""
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="loss-chart" viewBox="0 0 {WIDTH} '
        f'{HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" '
        f'aria-label="Training and validation loss by step" '
        f'data-train-points="{len(series.train)}" data-valid-points="{len(series.valid)}">'
    ]
    points = series.train + series.valid
    if not points:
        parts.append(
            f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" fill="#666">'
            "No loss reported yet</text></svg>"
        )
        return "".join(parts)
    max_step = max(max(s for s, _ in points), series.total_steps or 0, 1)
    low = min(v for _, v in points)
    high = max(v for _, v in points)
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    pad = (high - low) * 0.05
    low, high = max(0.0, low - pad), high + pad
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(step: float) -> float:
        return LEFT + plot_w * step / max_step

    def y(value: float) -> float:
        return TOP + plot_h * (1 - (value - low) / (high - low))

    for tick in _ticks(low, high):
        parts.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" '
            'stroke="#e3e3e3"/>'
            f'<text x="{LEFT - 6}" y="{y(tick) + 4:.1f}" text-anchor="end" font-size="11" '
            f'fill="#555">{_label(tick)}</text>'
        )
    for tick in _ticks(0, max_step):
        parts.append(
            f'<text x="{x(tick):.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle" '
            f'font-size="11" fill="#555">{int(tick)}</text>'
        )
    parts.append(
        f'<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{HEIGHT - BOTTOM}" stroke="#999"/>'
        f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{HEIGHT - BOTTOM}" '
        f'y2="{HEIGHT - BOTTOM}" stroke="#999"/>'
        f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 6}" text-anchor="middle" font-size="12" '
        'fill="#333">step</text>'
    )
    for name, color, data in (
        ("train", "#2563eb", series.train),
        ("valid", "#dc2626", series.valid),
    ):
        if not data:
            continue
        path = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in data)
        parts.append(
            f'<polyline class="line-{name}" fill="none" stroke="{color}" stroke-width="2" '
            f'points="{path}"/>'
        )
        parts.extend(
            f'<circle class="pt-{name}" cx="{x(s):.1f}" cy="{y(v):.1f}" r="2.5" fill="{color}">'
            f"<title>step {s}: {name} loss {v:.4f}</title></circle>"
            for s, v in data
        )
    legend_x = WIDTH - RIGHT - 150
    parts.append(
        f'<rect x="{legend_x}" y="{TOP + 4}" width="10" height="10" fill="#2563eb"/>'
        f'<text x="{legend_x + 14}" y="{TOP + 13}" font-size="11">train loss</text>'
        f'<rect x="{legend_x + 76}" y="{TOP + 4}" width="10" height="10" fill="#dc2626"/>'
        f'<text x="{legend_x + 90}" y="{TOP + 13}" font-size="11">valid loss</text>'
    )
    parts.append("</svg>")
    return "".join(parts)
