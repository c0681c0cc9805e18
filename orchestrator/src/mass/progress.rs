//! Run progress as a trait: indicatif (one line per VM + a total line) on a terminal, plain
//! lines otherwise, nothing in tests.

use super::state::{Step, VmStatus};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Instant;

/// Receives run events. Called from many tasks at once.
pub trait RunProgress: Send + Sync {
    /// The run starts with these VMs (labels).
    fn start(&self, vms: &[String]);
    fn step(&self, vm: &str, step: Step);
    /// Replication progress of a VM (bytes verified so far, total bytes).
    fn bytes(&self, vm: &str, done: u64, total: u64);
    fn finished(&self, vm: &str, status: VmStatus, message: Option<&str>);
    /// A free-form line (warnings, retries).
    fn note(&self, vm: &str, message: &str);
}

/// Prints nothing.
#[derive(Debug, Default)]
pub struct NoProgress;

impl RunProgress for NoProgress {
    fn start(&self, _: &[String]) {}
    fn step(&self, _: &str, _: Step) {}
    fn bytes(&self, _: &str, _: u64, _: u64) {}
    fn finished(&self, _: &str, _: VmStatus, _: Option<&str>) {}
    fn note(&self, _: &str, _: &str) {}
}

/// Plain lines on stderr (logs, serial consoles, CI); byte updates at most every 10 s per VM.
#[derive(Debug, Default)]
pub struct PlainProgress {
    last_bytes: Mutex<HashMap<String, Instant>>,
    total: Mutex<(usize, usize)>,
}

impl RunProgress for PlainProgress {
    fn start(&self, vms: &[String]) {
        *self.total.lock().unwrap_or_else(|e| e.into_inner()) = (0, vms.len());
        eprintln!("mass failback: {} VM(s)", vms.len());
    }
    fn step(&self, vm: &str, step: Step) {
        eprintln!("[{vm}] {}", step.name());
    }
    fn bytes(&self, vm: &str, done: u64, total: u64) {
        let mut m = self.last_bytes.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if m.get(vm)
            .is_none_or(|t| now.duration_since(*t).as_secs() >= 10)
        {
            m.insert(vm.to_string(), now);
            eprintln!("[{vm}] {} / {} replicated", human(done), human(total));
        }
    }
    fn finished(&self, vm: &str, status: VmStatus, message: Option<&str>) {
        let mut t = self.total.lock().unwrap_or_else(|e| e.into_inner());
        t.0 += 1;
        let status = serde_json::to_value(status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        match message {
            Some(m) => eprintln!("[{vm}] {status}: {m} ({}/{} done)", t.0, t.1),
            None => eprintln!("[{vm}] {status} ({}/{} done)", t.0, t.1),
        }
    }
    fn note(&self, vm: &str, message: &str) {
        eprintln!("[{vm}] {message}");
    }
}

/// indicatif MultiProgress: one line per VM (step, bytes, rate) and a total line.
pub struct BarsProgress {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
    total: ProgressBar,
}

impl std::fmt::Debug for BarsProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BarsProgress")
    }
}

impl BarsProgress {
    pub fn new() -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let total = multi.add(ProgressBar::new(0));
        total.set_style(
            ProgressStyle::with_template("{prefix:>24} [{bar:30}] {pos}/{len} VMs {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        total.set_prefix("total");
        Self {
            multi,
            bars: Mutex::new(HashMap::new()),
            total,
        }
    }

    fn bar(&self, vm: &str) -> ProgressBar {
        let mut bars = self.bars.lock().unwrap_or_else(|e| e.into_inner());
        bars.entry(vm.to_string())
            .or_insert_with(|| {
                let b = self.multi.insert_before(&self.total, ProgressBar::new(0));
                b.set_style(
                    ProgressStyle::with_template(
                        "{prefix:>24} {msg:22} {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                let short: String = vm.chars().take(24).collect();
                b.set_prefix(short);
                b
            })
            .clone()
    }
}

impl Default for BarsProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl RunProgress for BarsProgress {
    fn start(&self, vms: &[String]) {
        self.total.set_length(vms.len() as u64);
        for vm in vms {
            self.bar(vm).set_message("pending");
        }
    }
    fn step(&self, vm: &str, step: Step) {
        self.bar(vm).set_message(step.name());
    }
    fn bytes(&self, vm: &str, done: u64, total: u64) {
        let b = self.bar(vm);
        b.set_length(total);
        b.set_position(done);
    }
    fn finished(&self, vm: &str, status: VmStatus, message: Option<&str>) {
        let b = self.bar(vm);
        let s = format!("{status:?}").to_lowercase();
        b.finish_with_message(s.clone());
        if let Some(m) = message {
            let _ = self.multi.println(format!("[{vm}] {s}: {m}"));
        }
        self.total.inc(1);
    }
    fn note(&self, vm: &str, message: &str) {
        let _ = self.multi.println(format!("[{vm}] {message}"));
    }
}

/// Bars on a terminal, plain lines otherwise.
pub fn auto() -> Box<dyn RunProgress> {
    if std::io::stderr().is_terminal() {
        Box::new(BarsProgress::new())
    } else {
        Box::new(PlainProgress::default())
    }
}

/// 1536 -> "1.5 KiB".
pub fn human(n: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}
