//! The client side of a CRI runtime's streaming server, for `exec` and
//! `attach`: the URL CRI `Exec` or `Attach` returns is upgraded to SPDY/3.1
//! and speaks the kubelet's
//! remote-command protocol `v4.channel.k8s.io`, as the API server speaks it
//! to a kubelet. One stream per channel (error, stdin, stdout, and stderr
//! or the terminal's resize), opened by the client; the status arrives on
//! the error stream. Unlike the protocol's WebSocket form, SPDY can say
//! that stdin ended (its stream half-closes), so `kubectl exec -i` and
//! `kubectl cp` into a container see the end of their input.
//!
//! Everything the server sends is bounded: the HTTP answer's head
//! ([`MAX_HEAD`]), each frame (the SPDY decoder's limits) and the status
//! ([`MAX_STATUS`]); output is written to the caller's pipes as it comes,
//! so a caller that does not read holds the server back.

use bytes::{Bytes, BytesMut};
use keel_api::spdy::{self, Decoder, Encoder, Frame, Headers};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::Error;

/// The remote-command protocol spoken.
const PROTOCOL: &str = "v4.channel.k8s.io";
/// Largest HTTP answer head accepted before the upgrade.
const MAX_HEAD: usize = 16 << 10;
/// Largest status accepted on the error stream.
const MAX_STATUS: usize = 64 << 10;
/// How long connecting and the upgrade may take.
const UPGRADE_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

const ERROR_STREAM: u32 = 1;
const STDIN_STREAM: u32 = 3;
const STDOUT_STREAM: u32 = 5;
/// stderr, or the terminal's resize with a tty.
const FOURTH_STREAM: u32 = 7;

/// A connection upgraded to SPDY, with what arrived after the answer's head.
pub(super) struct Upgraded {
    tcp: TcpStream,
    early: BytesMut,
}

/// Connects to the streaming server at `url` (`http://host:port/path`)
/// and upgrades to SPDY with the v4 remote-command protocol.
pub(super) async fn upgrade(url: &str) -> Result<Upgraded, Error> {
    let fail = |why: String| Error::Runtime(format!("exec: {why}"));
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| fail(format!("unexpected streaming URL {url:?}")))?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let work = async {
        let mut tcp = TcpStream::connect(host)
            .await
            .map_err(|e| fail(format!("connecting to {host}: {e}")))?;
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: {PROTOCOL}\r\nContent-Length: 0\r\n\r\n"
        );
        tcp.write_all(request.as_bytes())
            .await
            .map_err(|e| fail(e.to_string()))?;
        let mut buf = BytesMut::with_capacity(1024);
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > MAX_HEAD {
                return Err(fail("the streaming server's answer is too long".into()));
            }
            let n = tcp
                .read_buf(&mut buf)
                .await
                .map_err(|e| fail(e.to_string()))?;
            if n == 0 {
                return Err(fail("the streaming server closed before answering".into()));
            }
        };
        let head = buf.split_to(end);
        let head = String::from_utf8_lossy(&head);
        let mut lines = head.lines();
        let status = lines.next().unwrap_or_default();
        if status.split_whitespace().nth(1) != Some("101") {
            return Err(fail(format!("the streaming server answered {status:?}")));
        }
        let protocol = lines
            .filter_map(|l| l.split_once(':'))
            .find(|(name, _)| {
                name.trim()
                    .eq_ignore_ascii_case("x-stream-protocol-version")
            })
            .map(|(_, v)| v.trim().to_owned());
        if protocol.as_deref() != Some(PROTOCOL) {
            return Err(fail(format!(
                "the streaming server does not speak {PROTOCOL} (it chose {protocol:?})"
            )));
        }
        Ok(Upgraded { tcp, early: buf })
    };
    tokio::time::timeout(UPGRADE_WITHIN, work)
        .await
        .map_err(|_| fail(format!("no upgrade from {host} within {UPGRADE_WITHIN:?}")))?
}

/// Which of its output streams a session opens (stdin and the error
/// stream always; the server expects exactly what the CRI request asked).
#[derive(Clone, Copy)]
pub(super) enum Outputs {
    /// stdout and stderr.
    Both,
    /// stdout and the terminal's resize.
    Terminal,
    /// None (an attach that only writes to stdin).
    Nothing,
}

/// The caller's ends of a session.
pub(super) struct Pipes<I, O, E> {
    pub stdin: I,
    pub stdout: O,
    pub stderr: E,
    pub resize: mpsc::Receiver<(u16, u16)>,
    /// Ends the session at once when it fires or its sender goes (`None`:
    /// the session ends with its connection).
    pub cancel: Option<oneshot::Receiver<()>>,
}

/// Runs the session to its end: opens the streams, copies stdin in (its
/// end half-closes the stdin stream) and stdout/stderr out, sends resizes;
/// returns the status the server sent on the error stream (`None` if it
/// sent none, or the caller cancelled).
pub(super) async fn run<I, O, E>(
    conn: Upgraded,
    outputs: Outputs,
    mut pipes: Pipes<I, O, E>,
) -> Option<Vec<u8>>
where
    I: AsyncRead + Unpin,
    O: AsyncWrite + Unpin,
    E: AsyncWrite + Unpin,
{
    let Upgraded { tcp, early } = conn;
    let (mut rd, mut wr) = tcp.into_split();
    let mut enc = Encoder::new();
    let mut dec = Decoder::new();
    dec.push(&early);
    let mut out = BytesMut::new();
    let tty = matches!(outputs, Outputs::Terminal);
    let streams: &[(u32, &str)] = match outputs {
        Outputs::Both => &[
            (ERROR_STREAM, "error"),
            (STDIN_STREAM, "stdin"),
            (STDOUT_STREAM, "stdout"),
            (FOURTH_STREAM, "stderr"),
        ],
        Outputs::Terminal => &[
            (ERROR_STREAM, "error"),
            (STDIN_STREAM, "stdin"),
            (STDOUT_STREAM, "stdout"),
            (FOURTH_STREAM, "resize"),
        ],
        Outputs::Nothing => &[(ERROR_STREAM, "error"), (STDIN_STREAM, "stdin")],
    };
    for &(id, kind) in streams {
        let syn = Frame::SynStream {
            stream_id: id,
            associated_to: 0,
            priority: 0,
            slot: 0,
            fin: false,
            unidirectional: false,
            headers: Headers::new().with("streamtype", kind),
        };
        if enc.encode(&syn, &mut out).is_err() {
            return None;
        }
    }
    if wr.write_all(&out).await.is_err() {
        return None;
    }
    out.clear();

    let mut status = Vec::new();
    let mut stdin_open = true;
    let mut from_server = vec![0u8; 32 << 10];
    let mut from_stdin = vec![0u8; 32 << 10];
    'session: loop {
        loop {
            let frame = match dec.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(_) => break 'session,
            };
            match frame {
                Frame::Data {
                    stream_id, data, ..
                } => {
                    let written = match stream_id {
                        STDOUT_STREAM => pipes.stdout.write_all(&data).await,
                        FOURTH_STREAM if !tty => pipes.stderr.write_all(&data).await,
                        ERROR_STREAM => {
                            if status.len() + data.len() <= MAX_STATUS {
                                status.extend_from_slice(&data);
                            }
                            Ok(())
                        }
                        _ => Ok(()),
                    };
                    // A caller that stopped reading: the session ends.
                    if written.is_err() {
                        break 'session;
                    }
                }
                // The server's pings are answered.
                Frame::Ping { id } => {
                    let _ = enc.encode(&Frame::Ping { id }, &mut out);
                }
                Frame::GoAway { .. } => break 'session,
                _ => {}
            }
        }
        if !out.is_empty() {
            if wr.write_all(&out).await.is_err() {
                break;
            }
            out.clear();
        }
        tokio::select! {
            n = rd.read(&mut from_server) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => dec.push(from_server.get(..n).unwrap_or_default()),
            },
            n = pipes.stdin.read(&mut from_stdin), if stdin_open => {
                let data = match n {
                    Ok(0) | Err(_) => {
                        stdin_open = false;
                        Bytes::new()
                    }
                    Ok(n) => Bytes::copy_from_slice(from_stdin.get(..n).unwrap_or_default()),
                };
                let frame = Frame::Data { stream_id: STDIN_STREAM, fin: !stdin_open, data };
                if enc.encode(&frame, &mut out).is_err() {
                    break;
                }
            }
            Some((cols, rows)) = pipes.resize.recv(), if tty => {
                let size = serde_json::json!({"Width": cols, "Height": rows}).to_string();
                let frame = Frame::Data { stream_id: FOURTH_STREAM, fin: false, data: Bytes::from(size) };
                if enc.encode(&frame, &mut out).is_err() {
                    break;
                }
            }
            _ = async {
                match pipes.cancel.as_mut() {
                    Some(cancel) => drop(cancel.await),
                    None => std::future::pending().await,
                }
            } => {
                let bye = Frame::GoAway { last_good_stream_id: 0, status: spdy::goaway::OK };
                if enc.encode(&bye, &mut out).is_ok() {
                    let _ = wr.write_all(&out).await;
                }
                return None;
            }
        }
    }
    let _ = pipes.stdout.shutdown().await;
    let _ = pipes.stderr.shutdown().await;
    (!status.is_empty()).then_some(status)
}
