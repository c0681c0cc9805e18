//! Helpers of the console browser test and the console page bench: the real service on
//! 127.0.0.1, chromedriver + headless Chromium, polling waits.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use failback_tests::bin;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

pub const DEADLINE: Duration = Duration::from_secs(120);

/// A child process killed on drop, output in a log file.
pub struct Proc(pub Child, pub PathBuf);

impl Proc {
    pub fn spawn(cmd: &mut Command, log: &Path) -> Proc {
        let f = std::fs::File::create(log).unwrap();
        let child = cmd
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        Proc(child, log.to_path_buf())
    }
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.1).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn wait_file(p: &Path, proc: &Proc) -> String {
    let t = Instant::now();
    while !p.exists() {
        assert!(t.elapsed() < DEADLINE, "no {}: {}", p.display(), proc.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::read_to_string(p).unwrap()
}

/// A `failback-server` in its own data directory.
pub fn server(dir: &Path, name: &str, extra: &[&str]) -> (Proc, String) {
    let addr = dir.join(format!("{name}.addr"));
    let p = Proc::spawn(
        Command::new(bin("failback-server"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--admin-token",
                "test-admin-token",
            ])
            .args(["--heartbeat-secs", "1", "--agent-timeout-secs", "5"])
            .args(["--client-timeout-secs", "15", "--console-sample-secs", "1"])
            .arg("--data-dir")
            .arg(dir.join(name))
            .arg("--addr-file")
            .arg(&addr)
            .args(extra),
        &dir.join(format!("{name}.log")),
    );
    let a = wait_file(&addr, &p);
    (p, format!("https://{a}"))
}

pub fn cli(url: &str, ca: &Path, args: &[&str]) -> Value {
    let out = Command::new(bin("failback"))
        .args(args)
        .args(["--output", "json"])
        .env("FAILBACK_SERVER", url)
        .env("FAILBACK_ADMIN_TOKEN", "test-admin-token")
        .env("FAILBACK_CA", ca)
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

pub async fn browser(dir: &Path) -> (Proc, Client) {
    let port = failback_tests::free_port();
    let driver = Proc::spawn(
        Command::new("chromedriver").arg(format!("--port={port}")),
        &dir.join("chromedriver.log"),
    );
    let caps = json!({
        "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            // Root in CI: no sandbox. The service's certificate comes from its own CA.
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--ignore-certificate-errors", "--window-size=1280,900",
                     format!("--user-data-dir={}", dir.join("chromium").display())]
        }
    });
    let caps: serde_json::Map<String, Value> = caps.as_object().unwrap().clone();
    let t = Instant::now();
    loop {
        match ClientBuilder::rustls()
            .unwrap()
            .capabilities(caps.clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
        {
            Ok(c) => return (driver, c),
            Err(e) if t.elapsed() < Duration::from_secs(30) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(e) => panic!("chromedriver: {e}; log: {}", driver.log()),
        }
    }
}

/// Polls `css` until its text satisfies `pred` (elements replaced by a refresh are found
/// again); returns the text.
pub async fn wait_text(c: &Client, css: &str, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let t = Instant::now();
    let mut last = String::new();
    while t.elapsed() < DEADLINE {
        if let Ok(e) = c.find(Locator::Css(css)).await {
            if let Ok(s) = e.text().await {
                if pred(&s) {
                    return s;
                }
                last = s;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("waiting for {what} ({css}): last text {last:?}");
}

pub async fn click(c: &Client, css: &str) {
    let t = Instant::now();
    loop {
        match c.find(Locator::Css(css)).await {
            Ok(e) if e.click().await.is_ok() => return,
            _ if t.elapsed() < DEADLINE => tokio::time::sleep(Duration::from_millis(200)).await,
            r => panic!("click {css}: {:?}", r.err()),
        }
    }
}

pub async fn login(c: &Client, url: &str, secret: &str) {
    c.goto(&format!("{url}/console/login")).await.unwrap();
    c.find(Locator::Id("secret"))
        .await
        .unwrap()
        .send_keys(secret)
        .await
        .unwrap();
    click(c, "#login-button").await;
    wait_text(c, "#whoami", "logged in", |t| !t.is_empty()).await;
}

pub async fn path(c: &Client) -> String {
    c.current_url().await.unwrap().path().to_string()
}
