//! The mapper framework: a [`Driver`] knows one protocol (how to connect,
//! read a property and write one); [`run`] does the rest for one device —
//! reads each property every `collectCycle`, applies writes (desired
//! values, local rules) and reads them back, reports the device online or
//! offline, and reconnects with back-off when the device goes away.
//!
//! Mappers run inside edgecore and talk to DeviceTwin over channels, so a
//! reading is recorded in the node's log without a broker hop. Mappers
//! outside edgecore use the MQTT topics instead (see the edge's EventBus).

pub mod modbus;

use std::future::Future;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::types::{AccessMode, DataType, ModelProperty};
use crate::value::{Value, ValueError};

/// Default `collectCycle` where a property gives none.
pub const DEFAULT_COLLECT: Duration = Duration::from_secs(1);
/// Shortest `collectCycle` honoured.
pub const MIN_COLLECT: Duration = Duration::from_millis(10);

/// One property as a mapper sees it: model data plus protocol access `A`.
#[derive(Debug, Clone)]
pub struct PropertyPlan<A> {
    pub name: String,
    pub data_type: DataType,
    pub model: ModelProperty,
    pub collect: Duration,
    pub access: A,
}

impl<A> PropertyPlan<A> {
    /// The model allows writes.
    pub fn writable(&self) -> bool {
        self.model.access_mode == Some(AccessMode::ReadWrite)
    }
}

/// A device as a mapper sees it.
#[derive(Debug, Clone)]
pub struct DevicePlan<C, A> {
    pub namespace: String,
    pub name: String,
    pub connection: C,
    pub properties: Vec<PropertyPlan<A>>,
}

/// Why a device plan could not be made from a Device and its model (not
/// retryable until the Device or its model changes).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    #[error("device has no model (spec.deviceModelRef.name)")]
    NoModel,
    #[error("protocol {found:?} is not {expected:?}")]
    Protocol {
        expected: &'static str,
        found: Option<String>,
    },
    #[error("spec.protocol.configData.{key}: {message}")]
    Connection { key: &'static str, message: String },
    #[error("property {property:?}: {message}")]
    Property { property: String, message: String },
}

/// A protocol driver error. Only [`DriverError::Unreachable`] is retried
/// (by reconnecting); the others are answers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DriverError {
    /// The device cannot be reached (connect, I/O, timeout): reconnect.
    #[error("device unreachable: {0}")]
    Unreachable(String),
    /// The device answered with an error (exception, bad address).
    #[error("device refused: {0}")]
    Refused(String),
    /// The value cannot be written to this property.
    #[error("{0}")]
    Value(#[from] ValueError),
    #[error("property {0:?} is read-only")]
    ReadOnly(String),
}

/// One protocol.
pub trait Driver: Send {
    type Access: Send + Sync + std::fmt::Debug;
    /// Connects (again).
    fn connect(&mut self) -> impl Future<Output = Result<(), DriverError>> + Send;
    /// Reads one property.
    fn read(
        &mut self,
        p: &PropertyPlan<Self::Access>,
    ) -> impl Future<Output = Result<Value, DriverError>> + Send;
    /// Writes one property.
    fn write(
        &mut self,
        p: &PropertyPlan<Self::Access>,
        v: &Value,
    ) -> impl Future<Output = Result<(), DriverError>> + Send;
    /// Drops the connection.
    fn disconnect(&mut self);
}

/// What a mapper reports.
#[derive(Debug, Clone, PartialEq)]
pub enum MapperEvent {
    /// A value read from the device; `after_write` when it is the read-back
    /// of a write.
    Reading {
        property: String,
        value: Value,
        at: SystemTime,
        after_write: bool,
    },
    /// A write was applied to the device (`source` as given with it).
    Written {
        property: String,
        value: String,
        source: WriteSource,
    },
    /// A write was refused and will not be retried (bad value, read-only,
    /// device exception).
    WriteFailed {
        property: String,
        value: String,
        source: WriteSource,
        error: String,
    },
    /// The device became reachable (`online`) or not.
    State {
        online: bool,
        reason: Option<String>,
    },
}

/// Who asked for a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteSource {
    /// The cloud's desired value.
    Desired,
    /// A local rule (its name).
    Rule(String),
}

/// A write for a mapper to apply.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteCommand {
    pub property: String,
    pub value: String,
    pub source: WriteSource,
}

/// Reconnect back-off: `initial` doubling up to `max`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(5),
        }
    }
}

/// Runs one device until `writes` is closed (the device went away) or
/// `events` is dropped.
pub async fn run<D: Driver>(
    plan: DevicePlan<impl std::fmt::Debug + Send + Sync, D::Access>,
    mut driver: D,
    events: mpsc::Sender<MapperEvent>,
    mut writes: mpsc::Receiver<WriteCommand>,
    backoff: Backoff,
) {
    let device = format!("{}/{}", plan.namespace, plan.name);
    let mut due: Vec<Instant> = vec![Instant::now(); plan.properties.len()];
    // Writes that wait for a connection: the latest per property.
    let mut pending: Vec<WriteCommand> = Vec::new();
    let mut online: Option<bool> = None;
    let mut wait = backoff.initial;
    loop {
        // Connect.
        if online != Some(true) {
            match driver.connect().await {
                Ok(()) => {
                    info!(%device, "device connected");
                    online = Some(true);
                    wait = backoff.initial;
                    if events
                        .send(MapperEvent::State {
                            online: true,
                            reason: None,
                        })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Err(e) => {
                    if online != Some(false) {
                        warn!(%device, error = %e, "device unreachable; retrying");
                        online = Some(false);
                        if events
                            .send(MapperEvent::State {
                                online: false,
                                reason: Some(e.to_string()),
                            })
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    let until = Instant::now() + wait;
                    wait = (wait * 2).min(backoff.max);
                    loop {
                        tokio::select! {
                            _ = tokio::time::sleep_until(until) => break,
                            cmd = writes.recv() => match cmd {
                                Some(c) => queue(&mut pending, c),
                                None => return,
                            },
                        }
                    }
                    continue;
                }
            }
        }
        // Writes that waited.
        let mut failed = None;
        for cmd in std::mem::take(&mut pending) {
            if failed.is_some() {
                queue(&mut pending, cmd);
                continue;
            }
            match apply(&plan, &mut driver, &cmd, &events).await {
                Ok(()) => {}
                Err(e) => {
                    queue(&mut pending, cmd);
                    failed = Some(e);
                }
            }
        }
        if let Some(e) = failed {
            if lost(&device, &mut driver, &events, &mut online, e).await {
                return;
            }
            continue;
        }
        // Read what is due, or wait for the next due time or a write.
        let Some((i, next)) = due.iter().copied().enumerate().min_by_key(|(_, t)| *t) else {
            // No properties: only writes (none possible) — wait for close.
            if writes.recv().await.is_none() {
                return;
            }
            continue;
        };
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {
                let Some(p) = plan.properties.get(i) else { continue };
                if let Some(d) = due.get_mut(i) {
                    *d = (next + p.collect).max(Instant::now());
                }
                match driver.read(p).await {
                    Ok(value) => {
                        let ev = MapperEvent::Reading {
                            property: p.name.clone(),
                            value,
                            at: SystemTime::now(),
                            after_write: false,
                        };
                        if events.send(ev).await.is_err() {
                            return;
                        }
                    }
                    Err(DriverError::Unreachable(m)) => {
                        if lost(&device, &mut driver, &events, &mut online, m).await {
                            return;
                        }
                    }
                    Err(e) => debug!(%device, property = %p.name, error = %e, "read refused"),
                }
            }
            cmd = writes.recv() => {
                let Some(cmd) = cmd else { return };
                if let Err(m) = apply(&plan, &mut driver, &cmd, &events).await {
                    queue(&mut pending, cmd);
                    if lost(&device, &mut driver, &events, &mut online, m).await {
                        return;
                    }
                }
            }
        }
    }
}

fn queue(pending: &mut Vec<WriteCommand>, cmd: WriteCommand) {
    pending.retain(|c| c.property != cmd.property);
    pending.push(cmd);
}

/// The connection broke: report it; true if the events receiver is gone.
async fn lost<D: Driver>(
    device: &str,
    driver: &mut D,
    events: &mpsc::Sender<MapperEvent>,
    online: &mut Option<bool>,
    reason: String,
) -> bool {
    warn!(%device, %reason, "device connection lost");
    driver.disconnect();
    *online = Some(false);
    events
        .send(MapperEvent::State {
            online: false,
            reason: Some(reason),
        })
        .await
        .is_err()
}

/// Applies one write and reads it back. `Err` (with the reason) only when
/// the device is unreachable; other failures are reported as
/// [`MapperEvent::WriteFailed`].
async fn apply<C, D: Driver>(
    plan: &DevicePlan<C, D::Access>,
    driver: &mut D,
    cmd: &WriteCommand,
    events: &mpsc::Sender<MapperEvent>,
) -> Result<(), String> {
    let fail = |error: String| MapperEvent::WriteFailed {
        property: cmd.property.clone(),
        value: cmd.value.clone(),
        source: cmd.source.clone(),
        error,
    };
    let Some(p) = plan.properties.iter().find(|p| p.name == cmd.property) else {
        let _ = events
            .send(fail("the device has no such property".to_owned()))
            .await;
        return Ok(());
    };
    if !p.writable() {
        let _ = events
            .send(fail(DriverError::ReadOnly(p.name.clone()).to_string()))
            .await;
        return Ok(());
    }
    let value = match Value::parse(&cmd.value, p.data_type).and_then(|v| {
        v.check_bounds(&p.model)?;
        Ok(v)
    }) {
        Ok(v) => v,
        Err(e) => {
            let _ = events.send(fail(e.to_string())).await;
            return Ok(());
        }
    };
    match driver.write(p, &value).await {
        Ok(()) => {}
        Err(DriverError::Unreachable(m)) => return Err(m),
        Err(e) => {
            let _ = events.send(fail(e.to_string())).await;
            return Ok(());
        }
    }
    let _ = events
        .send(MapperEvent::Written {
            property: p.name.clone(),
            value: cmd.value.clone(),
            source: cmd.source.clone(),
        })
        .await;
    match driver.read(p).await {
        Ok(v) => {
            let _ = events
                .send(MapperEvent::Reading {
                    property: p.name.clone(),
                    value: v,
                    at: SystemTime::now(),
                    after_write: true,
                })
                .await;
            Ok(())
        }
        Err(DriverError::Unreachable(m)) => Err(m),
        Err(_) => Ok(()),
    }
}

/// Milliseconds in a `collectCycle` (KubeEdge's unit), bounded below.
pub fn cycle(ms: Option<i64>) -> Duration {
    match ms {
        Some(ms) if ms > 0 => Duration::from_millis(ms.unsigned_abs()).max(MIN_COLLECT),
        _ => DEFAULT_COLLECT,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A device that can be switched off.
    #[derive(Debug, Default)]
    struct Fake {
        up: bool,
        value: i64,
        connects: u32,
    }

    #[derive(Debug, Clone)]
    struct FakeDriver(Arc<Mutex<Fake>>, bool);

    impl Driver for FakeDriver {
        type Access = ();
        async fn connect(&mut self) -> Result<(), DriverError> {
            let mut f = self.0.lock().unwrap();
            if f.up {
                f.connects += 1;
                self.1 = true;
                Ok(())
            } else {
                Err(DriverError::Unreachable("refused".into()))
            }
        }
        async fn read(&mut self, _: &PropertyPlan<()>) -> Result<Value, DriverError> {
            let f = self.0.lock().unwrap();
            if f.up && self.1 {
                Ok(Value::Int(f.value))
            } else {
                Err(DriverError::Unreachable("gone".into()))
            }
        }
        async fn write(&mut self, _: &PropertyPlan<()>, v: &Value) -> Result<(), DriverError> {
            let mut f = self.0.lock().unwrap();
            if !(f.up && self.1) {
                return Err(DriverError::Unreachable("gone".into()));
            }
            f.value = v.as_f64().unwrap() as i64;
            Ok(())
        }
        fn disconnect(&mut self) {
            self.1 = false;
        }
    }

    fn plan() -> DevicePlan<(), ()> {
        DevicePlan {
            namespace: "ns".into(),
            name: "d".into(),
            connection: (),
            properties: vec![PropertyPlan {
                name: "level".into(),
                data_type: DataType::Int,
                model: ModelProperty {
                    access_mode: Some(AccessMode::ReadWrite),
                    maximum: Some("100".into()),
                    ..Default::default()
                },
                collect: Duration::from_secs(1),
                access: (),
            }],
        }
    }

    async fn next(rx: &mut mpsc::Receiver<MapperEvent>) -> MapperEvent {
        tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .unwrap()
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn queues_writes_while_offline_and_reconnects() {
        let dev = Arc::new(Mutex::new(Fake::default()));
        let (etx, mut erx) = mpsc::channel(64);
        let (wtx, wrx) = mpsc::channel(8);
        let task = tokio::spawn(run(
            plan(),
            FakeDriver(dev.clone(), false),
            etx,
            wrx,
            Backoff::default(),
        ));
        assert!(matches!(
            next(&mut erx).await,
            MapperEvent::State { online: false, .. }
        ));
        let w = |v: &str| WriteCommand {
            property: "level".into(),
            value: v.into(),
            source: WriteSource::Desired,
        };
        // Two writes while offline: only the latest is applied.
        wtx.send(w("5")).await.unwrap();
        wtx.send(w("7")).await.unwrap();
        dev.lock().unwrap().up = true;
        assert!(matches!(
            next(&mut erx).await,
            MapperEvent::State { online: true, .. }
        ));
        assert!(
            matches!(next(&mut erx).await, MapperEvent::Written { ref value, .. } if value == "7")
        );
        assert!(matches!(
            next(&mut erx).await,
            MapperEvent::Reading {
                value: Value::Int(7),
                after_write: true,
                ..
            }
        ));
        assert_eq!(dev.lock().unwrap().value, 7);
        // Periodic readings.
        assert!(matches!(
            next(&mut erx).await,
            MapperEvent::Reading {
                after_write: false,
                ..
            }
        ));
        // Out of bounds: refused, not retried, the device untouched.
        wtx.send(w("500")).await.unwrap();
        loop {
            match next(&mut erx).await {
                MapperEvent::WriteFailed { error, .. } => {
                    assert!(error.contains("maximum"), "{error}");
                    break;
                }
                MapperEvent::Reading { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(dev.lock().unwrap().value, 7);
        // The device goes away and comes back: offline, then online again.
        dev.lock().unwrap().up = false;
        loop {
            match next(&mut erx).await {
                MapperEvent::State { online: false, .. } => break,
                MapperEvent::Reading { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        dev.lock().unwrap().up = true;
        loop {
            if let MapperEvent::State { online: true, .. } = next(&mut erx).await {
                break;
            }
        }
        assert_eq!(dev.lock().unwrap().connects, 2);
        // Closing the write queue stops the mapper.
        drop(wtx);
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .unwrap()
            .unwrap();
    }
}
