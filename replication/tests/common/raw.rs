//! A bare protocol client for attack tests: real TLS and frames, none of the engine's rules,
//! so a test can send what a well-behaved client never would. Shared with the agent crate's
//! tests (`#[path]`), so it uses only `failback_replication`, `rustls` and `tokio`.
#![allow(dead_code)]

use std::time::Duration;

use failback_replication::conn::{spawn_writer, DeadSlot, FrameReader, FrameSender};
use failback_replication::record::{self, TlsReader};
use failback_replication::tls::AGENT_SERVER_NAME;
use failback_replication::wire::{DiskInfo, Message, PROTOCOL_VERSION};
use failback_replication::ClientTls;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

/// How long a test waits for any one answer from the agent.
pub const ANSWER: Duration = Duration::from_secs(20);

/// A TLS connection to an agent with frame I/O.
pub struct Raw {
    pub out: FrameSender,
    pub reader: FrameReader<TlsReader>,
    writer: tokio::task::JoinHandle<()>,
}

impl Raw {
    /// TCP and the TLS handshake only.
    pub async fn tls(addr: &str, tls: &ClientTls) -> std::io::Result<Raw> {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from(AGENT_SERVER_NAME)
            .expect("server name")
            .to_owned();
        let (r, w) = record::connect(tcp, tls.config(), name).await?;
        let (out, writer) = spawn_writer(w, DeadSlot::default());
        Ok(Raw {
            out,
            reader: FrameReader::new(r, addr),
            writer,
        })
    }

    /// TLS, hello, and the agent's hello and manifest (panics on anything else).
    pub async fn connect(addr: &str, tls: &ClientTls) -> (Raw, Vec<DiskInfo>) {
        let mut raw = Raw::tls(addr, tls).await.expect("TLS handshake");
        raw.send(Message::ClientHello {
            version: PROTOCOL_VERSION,
        })
        .await;
        let hello = raw.next().await;
        assert!(
            matches!(hello, Some(Message::AgentHello { .. })),
            "{hello:?}"
        );
        match raw.next().await {
            Some(Message::Manifest { disks }) => (raw, disks),
            other => panic!("expected the manifest, got {other:?}"),
        }
    }

    /// Queues a message.
    pub async fn send(&self, m: Message) {
        assert!(self.out.send(&m).await, "connection gone");
    }

    /// Queues raw bytes (e.g. a bare length prefix).
    pub async fn send_bytes(&self, b: Vec<u8>) {
        assert!(self.out.send_raw(b).await, "connection gone");
    }

    /// The next message (`None` when the agent closed the connection or it failed); panics
    /// after [`ANSWER`] without one.
    pub async fn next(&mut self) -> Option<Message> {
        match tokio::time::timeout(ANSWER, self.reader.read()).await {
            Ok(Ok(m)) => m.map(|(m, _)| m),
            Ok(Err(_)) => None,
            Err(_) => panic!("no answer from the agent within {ANSWER:?}"),
        }
    }

    /// Messages until `stop` returns true for one (included) or the connection ends.
    pub async fn until(&mut self, mut stop: impl FnMut(&Message) -> bool) -> Vec<Message> {
        let mut got = Vec::new();
        while let Some(m) = self.next().await {
            let done = stop(&m);
            got.push(m);
            if done {
                break;
            }
        }
        got
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        self.writer.abort();
    }
}
