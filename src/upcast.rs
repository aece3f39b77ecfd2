//! Reading events written by older schema versions.
//!
//! Stored events are never rewritten: an event keeps the bytes and the
//! schema version it was written with (its digest commits to them). When an
//! older event is read, its payload is brought to the current shape by one
//! function per version step, applied in order. Each function states exactly
//! what changed in its step.

use serde_json::{Map, Value};

/// One version step: takes a payload of version `n` and returns version `n + 1`.
type Upcaster = fn(kind: &str, payload: Map<String, Value>) -> Result<Map<String, Value>, String>;

/// `UPCASTERS[n - 1]` brings version `n` to `n + 1`.
const UPCASTERS: &[Upcaster] = &[v1_to_v2];

/// The newest payload version: the one every upcast ends at, and the one
/// this build writes (`events::LATEST_VERSION`).
pub const LATEST_VERSION: u32 = UPCASTERS.len() as u32 + 1;

/// Why an old payload cannot be brought to the current shape.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UpcastError {
    /// The version is outside 1..=[`LATEST_VERSION`].
    #[error(
        "event schema version {found} is not supported (this build reads up to {LATEST_VERSION})"
    )]
    UnsupportedVersion {
        /// The stored version.
        found: u32,
    },
    /// A version step found the payload lacking what it needs.
    #[error("cannot upcast from schema version {from}: {reason}")]
    Step {
        /// The version the failing step starts from.
        from: u32,
        /// What is missing or wrong.
        reason: String,
    },
}

/// Version 1 → 2: `StepFailed` carried the failure kind and its message as two
/// flat fields, `"failure": "<kind>"` and `"error": "<message>"`. Version 2
/// groups them as `"failure": {"kind": "<kind>", "message": "<message>"}`, so
/// that kind-specific details have one place to go. Other kinds are unchanged.
pub fn v1_to_v2(kind: &str, mut payload: Map<String, Value>) -> Result<Map<String, Value>, String> {
    if kind != "StepFailed" {
        return Ok(payload);
    }
    let failure_kind = payload.remove("failure").ok_or("missing field `failure`")?;
    let message = payload.remove("error").ok_or("missing field `error`")?;
    let mut failure = Map::new();
    failure.insert("kind".into(), failure_kind);
    failure.insert("message".into(), message);
    payload.insert("failure".into(), Value::Object(failure));
    Ok(payload)
}

/// Brings a payload stored at `schema_version` to [`LATEST_VERSION`].
///
/// # Errors
/// [`UpcastError::Step`] when the payload is not an object or lacks what a
/// step needs; [`UpcastError::UnsupportedVersion`] for a version outside
/// 1..=[`LATEST_VERSION`].
pub fn to_current(kind: &str, schema_version: u32, payload: Value) -> Result<Value, UpcastError> {
    if schema_version == 0 || schema_version > LATEST_VERSION {
        return Err(UpcastError::UnsupportedVersion {
            found: schema_version,
        });
    }
    let Value::Object(mut map) = payload else {
        return Err(UpcastError::Step {
            from: schema_version,
            reason: "payload is not a JSON object".into(),
        });
    };
    for (step, upcaster) in UPCASTERS
        .iter()
        .enumerate()
        .skip(schema_version as usize - 1)
    {
        map = upcaster(kind, map).map_err(|reason| UpcastError::Step {
            from: step as u32 + 1,
            reason,
        })?;
    }
    Ok(Value::Object(map))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn v1_step_failed_gains_a_failure_object() {
        let v1 = json!({"step_index": 1, "failure": "no_handler", "error": "No handler", "output": null, "health_after": null});
        let v2 = to_current("StepFailed", 1, v1).unwrap();
        assert_eq!(
            v2,
            json!({"step_index": 1, "failure": {"kind": "no_handler", "message": "No handler"}, "output": null, "health_after": null})
        );
    }

    #[test]
    fn other_kinds_pass_unchanged() {
        let v1 = json!({"step_index": 0});
        assert_eq!(to_current("StepStarted", 1, v1.clone()).unwrap(), v1);
        assert_eq!(
            to_current("StepStarted", LATEST_VERSION, v1.clone()).unwrap(),
            v1
        );
    }

    #[test]
    fn malformed_old_payloads_are_errors() {
        let err = to_current("StepFailed", 1, json!({"step_index": 1})).unwrap_err();
        assert!(err.to_string().contains("missing field `failure`"), "{err}");
        assert!(to_current("StepFailed", 1, json!([1])).is_err());
        assert!(to_current("StepFailed", 0, json!({})).is_err());
        assert!(to_current("StepFailed", LATEST_VERSION + 1, json!({})).is_err());
    }
}
