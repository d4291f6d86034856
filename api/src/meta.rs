//! Object metadata both sides set: `resourceVersion`, timestamps, and the
//! origin each change is recorded with.

use serde_json::Value;

/// Origin of the changes cloudcore makes itself (scheduling, node
/// lifecycle, corrections, history resent on binding). A node's changes
/// carry the node name; an API user's `user:<name>`.
pub const CLOUDCORE_ORIGIN: &str = "cloudcore";

/// The origin recorded for changes an API user makes: `user:<name>`
/// (node names never hold a `:`).
pub fn user_origin(user: &str) -> String {
    format!("user:{user}")
}

/// `obj` with `metadata.resourceVersion` set to `rv`.
pub fn with_rv(obj: &Value, rv: u64) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        m.insert("resourceVersion".into(), Value::String(rv.to_string()));
    }
    o
}

/// RFC 3339 UTC with microseconds (Kubernetes `MicroTime`).
pub fn now_rfc3339_micro() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.microsecond()
    )
}

/// RFC 3339 UTC, seconds.
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|_| time::OffsetDateTime::now_utc());
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
