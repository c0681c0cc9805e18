//! The trust model between client and agent (issue 14, items 1 and 2): one CA signs every
//! certificate, so the role and instance in a certificate are what keep one agent from serving
//! another instance's client and any other certificate holder from posing as an agent.

mod common;

use common::*;
use failback_replication::tls::DevCa;
use failback_replication::{ClientTls, ErrorClass, ServerTls};
use failback_trust::dev::Spec;
use failback_trust::{Role, AGENT_SERVER_NAME};
use tokio::net::TcpListener;

const MIB: usize = 1 << 20;

/// Starts an agent with the given certificate (scoped to the instance it names).
async fn agent_with_cert(ca: &DevCa, cert: &(String, String), disk: &std::path::Path) -> String {
    let tls = ServerTls::from_pem(
        ca.cert_pem().as_bytes(),
        cert.0.as_bytes(),
        cert.1.as_bytes(),
        None,
    )
    .unwrap();
    let disks = vec![failback_replication::SourceDisk::open("d", disk).unwrap()];
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(failback_replication::serve(
        listener,
        disks,
        tls,
        Default::default(),
    ));
    addr
}

fn client_of(ca: &DevCa, instance: &str) -> ClientTls {
    let (cert, key) = ca.issue_client(instance).unwrap();
    ClientTls::from_pem(ca.cert_pem().as_bytes(), cert.as_bytes(), key.as_bytes()).unwrap()
}

/// Attack: an agent enrolled for instance B serves arbitrary bytes to the client paired with
/// instance A. Before: exit 0, digest MATCH, local disk overwritten. Now: refused at the
/// handshake, naming the instance found; the local disk is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_of_another_instance_is_refused_and_the_disk_untouched() {
    let env = Env::new();
    let src = env.path("src.img");
    make_disk(&src, MIB, 1);
    let dst = env.path("dst.img");
    let before = make_disk(&dst, MIB, 2);
    let ca = DevCa::generate("one CA").unwrap();
    let agent_b = agent_with_cert(&ca, &ca.issue_agent("i-0bbb", &[]).unwrap(), &src).await;

    let e = sync(&agent_b, &client_of(&ca, "i-0aaa"), &[("d", &dst)], &opts())
        .await
        .unwrap_err();
    assert_eq!(e.class(), ErrorClass::Protocol, "not retried: {e}");
    let msg = e.to_string();
    assert!(
        msg.contains("certificate is for recovery instance i-0bbb, expected i-0aaa"),
        "{msg}"
    );
    assert_eq!(std::fs::read(&dst).unwrap(), before, "local disk changed");

    // The same agent serves its own instance's client.
    let report = sync(&agent_b, &client_of(&ca, "i-0bbb"), &[("d", &dst)], &opts())
        .await
        .unwrap();
    assert_eq!(report.disks.len(), 1);
}

/// Attack: a certificate of the same CA without the agent role (a client's, or one naming
/// `failback-agent` with another role) poses as an agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_without_the_agent_role_cannot_pose_as_an_agent() {
    let env = Env::new();
    let src = env.path("src.img");
    make_disk(&src, MIB, 1);
    let ca = DevCa::generate("one CA").unwrap();
    for (roles, label) in [
        (vec![Role::Service], "service"),
        (vec![Role::Client], "client"),
        (vec![], "none"),
        (vec![Role::Agent, Role::Service], "agent, service"),
    ] {
        let cert = ca
            .issue(&Spec {
                common_name: "impostor".into(),
                roles,
                instances: vec!["i-0aaa".into()],
                names: vec![AGENT_SERVER_NAME.into()],
                server_auth: true,
                days: 30,
            })
            .unwrap();
        let addr = agent_with_cert(&ca, &cert, &src).await;
        let e = failback_replication::Session::connect(&addr, &client_of(&ca, "i-0aaa"))
            .await
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&format!(
                "not a failback agent certificate (its roles: {label})"
            )),
            "{label}: {msg}"
        );
        assert_eq!(e.class(), ErrorClass::Protocol);
    }
}

/// Attack: an agent certificate (or any non-client certificate) used as a client certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_serves_only_client_role_certificates() {
    let env = Env::new();
    let src = env.path("src.img");
    make_disk(&src, MIB, 1);
    let ca = DevCa::generate("one CA").unwrap();
    let addr = agent_with_cert(&ca, &ca.issue_agent("i-0aaa", &[]).unwrap(), &src).await;
    let (cert, key) = ca
        .issue(&Spec {
            common_name: "agent as client".into(),
            roles: vec![Role::Agent],
            instances: vec!["i-0aaa".into()],
            server_auth: false,
            days: 30,
            ..Spec::default()
        })
        .unwrap();
    let tls =
        ClientTls::from_pem(ca.cert_pem().as_bytes(), cert.as_bytes(), key.as_bytes()).unwrap();
    let e = failback_replication::Session::connect(&addr, &tls)
        .await
        .unwrap_err();
    // The agent closes the handshake (its alert is not always delivered before the close).
    assert!(e.to_string().contains("refused"), "{e}");
}

/// The raw `sync` names the instance to expect; without it the client's own certificate says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_expected_instance_can_be_named_explicitly() {
    let env = Env::new();
    let src = env.path("src.img");
    make_disk(&src, MIB, 1);
    let ca = DevCa::generate("one CA").unwrap();
    let addr = agent_with_cert(&ca, &ca.issue_agent("i-0aaa", &[]).unwrap(), &src).await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca.issue_client("i-0aaa").unwrap();
    let files = failback_replication::TlsFiles {
        ca: dir.path().join("ca.pem"),
        cert: dir.path().join("c.pem"),
        key: dir.path().join("k.pem"),
    };
    std::fs::write(&files.ca, ca.cert_pem()).unwrap();
    std::fs::write(&files.cert, cert).unwrap();
    std::fs::write(&files.key, key).unwrap();
    let tls = ClientTls::from_files_for(&files, Some("i-0ccc".into())).unwrap();
    assert_eq!(tls.instance(), "i-0ccc");
    let e = failback_replication::Session::connect(&addr, &tls)
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("certificate is for recovery instance i-0aaa, expected i-0ccc"),
        "{e}"
    );
    let tls = ClientTls::from_files(&files).unwrap();
    assert_eq!(tls.instance(), "i-0aaa");
    failback_replication::Session::connect(&addr, &tls)
        .await
        .unwrap()
        .close()
        .await;
}
