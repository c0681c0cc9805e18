//! Progress front ends for `failback_replication::Progress`: indicatif bars on a terminal
//! (one per disk + total, throughput, ETA), a plain line every few seconds on a serial console
//! or log, JSON lines for programs.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use failback_replication::{DiskReport, Progress};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Which front end to use.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum ProgressMode {
    /// Bars when stderr is a terminal, plain lines otherwise.
    Auto,
    /// A plain status line every few seconds on stderr.
    Plain,
    /// JSON lines on stdout (one object per event).
    Json,
}

/// Builds the front end for `mode`.
pub fn make(mode: ProgressMode) -> Arc<dyn Progress> {
    match mode {
        ProgressMode::Json => Arc::new(JsonProgress::default()),
        ProgressMode::Plain => Arc::new(PlainProgress::new(Duration::from_secs(5))),
        ProgressMode::Auto => {
            if std::io::stderr().is_terminal() {
                Arc::new(BarProgress::new())
            } else {
                Arc::new(PlainProgress::new(Duration::from_secs(5)))
            }
        }
    }
}

#[derive(Debug, Clone, Default)]
struct DiskState {
    total: u64,
    done: u64,
    fetched: u64,
    finished: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Human-readable bytes (binary units).
pub fn human(bytes: u64) -> String {
    human_f(bytes as f64)
}

fn human_f(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes:.0} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// indicatif bars: one per disk plus a total bar.
pub struct BarProgress {
    multi: MultiProgress,
    total: ProgressBar,
    bars: Mutex<BTreeMap<String, ProgressBar>>,
    fetched: Mutex<BTreeMap<String, u64>>,
}

impl BarProgress {
    pub fn new() -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(4));
        let total = multi.add(ProgressBar::new(0));
        total.set_style(style("total"));
        total.set_prefix("total");
        BarProgress {
            multi,
            total,
            bars: Mutex::new(BTreeMap::new()),
            fetched: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Default for BarProgress {
    fn default() -> Self {
        Self::new()
    }
}

fn style(_kind: &str) -> ProgressStyle {
    ProgressStyle::with_template(
        "{prefix:>10} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ")
}

impl Progress for BarProgress {
    fn disk_started(&self, disk: &str, total_bytes: u64) {
        let bar = self
            .multi
            .insert_before(&self.total, ProgressBar::new(total_bytes));
        bar.set_style(style("disk"));
        bar.set_prefix(disk.to_owned());
        lock(&self.bars).insert(disk.to_owned(), bar);
        self.total.inc_length(total_bytes);
    }
    fn disk_advanced(&self, disk: &str, compared: u64, fetched: u64) {
        if let Some(bar) = lock(&self.bars).get(disk) {
            bar.inc(compared);
            if fetched > 0 {
                let mut f = lock(&self.fetched);
                let v = f.entry(disk.to_owned()).or_default();
                *v += fetched;
                bar.set_message(format!("fetched {}", human(*v)));
            }
        }
        self.total.inc(compared);
    }
    fn disk_finished(&self, disk: &str, report: &DiskReport) {
        if let Some(bar) = lock(&self.bars).get(disk) {
            bar.finish_with_message(format!("done, {} differing", human(report.bytes_differing)));
        }
        let bars = lock(&self.bars);
        if bars.values().all(|b| b.is_finished()) {
            self.total.finish();
        }
    }
    fn message(&self, msg: &str) {
        let _ = self.multi.println(msg);
    }
}

/// A plain status line every `every` on stderr (serial consoles, logs).
pub struct PlainProgress {
    every: Duration,
    started: Instant,
    last: Mutex<Instant>,
    disks: Mutex<BTreeMap<String, DiskState>>,
}

impl PlainProgress {
    pub fn new(every: Duration) -> Self {
        let now = Instant::now();
        PlainProgress {
            every,
            started: now,
            last: Mutex::new(now),
            disks: Mutex::new(BTreeMap::new()),
        }
    }

    fn line(&self) -> String {
        let disks = lock(&self.disks);
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let (mut done, mut total) = (0u64, 0u64);
        let mut parts = Vec::new();
        for (name, d) in disks.iter() {
            done += d.done;
            total += d.total;
            let pct = if d.total == 0 {
                100.0
            } else {
                d.done as f64 * 100.0 / d.total as f64
            };
            parts.push(format!("{name} {pct:.0}% fetched {}", human(d.fetched)));
        }
        let rate = done as f64 / secs;
        let eta = if rate > 0.0 && total > done {
            format!("{:.0}s", (total - done) as f64 / rate)
        } else {
            "-".into()
        };
        format!(
            "progress: {} / {} ({}/s, ETA {eta}) | {}",
            human(done),
            human(total),
            human_f(rate),
            parts.join(" | ")
        )
    }
}

impl Progress for PlainProgress {
    fn disk_started(&self, disk: &str, total_bytes: u64) {
        lock(&self.disks).insert(
            disk.to_owned(),
            DiskState {
                total: total_bytes,
                ..Default::default()
            },
        );
        eprintln!("disk {disk}: started ({})", human(total_bytes));
    }
    fn disk_advanced(&self, disk: &str, compared: u64, fetched: u64) {
        if let Some(d) = lock(&self.disks).get_mut(disk) {
            d.done += compared;
            d.fetched += fetched;
        }
        let mut last = lock(&self.last);
        if last.elapsed() >= self.every {
            *last = Instant::now();
            drop(last);
            eprintln!("{}", self.line());
        }
    }
    fn disk_finished(&self, disk: &str, report: &DiskReport) {
        if let Some(d) = lock(&self.disks).get_mut(disk) {
            d.finished = true;
            d.done = d.total;
        }
        eprintln!(
            "disk {disk}: finished, {} differing, {} fetched, {:.1}s",
            human(report.bytes_differing),
            human(report.bytes_fetched),
            report.duration_secs
        );
    }
    fn message(&self, msg: &str) {
        eprintln!("{msg}");
    }
}

/// JSON lines on stdout: `{"event":"disk_started"|"progress"|"disk_finished"|"message",...}`.
/// `progress` events are emitted at most once a second per disk.
#[derive(Default)]
pub struct JsonProgress {
    disks: Mutex<BTreeMap<String, (DiskState, Option<Instant>)>>,
}

fn emit(v: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

impl Progress for JsonProgress {
    fn disk_started(&self, disk: &str, total_bytes: u64) {
        lock(&self.disks).insert(
            disk.to_owned(),
            (
                DiskState {
                    total: total_bytes,
                    ..Default::default()
                },
                None,
            ),
        );
        emit(
            serde_json::json!({"event": "disk_started", "disk": disk, "total_bytes": total_bytes}),
        );
    }
    fn disk_advanced(&self, disk: &str, compared: u64, fetched: u64) {
        let mut disks = lock(&self.disks);
        let Some((d, last)) = disks.get_mut(disk) else {
            return;
        };
        d.done += compared;
        d.fetched += fetched;
        if last.is_none_or(|l| l.elapsed() >= Duration::from_secs(1)) {
            *last = Some(Instant::now());
            emit(serde_json::json!({
                "event": "progress", "disk": disk, "done_bytes": d.done,
                "total_bytes": d.total, "fetched_bytes": d.fetched
            }));
        }
    }
    fn disk_finished(&self, disk: &str, report: &DiskReport) {
        emit(serde_json::json!({"event": "disk_finished", "disk": disk, "report": report}));
    }
    fn message(&self, msg: &str) {
        emit(serde_json::json!({"event": "message", "message": msg}));
    }
}
