"""The report's data model and its three renderings: ``report.json`` (the measured values), ``report.md``
and ``index.html`` (the same tables, formatted; the page links its PNG figures by relative path and loads
nothing else, so it opens offline)."""

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Table", "Section", "Report", "fmt"]


def fmt(value, spec):
    """A cell as the page shows it: text as it is, ``None`` as a dash, a number through ``spec``."""
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if spec.endswith("x"):                      # a ratio: 1.23×
        return format(value, spec[:-1]) + "×"
    return format(value, spec)


@dataclass
class Table:
    """``columns``: ``(name, format spec)`` pairs (a spec ending in ``x`` prints a ratio); ``rows``: the
    measured values, raw, as ``report.json`` keeps them."""
    title: str
    columns: list
    rows: list = field(default_factory=list)
    note: str = ""

    def add(self, *cells):
        if len(cells) != len(self.columns):
            raise ValueError(f"table {self.title!r}: a row of {len(cells)} cells for {len(self.columns)} columns")
        self.rows.append(list(cells))

    def formatted(self):
        return [[fmt(v, spec) for v, (_, spec) in zip(row, self.columns)] for row in self.rows]

    def to_json(self):
        return {"title": self.title, "columns": [name for name, _ in self.columns],
                "formats": [spec for _, spec in self.columns], "rows": self.rows, "note": self.note}


@dataclass
class Section:
    """One strategy: what was measured (tables, figures, a few sentences) and what could not be here."""
    key: str
    title: str
    text: list = field(default_factory=list)
    tables: list = field(default_factory=list)
    figures: list = field(default_factory=list)      # (PNG file name, caption)
    absent: list = field(default_factory=list)       # what this machine or this tree does not have, and why
    seconds: float = 0.0

    def table(self, title, columns, note=""):
        t = Table(title, columns, note=note)
        self.tables.append(t)
        return t

    def to_json(self):
        return {"title": self.title, "text": self.text, "tables": [t.to_json() for t in self.tables],
                "figures": [{"file": f, "caption": c} for f, c in self.figures], "absent": self.absent,
                "seconds": round(self.seconds, 1)}


@dataclass
class Report:
    machine: dict
    command: str
    quick: bool
    sections: list = field(default_factory=list)
    headline: dict = field(default_factory=dict)     # name -> (value, format spec, what it is)

    def to_json(self):
        return {"machine": self.machine, "command": self.command, "quick": self.quick,
                "headline": {k: {"value": v, "format": s, "what": w} for k, (v, s, w) in self.headline.items()},
                "sections": {s.key: s.to_json() for s in self.sections}}

    def write(self, out):
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(self.to_json(), indent=1, allow_nan=True) + "\n")
        (out / "report.md").write_text(self.markdown())
        (out / "index.html").write_text(self.html())

    def _machine_line(self):
        m = self.machine
        return (f"{m['cpu']} ({m['int8_features']}), {m['cores']} cores, {m['memory_gib']:.0f} GiB; "
                f"{m['gpu']}; Python {m['python']}, torch {m['torch']}, onnxruntime {m['onnxruntime']}; "
                f"ambert {m['commit']}; {m['date']}")

    def markdown(self):
        lines = ["# ambert: how far each resource-efficiency strategy takes BERT", "",
                 f"Machine: {self._machine_line()}.  ", f"Command: `{self.command}`"
                 + (" (quick: fewer sentences and repetitions; not the figures to quote)" if self.quick else ""), ""]
        if self.headline:
            lines += ["## Headline figures", "", "| figure | value |", "|---|---|"]
            lines += [f"| {w} | {fmt(v, s)} |" for v, s, w in self.headline.values()]
            lines.append("")
        for s in self.sections:
            lines += [f"## {s.title}", ""]
            lines += [p + "\n" for p in s.text]
            for t in s.tables:
                lines += [f"**{t.title}**", "", "| " + " | ".join(n for n, _ in t.columns) + " |",
                          "|" + "---|" * len(t.columns)]
                lines += ["| " + " | ".join(r) + " |" for r in t.formatted()]
                lines += ([f"\n{t.note}"] if t.note else []) + [""]
            for f, caption in s.figures:
                lines += [f"![{caption}]({f})", f"*{caption}*", ""]
            for a in s.absent:
                lines += [f"- Not measured here: {a}"]
            lines += ([""] if s.absent else []) + [f"*(section measured in {s.seconds:.0f} s)*", ""]
        return "\n".join(lines)

    def html(self):
        e = html.escape
        body = ["<h1>ambert: how far each resource-efficiency strategy takes BERT</h1>",
                f"<p class=meta>Machine: {e(self._machine_line())}<br>Command: <code>{e(self.command)}</code>"
                + (" (quick: fewer sentences and repetitions; not the figures to quote)" if self.quick else "")
                + "</p>"]
        nav = " · ".join(f'<a href="#{s.key}">{e(s.title)}</a>' for s in self.sections)
        body.append(f"<nav>{nav}</nav>")
        if self.headline:
            body.append("<h2>Headline figures</h2><table><tr><th>figure</th><th>value</th></tr>"
                        + "".join(f"<tr><td>{e(w)}</td><td class=num>{e(fmt(v, s))}</td></tr>"
                                  for v, s, w in self.headline.values()) + "</table>")
        for s in self.sections:
            body.append(f'<section id="{s.key}"><h2>{e(s.title)}</h2>')
            body += [f"<p>{e(p)}</p>" for p in s.text]
            for t in s.tables:
                head = "".join(f"<th>{e(n)}</th>" for n, _ in t.columns)
                rows = "".join("<tr>" + "".join(f"<td{' class=num' if not isinstance(v, str) else ''}>{e(c)}</td>"
                                                for v, c in zip(raw, cells)) + "</tr>"
                               for raw, cells in zip(t.rows, t.formatted()))
                body.append(f"<h3>{e(t.title)}</h3><table><tr>{head}</tr>{rows}</table>"
                            + (f"<p class=note>{e(t.note)}</p>" if t.note else ""))
            for f, caption in s.figures:
                body.append(f'<figure><img src="{e(f)}" alt="{e(caption)}"><figcaption>{e(caption)}</figcaption></figure>')
            if s.absent:
                body.append("<ul class=absent>" + "".join(f"<li>Not measured here: {e(a)}</li>" for a in s.absent)
                            + "</ul>")
            body.append(f"<p class=note>Section measured in {s.seconds:.0f} s.</p></section>")
        style = ("body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em;color:#222}"
                 "table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:.2em .6em}"
                 "th{background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums}"
                 "img{max-width:100%}.meta,.note{color:#555;font-size:.9em}.absent{color:#844}"
                 "nav{margin:1em 0}section{margin-top:2em}")
        return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>ambert report</title>"
                f"<style>{style}</style></head><body>" + "\n".join(body) + "</body></html>\n")
