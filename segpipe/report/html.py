"""Render ``build.ReportData`` as one self-contained HTML page.

Inline CSS and a little inline JS (sortable tables, a gallery filter), pictures as data URIs,
charts as inline SVG: the page loads nothing from anywhere. Every text from the run is escaped.
Sections (element ids): summary, provenance, counts, throughput, accuracy, gallery, histograms.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from html import escape
from typing import Any, Iterable, Sequence

from segpipe.report.build import GalleryItem, ReportData

SECTIONS = ("summary", "provenance", "counts", "throughput", "accuracy", "gallery", "histograms")
AP_COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "ARmax")

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d232a;background:#f6f7f9}
header{background:#1d2b3a;color:#fff;padding:18px 28px}header h1{margin:0;font-size:22px}
header .sub{opacity:.8;font-size:13px}nav a{color:#cfe3ff;margin-right:14px;text-decoration:none}
main{padding:8px 28px 40px;max-width:1500px}section{background:#fff;border:1px solid #dde2e8;border-radius:6px;
padding:8px 18px 16px;margin:16px 0}h2{font-size:18px;margin:10px 0}h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}th,td{border-bottom:1px solid #e4e8ee;padding:4px 10px;
text-align:left;vertical-align:top}th{background:#eef1f5}table.sortable th{cursor:pointer}
table.sortable th[data-dir=asc]::after{content:" \\25B2"}table.sortable th[data-dir=desc]::after{content:" \\25BC"}
td.n{text-align:right;font-variant-numeric:tabular-nums}.kv td:first-child{color:#5a6570;white-space:nowrap}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-weight:600;font-size:12px}
.complete{background:#d7f5dd;color:#165c26}.failed{background:#fde0e0;color:#8a1c1c}.note{color:#5a6570}
pre{background:#f3f5f8;padding:8px;overflow:auto;max-height:420px;font-size:12px}code{font-size:12px}
.cards{display:flex;flex-wrap:wrap;gap:14px}.card{margin:0;border:1px solid #dde2e8;border-radius:6px;padding:8px;
background:#fafbfc}.card .panels{display:flex;flex-wrap:wrap;gap:8px}.panel{text-align:center;font-size:12px}
.panel img{display:block;max-width:300px;height:auto;image-rendering:auto}.card figcaption{font-size:12px;margin-top:4px}
.tag{font-size:11px;padding:0 6px;border-radius:8px;background:#e8eefc;margin-right:4px}.tag.review{background:#ffe3c2}
.filters button{margin:0 6px 10px 0;padding:3px 12px;border:1px solid #9aa7b5;border-radius:14px;background:#fff;
cursor:pointer}.filters button.on{background:#1d2b3a;color:#fff}
.charts{display:flex;flex-wrap:wrap;gap:16px}svg.hist{background:#fff;border:1px solid #e4e8ee}
svg.hist text{font-size:10px;fill:#39424c}svg.hist text.t{font-size:12px;font-weight:600}
svg.hist rect.bar{fill:#4a7fc1}svg.hist .axis{stroke:#7a8691}
"""

JS = """
(function () {
  function value(row, i) {
    var cell = row.cells[i];
    if (!cell) { return ""; }
    var v = cell.getAttribute("data-v");
    return v !== null ? parseFloat(v) : cell.textContent.trim().toLowerCase();
  }
  document.querySelectorAll("table.sortable th").forEach(function (th) {
    th.addEventListener("click", function () {
      var table = th.closest("table"), body = table.tBodies[0], i = th.cellIndex;
      var asc = th.getAttribute("data-dir") !== "asc";
      table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("data-dir"); });
      th.setAttribute("data-dir", asc ? "asc" : "desc");
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = value(a, i), y = value(b, i), r;
        if (typeof x === typeof y) { r = x < y ? -1 : (x > y ? 1 : 0); } else { r = typeof x === "number" ? -1 : 1; }
        return asc ? r : -r;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
  var buttons = document.querySelectorAll("#gallery .filters button");
  buttons.forEach(function (b) {
    b.addEventListener("click", function () {
      var f = b.getAttribute("data-filter");
      buttons.forEach(function (o) { o.classList.toggle("on", o === b); });
      document.querySelectorAll("#gallery .card").forEach(function (c) {
        var groups = " " + c.getAttribute("data-groups") + " ";
        c.hidden = f !== "all" && groups.indexOf(" " + f + " ") < 0;
      });
    });
  });
}());
"""


@dataclass(frozen=True)
class Raw:
    """Already-escaped HTML for a table cell."""

    html: str


@dataclass(frozen=True)
class Num:
    """A number shown with its own format (e.g. ``".1f"``, ``".1%"``), sorted by value."""

    value: float | None
    fmt: str


def _cell(v: Any) -> str:
    """A table cell: numbers right-aligned with a sort key (floats to 3 decimals, -1 AP as n/a)."""
    if isinstance(v, bool) or v is None:
        return f"<td>{'' if v is None else escape(str(v))}</td>"
    if isinstance(v, int):
        return f'<td class="n" data-v="{v}">{v:,}</td>'
    if isinstance(v, float):
        text = "n/a" if v == -1.0 else f"{v:.3f}"
        return f'<td class="n" data-v="{v:.6g}">{text}</td>'
    if isinstance(v, Raw):
        return f"<td>{v.html}</td>"
    if isinstance(v, Num):
        return "<td></td>" if v.value is None else f'<td class="n" data-v="{v.value:.6g}">{v.value:{v.fmt}}</td>'
    return f"<td>{escape(str(v))}</td>"


def table(headers: Sequence[str] | None, rows: Iterable[Sequence[Any]], *, sortable: bool = True, cls: str = "") -> str:
    """An HTML table (no header row when ``headers`` is None); cells are escaped unless wrapped in ``Raw``."""
    classes = " ".join(c for c in ("sortable" if sortable and headers else "", cls) if c)
    head = "" if headers is None else "<thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in headers) + "</tr></thead>"
    body = "".join("<tr>" + "".join(_cell(v) for v in r) + "</tr>" for r in rows)
    return f'<table class="{classes}">{head}<tbody>{body}</tbody></table>'


def kv(pairs: Iterable[tuple[str, Any]]) -> str:
    """A two-column key/value table; None values are left out."""
    return table(None, [(k, v) for k, v in pairs if v is not None], cls="kv")


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{escape(title)}</h2>{body}</section>'


def _note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def _card_ap(card: dict) -> str | None:
    for m in card.get("metrics") or []:
        if "AP" in (m.get("values") or {}):
            return f"{m['values']['AP']:.3f} ({m.get('split', '')})"
    return None


def summary(d: ReportData) -> str:
    m, c = d.run.manifest, d.run.manifest.get("counts") or {}
    status = m.get("status", "unknown")
    badge = f'<span class="badge {escape(status)}">{escape(status)}</span>'
    wall, ips = m.get("wall_s"), m.get("images_per_s")
    return _section("summary", "Summary", kv([
        ("run", m.get("run_id")), ("status", Raw(badge)), ("reason", m.get("reason")),
        ("started", m.get("started")), ("ended", m.get("ended")),
        ("wall time", f"{wall:.1f} s" if wall is not None else None),
        ("throughput", f"{ips:.2f} images/s" if ips is not None else None),
        ("images", f"{c.get('images', 0):,} ({c.get('ok', 0):,} ok, {c.get('errors', 0):,} errored)"),
        ("instances", f"{c.get('instances', 0):,} in instances/ ({d.run.source_label(d.run.result_source)})"),
        ("models", ", ".join(mm["version"] for mm in m.get("models", []))),
        ("output", d.run.uri),
    ]))


def provenance(d: ReportData) -> str:
    m = d.run.manifest
    rows = [("model", mm["name"], mm["version"], mm["card"].get("family", ""), mm["card"].get("paper", ""),
             _card_ap(mm["card"]) or "") for mm in m.get("models", [])]
    if m.get("refiner"):
        r = m["refiner"]
        rows.append(("refiner", r["name"], r["version"], r["card"].get("family", ""), r["card"].get("paper", ""),
                     _card_ap(r["card"]) or ""))
    code, env, inp = m.get("code") or {}, m.get("environment") or {}, m.get("input") or {}
    wf, src = m.get("workflow") or {}, m.get("source_run") or {}
    parts = [table(["role", "name", "version", "family", "paper", "card metric (AP)"], rows)]
    for title, pairs in [
        ("Code and environment", [("segpipe", code.get("segpipe_version")), ("git commit", code.get("git_commit")),
                                  ("python", env.get("python")), ("platform", env.get("platform")),
                                  ("device", env.get("device")), *sorted((env.get("packages") or {}).items())]),
        ("Input", [("uri", inp.get("uri")), ("files", inp.get("n_files")), ("shards", inp.get("n_shards")),
                   ("fingerprint", inp.get("fingerprint"))]),
        ("Source run", [("kind", m.get("kind")), ("run", src.get("run_id")), ("uri", src.get("uri"))]),
    ]:
        if any(v is not None for _, v in pairs):
            parts += [f"<h3>{escape(title)}</h3>", kv(pairs)]
    if wf:
        parts += ["<h3>Workflow</h3>", kv([("config sha256", wf.get("sha256"))]),
                  "<details><summary>resolved config</summary>"
                  f"<pre>{escape(json.dumps(wf.get('config'), indent=1))}</pre></details>"]
    elif m.get("ensemble"):
        parts += ["<h3>Ensemble settings</h3>", f"<pre>{escape(json.dumps(m['ensemble'], indent=1))}</pre>"]
    return _section("provenance", "Provenance", "".join(parts))


def counts(d: ReportData) -> str:
    c = d.run.manifest.get("counts") or {}
    by_type = sorted((c.get("errors_by_type") or {}).items(), key=lambda kv_: (-kv_[1], kv_[0]))
    parts = [kv([("images", c.get("images", 0)), ("ok", c.get("ok", 0)), ("errored", c.get("errors", 0)),
                 ("instances", c.get("instances", 0))])]
    if by_type:
        parts += ["<h3>Errors by type</h3>", table(["error type", "images"], by_type)]
    if d.errors:
        parts += [f"<h3>Errored inputs ({len(d.errors)} of {d.n_errors} listed)</h3>",
                  table(["uri", "stage", "error type", "message"],
                        [(e["uri"], e["stage"], e["error_type"], e["message"]) for e in d.errors])]
    elif not by_type:
        parts.append(_note("No input errored."))
    return _section("counts", "Counts", "".join(parts))


def _measure(key: str, v: Any) -> Any:
    """A manifest figure formatted by its name: *_ms whole milliseconds, *_s tenths of seconds,
    *efficiency / *utilization as percentages; anything else as it is."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return v
    for suffix, fmt in (("_ms", ",.0f"), ("_s", ",.1f"), ("efficiency", ".1%"), ("utilization", ".1%")):
        if key.endswith(suffix):
            return Num(float(v), fmt)
    return v


def throughput(d: ReportData) -> str:
    m = d.run.manifest
    ok = max(int((m.get("counts") or {}).get("ok", 0)), 1)
    stages = m.get("stages")
    if stages:
        rows = [(s["name"], s.get("kind"), s.get("workers"), s.get("images"), Num(s.get("busy_ms"), ",.0f"),
                 Num(s["busy_ms"] / max(int(s.get("images") or 0), 1) if s.get("busy_ms") is not None else None, ".1f"),
                 Num(s.get("forward_ms"), ",.0f"), Num(s.get("utilization"), ".1%")) for s in stages]
        body = table(["stage", "kind", "workers", "images", "busy ms", "busy ms / image", "forward ms", "utilization"],
                     rows)
    else:
        t = m.get("timings_ms") or {}
        total = sum(t.values()) or 1.0
        body = table(["stage", "summed ms", "ms / image", "share of stage time"],
                     [(k, Num(float(v), ",.0f"), Num(float(v) / ok, ".1f"), Num(float(v) / total, ".1%"))
                      for k, v in t.items()])
        body += _note("This run's manifest records summed time per stage only (no per-stage workers or utilization).")
    eff = m.get("efficiency")
    if eff:
        body += "<h3>Efficiency</h3>" + kv([(k.replace("_", " "), _measure(k, v)) for k, v in eff.items()])
    wall, ips = m.get("wall_s"), m.get("images_per_s")
    if wall is not None and ips is not None:
        body += _note(f"Wall time {wall:.1f} s, {ips:.2f} images/s (Ray start included).")
    return _section("throughput", "Throughput per stage", body)


def _ap_rows(rows: Sequence[tuple[str, dict]]) -> str:
    return table(["result", *AP_COLUMNS, "images", "predictions"],
                 [(name, *(float(st[k]) for k in AP_COLUMNS), int(st["n_images"]), int(st["n_predictions"]))
                  for name, st in rows])


def _per_category(rows: Sequence[tuple[str, dict]]) -> str:
    cats = list(dict.fromkeys(c for _, st in rows for c in st.get("per_category", {})))
    return table(["result", *cats], [(name, *(float(st["per_category"].get(c, -1.0)) for c in cats)) for name, st in rows])


def accuracy(d: ReportData) -> str:
    if d.ap:
        n_gt = d.ap[-1][1].get("n_gt_images")
        body = (_note(f"Mask AP against {d.gt} (pycocotools, maxDets {d.max_dets}; images matched by file name: "
                      f"{d.ap[-1][1]['n_images']} of {n_gt} ground-truth images).")
                + _ap_rows(d.ap) + "<h3>AP per category</h3>" + _per_category(d.ap))
    elif d.run.manifest.get("eval"):
        ev = d.run.manifest["eval"]
        rows = [(name, st) for name, st in (ev.get("per_model") or {}).items()]
        rows.append((d.run.source_label(d.run.result_source), ev))
        more = " and the ensemble before refinement" if d.run.is_ensemble and d.run.refined_by else ""
        body = _note(f"Recorded by the run itself (the workflow's eval.gt); pass --gt for another ground truth{more}.") \
            + _ap_rows(rows) + "<h3>AP per category</h3>" + _per_category(rows)
    else:
        body = _note("No ground truth: run `segpipe report RUN_DIR --gt GT.json` for AP tables.")
    return _section("accuracy", "Accuracy (mask AP)", body)


def _card(item: GalleryItem) -> str:
    tags = "".join(f'<span class="tag {g}">{g}</span>' for g in item.groups)
    panels = "".join(
        f'<div class="panel"><img src="{p.data_uri}" width="{p.width}" height="{p.height}" '
        f'alt="{escape(item.relpath)}: {escape(p.label)}"><div>{escape(p.label)} ({p.n_instances})</div></div>'
        for p in item.panels)
    dis = "" if item.disagreement is None else f", disagreement {item.disagreement:.3f}"
    return (f'<figure class="card" id="img-{item.image_id}" data-groups="{" ".join(item.groups)}">'
            f'<div class="panels">{panels}</div><figcaption>{tags}<b>{escape(item.relpath)}</b> '
            f'<code>{item.image_id}</code>{dis}</figcaption></figure>')


def gallery(d: ReportData) -> str:
    s, n_ok = d.settings, len(d.run.ok_images())
    n_sampled = sum("sample" in g.groups for g in d.gallery)
    n_shown_review = sum("review" in g.groups for g in d.gallery)
    lines = [f"{n_sampled} of {n_ok} ok images sampled evenly by id."]
    if d.disagreement is None:
        lines.append("Single-model run (no ensemble): no review queue, there is no disagreement to rank images by."
                     if len(d.run.model_names) <= 1 else
                     "This run did not fuse its models (no ensemble): no review queue.")
    else:
        n_dis = sum(v > 0 for v in d.disagreement.values())
        lines.append(f"Review queue: the {n_shown_review} images where the models disagree most ({n_dis} of {n_ok} "
                     "images have any disagreement: the score-weighted mean over an image's fused instances of "
                     "1 - agreement x votes / models, a lone vote counting as agreement 0), each shown with every "
                     "model's raw overlay.")
    lines.append(f"Overlays show instances scoring at least {s.get('min_score', 0):g}, downscaled to at most "
                 f"{s.get('max_side')} px, encoded as {s.get('format')}; the count in brackets is the instances shown.")
    buttons = ('<div class="filters"><button data-filter="all" class="on">all</button>'
               + ('<button data-filter="review">review queue</button>' if n_shown_review else "")
               + '<button data-filter="sample">sample</button></div>')
    body = "".join(_note(x) for x in lines) + buttons + '<div class="cards">' + "".join(map(_card, d.gallery)) + "</div>"
    if d.disagreement is not None and d.queue:
        shown = {g.image_id for g in d.gallery}
        by_id = {int(im["image_id"]): im for im in d.run.images}
        rows = [(k + 1, Raw(f'<a href="#img-{i}">{escape(by_id[i]["relpath"])}</a>' if i in shown
                            else escape(by_id[i]["relpath"])), str(i), d.disagreement[i], by_id[i]["n_instances"])
                for k, i in enumerate(d.queue)]
        n_dis = sum(v > 0 for v in d.disagreement.values())
        body += (f"<h3>Review queue ({len(d.queue)} of {n_dis} images listed)</h3>"
                 + table(["rank", "image", "image_id", "disagreement", "instances"], rows))
    return _section("gallery", "Gallery", body)


def histograms(d: ReportData) -> str:
    return _section("histograms", "Histograms", '<div class="charts">' + "".join(d.histograms) + "</div>")


def render(d: ReportData) -> str:
    """The whole page (UTF-8 HTML text)."""
    m = d.run.manifest
    nav = "".join(f'<a href="#{s}">{s}</a>' for s in SECTIONS)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>segpipe report: {escape(str(m.get('run_id')))}</title>"
            "<link rel=\"icon\" href=\"data:,\">"
            f"<style>{CSS}</style></head><body>"
            f"<header><h1>segpipe run report</h1><div class=\"sub\">run {escape(str(m.get('run_id')))} &middot; "
            f"generated {now}</div><nav>{nav}</nav></header><main>"
            + summary(d) + provenance(d) + counts(d) + throughput(d) + accuracy(d) + gallery(d) + histograms(d)
            + f"</main><script>{JS}</script></body></html>\n")
