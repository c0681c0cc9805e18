//! Charts as inline SVG drawn on the server (no script, no library): an instance's compare
//! rate and backlog over time, and the fleet's instances per failback state over time.
//! Colours are SVG presentation attributes, which the console's CSP allows.

use maud::{html, Markup};

use super::fmt::{bytes, state_label, whole};
use super::samples::{FleetSample, RatePoint, STATES};

const W: f64 = 640.0;
const H: f64 = 150.0;
const PAD: f64 = 4.0;
/// Columns drawn at most (samples are thinned to this).
const MAX_COLUMNS: usize = 160;

/// Colour of each state in [`STATES`] order.
pub const STATE_COLOURS: [&str; 6] = [
    "#9aa0a6", "#4f8ef7", "#e8a33d", "#2fa84f", "#1b5e20", "#d93025",
];

fn span(first: u64, last: u64) -> String {
    let s = last.saturating_sub(first);
    if s >= 3600 {
        format!("last {:.1} h", s as f64 / 3600.0)
    } else if s >= 60 {
        format!("last {} min", s / 60)
    } else {
        format!("last {s} s")
    }
}

fn x_of(at: u64, first: u64, last: u64) -> f64 {
    let w = last.saturating_sub(first).max(1) as f64;
    PAD + (at.saturating_sub(first) as f64 / w) * (W - 2.0 * PAD)
}

fn y_of(v: f64, max: f64) -> f64 {
    H - PAD - (v / max.max(1.0)) * (H - 2.0 * PAD)
}

fn points(
    p: &[RatePoint],
    first: u64,
    last: u64,
    f: impl Fn(&RatePoint) -> f64,
    max: f64,
) -> String {
    p.iter()
        .map(|r| format!("{:.1},{:.1}", x_of(r.at, first, last), y_of(f(r), max)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Compare rate (blue) and backlog (orange) of one instance.
pub fn instance(p: &[RatePoint]) -> Markup {
    if p.len() < 2 {
        return html! { p.muted { "The chart appears after two samples." } };
    }
    let (first, last) = (p[0].at, p[p.len() - 1].at);
    let rmax = p.iter().map(|r| r.rate).fold(0.0, f64::max);
    let bmax = p.iter().map(|r| r.backlog as f64).fold(0.0, f64::max);
    html! {
        figure.chart {
            svg id="throughput-chart" viewBox=(format!("0 0 {W} {H}")) width="100%" height="150"
                role="img" aria-label="compare rate and backlog over time" {
                rect x="0" y="0" width=(W) height=(H) fill="#fbfbfd" stroke="#d0d4da" {}
                polyline points=(points(p, first, last, |r| r.backlog as f64, bmax))
                    fill="none" stroke="#e8a33d" stroke-width="2" {}
                polyline points=(points(p, first, last, |r| r.rate, rmax))
                    fill="none" stroke="#4f8ef7" stroke-width="2" {}
            }
            figcaption {
                span.key-rate { "■" } " rate (max " (bytes(whole(rmax))) "/s)  "
                span.key-backlog { "■" } " backlog (max " (bytes(whole(bmax))) ")  · "
                (span(first, last))
            }
        }
    }
}

/// Instances per state over time, stacked.
pub fn fleet(samples: &[FleetSample]) -> Markup {
    if samples.is_empty() {
        return html! { p.muted { "The fleet chart appears after the first sample." } };
    }
    let step = samples.len().div_ceil(MAX_COLUMNS).max(1);
    let cols: Vec<&FleetSample> = samples.iter().step_by(step).collect();
    let total = cols
        .iter()
        .map(|s| s.counts.iter().sum::<u32>())
        .max()
        .unwrap_or(0)
        .max(1);
    let total = f64::from(total);
    let cw = (W - 2.0 * PAD) / cols.len() as f64;
    let (first, last) = (cols[0].at, cols[cols.len() - 1].at);
    let mut rects = Vec::new();
    for (c, s) in cols.iter().enumerate() {
        let x = PAD + c as f64 * cw;
        let mut y = H - PAD;
        for (k, n) in s.counts.iter().enumerate().filter(|(_, n)| **n > 0) {
            let h = f64::from(*n) / total * (H - 2.0 * PAD);
            y -= h;
            rects.push((x, y, h, STATE_COLOURS[k]));
        }
    }
    html! {
        figure.chart {
            svg id="fleet-chart" viewBox=(format!("0 0 {W} {H}")) width="100%" height="150"
                role="img" aria-label="instances per failback state over time" {
                rect x="0" y="0" width=(W) height=(H) fill="#fbfbfd" stroke="#d0d4da" {}
                @for (x, y, h, colour) in &rects {
                    rect x=(format!("{x:.1}")) y=(format!("{y:.1}"))
                        width=(format!("{:.1}", cw.max(1.0))) height=(format!("{h:.1}"))
                        fill=(colour) {}
                }
            }
            figcaption {
                @for (k, st) in STATES.iter().enumerate() {
                    span class=(format!("key-state-{k}")) { "■" } " " (state_label(*st)) "  "
                }
                "· " (span(first, last)) " · max " (whole(total)) " instances"
            }
        }
    }
}
