//! Fault paths: dropped connections (resume), wrong CA, instance scoping, protocol version
//! mismatch, garbage / truncated frames, blocks that were not asked for.
//!
//! Faults the real agent cannot produce (garbage, wrong version, unrequested blocks) come from a
//! hand-made fake agent (`FakeAgent`), named as such; it speaks real TLS with real certificates.

mod common;

use std::sync::Arc;

use common::*;
use failback_replication::conn::FrameReader;
use failback_replication::tls::{DevCa, DevCerts};
use failback_replication::wire::{self, DiskInfo, Message, WireBlock, PROTOCOL_VERSION};
use failback_replication::{ClientTls, ErrorClass, Session};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MIB: usize = 1024 * 1024;

/// A TCP proxy that forwards everything from client to agent but cuts both directions once
/// `limit` bytes went from agent to client: a connection dropped mid-stream.
async fn cutting_proxy(agent: String, limit: usize) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let (client, _) = l.accept().await.unwrap();
        let upstream = TcpStream::connect(&agent).await.unwrap();
        let (mut cr, mut cw) = client.into_split();
        let (mut ur, mut uw) = upstream.into_split();
        let up = tokio::spawn(async move {
            let _ = tokio::io::copy(&mut cr, &mut uw).await;
        });
        let mut sent = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match ur.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let n = n.min(limit - sent);
            if cw.write_all(&buf[..n]).await.is_err() {
                break;
            }
            sent += n;
            if sent >= limit {
                break;
            }
        }
        up.abort();
        // Dropping both halves closes the sockets.
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_connection_dropped_mid_stream() {
    let env = Env::new();
    let src = env.path("src.img");
    let dst = env.path("dst.img");
    let data = random_bytes(40, 32 * MIB);
    std::fs::write(&src, &data).unwrap();
    let agent = env.agent(&[("d", &src)]).await;
    let tls = env.client_tls();

    // Cut after ~12 MiB of agent->client traffic.
    let proxy = cutting_proxy(agent.clone(), 12 * MIB).await;
    let e = sync(&proxy, &tls, &[("d", &dst)], &opts())
        .await
        .unwrap_err();
    assert_eq!(e.class(), ErrorClass::Network, "{e}");
    let partial = std::fs::read(&dst).unwrap();
    // The first MiB is written last, so an interrupted disk has none of it.
    assert!(
        partial[..MIB].iter().all(|b| *b == 0),
        "head written before the end"
    );
    let written = partial[MIB..]
        .chunks(65536)
        .zip(data[MIB..].chunks(65536))
        .filter(|(a, b)| a == b)
        .count();
    assert!(
        written > 16,
        "some blocks were written before the cut ({written})"
    );

    // Run again: only what still differs is fetched.
    let r = sync(&agent, &tls, &[("d", &dst)], &opts()).await.unwrap();
    assert_same(&dst, &data);
    let d = &r.disks[0];
    assert!(
        d.blocks_differing < 512 - written as u64 + 1,
        "resume fetched {} blocks although {written} were already there",
        d.blocks_differing
    );
    assert!(
        d.blocks_differing >= 16,
        "the head (16 blocks) must be fetched"
    );
    assert_eq!(d.digest.as_deref(), Some(d.agent_digest.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_ca_is_refused_on_both_sides() {
    let env = Env::new();
    let src = env.path("src.img");
    make_disk(&src, MIB, 1);
    let agent = env.agent(&[("d", &src)]).await;

    // Client that trusts another CA: it refuses the agent's certificate.
    let other_ca = DevCa::generate("some other CA").unwrap();
    let (agent_pem, _) = other_ca.issue_agent("dev", &[]).unwrap();
    let (client_pem, client_key) = other_ca.issue_client("dev").unwrap();
    let other = DevCerts {
        ca: other_ca.cert_pem(),
        ca_key: other_ca.key_pem(),
        agent: agent_pem,
        agent_key: String::new(),
        client: client_pem,
        client_key,
    };
    let tls = ClientTls::from_pem(
        other.ca.as_bytes(),
        env.certs.client.as_bytes(),
        env.certs.client_key.as_bytes(),
    )
    .unwrap();
    let e = Session::connect(&agent, &tls).await.unwrap_err();
    // A certificate problem is not retried: retrying cannot fix it.
    assert_eq!(e.class(), ErrorClass::Protocol);
    let msg = e.to_string();
    assert!(msg.contains("not signed by the pinned CA"), "{msg}");

    // Client certificate from another CA: the agent refuses it.
    let tls = ClientTls::from_pem(
        env.certs.ca.as_bytes(),
        other.client.as_bytes(),
        other.client_key.as_bytes(),
    )
    .unwrap();
    let e = Session::connect(&agent, &tls).await.unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("agent refused the connection"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_for_another_instance_is_refused() {
    let env = Env::new();
    let src = env.path("src.img");
    make_disk(&src, MIB, 1);
    let agent = env
        .agent_with(&[("d", &src)], Some("i-0abc"), Default::default())
        .await;
    // env's client certificate names instance "dev".
    let e = Session::connect(&agent, &env.client_tls())
        .await
        .unwrap_err();
    assert_eq!(e.class(), ErrorClass::Protocol);
    let msg = e.to_string();
    assert!(
        msg.contains("client certificate is for instance dev")
            && msg.contains("this agent serves instance i-0abc"),
        "{msg}"
    );
    assert!(msg.contains("not authorized"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matching_instance_is_served() {
    let env = Env::new();
    let src = env.path("src.img");
    let data = make_disk(&src, MIB, 1);
    let agent = env
        .agent_with(&[("d", &src)], Some("dev"), Default::default())
        .await;
    let s = Session::connect(&agent, &env.client_tls()).await.unwrap();
    assert_eq!(s.agent_instance(), Some("dev"));
    drop(s);
    let dst = env.path("dst.img");
    sync(&agent, &env.client_tls(), &[("d", &dst)], &opts())
        .await
        .unwrap();
    assert_same(&dst, &data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_version_mismatch_is_clear_on_the_client_side() {
    // Newer client against this agent: the agent answers with a clear error.
    let env = Env::new();
    let src = env.path("src.img");
    make_disk(&src, MIB, 1);
    let agent = env.agent(&[("d", &src)]).await;
    let e = Session::connect_with_version(&agent, &env.client_tls(), PROTOCOL_VERSION + 1)
        .await
        .unwrap_err();
    assert_eq!(e.class(), ErrorClass::Protocol);
    assert!(
        e.to_string().contains(&format!(
            "agent speaks protocol {PROTOCOL_VERSION}, client {}",
            PROTOCOL_VERSION + 1
        )),
        "{e}"
    );

    // Newer agent (fake) against this client.
    let fake = FakeAgent::start(&env.certs, |mut c| async move {
        c.read_msg().await;
        c.send(&Message::AgentHello {
            version: PROTOCOL_VERSION + 1,
            software: "9.9".into(),
            instance: None,
        })
        .await;
        c.linger().await;
    })
    .await;
    let e = Session::connect(&fake, &env.client_tls())
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains(&format!(
            "agent speaks protocol {}, client {PROTOCOL_VERSION}",
            PROTOCOL_VERSION + 1
        )),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_answers_garbage_with_a_clear_error_and_closes() {
    let env = Env::new();
    let src = env.path("src.img");
    make_disk(&src, MIB, 1);
    let agent = env.agent(&[("d", &src)]).await;
    for garbage in [
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        vec![0, 0, 0, 3, 0x01, b'F', b'B'], // truncated hello
    ] {
        let mut c = raw_client(&agent, &env.certs).await;
        c.write_all(&garbage).await.unwrap();
        c.flush().await.unwrap();
        let mut r = FrameReader::new(c, "agent");
        let (m, _) = r.read().await.unwrap().expect("an error frame");
        match m {
            Message::Error { message, .. } => {
                assert!(
                    message.contains("garbage") || message.contains("truncated"),
                    "{message}"
                );
            }
            other => panic!("expected Error, got {other:?}"),
        }
        // Then the connection is closed.
        assert!(matches!(r.read().await, Ok(None) | Err(_)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_or_truncated_frames_from_agent_write_nothing() {
    let env = Env::new();
    for (name, bytes) in [
        ("oversized length", vec![0xff, 0xff, 0xff, 0xff, 0x20]),
        ("unknown tag", vec![0, 0, 0, 2, 0x99, 0]),
        // A Blocks frame that promises 64 KiB of payload and then the connection ends.
        ("truncated", {
            let mut f = Message::Blocks {
                stream: 1,
                first_block: 20,
                blocks: vec![WireBlock::new(
                    wire::Encoding::Raw,
                    [0; 32],
                    vec![7; 65536].into(),
                )],
            }
            .encode();
            f.truncate(1000);
            f
        }),
    ] {
        let bytes = Arc::new(bytes);
        let fake = FakeAgent::start(&env.certs, move |mut c| async move {
            c.handshake(4 * MIB as u64).await;
            c.read_msg().await; // SyncStart
            c.send(&plan_compare()).await;
            c.read_msg().await; // Hashes
            c.send_raw(&bytes).await;
            c.close().await;
        })
        .await;
        let dst = env.path(&format!("dst-{}.img", name.replace(' ', "-")));
        std::fs::write(&dst, vec![0x5a; 4 * MIB]).unwrap();
        let e = sync(&fake, &env.client_tls(), &[("d", &dst)], &opts())
            .await
            .unwrap_err();
        assert_eq!(e.class(), ErrorClass::Protocol, "{name}: {e}");
        let msg = e.to_string();
        assert!(
            msg.contains("garbage") && msg.contains("connection closed"),
            "{name}: {msg}"
        );
        assert!(
            std::fs::read(&dst).unwrap().iter().all(|b| *b == 0x5a),
            "{name}: something was written"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_for_an_offset_not_asked_for_is_rejected() {
    let env = Env::new();
    let size = 4 * MIB as u64;
    // One valid (correctly hashed) block, but at an index outside every window sent, and one
    // a second time. Both must be rejected before anything is written.
    for index in [size / 65536 + 3, 5] {
        let fake = FakeAgent::start(&env.certs, move |mut c| async move {
            c.handshake(size).await;
            c.read_msg().await; // SyncStart
            c.send(&plan_compare()).await;
            c.read_msg().await; // Hashes (the whole 4 MiB disk)
            let data = vec![9u8; 65536];
            let block = WireBlock::new(
                wire::Encoding::Raw,
                *blake3::hash(&data).as_bytes(),
                data.into(),
            );
            let m = Message::Blocks {
                stream: 1,
                first_block: index,
                blocks: vec![block],
            };
            c.send(&m).await;
            if index == 5 {
                c.send(&m).await; // duplicate
            }
            c.linger().await;
        })
        .await;
        let dst = env.path(&format!("dst-{index}.img"));
        std::fs::write(&dst, vec![0x5a; 4 * MIB]).unwrap();
        let e = sync(&fake, &env.client_tls(), &[("d", &dst)], &opts())
            .await
            .unwrap_err();
        assert_eq!(e.class(), ErrorClass::Protocol, "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("block {index}")) && msg.contains("not asked for"),
            "{msg}"
        );
        // (The first copy of block 5 was asked for and verified, but it lies in the first MiB,
        // which is only written when the disk completes.)
        let got = std::fs::read(&dst).unwrap();
        assert!(got.iter().all(|b| *b == 0x5a), "something was written");
    }
}

// ---- fake agent (hand-made, for faults the real agent cannot produce) ----

async fn raw_client(addr: &str, certs: &DevCerts) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = certs.client_tls().unwrap();
    tokio_rustls::TlsConnector::from(tls.config())
        .connect(
            rustls::pki_types::ServerName::try_from("failback-agent").unwrap(),
            tcp,
        )
        .await
        .unwrap()
}

struct FakeConn {
    reader: FrameReader<tokio::io::ReadHalf<tokio_rustls::server::TlsStream<TcpStream>>>,
    writer: tokio::io::WriteHalf<tokio_rustls::server::TlsStream<TcpStream>>,
}

impl FakeConn {
    async fn read_msg(&mut self) -> Option<Message> {
        self.reader.read().await.ok().flatten().map(|(m, _)| m)
    }
    async fn send(&mut self, m: &Message) {
        self.send_raw(&m.encode()).await;
    }
    async fn send_raw(&mut self, b: &[u8]) {
        let _ = self.writer.write_all(b).await;
        let _ = self.writer.flush().await;
    }
    async fn handshake(&mut self, size: u64) {
        self.read_msg().await;
        self.send(&Message::AgentHello {
            version: PROTOCOL_VERSION,
            software: "fake".into(),
            instance: None,
        })
        .await;
        self.send(&Message::Manifest {
            disks: vec![DiskInfo {
                id: "d".into(),
                size,
                logical_sector_size: 512,
                device: "fake".into(),
                serial: None,
            }],
        })
        .await;
    }
    async fn close(mut self) {
        let _ = self.writer.shutdown().await;
    }
    /// Keeps the connection open until the client closes it.
    async fn linger(mut self) {
        while self.read_msg().await.is_some() {}
    }
}

struct FakeAgent;

impl FakeAgent {
    async fn start<F, Fut>(certs: &DevCerts, script: F) -> String
    where
        F: FnOnce(FakeConn) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let tls = certs.server_tls(None).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (tcp, _) = l.accept().await.unwrap();
            let s = tokio_rustls::TlsAcceptor::from(tls.config())
                .accept(tcp)
                .await
                .unwrap();
            let (r, w) = tokio::io::split(s);
            script(FakeConn {
                reader: FrameReader::new(r, "client"),
                writer: w,
            })
            .await;
        });
        addr
    }
}

/// The `SyncPlan` of a hash-compare round (protocol v3: the first answer to `SyncStart`).
fn plan_compare() -> Message {
    Message::SyncPlan {
        stream: 1,
        changes: false,
        token: None,
        dirty_bytes: 0,
        lag_ms: None,
        note: "unavailable: fake agent".into(),
    }
}
