//! Amounts between Toss's wire form (a JSON number in the currency's major
//! unit: `15000` KRW, `726.24` USD) and paygate's (an `i64` in minor units:
//! `15000` KRW, `72624` US cents).

use serde_json::Number;

/// Decimal places of a currency's minor unit, as Toss writes its amounts:
/// 0 for `KRW` and `JPY`, 2 for every other currency.
pub fn minor_unit_exponent(currency: &str) -> u32 {
    match currency {
        "KRW" | "JPY" => 0,
        _ => 2,
    }
}

/// Why a Toss amount could not be represented in minor units.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    /// More decimal places than the currency's minor unit has (`1000.5`
    /// KRW, `1.005` USD): not an amount of that currency.
    #[error("amount {amount} has more decimals than {currency} allows")]
    TooPrecise {
        /// The amount as written.
        amount: String,
        /// Its currency.
        currency: String,
    },
    /// Not finite, or beyond `i64` once in minor units.
    #[error("amount {amount} {currency} is out of range")]
    OutOfRange {
        /// The amount as written.
        amount: String,
        /// Its currency.
        currency: String,
    },
}

/// `amount` (major units, as Toss writes it) in minor units of `currency`.
///
/// # Errors
/// [`AmountError`] when the amount has finer precision than the currency's
/// minor unit or does not fit an `i64`.
pub(crate) fn to_minor(amount: &Number, currency: &str) -> Result<i64, AmountError> {
    let scale = 10_i64.pow(minor_unit_exponent(currency));
    let out_of_range = || AmountError::OutOfRange {
        amount: amount.to_string(),
        currency: currency.to_owned(),
    };
    if let Some(i) = amount.as_i64() {
        return i.checked_mul(scale).ok_or_else(out_of_range);
    }
    if amount.is_u64() {
        return Err(out_of_range());
    }
    let f = amount.as_f64().ok_or_else(out_of_range)?;
    let scaled = f * scale as f64;
    if !scaled.is_finite() || scaled.abs() >= i64::MAX as f64 {
        return Err(out_of_range());
    }
    let rounded = scaled.round();
    // `726.24 * 100` is `72623.99999999999` in binary floating point: a
    // rounding error of the representation, not a fraction of a cent.
    if (scaled - rounded).abs() > 1e-6 + scaled.abs() * 1e-12 {
        return Err(AmountError::TooPrecise {
            amount: amount.to_string(),
            currency: currency.to_owned(),
        });
    }
    Ok(rounded as i64)
}

/// `minor` units of `currency` as Toss writes the amount (major units; an
/// integer when whole).
pub(crate) fn to_major(minor: i64, currency: &str) -> Number {
    let scale = 10_i64.pow(minor_unit_exponent(currency));
    if minor % scale == 0 {
        return Number::from(minor / scale);
    }
    Number::from_f64(minor as f64 / scale as f64).unwrap_or_else(|| Number::from(minor / scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(json: &str) -> Number {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn major_to_minor_by_currency() {
        assert_eq!(to_minor(&n("15000"), "KRW"), Ok(15_000));
        assert_eq!(to_minor(&n("15000.0"), "KRW"), Ok(15_000));
        assert_eq!(to_minor(&n("1200"), "JPY"), Ok(1_200));
        assert_eq!(to_minor(&n("726.24"), "USD"), Ok(72_624));
        assert_eq!(to_minor(&n("0.29"), "USD"), Ok(29));
        assert_eq!(to_minor(&n("100"), "USD"), Ok(10_000));
        assert_eq!(to_minor(&n("19.9"), "EUR"), Ok(1_990));
        assert_eq!(to_minor(&n("-3.5"), "USD"), Ok(-350));
        assert_eq!(to_minor(&n("9999999.99"), "USD"), Ok(999_999_999));
    }

    #[test]
    fn finer_than_the_minor_unit_or_too_big_is_refused() {
        assert!(matches!(
            to_minor(&n("1000.5"), "KRW"),
            Err(AmountError::TooPrecise { .. })
        ));
        assert!(matches!(
            to_minor(&n("1.005"), "USD"),
            Err(AmountError::TooPrecise { .. })
        ));
        assert!(matches!(
            to_minor(&n("18446744073709551615"), "KRW"),
            Err(AmountError::OutOfRange { .. })
        ));
        assert!(matches!(
            to_minor(&n("92233720368547759"), "USD"),
            Err(AmountError::OutOfRange { .. })
        ));
    }

    #[test]
    fn minor_to_major_round_trips() {
        for (minor, currency) in [
            (15_000, "KRW"),
            (72_624, "USD"),
            (10_000, "USD"),
            (29, "USD"),
            (1_200, "JPY"),
        ] {
            let major = to_major(minor, currency);
            assert_eq!(to_minor(&major, currency), Ok(minor), "{major} {currency}");
        }
        assert_eq!(to_major(72_624, "USD").to_string(), "726.24");
        assert_eq!(to_major(15_000, "KRW").to_string(), "15000");
    }
}
