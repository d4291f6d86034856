//! Property values: twins carry them as strings (as KubeEdge does); the
//! model's `type` says how to read them, and `minimum` / `maximum` bound
//! what may be written.

use crate::types::{DataType, ModelProperty};

/// A property value, typed by its model.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i64),
    Float(f64),
    Bool(bool),
    Text(String),
}

/// Why a value is not acceptable for a property (never retryable: the
/// value has to change).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ValueError {
    #[error("{value:?} is not a valid {ty:?}")]
    Parse { value: String, ty: DataType },
    #[error("{value} is below the minimum {min}")]
    BelowMinimum { value: String, min: String },
    #[error("{value} is above the maximum {max}")]
    AboveMaximum { value: String, max: String },
    #[error("type {0:?} is not supported by this mapper")]
    Unsupported(DataType),
}

impl Value {
    /// Parses the twin string `s` as type `ty`.
    pub fn parse(s: &str, ty: DataType) -> Result<Value, ValueError> {
        let err = || ValueError::Parse {
            value: s.to_owned(),
            ty,
        };
        let t = s.trim();
        match ty {
            DataType::Int => t
                .parse::<i64>()
                .or_else(|_| {
                    // "12.0" is an integer written as a float.
                    t.parse::<f64>()
                        .ok()
                        .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                        .map(|f| f as i64)
                        .ok_or(())
                })
                .map(Value::Int)
                .map_err(|_| err()),
            DataType::Float | DataType::Double => t
                .parse::<f64>()
                .ok()
                .filter(|f| f.is_finite())
                .map(Value::Float)
                .ok_or_else(err),
            DataType::Boolean => match t.to_ascii_lowercase().as_str() {
                "true" | "1" | "on" => Ok(Value::Bool(true)),
                "false" | "0" | "off" => Ok(Value::Bool(false)),
                _ => Err(err()),
            },
            DataType::String => Ok(Value::Text(s.to_owned())),
            DataType::Bytes | DataType::Stream => Err(ValueError::Unsupported(ty)),
        }
    }

    /// As a number (booleans are 0 / 1; text is not a number).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
            Value::Text(_) => None,
        }
    }

    /// Checks `self` against the property's `minimum` / `maximum` (numbers
    /// only; bounds that are not numbers are ignored).
    pub fn check_bounds(&self, prop: &ModelProperty) -> Result<(), ValueError> {
        let Some(v) = self.as_f64() else {
            return Ok(());
        };
        if let Some(min) = &prop.minimum
            && let Ok(m) = min.trim().parse::<f64>()
            && v < m
        {
            return Err(ValueError::BelowMinimum {
                value: self.to_string(),
                min: min.clone(),
            });
        }
        if let Some(max) = &prop.maximum
            && let Ok(m) = max.trim().parse::<f64>()
            && v > m
        {
            return Err(ValueError::AboveMaximum {
                value: self.to_string(),
                max: max.clone(),
            });
        }
        Ok(())
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => {
                // Shortest form that reads back the same; no "1e-7".
                let s = format!("{x}");
                f.write_str(&s)
            }
            Value::Bool(b) => write!(f, "{b}"),
            Value::Text(s) => f.write_str(s),
        }
    }
}

/// The twin string of a model type name (`metadata.type`, lower case as
/// KubeEdge writes it).
pub fn type_name(ty: DataType) -> &'static str {
    match ty {
        DataType::Int => "int",
        DataType::Float => "float",
        DataType::Double => "double",
        DataType::String => "string",
        DataType::Boolean => "boolean",
        DataType::Bytes => "bytes",
        DataType::Stream => "stream",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_by_type_and_checks_bounds() {
        assert_eq!(Value::parse("42", DataType::Int).unwrap(), Value::Int(42));
        assert_eq!(Value::parse("42.0", DataType::Int).unwrap(), Value::Int(42));
        assert!(Value::parse("4.5", DataType::Int).is_err());
        assert!(Value::parse("hot", DataType::Double).is_err());
        assert!(Value::parse("NaN", DataType::Float).is_err());
        assert_eq!(
            Value::parse("on", DataType::Boolean).unwrap(),
            Value::Bool(true)
        );
        let prop = ModelProperty {
            minimum: Some("0".into()),
            maximum: Some("100".into()),
            ..Default::default()
        };
        assert!(Value::Int(50).check_bounds(&prop).is_ok());
        assert!(matches!(
            Value::Int(101).check_bounds(&prop),
            Err(ValueError::AboveMaximum { .. })
        ));
        assert!(matches!(
            Value::Float(-0.5).check_bounds(&prop),
            Err(ValueError::BelowMinimum { .. })
        ));
    }

    proptest! {
        #[test]
        fn display_reads_back(i in any::<i64>(), x in -1.0e12f64..1.0e12) {
            prop_assert_eq!(Value::parse(&Value::Int(i).to_string(), DataType::Int).unwrap(), Value::Int(i));
            prop_assert_eq!(Value::parse(&Value::Float(x).to_string(), DataType::Double).unwrap(), Value::Float(x));
        }
    }
}
