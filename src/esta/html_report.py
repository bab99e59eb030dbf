"""``report.html``: a run's palette as one self-contained page (no CDN, nothing fetched): the Pareto plot where every
stitch is a point to hover (name, cost, latency where profiled, score, updates, importance, deployed or not), the
deployed line, the anchors tuned alone and their probes, the per-pair curves, and a sortable table.

A Task turns its results into :class:`point` rows (``Task.report_points``); this module only draws them. The page
draws itself with a few lines of plain JavaScript into inline SVG. Opened as ``report.html#selftest`` it hovers
its first stitch and writes what it shows into ``<pre id="selftest">`` (what ``scripts/check_report.py`` reads
from headless Chromium); ``#hover`` only hovers, for a screenshot.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from .files import atomic_write


def profiled_latencies(out: Path) -> dict[int, float]:
    """Each stitch's profiled milliseconds, where the run's palette was profiled (``esta profile``)."""
    table = Path(out) / "palette" / "palette.json"
    try:
        rows = json.loads(table.read_text())["stitches"] if table.is_file() else []
    except (ValueError, KeyError, TypeError):
        return {}  # a damaged table only costs the report its latencies
    return {int(r["id"]): r["latency_ms"] for r in rows if r.get("latency_ms") is not None}


def report_curves(results: dict, metric: str) -> list[dict]:
    """The per-pair curves of a run's ``results["pairs"]`` (``esta.pairs``), as the page draws them."""
    return [{"label": f"{c['front_name']}\u2192{c['end_name']}", "spearman": c.get("spearman"),
             "points": [{"share": q["share"], "value": q[metric]} for q in c["points"] if q.get(metric) is not None]}
            for c in results.get("pairs", [])]


def route_of(row: dict) -> tuple[int, ...]:
    """The anchors a stitch row of results.json runs through, in order (a three-segment route has a middle one)."""
    return (row["front"], row["end"]) if row.get("mid") is None else (row["front"], row["mid"], row["end"])


def route_label(row: dict, pair_names: dict[tuple[int, int], str]) -> str:
    """The legend entry of a stitch row: its pair's names, or the anchors of a three-segment route in order."""
    route = route_of(row)
    return pair_names.get(route, "\u2192".join(map(str, route)))


def point(kind: str, name: str, cost: float, value: float | None, **extra) -> dict:
    """One thing on the plot: ``kind`` is "stitch", "anchor", "alone" (an anchor tuned alone) or "probe"."""
    return {"kind": kind, "name": name, "cost": cost, "value": value, **extra}


_STYLE = """
body{font:14px system-ui,sans-serif;margin:24px;color:#222}h1{font-size:20px}h2{font-size:16px;margin-top:28px}
#wrap{position:relative;display:inline-block}svg{background:#fff;border:1px solid #ddd}
.axis{stroke:#999}.grid{stroke:#eee}.label{font-size:11px;fill:#555}.title{font-size:12px;fill:#333}
.stitch{opacity:.7;cursor:pointer}.anchor{stroke:#000;stroke-width:1.2;cursor:pointer}
.deployed-ring{fill:none;stroke:#d62728;stroke-width:1.6}.deployed-line{fill:none;stroke:#d62728;stroke-width:1.5}
.ref{fill:none;stroke:#000;stroke-width:1.3;cursor:pointer}.hover{stroke:#000;stroke-width:2.5;opacity:1}
#tip{position:absolute;pointer-events:none;background:#fffbe6;border:1px solid #aa8;padding:6px 8px;
font-size:12px;white-space:pre;box-shadow:0 1px 4px rgba(0,0,0,.2)}
table{border-collapse:collapse;font-size:12px}th,td{border-bottom:1px solid #eee;padding:3px 8px;text-align:right}
th{cursor:pointer;background:#f6f6f6;position:sticky;top:0}td:first-child,th:first-child{text-align:left}
.legend{font-size:12px}.legend span{margin-right:14px}
"""

_SCRIPT = r"""
const D = JSON.parse(document.getElementById('data').textContent);
const P = D.points, W = 860, H = 480, M = {l: 64, r: 20, t: 16, b: 44};
const palette = ['#1f77b4','#ff7f0e','#2ca02c','#9467bd','#8c564b','#e377c2','#17becf','#bcbd22'];
const pairs = [...new Set(P.filter(p => p.kind === 'stitch').map(p => p.pair))];
const colour = p => p.kind === 'anchor' ? 'gold' : palette[pairs.indexOf(p.pair) % palette.length];
const ns = 'http://www.w3.org/2000/svg';
function el(name, attrs, parent) {
  const e = document.createElementNS(ns, name);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (parent) parent.appendChild(e);
  return e;
}
function fmt(v, digits) { return v === null || v === undefined ? '-' : (+v).toFixed(digits); }
const show = p => D.metric.scale * p.value;
function tipText(p) {
  const rows = [[p.name, ''], ['kind', p.kind], ['cost', fmt(p.cost / D.axis.scale, 4) + ' ' + D.axis.unit]];
  if (p.params !== undefined) rows.push(['parameters', (p.params / 1e6).toFixed(2) + ' M']);
  rows.push(['latency', p.latency_ms === null || p.latency_ms === undefined ? 'not profiled' : fmt(p.latency_ms, 2) + ' ms']);
  rows.push([D.metric.name, p.value === null ? 'not measured' : fmt(show(p), 2) + D.metric.unit]);
  if (p.updates !== undefined) rows.push(['updates', p.updates]);
  if (p.importance !== undefined) rows.push(['importance', p.importance === null ? '-' : (+p.importance).toExponential(2)]);
  if (p.kind === 'stitch' || p.kind === 'anchor') rows.push(['deployed', p.deployed ? 'yes' : 'no']);
  if (p.steps !== undefined) rows.push(['steps', p.steps]);
  return rows.map(r => r[1] === '' ? r[0] : r[0] + ': ' + r[1]).join('\n');
}
function scatter() {
  const svg = document.getElementById('pareto'), tip = document.getElementById('tip');
  const pts = P.filter(p => p.value !== null);
  const xs = pts.map(p => Math.log10(p.cost)), ys = pts.map(show);
  const x0 = Math.min(...xs) - 0.05, x1 = Math.max(...xs) + 0.05;
  const pad = (Math.max(...ys) - Math.min(...ys)) * 0.06 || 1, y0 = Math.min(...ys) - pad, y1 = Math.max(...ys) + pad;
  const X = p => M.l + (Math.log10(p.cost) - x0) / (x1 - x0) * (W - M.l - M.r);
  const Y = p => H - M.b - (show(p) - y0) / (y1 - y0) * (H - M.t - M.b);
  for (let i = 0; i <= 5; i++) {
    const v = y0 + (y1 - y0) * i / 5, y = H - M.b - i / 5 * (H - M.t - M.b);
    el('line', {x1: M.l, x2: W - M.r, y1: y, y2: y, class: 'grid'}, svg);
    el('text', {x: M.l - 6, y: y + 4, 'text-anchor': 'end', class: 'label'}, svg).textContent = v.toFixed(1);
    const c = Math.pow(10, x0 + (x1 - x0) * i / 5), x = M.l + i / 5 * (W - M.l - M.r);
    el('text', {x: x, y: H - M.b + 16, 'text-anchor': 'middle', class: 'label'}, svg).textContent =
      (c / D.axis.scale).toPrecision(3);
  }
  el('text', {x: (W + M.l) / 2, y: H - 8, 'text-anchor': 'middle', class: 'title'}, svg).textContent =
    D.axis.unit + ' (log scale)';
  el('text', {x: 14, y: H / 2, transform: `rotate(-90 14 ${H / 2})`, 'text-anchor': 'middle', class: 'title'}, svg)
    .textContent = D.metric.name + (D.metric.unit ? ' (' + D.metric.unit.trim() + ')' : '') +
    (D.metric.higher ? '' : ', lower is better');
  const dep = pts.filter(p => p.deployed && (p.kind === 'stitch' || p.kind === 'anchor')).sort((a, b) => a.cost - b.cost);
  if (dep.length > 1) el('polyline', {points: dep.map(p => X(p) + ',' + Y(p)).join(' '), class: 'deployed-line'}, svg);
  P.forEach((p, i) => {
    if (p.value === null) return;
    const x = X(p), y = Y(p);
    let e;
    if (p.kind === 'stitch') e = el('circle', {cx: x, cy: y, r: 4, fill: colour(p), class: 'stitch point'}, svg);
    else if (p.kind === 'anchor') e = el('circle', {cx: x, cy: y, r: 8, fill: 'gold', class: 'anchor point'}, svg);
    else if (p.kind === 'alone') e = el('path', {d: `M${x} ${y - 8}L${x + 8} ${y}L${x} ${y + 8}L${x - 8} ${y}Z`, class: 'ref point'}, svg);
    else e = el('rect', {x: x - 5, y: y - 5, width: 10, height: 10, class: 'ref point'}, svg);
    e.setAttribute('data-i', i);
    if (p.deployed) el('circle', {cx: x, cy: y, r: p.kind === 'anchor' ? 11 : 7, class: 'deployed-ring'}, svg);
    if (p.kind === 'anchor') el('text', {x: x + 10, y: y - 8, class: 'label'}, svg).textContent = p.label || p.name;
  });
  svg.addEventListener('mouseover', ev => {
    const i = ev.target.getAttribute && ev.target.getAttribute('data-i');
    if (i === null) return;
    svg.querySelectorAll('.hover').forEach(e => e.classList.remove('hover'));
    ev.target.classList.add('hover');
    tip.textContent = tipText(P[+i]);
    tip.hidden = false;
    const bx = ev.target.getBBox(), right = bx.x + bx.width + 12;
    tip.style.left = (right + tip.offsetWidth > W ? bx.x - tip.offsetWidth - 12 : right) + 'px';
    tip.style.top = Math.max(0, bx.y - 10) + 'px';
  });
  svg.addEventListener('mouseout', ev => { if (ev.target.getAttribute && ev.target.getAttribute('data-i') !== null) tip.hidden = true; });
}
function pairPlot() {
  const svg = document.getElementById('pairs'), w = 860, h = 300, m = {l: 64, r: 150, t: 14, b: 40};
  const curves = D.pairs.filter(c => c.points.length);
  if (!curves.length) { svg.remove(); return; }
  const ys = curves.flatMap(c => c.points.map(q => D.metric.scale * q.value));
  const y0 = Math.min(...ys) - 1, y1 = Math.max(...ys) + 1;
  const X = s => m.l + s * (w - m.l - m.r), Y = v => h - m.b - (D.metric.scale * v - y0) / (y1 - y0) * (h - m.t - m.b);
  for (let i = 0; i <= 4; i++) {
    const y = h - m.b - i / 4 * (h - m.t - m.b);
    el('line', {x1: m.l, x2: w - m.r, y1: y, y2: y, class: 'grid'}, svg);
    el('text', {x: m.l - 6, y: y + 4, 'text-anchor': 'end', class: 'label'}, svg).textContent = (y0 + (y1 - y0) * i / 4).toFixed(1);
    el('text', {x: X(i / 4), y: h - m.b + 16, 'text-anchor': 'middle', class: 'label'}, svg).textContent = (i / 4).toFixed(2);
  }
  el('text', {x: (w - m.r + m.l) / 2, y: h - 6, 'text-anchor': 'middle', class: 'title'}, svg).textContent =
    "share of the end anchor's blocks";
  curves.forEach((c, k) => {
    const col = palette[k % palette.length], pts = c.points.slice().sort((a, b) => a.share - b.share);
    el('polyline', {points: pts.map(q => X(q.share) + ',' + Y(q.value)).join(' '), fill: 'none', stroke: col}, svg);
    pts.forEach(q => el('circle', {cx: X(q.share), cy: Y(q.value), r: 3, fill: col}, svg));
    el('text', {x: w - m.r + 8, y: m.t + 16 * k + 10, fill: col, class: 'label'}, svg).textContent =
      c.label + (c.spearman === null ? '' : ', Spearman ' + c.spearman.toFixed(2));
  });
}
function table() {
  const cols = [['name', 'name'], ['kind', 'kind'], ['pair', 'pair'], ['cost', D.axis.unit], ['latency_ms', 'ms'],
                ['value', D.metric.name], ['updates', 'updates'], ['importance', 'importance'], ['deployed', 'deployed']];
  const t = document.getElementById('table'), head = el('tr', {}), body = document.createElement('tbody');
  const cell = (p, k) => k === 'cost' ? (p.cost / D.axis.scale).toPrecision(4) : k === 'value' ?
    (p.value === null ? '-' : fmt(show(p), 2)) : k === 'importance' ? (p.importance == null ? '-' : (+p.importance).toExponential(2)) :
    k === 'deployed' ? (p.deployed ? 'yes' : '') : k === 'latency_ms' ? fmt(p.latency_ms, 2) : (p[k] ?? '');
  let order = [0, 1];
  function fill() {
    body.innerHTML = '';
    const [c, dir] = order, k = cols[c][0];
    const rows = P.slice().sort((a, b) => {
      const u = k === 'value' ? a.value : a[k], v = k === 'value' ? b.value : b[k];
      return (u === v ? 0 : u === null || u === undefined ? 1 : v === null || v === undefined ? -1 : u < v ? -1 : 1) * dir;
    });
    rows.forEach(p => { const tr = document.createElement('tr'); cols.forEach(([k]) => {
      const td = document.createElement('td'); td.textContent = cell(p, k); tr.appendChild(td); }); body.appendChild(tr); });
  }
  cols.forEach(([k, label], c) => { const th = document.createElement('th'); th.textContent = label;
    th.onclick = () => { order = [c, order[0] === c ? -order[1] : 1]; fill(); }; head.appendChild(th); });
  const thead = document.createElement('thead'); thead.appendChild(head); t.appendChild(thead); t.appendChild(body);
  fill();
}
scatter(); pairPlot(); table();
if (location.hash === '#selftest' || location.hash === '#hover') {
  const all = document.querySelectorAll('#pareto .point'), stitches = document.querySelectorAll('#pareto .stitch');
  const target = stitches[Math.floor(stitches.length / 2)] || all[0];
  target.dispatchEvent(new MouseEvent('mouseover', {bubbles: true}));
  if (location.hash === '#selftest') {
    const out = document.getElementById('selftest');
    out.textContent = JSON.stringify({points: all.length, stitches: document.querySelectorAll('#pareto .stitch, #pareto .anchor').length,
      rows: document.querySelectorAll('#table tbody tr').length, hovered: P[+target.getAttribute('data-i')].name,
      tooltip: document.getElementById('tip').textContent, tooltip_visible: !document.getElementById('tip').hidden});
    out.hidden = false;
  }
}
"""


def write_html_report(out: Path, title: str, summary: str, points: list[dict], pairs: list[dict], metric,
                      axis) -> Path:
    """Write ``out/report.html``. ``metric`` and ``axis``: the run's (``esta.results.Metric``,
    ``esta.budget.CostAxis``); ``pairs``: per-pair curves ``{label, spearman, points: [{share, value}]}``."""
    data = {"points": points, "pairs": pairs,
            "metric": {"name": metric.name, "scale": metric.scale, "higher": metric.higher_is_better,
                       "unit": " %" if metric.scale == 100 else ""},
            "axis": {"key": axis.key, "scale": axis.scale, "unit": axis.unit}}
    blob = json.dumps(data).replace("</", "<\\/")  # nothing in the data can close the script element
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>{html.escape(summary)}</p>
<p class="legend"><span>&#9679; stitches (colour: anchor pair)</span><span>&#11044; anchors in the palette (gold)</span>
<span>&#9711; deployed (red ring, joined by the red line)</span><span>&#9671; anchors tuned alone</span>
<span>&#9633; linear probes</span>. Hover a point for its numbers; click a column to sort the table.</p>
<div id="wrap"><svg id="pareto" width="860" height="480"></svg><div id="tip" hidden></div></div>
<h2>Per anchor pair: score against the share of the end anchor</h2>
<svg id="pairs" width="860" height="300"></svg>
<h2>Every network</h2>
<table id="table"></table>
<pre id="selftest" hidden></pre>
<script type="application/json" id="data">{blob}</script>
<script>{_SCRIPT}</script>
</body></html>
"""
    path = Path(out) / "report.html"
    atomic_write(path, lambda p: Path(p).write_text(page, encoding="utf-8"))
    return path
