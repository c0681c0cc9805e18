//! The WAN link emulator of the benchmark (fb-wanlink): bytes arrive intact in both directions,
//! EOF is forwarded, every exchange costs at least the RTT and the rate cap is shared by all
//! connections. Only lower bounds on time are asserted: a slow machine cannot make them fail.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use failback_tests::wanlink::{self, Link, LinkSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An echo server on 127.0.0.1 and an emulated link in front of it; returns the link's address.
async fn echo_behind_link(spec: LinkSpec) -> SocketAddr {
    let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = echo.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = echo.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                tokio::io::copy(&mut r, &mut w).await.unwrap();
                w.shutdown().await.unwrap();
            });
        }
    });
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = front.local_addr().unwrap();
    tokio::spawn(wanlink::serve(front, upstream, Link::new(spec)));
    addr
}

/// Send `data` through the link to the echo server, half-close, read everything back.
async fn round_trip(addr: SocketAddr, data: Vec<u8>) -> Vec<u8> {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.unwrap();
    writer.await.unwrap();
    back
}

#[tokio::test]
async fn bytes_arrive_intact_and_eof_is_forwarded() {
    let addr = echo_behind_link(LinkSpec::new(10, 400).unwrap()).await;
    let data = failback_tests::random_bytes(7, 3 << 20);
    let back = round_trip(addr, data.clone()).await;
    assert_eq!(back.len(), data.len(), "echoed length");
    assert!(back == data, "echoed bytes differ from the bytes sent");
}

#[tokio::test]
async fn every_exchange_costs_at_least_the_rtt() {
    let addr = echo_behind_link(LinkSpec::new(60, 1000).unwrap()).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    for i in 0..3u8 {
        let t = Instant::now();
        s.write_all(&[i]).await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(b[0], i);
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(58),
            "ping {i} took {took:?} < RTT 60 ms"
        );
    }
}

#[tokio::test]
async fn the_rate_is_one_link_shared_by_all_connections() {
    // 16 Mbit/s = 2 MB/s each way; two connections of 1 MB each share it: >= ~1 s in total
    // (each alone would pass in 0.5 s if the cap were per connection).
    let addr = echo_behind_link(LinkSpec::new(2, 16).unwrap()).await;
    let t = Instant::now();
    let a = tokio::spawn(round_trip(addr, vec![1u8; 1_000_000]));
    let b = tokio::spawn(round_trip(addr, vec![2u8; 1_000_000]));
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert!(a.iter().all(|x| *x == 1) && a.len() == 1_000_000);
    assert!(b.iter().all(|x| *x == 2) && b.len() == 1_000_000);
    let took = t.elapsed();
    // 2 MB at 2 MB/s less one burst (64 KiB) per direction.
    assert!(
        took >= Duration::from_millis(900),
        "2 MB through a 2 MB/s link took {took:?}"
    );
}

#[test]
fn link_specs_out_of_range_are_refused() {
    assert!(LinkSpec::new(40, 0).is_err());
    assert!(LinkSpec::new(40, 40_000).is_err());
    assert!(LinkSpec::new(20_000, 100).is_err());
    assert_eq!(
        LinkSpec::new(40, 1000).unwrap().bytes_per_second,
        125_000_000
    );
}
