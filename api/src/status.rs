//! Kubernetes `Status` errors: what every failed API request answers.

use serde_json::{Value, json};

use crate::resources::ResourceType;

/// A failed request, rendered as a `v1 Status` object that kubectl prints
/// as `Error from server (<reason>): <message>`.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl Status {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Status {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn not_found(rt: &ResourceType, name: &str) -> Self {
        Status {
            details: Some(json!({"name": name, "group": rt.group, "kind": rt.plural})),
            ..Self::new(
                404,
                "NotFound",
                format!("{} \"{name}\" not found", rt.qualified()),
            )
        }
    }

    pub fn already_exists(rt: &ResourceType, name: &str) -> Self {
        Status {
            details: Some(json!({"name": name, "group": rt.group, "kind": rt.plural})),
            ..Self::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", rt.qualified()),
            )
        }
    }

    pub fn conflict(rt: &ResourceType, name: &str) -> Self {
        Status {
            details: Some(json!({"name": name, "group": rt.group, "kind": rt.plural})),
            ..Self::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                    rt.qualified()
                ),
            )
        }
    }

    /// 422 Invalid with one cause per `(field, message)`.
    pub fn invalid(rt: &ResourceType, name: &str, causes: &[(String, String)]) -> Self {
        let list: Vec<String> = causes.iter().map(|(f, m)| format!("{f}: {m}")).collect();
        let causes: Vec<Value> = causes
            .iter()
            .map(|(f, m)| json!({"reason": "FieldValueInvalid", "message": m, "field": f}))
            .collect();
        Status {
            details: Some(
                json!({"name": name, "group": rt.group, "kind": rt.kind, "causes": causes}),
            ),
            ..Self::new(
                422,
                "Invalid",
                format!("{} \"{name}\" is invalid: {}", rt.kind, list.join(", ")),
            )
        }
    }

    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", message)
    }

    pub fn to_json(&self) -> Value {
        let mut v = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": self.message, "reason": self.reason, "code": self.code});
        if let (Some(d), Value::Object(m)) = (&self.details, &mut v) {
            m.insert("details".into(), d.clone());
        }
        v
    }
}

impl Status {
    /// A Status read back from its JSON form (as a peer sent it); reasons
    /// keel does not know become `InternalError`.
    pub fn from_json(v: &Value) -> Status {
        const REASONS: [&str; 12] = [
            "BadRequest",
            "NotFound",
            "AlreadyExists",
            "Conflict",
            "Invalid",
            "Expired",
            "InternalError",
            "ServiceUnavailable",
            "MethodNotAllowed",
            "Forbidden",
            "Timeout",
            "TooManyRequests",
        ];
        let reason = v.get("reason").and_then(Value::as_str).unwrap_or_default();
        Status {
            code: v
                .get("code")
                .and_then(Value::as_u64)
                .and_then(|c| u16::try_from(c).ok())
                .filter(|c| (400..600).contains(c))
                .unwrap_or(500),
            reason: REASONS
                .iter()
                .find(|r| **r == reason)
                .copied()
                .unwrap_or("InternalError"),
            message: v
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            details: v.get("details").cloned(),
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for Status {}
