//! The appliance console: every message goes to every active kernel console (the VM's screen
//! *and* its serial port), and an answer to a prompt is taken from whichever console types one.
//!
//! As init, stdout/stderr are redirected into a pipe that a thread copies to every console,
//! so output of the pairing/sync code and of busybox children reaches all of them too.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Writes to all consoles, reads lines from any.
#[derive(Debug)]
pub struct Console {
    outs: Arc<Mutex<Vec<File>>>,
    lines: Mutex<Receiver<String>>,
    stdio: bool,
    /// Every `say` line is appended here too; the pairing code appends its own lines to the
    /// same file, and a failure report ships its tail to the DR service.
    log: Option<PathBuf>,
}

/// The appliance's console log (in the /run tmpfs).
pub const LOG_FILE: &str = "/run/failback/console.log";

/// Names of the active kernel consoles (`ttyS0`, `tty0`, ...), from sysfs.
fn active_consoles() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_to_string("/sys/class/tty/console/active")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    names.dedup();
    names
}

impl Console {
    /// Plain stdin/stdout (when not running as init).
    pub fn stdio() -> Self {
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Console {
            outs: Arc::new(Mutex::new(Vec::new())),
            lines: Mutex::new(rx),
            stdio: true,
            log: None,
        }
    }

    /// Opens every active console (after /sys and /dev are mounted) and redirects this
    /// process's stdout and stderr to all of them.
    pub fn system() -> Self {
        let mut outs = Vec::new();
        let (tx, rx) = channel();
        let mut names = active_consoles();
        if names.is_empty() {
            names.push("console".into());
        }
        for name in names {
            let path = format!("/dev/{name}");
            let Ok(out) = File::options().read(true).write(true).open(&path) else {
                continue;
            };
            if let Ok(inp) = out.try_clone() {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for line in BufReader::new(inp).lines() {
                        let Ok(line) = line else { break };
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                });
            }
            outs.push(out);
        }
        let outs = Arc::new(Mutex::new(outs));
        super::system::tee_stdio(Arc::clone(&outs));
        Console {
            outs,
            lines: Mutex::new(rx),
            stdio: false,
            log: Some(PathBuf::from(LOG_FILE)),
        }
    }

    /// Prints one line on every console.
    pub fn say(&self, msg: &str) {
        let line = format!("failback: {msg}\n");
        self.raw(&line);
        if let Some(path) = &self.log {
            if let Ok(mut f) = File::options().create(true).append(true).open(path) {
                let stamp = httpdate::fmt_http_date(std::time::SystemTime::now());
                let _ = f.write_all(format!("{stamp} {line}").as_bytes());
            }
        }
    }

    /// Writes text as is.
    pub fn raw(&self, text: &str) {
        if self.stdio {
            let mut o = std::io::stdout().lock();
            let _ = o.write_all(text.as_bytes());
            let _ = o.flush();
            return;
        }
        if let Ok(mut outs) = self.outs.lock() {
            for o in outs.iter_mut() {
                let _ = o.write_all(text.as_bytes());
                let _ = o.flush();
            }
        }
    }

    /// Asks a question; returns the trimmed answer (the default on an empty line), or `None`
    /// when no console can answer (all closed) or `timeout` passed.
    pub fn ask(
        &self,
        question: &str,
        default: Option<&str>,
        timeout: Option<Duration>,
    ) -> Option<String> {
        let prompt = match default {
            Some(d) if !d.is_empty() => format!("{question} [{d}]: "),
            _ => format!("{question}: "),
        };
        // Drop stale lines typed before the question.
        let rx = self.lines.lock().ok()?;
        while rx.try_recv().is_ok() {}
        self.raw(&format!("FAILBACK_PROMPT {prompt}"));
        let line = match timeout {
            Some(t) => match rx.recv_timeout(t) {
                Ok(l) => l,
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
            },
            None => rx.recv().ok()?,
        };
        let line = line.trim().to_string();
        if line.is_empty() {
            default.map(str::to_string)
        } else {
            Some(line)
        }
    }

    /// Reads lines until one equals `end` (inclusive) or is empty after content; for pasting
    /// a PEM certificate.
    pub fn ask_block(&self, question: &str, end: &str) -> Option<String> {
        let rx = self.lines.lock().ok()?;
        while rx.try_recv().is_ok() {}
        self.raw(&format!("FAILBACK_PROMPT {question}:\n"));
        let mut text = String::new();
        loop {
            let line = rx.recv().ok()?;
            let line = line.trim();
            if line.is_empty() && !text.is_empty() {
                break;
            }
            if !line.is_empty() {
                text.push_str(line);
                text.push('\n');
            }
            if line == end {
                break;
            }
        }
        Some(text)
    }
}
