//! The client against small real HTTPS servers on 127.0.0.1 (tokio-rustls, certificates from
//! a development CA with the service role): which URL each call goes to, when it moves on,
//! and what its errors say.

use super::*;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::AtomicU32;

use failback_trust::dev::DevCa;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::rustls;

/// What a test server answers to every request.
#[derive(Clone)]
struct Answer {
    status: u16,
    body: String,
}

impl Answer {
    fn ok(name: &str) -> Answer {
        Answer {
            status: 200,
            body: format!(r#"{{"server":"{name}"}}"#),
        }
    }
}

/// An HTTPS server that answers every request with `answer` and counts requests.
struct Server {
    addr: SocketAddr,
    hits: Arc<AtomicU32>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(ca: &DevCa, answer: Answer) -> Server {
        let (cert, key) = ca.issue_service(&["127.0.0.1".to_string()]).unwrap();
        let chain = failback_trust::pem::certs("cert", Path::new("t"), cert.as_bytes()).unwrap();
        let key = failback_trust::pem::private_key(Path::new("t"), key.as_bytes()).unwrap();
        let config =
            rustls::ServerConfig::builder_with_provider(failback_trust::verify::provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicU32::new(0));
        let h = hits.clone();
        let task = tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let (acceptor, answer, h) = (acceptor.clone(), answer.clone(), h.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    if read_request(&mut tls).await.is_none() {
                        return;
                    }
                    h.fetch_add(1, Ordering::SeqCst);
                    let reply = format!(
                        "HTTP/1.1 {} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
                        answer.status,
                        answer.body.len(),
                        answer.body
                    );
                    let _ = tls.write_all(reply.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        Server { addr, hits, task }
    }

    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    fn hits(&self) -> u32 {
        self.hits.load(Ordering::SeqCst)
    }

    /// Stops accepting: later connections are refused (the port is closed).
    async fn stop(&self) {
        self.task.abort();
        while !self.task.is_finished() {
            tokio::task::yield_now().await;
        }
    }
}

/// Reads one request (headers and a content-length body).
async fn read_request<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Option<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = s.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Some(());
        }
    }
}

/// A URL where nothing listens (connection refused).
async fn dead_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", l.local_addr().unwrap());
    drop(l);
    url
}

fn client(ca: &DevCa, urls: &[String]) -> ServiceClient {
    ServiceClient::new(
        urls,
        ca.cert_pem().as_bytes(),
        Path::new("ca.pem"),
        Timeouts {
            connect: Duration::from_millis(500),
            request: Duration::from_secs(5),
        },
    )
    .unwrap()
}

#[derive(serde::Deserialize, Debug)]
struct Who {
    server: String,
}

async fn who(c: &ServiceClient) -> Result<String, Error> {
    c.post::<_, Who>("/v1/pair", None, &serde_json::json!({"x": 1}))
        .await
        .map(|w| w.server)
}

#[tokio::test]
async fn moves_on_in_order_and_stays_with_the_url_that_answered() {
    let ca = DevCa::generate("test CA").unwrap();
    let b = Server::start(&ca, Answer::ok("b")).await;
    let a = Server::start(&ca, Answer::ok("a")).await;
    let dead = dead_url().await;
    let c = client(&ca, &[b.url(), dead.clone(), a.url()]);
    assert_eq!(c.current_url(), b.url());
    assert_eq!(who(&c).await.unwrap(), "b");
    b.stop().await;
    // b refuses now: the dead URL next (refused too), then a.
    assert_eq!(who(&c).await.unwrap(), "a");
    assert_eq!(c.current_url(), a.url());
    // Sticky: the next call goes straight to a.
    assert_eq!(who(&c).await.unwrap(), "a");
    assert_eq!((a.hits(), b.hits()), (2, 1));
    // Clones share where they are.
    assert_eq!(c.clone().current_url(), a.url());

    // Nobody left: one error naming every URL tried, in order from a, wrapping around.
    a.stop().await;
    let e = who(&c).await.unwrap_err();
    assert!(e.is_retryable(), "{e}");
    let Error::Network { url, message } = &e else {
        panic!("{e:?}")
    };
    assert_eq!(url, &format!("{dead}/v1/pair"), "{e}");
    let (pa, pb, pd) = (
        message.find(&a.url()).expect("a named"),
        message.find(&b.url()).expect("b named"),
        message.find(&dead).expect("dead named"),
    );
    assert!(pa < pb && pb < pd, "{message}");
    assert!(
        e.to_string()
            .starts_with(&format!("DR service {dead}/v1/pair unreachable: ")),
        "{e}"
    );
    // The URL that answered last stays first.
    assert_eq!(c.current_url(), a.url());
}

#[tokio::test]
async fn a_silent_server_times_out_and_the_next_answers() {
    let ca = DevCa::generate("test CA").unwrap();
    // Accepts TCP, never speaks TLS.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("https://{}", silent.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut keep = Vec::new();
        loop {
            keep.push(silent.accept().await.unwrap());
        }
    });
    let a = Server::start(&ca, Answer::ok("a")).await;
    let c = client(&ca, &[silent_url, a.url()]);
    // Answered by the next URL: the silent one timed out (how fast is for benchmarks).
    assert_eq!(who(&c).await.unwrap(), "a");
    assert_eq!(c.current_url(), a.url());
    held.abort();
}

#[tokio::test]
async fn http_errors_never_move_on() {
    let ca = DevCa::generate("test CA").unwrap();
    for status in [401u16, 404, 503] {
        let e = Server::start(
            &ca,
            Answer {
                status,
                body: r#"{"error":"TOKEN_INVALID","message":"token fbt_x is not known","field":"token"}"#
                    .into(),
            },
        )
        .await;
        let a = Server::start(&ca, Answer::ok("a")).await;
        let c = client(&ca, &[e.url(), a.url()]);
        let err = who(&c).await.unwrap_err();
        assert_eq!(err.status(), Some(status), "{err}");
        assert_eq!(err.is_retryable(), status >= 500, "{err}");
        assert_eq!(
            err.to_string(),
            format!(
                "DR service POST {}/v1/pair: HTTP {status} TOKEN_INVALID: token fbt_x is not known",
                e.url()
            )
        );
        assert_eq!((e.hits(), a.hits()), (1, 0), "HTTP {status} moved on");
        assert_eq!(c.current_url(), e.url());
    }
}

#[tokio::test]
async fn a_server_not_signed_by_the_pinned_ca_is_refused_not_skipped() {
    let ca = DevCa::generate("test CA").unwrap();
    let other = DevCa::generate("another CA").unwrap();
    let impostor = Server::start(&other, Answer::ok("impostor")).await;
    let a = Server::start(&ca, Answer::ok("a")).await;
    let c = client(&ca, &[impostor.url(), a.url()]);
    let e = who(&c).await.unwrap_err();
    assert!(matches!(e, Error::Untrusted { .. }), "{e:?}");
    assert!(!e.is_retryable());
    assert!(
        e.to_string().starts_with(&format!(
            "DR service {}/v1/pair not trusted: the server's certificate is not signed by the pinned CA",
            impostor.url()
        )),
        "{e}"
    );
    assert_eq!((impostor.hits(), a.hits()), (0, 0));
}

#[tokio::test]
async fn an_answer_that_is_not_the_api_names_the_url() {
    let ca = DevCa::generate("test CA").unwrap();
    let s = Server::start(
        &ca,
        Answer {
            status: 200,
            body: "<html>proxy</html>".into(),
        },
    )
    .await;
    let c = client(&ca, &[s.url()]);
    let e = who(&c).await.unwrap_err();
    assert!(matches!(e, Error::Decode { .. }), "{e:?}");
    assert!(
        e.to_string().starts_with(&format!(
            "DR service {}/v1/pair: unexpected answer: ",
            s.url()
        )),
        "{e}"
    );
    // An error body that is not the API's: its text becomes the message.
    let s = Server::start(
        &ca,
        Answer {
            status: 502,
            body: "bad gateway".into(),
        },
    )
    .await;
    let c = client(&ca, &[s.url()]);
    let e = who(&c).await.unwrap_err();
    assert!(
        e.to_string().ends_with(": HTTP 502 HTTP: bad gateway"),
        "{e}"
    );
}

#[test]
fn urls_are_parsed_and_checked() {
    assert_eq!(
        parse_urls("https://a:8443").unwrap(),
        vec!["https://a:8443"]
    );
    assert_eq!(
        parse_urls(" https://a:8443/, https://b:8443 https://a:8443").unwrap(),
        vec!["https://a:8443", "https://b:8443"]
    );
    let e = parse_urls("https://a:8443,http://b:8443").unwrap_err();
    assert_eq!(
        e.to_string(),
        r#"DR service URL "http://b:8443" must start with https:// and name a host"#
    );
    assert!(parse_urls(" , ")
        .unwrap_err()
        .to_string()
        .contains("no DR service URL"));
    assert!(parse_urls("https://").is_err());
    // The constructor takes entries that are lists themselves (repeated flags).
    let ca = DevCa::generate("test CA").unwrap();
    let c = client(
        &ca,
        &[
            "https://a:1,https://b:2".to_string(),
            "https://c:3".to_string(),
        ],
    );
    assert_eq!(c.urls(), ["https://a:1", "https://b:2", "https://c:3"]);
    let e = ServiceClient::new(
        &["https://a:1".into()],
        b"not a pem",
        Path::new("/etc/ca.pem"),
        Timeouts::default(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::Usage(_)), "{e:?}");
    assert!(e.to_string().contains("/etc/ca.pem"), "{e}");
}
