//! Typed access to fields of a JSON object, with errors that name the field.
use serde_json::{Map, Value};

use super::ConfigError;

/// A JSON object plus the name of the document it came from (for error messages).
pub struct Fields<'a> {
    pub origin: &'a str,
    /// Dotted path of this object inside the document ("" at the root, "rope_scaling." below it).
    pub prefix: String,
    pub map: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    pub fn new(origin: &'a str, value: &'a Value) -> Result<Self, ConfigError> {
        match value.as_object() {
            Some(map) => Ok(Self { origin, prefix: String::new(), map }),
            None => Err(ConfigError::invalid(origin, "<root>", "expected a JSON object")),
        }
    }

    fn err(&self, field: &str, msg: impl Into<String>) -> ConfigError {
        ConfigError::invalid(self.origin, &format!("{}{field}", self.prefix), msg)
    }

    /// The value, treating JSON null like an absent field.
    pub fn get(&self, field: &str) -> Option<&'a Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    pub fn opt_usize(&self, field: &str) -> Result<Option<usize>, ConfigError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| self.err(field, format!("expected a non-negative integer, got {v}"))),
        }
    }

    pub fn usize(&self, field: &str) -> Result<usize, ConfigError> {
        self.opt_usize(field)?.ok_or_else(|| self.err(field, "missing required field"))
    }

    pub fn usize_or(&self, field: &str, default: usize) -> Result<usize, ConfigError> {
        Ok(self.opt_usize(field)?.unwrap_or(default))
    }

    pub fn opt_f64(&self, field: &str) -> Result<Option<f64>, ConfigError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(field, format!("expected a number, got {v}"))),
        }
    }

    pub fn f64_or(&self, field: &str, default: f64) -> Result<f64, ConfigError> {
        Ok(self.opt_f64(field)?.unwrap_or(default))
    }

    pub fn opt_bool(&self, field: &str) -> Result<Option<bool>, ConfigError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(field, format!("expected true or false, got {v}"))),
        }
    }

    pub fn bool_or(&self, field: &str, default: bool) -> Result<bool, ConfigError> {
        Ok(self.opt_bool(field)?.unwrap_or(default))
    }

    pub fn opt_str(&self, field: &str) -> Result<Option<&'a str>, ConfigError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.err(field, format!("expected a string, got {v}"))),
        }
    }

    /// A string field restricted to `allowed` values.
    pub fn choice(&self, field: &str, allowed: &[&str], default: Option<&str>) -> Result<String, ConfigError> {
        let v = match (self.opt_str(field)?, default) {
            (Some(v), _) => v,
            (None, Some(d)) => d,
            (None, None) => return Err(self.err(field, "missing required field")),
        };
        if allowed.contains(&v) {
            Ok(v.to_string())
        } else {
            Err(self.err(field, format!("unsupported value {v:?} (supported: {})", allowed.join(", "))))
        }
    }

    /// A nested object, if present.
    pub fn opt_object(&self, field: &str) -> Result<Option<Fields<'a>>, ConfigError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Object(map)) => {
                Ok(Some(Fields { origin: self.origin, prefix: format!("{}{field}.", self.prefix), map }))
            }
            Some(v) => Err(self.err(field, format!("expected an object, got {v}"))),
        }
    }
}
