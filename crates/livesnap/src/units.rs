//! Parsing and printing of sizes, rates, durations and wall-clock instants.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Parses a duration: a number with an optional unit `ms`, `s`, `m`, `h`
/// (default seconds), e.g. `10m`, `2s`, `1.5s`, `500ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = number_and_unit(s, "duration", "30s, 10m, 1h, 500ms")?;
    let secs = match unit {
        "" | "s" | "sec" => n,
        "ms" => n / 1000.0,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "invalid duration unit in '{s}' (use ms, s, m or h)"
            ))
        }
    };
    if !secs.is_finite() || secs <= 0.0 || secs > 1e9 {
        return Err(format!("duration '{s}' out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses a byte count: a number with an optional binary suffix `K`, `M`,
/// `G`, `T` (also `KiB`, `k`, ...), as `qemu-img` reads sizes, e.g. `64M`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (n, unit) = number_and_unit(s, "size", "512M, 10G, 4096")?;
    let unit = unit.trim_end_matches("/s");
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("invalid size unit in '{s}' (use K, M, G or T)")),
    };
    let v = n * mult as f64;
    if !v.is_finite() || v < 0.0 || v >= u64::MAX as f64 || v.fract() != 0.0 {
        return Err(format!(
            "size '{s}' is not a whole number of bytes in range"
        ));
    }
    Ok(v as u64)
}

/// Splits `s` into its leading decimal number and the unit after it
/// (trimmed); the error names `what` and gives `examples`.
fn number_and_unit<'a>(s: &'a str, what: &str, examples: &str) -> Result<(f64, &'a str), String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid {what} '{s}' (examples: {examples})"))?;
    Ok((n, unit.trim()))
}

/// `1.5 GiB`-style text.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// `1m05s`, `3.2s` or `120ms`.
pub fn duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("{}ms", d.as_millis())
    } else if s < 60.0 {
        format!("{s:.1}s")
    } else {
        let m = d.as_secs() / 60;
        format!("{}m{:02}s", m, d.as_secs() % 60)
    }
}

/// RFC 3339 in UTC with microseconds, e.g. `2024-05-01T12:00:00.123456Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86400, secs % 86400);
    let (y, m, dd) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{dd:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// `HH:MM:SS.mmm` in UTC, for event streams.
pub fn clock(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let rem = d.as_secs() % 86400;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian calendar).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// CLOCK_MONOTONIC in nanoseconds: the clock Rust's `Instant` reads on
/// Linux, so a test in another process can map the report's window onto its
/// own `Instant`s exactly.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A wall-clock instant together with its monotonic reading.
#[derive(Clone, Copy, Debug)]
pub struct Stamp {
    /// Wall clock.
    pub wall: SystemTime,
    /// CLOCK_MONOTONIC, nanoseconds.
    pub mono_ns: u64,
    /// The same instant for in-process arithmetic.
    pub instant: std::time::Instant,
}

impl Stamp {
    /// Now.
    pub fn now() -> Stamp {
        Stamp {
            instant: std::time::Instant::now(),
            mono_ns: monotonic_ns(),
            wall: SystemTime::now(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("5 days").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("10MiB/s").unwrap(), 10 << 20);
        assert_eq!(parse_size("64k").unwrap(), 64 << 10);
        assert!(parse_size("1.3").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("12Q").is_err());
    }

    #[test]
    fn printing() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 29), "1.5 GiB");
        assert_eq!(duration(Duration::from_millis(120)), "120ms");
        assert_eq!(duration(Duration::from_secs(65)), "1m05s");
        let t = UNIX_EPOCH + Duration::from_micros(1_714_564_800_123_456);
        assert_eq!(rfc3339(t), "2024-05-01T12:00:00.123456Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000000Z"
        );
        assert_eq!(clock(t), "12:00:00.123");
    }
}
