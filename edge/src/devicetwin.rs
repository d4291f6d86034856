//! DeviceTwin: the node's devices, between the log and the world.
//!
//! - For every Device bound to this node it runs the built-in mapper its
//!   protocol has (Modbus TCP), restarting it when the device, its model or
//!   its connection data change, and stopping it when the device goes.
//! - Desired values from the cloud (`spec.properties[].desired`) that the
//!   edge has not acted on are written to the device (built-in mapper) and
//!   published as `…/twin/update/delta` (mappers outside edgecore); once
//!   applied, the twin's `observedDesired` records it.
//! - Readings are recorded in `up`: every reading as an event record
//!   (telemetry, in order, replicated to the cloud however long it is
//!   away), and the twin's `reported` value when it changed (at most once
//!   per `reportCycle`, at once after a write). They are also published on
//!   `$ke/events/device/{namespace}/{name}/data/update`.
//! - Local rules (annotation `keel.io/rules`) run on every reading, with or
//!   without the cloud.
//! - MQTT messages from mappers and devices (KubeEdge's topics) become
//!   records; a QoS 1 publish is acknowledged once its record is durable.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, UNIX_EPOCH};

use bytes::Bytes;
use keel_api::meta::now_rfc3339;
use keel_devices::mapper::{self, Backoff, MapperEvent, WriteCommand, WriteSource, modbus};
use keel_devices::twin::{self, RuleEngine, StateMessage, TwinMessage};
use keel_devices::types::{DataType, Device, DeviceModel};
use keel_devices::value::{Value, type_name};
use serde_json::{Value as Json, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::eventbus::{Durable, EventBus, Ingest};
use crate::meta::MetaManager;

/// Key prefix of devices (`devices.devices.kubeedge.io/{ns}/{name}`).
pub const DEVICE_PREFIX: &str = "devices.devices.kubeedge.io/";
/// Key prefix of device models.
pub const MODEL_PREFIX: &str = "devicemodels.devices.kubeedge.io/";

const HW: &str = "$hw/events/device/";
const KE: &str = "$ke/events/device/";
const UPLOAD: &str = "$hw/events/upload/";

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn device_key(ns: &str, name: &str) -> String {
    format!("{DEVICE_PREFIX}{ns}/{name}")
}

/// One device being served.
struct DeviceCtx {
    key: String,
    ns: String,
    name: String,
    types: HashMap<String, DataType>,
    report_cycle: HashMap<String, Duration>,
    report_to_cloud: HashMap<String, bool>,
    rules: Mutex<RuleEngine>,
    last_report: Mutex<HashMap<String, Instant>>,
    /// The built-in mapper's write queue, if the protocol has one.
    writes: Option<mpsc::Sender<WriteCommand>>,
    /// No built-in mapper serves the protocol: mappers outside edgecore
    /// do, over MQTT.
    external: bool,
}

impl DeviceCtx {
    fn topic(&self, suffix: &str) -> String {
        format!("{HW}{}/{}/{suffix}", self.ns, self.name)
    }
}

struct Served {
    /// What the running mapper was started from.
    fingerprint: String,
    ctx: Arc<DeviceCtx>,
    tasks: Vec<JoinHandle<()>>,
    /// Desired values already handed on, per property.
    sent: HashMap<String, String>,
}

impl Drop for Served {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The DeviceTwin module.
pub struct DeviceTwin {
    meta: Arc<MetaManager>,
    bus: EventBus,
    backoff: Backoff,
    served: Mutex<HashMap<String, Served>>,
}

impl std::fmt::Debug for DeviceTwin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceTwin")
            .field("node", &self.meta.node())
            .finish_non_exhaustive()
    }
}

impl DeviceTwin {
    /// Starts DeviceTwin: takes over the bus's publishes and serves the
    /// node's devices until the process ends.
    pub fn start(meta: Arc<MetaManager>, bus: EventBus) -> Arc<DeviceTwin> {
        let dt = Arc::new(DeviceTwin {
            meta: meta.clone(),
            bus: bus.clone(),
            backoff: Backoff::default(),
            served: Mutex::new(HashMap::new()),
        });
        bus.set_ingest(dt.clone());
        let weak = Arc::downgrade(&dt);
        let span = info_span!("devicetwin", node = %meta.node());
        tokio::spawn(
            async move {
                let mut changed = meta.subscribe();
                loop {
                    let Some(dt) = weak.upgrade() else { return };
                    dt.reconcile();
                    drop(dt);
                    if changed.changed().await.is_err() {
                        return;
                    }
                }
            }
            .instrument(span),
        );
        dt
    }

    /// Brings the served devices in line with the node's objects.
    pub fn reconcile(self: &Arc<Self>) {
        let node = self.meta.node().to_owned();
        let mut seen = Vec::new();
        for (key, obj) in self.meta.objects(DEVICE_PREFIX) {
            let device: Device = match serde_json::from_value((*obj).clone()) {
                Ok(d) => d,
                Err(e) => {
                    warn!(%key, error = %e, "device does not decode; skipped");
                    continue;
                }
            };
            if device.spec.node_name.as_deref() != Some(node.as_str()) {
                continue;
            }
            seen.push(key.clone());
            self.serve(&key, &obj, &device);
        }
        lock(&self.served).retain(|k, _| {
            let keep = seen.contains(k);
            if !keep {
                info!(device = %k, "device removed from this node; its mapper stops");
            }
            keep
        });
    }

    fn serve(self: &Arc<Self>, key: &str, obj: &Json, device: &Device) {
        let (ns, _) = ns_name(device);
        let model: Option<DeviceModel> = device.model_name().and_then(|m| {
            self.meta
                .object(&format!("{MODEL_PREFIX}{ns}/{m}"))
                .and_then(|o| serde_json::from_value((*o).clone()).ok())
        });
        let plan = model.as_ref().map(|m| modbus::plan(device, m));
        let fingerprint = format!(
            "{:?}|{:?}|{}",
            plan,
            device
                .spec
                .properties
                .iter()
                .map(|p| (&p.name, p.report_cycle, p.report_to_cloud))
                .collect::<Vec<_>>(),
            obj.pointer("/metadata/annotations")
                .map(Json::to_string)
                .unwrap_or_default()
        );
        let mut served = lock(&self.served);
        let restart = served.get(key).is_none_or(|s| s.fingerprint != fingerprint);
        if restart {
            served.remove(key);
            let started = self.start_device(key, obj, device, model.as_ref(), plan, fingerprint);
            served.insert(key.to_owned(), started);
        }
        let Some(s) = served.get_mut(key) else { return };
        if s.ctx.writes.is_none() && !s.ctx.external {
            // Not mappable (yet): desired values wait.
            return;
        }
        // Desired values not acted on yet.
        let pending: Vec<(String, String)> = twin::pending_desired(obj)
            .into_iter()
            .filter(|(p, v)| s.sent.get(p) != Some(v))
            .collect();
        if pending.is_empty() {
            return;
        }
        let ctx = s.ctx.clone();
        for (p, v) in &pending {
            s.sent.insert(p.clone(), v.clone());
        }
        drop(served);
        let mut delta = twin::twin_message(obj);
        delta.delta = Some(pending.iter().cloned().collect());
        if let Ok(bytes) = serde_json::to_vec(&delta) {
            self.bus.publish(&ctx.topic("twin/update/delta"), bytes);
        }
        for (property, value) in pending {
            match &ctx.writes {
                Some(w) => {
                    debug!(device = %key, %property, %value, "desired value to the device");
                    let cmd = WriteCommand {
                        property,
                        value,
                        source: WriteSource::Desired,
                    };
                    if w.try_send(cmd).is_err() {
                        warn!(device = %key, "mapper write queue full; desired value retried on the next change");
                    }
                }
                None => {
                    // A mapper outside edgecore has it once the delta is
                    // published.
                    let _ = self.meta.update(key, |o| {
                        twin::set_observed_desired(o, &property, &value, twin::now_ms());
                    });
                }
            }
        }
    }

    /// Starts serving a device: its built-in mapper (if its protocol has
    /// one) and the task taking the mapper's events.
    fn start_device(
        self: &Arc<Self>,
        key: &str,
        obj: &Json,
        device: &Device,
        model: Option<&DeviceModel>,
        plan: Option<
            Result<mapper::DevicePlan<modbus::Connection, modbus::Access>, mapper::PlanError>,
        >,
        fingerprint: String,
    ) -> Served {
        let mut types = HashMap::new();
        if let Some(m) = &model {
            for p in &m.spec.properties {
                if let Some(t) = p.data_type {
                    types.insert(p.name.clone(), t);
                }
            }
        }
        let rules = match twin::rules(obj) {
            Ok(r) => r,
            Err(e) => {
                warn!(device = %key, error = %e, "local rules ignored");
                Vec::new()
            }
        };
        let (ns, name) = ns_name(device);
        let mut tasks = Vec::new();
        let mut writes = None;
        let mut events_rx = None;
        let mut external = false;
        match plan {
            Some(Ok(plan)) => {
                let (wtx, wrx) = mpsc::channel(64);
                let (etx, erx) = mpsc::channel(1024);
                let driver = modbus::ModbusDriver::new(plan.connection.clone());
                let span = info_span!("mapper", device = %key, protocol = modbus::PROTOCOL);
                tasks.push(tokio::spawn(
                    mapper::run(plan, driver, etx, wrx, self.backoff).instrument(span),
                ));
                writes = Some(wtx);
                events_rx = Some(erx);
                info!(device = %key, "built-in Modbus mapper started");
            }
            Some(Err(mapper::PlanError::Protocol { found, .. })) => {
                external = true;
                debug!(device = %key, protocol = ?found, "no built-in mapper; served over MQTT only");
            }
            Some(Err(e)) => warn!(device = %key, error = %e, "device cannot be mapped"),
            None => warn!(device = %key, "device model not on this node (yet)"),
        }
        let ctx = Arc::new(DeviceCtx {
            key: key.to_owned(),
            ns,
            name,
            types,
            report_cycle: device
                .spec
                .properties
                .iter()
                .filter_map(|p| {
                    p.report_cycle
                        .filter(|c| *c > 0)
                        .map(|c| (p.name.clone(), Duration::from_millis(c.unsigned_abs())))
                })
                .collect(),
            report_to_cloud: device
                .spec
                .properties
                .iter()
                .map(|p| (p.name.clone(), p.report_to_cloud.unwrap_or(true)))
                .collect(),
            rules: Mutex::new(RuleEngine::new(rules)),
            last_report: Mutex::new(HashMap::new()),
            writes,
            external,
        });
        if let Some(erx) = events_rx {
            let dt = Arc::downgrade(self);
            let c = ctx.clone();
            tasks.push(tokio::spawn(async move {
                consume(dt, c, erx).await;
            }));
        }
        Served {
            fingerprint,
            ctx,
            tasks,
            sent: HashMap::new(),
        }
    }

    fn ctx(&self, key: &str) -> Option<Arc<DeviceCtx>> {
        lock(&self.served).get(key).map(|s| s.ctx.clone())
    }

    /// Hands every desired value of the device to its mapper again.
    fn reapply_desired(&self, ctx: &DeviceCtx) {
        let (Some(w), Some(obj)) = (&ctx.writes, self.meta.object(&ctx.key)) else {
            return;
        };
        for (property, value) in twin::desired(&obj) {
            debug!(device = %ctx.key, %property, %value, "desired value re-applied after reconnect");
            let _ = w.try_send(WriteCommand {
                property,
                value,
                source: WriteSource::Desired,
            });
        }
    }

    /// Runs the rules on a reading; writes go to the built-in mapper, or as
    /// a delta to mappers outside edgecore.
    fn run_rules(&self, ctx: &DeviceCtx, property: &str, value: &Value) {
        let fired = lock(&ctx.rules).on_reading(property, value);
        for cmd in fired {
            let rule = match &cmd.source {
                WriteSource::Rule(r) => r.clone(),
                WriteSource::Desired => String::new(),
            };
            info!(device = %ctx.key, %rule, set = %cmd.property, value = %cmd.value, "local rule fired");
            let ev = json!({"rule": rule, "when": property, "reading": value.to_string(),
                "set": cmd.property, "value": cmd.value, "timestamp": twin::now_ms()});
            if let Err(e) = self
                .meta
                .record_event(&ctx.key, ev.to_string().into_bytes())
            {
                warn!(error = %e, "recording a rule firing failed");
            }
            match &ctx.writes {
                Some(w) => {
                    if w.try_send(cmd).is_err() {
                        warn!(device = %ctx.key, "mapper write queue full; rule write dropped");
                    }
                }
                None => {
                    let msg = json!({"event_id": "", "timestamp": twin::now_ms(),
                        "twin": {}, "delta": {cmd.property: cmd.value}});
                    self.bus
                        .publish(&ctx.topic("twin/update/delta"), msg.to_string());
                }
            }
        }
    }

    fn on_reading(
        &self,
        ctx: &DeviceCtx,
        property: &str,
        value: &Value,
        at_ms: i64,
        after_write: bool,
    ) {
        let ty = ctx.types.get(property).copied().unwrap_or(DataType::String);
        let text = value.to_string();
        if ctx.report_to_cloud.get(property).copied().unwrap_or(true) {
            let ev = json!({"property": property, "value": text, "type": type_name(ty), "timestamp": at_ms});
            if let Err(e) = self
                .meta
                .record_event(&ctx.key, ev.to_string().into_bytes())
            {
                warn!(device = %ctx.key, error = %e, "recording a reading failed");
            }
        }
        let data = json!({"event_id": "", "timestamp": at_ms, "data": {property: {"value": text,
            "metadata": {"timestamp": at_ms, "type": type_name(ty)}}}});
        self.bus.publish(
            &format!("{KE}{}/{}/data/update", ctx.ns, ctx.name),
            data.to_string(),
        );
        let due = {
            let last = lock(&ctx.last_report);
            let cycle = ctx.report_cycle.get(property).copied().unwrap_or_default();
            after_write || last.get(property).is_none_or(|t| t.elapsed() >= cycle)
        };
        if due {
            match self.meta.update(&ctx.key, |o| {
                twin::set_reported(o, property, &text, type_name(ty), at_ms);
            }) {
                Ok(true) => {
                    lock(&ctx.last_report).insert(property.to_owned(), Instant::now());
                }
                Ok(false) => {}
                Err(e) => warn!(device = %ctx.key, error = %e, "recording a reported value failed"),
            }
        }
        self.run_rules(ctx, property, value);
    }

    fn publish_result(&self, ctx_topic: String, event_id: &str, code: u16, reason: &str) {
        let msg = json!({"event_id": event_id, "timestamp": twin::now_ms(), "code": code, "reason": reason});
        self.bus.publish(&ctx_topic, msg.to_string());
    }

    /// `$hw/events/device/{ns}/{name}/{suffix}` from a mapper or device.
    fn on_device_message(
        &self,
        ns: &str,
        name: &str,
        suffix: &str,
        payload: &Bytes,
    ) -> Option<Durable> {
        let key = device_key(ns, name);
        let topic = |s: &str| format!("{HW}{ns}/{name}/{s}");
        let obj = self.meta.object(&key);
        let event_id = serde_json::from_slice::<Json>(payload)
            .ok()
            .and_then(|v| v.get("event_id").and_then(Json::as_str).map(str::to_owned))
            .unwrap_or_default();
        match suffix {
            "twin/update" | "twin/get" | "state/update" => {}
            // Our own results and deltas, or topics KubeEdge defines that
            // keel does not serve.
            _ => return None,
        }
        let Some(obj) = obj else {
            self.publish_result(
                topic(&format!("{suffix}/result")),
                &event_id,
                404,
                "no such device on this node",
            );
            return None;
        };
        match suffix {
            "twin/get" => {
                let mut m = twin::twin_message(&obj);
                m.event_id = event_id;
                if let Ok(b) = serde_json::to_vec(&m) {
                    self.bus.publish(&topic("twin/get/result"), b);
                }
                None
            }
            "twin/update" => {
                let msg: TwinMessage = match serde_json::from_slice(payload) {
                    Ok(m) => m,
                    Err(e) => {
                        self.publish_result(
                            topic("twin/update/result"),
                            &event_id,
                            400,
                            &e.to_string(),
                        );
                        return None;
                    }
                };
                let ctx = self.ctx(&key);
                let model_type = |p: &str| ctx.as_ref().and_then(|c| c.types.get(p).copied());
                let at = if msg.timestamp > 0 {
                    msg.timestamp
                } else {
                    twin::now_ms()
                };
                let actual: Vec<(String, String, String)> = msg
                    .twin
                    .iter()
                    .filter_map(|(p, t)| {
                        let v = t.actual.as_ref()?.value.clone()?;
                        let ty = t
                            .metadata
                            .as_ref()
                            .and_then(|m| m.get("type"))
                            .and_then(Json::as_str)
                            .map(str::to_owned)
                            .or_else(|| model_type(p).map(|t| type_name(t).to_owned()))
                            .unwrap_or_else(|| "string".to_owned());
                        Some((p.clone(), v, ty))
                    })
                    .collect();
                if actual.is_empty() {
                    self.publish_result(
                        topic("twin/update/result"),
                        &event_id,
                        400,
                        "no actual values in twin",
                    );
                    return None;
                }
                let durable = match self.meta.update_durable(&key, |o| {
                    for (p, v, ty) in &actual {
                        twin::set_reported(o, p, v, ty, at);
                    }
                }) {
                    Ok(d) => d,
                    Err(e) => {
                        warn!(device = %key, error = %e, "recording a twin update failed");
                        return Some(Box::pin(async { false }));
                    }
                };
                if let Some(ctx) = &ctx {
                    for (p, v, _) in &actual {
                        let ty = model_type(p).unwrap_or(DataType::String);
                        if let Ok(val) = Value::parse(v, ty) {
                            self.run_rules(ctx, p, &val);
                        }
                    }
                }
                let mut result = twin::twin_message(&obj);
                result.event_id = event_id;
                if let Ok(b) = serde_json::to_vec(&result) {
                    self.bus.publish(&topic("twin/update/result"), b);
                }
                durable.map(|rx| Box::pin(async move { rx.await.unwrap_or(false) }) as Durable)
            }
            _ => {
                let msg: StateMessage = match serde_json::from_slice(payload) {
                    Ok(m) => m,
                    Err(e) => {
                        self.publish_result(
                            topic("state/update/result"),
                            &event_id,
                            400,
                            &e.to_string(),
                        );
                        return None;
                    }
                };
                if !["online", "offline", "ok", "unknown", "unhealthy"]
                    .contains(&msg.state.as_str())
                {
                    self.publish_result(
                        topic("state/update/result"),
                        &event_id,
                        400,
                        "state must be online, offline, ok, unknown or unhealthy",
                    );
                    return None;
                }
                let now = now_rfc3339();
                let durable = self
                    .meta
                    .update_durable(&key, |o| {
                        twin::set_state(o, &msg.state, &now);
                    })
                    .ok()
                    .flatten();
                let result = json!({"event_id": event_id, "timestamp": twin::now_ms(),
                    "device": {"name": name, "state": msg.state, "lastOnlineTime": now}});
                self.bus
                    .publish(&topic("state/update/result"), result.to_string());
                durable.map(|rx| Box::pin(async move { rx.await.unwrap_or(false) }) as Durable)
            }
        }
    }

    fn record(&self, key: &str, topic: &str, payload: &Bytes) -> Option<Durable> {
        let body = match serde_json::from_slice::<Json>(payload) {
            Ok(v) => v,
            Err(_) => Json::String(String::from_utf8_lossy(payload).into_owned()),
        };
        let ev = json!({"topic": topic, "payload": body, "timestamp": twin::now_ms()});
        match self.meta.record_event(key, ev.to_string().into_bytes()) {
            Ok(ticket) => Some(Box::pin(async move { ticket.await.is_ok() })),
            Err(e) => {
                warn!(%topic, error = %e, "recording an MQTT message failed");
                Some(Box::pin(async { false }))
            }
        }
    }
}

impl Ingest for DeviceTwin {
    fn publish(&self, client: &str, topic: &str, payload: &Bytes) -> Option<Durable> {
        if let Some(rest) = topic.strip_prefix(HW) {
            let mut parts = rest.splitn(3, '/');
            let (Some(ns), Some(name), Some(suffix)) = (parts.next(), parts.next(), parts.next())
            else {
                return None;
            };
            return self.on_device_message(ns, name, suffix, payload);
        }
        if let Some(rest) = topic.strip_prefix(KE) {
            let mut parts = rest.splitn(3, '/');
            if let (Some(ns), Some(name), Some("data/update")) =
                (parts.next(), parts.next(), parts.next())
            {
                return self.record(&device_key(ns, name), topic, payload);
            }
            return None;
        }
        if let Some(rest) = topic.strip_prefix(UPLOAD) {
            debug!(%client, %topic, "upload recorded");
            return self.record(&format!("upload/{rest}"), topic, payload);
        }
        None
    }
}

/// Handles one device's mapper events.
async fn consume(
    dt: std::sync::Weak<DeviceTwin>,
    ctx: Arc<DeviceCtx>,
    mut events: mpsc::Receiver<MapperEvent>,
) {
    // A device that comes back may have lost what it was told (a power
    // cycle): desired values are written again on every reconnect.
    let mut was_online = false;
    while let Some(ev) = events.recv().await {
        let Some(dt) = dt.upgrade() else { return };
        match ev {
            MapperEvent::Reading {
                property,
                value,
                at,
                after_write,
            } => {
                let at_ms = at
                    .duration_since(UNIX_EPOCH)
                    .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
                    .unwrap_or(0);
                dt.on_reading(&ctx, &property, &value, at_ms, after_write);
            }
            MapperEvent::Written {
                property,
                value,
                source,
            } => {
                debug!(device = %ctx.key, %property, %value, ?source, "written to the device");
                if source == WriteSource::Desired {
                    let _ = dt.meta.update(&ctx.key, |o| {
                        twin::set_observed_desired(o, &property, &value, twin::now_ms());
                    });
                }
            }
            MapperEvent::WriteFailed {
                property,
                value,
                source,
                error,
            } => {
                warn!(device = %ctx.key, %property, %value, ?source, %error, "write to the device refused");
                if source == WriteSource::Desired {
                    // Recorded, so kubectl shows why the desired value is
                    // not the reported one; retried when desired changes.
                    let _ = dt.meta.update(&ctx.key, |o| {
                        twin::set_observed_desired(o, &property, &value, twin::now_ms());
                        set_twin_error(o, &property, &error);
                    });
                }
            }
            MapperEvent::State { online, reason } => {
                let state = if online { "online" } else { "offline" };
                let now = now_rfc3339();
                let _ = dt.meta.update(&ctx.key, |o| {
                    twin::set_state(o, state, &now);
                });
                let msg = json!({"event_id": "", "timestamp": twin::now_ms(), "state": state, "reason": reason});
                dt.bus.publish(&ctx.topic("state/update"), msg.to_string());
                if online && was_online {
                    dt.reapply_desired(&ctx);
                }
                was_online |= online;
            }
        }
    }
}

/// A device's namespace (default `default`) and name.
fn ns_name(device: &Device) -> (String, String) {
    (
        device
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned()),
        device.metadata.name.clone().unwrap_or_default(),
    )
}

fn set_twin_error(obj: &mut Json, property: &str, error: &str) {
    let Some(twins) = obj
        .pointer_mut("/status/twins")
        .and_then(Json::as_array_mut)
    else {
        return;
    };
    for t in twins {
        if t.get("propertyName").and_then(Json::as_str) == Some(property)
            && let Some(m) = t
                .pointer_mut("/observedDesired/metadata")
                .and_then(Json::as_object_mut)
        {
            m.insert("error".to_owned(), Json::String(error.to_owned()));
        }
    }
}
