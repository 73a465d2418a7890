//! Relative times for message lines: `now`, `5s ago`, `3m ago`, `2h ago`, then a date.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch by this machine's clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// How long before `now_ms` the time `at_ms` was: `now` under a second (and for times in the
/// future, which clock skew between machines produces), then seconds, minutes and hours, and
/// the UTC date (`2026-11-25`) from a day on.
pub fn relative(now_ms: u64, at_ms: u64) -> String {
    let secs = now_ms.saturating_sub(at_ms) / 1000;
    match secs {
        0 => "now".to_owned(),
        1..=59 => format!("{secs}s ago"),
        60..=3_599 => format!("{}m ago", secs / 60),
        3_600..=86_399 => format!("{}h ago", secs / 3_600),
        _ => date(at_ms),
    }
}

/// The UTC calendar date of `at_ms` as `YYYY-MM-DD`.
pub fn date(at_ms: u64) -> String {
    cellchat_client::time::utc_date(at_ms)
}

/// Local times of day and dates in one time zone (the system's, read once).
#[derive(Debug, Clone)]
pub struct LocalClock {
    tz: jiff::tz::TimeZone,
}

impl LocalClock {
    /// The system's time zone (`TZ`, else `/etc/localtime`; UTC when neither says).
    pub fn system() -> LocalClock {
        LocalClock {
            tz: jiff::tz::TimeZone::system(),
        }
    }

    /// A clock in `tz`.
    pub fn in_zone(tz: jiff::tz::TimeZone) -> LocalClock {
        LocalClock { tz }
    }

    fn zoned(&self, at_ms: u64) -> Option<jiff::Zoned> {
        let ms = i64::try_from(at_ms).ok()?;
        let at = jiff::Timestamp::from_millisecond(ms).ok()?;
        Some(at.to_zoned(self.tz.clone()))
    }

    /// `14:03`.
    pub fn time_of_day(&self, at_ms: u64) -> String {
        self.zoned(at_ms)
            .map_or_else(|| "--:--".to_owned(), |z| z.strftime("%H:%M").to_string())
    }

    /// `Fri 4 Dec 2026`.
    pub fn date(&self, at_ms: u64) -> String {
        self.zoned(at_ms).map_or_else(
            || "a date out of range".to_owned(),
            |z| z.strftime("%a %-d %b %Y").to_string(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_times_and_dates_follow_the_zone() {
        // 2025-11-27T00:00:00Z is still the 26th at UTC-5.
        let utc = LocalClock::in_zone(jiff::tz::TimeZone::UTC);
        let east = LocalClock::in_zone(jiff::tz::TimeZone::fixed(jiff::tz::offset(-5)));
        assert_eq!(utc.time_of_day(NOW), "00:00");
        assert_eq!(utc.date(NOW), "Thu 27 Nov 2025");
        assert_eq!(east.time_of_day(NOW + 90_000), "19:01");
        assert_eq!(east.date(NOW), "Wed 26 Nov 2025");
        assert_eq!(utc.time_of_day(u64::MAX), "--:--");
    }

    const NOW: u64 = 1_764_201_600_000; // 2025-11-27T00:00:00Z

    #[test]
    fn relative_times() {
        let cases = [
            (0, "now"),
            (999, "now"),
            (1_000, "1s ago"),
            (5_400, "5s ago"),
            (59_999, "59s ago"),
            (60_000, "1m ago"),
            (3 * 60_000 + 10, "3m ago"),
            (3_599_999, "59m ago"),
            (3_600_000, "1h ago"),
            (2 * 3_600_000 + 5, "2h ago"),
            (86_399_999, "23h ago"),
            (86_400_000, "2025-11-26"),
            (400 * 86_400_000, "2024-10-23"),
        ];
        for (ago, want) in cases {
            assert_eq!(relative(NOW, NOW - ago), want, "{ago} ms ago");
        }
    }

    #[test]
    fn future_times_are_now() {
        assert_eq!(relative(NOW, NOW + 10_000), "now");
    }

    #[test]
    fn dates() {
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(NOW), "2025-11-27");
        assert_eq!(date(951_782_400_000), "2000-02-29");
    }
}
