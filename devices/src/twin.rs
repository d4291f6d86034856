//! Device twins: the desired/reported pair per property, kept in the
//! Device object itself (`spec.properties[].desired`, written by the cloud;
//! `status.twins[]`, written by the edge). Both sides fold the same log into
//! the same automerge document, so a desired value set in the cloud and
//! readings taken at the edge during an outage merge with neither lost.
//!
//! Also here: KubeEdge's MQTT twin messages (`$hw/events/device/...`) and
//! local fallback rules.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};

use crate::mapper::{WriteCommand, WriteSource};
use crate::value::Value;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn twins_mut(obj: &mut Json) -> Option<&mut Vec<Json>> {
    let root = obj.as_object_mut()?;
    let status = root
        .entry("status")
        .or_insert_with(|| Json::Object(Default::default()));
    if !status.is_object() {
        *status = Json::Object(Default::default());
    }
    let twins = status
        .as_object_mut()?
        .entry("twins")
        .or_insert_with(|| Json::Array(Vec::new()));
    if !twins.is_array() {
        *twins = Json::Array(Vec::new());
    }
    twins.as_array_mut()
}

fn twin_mut<'a>(twins: &'a mut Vec<Json>, property: &str) -> Option<&'a mut Json> {
    let pos = twins
        .iter()
        .position(|t| t.get("propertyName").and_then(Json::as_str) == Some(property));
    let i = match pos {
        Some(i) => i,
        None => {
            twins.push(json!({ "propertyName": property }));
            twins.len() - 1
        }
    };
    twins.get_mut(i)
}

/// Sets `field` (`reported` or `observedDesired`) of `property`'s twin to
/// `{value, metadata}`. False if that field already holds `value`.
fn set_twin_value(
    obj: &mut Json,
    property: &str,
    field: &str,
    value: &str,
    metadata: Json,
) -> bool {
    let Some(t) = twins_mut(obj).and_then(|twins| twin_mut(twins, property)) else {
        return false;
    };
    if t.get(field)
        .and_then(|f| f.get("value"))
        .and_then(Json::as_str)
        == Some(value)
    {
        return false;
    }
    let Some(m) = t.as_object_mut() else {
        return false;
    };
    m.insert(
        field.to_owned(),
        json!({"value": value, "metadata": metadata}),
    );
    true
}

/// Sets the reported value of `property` in a Device's JSON. Returns false
/// if the value is already the reported one (nothing to record).
pub fn set_reported(
    obj: &mut Json,
    property: &str,
    value: &str,
    type_name: &str,
    at_ms: i64,
) -> bool {
    let meta = json!({"timestamp": at_ms.to_string(), "type": type_name});
    set_twin_value(obj, property, "reported", value, meta)
}

/// Records that the edge has acted on the desired `value` of `property`.
pub fn set_observed_desired(obj: &mut Json, property: &str, value: &str, at_ms: i64) -> bool {
    let meta = json!({"timestamp": at_ms.to_string()});
    set_twin_value(obj, property, "observedDesired", value, meta)
}

/// Sets `status.state` (and `lastOnlineTime` when online).
pub fn set_state(obj: &mut Json, state: &str, now_rfc3339: &str) -> bool {
    let Some(root) = obj.as_object_mut() else {
        return false;
    };
    let status = root
        .entry("status")
        .or_insert_with(|| Json::Object(Default::default()));
    let Some(s) = status.as_object_mut() else {
        return false;
    };
    if s.get("state").and_then(Json::as_str) == Some(state) {
        return false;
    }
    s.insert("state".to_owned(), Json::String(state.to_owned()));
    if state == "online" {
        s.insert(
            "lastOnlineTime".to_owned(),
            Json::String(now_rfc3339.to_owned()),
        );
    }
    true
}

/// Every desired value of a Device's JSON: `(property, value)` from
/// `spec.properties[].desired.value`.
pub fn desired(obj: &Json) -> Vec<(String, String)> {
    obj.pointer("/spec/properties")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some((
                p.get("name")?.as_str()?.to_owned(),
                p.pointer("/desired/value")?.as_str()?.to_owned(),
            ))
        })
        .collect()
}

/// Desired values the edge has not acted on yet: those of [`desired`]
/// that differ from the twin's `observedDesired`.
pub fn pending_desired(obj: &Json) -> Vec<(String, String)> {
    let twins = obj.pointer("/status/twins").and_then(Json::as_array);
    let observed = |name: &str| {
        twins
            .and_then(|ts| {
                ts.iter()
                    .find(|t| t.get("propertyName").and_then(Json::as_str) == Some(name))
            })
            .and_then(|t| t.pointer("/observedDesired/value"))
            .and_then(Json::as_str)
    };
    desired(obj)
        .into_iter()
        .filter(|(name, value)| observed(name) != Some(value.as_str()))
        .collect()
}

/// A twin value in KubeEdge's MQTT messages.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MsgValue {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, Json>>,
}

/// One twin property in KubeEdge's MQTT messages.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MsgTwin {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<MsgValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual: Option<MsgValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, Json>>,
}

/// `…/twin/update` (from a mapper), `…/twin/get/result` and
/// `…/twin/update/delta` (to mappers; `delta` only there).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TwinMessage {
    #[serde(default)]
    pub event_id: String,
    #[serde(default)]
    pub timestamp: i64,
    #[serde(default)]
    pub twin: BTreeMap<String, MsgTwin>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<BTreeMap<String, String>>,
}

/// `…/state/update`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StateMessage {
    #[serde(default)]
    pub event_id: String,
    #[serde(default)]
    pub timestamp: i64,
    pub state: String,
}

/// The twin of a Device's JSON as KubeEdge's `twin/get/result` gives it:
/// expected from the desired values, actual from the reported ones.
pub fn twin_message(obj: &Json) -> TwinMessage {
    let mut twin: BTreeMap<String, MsgTwin> = BTreeMap::new();
    if let Some(props) = obj.pointer("/spec/properties").and_then(Json::as_array) {
        for p in props {
            let Some(name) = p.get("name").and_then(Json::as_str) else {
                continue;
            };
            let t = twin.entry(name.to_owned()).or_default();
            if let Some(v) = p.pointer("/desired/value").and_then(Json::as_str) {
                t.expected = Some(MsgValue {
                    value: Some(v.to_owned()),
                    metadata: None,
                });
            }
        }
    }
    if let Some(ts) = obj.pointer("/status/twins").and_then(Json::as_array) {
        for t in ts {
            let (Some(name), Some(v)) = (
                t.get("propertyName").and_then(Json::as_str),
                t.pointer("/reported/value").and_then(Json::as_str),
            ) else {
                continue;
            };
            let meta = t
                .pointer("/reported/metadata/timestamp")
                .and_then(Json::as_str)
                .and_then(|s| s.parse::<i64>().ok())
                .map(|ts| BTreeMap::from([("timestamp".to_owned(), json!(ts))]));
            let e = twin.entry(name.to_owned()).or_default();
            e.actual = Some(MsgValue {
                value: Some(v.to_owned()),
                metadata: meta,
            });
            if let Some(ty) = t.pointer("/reported/metadata/type").and_then(Json::as_str) {
                e.metadata = Some(BTreeMap::from([("type".to_owned(), json!(ty))]));
            }
        }
    }
    TwinMessage {
        event_id: String::new(),
        timestamp: now_ms(),
        twin,
        delta: None,
    }
}

/// Annotation holding a Device's local fallback rules: a JSON list of
/// `{"name": "...", "when": "temperature", "above": 80, "set": "fan",
/// "value": "1"}` (or `"below"`).
pub const RULES_ANNOTATION: &str = "keel.io/rules";

/// A local rule: when `when` crosses the threshold, write `value` to `set`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    #[serde(default)]
    pub name: String,
    pub when: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub above: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub below: Option<f64>,
    pub set: String,
    pub value: String,
}

/// Why a Device's rules annotation is unusable (until it changes).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RuleError {
    #[error("annotation {RULES_ANNOTATION}: {0}")]
    Syntax(String),
    #[error("rule {0:?} needs exactly one of above / below")]
    Threshold(String),
}

/// The rules of a Device's JSON (none if the annotation is absent).
pub fn rules(obj: &Json) -> Result<Vec<Rule>, RuleError> {
    let Some(text) = obj
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(RULES_ANNOTATION))
        .and_then(Json::as_str)
    else {
        return Ok(Vec::new());
    };
    let mut rules: Vec<Rule> =
        serde_json::from_str(text).map_err(|e| RuleError::Syntax(e.to_string()))?;
    for (i, r) in rules.iter_mut().enumerate() {
        if r.name.is_empty() {
            r.name = format!("rule-{i}");
        }
        if r.above.is_some() == r.below.is_some() {
            return Err(RuleError::Threshold(r.name.clone()));
        }
    }
    Ok(rules)
}

/// Runs rules over readings: a rule fires when its condition becomes true
/// (it was false, or unknown, at the previous reading of its property).
#[derive(Debug, Default)]
pub struct RuleEngine {
    rules: Vec<Rule>,
    last: Vec<Option<bool>>,
}

impl RuleEngine {
    pub fn new(rules: Vec<Rule>) -> RuleEngine {
        let last = vec![None; rules.len()];
        RuleEngine { rules, last }
    }

    /// The writes that a reading of `property` triggers.
    pub fn on_reading(&mut self, property: &str, value: &Value) -> Vec<WriteCommand> {
        let mut out = Vec::new();
        let Some(x) = value.as_f64() else {
            return out;
        };
        for (r, last) in self.rules.iter().zip(self.last.iter_mut()) {
            if r.when != property {
                continue;
            }
            let now = match (r.above, r.below) {
                (Some(t), _) => x > t,
                (_, Some(t)) => x < t,
                _ => false,
            };
            if now && *last != Some(true) {
                out.push(WriteCommand {
                    property: r.set.clone(),
                    value: r.value.clone(),
                    source: WriteSource::Rule(r.name.clone()),
                });
            }
            *last = Some(now);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn desired_reported_and_pending() {
        let mut d = json!({"metadata": {"name": "d"}, "spec": {"properties": [
            {"name": "temp"}, {"name": "fan", "desired": {"value": "1"}}]}});
        assert_eq!(pending_desired(&d), [("fan".to_owned(), "1".to_owned())]);
        assert!(set_reported(&mut d, "temp", "23.5", "float", 5));
        assert!(!set_reported(&mut d, "temp", "23.5", "float", 6));
        assert!(set_observed_desired(&mut d, "fan", "1", 7));
        assert!(pending_desired(&d).is_empty());
        let m = twin_message(&d);
        assert_eq!(
            m.twin["temp"].actual.as_ref().unwrap().value.as_deref(),
            Some("23.5")
        );
        assert_eq!(
            m.twin["fan"].expected.as_ref().unwrap().value.as_deref(),
            Some("1")
        );
        assert!(set_state(&mut d, "online", "2026-01-01T00:00:00Z"));
        assert_eq!(d["status"]["lastOnlineTime"], "2026-01-01T00:00:00Z");
    }

    #[test]
    fn rules_fire_on_crossing_only() {
        let d = json!({"metadata": {"annotations": {RULES_ANNOTATION:
            r#"[{"when": "temp", "above": 80, "set": "fan", "value": "1"}]"#}}});
        let mut e = RuleEngine::new(rules(&d).unwrap());
        assert!(e.on_reading("temp", &Value::Float(70.0)).is_empty());
        let w = e.on_reading("temp", &Value::Float(81.0));
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].property, "fan");
        assert!(e.on_reading("temp", &Value::Float(85.0)).is_empty());
        assert!(e.on_reading("temp", &Value::Float(60.0)).is_empty());
        assert_eq!(e.on_reading("temp", &Value::Float(90.0)).len(), 1);
        let bad = json!({"metadata": {"annotations": {RULES_ANNOTATION:
            r#"[{"when": "temp", "set": "fan", "value": "1"}]"#}}});
        assert!(matches!(rules(&bad), Err(RuleError::Threshold(_))));
        let bad = json!({"metadata": {"annotations": {RULES_ANNOTATION: "nope"}}});
        assert!(matches!(rules(&bad), Err(RuleError::Syntax(_))));
    }
}
