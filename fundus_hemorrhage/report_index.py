"""index.html for a batch of segmented photos: each photo's thumbnail, its lesion counts per retinal quadrant and
ETDRS subfield, and its findings, linking its overlay, mask and report (segment.py writes it next to them).

Rendered with Jinja2 (autoescape: every text from a report or a file name is HTML-escaped); links are relative
file names, URL-quoted, so the folder can be moved or served as it is.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from jinja2 import Environment, select_autoescape

from .files import write_atomically
from .retinal_frame import ETDRS_SUBFIELDS, RETINAL_QUADRANTS

THUMBNAIL_WIDTH = 480  # px; the overlay's small copy, <stem>_thumb.jpg

TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Haemorrhage segmentation: {{ rows | length }} photos</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
td, th { border: 1px solid #ccc; padding: 0.4em; vertical-align: top; text-align: left; }
td.n { text-align: right; }
table.zones td, table.zones th { border: none; padding: 0 0.6em 0 0; font-size: 0.9em; }
.failed { color: #b00; }
.note { color: #555; font-size: 0.9em; max-width: 60em; }
img.thumb { width: {{ thumb_width }}px; max-width: 40vw; }
</style>
</head>
<body>
<h1>Haemorrhage segmentation</h1>
<p class="note">{{ rows | length }} photos, {{ failed }} failed. Decision support, not a diagnosis: counts of what
the segmentation found in each photo; distances and areas assume a disc diameter of 1.8 mm.</p>
<table id="photos">
<tr><th>Photo</th><th>Overlay</th><th>Lesions</th><th>Retinal quadrants</th><th>ETDRS subfields</th>
<th>Findings</th></tr>
{% for row in rows %}
<tr class="photo" data-name="{{ row.name }}">
<td>{{ row.name }}<br>
{% if row.ok %}Eye: {{ row.eye }}{% else %}<span class="failed">FAILED: {{ row.error }}</span>{% endif %}<br>
{% for kind, href in row.links %}<a href="{{ href }}">{{ kind }}</a> {% endfor %}</td>
<td>{% if row.thumb %}<a href="{{ row.overlay }}"><img class="thumb" src="{{ row.thumb }}"
  alt="overlay of {{ row.name }}"></a>{% endif %}</td>
<td class="n">{{ row.count }}</td>
<td>{% if row.quadrants %}<table class="zones">{% for name, n in row.quadrants %}
<tr><th>{{ name }}</th><td class="n">{{ n }}</td></tr>{% endfor %}</table>{% else %}{{ row.no_frame }}{% endif %}</td>
<td>{% if row.etdrs %}<table class="zones">{% for name, n in row.etdrs %}
<tr><th>{{ name }}</th><td class="n">{{ n }}</td></tr>{% endfor %}</table>{% endif %}</td>
<td>{{ row.findings }}{% for note in row.notes %}<br><span class="note">{{ note }}</span>{% endfor %}</td>
</tr>
{% endfor %}
</table>
{% if comparisons %}
<h2>Comparisons between visits</h2>
<p class="note">Follow-up registered to the baseline; only the field both photos show is compared. New lesions
yellow, resolved cyan, enlarged orange, shrunk blue, unchanged white.</p>
<table id="comparisons">
<tr><th>Baseline / follow-up</th><th>Difference</th><th>Changes</th><th>Compared field</th><th>Findings</th></tr>
{% for row in comparisons %}
<tr class="comparison" data-name="{{ row.name }}">
<td>{{ row.baseline }}<br>{{ row.follow_up }}<br>
{% if not row.ok %}<span class="failed">NOT COMPARED: {{ row.status }}: {{ row.reason }}</span><br>{% endif %}
{% for kind, href in row.links %}<a href="{{ href }}">{{ kind }}</a> {% endfor %}</td>
<td>{% if row.thumb %}<a href="{{ row.picture }}"><img class="thumb" src="{{ row.thumb }}"
  alt="difference picture of {{ row.name }}"></a>{% endif %}</td>
<td>{% if row.summary %}<table class="zones">{% for name, n in row.summary %}
<tr><th>{{ name }}</th><td class="n">{{ n }}</td></tr>{% endfor %}</table>{% endif %}</td>
<td>{{ row.overlap }}</td>
<td>{{ row.findings }}</td>
</tr>
{% endfor %}
</table>
{% endif %}
</body>
</html>
"""


def _href(name: str) -> str:
    return quote(name, safe="")  # a relative link: the file name, URL-quoted ('/' too, so it never leaves the folder)


def page_row(row: dict) -> dict:
    """The template's view of one photo. `row`: name, ok, error, report (schema 2.0), files (kind -> file name
    in the index's folder), notes."""
    report, files = row.get("report") or {}, row.get("files") or {}
    anatomy_reasons = report.get("anatomy_reasons") or {}
    quadrants, etdrs = report.get("retinal_quadrants"), report.get("etdrs")
    findings = report.get("findings") or {}
    return {
        "name": row["name"], "ok": row["ok"], "error": row.get("error", ""), "notes": row.get("notes", []),
        "eye": (report.get("eye") or {}).get("laterality", "unknown"),
        "count": (report.get("totals") or {}).get("count", "-") if row["ok"] else "-",
        "links": [(kind, _href(files[kind])) for kind in ("overlay", "mask", "lesions", "probability")
                  if kind in files],
        "thumb": _href(files["thumb"]) if "thumb" in files else None,
        "overlay": _href(files.get("overlay", files.get("thumb", ""))),
        "quadrants": [(q, quadrants[q]["count"]) for q in RETINAL_QUADRANTS] if quadrants else None,
        "etdrs": [(z, etdrs[z]["count"]) for z in ETDRS_SUBFIELDS] if etdrs else None,
        "no_frame": ("no retinal frame: " + (anatomy_reasons.get("optic_disc") or anatomy_reasons.get("fovea")
                                             or anatomy_reasons.get("retinal_frame") or "-")) if row["ok"] else "",
        "findings": findings.get("summary", ""),
    }


def comparison_row(row: dict) -> dict:
    """The template's view of one pair. `row`: name, baseline, follow_up (photo names), change (the change
    report), files (kind -> file name: side_by_side, difference, difference_thumb, change)."""
    change, files = row.get("change") or {}, row.get("files") or {}
    registration = change.get("registration") or {}
    findings = change.get("findings") or {}
    near = findings.get("lesions_within_1dd_of_fovea") or {}
    rule = findings.get("rule_4_2_1_hemorrhage_criterion_met") or {}
    overlap = (change.get("compared_field") or {}).get("overlap_fraction")
    return {
        "name": row["name"], "baseline": row["baseline"], "follow_up": row["follow_up"],
        "ok": change.get("status") == "ok", "status": registration.get("status", change.get("status", "error")),
        "reason": registration.get("reason") or change.get("error") or "",
        "links": [(kind.replace("_", " "), _href(files[kind])) for kind in ("side_by_side", "difference", "change")
                  if kind in files],
        "thumb": _href(files["difference_thumb"]) if "difference_thumb" in files else None,
        "picture": _href(files.get("difference", "")),
        "summary": list((change.get("summary") or {}).items()) or None,
        "overlap": f"{overlap:.0%} of the baseline's field" if overlap is not None else "-",
        "findings": (f"within 1 DD of the fovea: {near['baseline']['count']} -> {near['follow_up']['count']}; "
                     f"4-2-1 haemorrhage criterion: {'met' if rule.get('baseline') else 'not met'} -> "
                     f"{'met' if rule.get('follow_up') else 'not met'}") if near and rule else "",
    }


def render_index(rows: list[dict], comparisons: list[dict] = ()) -> str:
    """The page's HTML for the photos' rows (see `page_row`) and the pairs compared (see `comparison_row`)."""
    env = Environment(autoescape=select_autoescape(default=True, default_for_string=True))
    return env.from_string(TEMPLATE).render(rows=[page_row(r) for r in rows], thumb_width=THUMBNAIL_WIDTH,
                                            failed=sum(not r["ok"] for r in rows),
                                            comparisons=[comparison_row(r) for r in comparisons])


def write_index(folder: Path, rows: list[dict], comparisons: list[dict] = ()) -> Path:
    """Write folder/index.html (atomically) and return its path. Raises OSError when it cannot be written."""
    path = Path(folder) / "index.html"
    write_atomically(path, render_index(rows, comparisons))
    return path
