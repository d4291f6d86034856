//! The QUIC driver against a peer that stops reading: a link whose peer
//! lacks records and acknowledges nothing closes, so the next connection
//! starts from both sides' durable cursors, even when nothing more can be
//! sent to count as retransmitted (the bulk writer waits on QUIC flow
//! control while the connection itself stays up).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use keel_log::{Entry, PayloadKind, Record, Role, Store, StoreOptions};
use keel_sync::frame::{ErrorCode, encode_frame};
use keel_sync::link::{Link, LinkConfig, Refusal, Side, down_stream, up_stream};
use keel_sync::quic::{Room, Sink, room_now, run_link};

mod support;

/// Keeps nothing, refuses nothing.
struct Quiet;

impl Sink for Quiet {
    fn persisted(&self, _node: &str, _stream: &str, _records: &[Record]) {}
    fn snapshot_installed(&self, _node: &str, _stream: &str) {}
    fn room(&self) -> Room<'_> {
        room_now()
    }
    fn admit(&self, _node: &str, _stream: &str, _records: &[Record]) -> Result<(), Refusal> {
        Ok(())
    }
}

#[tokio::test]
async fn a_peer_that_reads_nothing_is_given_up() {
    let node = "n1";
    let (down, up) = (down_stream(node), up_stream(node));
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    store.create_stream(&down, Role::Writer, 1).unwrap();
    store.create_stream(&up, Role::Replica, 1).unwrap();
    // Far more than the peer's stream window below.
    for i in 0..64 {
        let e = Entry::new(
            "cloud",
            format!("k{i}"),
            PayloadKind::Event,
            vec![7u8; 4096],
        );
        store.append(&down, vec![e]).unwrap();
    }
    // The peer takes 2 KiB of a stream, then nothing: it never reads.
    let mut transport = quinn::TransportConfig::default();
    transport.stream_receive_window(quinn::VarInt::from_u32(2048));
    let (server, client) = support::endpoints(Some(transport));
    let (accepted, conn) = support::connect(&server, &client).await;
    let mut cfg = LinkConfig::new(node, Side::Cloud, store.info(&up).unwrap().head);
    cfg.unacked_limit_ms = 1_000;
    // Retransmission gives up sooner, if it ever counts: it does not, as
    // nothing is sent again once the bulk queue is full.
    cfg.retransmit_ms = 100;
    cfg.max_unacked_retransmits = 3;
    // The peer answers no ping either: only the rule under test may close.
    cfg.ping_interval_ms = 600_000;
    cfg.idle_timeout_ms = 600_000;
    let link = tokio::spawn(run_link(accepted, store, cfg, Arc::new(Quiet), None));
    // The peer says Hello (as an edge that holds nothing of `down`), then
    // reads nothing the other side sends.
    let mut edge = Link::new(
        LinkConfig::new(node, Side::Edge, keel_log::Cursor::default()),
        0,
    );
    let hello = encode_frame(&edge.poll_control().expect("a link starts with its Hello"));
    let mut ctrl = conn.open_uni().await.unwrap();
    ctrl.write_all(&[0]).await.unwrap();
    ctrl.write_all(&u32::try_from(hello.len()).unwrap().to_be_bytes())
        .await
        .unwrap();
    ctrl.write_all(&hello).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(20), link)
        .await
        .expect("the link never gave up on a peer that reads nothing")
        .unwrap();
    assert_eq!(closed.code, ErrorCode::IdleTimeout, "{closed:?}");
    assert!(
        closed.message.contains("while it lacks"),
        "closed by another rule: {closed:?}"
    );
    drop((ctrl, conn, server, client));
}
