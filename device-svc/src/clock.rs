//! Time as the service exchanges it: ms since the Unix epoch (the bus, the API), and the bound
//! on times callers may give. A leaf module: every other one may use it, it uses none of them.

/// Wall clock in ms since the Unix epoch, as the bus carries it.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0))
}

/// The latest time the API takes, ms since the Unix epoch: 9999-12-31T23:59:59.999Z, within
/// what PostgreSQL's `timestamptz` and every client's clock arithmetic hold.
pub const MAX_TIME_MS: u64 = 253_402_300_799_999;

/// A caller-given time as a `SystemTime`, refused (naming `field`) past [`MAX_TIME_MS`], so
/// `u64::MAX` can never wrap into 1969 or fail in PostgreSQL as a false outage.
///
/// # Errors
/// `Invalid` naming `field`.
pub fn checked_time(field: &'static str, ms: u64) -> Result<std::time::SystemTime, crate::error::StoreError> {
    if ms > MAX_TIME_MS {
        return Err(crate::error::StoreError::invalid(field, format!("{ms} is past {MAX_TIME_MS} (year 9999)")));
    }
    Ok(time_of(ms))
}

/// A `SystemTime` from ms since the Unix epoch.
pub fn time_of(ms: u64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)
}

/// Ms since the Unix epoch of a `SystemTime` (0 before the epoch).
pub fn ms_of(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0))
}

/// The civil date `(year, month, day)` of a day counted from 1970-01-01 (proleptic Gregorian
/// calendar, Howard Hinnant's `civil_from_days`).
pub fn civil_date(day: u64) -> (i64, i64, i64) {
    let z = i64::try_from(day).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}
