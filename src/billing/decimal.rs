//! Exact decimal numbers for money settings. TOML hands us an `f64`; its
//! shortest round-trip text (Rust's `Display`) is exactly what the operator
//! wrote, and that text is parsed here into a scaled integer, so no float
//! ever takes part in a charge.

use std::fmt::Write as _;

/// Parses `value` into an integer count of `10^-scale` units. Refuses
/// negatives, and values finer than the scale instead of rounding them.
pub fn to_scaled(value: f64, scale: u32) -> Result<u64, String> {
    if !value.is_finite() || value < 0.0 {
        return Err(format!("{value} is not a non-negative number"));
    }
    let text = value.to_string();
    let (whole, frac) = text.split_once('.').unwrap_or((&text, ""));
    if text.contains(['e', 'E']) {
        return Err(format!("{value}: write it without an exponent"));
    }
    if frac.len() > scale as usize {
        return Err(format!("{value} has more than {scale} decimal places"));
    }
    let whole: u64 = whole.parse().map_err(|_| format!("{value} is too large"))?;
    let frac_units: u64 = if frac.is_empty() {
        0
    } else {
        frac.parse().unwrap_or(0)
    };
    let frac_units = frac_units * 10u64.pow(scale - frac.len() as u32);
    whole
        .checked_mul(10u64.pow(scale))
        .and_then(|w| w.checked_add(frac_units))
        .ok_or_else(|| format!("{value} is too large"))
}

/// Parses decimal text (`12`, `0.025`) into `10^-scale` units: digits only,
/// at most `scale` places, no sign or exponent; `None` otherwise or if too large.
pub fn parse_scaled(text: &str, scale: u32) -> Option<u64> {
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(frac) || frac.len() > scale as usize {
        return None;
    }
    let frac_units: u64 = match frac {
        "" => 0,
        f => f.parse::<u64>().ok()? * 10u64.pow(scale - f.len() as u32),
    };
    whole
        .parse::<u64>()
        .ok()?
        .checked_mul(10u64.pow(scale))?
        .checked_add(frac_units)
}

/// Formats `units` of `10^-scale` as a plain decimal (`12_000_000`, 9 → `0.012`).
/// Runs on every billed answer: one allocation, trailing zeros dropped by arithmetic.
pub fn format_scaled(units: u128, scale: u32) -> String {
    let div = 10u128.pow(scale);
    let (whole, mut frac) = (units / div, units % div);
    let mut text = String::new();
    push_digits(&mut text, whole, 1);
    if frac != 0 {
        let mut digits = scale as usize;
        while frac % 10 == 0 {
            frac /= 10;
            digits -= 1;
        }
        text.push('.');
        push_digits(&mut text, frac, digits);
    }
    text
}

/// `n`, zero-padded to `width`; with `u64`'s formatting where it fits, as
/// real amounts always do (`u128`'s is several times slower).
fn push_digits(text: &mut String, n: u128, width: usize) {
    let _ = match u64::try_from(n) {
        Ok(n) => write!(text, "{n:0width$}"),
        Err(_) => write!(text, "{n:0width$}"),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_operator_wrote_exactly() {
        assert_eq!(to_scaled(0.025, 9), Ok(25_000_000));
        assert_eq!(to_scaled(0.1, 6), Ok(100_000));
        assert_eq!(to_scaled(0.001, 9), Ok(1_000_000));
        assert_eq!(to_scaled(0.112, 9), Ok(112_000_000));
        assert_eq!(to_scaled(3.0, 9), Ok(3_000_000_000));
        assert_eq!(to_scaled(0.000000001, 9), Ok(1));
        assert!(to_scaled(0.0000000001, 9).is_err());
        assert!(to_scaled(-0.5, 9).is_err());
    }

    #[test]
    fn formats_without_trailing_zeros() {
        assert_eq!(format_scaled(12_000_000, 9), "0.012");
        assert_eq!(format_scaled(3_000_000_000, 9), "3");
        assert_eq!(format_scaled(1_500_000_000, 9), "1.5");
        assert_eq!(format_scaled(0, 9), "0");
        assert_eq!(format_scaled(1, 9), "0.000000001");
        assert_eq!(
            format_scaled(u128::MAX, 9),
            "340282366920938463463374607431.768211455"
        );
    }
}
