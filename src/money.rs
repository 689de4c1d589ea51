//! Money as integers: nano-USD (`i64`, 1 USD = 10⁹). No floats ever touch an amount.
//!
//! Prices are kept per million tokens, in nano-USD, so `$0.15 / 1M tokens` is `150_000_000` and
//! the cost of `n` tokens is `n × price / 10⁶`, rounded up to the next nano-USD (a provider never
//! bills less than its price).

use std::fmt;

/// An amount of money in nano-USD.
pub type NanoUsd = i64;

pub const NANOS_PER_USD: i64 = 1_000_000_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("`{0}` is not a decimal number")]
    NotANumber(String),
    #[error("`{0}` has more precision than the unit allows")]
    TooPrecise(String),
    #[error("`{0}` is out of range")]
    OutOfRange(String),
    #[error("`{0}` is negative")]
    Negative(String),
    #[error("`{0}` is not a plain decimal: write digits with an optional fraction, like 12.50 (no sign, exponent or spaces)")]
    NotPlain(String),
}

/// Parse a non-negative decimal literal (`"12.50"`, `"1.5e-07"`) exactly, scaled by
/// `10^scale`, into an integer. Fails rather than rounding if the result is not whole.
pub fn parse_scaled(text: &str, scale: i32) -> Result<i64, MoneyError> {
    let t = text.trim();
    let err = || MoneyError::NotANumber(text.to_owned());
    if t.starts_with('-') {
        return Err(MoneyError::Negative(text.to_owned()));
    }
    let t = t.strip_prefix('+').unwrap_or(t);
    let (mantissa, exp) = match t.find(['e', 'E']) {
        Some(i) => (&t[..i], t[i + 1..].parse::<i32>().map_err(|_| err())?),
        None => (t, 0),
    };
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int_part.is_empty() && frac_part.is_empty() {
        return Err(err());
    }
    if !int_part.bytes().chain(frac_part.bytes()).all(|b| b.is_ascii_digit()) {
        return Err(err());
    }
    let digits: String = format!("{int_part}{frac_part}");
    let digits = digits.trim_start_matches('0');
    // value = digits × 10^(exp − len(frac)) × 10^scale
    let mut power = exp as i64 - frac_part.len() as i64 + scale as i64;
    let mut digits = digits.to_owned();
    while power < 0 {
        match digits.pop() {
            Some('0') => power += 1,
            Some(_) => return Err(MoneyError::TooPrecise(text.to_owned())),
            None => return Ok(0),
        }
    }
    if digits.is_empty() {
        return Ok(0);
    }
    let base: i64 = digits.parse().map_err(|_| MoneyError::OutOfRange(text.to_owned()))?;
    let factor = 10i64
        .checked_pow(power as u32)
        .ok_or_else(|| MoneyError::OutOfRange(text.to_owned()))?;
    base.checked_mul(factor)
        .ok_or_else(|| MoneyError::OutOfRange(text.to_owned()))
}

/// Parse a USD amount (`"12.50"`) into nano-USD.
pub fn parse_usd(text: &str) -> Result<NanoUsd, MoneyError> {
    parse_scaled(text, 9)
}

/// Parse a USD amount a person typed (`"12.50"`, `"1000"`) into nano-USD: digits with an
/// optional fraction and nothing else. Money moved by hand must mean what it reads as:
/// [`parse_usd`] also takes exponents (price lists are written `1.5e-07`), and `"1e3"` in a
/// top-up would credit $1000 to someone who meant something else.
pub fn parse_plain_usd(text: &str) -> Result<NanoUsd, MoneyError> {
    let (int_part, frac_part) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(int_part) || (text.contains('.') && !digits(frac_part)) {
        return Err(MoneyError::NotPlain(text.to_owned()));
    }
    parse_usd(text)
}

/// The cost of `tokens` at `price_per_mtok` nano-USD per million tokens, rounded up.
pub fn token_cost(tokens: u64, price_per_mtok: NanoUsd) -> NanoUsd {
    let product = tokens as i128 * price_per_mtok as i128;
    let cost = (product + 999_999) / 1_000_000;
    cost.min(i64::MAX as i128) as i64
}

/// Formats nano-USD as a decimal USD string with all nine places trimmed of trailing zeros
/// (`12.5`, `0.000000150`→`0.00000015`).
pub struct Usd(pub NanoUsd);

impl fmt::Display for Usd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let whole = abs / NANOS_PER_USD as u64;
        let frac = abs % NANOS_PER_USD as u64;
        if frac == 0 {
            return write!(f, "{sign}{whole}");
        }
        let frac = format!("{frac:09}");
        write!(f, "{sign}{whole}.{}", frac.trim_end_matches('0'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exactly() {
        assert_eq!(parse_usd("12.50"), Ok(12_500_000_000));
        assert_eq!(parse_usd("0.000000001"), Ok(1));
        assert_eq!(
            parse_usd("0.0000000001"),
            Err(MoneyError::TooPrecise("0.0000000001".into()))
        );
        assert_eq!(parse_usd("-1"), Err(MoneyError::Negative("-1".into())));
        assert!(parse_usd("1e400").is_err());
        assert!(parse_usd("abc").is_err() && parse_usd("").is_err() && parse_usd(".").is_err());
        // LiteLLM's per-token prices, scaled to nano-USD per million tokens (10^9 × 10^6).
        assert_eq!(parse_scaled("1.5e-07", 15), Ok(150_000_000));
        assert_eq!(parse_scaled("2.5e-06", 15), Ok(2_500_000_000));
        assert_eq!(parse_scaled("7.5E-8", 15), Ok(75_000_000));
        assert_eq!(parse_scaled("0", 15), Ok(0));
    }

    #[test]
    fn plain_amounts_take_digits_and_a_fraction_only() {
        assert_eq!(parse_plain_usd("12.50"), Ok(12_500_000_000));
        assert_eq!(parse_plain_usd("1000"), Ok(1_000 * NANOS_PER_USD));
        assert_eq!(parse_plain_usd("0.000000001"), Ok(1));
        // Each of these parses as a number somewhere, and none is what a top-up form shows.
        for text in [
            "1e3", "1E3", "1.5e2", "+5", "-5", " 5", "5 ", ".5", "5.", "", ".", "0x10", "5_000", "1,5",
        ] {
            assert_eq!(
                parse_plain_usd(text),
                Err(MoneyError::NotPlain(text.to_owned())),
                "{text:?}"
            );
        }
        assert_eq!(
            parse_plain_usd("0.0000000001"),
            Err(MoneyError::TooPrecise("0.0000000001".into()))
        );
        assert!(matches!(
            parse_plain_usd("99999999999999"),
            Err(MoneyError::OutOfRange(_))
        ));
    }

    #[test]
    fn costs_round_up_and_sum_exactly() {
        assert_eq!(token_cost(1_000_000, 150_000_000), 150_000_000);
        assert_eq!(token_cost(1, 150_000_000), 150);
        assert_eq!(token_cost(1, 75_000_000), 75);
        assert_eq!(token_cost(3, 100), 1, "a fraction of a nano-dollar rounds up");
        assert_eq!(token_cost(0, 100), 0);
    }

    #[test]
    fn formats() {
        assert_eq!(Usd(12_500_000_000).to_string(), "12.5");
        assert_eq!(Usd(150).to_string(), "0.00000015");
        assert_eq!(Usd(-3_000_000_000).to_string(), "-3");
    }
}
