//! Exact decimals without floating point: the fixed-point forms the policy
//! works in (rates in parts per million, weights in basis points), reading
//! them from a decimal's text and writing them back for log lines.
//!
//! Rates stay integers so that comparisons are exact: `0.1 * 30` is
//! 3.0000000000000004 in floating point, and three failures out of thirty
//! must trip a 0.1 threshold.

/// Parts per million: rates and ratios are kept as `u32` millionths.
pub(crate) const PPM: u64 = 1_000_000;

/// A rate in parts per million as a decimal: `250_000` is `0.25`.
pub(crate) fn ppm_text(ppm: u32) -> String {
    decimal(u64::from(ppm), 6)
}

/// `units × 10^-places` as a decimal, trailing zeros dropped:
/// `decimal(250_000, 6)` is `0.25`, `decimal(1_000_000, 6)` is `1`.
pub(crate) fn decimal(units: u64, places: u32) -> String {
    let mut text = fixed_decimal(units, places);
    if text.contains('.') {
        let kept = text.trim_end_matches('0').trim_end_matches('.').len();
        text.truncate(kept);
    }
    text
}

/// `units × 10^-places` with exactly `places` decimals: `(30, 3)` is `0.030`.
fn fixed_decimal(units: u64, places: u32) -> String {
    let Some(scale) = 10u64.checked_pow(places) else {
        return units.to_string();
    };
    if places == 0 {
        return units.to_string();
    }
    let width = places as usize;
    format!("{}.{:0width$}", units / scale, units % scale)
}

/// `part / whole` with exactly `places` decimals, rounded to nearest (ties
/// to even, as Rust's float formatting does): `ratio_decimal(1, 40, 2)` is
/// `0.02`, `ratio_decimal(3, 100, 3)` is `0.030`. A zero `whole` gives zero.
pub(crate) fn ratio_decimal(part: u64, whole: u64, places: u32) -> String {
    let places = places.min(19);
    let scale = 10u64.pow(places);
    let (Some(mut int), Some(rest)) = (part.checked_div(whole), part.checked_rem(whole)) else {
        return fixed_decimal(0, places);
    };
    // The decimals: rest × 10^places / whole, below 10^places. The product
    // may pass u64::MAX, so it is taken as a u128, once.
    let scaled = u128::from(rest) * u128::from(scale);
    let (quotient, left) = (scaled / u128::from(whole), scaled % u128::from(whole));
    let mut frac = u64::try_from(quotient).unwrap_or(0);
    let last_digit = if places == 0 { int } else { frac };
    let left_twice = left * 2;
    if left_twice > u128::from(whole) || (left_twice == u128::from(whole) && last_digit % 2 == 1) {
        frac += 1;
    }
    if frac == scale {
        // Rounding carried; `int` is at most u64::MAX / 2 when anything is left.
        int = int.saturating_add(1);
        frac = 0;
    }
    if places == 0 {
        return int.to_string();
    }
    let width = places as usize;
    format!("{int}.{frac:0width$}")
}

/// What a fixed-point conversion left below its last unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Rest {
    Zero,
    BelowHalf,
    Half,
    AboveHalf,
}

/// A non-negative number scaled by `10^scale`: `units` whole units, and
/// what the decimal had beyond them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fixed {
    pub(crate) units: u64,
    pub(crate) rest: Rest,
}

impl Fixed {
    /// The units, rounded to nearest, half away from zero (as the float code
    /// this replaced rounded).
    pub(crate) fn rounded(self) -> u64 {
        self.units
            .saturating_add(u64::from(self.rest >= Rest::Half))
    }

    /// The units, if the decimal had no digit beyond the scale.
    pub(crate) fn exact(self) -> Option<u64> {
        (self.rest == Rest::Zero).then_some(self.units)
    }

    pub(crate) fn is_zero(self) -> bool {
        self.units == 0 && self.rest == Rest::Zero
    }
}

/// A JSON number's exact value times `10^scale`: `None` if `text` is not a
/// JSON number; otherwise whether it is below zero (and not zero), the whole
/// units (`None` past `u64::MAX`), and the rest.
pub(crate) fn scaled(text: &str, scale: u32) -> Option<(bool, Option<u64>, Rest)> {
    let (negative, body) = match text.strip_prefix('-') {
        Some(body) => (true, body),
        None => (false, text),
    };
    let (mantissa, exponent) = match body.split_once(['e', 'E']) {
        Some((mantissa, exponent)) => (mantissa, Some(exponent)),
        None => (body, None),
    };
    let (int, frac) = match mantissa.split_once('.') {
        Some((int, frac)) => (int, Some(frac)),
        None => (mantissa, None),
    };
    let all_digits =
        |digits: &str| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(int) || !frac.is_none_or(all_digits) {
        return None;
    }
    let frac = frac.unwrap_or("");
    // The exponent saturates far beyond anything that fits a u64.
    let mut exp: i64 = 0;
    if let Some(exponent) = exponent {
        let (sign, digits) = match exponent.as_bytes().first() {
            Some(b'-') => (-1, exponent.get(1..).unwrap_or("")),
            Some(b'+') => (1, exponent.get(1..).unwrap_or("")),
            _ => (1, exponent),
        };
        if !all_digits(digits) {
            return None;
        }
        for b in digits.bytes() {
            exp = (exp * 10 + i64::from(b - b'0')).min(1_000_000_000_000);
        }
        exp *= sign;
    }
    // How many of the digits (integer part, then fraction) are whole units.
    let point = i64::try_from(int.len())
        .unwrap_or(i64::MAX)
        .saturating_add(exp)
        .saturating_add(i64::from(scale));
    let mut units = Some(0u64);
    let mut rest = Rest::Zero;
    let mut count: i64 = 0;
    for b in int.bytes().chain(frac.bytes()) {
        let digit = b - b'0';
        if count < point {
            units = units
                .and_then(|units| units.checked_mul(10))
                .and_then(|units| units.checked_add(u64::from(digit)));
        } else if count == point {
            rest = match digit {
                0 => Rest::Zero,
                1..=4 => Rest::BelowHalf,
                5 => Rest::Half,
                _ => Rest::AboveHalf,
            };
        } else if digit != 0 {
            rest = match rest {
                Rest::Zero => Rest::BelowHalf,
                Rest::Half => Rest::AboveHalf,
                other => other,
            };
        }
        count += 1;
    }
    // Zeros the exponent adds after the digits (a u64 overflows within 20).
    let mut zeros = point.saturating_sub(count);
    while zeros > 0 && units.is_some_and(|units| units != 0) {
        units = units.and_then(|units| units.checked_mul(10));
        zeros -= 1;
    }
    let nonzero = units != Some(0) || rest != Rest::Zero;
    Some((negative && nonzero, units, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A non-negative decimal that fits, scaled.
    fn fixed(text: &str, scale: u32) -> Result<Fixed, String> {
        match scaled(text, scale) {
            Some((false, Some(units), rest)) => Ok(Fixed { units, rest }),
            other => Err(format!("{text}: {other:?}")),
        }
    }

    fn exact(units: u64) -> Result<Fixed, String> {
        Ok(Fixed {
            units,
            rest: Rest::Zero,
        })
    }

    #[test]
    fn fixed_point_is_exact_without_floats() {
        let pct = |text| fixed(text, 2);
        assert_eq!(pct("12.34"), exact(1234));
        assert_eq!(pct("0.01"), exact(1));
        assert_eq!(pct("100"), exact(10_000));
        assert_eq!(pct("100.000"), exact(10_000));
        assert_eq!(pct("0"), exact(0));
        assert_eq!(pct("-0"), exact(0));
        assert_eq!(pct("-0.000"), exact(0));
        assert_eq!(pct("99.99"), exact(9999));
        // Digits beyond the scale are reported, for the caller to round or refuse.
        let rest = |text| pct(text).map(|fixed| (fixed.units, fixed.rest));
        assert_eq!(rest("12.345"), Ok((1234, Rest::Half)));
        assert_eq!(rest("12.3450000001"), Ok((1234, Rest::AboveHalf)));
        assert_eq!(rest("12.3449999"), Ok((1234, Rest::BelowHalf)));
        assert_eq!(rest("12.346"), Ok((1234, Rest::AboveHalf)));
        assert_eq!(
            rest("12.3400000000000000000000001"),
            Ok((1234, Rest::BelowHalf))
        );
        assert_eq!(rest("0.001"), Ok((0, Rest::BelowHalf)));
        assert_eq!(pct("12.345").map(Fixed::rounded), Ok(1235));
        assert_eq!(pct("12.3449").map(Fixed::rounded), Ok(1234));
        assert_eq!(pct("12.345").map(Fixed::exact), Ok(None));
        // Exponents are exact too.
        assert_eq!(pct("1.234e1"), exact(1234));
        assert_eq!(pct("1E2"), exact(10_000));
        assert_eq!(pct("1e+1"), exact(1000));
        assert_eq!(pct("1000e-2"), exact(1000));
        assert_eq!(pct("0.00001e3"), exact(1));
        assert_eq!(rest("1e-1000000000000000000000"), Ok((0, Rest::BelowHalf)));
        assert_eq!(pct("0e1000000000000000000000"), exact(0));
        assert_eq!(pct("0.0e-5"), exact(0));
        // Past u64 and below zero are told apart, for the caller's range message.
        assert_eq!(scaled("1e30", 2), Some((false, None, Rest::Zero)));
        assert_eq!(scaled("-0.01", 2), Some((true, Some(1), Rest::Zero)));
        assert_eq!(scaled("-1e-9", 2), Some((true, Some(0), Rest::BelowHalf)));
        assert_eq!(scaled("x", 2), None);
        let ratio = |text| fixed(text, 6);
        assert_eq!(ratio("0.29"), exact(290_000));
        assert_eq!(ratio("0.1"), exact(100_000));
        assert_eq!(ratio("1e-1"), exact(100_000));
        assert_eq!(ratio("0.000001"), exact(1));
        assert_eq!(ratio("0.3333333").map(Fixed::rounded), Ok(333_333));
        assert_eq!(ratio("0.0000005").map(Fixed::rounded), Ok(1));
        assert_eq!(ratio("0.0000001").map(Fixed::is_zero), Ok(false));
        assert_eq!(ratio("0.0000000").map(Fixed::is_zero), Ok(true));
    }

    #[test]
    fn decimals_are_written_without_floats() {
        assert_eq!(decimal(250_000, 6), "0.25");
        assert_eq!(decimal(1_000_000, 6), "1");
        assert_eq!(decimal(1, 6), "0.000001");
        assert_eq!(decimal(0, 6), "0");
        assert_eq!(decimal(1050, 2), "10.5");
        assert_eq!(decimal(10_000_000_000, 8), "100");
        assert_eq!(decimal(42, 0), "42");
        assert_eq!(ratio_decimal(11, 22, 2), "0.50");
        assert_eq!(ratio_decimal(3, 100, 3), "0.030");
        assert_eq!(ratio_decimal(1, 3, 2), "0.33");
        assert_eq!(ratio_decimal(2, 3, 2), "0.67");
        assert_eq!(ratio_decimal(22, 22, 2), "1.00");
        assert_eq!(ratio_decimal(0, 0, 2), "0.00");
        assert_eq!(ratio_decimal(5300, 1000, 1), "5.3");
        assert_eq!(ratio_decimal(5960, 1000, 1), "6.0");
        // Ties go to even, as `{:.2}` of the same (exact) float did.
        assert_eq!(ratio_decimal(1, 8, 2), "0.12");
        assert_eq!(ratio_decimal(3, 8, 2), "0.38");
        assert_eq!(ratio_decimal(5250, 1000, 1), "5.2");
        assert_eq!(ratio_decimal(5750, 1000, 1), "5.8");
        assert_eq!(ratio_decimal(u64::MAX, u64::MAX, 3), "1.000");
        assert_eq!(ratio_decimal(u64::MAX, 1, 1), format!("{}.0", u64::MAX));
        assert_eq!(ratio_decimal(u64::MAX, 2, 1), format!("{}.5", u64::MAX / 2));
        assert_eq!(ratio_decimal(999, 1000, 2), "1.00");
        assert_eq!(ratio_decimal(7, 2, 0), "4");
        assert_eq!(ratio_decimal(5, 2, 0), "2");
        assert_eq!(ratio_decimal(5, 3, 0), "2");
    }
}
