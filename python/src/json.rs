//! Python values ↔ JSON values, as the event log stores them.
//!
//! Everything a handler or an observer hands over is copied into a
//! `serde_json::Value` here: the log never holds a reference to a Python
//! object, so nothing a caller mutates later can change what was recorded.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde_json::{Map, Number, Value};

/// Deepest nesting accepted: input controls it, and a structure that
/// contains itself would otherwise recurse without end.
pub const DEPTH_MAX: usize = 128;

/// Copies a Python value (None, bool, int, float, str, list, tuple, dict
/// with str keys) into JSON.
///
/// # Errors
/// `TypeError` for any other type or a non-str key, `ValueError` for a
/// float that JSON cannot carry (NaN, infinities), an int outside 64 bits,
/// or nesting deeper than [`DEPTH_MAX`].
pub fn to_value(obj: &Bound<'_, PyAny>) -> PyResult<Value> {
    to_value_at(obj, 0)
}

fn to_value_at(obj: &Bound<'_, PyAny>, depth: usize) -> PyResult<Value> {
    if depth > DEPTH_MAX {
        return Err(PyValueError::new_err(format!(
            "value nested deeper than {DEPTH_MAX} levels (or containing itself) cannot be recorded as JSON"
        )));
    }
    if obj.is_none() {
        return Ok(Value::Null);
    }
    // bool before int: a Python bool is an int.
    if let Ok(b) = obj.cast::<PyBool>() {
        return Ok(Value::Bool(b.is_true()));
    }
    if obj.is_instance_of::<PyInt>() {
        if let Ok(i) = obj.extract::<i64>() {
            return Ok(Value::Number(i.into()));
        }
        if let Ok(u) = obj.extract::<u64>() {
            return Ok(Value::Number(u.into()));
        }
        return Err(PyValueError::new_err(format!(
            "integer {} does not fit in 64 bits and cannot be recorded as JSON",
            obj.str()?
        )));
    }
    if obj.is_instance_of::<PyFloat>() {
        let f: f64 = obj.extract()?;
        return Number::from_f64(f)
            .map(Value::Number)
            .ok_or_else(|| PyValueError::new_err(format!("float {f} cannot be recorded as JSON")));
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(Value::String(s.to_cow()?.into_owned()));
    }
    if let Ok(dict) = obj.cast::<PyDict>() {
        let mut map = Map::with_capacity(dict.len());
        for (key, value) in dict.iter() {
            let Ok(key) = key.cast::<PyString>() else {
                return Err(PyTypeError::new_err(format!(
                    "keys must be str to be recorded as JSON, not {}",
                    key.get_type().name()?
                )));
            };
            map.insert(key.to_cow()?.into_owned(), to_value_at(&value, depth + 1)?);
        }
        return Ok(Value::Object(map));
    }
    if obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>() {
        let mut items = Vec::with_capacity(obj.len()?);
        for item in obj.try_iter()? {
            items.push(to_value_at(&item?, depth + 1)?);
        }
        return Ok(Value::Array(items));
    }
    Err(PyTypeError::new_err(format!(
        "object of type {} cannot be recorded as JSON",
        obj.get_type().name()?
    )))
}

/// A fresh Python value equal to `value`: dicts, lists, str, int, float,
/// bool, None.
///
/// # Errors
/// Only when Python cannot allocate.
pub fn to_python<'py>(py: Python<'py>, value: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match value {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.into_pyobject(py)?.into_any()
            } else if let Some(u) = n.as_u64() {
                u.into_pyobject(py)?.into_any()
            } else {
                // serde_json numbers are i64, u64 or finite f64.
                n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any()
            }
        }
        Value::String(s) => PyString::new(py, s).into_any(),
        Value::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(to_python(py, item)?)?;
            }
            list.into_any()
        }
        Value::Object(map) => {
            let dict = PyDict::new(py);
            for (key, item) in map {
                dict.set_item(key, to_python(py, item)?)?;
            }
            dict.into_any()
        }
    })
}

/// `to_python` of an optional value, `None` when absent.
///
/// # Errors
/// As [`to_python`].
pub fn to_python_opt<'py>(py: Python<'py>, value: Option<&Value>) -> PyResult<Bound<'py, PyAny>> {
    match value {
        Some(value) => to_python(py, value),
        None => Ok(py.None().into_bound(py)),
    }
}
