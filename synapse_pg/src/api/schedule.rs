//! The times of schedules: cron expressions read in an IANA time zone
//! (`synapse.schedule`, and the forwarder's timers moving a schedule on).
use croner::parser::{CronParser, Seconds, Year};
use jiff::tz::TimeZone;
use jiff::Timestamp;
use pgrx::prelude::*;

use crate::error::{Error, Result};

/// Seconds from the Unix epoch to Postgres's (2000-01-01 UTC).
const POSTGRES_EPOCH_SECONDS: i64 = 946_684_800;

/// The first time of `cron` (5 fields, or 6 with seconds first) in
/// `time_zone` strictly after `after`. A bad expression or time zone is an
/// error naming it.
pub fn next_run(cron: &str, time_zone: &str, after: Timestamp) -> Result<Timestamp> {
    let zone = TimeZone::get(time_zone).map_err(|_| {
        Error::InvalidParameter(format!(
            "time zone \"{time_zone}\" is not a time zone name like 'UTC' or 'Europe/Paris'"
        ))
    })?;
    let schedule = CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
        .parse(cron)
        .map_err(|error| {
            Error::InvalidParameter(format!(
                "cron \"{cron}\" is not valid ({error}): use 5 fields (minute hour day month weekday), or 6 with seconds first"
            ))
        })?;
    let next = schedule
        .find_next_occurrence(&after.to_zoned(zone), false)
        .map_err(|error| {
            Error::InvalidParameter(format!("cron \"{cron}\" has no next time ({error})"))
        })?;
    Ok(next.timestamp())
}

/// `next_run` for SQL.
#[pg_extern(name = "_cron_next", stable, strict, parallel_safe)]
fn cron_next(
    cron: &str,
    time_zone: &str,
    after: TimestampWithTimeZone,
) -> std::result::Result<TimestampWithTimeZone, pgrx::pg_sys::panic::ErrorReport> {
    let micros = i64::from(after);
    let after = Timestamp::from_microsecond(
        micros.saturating_add(POSTGRES_EPOCH_SECONDS.saturating_mul(1_000_000)),
    )
    .map_err(|error| Error::InvalidParameter(format!("time out of range: {error}")))?;
    let next = next_run(cron, time_zone, after)?;
    let micros = next.as_microsecond() - POSTGRES_EPOCH_SECONDS * 1_000_000;
    Ok(TimestampWithTimeZone::try_from(micros)
        .map_err(|error| Error::InvalidParameter(format!("time out of range: {error:?}")))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    #[test]
    fn five_fields_are_minutes_and_six_start_with_seconds() {
        let after = at("2026-11-30T08:00:01Z");
        assert_eq!(
            next_run("*/5 * * * *", "UTC", after).unwrap(),
            at("2026-11-30T08:05:00Z")
        );
        assert_eq!(
            next_run("*/2 * * * * *", "UTC", after).unwrap(),
            at("2026-11-30T08:00:02Z")
        );
    }

    #[test]
    fn the_next_time_is_strictly_after() {
        let on_time = at("2026-11-30T08:00:02Z");
        assert_eq!(
            next_run("*/2 * * * * *", "UTC", on_time).unwrap(),
            at("2026-11-30T08:00:04Z")
        );
    }

    #[test]
    fn cron_is_read_in_its_time_zone() {
        // 09:00 in Paris is 08:00 UTC in winter; Monday 2026-11-30.
        assert_eq!(
            next_run("0 9 * * 1-5", "Europe/Paris", at("2026-11-30T07:00:00Z")).unwrap(),
            at("2026-11-30T08:00:00Z")
        );
        // Saturday → Monday.
        assert_eq!(
            next_run("0 9 * * 1-5", "Europe/Paris", at("2026-12-05T07:00:00Z")).unwrap(),
            at("2026-12-07T08:00:00Z")
        );
    }

    #[test]
    fn bad_cron_and_time_zones_are_named() {
        let after = at("2026-11-30T08:00:00Z");
        for cron in ["61 * * * *", "not a cron", "* * * *", "* * * * * * *"] {
            let error = next_run(cron, "UTC", after).unwrap_err().to_string();
            assert!(error.contains(cron), "{error}");
        }
        let error = next_run("* * * * *", "Mars/Olympus", after)
            .unwrap_err()
            .to_string();
        assert!(error.contains("Mars/Olympus"), "{error}");
    }
}
