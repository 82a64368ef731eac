//! Durations as Go writes them (`250ms`, `5s`, `1m30s`, `2h`), as Compose
//! and the CLI flags take them, to and from the spec's milliseconds.

/// Milliseconds in a duration like `1m30s` or `1.5s`. A bare number is
/// refused: without a unit `10` could be seconds or milliseconds. Parts
/// below a millisecond round up, so a non-zero duration stays non-zero.
pub(crate) fn parse_ms(text: &str) -> Result<u32, String> {
    let text = text.trim();
    let fix = "use a number with a unit (ms, s, m, h), e.g. 10s or 1m30s";
    if text.is_empty() {
        return Err(format!("the duration is empty; {fix}"));
    }
    if text.parse::<f64>().is_ok() {
        return Err(format!("\"{text}\" has no unit; {fix}"));
    }
    // Nanoseconds, to keep fractions of a millisecond exact until the end.
    let mut total_ns: u128 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_len);
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let unit_ns: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(format!("\"{text}\" ends without a unit; {fix}")),
            other => return Err(format!("\"{text}\" has an unknown unit \"{other}\"; {fix}")),
        };
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
            return Err(format!("\"{text}\" is not a duration; {fix}"));
        }
        let too_long = || format!("\"{text}\" is too long; durations go up to 49 days");
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| too_long())?
        };
        let mut part = whole.checked_mul(unit_ns).ok_or_else(too_long)?;
        let mut scale = unit_ns;
        for digit in fraction.chars().take(18) {
            scale /= 10;
            part += u128::from(digit.to_digit(10).unwrap_or(0)) * scale;
        }
        total_ns = total_ns.checked_add(part).ok_or_else(too_long)?;
        rest = after;
    }
    let ms = total_ns.div_ceil(1_000_000);
    u32::try_from(ms).map_err(|_| format!("\"{text}\" is too long; durations go up to 49 days"))
}

/// `90500` → `1m30s500ms`; `0` → `0s`. [`parse_ms`] reads it back exactly.
pub(crate) fn format_ms(ms: u32) -> String {
    if ms == 0 {
        return "0s".to_string();
    }
    let mut out = String::new();
    let parts = [
        (ms / 3_600_000, "h"),
        (ms / 60_000 % 60, "m"),
        (ms / 1000 % 60, "s"),
        (ms % 1000, "ms"),
    ];
    for (value, unit) in parts {
        if value > 0 {
            out.push_str(&format!("{value}{unit}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_become_milliseconds() {
        assert_eq!(parse_ms("250ms"), Ok(250));
        assert_eq!(parse_ms("5s"), Ok(5000));
        assert_eq!(parse_ms("1m30s"), Ok(90_000));
        assert_eq!(parse_ms("2h"), Ok(7_200_000));
        assert_eq!(parse_ms("1.5s"), Ok(1500));
        assert_eq!(parse_ms("0s"), Ok(0));
        assert_eq!(parse_ms("1500us"), Ok(2));
    }

    #[test]
    fn bare_numbers_unknown_units_and_overflow_are_refused() {
        assert!(parse_ms("10").unwrap_err().contains("no unit"));
        assert!(parse_ms("10d").unwrap_err().contains("unknown unit"));
        assert!(parse_ms("5s10").unwrap_err().contains("without a unit"));
        assert!(parse_ms("2000h").unwrap_err().contains("too long"));
        assert!(parse_ms("").is_err());
        assert!(parse_ms("1..5s").is_err());
    }

    #[test]
    fn formatted_durations_read_back_the_same() {
        for ms in [
            0,
            1,
            999,
            1000,
            5000,
            90_500,
            3_600_000,
            7_261_001,
            u32::MAX,
        ] {
            assert_eq!(parse_ms(&format_ms(ms)), Ok(ms), "{}", format_ms(ms));
        }
        assert_eq!(format_ms(90_500), "1m30s500ms");
    }
}
