//! Numbers as fal reads them. fal's models validate their input with
//! pydantic in lax mode, which runs `"4"`, `4.0`, `" 4 "` and `true` as the
//! integers 4, 4, 4 and 1: a reader that took only JSON integers would price
//! a request for fewer images or seconds than fal runs. The proxy's cost
//! readers and the mock fal both read through here, so the mock runs what
//! fal would.

use simd_json::prelude::*;

/// An `int` field: an integer, an integral float, a boolean (0 or 1), or a
/// string of one (surrounding whitespace, a sign, `_` between digits and a
/// `.000` tail allowed). `None` for what pydantic refuses.
pub fn int(v: &impl ValueAsScalar) -> Option<i64> {
    if let Some(b) = v.as_bool() {
        return Some(i64::from(b));
    }
    if let Some(n) = v.as_i64() {
        return Some(n);
    }
    if let Some(n) = v.as_u64() {
        return i64::try_from(n).ok();
    }
    if let Some(f) = v.as_f64() {
        // 2^63 is exact as an f64; everything below it that is integral converts exactly.
        let fits = f.is_finite() && f.fract() == 0.0 && f.abs() < 9_223_372_036_854_775_808.0;
        return fits.then_some(f as i64);
    }
    int_text(v.as_str()?)
}

fn int_text(text: &str) -> Option<i64> {
    let text = text.trim();
    let (negative, unsigned) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let digits = match unsigned.split_once('.') {
        Some((whole, zeros)) if zeros.bytes().all(|b| b == b'0') => whole,
        Some(_) => return None,
        None => unsigned,
    };
    let bytes = digits.as_bytes();
    let well_placed = bytes.first()?.is_ascii_digit()
        && bytes.last()?.is_ascii_digit()
        && !digits.contains("__")
        && bytes.iter().all(|b| b.is_ascii_digit() || *b == b'_');
    if !well_placed {
        return None;
    }
    let magnitude: i64 = digits.replace('_', "").parse().ok()?;
    Some(if negative { -magnitude } else { magnitude })
}

/// Seconds, as thousandths rounded up: a number, a boolean, or a string of
/// a decimal number with an optional `s` (`"5"`, `" 10 "`, `"5.5"`, `"8s"`).
/// `None` for anything else, negatives included.
pub fn seconds_milli(v: &impl ValueAsScalar) -> Option<u64> {
    if let Some(b) = v.as_bool() {
        return Some(u64::from(b) * 1000);
    }
    if let Some(n) = v.as_u64() {
        return n.checked_mul(1000);
    }
    if let Some(f) = v.as_f64() {
        // A float's shortest text is exactly its decimal value as written,
        // so `0.1` counts as 100, never as 100.000000001 rounded up to 101.
        return f
            .is_finite()
            .then(|| decimal_milli(&f.to_string()))
            .flatten();
    }
    let text = v.as_str()?.trim();
    decimal_milli(text.strip_suffix('s').unwrap_or(text))
}

/// `12`, `+12.5`, `.25`, `0.0001` (rounded up to 1) in thousandths.
fn decimal_milli(text: &str) -> Option<u64> {
    let text = text.strip_prefix('+').unwrap_or(text);
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && frac.is_empty()) || !digits(whole) || !digits(frac) {
        return None;
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let (kept, rest) = frac.split_at(frac.len().min(3));
    let kept: u64 = format!("{kept:0<3}").parse().ok()?;
    let round_up = u64::from(rest.bytes().any(|b| b != b'0'));
    whole.checked_mul(1000)?.checked_add(kept + round_up)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(json: &str) -> simd_json::OwnedValue {
        let mut copy = json.as_bytes().to_vec();
        simd_json::to_owned_value(&mut copy).unwrap()
    }

    #[test]
    fn ints_as_pydantic_reads_them() {
        for (json, n) in [
            ("4", 4),
            ("-2", -2),
            ("4.0", 4),
            ("-0.0", 0),
            ("true", 1),
            ("false", 0),
            (r#""4""#, 4),
            (r#"" 4 ""#, 4),
            (r#""+4""#, 4),
            (r#""004""#, 4),
            (r#""4.00""#, 4),
            (r#""1_000""#, 1000),
            (r#""-7""#, -7),
            ("9223372036854775807", i64::MAX),
        ] {
            assert_eq!(int(&value(json)), Some(n), "{json}");
        }
        for json in [
            "4.5",
            "1e300",
            "18446744073709551615",
            r#""4.5""#,
            r#""four""#,
            r#""""#,
            r#""_4""#,
            r#""4__0""#,
            r#""4_""#,
            r#""1e3""#,
            r#""99999999999999999999""#,
            "null",
            "[4]",
            r#"{"n":4}"#,
        ] {
            assert_eq!(int(&value(json)), None, "{json}");
        }
    }

    #[test]
    fn seconds_in_every_spelling_rounded_up() {
        for (json, milli) in [
            ("10", 10_000),
            ("2.25", 2250),
            ("0.1", 100),
            ("5.0001", 5001),
            ("true", 1000),
            (r#""5""#, 5000),
            (r#"" 10 ""#, 10_000),
            (r#""8s""#, 8000),
            (r#""5.5""#, 5500),
            (r#""1.2345""#, 1235),
            (r#""+3""#, 3000),
            (r#"".5""#, 500),
        ] {
            assert_eq!(seconds_milli(&value(json)), Some(milli), "{json}");
        }
        for json in [
            "-3",
            "-0.5",
            r#""-1""#,
            r#""five""#,
            r#""""#,
            r#"".""#,
            r#""1e3""#,
            r#""5 s s""#,
            "18446744073709551615",
            "1e300",
            "null",
        ] {
            assert_eq!(seconds_milli(&value(json)), None, "{json}");
        }
    }
}
