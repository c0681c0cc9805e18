//! The web console in a real browser: Debian's headless Chromium driven over WebDriver
//! (chromium-driver) against the real `failback-server`, `failback-agent` and
//! `failback-client` on 127.0.0.1. One browser session runs every check in order; the main
//! pages are saved as screenshots in docs/console/ (for the README). No timing assertions:
//! every wait polls with a generous deadline.

mod console_support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use console_support::*;
use failback_tests::bin;
use fantoccini::{Client, Locator};
use serde_json::json;

const MIB: usize = 1 << 20;
/// Markup in an instance name: must show as text, never run.
const EVIL_NAME: &str = "<img src=x onerror=pwned=1>srv-1";

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/console");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

/// POSTs a form from the page (same origin, with the session cookie); returns the status.
async fn post_from_page(c: &Client, path: &str, body: &str) -> u64 {
    let r = c
        .execute_async(
            "const [p, b, done] = arguments;
             fetch(p, {method: 'POST', body: b, credentials: 'same-origin',
                        headers: {'Content-Type': 'application/x-www-form-urlencoded'}})
               .then(r => done(r.status), e => done(String(e)));",
            vec![json!(path), json!(body)],
        )
        .await
        .unwrap();
    r.as_u64().unwrap_or_else(|| panic!("fetch {path}: {r}"))
}

async fn csrf(c: &Client) -> String {
    c.find(Locator::Css("input[name=csrf]"))
        .await
        .unwrap()
        .attr("value")
        .await
        .unwrap()
        .unwrap()
}

async fn token_from_page(c: &Client, url: &str, kind: &str, instance: Option<&str>) -> String {
    c.goto(&format!("{url}/console/tokens")).await.unwrap();
    c.find(Locator::Id("token-kind"))
        .await
        .unwrap()
        .select_by_value(kind)
        .await
        .unwrap();
    if let Some(i) = instance {
        c.find(Locator::Id("token-instance"))
            .await
            .unwrap()
            .select_by_value(i)
            .await
            .unwrap();
    }
    click(c, "#create-token").await;
    let e = c
        .wait()
        .at_most(DEADLINE)
        .for_element(Locator::Id("new-token"))
        .await
        .unwrap();
    e.prop("value").await.unwrap().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_in_chromium_login_pair_launch_roles_csp_csrf_expiry() {
    // fantoccini's and reqwest's rustls: both features (ring, aws-lc-rs) are in the build.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (_server, url) = server(dir, "data", &[]);
    let ca = dir.join("data/ca.pem");
    let op = cli(
        &url,
        &ca,
        &[
            "credentials",
            "create",
            "--role",
            "operator",
            "--name",
            "op",
        ],
    );
    let viewer = cli(
        &url,
        &ca,
        &[
            "credentials",
            "create",
            "--role",
            "viewer",
            "--name",
            "watcher",
        ],
    );
    let (op, viewer) = (
        op["secret"].as_str().unwrap(),
        viewer["secret"].as_str().unwrap(),
    );
    let (_driver, c) = browser(dir).await;

    // Not logged in: the login page; a wrong secret is refused.
    c.goto(&format!("{url}/console/instances")).await.unwrap();
    assert_eq!(path(&c).await, "/console/login");
    c.find(Locator::Id("secret"))
        .await
        .unwrap()
        .send_keys("fbcr_wrong")
        .await
        .unwrap();
    click(&c, "#login-button").await;
    wait_text(&c, "#login-error", "refusal", |t| {
        t.contains("not recognised")
    })
    .await;
    shot(&c, "login").await;

    // Operator: agent token from the tokens page; the agent enrolls and its row appears on
    // the open instances page without a reload.
    login(&c, &url, op).await;
    assert!(c
        .find(Locator::Id("whoami"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
        .contains("operator"));
    let at = token_from_page(&c, &url, "agent", None).await;
    assert!(at.starts_with("fba_"), "{at}");
    let remote = dir.join("remote.img");
    let local = dir.join("local.img");
    let data: Vec<u8> = (0..16 * MIB)
        .map(|i| u8::try_from(i * 7 % 251).unwrap())
        .collect();
    std::fs::write(&remote, &data).unwrap();
    std::fs::write(&local, vec![0u8; 16 * MIB]).unwrap();
    c.goto(&format!("{url}/console/instances")).await.unwrap();
    let agent = Proc::spawn(
        Command::new(bin("failback-agent"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--server",
                &url,
                "--enroll-token",
                &at,
            ])
            .arg("--disk")
            .arg(format!("disk0={}", remote.display()))
            .arg("--ca")
            .arg(&ca)
            .arg("--state-dir")
            .arg(dir.join("agent-state")),
        &dir.join("agent.log"),
    );
    let row = wait_text(&c, "#instances tbody tr", "the enrolled agent's row", |t| {
        t.contains("NOT STARTED")
    })
    .await;
    let id = c
        .find(Locator::Css("#instances tbody tr"))
        .await
        .unwrap()
        .attr("data-id")
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{row}: {}", agent.log()));
    assert_eq!(
        path(&c).await,
        "/console/instances",
        "no navigation happened"
    );

    // Markup in the instance name is text; its onerror never runs; an injected inline
    // script is blocked by the CSP.
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap())
        .build()
        .unwrap();
    let r = http
        .put(format!("{url}/v1/admin/instances/{id}/config"))
        .bearer_auth("test-admin-token")
        .json(&json!({"name": EVIL_NAME}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{r:?}");
    wait_text(&c, "#instances td.name", "the name as text", |t| {
        t == EVIL_NAME
    })
    .await;
    c.execute(
        "window.violations = [];
         document.addEventListener('securitypolicyviolation', e => window.violations.push(e.violatedDirective));
         const s = document.createElement('script');
         s.textContent = 'window.injected = 1';
         document.body.appendChild(s);",
        vec![],
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let v = c
        .execute(
            "return [typeof window.pwned, typeof window.injected, window.violations];",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(v[0], "undefined", "markup in a name ran: {v}");
    assert_eq!(v[1], "undefined", "an inline script ran: {v}");
    assert!(
        v[2].as_array()
            .unwrap()
            .iter()
            .any(|d| d.as_str().unwrap().starts_with("script-src")),
        "no CSP violation reported: {v}"
    );

    // Pairing token scoped to the instance; the host client pairs; the detail page shows
    // it progress to READY with per-disk bars and the chart.
    let pt = token_from_page(&c, &url, "pairing", Some(&id)).await;
    assert!(pt.starts_with("fbp_"), "{pt}");
    let mut client = Proc::spawn(
        Command::new(bin("failback-client"))
            .args([
                "run",
                "--server",
                &url,
                "--token",
                &pt,
                "--delta-interval-secs",
                "1",
            ])
            .args(["--retry-secs", "1"])
            .arg("--ca")
            .arg(&ca)
            .arg("--map")
            .arg(format!("disk0={}", local.display())),
        &dir.join("client.log"),
    );
    c.goto(&format!("{url}/console/instances/{id}"))
        .await
        .unwrap();
    wait_text(&c, "#state", "READY", |t| t.contains("READY FOR LAUNCH")).await;
    wait_text(&c, "#disks tbody", "disk row", |t| t.contains("16.0 MiB")).await;
    c.wait()
        .at_most(DEADLINE)
        .for_element(Locator::Id("throughput-chart"))
        .await
        .unwrap();
    shot(&c, "instance").await;
    c.goto(&format!("{url}/console/instances")).await.unwrap();
    c.wait()
        .at_most(DEADLINE)
        .for_element(Locator::Id("fleet-chart"))
        .await
        .unwrap();
    wait_text(&c, "#counts", "counts", |t| {
        t.contains("1 READY FOR LAUNCH")
    })
    .await;
    shot(&c, "instances").await;

    // Launch from the page: select, confirm (the page names the instance), result.
    click(&c, &format!("input[name=id][value='{id}']")).await;
    click(&c, "#launch-selected").await;
    let confirm = wait_text(&c, "#confirm-list", "confirmation", |t| {
        t.contains(EVIL_NAME)
    })
    .await;
    assert!(confirm.contains(&id), "{confirm}");
    click(&c, "#confirm").await;
    wait_text(&c, "#results", "launch accepted", |t| {
        t.contains("accepted")
    })
    .await;
    c.goto(&format!("{url}/console/instances/{id}"))
        .await
        .unwrap();
    wait_text(&c, "#state", "COMPLETED", |t| t.contains("COMPLETED")).await;
    let digests = wait_text(&c, "#digests", "digests", |t| t.contains("match")).await;
    assert!(!digests.contains("DIFFER"), "{digests}");
    let t = Instant::now();
    while client.0.try_wait().unwrap().is_none() {
        assert!(
            t.elapsed() < DEADLINE,
            "client still running: {}",
            client.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(std::fs::read(&local).unwrap(), data, "local disk differs");
    shot(&c, "instance-completed").await;
    c.goto(&format!("{url}/console/agents")).await.unwrap();
    wait_text(&c, "#agents tbody", "agent health", |t| t.contains("OK")).await;
    shot(&c, "agents").await;
    c.goto(&format!("{url}/console/tokens")).await.unwrap();
    shot(&c, "tokens").await;

    // Session cookie attributes; CSRF: no token -> 403; a wrong Origin -> 403 even with the
    // right cookie and token.
    let ck = c.get_named_cookie("fbconsole").await.unwrap();
    assert_eq!(
        (ck.http_only(), ck.secure()),
        (Some(true), Some(true)),
        "{ck}"
    );
    assert_eq!(format!("{:?}", ck.same_site()), "Some(Strict)", "{ck}");
    let body = format!("action=stop&confirm=yes&id={id}");
    assert_eq!(post_from_page(&c, "/console/actions", &body).await, 403);
    let token = csrf(&c).await;
    let r = http
        .post(format!("{url}/console/actions"))
        .header("Cookie", format!("fbconsole={}", ck.value()))
        .header("Origin", "https://evil.example")
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(format!("{body}&csrf={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        post_from_page(
            &c,
            "/console/actions",
            &format!("action=nope&id={id}&csrf={token}")
        )
        .await,
        400,
        "the token itself is accepted"
    );

    // Viewer: sees, cannot launch (no button, no checkbox, the POST is refused).
    click(&c, "#logout").await;
    wait_text(&c, "#login-form", "login page after logout", |_| true).await;
    login(&c, &url, viewer).await;
    c.goto(&format!("{url}/console/instances")).await.unwrap();
    wait_text(&c, "#instances td.name", "viewer sees the instance", |t| {
        t == EVIL_NAME
    })
    .await;
    assert!(c
        .find_all(Locator::Id("launch-selected"))
        .await
        .unwrap()
        .is_empty());
    assert!(c
        .find_all(Locator::Css("input[type=checkbox]"))
        .await
        .unwrap()
        .is_empty());
    let token = csrf(&c).await;
    let launch = format!("action=launch&confirm=yes&id={id}&csrf={token}");
    assert_eq!(post_from_page(&c, "/console/actions", &launch).await, 403);

    // A second service whose sessions last 2 s: an expired session is sent to the login
    // page; a service that goes away raises the banner.
    let (mut short, url2) = server(dir, "short", &["--console-session-secs", "2"]);
    login(&c, &url2, "test-admin-token").await;
    c.goto(&format!("{url2}/console/instances")).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    wait_text(&c, "#login-note", "expired session", |t| {
        t.contains("session ended")
    })
    .await;
    assert_eq!(path(&c).await, "/console/login");
    login(&c, &url2, "test-admin-token").await;
    let _ = short.0.kill();
    let t = Instant::now();
    loop {
        let shown = c
            .find(Locator::Id("conn-lost"))
            .await
            .unwrap()
            .is_displayed()
            .await
            .unwrap();
        if shown {
            break;
        }
        assert!(
            t.elapsed() < DEADLINE,
            "no banner after the service stopped"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.close().await.unwrap();
}
