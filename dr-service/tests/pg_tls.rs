//! TLS to PostgreSQL against a real server: one throwaway cluster with `ssl=on`, a server
//! certificate for `localhost` only (signed by a test CA made here with rcgen) and only TLS
//! accepted over TCP (`hostssl` trust, `hostnossl` reject).
//!
//! - `verify_full_with_the_right_ca_serves_requests`: `localhost` + `sslmode=verify-full` +
//!   the right CA: the service starts (migrations, sealed CA) and answers an admin request;
//!   the server rejects plaintext, so this ran over TLS.
//! - `unknown_ca_is_refused`: another CA in `sslrootcert`: refused, the error names the URL's
//!   host and the unknown issuer.
//! - `host_name_not_in_the_certificate_is_refused`: `127.0.0.1` is not in the certificate:
//!   refused under `verify-full`, accepted under `verify-ca` (chain only).
//! - `plaintext_is_refused_by_a_tls_only_server`: no TLS settings (loopback) and explicit
//!   `sslmode=disable`: the server's `pg_hba.conf` refusal ("no encryption") is shown.
//! - `tls_required_of_a_server_without_tls`: `verify-full` against a cluster with `ssl=off`.
//! - `plaintext_to_a_remote_host_is_refused_before_connecting`: no server needed; the password
//!   is not shown.

use std::path::PathBuf;
use std::sync::OnceLock;

use failback_server::store;
use failback_tests::pg::{PgCluster, ServerTls};

struct TlsCluster {
    pg: PgCluster,
    ca: PathBuf,
    other_ca: PathBuf,
}

fn ca(name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, name.to_string());
    (p.self_signed(&key).unwrap(), key)
}

fn cluster() -> &'static TlsCluster {
    static C: OnceLock<TlsCluster> = OnceLock::new();
    C.get_or_init(|| {
        let (ca_cert, ca_key) = ca("failback test PostgreSQL CA");
        let (other, _) = ca("some other CA");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&key, &ca_cert, &ca_key)
            .unwrap();
        let pg = PgCluster::start_tls(&ServerTls {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        });
        pg.reap_on_exit();
        let ca = pg.path().join("test-ca.pem");
        let other_ca = pg.path().join("other-ca.pem");
        std::fs::write(&ca, ca_cert.pem()).unwrap();
        std::fs::write(&other_ca, other.pem()).unwrap();
        TlsCluster { pg, ca, other_ca }
    })
}

static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A fresh database on the TLS cluster; URL with `host` and the query `params`.
fn url(host: &str, params: &str) -> String {
    let c = cluster();
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let db = c.pg.database_name(&format!("tls_{n}"));
    format!("postgres://failback@{host}:{}/{db}?{params}", c.pg.port)
}

fn open_err(url: &str) -> String {
    let d = tempfile::tempdir().unwrap();
    let err = store::open(Some(url), d.path())
        .err()
        .unwrap_or_else(|| panic!("{url} opened"))
        .to_string();
    eprintln!("refused as expected: {err}");
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_the_right_ca_serves_requests() {
    let c = cluster();
    let db = url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", c.ca.display()),
    );
    let dir = tempfile::tempdir().unwrap();
    let server = failback_server::http::start(failback_server::http::ServerConfig {
        data_dir: dir.path().to_path_buf(),
        database: Some(db),
        ca_secret: Some(std::sync::Arc::new(
            failback_server::sealed::SealKey::parse(&"ab".repeat(32), "test").unwrap(),
        )),
        listen: "127.0.0.1:0".parse().unwrap(),
        sans: vec![],
        admin_token: Some("fbadm_pg_tls_test_token_0123456789".into()),
        settings: Default::default(),
        limits: Default::default(),
    })
    .await
    .expect("service starts on PostgreSQL over TLS");
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(server.ca_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let resp = http
        .get(format!(
            "{}{}",
            server.url(),
            failback_api::routes::ADMIN_INSTANCES
        ))
        .bearer_auth("fbadm_pg_tls_test_token_0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(body.is_array() || body.is_object(), "{body}");
}

#[test]
fn unknown_ca_is_refused() {
    let c = cluster();
    let err = open_err(&url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", c.other_ca.display()),
    ));
    assert!(
        err.contains("postgres://failback@localhost:")
            && err.contains("TLS handshake")
            && err.contains("UnknownIssuer")
            && err.contains("not signed by a CA in sslrootcert"),
        "{err}"
    );
}

#[test]
fn host_name_not_in_the_certificate_is_refused() {
    let c = cluster();
    let ca = c.ca.display();
    let err = open_err(&url(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ));
    assert!(
        err.contains("TLS handshake") && err.contains("not valid for name"),
        "{err}"
    );
    assert!(err.contains("127.0.0.1"), "{err}");
    // verify-ca checks the chain only.
    let d = tempfile::tempdir().unwrap();
    let s = store::open(
        Some(&url(
            "127.0.0.1",
            &format!("sslmode=verify-ca&sslrootcert={ca}"),
        )),
        d.path(),
    )
    .expect("verify-ca accepts the right CA for another name");
    assert_eq!(
        s.schema_version().unwrap(),
        store::migrations::latest(),
        "migrated over TLS"
    );
}

#[test]
fn plaintext_is_refused_by_a_tls_only_server() {
    for params in ["", "sslmode=disable"] {
        let err = open_err(&url("127.0.0.1", params));
        assert!(
            err.contains("pg_hba.conf rejects connection") && err.contains("no encryption"),
            "{params}: {err}"
        );
    }
}

#[test]
fn tls_required_of_a_server_without_tls() {
    let plain = PgCluster::fresh_database("tls_of_plain");
    let err = open_err(&format!(
        "{plain}?sslmode=verify-full&sslrootcert={}",
        cluster().ca.display()
    ));
    assert!(err.contains("server does not support TLS"), "{err}");
}

#[test]
fn plaintext_to_a_remote_host_is_refused_before_connecting() {
    // db.invalid never resolves: the refusal comes before any connection attempt.
    let err = open_err("postgres://fb:s3cret@db.invalid:5432/failback");
    assert!(
        err.contains("host db.invalid is not on this machine")
            && err.contains("sslmode=disable")
            && err.contains("postgres://fb@db.invalid:5432/failback")
            && !err.contains("s3cret"),
        "{err}"
    );
}
