//! Health before and after a job, and what changed between the two.
//!
//! Observations are arbitrary JSON. They are compared leaf by leaf: nested
//! objects flatten to dotted paths (`disk.free`), anything else (a number,
//! a string, an array) is one leaf compared as a whole.

use std::collections::BTreeMap;

use serde_json::Value;

use super::text::pretty;

/// Leaves compared at most; a larger observation is compared on its first
/// leaves (in path order) and the page says so.
pub(crate) const LEAVES_MAX: usize = 1_000;

/// How a leaf changed.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Change {
    Added,
    Removed,
    Changed,
}

impl Change {
    pub(crate) fn class(self) -> &'static str {
        match self {
            Change::Added => "added",
            Change::Removed => "removed",
            Change::Changed => "changed",
        }
    }
}

/// One leaf that differs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Difference {
    pub(crate) path: String,
    pub(crate) change: Change,
    pub(crate) before: String,
    pub(crate) after: String,
}

/// Health as the page shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HealthView {
    /// The observations, pretty-printed.
    pub(crate) before: Option<String>,
    pub(crate) after: Option<String>,
    /// Which step the "after" observation followed.
    pub(crate) after_step: Option<u32>,
    pub(crate) differences: Vec<Difference>,
    pub(crate) unchanged: usize,
    /// Whether either observation had more than [`LEAVES_MAX`] leaves.
    pub(crate) truncated: bool,
}

impl HealthView {
    /// Compares `before` with `after` (observed after step `after_step`).
    pub(crate) fn new(
        before: Option<&Value>,
        after: Option<&Value>,
        after_step: Option<u32>,
    ) -> HealthView {
        let mut truncated = false;
        let mut leaves = |value: Option<&Value>| {
            let mut out = BTreeMap::new();
            if let Some(value) = value {
                flatten(value, String::new(), &mut out);
            }
            if out.len() > LEAVES_MAX {
                truncated = true;
                out = out.into_iter().take(LEAVES_MAX).collect();
            }
            out
        };
        let (old, new) = (leaves(before), leaves(after));
        let mut differences = Vec::new();
        let mut unchanged = 0;
        if before.is_some() && after.is_some() {
            for (path, was) in &old {
                match new.get(path) {
                    Some(now) if now == was => unchanged += 1,
                    Some(now) => differences.push(Difference {
                        path: path.clone(),
                        change: Change::Changed,
                        before: was.clone(),
                        after: now.clone(),
                    }),
                    None => differences.push(Difference {
                        path: path.clone(),
                        change: Change::Removed,
                        before: was.clone(),
                        after: String::new(),
                    }),
                }
            }
            for (path, now) in &new {
                if !old.contains_key(path) {
                    differences.push(Difference {
                        path: path.clone(),
                        change: Change::Added,
                        before: String::new(),
                        after: now.clone(),
                    });
                }
            }
            differences.sort_by(|a, b| a.path.cmp(&b.path));
        }
        HealthView {
            before: before.map(pretty),
            after: after.map(pretty),
            after_step,
            differences,
            unchanged,
            truncated,
        }
    }

    /// Whether anything was observed at all.
    pub(crate) fn observed(&self) -> bool {
        self.before.is_some() || self.after.is_some()
    }
}

fn flatten(value: &Value, path: String, out: &mut BTreeMap<String, String>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, child) in map {
                // Stop descending once the limit is passed: the caller cuts.
                if out.len() > LEAVES_MAX {
                    return;
                }
                let child_path = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                flatten(child, child_path, out);
            }
        }
        leaf => {
            let path = if path.is_empty() {
                "(whole observation)".to_owned()
            } else {
                path
            };
            out.insert(path, leaf.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nested_leaves_are_compared_by_path() {
        let before = json!({"disk": {"free": 10, "total": 100}, "ok": true, "gone": "x"});
        let after = json!({"disk": {"free": 7, "total": 100}, "ok": true, "new": [1]});
        let view = HealthView::new(Some(&before), Some(&after), Some(2));
        let got: Vec<(&str, Change, &str, &str)> = view
            .differences
            .iter()
            .map(|d| {
                (
                    d.path.as_str(),
                    d.change,
                    d.before.as_str(),
                    d.after.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("disk.free", Change::Changed, "10", "7"),
                ("gone", Change::Removed, "\"x\"", ""),
                ("new", Change::Added, "", "[1]"),
            ]
        );
        assert_eq!(view.unchanged, 2);
        assert!(view.observed() && !view.truncated);
    }

    #[test]
    fn one_side_missing_compares_nothing() {
        let view = HealthView::new(Some(&json!({"a": 1})), None, None);
        assert!(view.differences.is_empty());
        assert!(view.observed());
        assert!(!HealthView::new(None, None, None).observed());
    }

    #[test]
    fn huge_observations_are_cut_and_say_so() {
        let big: serde_json::Map<String, Value> = (0..LEAVES_MAX + 5)
            .map(|i| (format!("k{i:05}"), json!(i)))
            .collect();
        let view = HealthView::new(
            Some(&Value::Object(big.clone())),
            Some(&Value::Object(big)),
            None,
        );
        assert!(view.truncated);
        assert_eq!(view.unchanged, LEAVES_MAX);
    }
}
