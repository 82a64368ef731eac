//! Compose's resource quantities: memory in byte units (`512m`, `1gb`) and
//! CPUs as a decimal (`0.5`), to the spec's megabytes and millicores.

/// Megabytes (MiB) in a Compose memory size, rounding up: `512m`, `1g`,
/// `1gb`, `300M`, `2048k`, `0.5g`, or bytes.
pub(crate) fn parse_memory_mb(text: &str) -> Result<u32, String> {
    let text = text.trim();
    let fix = "use a size like 512m, 1g or 268435456 (bytes)";
    let lower = text.to_ascii_lowercase();
    let split = lower
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(lower.len());
    let (number, unit) = lower.split_at(split);
    let multiplier: u128 = match unit.trim() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("\"{text}\" has an unknown unit; {fix}")),
    };
    let bytes = decimal_times(number, multiplier)
        .ok_or_else(|| format!("\"{text}\" is not a size; {fix}"))?;
    let mb = bytes.div_ceil(1 << 20);
    u32::try_from(mb).map_err(|_| format!("\"{text}\" is too large"))
}

/// Millicores in a CPU count: `0.5` → 500, `2` → 2000; finer than a
/// millicore rounds up.
pub(crate) fn parse_cpus(text: &str) -> Result<u32, String> {
    let text = text.trim();
    let millis = decimal_times(text, 1000)
        .ok_or_else(|| format!("\"{text}\" is not a CPU count; use a number like 0.5 or 2"))?;
    u32::try_from(millis).map_err(|_| format!("\"{text}\" CPUs is too many"))
}

/// `number × multiplier` for a decimal like `1.25`, rounded up; exact
/// integer arithmetic, no floats.
fn decimal_times(number: &str, multiplier: u128) -> Option<u128> {
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits_ok = |s: &str| s.chars().all(|c| c.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty()) || !digits_ok(whole) || !digits_ok(fraction) {
        return None;
    }
    let fraction = &fraction[..fraction.len().min(24)];
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let mut total = whole.checked_mul(multiplier)?;
    if !fraction.is_empty() {
        let numerator: u128 = fraction.parse().ok()?;
        let denominator = 10u128.checked_pow(u32::try_from(fraction.len()).ok()?)?;
        total = total.checked_add((numerator.checked_mul(multiplier)?).div_ceil(denominator))?;
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compose_memory_sizes_become_megabytes_rounding_up() {
        assert_eq!(parse_memory_mb("512m"), Ok(512));
        assert_eq!(parse_memory_mb("1g"), Ok(1024));
        assert_eq!(parse_memory_mb("1gb"), Ok(1024));
        assert_eq!(parse_memory_mb("300M"), Ok(300));
        assert_eq!(parse_memory_mb("2048k"), Ok(2));
        assert_eq!(parse_memory_mb("2049k"), Ok(3));
        assert_eq!(parse_memory_mb("268435456"), Ok(256));
        assert_eq!(parse_memory_mb("0.5g"), Ok(512));
        assert!(parse_memory_mb("12x").is_err());
        assert!(parse_memory_mb("m").is_err());
        assert!(parse_memory_mb("99999t").unwrap_err().contains("too large"));
    }

    #[test]
    fn cpu_counts_become_millicores() {
        assert_eq!(parse_cpus("0.5"), Ok(500));
        assert_eq!(parse_cpus("2"), Ok(2000));
        assert_eq!(parse_cpus(".25"), Ok(250));
        assert_eq!(parse_cpus("0.0001"), Ok(1));
        assert!(parse_cpus("half").is_err());
        assert!(parse_cpus("-1").is_err());
    }
}
