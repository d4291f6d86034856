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

/// An age such as `500ms`, `90s`, `10m`, `2h` or `7d` (retention, watch
/// windows, `keel --since`).
///
/// # Errors
/// A message naming what is wrong.
pub fn parse_age(s: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("{s:?}: want an age such as 90s, 10m, 2h, 7d (or 500ms)");
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let ms = match unit {
        "ms" => n,
        "s" => n.saturating_mul(1000),
        "m" => n.saturating_mul(60_000),
        "h" => n.saturating_mul(3_600_000),
        "d" => n.saturating_mul(86_400_000),
        _ => return Err(bad()),
    };
    Ok(std::time::Duration::from_millis(ms))
}

/// Serde for a setting written as an age (see [`parse_age`]):
/// `#[serde(with = "keel_api::meta::age_serde")]`.
pub mod age_serde {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    /// # Errors
    /// Not a string, or not an age.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_age(&s).map_err(serde::de::Error::custom)
    }
}
