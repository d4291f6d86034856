//! Sessions over a real QUIC connection on loopback: the end of either
//! side reaches the other even when no bytes flow, so a command whose
//! client went away (its output silent) is not left running.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use keel_sync::session::{SessionFuture, SessionHandler, open_session, serve_sessions};
use tokio::sync::mpsc;

mod support;

/// Hands each opened session's output sender and input receiver to the
/// test, and answers with the output's receiver.
struct Handler(mpsc::Sender<(mpsc::Sender<Bytes>, mpsc::Receiver<Bytes>)>);

impl SessionHandler for Handler {
    fn open(&self, _request: Vec<u8>, input: mpsc::Receiver<Bytes>) -> SessionFuture {
        let (tx, rx) = mpsc::channel(4);
        let opened = self.0.clone();
        Box::pin(async move {
            opened.send((tx, input)).await.expect("the test waits");
            Ok(rx)
        })
    }
}

/// A connected pair: the opener's connection, and the sessions the other
/// side's handler opened.
async fn connected() -> (
    quinn::Endpoint,
    quinn::Connection,
    mpsc::Receiver<(mpsc::Sender<Bytes>, mpsc::Receiver<Bytes>)>,
) {
    let (server, client) = support::endpoints(None);
    let (accepted, conn) = support::connect(&server, &client).await;
    let (opened_tx, opened) = mpsc::channel(4);
    // The side that answers sessions (an edge node) serves whatever the
    // other side opens.
    tokio::spawn(async move {
        let _server = server;
        serve_sessions(accepted, Arc::new(Handler(opened_tx))).await;
    });
    (client, conn, opened)
}

const WITHIN: Duration = Duration::from_secs(5);

/// Both ends of one open session.
struct Session {
    /// The opener's input to the session, and the session's output.
    input: mpsc::Sender<Bytes>,
    output: mpsc::Receiver<Bytes>,
    /// The answering side's output sender and input receiver.
    out_tx: mpsc::Sender<Bytes>,
    in_rx: mpsc::Receiver<Bytes>,
}

/// Opens a session with input over a fresh connection (the endpoint must
/// outlive it).
async fn session() -> (quinn::Endpoint, Session) {
    let (endpoint, conn, mut opened) = connected().await;
    let (input, input_rx) = mpsc::channel::<Bytes>(4);
    let output = open_session(&conn, b"request", Some(input_rx), WITHIN)
        .await
        .unwrap()
        .unwrap();
    let (out_tx, in_rx) = opened.recv().await.unwrap();
    let s = Session {
        input,
        output,
        out_tx,
        in_rx,
    };
    (endpoint, s)
}

/// Bytes flow from `tx` to `rx` across the session; then `rx` is dropped
/// while nothing is sent, and `tx` must learn it without writing.
async fn reader_leaving_is_felt(tx: mpsc::Sender<Bytes>, mut rx: mpsc::Receiver<Bytes>) {
    tx.send(Bytes::from_static(b"hello")).await.unwrap();
    assert_eq!(rx.recv().await.unwrap(), Bytes::from_static(b"hello"));
    assert!(!tx.is_closed());
    drop(rx);
    tokio::time::timeout(WITHIN, tx.closed())
        .await
        .expect("the sender was not closed after its reader across the session went away");
}

/// The opener (cloudcore, for a client) stops reading a session's output
/// (the client went away): the answering side's producer (an exec'd
/// command's output, silent) sees its channel closed.
#[tokio::test]
async fn a_reader_that_goes_away_ends_a_silent_output() {
    let (_endpoint, s) = session().await;
    reader_leaving_is_felt(s.out_tx, s.output).await;
}

/// The answering side stops reading a session's input: the opener's
/// input sender sees its channel closed.
#[tokio::test]
async fn an_input_nobody_reads_any_more_ends_its_sender() {
    let (_endpoint, s) = session().await;
    reader_leaving_is_felt(s.input, s.in_rx).await;
}
