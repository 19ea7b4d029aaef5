//! QMP errors: QEMU's error classes and the `{"class", "desc"}` object.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// QEMU's `QapiErrorClass`; these five are all the classes QEMU has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorClass {
    /// Everything that is not one of the classes below.
    GenericError,
    /// Unknown command, or a command not allowed in this state.
    CommandNotFound,
    /// A block job (or device) that should be active is not.
    DeviceNotActive,
    /// A device named in the request does not exist.
    DeviceNotFound,
    /// KVM lacks a capability (kept only because QEMU defines it).
    KVMMissingCap,
}

impl ErrorClass {
    /// The class name exactly as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
        }
    }

    /// Parses a wire class name; `None` for names QEMU does not define.
    pub fn from_name(name: &str) -> Option<ErrorClass> {
        Some(match name {
            "GenericError" => ErrorClass::GenericError,
            "CommandNotFound" => ErrorClass::CommandNotFound,
            "DeviceNotActive" => ErrorClass::DeviceNotActive,
            "DeviceNotFound" => ErrorClass::DeviceNotFound,
            "KVMMissingCap" => ErrorClass::KVMMissingCap,
            _ => return None,
        })
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A QMP error reply: a class and a human-readable description.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{class}: {desc}")]
pub struct QmpError {
    /// The error class.
    pub class: ErrorClass,
    /// The description, QEMU's text where QEMU defines one.
    pub desc: String,
}

impl QmpError {
    /// A `GenericError` with the given description.
    pub fn generic(desc: impl Into<String>) -> QmpError {
        QmpError::new(ErrorClass::GenericError, desc)
    }

    /// An error of any class.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> QmpError {
        QmpError {
            class,
            desc: desc.into(),
        }
    }

    /// QEMU's reply for an unknown command name.
    pub fn command_not_found(command: &str) -> QmpError {
        QmpError::new(
            ErrorClass::CommandNotFound,
            format!("The command {command} has not been found"),
        )
    }

    /// The `{"class": .., "desc": ..}` object that goes under `"error"`.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("class".into(), Value::String(self.class.as_str().into()));
        m.insert("desc".into(), Value::String(self.desc.clone()));
        Value::Object(m)
    }

    /// Reads an `"error"` object; unknown classes become `GenericError`
    /// so a newer peer cannot make a reply unreadable.
    pub fn from_json(v: &Value) -> Option<QmpError> {
        let o = v.as_object()?;
        let class = o
            .get("class")
            .and_then(Value::as_str)
            .map(|c| ErrorClass::from_name(c).unwrap_or(ErrorClass::GenericError))?;
        let desc = o
            .get("desc")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        Some(QmpError { class, desc })
    }
}
