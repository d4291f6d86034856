//! EventBus: edgecore's MQTT broker for mappers and devices, on loopback.
//!
//! A small MQTT 3.1.1 broker (packets encoded and decoded by rumqttc's
//! codec): CONNECT, SUBSCRIBE / UNSUBSCRIBE with `+` / `#` wildcards,
//! PUBLISH at QoS 0 and 1, PINGREQ, DISCONNECT, last will. Every publish
//! goes to the [`Ingest`] handler (DeviceTwin) and to matching
//! subscribers. A QoS 1 publish the handler records in the log is
//! acknowledged (PUBACK) only once that record is durable, so an ack
//! means fsync'd here too; acknowledgements keep the order of the
//! publishes. Deliveries to subscribers are QoS 0 (SUBACK grants 0), and a
//! subscriber that falls 1,024 messages behind loses messages rather than
//! holding up the bus. No retained messages, no persistent sessions, no
//! QoS 2 (a QoS 2 publish closes the connection).
//!
//! Why not rumqttd's broker: its router neither accepts subscriptions to
//! nor delivers topics starting with `$`, and KubeEdge's topics all do
//! (`$hw/events/...`, `$ke/events/...`).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tracing::{Instrument, debug, info, info_span, warn};

/// Largest packet accepted or sent.
pub const MAX_PACKET: usize = 256 * 1024;
/// Deliveries queued per subscriber before messages are dropped.
pub const OUT_QUEUE: usize = 1024;
/// Bytes a connection may have published that are not durable yet; past
/// it, the broker stops reading from that client (TCP flow control) until
/// records are fsync'd. QoS 0 messages count too.
pub const IN_FLIGHT_BYTES: usize = 1 << 20;
/// Publishes of a connection waiting for durability (for their PUBACK).
const ACK_QUEUE: usize = 1024;
/// How long a publish may wait for room before its connection is closed.
const STALLED: Duration = Duration::from_secs(60);
/// Connections served at once; more are closed as they come.
pub const MAX_CONNECTIONS: usize = 256;
/// Time a client has to send CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Resolves to whether a published message is durable.
pub type Durable = Pin<Box<dyn Future<Output = bool> + Send>>;

/// What the bus hands every publish to.
pub trait Ingest: Send + Sync {
    /// `client` published `payload` on `topic`. Returns a future that
    /// resolves once what was recorded is durable (the PUBACK of a QoS 1
    /// publish waits for it), or `None` if nothing was recorded.
    fn publish(&self, client: &str, topic: &str, payload: &Bytes) -> Option<Durable>;
}

struct Subscription {
    conn: u64,
    filter: String,
    tx: mpsc::Sender<Packet>,
}

struct Shared {
    /// Who may connect (none: anyone, for a loopback broker).
    users: Option<MqttUsers>,
    subs: Mutex<Vec<Subscription>>,
    clients: Mutex<HashMap<String, (u64, Arc<Notify>)>>,
    ingest: Mutex<Option<Arc<dyn Ingest>>>,
    next_conn: AtomicU64,
    dropped: AtomicU64,
    connections: Arc<Semaphore>,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            users: None,
            subs: Mutex::default(),
            clients: Mutex::default(),
            ingest: Mutex::default(),
            next_conn: AtomicU64::default(),
            dropped: AtomicU64::default(),
            connections: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The broker (cheap to clone).
#[derive(Clone)]
pub struct EventBus {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBus")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Does `topic` match subscription `filter`? Wildcards at the first level
/// do not match topics starting with `$` (MQTT 3.1.1, 4.7.2).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A valid subscription filter: `#` only last and alone in its level, `+`
/// alone in its level.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    levels.iter().enumerate().all(|(i, l)| {
        (!l.contains('#') || (*l == "#" && i == last)) && (!l.contains('+') || *l == "+")
    })
}

impl EventBus {
    /// Listens on `addr` (loopback).
    pub async fn bind(addr: SocketAddr, users: Option<MqttUsers>) -> std::io::Result<EventBus> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let bus = EventBus {
            shared: Arc::new(Shared {
                users,
                ..Shared::default()
            }),
            addr,
        };
        let shared = bus.shared.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        let Ok(permit) = shared.connections.clone().try_acquire_owned() else {
                            debug!(%peer, "MQTT connection refused: {MAX_CONNECTIONS} served already");
                            continue;
                        };
                        let _ = stream.set_nodelay(true);
                        let conn = shared.next_conn.fetch_add(1, Ordering::Relaxed);
                        let span = info_span!("mqtt", %peer, conn);
                        let shared = shared.clone();
                        tokio::spawn(
                            async move {
                                serve(shared, stream, conn).await;
                                drop(permit);
                            }
                            .instrument(span),
                        );
                    }
                    Err(e) => {
                        warn!(error = %e, "accepting an MQTT connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        info!(%addr, "event bus (MQTT) listening");
        Ok(bus)
    }

    /// The address the broker listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets the handler every publish goes to.
    pub fn set_ingest(&self, ingest: Arc<dyn Ingest>) {
        *lock(&self.shared.ingest) = Some(ingest);
    }

    /// Publishes `payload` on `topic` to the subscribers (QoS 0).
    pub fn publish(&self, topic: &str, payload: impl Into<Bytes>) {
        deliver(&self.shared, topic, payload.into());
    }

    /// Messages dropped because a subscriber was too slow.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

fn deliver(shared: &Shared, topic: &str, payload: Bytes) {
    let subs = lock(&shared.subs);
    let mut sent_to: Vec<u64> = Vec::new();
    for s in subs.iter() {
        // One copy per connection, however many of its filters match.
        if sent_to.contains(&s.conn) || !matches(&s.filter, topic) {
            continue;
        }
        sent_to.push(s.conn);
        let p = Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: topic.to_owned(),
            pkid: 0,
            payload: payload.clone(),
        };
        if s.tx.try_send(Packet::Publish(p)).is_err() {
            shared.dropped.fetch_add(1, Ordering::Relaxed);
            debug!(conn = s.conn, %topic, "subscriber too slow; message dropped");
        }
    }
}

/// The users an authenticating broker accepts, from a password file:
/// `user:password` lines (blank lines and `#` comments skipped), which
/// must be readable by its owner only. Passwords are held and compared as
/// BLAKE3 digests (constant-time comparison).
#[derive(Clone)]
pub struct MqttUsers(HashMap<String, blake3::Hash>);

impl std::fmt::Debug for MqttUsers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttUsers")
            .field("users", &self.0.len())
            .finish()
    }
}

/// Largest password file read.
const MAX_PASSWORD_FILE: u64 = 1 << 20;

impl MqttUsers {
    /// Reads the password file at `path`.
    ///
    /// # Errors
    /// A message naming the file: unreadable, too large, readable by group
    /// or others, a line without `:`, an empty user or password, or no
    /// user at all.
    pub fn load(path: &std::path::Path) -> Result<MqttUsers, String> {
        use std::io::Read as _;
        use std::os::unix::fs::PermissionsExt as _;
        let name = path.display();
        let f = std::fs::File::open(path).map_err(|e| format!("{name}: {e}"))?;
        let mode = f
            .metadata()
            .map_err(|e| format!("{name}: {e}"))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(format!(
                "{name}: readable by others (mode {:o}); it must be its owner's only (chmod 600)",
                mode & 0o777
            ));
        }
        let mut text = String::new();
        f.take(MAX_PASSWORD_FILE + 1)
            .read_to_string(&mut text)
            .map_err(|e| format!("{name}: {e}"))?;
        if text.len() as u64 > MAX_PASSWORD_FILE {
            return Err(format!("{name}: larger than {MAX_PASSWORD_FILE} bytes"));
        }
        Self::parse(&text).map_err(|e| format!("{name}: {e}"))
    }

    /// Parses `user:password` lines.
    ///
    /// # Errors
    /// The first bad line (by number), or no user at all.
    pub fn parse(text: &str) -> Result<MqttUsers, String> {
        let mut users = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            match line.split_once(':') {
                Some((u, p)) if !u.is_empty() && !p.is_empty() => {
                    users.insert(u.to_owned(), blake3::hash(p.as_bytes()));
                }
                _ => return Err(format!("line {}: not user:password", n + 1)),
            }
        }
        if users.is_empty() {
            return Err("no user in it".into());
        }
        Ok(MqttUsers(users))
    }

    /// Whether `user` logs in with `password`.
    pub fn check(&self, user: &str, password: &str) -> bool {
        self.0
            .get(user)
            .is_some_and(|h| *h == blake3::hash(password.as_bytes()))
    }
}

/// Why a connection was closed.
#[derive(Debug, thiserror::Error)]
enum Close {
    #[error("client disconnected")]
    Disconnect,
    #[error("connection closed by the client")]
    Eof,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol error: {0}")]
    Codec(String),
    #[error("{0}")]
    Refused(&'static str),
    #[error("keep-alive expired")]
    KeepAlive,
    #[error("taken over by a new connection with the same client id")]
    TakenOver,
}

async fn read_packet(
    rd: &mut (impl AsyncReadExt + Unpin),
    buf: &mut BytesMut,
) -> Result<Packet, Close> {
    loop {
        match Packet::read(buf, MAX_PACKET) {
            Ok(p) => return Ok(p),
            Err(CodecError::InsufficientBytes(_)) => {}
            Err(e) => return Err(Close::Codec(e.to_string())),
        }
        if rd.read_buf(buf).await? == 0 {
            return Err(Close::Eof);
        }
    }
}

async fn serve(shared: Arc<Shared>, stream: TcpStream, conn: u64) {
    let (mut rd, mut wr) = stream.into_split();
    let mut buf = BytesMut::with_capacity(4096);
    let connect = match tokio::time::timeout(CONNECT_TIMEOUT, read_packet(&mut rd, &mut buf)).await
    {
        Ok(Ok(Packet::Connect(c))) => c,
        Ok(Ok(_)) => {
            debug!("first packet was not CONNECT; closing");
            return;
        }
        Ok(Err(e)) => {
            debug!(error = %e, "no CONNECT; closing");
            return;
        }
        Err(_) => {
            debug!("no CONNECT in time; closing");
            return;
        }
    };
    let mut out = BytesMut::new();
    if let Some(users) = &shared.users
        && !connect
            .login
            .as_ref()
            .is_some_and(|l| users.check(&l.username, &l.password))
    {
        debug!(user = ?connect.login.as_ref().map(|l| &l.username), "MQTT login refused");
        let _ = Packet::ConnAck(ConnAck::new(ConnectReturnCode::BadUserNamePassword, false))
            .write(&mut out, MAX_PACKET);
        let _ = wr.write_all(&out).await;
        return;
    }
    if connect.client_id.is_empty() && !connect.clean_session {
        let _ = Packet::ConnAck(ConnAck::new(ConnectReturnCode::BadClientId, false))
            .write(&mut out, MAX_PACKET);
        let _ = wr.write_all(&out).await;
        return;
    }
    let client = if connect.client_id.is_empty() {
        format!("keel-anon-{conn}")
    } else {
        connect.client_id.clone()
    };
    let span = info_span!("client", %client);
    async move {
        let closing = Arc::new(Notify::new());
        if let Some((_, old)) = lock(&shared.clients).insert(client.clone(), (conn, closing.clone()))
        {
            old.notify_one();
        }
        let (tx, mut rx) = mpsc::channel::<Packet>(OUT_QUEUE);
        // Each publish not yet durable, in order: its PUBACK's packet id
        // (QoS 1), whether it is durable, and its share of the
        // connection's in-flight bytes.
        let (acks_tx, mut acks_rx) =
            mpsc::channel::<(Option<u16>, Option<Durable>, OwnedSemaphorePermit)>(ACK_QUEUE);
        let in_flight = Arc::new(Semaphore::new(IN_FLIGHT_BYTES));
        let _ = tx
            .send(Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false)))
            .await;
        // Writer.
        let writer = tokio::spawn(async move {
            let mut out = BytesMut::with_capacity(4096);
            while let Some(p) = rx.recv().await {
                out.clear();
                if p.write(&mut out, MAX_PACKET).is_err() {
                    continue;
                }
                // Coalesce what is queued already.
                while let Ok(p) = rx.try_recv() {
                    let _ = p.write(&mut out, MAX_PACKET);
                    if out.len() > 64 * 1024 {
                        break;
                    }
                }
                if wr.write_all(&out).await.is_err() {
                    return;
                }
            }
        });
        // PUBACKs, in order, each once its message is durable.
        let ack_out = tx.clone();
        let unrecorded = Arc::new(Notify::new());
        let unrecorded_tx = unrecorded.clone();
        let acker = tokio::spawn(async move {
            while let Some((pkid, durable, permit)) = acks_rx.recv().await {
                if let Some(d) = durable
                    && !d.await
                {
                    // Not durable: no ack, and the connection closes so
                    // the client resends after reconnecting.
                    warn!(?pkid, "a published message could not be recorded; not acknowledged");
                    unrecorded_tx.notify_one();
                    return;
                }
                drop(permit);
                let Some(pkid) = pkid else {
                    continue;
                };
                if ack_out
                    .send(Packet::PubAck(PubAck::new(pkid)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        let keep_alive = match connect.keep_alive {
            0 => None,
            k => Some(Duration::from_millis(u64::from(k) * 1500)),
        };
        debug!("client connected");
        let ingest = lock(&shared.ingest).clone();
        let result: Result<(), Close> = async {
            loop {
                let next = read_packet(&mut rd, &mut buf);
                let packet = tokio::select! {
                    _ = closing.notified() => return Err(Close::TakenOver),
                    _ = unrecorded.notified() => return Err(Close::Refused("a message could not be recorded")),
                    p = async {
                        match keep_alive {
                            Some(k) => tokio::time::timeout(k, next).await.map_err(|_| Close::KeepAlive)?,
                            None => next.await,
                        }
                    } => p?,
                };
                match packet {
                    Packet::Publish(p) => {
                        if p.qos == QoS::ExactlyOnce {
                            return Err(Close::Refused("QoS 2 is not supported"));
                        }
                        if p.topic.is_empty() || p.topic.contains(['+', '#']) {
                            return Err(Close::Refused("invalid topic name"));
                        }
                        // Backpressure: with this connection's share of
                        // unrecorded bytes used up, nothing more is read
                        // from it until earlier messages are durable.
                        // A client that reads none of its PUBACKs holds
                        // its slot only so long.
                        let cost = (p.payload.len() + p.topic.len()).clamp(1, IN_FLIGHT_BYTES);
                        let permit = tokio::time::timeout(
                            STALLED,
                            in_flight
                                .clone()
                                .acquire_many_owned(u32::try_from(cost).unwrap_or(u32::MAX)),
                        )
                        .await
                        .map_err(|_| Close::Refused("no progress for a minute (are PUBACKs read?)"))?
                        .map_err(|_| Close::Refused("shutting down"))?;
                        let durable = ingest
                            .as_ref()
                            .and_then(|i| i.publish(&client, &p.topic, &p.payload));
                        deliver(&shared, &p.topic, p.payload.clone());
                        let pkid = (p.qos == QoS::AtLeastOnce).then_some(p.pkid);
                        if (pkid.is_some() || durable.is_some())
                            && !matches!(
                                tokio::time::timeout(STALLED, acks_tx.send((pkid, durable, permit))).await,
                                Ok(Ok(()))
                            )
                        {
                            return Err(Close::Refused("acknowledgements stalled"));
                        }
                    }
                    Packet::Subscribe(s) => {
                        let mut codes = Vec::with_capacity(s.filters.len());
                        {
                            let mut subs = lock(&shared.subs);
                            for f in &s.filters {
                                if valid_filter(&f.path) {
                                    subs.retain(|x| !(x.conn == conn && x.filter == f.path));
                                    subs.push(Subscription {
                                        conn,
                                        filter: f.path.clone(),
                                        tx: tx.clone(),
                                    });
                                    codes.push(SubscribeReasonCode::Success(QoS::AtMostOnce));
                                } else {
                                    codes.push(SubscribeReasonCode::Failure);
                                }
                            }
                        }
                        debug!(filters = ?s.filters.iter().map(|f| &f.path).collect::<Vec<_>>(), "subscribed");
                        let _ = tx.send(Packet::SubAck(SubAck::new(s.pkid, codes))).await;
                    }
                    Packet::Unsubscribe(u) => {
                        lock(&shared.subs)
                            .retain(|x| !(x.conn == conn && u.topics.contains(&x.filter)));
                        let _ = tx.send(Packet::UnsubAck(UnsubAck::new(u.pkid))).await;
                    }
                    Packet::PingReq => {
                        let _ = tx.send(Packet::PingResp).await;
                    }
                    Packet::Disconnect => return Err(Close::Disconnect),
                    // Acks of QoS 0 deliveries never come; ignore strays.
                    Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubRel(_) | Packet::PubComp(_) => {}
                    Packet::Connect(_) => return Err(Close::Refused("second CONNECT")),
                    Packet::ConnAck(_)
                    | Packet::SubAck(_)
                    | Packet::UnsubAck(_)
                    | Packet::PingResp => return Err(Close::Refused("server-only packet from a client")),
                }
            }
        }
        .await;
        let reason = match result {
            Err(e) => e,
            Ok(()) => Close::Disconnect,
        };
        lock(&shared.subs).retain(|x| x.conn != conn);
        {
            let mut clients = lock(&shared.clients);
            if clients.get(&client).is_some_and(|(c, _)| *c == conn) {
                clients.remove(&client);
            }
        }
        // The will is published on any close but a DISCONNECT.
        if !matches!(reason, Close::Disconnect)
            && let Some(will) = connect.last_will.as_ref()
        {
            if let Some(i) = &ingest
                && let Some(d) = i.publish(&client, &will.topic, &will.message)
            {
                let _ = d.await;
            }
            deliver(&shared, &will.topic, will.message.clone());
        }
        match reason {
            Close::Disconnect | Close::Eof => debug!(%reason, "client gone"),
            _ => info!(%reason, "MQTT connection closed"),
        }
        // Let queued PUBACKs go out, then stop writing.
        drop(acks_tx);
        let _ = acker.await;
        drop(tx);
        let _ = writer.await;
    }
    .instrument(span)
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_file_lines() {
        let Ok(u) = MqttUsers::parse("# who\n\nmapper:s3:cret\r\nother:x\n") else {
            unreachable!("a good file");
        };
        assert!(u.check("mapper", "s3:cret"));
        assert!(u.check("other", "x"));
        assert!(!u.check("mapper", "s3"));
        assert!(!u.check("nobody", "x"));
        for bad in ["", "# only a comment\n", "nocolon\n", ":pw\n", "user:\n"] {
            assert!(MqttUsers::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn topic_matching() {
        assert!(matches(
            "$hw/events/device/+/+/twin/update",
            "$hw/events/device/ns/d/twin/update"
        ));
        assert!(!matches(
            "$hw/events/device/+/+/twin/update",
            "$hw/events/device/ns/d/twin/get"
        ));
        assert!(matches("$hw/events/upload/#", "$hw/events/upload/a/b"));
        assert!(matches("a/#", "a"));
        assert!(!matches("#", "$hw/x"));
        assert!(!matches("+/x", "$hw/x"));
        assert!(matches("#", "a/b"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(valid_filter("a/+/b/#"));
        assert!(!valid_filter("a/b#"));
        assert!(!valid_filter("a/#/b"));
        assert!(!valid_filter("a+/b"));
        assert!(!valid_filter(""));
    }
}
