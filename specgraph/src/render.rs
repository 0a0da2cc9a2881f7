//! The page: one self-contained HTML file, the picture as inline SVG, its
//! style inline, and a small inline script (hover highlighting, and a
//! check by the browser's own layout that every node, edge and outcome
//! has a box inside the picture). It fetches nothing.
//!
//! Every drawn thing is an SVG `<g>` with data attributes, so a test or a
//! user's script can read the graph back from the DOM:
//! - `data-kind="speculation"`: a node, `data-spec-id`, `data-outcome`
//!   (`committed`, `aborted`, `open`, `conflict`), `data-lane`,
//!   `data-port` (the owner's, if known), `data-started`;
//! - `data-kind="join"`: an edge, `data-spec-id`, `data-lane`,
//!   `data-port`, `data-label`, `data-outcome`, `data-acked`;
//! - `data-kind="outcome"`: a bridge's decision, `data-spec-id`,
//!   `data-outcome`, `data-lane`, `data-port`;
//! - `data-kind="port-up"` (and the other bridge events): a tick.

use std::fmt::Write;

use crate::model::{Axis, Graph, Outcome, Place};

/// The most speculations drawn; past it they are counted, not drawn, so
/// a huge stream cannot make a page no browser opens.
pub const MAX_SPECS: usize = 5_000;
/// The most joins, outcomes and other events drawn, each.
pub const MAX_EDGES: usize = 20_000;

const PLOT_X0: f64 = 190.0;
const PLOT_W: f64 = 1000.0;
const WIDTH: f64 = PLOT_X0 + PLOT_W + 60.0;
const AXIS_H: f64 = 52.0;
const LANE_HEAD: f64 = 24.0;
/// The band at the top of a port's row, where joins and ticks land.
const ROW_TOP: f64 = 20.0;
const SLOT_H: f64 = 18.0;
const BAR_H: f64 = 12.0;

/// Escapes text for HTML content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Control characters have no business in a name; show them.
            c if c.is_control() => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

fn x(at: Place) -> f64 {
    PLOT_X0 + at.clamp(0.0, 1.0) * PLOT_W
}

/// µs as a short duration: `850 µs`, `12.5 ms`, `3.25 s`.
pub fn duration(us: u64) -> String {
    match us {
        0..1_000 => format!("{us} µs"),
        1_000..1_000_000 => format!("{} ms", trim(us as f64 / 1e3)),
        _ => format!("{} s", trim(us as f64 / 1e6)),
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// µs since the Unix epoch as UTC `YYYY-MM-DD HH:MM:SS.ffffff`.
/// Past the year 9999 (no clock of a bridge says that, but a stream may)
/// it prints the number.
pub fn utc(us: u64) -> String {
    // The end of 9999-12-31, which RFC 3339 (and humantime, whose
    // Display fails past it) can print.
    const MAX_US: u64 = 253_402_300_799_999_999;
    match std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_micros(us)) {
        // humantime prints RFC 3339 (`2026-12-03T14:55:00.123456Z`).
        Some(t) if us <= MAX_US => humantime::format_rfc3339_micros(t)
            .to_string()
            .replace('T', " ")
            .replace('Z', " UTC"),
        _ => format!("{us} µs after the Unix epoch"),
    }
}

/// A tick step of 1, 2 or 5 × 10^k µs that makes at most about 10 ticks.
fn tick_step(span: u64) -> u64 {
    let mut step = 1u64;
    loop {
        for m in [1, 2, 5] {
            let s = step.saturating_mul(m);
            if span / s <= 10 {
                return s;
            }
        }
        step = step.saturating_mul(10);
    }
}

/// The rows of the picture: per lane, per port, the speculations owned
/// there, each in a slot where it does not overlap another.
struct Layout {
    /// Per lane: its top, and per port (sorted) its row's top and slots.
    lanes: Vec<LaneLayout>,
    height: f64,
}

struct LaneLayout {
    top: f64,
    bottom: f64,
    rows: Vec<(u64, f64, usize)>,
}

impl Layout {
    fn row_top(&self, lane: usize, port: u64) -> Option<f64> {
        let l = self.lanes.get(lane)?;
        l.rows.iter().find(|r| r.0 == port).map(|r| r.1)
    }
}

/// A speculation's bar, from its start to its end (or the end of the
/// axis while open), at least wide enough for its label.
fn bar_span(start: Place, end: Option<Place>, label: &str) -> (f64, f64, f64) {
    let x0 = x(start);
    let x1 = x(end.unwrap_or(1.0)).max(x0 + 3.0);
    let label_end = x0 + 8.0 + 7.0 * label.len() as f64;
    (x0, x1, x1.max(label_end))
}

/// Renders the page.
pub fn page(g: &Graph, title: &str) -> String {
    let drawn_specs: Vec<_> = g.specs.values().take(MAX_SPECS).collect();

    // Slots: first fit along each row, in start order.
    let mut slot_of = std::collections::HashMap::new();
    let mut slots_per_row = std::collections::BTreeMap::<(usize, u64), Vec<f64>>::new();
    let mut by_start = drawn_specs.clone();
    by_start.sort_by(|a, b| a.start.total_cmp(&b.start).then(a.id.cmp(&b.id)));
    for s in &by_start {
        // A speculation whose owner's port is unknown sits on a row of
        // its own, `port ?` (u64::MAX).
        let row = (s.lane, s.port.unwrap_or(u64::MAX));
        let (x0, _, reach) = bar_span(s.start, s.end, &s.id.to_string());
        let ends = slots_per_row.entry(row).or_default();
        let slot = match ends.iter().position(|&e| e + 4.0 < x0) {
            Some(i) => i,
            None => {
                ends.push(0.0);
                ends.len() - 1
            }
        };
        ends[slot] = reach;
        slot_of.insert(s.id, slot);
    }
    let mut lanes = Vec::new();
    let mut y = AXIS_H;
    for (i, lane) in g.lanes.iter().enumerate() {
        let top = y;
        y += LANE_HEAD;
        let mut ports: Vec<u64> = lane.ports.iter().copied().collect();
        if slots_per_row.contains_key(&(i, u64::MAX)) {
            ports.push(u64::MAX);
        }
        let mut rows = Vec::new();
        for port in ports {
            let slots = slots_per_row.get(&(i, port)).map_or(0, Vec::len);
            rows.push((port, y, slots));
            y += ROW_TOP + SLOT_H * slots as f64 + 8.0;
        }
        if rows.is_empty() {
            y += 24.0;
        }
        y += 8.0;
        lanes.push(LaneLayout {
            top,
            bottom: y,
            rows,
        });
    }
    let layout = Layout {
        lanes,
        height: y + 10.0,
    };

    let mut svg = String::new();
    let h = layout.height;
    let _ = write!(
        svg,
        r#"<svg id="graph" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {h}" width="{WIDTH}" height="{h}" role="img" aria-label="speculation graph">
<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="context-stroke"/></marker></defs>
"#
    );
    axis(&mut svg, g, h);
    for (i, lane) in g.lanes.iter().enumerate() {
        let l = &layout.lanes[i];
        let _ = write!(
            svg,
            r#"<g class="lane" data-lane="{name}" data-events="{ev}"><rect class="lane-bg" x="0" y="{top}" width="{WIDTH}" height="{hh}"/><text class="lane-name" x="8" y="{ty}">{name}</text>"#,
            name = esc(&lane.name),
            ev = lane.events,
            top = l.top,
            hh = l.bottom - l.top,
            ty = l.top + 16.0,
        );
        if l.rows.is_empty() {
            let _ = write!(
                svg,
                r#"<text class="empty" x="{PLOT_X0}" y="{}">no bridge events</text>"#,
                l.top + 40.0
            );
        }
        for &(port, top, _) in &l.rows {
            let label = match port {
                u64::MAX => "owner's port ?".to_string(),
                p => lane.port_label(p),
            };
            let ly = top + ROW_TOP - 6.0;
            let _ = write!(
                svg,
                r#"<g class="port" data-port="{p}"><line class="lifeline" x1="{PLOT_X0}" x2="{x2}" y1="{ly}" y2="{ly}"/><text class="port-name" x="20" y="{ty}">{label}</text></g>"#,
                p = if port == u64::MAX {
                    "?".to_string()
                } else {
                    port.to_string()
                },
                x2 = PLOT_X0 + PLOT_W,
                ty = ly + 4.0,
                label = esc(&label),
            );
        }
        svg.push_str("</g>\n");
    }

    // Nodes.
    for s in &drawn_specs {
        let id = s.id.to_string();
        let row = s.port.unwrap_or(u64::MAX);
        let Some(top) = layout.row_top(s.lane, row) else {
            continue;
        };
        let slot = slot_of.get(&s.id).copied().unwrap_or(0);
        let by = top + ROW_TOP + SLOT_H * slot as f64;
        let (x0, x1, _) = bar_span(s.start, s.end, &id);
        let o = s.outcome.as_str();
        let mut tip = format!("speculation {id}: {o}");
        if !s.started {
            tip.push_str(" (its start is in no stream given)");
        }
        if !s.rolled_back.is_empty() {
            let _ = write!(tip, "; rolled back: {}", s.rolled_back.join(", "));
        }
        let _ = writeln!(
            svg,
            r#"<g class="spec o-{o}" data-kind="speculation" data-spec-id="{id}" data-outcome="{o}" data-lane="{lane}" data-port="{port}" data-started="{started}" data-rolled-back="{rb}"><title>{tip}</title><rect class="bar" x="{x0:.1}" y="{by:.1}" width="{w:.1}" height="{BAR_H}" rx="3"/><circle class="start" cx="{x0:.1}" cy="{cy:.1}" r="4"/><text class="spec-id" x="{tx:.1}" y="{ty:.1}">{id}</text></g>"#,
            lane = esc(&g.lanes[s.lane].name),
            port = s.port.map_or(String::new(), |p| p.to_string()),
            started = s.started,
            rb = esc(&s.rolled_back.join(" ")),
            tip = esc(&tip),
            w = x1 - x0,
            cy = by + BAR_H / 2.0,
            tx = x0 + 8.0,
            ty = by + BAR_H - 2.0,
        );
    }

    // Edges: from the node's start to the member's port at the join.
    let drawn_ids: std::collections::HashSet<_> = drawn_specs.iter().map(|s| s.id).collect();
    for j in g
        .joins
        .iter()
        .filter(|j| drawn_ids.contains(&j.id))
        .take(MAX_EDGES)
    {
        let Some(s) = g.specs.get(&j.id) else {
            continue;
        };
        let Some(stop) = layout.row_top(s.lane, s.port.unwrap_or(u64::MAX)) else {
            continue;
        };
        let Some(mtop) = layout.row_top(j.lane, j.port) else {
            continue;
        };
        let slot = slot_of.get(&j.id).copied().unwrap_or(0);
        let (sx, sy) = (
            x(s.start),
            stop + ROW_TOP + SLOT_H * slot as f64 + BAR_H / 2.0,
        );
        let (jx, jy) = (x(j.at), mtop + ROW_TOP - 6.0);
        let id = j.id.to_string();
        let o = s.outcome.as_str();
        let lane = &g.lanes[j.lane];
        let label = lane.port_label(j.port);
        let acked = match j.acked {
            Some(a) => format!(
                r#"<line class="member" x1="{jx:.1}" y1="{jy:.1}" x2="{:.1}" y2="{jy:.1}"/><circle class="ack" cx="{:.1}" cy="{jy:.1}" r="2.5"/>"#,
                x(a),
                x(a)
            ),
            None => String::new(),
        };
        let midy = (sy + jy) / 2.0;
        let tip = format!(
            "{label} on {} joined {id} ({o}){}",
            lane.name,
            if j.acked.is_some() {
                "; it acknowledged the outcome"
            } else {
                ""
            }
        );
        let _ = writeln!(
            svg,
            r#"<g class="join o-{o}" data-kind="join" data-spec-id="{id}" data-lane="{ln}" data-port="{port}" data-label="{lb}" data-outcome="{o}" data-acked="{ack}"><title>{tip}</title><path class="edge" d="M{sx:.1},{sy:.1} C{sx:.1},{midy:.1} {jx:.1},{midy:.1} {jx:.1},{jy:.1}" marker-end="url(#arrow)"/>{acked}<circle class="member-dot" cx="{jx:.1}" cy="{jy:.1}" r="4"/><text class="join-label" x="{lx:.1}" y="{lyy:.1}">{lb}</text></g>"#,
            ln = esc(&lane.name),
            port = j.port,
            lb = esc(&label),
            ack = j.acked.is_some(),
            tip = esc(&tip),
            lx = jx + 6.0,
            lyy = jy - 5.0,
        );
    }

    // Outcomes, as each bridge announced them.
    for d in g
        .decisions
        .iter()
        .filter(|d| drawn_ids.contains(&d.id))
        .take(MAX_EDGES)
    {
        let Some(top) = layout.row_top(d.lane, d.port) else {
            continue;
        };
        let (dx, dy) = (x(d.at), top + ROW_TOP - 6.0);
        let id = d.id.to_string();
        let o = d.outcome.as_str();
        let lane = &g.lanes[d.lane];
        let shape = match d.outcome {
            Outcome::Committed => format!("M{:.1},{:.1} l4,5 l8,-10", dx - 6.0, dy),
            _ => format!("M{:.1},{:.1} l10,10 m0,-10 l-10,10", dx - 5.0, dy - 5.0),
        };
        let _ = writeln!(
            svg,
            r#"<g class="decision o-{o}" data-kind="outcome" data-spec-id="{id}" data-outcome="{o}" data-lane="{ln}" data-port="{port}"><title>{tip}</title><circle class="decision-bg" cx="{dx:.1}" cy="{dy:.1}" r="8"/><path class="decision-mark" d="{shape}"/></g>"#,
            ln = esc(&lane.name),
            port = d.port,
            tip = esc(&format!(
                "{id} {o} on {} ({})",
                lane.name,
                lane.port_label(d.port)
            )),
        );
    }

    // Other bridge events: ticks on the port's row.
    for m in g.marks.iter().take(MAX_EDGES) {
        let Some(top) = layout.row_top(m.lane, m.port) else {
            continue;
        };
        let (mx, my) = (x(m.at), top + ROW_TOP - 6.0);
        let id = m.id.map_or(String::new(), |i| i.to_string());
        let lane = &g.lanes[m.lane];
        let mut tip = format!("{} on {} ({})", m.kind, lane.name, lane.port_label(m.port));
        if !id.is_empty() {
            let _ = write!(tip, ": {id}");
        }
        let _ = writeln!(
            svg,
            r#"<g class="mark k-{k}" data-kind="{k}" data-spec-id="{id}" data-lane="{ln}" data-port="{port}"><title>{tip}</title><rect x="{x0:.1}" y="{y0:.1}" width="2" height="14"/></g>"#,
            k = m.kind,
            ln = esc(&lane.name),
            port = m.port,
            tip = esc(&tip),
            x0 = mx - 1.0,
            y0 = my - 7.0,
        );
    }
    svg.push_str("</svg>\n");

    let mut html = String::new();
    let _ = write!(
        html,
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{t}</title>
<style>{CSS}</style></head>
<body>
<h1>{t}</h1>
"#,
        t = esc(title)
    );
    summary(&mut html, g, drawn_specs.len());
    html.push_str(&svg);
    let _ = write!(html, "<script>{JS}</script>\n</body></html>\n");
    html
}

fn axis(svg: &mut String, g: &Graph, h: f64) {
    let y = AXIS_H - 8.0;
    let _ = write!(
        svg,
        r#"<g class="axis"><line x1="{PLOT_X0}" x2="{x2}" y1="{y}" y2="{y}"/>"#,
        x2 = PLOT_X0 + PLOT_W
    );
    match g.axis {
        Axis::Time { t0, t1 } => {
            let span = t1 - t0;
            let step = tick_step(span.max(1));
            let mut t = 0u64;
            while t <= span {
                let tx = x(t as f64 / span.max(1) as f64);
                let _ = write!(
                    svg,
                    r#"<line class="grid" x1="{tx:.1}" x2="{tx:.1}" y1="{y}" y2="{h}"/><text class="tick" x="{tx:.1}" y="{ty}">+{d}</text>"#,
                    ty = y - 6.0,
                    d = duration(t),
                );
                t = match t.checked_add(step) {
                    Some(n) => n,
                    None => break,
                };
            }
            let _ = write!(
                svg,
                r#"<text class="axis-name" x="8" y="14">time from {}</text>"#,
                esc(&utc(t0))
            );
        }
        Axis::Order => {
            let _ = write!(
                svg,
                r#"<text class="axis-name" x="8" y="14">event order (no times): each lane from its first event to its last</text>"#
            );
        }
    }
    svg.push_str("</g>\n");
}

fn summary(html: &mut String, g: &Graph, drawn: usize) {
    let n = g.specs.len();
    let _ = write!(
        html,
        r#"<dl id="summary" data-speculations="{n}" data-committed="{c}" data-aborted="{a}" data-open="{op}" data-conflict="{cf}" data-joins="{j}" data-outcomes="{d}" data-lanes="{l}" data-malformed="{m}" data-lagged="{lg}">
<dt>bridges (lanes)</dt><dd>{lanes}</dd>
<dt>speculations</dt><dd>{n}: <span class="o-committed">{c} committed</span>, <span class="o-aborted">{a} aborted</span>, <span class="o-open">{op} open</span>{conflict}</dd>
<dt>joins</dt><dd>{j}</dd>
<dt>skipped lines</dt><dd id="malformed">{m} malformed</dd>
"#,
        c = g.count(Outcome::Committed),
        a = g.count(Outcome::Aborted),
        op = g.count(Outcome::Open),
        cf = g.count(Outcome::Conflict),
        j = g.joins.len(),
        d = g.decisions.len(),
        l = g.lanes.len(),
        m = g.malformed(),
        lg = g.lagged,
        lanes = esc(&g
            .lanes
            .iter()
            .map(|l| l.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")),
        conflict = match g.count(Outcome::Conflict) {
            0 => String::new(),
            k => format!(r#", <span class="o-conflict">{k} with streams that disagree</span>"#),
        },
    );
    if !g.vm_streams.is_empty() {
        let _ = writeln!(
            html,
            "<dt>VMM streams</dt><dd>{}</dd>\n",
            esc(&g.vm_streams.join(", "))
        );
    }
    let mut notes = g.notes.clone();
    if g.axis == Axis::Order {
        notes.push(
            "Some events carry no time: each lane is drawn in its own event order, and lanes are not aligned.".to_string(),
        );
    }
    if g.lagged > 0 {
        notes.push(format!(
            "The bridges dropped {} events for a slow reader: the picture misses them.",
            g.lagged
        ));
    }
    if g.vm_gaps > 0 {
        notes.push(format!("The VMM streams report {} gaps.", g.vm_gaps));
    }
    if drawn < g.specs.len() {
        notes.push(format!(
            "Only the first {drawn} speculations (by id) are drawn, of {}, with their joins and outcomes.",
            g.specs.len()
        ));
    }
    for (what, n) in [
        ("joins", g.joins.len()),
        ("outcomes", g.decisions.len()),
        ("other events", g.marks.len()),
    ] {
        if n > MAX_EDGES {
            notes.push(format!(
                "Only the first {MAX_EDGES} {what} are drawn, of {n}."
            ));
        }
    }
    if !g.unknown.is_empty() {
        let kinds: Vec<_> = g.unknown.iter().map(|(k, n)| format!("{k} ×{n}")).collect();
        notes.push(format!("Events of kinds not drawn: {}.", kinds.join(", ")));
    }
    if !g.vm_only.is_empty() {
        let ids: Vec<_> = g.vm_only.iter().take(20).map(|i| i.to_string()).collect();
        notes.push(format!(
            "{} speculations appear only in VMM streams, not drawn: {}{}.",
            g.vm_only.len(),
            ids.join(", "),
            if g.vm_only.len() > 20 { ", ..." } else { "" }
        ));
    }
    html.push_str("</dl>\n");
    for s in &g.skipped {
        let _ = write!(
            html,
            r#"<details class="skipped" data-input="{name}" data-malformed="{n}"><summary>{name}: {n} malformed lines skipped</summary><ul>"#,
            name = esc(&s.name),
            n = s.count
        );
        for e in &s.examples {
            let _ = write!(html, "<li>line {}: {}</li>", e.line, esc(&e.reason));
        }
        html.push_str("</ul></details>\n");
    }
    for n in notes {
        let _ = writeln!(html, r#"<p class="note">{}</p>"#, esc(&n));
    }
    html.push_str(
        r#"<p class="legend"><span class="o-committed">■ committed</span> <span class="o-aborted">■ aborted</span> <span class="o-open">■ open</span> · a bar is a speculation, from its start to its outcome (✓ or ✗ where a bridge announced it); an arrow is a join, from the speculation to the member's port, and a thin line after it lasts until the member acknowledged the outcome. Hover for details.</p>
<p id="drawn">(the browser's count of what it drew goes here)</p>"#,
    );
}

const CSS: &str = r#"
body{font:14px system-ui,sans-serif;margin:16px;color:#222}
h1{font-size:20px;margin:0 0 8px}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px;margin:0 0 8px}
dt{font-weight:600}dd{margin:0}
.note{color:#8a5a00;margin:2px 0}
.legend{color:#555}
svg{border:1px solid #ddd;background:#fff}
text{font:12px ui-monospace,monospace;fill:#333}
.lane-bg{fill:#fafafa;stroke:#ddd}
.lane:nth-of-type(even) .lane-bg{fill:#f3f6fa}
.lane-name{font-weight:700;font-size:13px}
.lifeline{stroke:#ccc;stroke-dasharray:2 3}
.axis line{stroke:#999}.axis .grid{stroke:#eee}
.tick{text-anchor:middle;fill:#777}
.spec .bar{stroke-width:1.5}
.spec.o-open .bar{stroke-dasharray:4 3;fill-opacity:.25}
.o-committed{color:#2e7d32;fill:#2e7d32;stroke:#2e7d32}
.o-aborted{color:#c62828;fill:#c62828;stroke:#c62828}
.o-open{color:#757575;fill:#9e9e9e;stroke:#757575}
.o-conflict{color:#6a1b9a;fill:#6a1b9a;stroke:#6a1b9a}
.spec .bar{fill-opacity:.35}
.spec text,.join text{stroke:none;fill:#222}
.edge{fill:none;stroke-width:1.5}
.member{stroke-width:3;stroke-opacity:.5}
.decision-bg{fill:#fff;stroke-width:1.5}
.decision-mark{fill:none;stroke-width:2.5}
.mark rect{fill:#555}
.mark.k-lease-expired rect,.mark.k-forged rect,.mark.k-refused rect{fill:#e65100}
.hl .bar,.hl .edge{stroke-width:3.5}
.dim{opacity:.25}
"#;

/// The page's script: hover highlighting, and a check by the browser's
/// layout that every drawn thing has a box inside the picture
/// (`data-visible`, and the counts in `#drawn`).
const JS: &str = r#"
(function(){
var svg=document.getElementById('graph');if(!svg)return;
var vb=svg.viewBox.baseVal,n={},all=svg.querySelectorAll('[data-kind]');
all.forEach(function(g){
 var b=g.getBBox(),k=g.getAttribute('data-kind');
 var inside=b.width>0&&b.height>0&&b.x>=vb.x&&b.y>=vb.y&&b.x+b.width<=vb.x+vb.width&&b.y+b.height<=vb.y+vb.height;
 g.setAttribute('data-bbox',[b.x,b.y,b.width,b.height].map(function(v){return v.toFixed(1)}).join(' '));
 g.setAttribute('data-visible',inside?'true':'false');
 n[k]=(n[k]||0)+(inside?1:0);
});
var out=document.getElementById('drawn'),parts=[];
Object.keys(n).sort().forEach(function(k){out.setAttribute('data-'+k,n[k]);parts.push(n[k]+' '+k);});
out.textContent='Drawn, as this browser laid it out: '+(parts.join(', ')||'nothing')+'.';
function mark(id,on){all.forEach(function(g){
 var same=g.getAttribute('data-spec-id')===id;
 g.classList.toggle('hl',on&&same);g.classList.toggle('dim',on&&!same);});}
svg.addEventListener('mouseover',function(e){var g=e.target.closest('[data-spec-id]');if(g&&g.getAttribute('data-spec-id'))mark(g.getAttribute('data-spec-id'),true);});
svg.addEventListener('mouseout',function(){mark('',false);});
})();
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{build, Input};
    use crate::parse::read_stream;

    #[test]
    fn durations_and_times_read_well() {
        assert_eq!(duration(0), "0 µs");
        assert_eq!(duration(850), "850 µs");
        assert_eq!(duration(12_500), "12.5 ms");
        assert_eq!(duration(3_250_000), "3.25 s");
        assert_eq!(utc(1_000_001), "1970-01-01 00:00:01.000001 UTC");
        assert_eq!(
            utc(253_402_300_799_999_999),
            "9999-12-31 23:59:59.999999 UTC"
        );
        assert_eq!(
            utc(u64::MAX),
            format!("{} µs after the Unix epoch", u64::MAX)
        );
        assert_eq!(tick_step(10), 1);
        assert_eq!(tick_step(95_000), 10_000);
        assert_eq!(tick_step(u64::MAX), 2_000_000_000_000_000_000);
    }

    #[test]
    fn a_huge_stream_is_drawn_in_part_and_says_so() {
        let mut text = String::new();
        for s in 1..=MAX_SPECS + 3 {
            text.push_str(&format!(
                "{{\"event\":\"started\",\"id\":\"1:{s}\",\"port\":1}}\n"
            ));
            text.push_str(&format!(
                "{{\"event\":\"joined\",\"id\":\"1:{s}\",\"port\":2}}\n"
            ));
        }
        let parsed = read_stream(text.as_bytes()).expect("slice");
        let g = build(&[Input {
            name: "br".into(),
            parsed,
        }]);
        let p = page(&g, "t");
        assert_eq!(p.matches(r#"data-kind="speculation""#).count(), MAX_SPECS);
        assert_eq!(p.matches(r#"data-kind="join""#).count(), MAX_SPECS);
        assert!(p.contains(&format!(
            "Only the first {MAX_SPECS} speculations (by id) are drawn, of {}",
            MAX_SPECS + 3
        )));
    }

    #[test]
    fn names_are_escaped() {
        assert_eq!(
            esc(r#"<a href="x">&'"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(esc("a\u{7}b"), "a\u{fffd}b");
        let parsed = read_stream(&b"{\"event\":\"port-up\",\"port\":1}\n"[..]).expect("slice");
        let g = build(&[Input {
            name: "<script>alert(1)</script>".into(),
            parsed,
        }]);
        let page = page(&g, "x</title><script>");
        assert!(!page.contains("<script>alert"), "{page}");
        assert_eq!(page.matches("<script>").count(), 1);
    }

    #[test]
    fn every_node_edge_and_outcome_is_in_the_page() {
        let text = r#"{"event":"started","id":"1:1","port":1,"us":0}
{"event":"joined","id":"1:1","port":2,"us":10}
{"event":"committed","id":"1:1","port":1,"us":20}
{"event":"started","id":"1:2","port":1,"us":30}
{"event":"joined","id":"1:2","port":2,"us":40}
{"event":"aborted","id":"1:2","port":1,"us":50}
{"event":"acked","id":"1:2","port":2,"us":60}
{"event":"port-down","port":2,"us":70}
"#;
        let parsed = read_stream(text.as_bytes()).expect("slice");
        let g = build(&[Input {
            name: "br".into(),
            parsed,
        }]);
        let p = page(&g, "t");
        assert_eq!(p.matches(r#"data-kind="speculation""#).count(), 2);
        assert_eq!(p.matches(r#"data-kind="join""#).count(), 2);
        assert_eq!(p.matches(r#"data-kind="outcome""#).count(), 2);
        assert_eq!(p.matches(r#"data-kind="port-down""#).count(), 1);
        assert!(p.contains(r#"data-spec-id="1:1" data-outcome="committed""#));
        assert!(p.contains(r#"data-spec-id="1:2" data-outcome="aborted""#));
        assert!(p.contains(r#"data-label="port 2" data-outcome="aborted" data-acked="true""#));
        // Nothing to fetch: the one address is the SVG namespace.
        assert_eq!(p.matches("http").count(), 1);
        assert!(!p.contains("src="), "nothing loaded");
    }
}
