"""What a run reports: a Markdown table on stdout, a JSON record, a bar chart (PIL).

JSON keys (schema 1): `schema`, `command`, `date`, `machine` (cpu, cores, torch_threads,
platform, python, memory_gib, load_average_at_start, gpu), `versions` (the libraries', and
`commit`: sdfast's git commit, short hash + "+dirty", when it runs from a checkout),
`settings`, `model`, `rows` (each: suite, name, unit, kind, runs {runtime: median, q1, q3,
min, max, n, samples}, ratios {baseline: ratio}, rates {runtime: {unit, value,
share_of_roofline}} (kernels: GB/s, TFLOP/s, and for attention and convolution the share of the
GEMM roofline row), ratio_meaning, unavailable {runtime: why}, checks, notes, goal
{vs, at_least | at_most, met}, status), and `load_average_at_end`.
"""
import json

from PIL import Image, ImageDraw, ImageFont

from ..io.save import publish_atomic, text_writer

SCHEMA = 1
COLOURS = {"sdfast": (31, 119, 180), "torch-reference": (148, 103, 189),
           "diffusers": (255, 127, 14), "diffusers-accelerated": (214, 39, 40),
           "onnxruntime": (44, 160, 44)}


def _scale(value, unit):
    """`(factor, suffix)` to show `value` (and numbers near it) in a readable unit."""
    if unit == "MiB":
        return 1, "MiB"
    if value < 1e-3:
        return 1e6, "us"
    if value < 1:
        return 1e3, "ms"
    return 1, "s"


def _num(value):
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def fmt(value, unit, *more):
    """`value` with its unit; `more` values shown after it in brackets, in the same unit."""
    factor, suffix = _scale(value, unit)
    text = f"{_num(value * factor)} {suffix}"
    if more:
        text += " [" + "-".join(_num(v * factor) for v in more) + "]"
    return text


def _ratio_text(row, name):
    ratio = row.ratios().get(name)
    if ratio is None:
        return ""
    return f" (x{ratio:.2f})"


def _rate_text(row, name):
    rate = row.rates().get(name)
    if rate is None:
        return ""
    share = rate.get("share_of_roofline")
    return f" {_num(rate['value'])} {rate['unit']}" + (f" ({share:.0%} of GEMM)" if share else "")


def _cell(row, name):
    if name in row.runs:
        st = row.runs[name]
        return fmt(st.median, row.unit, *st.quartiles()) + _ratio_text(row, name) + _rate_text(row, name)
    if name in row.unavailable:
        return "n/a"
    return ""


def _goal_text(row):
    if not row.goal:
        return ""
    met = row.goal_met()
    bound = (f">= {row.goal['at_least']}x faster" if "at_least" in row.goal
             else f"<= {row.goal['at_most']}x")
    verdict = {True: "met", False: "NOT met", None: "not measured"}[met]
    return f"{bound} than {row.goal['vs']}: {verdict}"


def table(record, rows, names):
    """The Markdown table (and its footnotes) of a run."""
    settings = record["settings"]
    lines = [f"sdfast bench: {record['model']['label']}, {settings['device']} "
             f"{settings['dtype']}, {record['machine']['cpu']} ({record['machine']['cores']} "
             f"cores), {record['date']}",
             "median [q1-q3] of the repeats; (xN): for times baseline / sdfast (above 1: sdfast "
             "is faster), for memory sdfast / baseline (below 1: sdfast needs less)", "",
             "| suite | measurement | " + " | ".join(names) + " | goal |",
             "|---|---|" + "---|" * len(names) + "---|"]
    notes = []
    checked = [row.suite for row in rows if row.checks]
    for row in rows:
        if row.status:
            lines.append(f"| {row.suite} | {row.name} | {row.status} |" + " |" * len(names))
            continue
        cells = [_cell(row, name) for name in names]
        lines.append(f"| {row.suite} | {row.name} | " + " | ".join(cells) + f" | {_goal_text(row)} |")
        for name, why in row.unavailable.items():
            if name in names:
                notes.append(f"- {row.suite} / {name}: {why}")
        for name, check in row.checks.items():
            shown = ", ".join(f"{k} {v:.3g}" for k, v in check.items())
            which = f" ({row.name})" if checked.count(row.suite) > 1 else ""
            notes.append(f"- {row.suite} / {name} check{which}: {shown}")
        notes += [f"- {row.suite}: {note}" for note in row.notes]
    seen = []
    for note in notes:
        if note not in seen:
            seen.append(note)
    return "\n".join(lines + ([""] + seen if seen else []))


def write_json(record, path, overwrite=False):
    """Write the record as JSON atomically; without `overwrite`, never replace a file."""
    return publish_atomic(path, text_writer(json.dumps(record, indent=1) + "\n"), overwrite)


def plot(rows, names, title, path, width=960, overwrite=False):
    """A bar chart: one panel per row, a bar per runtime at its median, the IQR as a thick
    whisker and min-max as a thin one, each labelled with its value and ratio. Written
    atomically; without `overwrite`, never replacing a file."""
    rows = [r for r in rows if r.runs]
    font = ImageFont.load_default()
    bar, gap, head = 22, 6, 34
    heights = [head + len([n for n in names if n in r.runs]) * (bar + gap) + 10 for r in rows]
    image = Image.new("RGB", (width, 40 + sum(heights) + 10), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 12), title, fill="black", font=font)
    left, right, y = 130, 280, 40
    for row, height in zip(rows, heights):
        present = [n for n in names if n in row.runs]
        top = max(row.runs[n].as_dict()["max"] for n in present) or 1.0
        scale = (width - left - right) / top
        draw.text((10, y + 8), f"{row.suite}: {row.name}"[:150], fill="black", font=font)
        by = y + head
        for name in present:
            st = row.runs[name].as_dict()
            x0 = left
            draw.rectangle([x0, by, x0 + st["median"] * scale, by + bar], fill=COLOURS.get(name, (120, 120, 120)))
            mid = by + bar // 2
            draw.line([x0 + st["min"] * scale, mid, x0 + st["max"] * scale, mid], fill="black", width=1)
            draw.line([x0 + st["q1"] * scale, mid, x0 + st["q3"] * scale, mid], fill="black", width=4)
            draw.text((10, by + 5), name, fill="black", font=font)
            label = fmt(st["median"], row.unit) + _ratio_text(row, name)
            draw.text((x0 + st["max"] * scale + 8, by + 5), label, fill="black", font=font)
            by += bar + gap
        draw.line([10, y + height - 2, width - 10, y + height - 2], fill=(220, 220, 220))
        y += height
    publish_atomic(path, lambda tmp: image.save(tmp, "PNG"), overwrite)
    return image
