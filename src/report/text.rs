//! How values are shown: durations, collapsed JSON and long text. Pure
//! functions of their input, so that a page is the same bytes every time.

use serde_json::Value;

/// A JSON value or text shorter than this (in characters) is shown inline;
/// a longer one is collapsed behind its first characters.
const INLINE_CHARS_MAX: usize = 72;

/// A health observation longer than this is collapsed behind its size.
const OBSERVATION_INLINE_CHARS_MAX: usize = 24;

/// Characters of a collapsed value shown in its summary line.
const SUMMARY_CHARS: usize = 56;

/// Bytes of one value shown in full. Handler output can be large (a
/// `command` step keeps 64 KiB of each stream); past this the page says how
/// much it left out, and the log keeps all of it.
pub(crate) const SHOWN_BYTES_MAX: usize = 32 * 1024;

/// A value as a cell shows it: inline when short, else a summary line and
/// the whole (pretty-printed) value behind a `<details>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Cell {
    /// The value itself when short, else its first characters and an ellipsis.
    pub(crate) short: String,
    /// The whole value when it does not fit inline.
    pub(crate) full: Option<String>,
    /// Bytes left out of `full` by [`SHOWN_BYTES_MAX`].
    pub(crate) omitted_bytes: usize,
    /// JSON, shown as code; otherwise prose, such as an error message.
    pub(crate) code: bool,
}

impl Cell {
    /// A JSON value: compact inline, pretty when collapsed.
    pub(crate) fn json(value: &Value) -> Cell {
        let compact = spaced(value);
        if compact.chars().count() <= INLINE_CHARS_MAX {
            return Cell {
                short: compact,
                full: None,
                omitted_bytes: 0,
                code: true,
            };
        }
        Cell::collapsed(&compact, pretty(value), true)
    }

    /// A health observation: the same large object after every step, so
    /// collapsed behind how many values it holds unless it is tiny.
    pub(crate) fn observation(value: &Value) -> Cell {
        let compact = value.to_string();
        if compact.chars().count() <= OBSERVATION_INLINE_CHARS_MAX {
            return Cell::json(value);
        }
        let mut cell = Cell::collapsed(&compact, pretty(value), false);
        let leaves = leaves(value);
        cell.short = format!("{leaves} value{}", if leaves == 1 { "" } else { "s" });
        cell
    }

    /// Plain text, such as an error message.
    pub(crate) fn text(text: &str) -> Cell {
        if text.chars().count() <= INLINE_CHARS_MAX && !text.contains('\n') {
            return Cell {
                short: text.to_owned(),
                full: None,
                omitted_bytes: 0,
                code: false,
            };
        }
        Cell::collapsed(text, text.to_owned(), false)
    }

    fn collapsed(line: &str, mut full: String, code: bool) -> Cell {
        let first_line = line.lines().next().unwrap_or_default();
        let mut short: String = first_line.chars().take(SUMMARY_CHARS).collect();
        short.push('…');
        let whole_bytes = full.len();
        full.truncate(floor_char_boundary(&full, SHOWN_BYTES_MAX));
        Cell {
            short,
            omitted_bytes: whole_bytes - full.len(),
            full: Some(full),
            code,
        }
    }
}

/// `value` on one line with a space after each `,` and `:`, so that a
/// narrow cell can wrap it between values rather than inside them.
pub(crate) fn spaced(value: &Value) -> String {
    use serde::Serialize as _;

    struct Spaced;
    impl serde_json::ser::Formatter for Spaced {
        fn begin_array_value<W: ?Sized + std::io::Write>(
            &mut self,
            writer: &mut W,
            first: bool,
        ) -> std::io::Result<()> {
            if first {
                Ok(())
            } else {
                writer.write_all(b", ")
            }
        }
        fn begin_object_key<W: ?Sized + std::io::Write>(
            &mut self,
            writer: &mut W,
            first: bool,
        ) -> std::io::Result<()> {
            if first {
                Ok(())
            } else {
                writer.write_all(b", ")
            }
        }
        fn begin_object_value<W: ?Sized + std::io::Write>(
            &mut self,
            writer: &mut W,
        ) -> std::io::Result<()> {
            writer.write_all(b": ")
        }
    }

    let mut bytes = Vec::new();
    let mut serializer = serde_json::Serializer::with_formatter(&mut bytes, Spaced);
    // Writing a JSON value into memory cannot fail, and its bytes are UTF-8.
    match value.serialize(&mut serializer) {
        Ok(()) => String::from_utf8(bytes).unwrap_or_else(|_| value.to_string()),
        Err(_) => value.to_string(),
    }
}

/// The number of leaf values in `value` (objects and arrays are not leaves).
fn leaves(value: &Value) -> usize {
    match value {
        Value::Object(map) => map.values().map(leaves).sum(),
        Value::Array(items) => items.iter().map(leaves).sum(),
        _ => 1,
    }
}

/// `value` pretty-printed, at most [`SHOWN_BYTES_MAX`] of it (the log keeps
/// the rest).
pub(crate) fn pretty(value: &Value) -> String {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    if text.len() > SHOWN_BYTES_MAX {
        text.truncate(floor_char_boundary(&text, SHOWN_BYTES_MAX));
        text.push_str("\n…");
    }
    text
}

/// The largest char boundary of `text` at or below `at`.
fn floor_char_boundary(text: &str, at: usize) -> usize {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// A count with thousands separated: `15,558`.
pub(crate) fn count(n: impl std::fmt::Display) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// Shortens `text` to `chars_max` characters, with an ellipsis when cut.
pub(crate) fn ellipsis(text: &str, chars_max: usize) -> String {
    if text.chars().count() <= chars_max {
        return text.to_owned();
    }
    let mut short: String = text.chars().take(chars_max.saturating_sub(1)).collect();
    short.push('…');
    short
}

/// A duration in microseconds for people: `850 µs`, `1.25 ms`, `3.004 s`,
/// `2 min 5 s`, `3 h 20 min`, `2 d 4 h`. Exact integer arithmetic: no
/// rounding that could differ between machines.
pub(crate) fn duration(micros: i64) -> String {
    if micros < 0 {
        return format!("-{}", duration(micros.saturating_neg()));
    }
    let us = micros as u64;
    const MS: u64 = 1_000;
    const S: u64 = 1_000_000;
    const MIN: u64 = 60 * S;
    const H: u64 = 60 * MIN;
    const D: u64 = 24 * H;
    match us {
        0..MS => format!("{us} µs"),
        MS..S => format!("{} ms", decimal(us / MS, us % MS, 3)),
        S..MIN => format!("{} s", decimal(us / S, (us % S) / MS, 3)),
        MIN..H => with_unit(us / MIN, "min", (us % MIN) / S, "s"),
        H..D => with_unit(us / H, "h", (us % H) / MIN, "min"),
        _ => with_unit(us / D, "d", (us % D) / H, "h"),
    }
}

/// `whole.fraction` with `digits` fraction digits, trailing zeros dropped.
fn decimal(whole: u64, fraction: u64, digits: usize) -> String {
    if fraction == 0 {
        return whole.to_string();
    }
    let fraction = format!("{fraction:0digits$}");
    format!("{whole}.{}", fraction.trim_end_matches('0'))
}

fn with_unit(major: u64, major_unit: &str, minor: u64, minor_unit: &str) -> String {
    if minor == 0 {
        format!("{major} {major_unit}")
    } else {
        format!("{major} {major_unit} {minor} {minor_unit}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn durations_read_naturally_at_every_scale() {
        let cases = [
            (0, "0 µs"),
            (850, "850 µs"),
            (1_000, "1 ms"),
            (1_250, "1.25 ms"),
            (5_000, "5 ms"),
            (3_004_999, "3.004 s"),
            (59_999_999, "59.999 s"),
            (125_000_000, "2 min 5 s"),
            (3_600_000_000, "1 h"),
            (12_000_000_000, "3 h 20 min"),
            (187_200_000_000, "2 d 4 h"),
            (-1_500, "-1.5 ms"),
        ];
        for (micros, want) in cases {
            assert_eq!(duration(micros), want, "{micros} µs");
        }
    }

    #[test]
    fn short_values_are_inline_and_long_ones_collapse() {
        let short = Cell::json(&json!({"argv": ["true", "-x"], "cwd": "/"}));
        assert_eq!(short.short, r#"{"argv": ["true", "-x"], "cwd": "/"}"#);
        assert_eq!(short.full, None);

        let long = Cell::json(&json!({"stdout": "x".repeat(200)}));
        assert!(long.short.ends_with('…'));
        assert_eq!(long.short.chars().count(), SUMMARY_CHARS + 1);
        let full = long.full.unwrap();
        assert!(
            full.contains(&"x".repeat(200)) && full.contains('\n'),
            "pretty"
        );
        assert_eq!(long.omitted_bytes, 0);

        let multiline = Cell::text("first line\nsecond line");
        assert_eq!(multiline.short, "first line…");
        assert_eq!(multiline.full.as_deref(), Some("first line\nsecond line"));
    }

    #[test]
    fn observations_collapse_behind_their_size() {
        let small = Cell::observation(&json!({"ok": true}));
        assert_eq!(
            (small.short.as_str(), small.full),
            (r#"{"ok": true}"#, None)
        );
        let big =
            Cell::observation(&json!({"db": {"lag_s": 1, "connections": 12}, "up": [true, false]}));
        assert_eq!(big.short, "4 values");
        assert!(big.full.unwrap().contains("\"connections\": 12"));
    }

    #[test]
    fn huge_values_are_cut_at_a_char_boundary_and_say_how_much() {
        let text = "é".repeat(SHOWN_BYTES_MAX);
        let cell = Cell::text(&text);
        let full = cell.full.unwrap();
        assert!(full.len() <= SHOWN_BYTES_MAX);
        assert_eq!(full.len() + cell.omitted_bytes, text.len());
    }

    #[test]
    fn counts_are_grouped_by_thousands() {
        let cases = [
            (0, "0"),
            (999, "999"),
            (1_000, "1,000"),
            (15_558, "15,558"),
            (1_234_567, "1,234,567"),
        ];
        for (n, want) in cases {
            assert_eq!(count(n), want);
        }
    }

    #[test]
    fn ellipsis_counts_characters_not_bytes() {
        assert_eq!(ellipsis("ééé", 3), "ééé");
        assert_eq!(ellipsis("éééé", 3), "éé…");
    }
}
