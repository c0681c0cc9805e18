//! Attacks on the DR service without (or with the wrong) credentials, each against a real
//! server over real HTTPS on 127.0.0.1 (in-process like `api.rs`, or the real binary for
//! start-up): path traversal through URL parameters, oversized and slow bodies, idle and
//! half-open connections, boot-report floods, garbage files in the data directory and
//! over-long strings. Issue 14, items 4, 5 and 8.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use failback_api::*;
use failback_server::{start, Limits, RunningServer, ServerConfig, Settings};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// The memory test measures the whole process's peak RSS: it runs alone, the others share.
static GATE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

async fn server_with(dir: &Path, limits: Limits) -> RunningServer {
    start(ServerConfig {
        data_dir: dir.to_path_buf(),
        database: None,
        ca_secret: None,
        listen: "127.0.0.1:0".parse().unwrap(),
        sans: vec![],
        admin_token: None,
        settings: Settings {
            heartbeat_secs: 1,
            agent_timeout_secs: 600,
            client_timeout_secs: 600,
            ..Settings::default()
        },
        limits,
    })
    .await
    .expect("service starts")
}

async fn server(dir: &Path) -> RunningServer {
    server_with(dir, Limits::default()).await
}

fn https(s: &RunningServer) -> reqwest::Client {
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(s.ca_pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

fn tls_config(s: &RunningServer) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(s.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(cfg)
}

/// A TLS connection to the server, as any HTTPS client makes it.
async fn tls(s: &RunningServer) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(s.addr).await.unwrap();
    tokio_rustls::TlsConnector::from(tls_config(s))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

/// Status and body of an HTTP/1.1 response read to the end of the connection.
fn parse_response(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (status, body.to_string())
}

/// Sends `head` (+ `body`) exactly as written (no URL normalisation) and reads the answer.
async fn raw(s: &RunningServer, method: &str, target: &str, body: &str) -> (u16, String) {
    let mut t = tls(s).await;
    let req = format!(
        "{method} {target} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        s.admin_token,
        body.len()
    );
    t.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), t.read_to_end(&mut out)).await;
    parse_response(&out)
}

/// An enrolled instance with a paired client that uploaded one log: (instance id, client
/// secret, stored log name).
fn instance_with_log(s: &RunningServer) -> (String, String, String) {
    let svc = &s.service;
    let at = svc
        .create_token(
            failback_server::BOOTSTRAP_ADMIN,
            CreateTokenRequest {
                kind: TokenKind::Agent,
                recovery_instance_id: None,
                ttl_secs: None,
            },
        )
        .unwrap();
    let en = svc
        .enroll_agent(AgentEnrollRequest {
            token: at.token,
            address: "127.0.0.1:1".into(),
            private_address: None,
            disks: vec![AgentDisk {
                id: "disk0".into(),
                size_bytes: 1 << 30,
                logical_sector_size: 512,
                device: None,
            }],
            hostname: None,
            source_hints: None,
            cert_sans: vec![],
        })
        .unwrap();
    let id = en.recovery_instance_id;
    let pt = svc
        .create_token(
            failback_server::BOOTSTRAP_ADMIN,
            CreateTokenRequest {
                kind: TokenKind::Pairing,
                recovery_instance_id: Some(id.clone()),
                ttl_secs: None,
            },
        )
        .unwrap();
    let p = svc
        .pair(PairRequest {
            token: pt.token,
            inventory: Inventory {
                disks: vec![InventoryDisk {
                    path: "/dev/sda".into(),
                    size_bytes: 1 << 30,
                    logical_sector_size: 512,
                    ..Default::default()
                }],
                ..Default::default()
            },
            recovery_instance_id: None,
            device_mapping: None,
            client_version: None,
        })
        .unwrap();
    let up = svc
        .upload_log(&p.client_secret, b"genuine client log\n")
        .unwrap();
    (id, p.client_secret, up.stored_as)
}

fn assert_refused(what: &str, status: u16, body: &str, secrets: &[&str]) {
    assert!(
        status == 400 || status == 404,
        "{what}: status {status}, body {body:?}"
    );
    let e: ApiError = serde_json::from_str(body)
        .unwrap_or_else(|err| panic!("{what}: not an API error ({err}): {body:?}"));
    assert!(!e.message.is_empty(), "{what}: {e:?}");
    for s in secrets {
        assert!(!body.contains(s), "{what}: answer leaks a secret: {body:?}");
    }
    assert!(!body.contains("PRIVATE KEY"), "{what}: {body:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_traversal_is_refused_on_every_route_taking_an_id_or_name() {
    let _g = GATE.read().await;
    let d = tempfile::tempdir().unwrap();
    let s = server(d.path()).await;
    let (id, _, log) = instance_with_log(&s);
    // The genuine names still work.
    let (st, body) = raw(
        &s,
        "GET",
        &format!("/v1/admin/instances/{id}/logs/{log}"),
        "",
    )
    .await;
    assert_eq!((st, body.as_str()), (200, "genuine client log\n"));

    let key = std::fs::read_to_string(d.path().join("ca-key.pem")).unwrap();
    let key_line = key.lines().nth(1).unwrap().to_string();
    let secrets = [key_line.as_str(), s.admin_token.as_str()];
    // The attack from the issue, exactly.
    let (st, body) = raw(&s, "GET", "/v1/admin/instances/..%2F/logs/ca-key.pem", "").await;
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("not a recovery instance id"), "{body}");
    let abs = d
        .path()
        .join("ca-key.pem")
        .display()
        .to_string()
        .replace('/', "%2F");
    let long = "a".repeat(5000);
    let ids = [
        "..%2F",
        "..%2f",
        "%2e%2e%2f",
        "%2E%2E%2F",
        "..%252F",
        "%252e%252e%252f",
        "..",
        ".",
        "..%5C",
        "%2Fetc%2Fpasswd",
        abs.as_str(),
        "%00",
        "i-0123456789abcdef%00",
        "i-0123456789abcdef%2F..",
        "i-0123456789abcdef%2F..%2F..",
        "%ff%fe",
        long.as_str(),
    ];
    let routes: [(&str, &str, &str); 8] = [
        ("GET", "/v1/admin/instances/{}", ""),
        (
            "PUT",
            "/v1/admin/instances/{}/hints",
            r#"{"source_hints":{}}"#,
        ),
        ("POST", "/v1/admin/instances/{}/stop", ""),
        ("GET", "/v1/admin/instances/{}/config", ""),
        ("PUT", "/v1/admin/instances/{}/config", "{}"),
        ("GET", "/v1/admin/instances/{}/logs", ""),
        ("GET", "/v1/admin/instances/{}/logs/ca-key.pem", ""),
        ("GET", "/v1/admin/events?instance={}", ""),
    ];
    for (m, r, b) in routes {
        for p in ids {
            let target = r.replace("{}", p);
            let (st, body) = raw(&s, m, &target, b).await;
            assert_refused(&format!("{m} {target}"), st, &body, &secrets);
        }
    }
    let names = [
        "ca-key.pem",
        "..%2F..%2Fca-key.pem",
        "%2e%2e%2f%2e%2e%2fca-key.pem",
        "%2E%2E%2F%2E%2E%2Fca-key.pem",
        "..%252F..%252Fca-key.pem",
        "..%5C..%5Cca-key.pem",
        "..",
        abs.as_str(),
        "admin-token",
        "..%2Fadmin-token",
        "%00",
        "boot-1-a1b2c3.log%00",
        long.as_str(),
    ];
    for n in names {
        let target = format!("/v1/admin/instances/{id}/logs/{n}");
        let (st, body) = raw(&s, "GET", &target, "").await;
        assert_refused(&format!("GET {target}"), st, &body, &secrets);
    }
    s.shutdown().await;
}

/// Peak and current RSS of this process in KiB (`VmHWM`, `VmRSS`).
fn rss_kib() -> (u64, u64) {
    let st = std::fs::read_to_string("/proc/self/status").unwrap();
    let get = |k: &str| -> u64 {
        st.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    (get("VmHWM:"), get("VmRSS:"))
}

/// Writes a chunked body of up to `total` bytes (stops at the first write error: the server
/// closed) and returns the server's answer.
async fn chunked_upload(
    s: &RunningServer,
    path: &str,
    bearer: &str,
    total: usize,
    terminate: bool,
) -> (u16, String, usize) {
    let t = tls(s).await;
    let (mut rd, mut wr) = tokio::io::split(t);
    let reader = tokio::spawn(async move {
        let mut out = Vec::new();
        let _ = rd.read_to_end(&mut out).await;
        out
    });
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {bearer}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    let chunk = [b' '; 16 << 10];
    let mut sent = 0;
    if wr.write_all(head.as_bytes()).await.is_ok() {
        while sent < total && !reader.is_finished() {
            let frame = [format!("{:x}\r\n", chunk.len()).as_bytes(), &chunk, b"\r\n"].concat();
            if wr.write_all(&frame).await.is_err() {
                break;
            }
            sent += chunk.len();
        }
        if terminate {
            let _ = wr.write_all(b"0\r\n\r\n").await;
        }
    }
    // Unless terminated, the body never ends: an answer can only come from the limit.
    let wait = Duration::from_secs(if terminate { 120 } else { 10 });
    let out = tokio::time::timeout(wait, reader)
        .await
        .expect("an answer before the body ended")
        .unwrap();
    let (st, body) = parse_response(&out);
    (st, body, sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_are_cut_at_the_route_limit_while_reading() {
    let _g = GATE.read().await;
    let d = tempfile::tempdir().unwrap();
    let s = server(d.path()).await;
    // 256 KiB of an unterminated chunked boot report (limit 48 KiB): 413 without the end.
    let (st, body, _) = chunked_upload(&s, "/v1/client/boot-report", "-", 256 << 10, false).await;
    assert_eq!(st, 413, "{body}");
    let e: ApiError = serde_json::from_str(&body).unwrap();
    assert_eq!(e.error, "PAYLOAD_TOO_LARGE");
    assert!(e.message.contains("/v1/client/boot-report"), "{e:?}");
    // A declared Content-Length over the limit is refused before any body byte.
    let mut t = tls(&s).await;
    t.write_all(b"POST /v1/pair HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000000\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), t.read_to_end(&mut out))
        .await
        .expect("413 without waiting for the body")
        .ok();
    assert_eq!(parse_response(&out).0, 413);
    // Log uploads (16 MiB limit) are read only with a valid client secret.
    let (st, body, _) = chunked_upload(&s, "/v1/client/log", "fbc_forged", 4 << 20, false).await;
    assert_eq!(st, 401, "{body}");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_oversized_uploads_keep_memory_bounded() {
    let _g = GATE.write().await;
    let d = tempfile::tempdir().unwrap();
    let s = Arc::new(server(d.path()).await);
    // Reset the peak-RSS mark, then 24 anonymous uploads of 8 MiB each in parallel.
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let (_, before) = rss_kib();
    let routes = ["/v1/client/boot-report", "/v1/pair", "/v1/client/log"];
    let tasks: Vec<_> = (0..24)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                chunked_upload(&s, routes[i % 3], "fbc_forged", 8 << 20, true).await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    let (peak, _) = rss_kib();
    let grown_mib = peak.saturating_sub(before) / 1024;
    // Buffering the bodies would take 24 x 8 MiB = 192 MiB.
    assert!(grown_mib < 64, "peak RSS grew by {grown_mib} MiB");
    for (st, body, sent) in answers {
        assert!(st == 413 || st == 401, "{st} {body}");
        assert!(sent < 8 << 20, "the server read all {sent} bytes");
    }
}

/// True when the server closes `stream` within `within`.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(stream: &mut S, within: Duration) -> bool {
    let mut b = [0u8; 64];
    matches!(
        tokio::time::timeout(within, stream.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

fn short_limits() -> Limits {
    Limits {
        handshake_timeout: Duration::from_millis(800),
        header_timeout: Duration::from_millis(800),
        idle_timeout: Duration::from_millis(800),
        body_timeout: Duration::from_millis(800),
        max_connections: 4096,
        max_connections_per_ip: 64,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_slow_and_half_open_connections_are_closed_after_their_timeout() {
    let _g = GATE.read().await;
    let d = tempfile::tempdir().unwrap();
    let s = server_with(d.path(), short_limits()).await;
    let mut plain = Vec::new();
    let mut half_open = Vec::new();
    let mut idle = Vec::new();
    let mut slow = Vec::new();
    for _ in 0..8 {
        plain.push(TcpStream::connect(s.addr).await.unwrap());
        // The first bytes of a TLS ClientHello record, then silence.
        let mut h = TcpStream::connect(s.addr).await.unwrap();
        h.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
            .await
            .unwrap();
        half_open.push(h);
        idle.push(tls(&s).await);
        let mut w = tls(&s).await;
        w.write_all(b"GET /v1/health HTTP/1.1\r\nHost: loc")
            .await
            .unwrap();
        slow.push(w);
    }
    // A keep-alive connection that already served a request, then idles.
    let mut served = tls(&s).await;
    served
        .write_all(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut b = [0u8; 512];
    assert!(served.read(&mut b).await.unwrap() > 0);
    let t0 = Instant::now();
    let bound = Duration::from_secs(5);
    for c in plain.iter_mut().chain(half_open.iter_mut()) {
        assert!(closed_within(c, bound).await, "handshake timeout");
    }
    for c in idle.iter_mut().chain(slow.iter_mut()) {
        assert!(closed_within(c, bound).await, "idle / header timeout");
    }
    assert!(closed_within(&mut served, bound).await, "keep-alive idle");
    assert!(t0.elapsed() < bound, "closed after {:?}", t0.elapsed());
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_idle_connections_cannot_starve_health() {
    let _g = GATE.read().await;
    let d = tempfile::tempdir().unwrap();
    let limits = Limits {
        // Long timeouts: only the connection cap and its eviction can help here.
        handshake_timeout: Duration::from_secs(60),
        header_timeout: Duration::from_secs(60),
        idle_timeout: Duration::from_secs(60),
        ..short_limits()
    };
    let s = server_with(d.path(), limits).await;
    let mut held = Vec::new();
    for i in 0..300 {
        let mut c = TcpStream::connect(s.addr).await.unwrap();
        if i % 2 == 0 {
            let _ = c.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).await;
        }
        held.push(c);
    }
    for _ in 0..20 {
        held.push(tls(&s).await.into_inner().0);
    }
    let r = https(&s)
        .get(format!("{}/v1/health", s.url()))
        .send()
        .await
        .expect("health answers while 320 idle connections are open");
    assert_eq!(r.status(), 200);
    let open = s.connections.open();
    assert!(open <= 64, "{open} connections open from one address");
    s.shutdown().await;
}

async fn boot_report(c: &reqwest::Client, s: &RunningServer, r: &BootReport) -> (u16, Value) {
    let resp = c
        .post(format!("{}/v1/client/boot-report", s.url()))
        .json(r)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_boot_report_flood_cannot_silence_a_genuine_appliance() {
    let _g = GATE.read().await;
    let d = tempfile::tempdir().unwrap();
    let s = server(d.path()).await;
    let (id, _, _) = instance_with_log(&s);
    let token = s
        .service
        .create_token(
            failback_server::BOOTSTRAP_ADMIN,
            CreateTokenRequest {
                kind: TokenKind::Pairing,
                recovery_instance_id: Some(id.clone()),
                ttl_secs: None,
            },
        )
        .unwrap()
        .token;
    let c = https(&s);
    let mut refused = 0;
    for i in 0..100 {
        let r = BootReport {
            token: (i % 2 == 0).then(|| format!("fbp_forged{i}")),
            smbios_uuid: (i % 3 == 0).then(|| format!("uuid-{i}")),
            stage: "pair".into(),
            message: "flood".into(),
            ..Default::default()
        };
        let (st, _) = boot_report(&c, &s, &r).await;
        assert!(st == 200 || st == 429, "{st}");
        refused += usize::from(st == 429);
    }
    assert!(refused >= 80, "only {refused} of 100 flood reports refused");
    let genuine = BootReport {
        token: Some(token),
        stage: "pair".into(),
        message: "mapped disk too small".into(),
        ..Default::default()
    };
    let (st, body) = boot_report(&c, &s, &genuine).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["recovery_instance_id"], json!(id));
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_long_strings_are_refused_naming_the_field() {
    let _g = GATE.read().await;
    let d = tempfile::tempdir().unwrap();
    let s = server(d.path()).await;
    let (id, secret, _) = instance_with_log(&s);
    let c = https(&s);
    let long = |n: usize| "x".repeat(n);
    let cases: Vec<(&str, String, Option<&str>, Value, &str)> = vec![
        (
            "POST",
            "/v1/pair".into(),
            None,
            json!({"token": long(300), "inventory": {}}),
            "token",
        ),
        (
            "POST",
            "/v1/pair".into(),
            None,
            json!({"token": "t", "inventory": {"disks": [{"path": long(2000), "size_bytes": 1}]}}),
            "inventory.disks[0].path",
        ),
        (
            "POST",
            "/v1/agent/enroll".into(),
            None,
            json!({"token": "t", "address": "h:1", "disks": [], "hostname": long(300)}),
            "hostname",
        ),
        (
            "POST",
            "/v1/client/heartbeat".into(),
            Some(&secret),
            json!({"phase": "FAILED", "error": long(9000)}),
            "error",
        ),
        (
            "POST",
            "/v1/client/boot-report".into(),
            None,
            json!({"stage": "pair", "message": "m", "smbios_uuid": long(300)}),
            "smbios_uuid",
        ),
        (
            "PUT",
            format!("/v1/admin/instances/{id}/config"),
            Some(&s.admin_token),
            json!({"name": long(300)}),
            "name",
        ),
        (
            "PUT",
            format!("/v1/admin/instances/{id}/hints"),
            Some(&s.admin_token),
            json!({"source_hints": {"mac_addresses": vec!["m"; 300]}}),
            "source_hints.mac_addresses",
        ),
    ];
    for (m, path, bearer, body, field) in cases {
        let mut rq = c.request(m.parse().unwrap(), format!("{}{path}", s.url()));
        if let Some(b) = bearer {
            rq = rq.bearer_auth(b);
        }
        let r = rq.json(&body).send().await.unwrap();
        let st = r.status().as_u16();
        let e: ApiError = r.json().await.unwrap();
        assert_eq!(st, 400, "{m} {path}: {e:?}");
        assert_eq!(e.field.as_deref(), Some(field), "{m} {path}: {e:?}");
        assert!(e.message.contains(field), "{e:?}");
    }
    s.shutdown().await;
}

// ---------------------------------------------------------------- start-up (real binary)

/// Runs `failback-server serve` on `dir`; its exit code and stderr, or `None` (killed) if
/// it was still running after 10 s.
fn serve_binary(dir: &Path) -> (Option<i32>, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_failback-server"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let code = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        if t0.elapsed() > Duration::from_secs(10) {
            child.kill().unwrap();
            child.wait().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (code, err)
}

/// A data directory as a first start leaves it (CA, key, admin token, database).
async fn data_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    server(d.path()).await.shutdown().await;
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_data_files_stop_the_binary_naming_the_file() {
    let _g = GATE.read().await;
    let other = data_dir().await;
    let other_ca = std::fs::read_to_string(other.path().join("ca.pem")).unwrap();
    type Spoil = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, &str, Spoil)> = vec![
        (
            "garbage ca.pem",
            "ca.pem",
            Box::new(|d| std::fs::write(d.join("ca.pem"), "garbage\n").unwrap()),
        ),
        (
            "empty ca.pem",
            "ca.pem",
            Box::new(|d| std::fs::write(d.join("ca.pem"), "").unwrap()),
        ),
        (
            "garbage ca-key.pem",
            "ca-key.pem",
            Box::new(|d| std::fs::write(d.join("ca-key.pem"), "garbage\n").unwrap()),
        ),
        (
            "missing ca-key.pem",
            "ca-key.pem",
            Box::new(|d| std::fs::remove_file(d.join("ca-key.pem")).unwrap()),
        ),
        (
            "empty admin-token",
            "admin-token",
            Box::new(|d| std::fs::write(d.join("admin-token"), "\n").unwrap()),
        ),
        ("another CA's ca.pem", "ca.pem", {
            let pem = other_ca.clone();
            Box::new(move |d| std::fs::write(d.join("ca.pem"), &pem).unwrap())
        }),
    ];
    for (what, file, spoil) in cases {
        let d = data_dir().await;
        spoil(d.path());
        let (code, err) = serve_binary(d.path());
        assert_eq!(code, Some(2), "{what}: exit {code:?}, stderr {err}");
        let named = d.path().join(file).display().to_string();
        assert!(
            err.contains(&named),
            "{what}: stderr does not name {named}: {err}"
        );
    }
}

/// Starts `failback-server serve` on `dir` under `sh -c 'ulimit -n FDS; exec ...'` and waits
/// for its address.
fn running_binary(dir: &Path, fds: u32) -> (std::process::Child, std::net::SocketAddr) {
    let addr_file = dir.join("addr");
    let cmd = format!(
        "ulimit -n {fds} && exec \"$0\" serve --listen 127.0.0.1:0 --data-dir \"$1\" --addr-file \"$2\""
    );
    let mut child = std::process::Command::new("sh")
        .args(["-c", &cmd, env!("CARGO_BIN_EXE_failback-server")])
        .arg(dir)
        .arg(&addr_file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file) {
            return (child, a.trim().parse().unwrap());
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("failback-server exited: {st}");
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "no address file");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stop_binary(mut child: std::process::Child) -> String {
    child.kill().unwrap();
    child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_up_to_the_fd_limit_cannot_starve_health_of_the_binary() {
    let _g = GATE.read().await;
    let d = data_dir().await;
    // Secret files others can read are worth a warning naming them.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let p = d.path().join("admin-token");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let (child, addr) = running_binary(d.path(), 200);
    // More idle connections than the process may open files.
    let mut held = Vec::new();
    for _ in 0..300 {
        match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await {
            Ok(Ok(c)) => held.push(c),
            _ => break,
        }
    }
    let ca = std::fs::read(d.path().join("ca.pem")).unwrap();
    let c = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .resolve("localhost", addr)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let r = c
        .get(format!("https://localhost:{}/v1/health", addr.port()))
        .send()
        .await;
    let err = stop_binary(child);
    let r = r.unwrap_or_else(|e| panic!("health with {} idle connections: {e}\n{err}", held.len()));
    assert_eq!(r.status(), 200);
    let token = d.path().join("admin-token").display().to_string();
    assert!(
        err.contains(&token) && err.contains("mode 644"),
        "no warning about {token}: {err}"
    );
}
