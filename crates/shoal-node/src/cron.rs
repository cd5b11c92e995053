//! Cron schedules: when a trigger's ticks fall.
//!
//! An expression has the standard five fields — minute, hour, day of the
//! month, month, day of the week — or six, with seconds first
//! (`*/5 * * * * *`: every five seconds). Each field is `*`, a value, a range `a-b`, a
//! step `*/n`, `a-b/n` or `a/n`, or a list of those (`1,15,30-40/5`);
//! months and weekdays may be named (`JAN`, `MON`; Sunday is 0 or 7). As in
//! classic cron, when both the day of the month and the day of the week are
//! set (neither starts with `*`), a day matching either is a match;
//! otherwise a day must match both. `@yearly` (`@annually`),
//! `@monthly`, `@weekly`, `@daily` (`@midnight`) and `@hourly` are short for
//! their five fields.
//!
//! Times are read in the schedule's time zone (UTC unless named): a local
//! time that a daylight-saving change skips does not occur (its tick is
//! skipped); in the hour a change repeats, a schedule with set hours ticks
//! once (`30 2 * * *` runs once that night) and one whose hour field is `*`
//! keeps ticking by the clock (`*/5 * * * *` never pauses for an hour).

use jiff::civil::{Date, DateTime, Time};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};

/// A parsed schedule.
#[derive(Clone, Debug)]
pub struct Schedule {
    seconds: u64,
    minutes: u64,
    hours: u64,
    /// Bits 1..=31.
    days: u64,
    /// Bits 1..=12.
    months: u64,
    /// Bits 0..=6, Sunday 0.
    weekdays: u64,
    /// Whether the hour field was set (not starting with `*`).
    hours_restricted: bool,
    /// Whether the day-of-month and day-of-week fields were set (not starting with `*`).
    days_restricted: bool,
    weekdays_restricted: bool,
    zone: TimeZone,
}

const MONTHS: [&str; 12] = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"];
const WEEKDAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

/// How far ahead a next tick is looked for (a schedule like `0 0 30 2 *`
/// never ticks).
const HORIZON_YEARS: i16 = 8;

fn bit(n: u32) -> u64 {
    1u64 << n
}

/// One field: the set of values it allows (as bits), and whether it was `*`.
fn parse_field(text: &str, min: u32, max: u32, names: &[&str], name_base: u32) -> Result<(u64, bool), String> {
    let value = |part: &str| -> Result<u32, String> {
        if let Ok(n) = part.parse::<u32>() {
            return Ok(n);
        }
        let upper = part.to_ascii_uppercase();
        names
            .iter()
            .position(|n| *n == upper)
            .map(|i| i as u32 + name_base)
            .ok_or_else(|| format!("{part:?} is not a number{}", if names.is_empty() { "" } else { " or a name" }))
    };
    let mut set = 0u64;
    for item in text.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => {
                let step: u32 = step.parse().map_err(|_| format!("step {step:?} is not a number"))?;
                if step == 0 || step > max {
                    return Err(format!("a step of {step} (1 to {max})"));
                }
                (range, step)
            }
            None => (item, 1),
        };
        let (low, high) = if range == "*" {
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            (value(a)?, value(b)?)
        } else {
            let a = value(range)?;
            // `a/n` runs from a to the end of the field.
            (a, if item.contains('/') { max } else { a })
        };
        if low < min || high > max || low > high {
            return Err(format!("{item:?} is outside {min}-{max}"));
        }
        let mut n = low;
        while n <= high {
            set |= bit(n);
            n += step;
        }
    }
    // `*/n` leaves the field unrestricted too (for the day fields' OR).
    Ok((set, text.starts_with('*')))
}

impl Schedule {
    /// Parse `expression` in `zone` (an IANA name such as `Europe/Berlin`;
    /// UTC when None).
    pub fn parse(expression: &str, zone: Option<&str>) -> Result<Self, String> {
        let expanded = match expression.trim() {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            other if other.starts_with('@') => return Err(format!("unknown schedule {other:?}")),
            other => other,
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        let (seconds, rest) = match fields.len() {
            5 => ("0", &fields[..]),
            6 => (fields[0], &fields[1..]),
            n => return Err(format!("a schedule has 5 fields (or 6, seconds first), not {n}")),
        };
        let named = |what: &str, r: Result<(u64, bool), String>| r.map_err(|e| format!("{what}: {e}"));
        let (seconds, _) = named("seconds", parse_field(seconds, 0, 59, &[], 0))?;
        let (minutes, _) = named("minute", parse_field(rest[0], 0, 59, &[], 0))?;
        let (hours, hours_any) = named("hour", parse_field(rest[1], 0, 23, &[], 0))?;
        let (days, days_any) = named("day of month", parse_field(rest[2], 1, 31, &[], 0))?;
        let (months, _) = named("month", parse_field(rest[3], 1, 12, &MONTHS, 1))?;
        let (mut weekdays, weekdays_any) = named("day of week", parse_field(rest[4], 0, 7, &WEEKDAYS, 0))?;
        if weekdays & bit(7) != 0 {
            weekdays = (weekdays & !bit(7)) | bit(0);
        }
        let zone_name = zone.unwrap_or("UTC");
        let zone = TimeZone::get(zone_name).map_err(|_| format!("unknown time zone {zone_name:?}"))?;
        Ok(Self {
            seconds,
            minutes,
            hours,
            days,
            months,
            weekdays,
            hours_restricted: !hours_any,
            days_restricted: !days_any,
            weekdays_restricted: !weekdays_any,
            zone,
        })
    }

    fn day_matches(&self, date: Date) -> bool {
        let day = self.days & bit(date.day() as u32) != 0;
        let weekday = self.weekdays & bit(date.weekday().to_sunday_zero_offset() as u32) != 0;
        // Both set: either will do. Otherwise both must match (a field
        // that is `*` matches every day; one that is `*/n` only its days).
        if self.days_restricted && self.weekdays_restricted { day || weekday } else { day && weekday }
    }

    /// The first tick strictly after `after`, if one falls in the next
    /// eight years.
    ///
    /// The search runs on the wall clock of the offset in force, from one
    /// offset change to the next: a tick it finds past the next change is
    /// looked for again from that change, on the new offset. Wall times a
    /// change skips (spring) have no tick; those it repeats (autumn) tick
    /// again only for a schedule whose hour field is `*` (every minute keeps
    /// ticking through the repeated hour), once for one with set hours.
    pub fn next_after(&self, after: Timestamp) -> Option<Timestamp> {
        let horizon = after.to_zoned(self.zone.clone()).year().saturating_add(HORIZON_YEARS);
        let mut from = after;
        // Where the wall-clock search starts (after a change: the change's
        // own wall time, inclusive), and before which nothing ticks (after
        // the clocks went back, for set hours).
        let mut restart: Option<DateTime> = None;
        let mut not_before: Option<DateTime> = None;
        loop {
            let offset = self.zone.to_offset(from);
            let change = self.zone.following(from).map(|t| t.timestamp()).find(|t| *t > from);
            let mut start = match restart.take() {
                Some(start) => start,
                // The next whole second after `from`, on this offset's clock.
                None => {
                    offset.to_datetime(from).with().subsec_nanosecond(0).build().ok()?.checked_add(1.second()).ok()?
                }
            };
            if let Some(floor) = not_before.take() {
                start = start.max(floor);
            }
            let at = self.next_wall_time(start, horizon)?;
            let tick = offset.to_timestamp(at).ok()?;
            match change {
                Some(change) if tick >= change => {
                    // Past the change: look again from it, on its offset.
                    let (old, new) = (offset, self.zone.to_offset(change));
                    if new < old && self.hours_restricted {
                        // The clocks went back: wall times up to the old
                        // offset's reading of the change already ticked.
                        not_before = Some(old.to_datetime(change));
                    }
                    restart = Some(new.to_datetime(change));
                    from = change;
                }
                _ => return Some(tick),
            }
        }
    }

    /// The first wall time from `at` that the fields match, up to the end
    /// of year `horizon`.
    fn next_wall_time(&self, mut at: DateTime, horizon: i16) -> Option<DateTime> {
        while at.year() <= horizon {
            if self.months & bit(at.month() as u32) == 0 {
                // The first day of the next month.
                let first = at.date().first_of_month().checked_add(1.month()).ok()?;
                at = first.to_datetime(Time::midnight());
                continue;
            }
            if !self.day_matches(at.date()) {
                at = at.date().tomorrow().ok()?.to_datetime(Time::midnight());
                continue;
            }
            if self.hours & bit(at.hour() as u32) == 0 {
                at = next_unit(at, 1.hour(), |t| t.with().minute(0).second(0).build())?;
                continue;
            }
            if self.minutes & bit(at.minute() as u32) == 0 {
                at = next_unit(at, 1.minute(), |t| t.with().second(0).build())?;
                continue;
            }
            if self.seconds & bit(at.second() as u32) == 0 {
                at = at.checked_add(1.second()).ok()?;
                continue;
            }
            return Some(at);
        }
        None
    }
}

/// `at` truncated by `truncate` and moved on by `unit`.
fn next_unit(
    at: DateTime,
    unit: jiff::Span,
    truncate: impl Fn(DateTime) -> Result<DateTime, jiff::Error>,
) -> Option<DateTime> {
    truncate(at).ok()?.checked_add(unit).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn ticks(expression: &str, zone: Option<&str>, from: &str, n: usize) -> Vec<String> {
        let schedule = Schedule::parse(expression, zone).unwrap();
        let mut at = ts(from);
        (0..n)
            .map(|_| {
                at = schedule.next_after(at).unwrap();
                at.to_string()
            })
            .collect()
    }

    #[test]
    fn fields_steps_ranges_and_lists() {
        assert_eq!(
            ticks("*/15 * * * *", None, "2026-12-04T10:07:30Z", 3),
            ["2026-12-04T10:15:00Z", "2026-12-04T10:30:00Z", "2026-12-04T10:45:00Z"]
        );
        assert_eq!(
            ticks("0 9-17/4 * * MON-FRI", None, "2026-12-04T12:00:00Z", 3),
            ["2026-12-04T13:00:00Z", "2026-12-04T17:00:00Z", "2026-12-07T09:00:00Z"],
            "Friday afternoon, then Monday"
        );
        assert_eq!(
            ticks("30 2 1,15 * *", None, "2026-12-04T00:00:00Z", 2),
            ["2026-12-15T02:30:00Z", "2027-01-01T02:30:00Z"]
        );
        assert_eq!(ticks("0 0 29 feb *", None, "2026-03-01T00:00:00Z", 1), ["2028-02-29T00:00:00Z"]);
        assert_eq!(ticks("@hourly", None, "2026-12-04T10:59:59Z", 1), ["2026-12-04T11:00:00Z"]);
        assert_eq!(ticks("0 12 * * 7", None, "2026-12-04T00:00:00Z", 1), ["2026-12-06T12:00:00Z"], "7 is Sunday");
    }

    #[test]
    fn seconds_come_first_in_six_fields() {
        assert_eq!(
            ticks("* * * * * *", None, "2026-12-04T10:00:00.500Z", 3),
            ["2026-12-04T10:00:01Z", "2026-12-04T10:00:02Z", "2026-12-04T10:00:03Z"]
        );
        assert_eq!(
            ticks("*/20 * * * * *", None, "2026-12-04T10:00:00Z", 2),
            ["2026-12-04T10:00:20Z", "2026-12-04T10:00:40Z"]
        );
    }

    #[test]
    fn day_of_month_or_day_of_week_when_both_are_set() {
        // The 13th, or any Friday.
        assert_eq!(
            ticks("0 0 13 * FRI", None, "2026-12-01T00:00:00Z", 3),
            ["2026-12-04T00:00:00Z", "2026-12-11T00:00:00Z", "2026-12-13T00:00:00Z"]
        );
        // A `*/n` day field does not count as set: every other day that is a Monday.
        assert_eq!(
            ticks("0 0 */2 * MON", None, "2026-12-01T00:00:00Z", 2),
            ["2026-12-07T00:00:00Z", "2026-12-21T00:00:00Z"]
        );
    }

    #[test]
    fn time_zones_and_daylight_saving() {
        // 09:00 in Berlin is 08:00 UTC in winter, 07:00 in summer.
        assert_eq!(ticks("0 9 * * *", Some("Europe/Berlin"), "2026-12-04T12:00:00Z", 1), ["2026-12-05T08:00:00Z"]);
        assert_eq!(ticks("0 9 * * *", Some("Europe/Berlin"), "2026-07-04T12:00:00Z", 1), ["2026-07-05T07:00:00Z"]);
        // 02:30 does not exist on the day clocks go forward (29 March 2026):
        // that day has no tick.
        assert_eq!(
            ticks("30 2 * * *", Some("Europe/Berlin"), "2026-03-28T12:00:00Z", 2),
            ["2026-03-30T00:30:00Z", "2026-03-31T00:30:00Z"]
        );
        // 02:30 happens twice when they go back (25 October 2026): once.
        assert_eq!(
            ticks("30 2 * * *", Some("Europe/Berlin"), "2026-10-24T12:00:00Z", 2),
            ["2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"]
        );
        // Every 5 minutes through the repeated hour: by the clock, no pause.
        let five = ticks("*/5 * * * *", Some("Europe/Berlin"), "2026-10-25T00:50:00Z", 4);
        assert_eq!(
            five,
            ["2026-10-25T00:55:00Z", "2026-10-25T01:00:00Z", "2026-10-25T01:05:00Z", "2026-10-25T01:10:00Z"]
        );
        let schedule = Schedule::parse("* * * * *", Some("Europe/Berlin")).unwrap();
        let mut at = ts("2026-10-24T23:00:00Z");
        let mut seen = Vec::new();
        while at < ts("2026-10-25T03:00:00Z") {
            at = schedule.next_after(at).unwrap();
            seen.push(at);
        }
        assert_eq!(seen.len(), 240, "every minute of four hours, none twice, none missed");
        assert!(seen.windows(2).all(|w| w[1].as_second() - w[0].as_second() == 60));
        // Spring: minutes go on by the clock through the change too.
        let spring = ticks("*/30 * * * *", Some("Europe/Berlin"), "2026-03-29T00:40:00Z", 3);
        assert_eq!(spring, ["2026-03-29T01:00:00Z", "2026-03-29T01:30:00Z", "2026-03-29T02:00:00Z"]);
    }

    #[test]
    fn bad_schedules_are_named() {
        for (expression, zone, said) in [
            ("* * * *", None, "5 fields"),
            ("60 * * * *", None, "minute"),
            ("* 24 * * *", None, "hour"),
            ("* * 0 * *", None, "day of month"),
            ("* * * 13 *", None, "month"),
            ("* * * * 8", None, "day of week"),
            ("*/0 * * * *", None, "step"),
            ("5/4294967291 * * * *", None, "step"),
            ("* * * * BLU", None, "day of week"),
            ("5-1 * * * *", None, "outside"),
            ("@fortnightly", None, "unknown schedule"),
            ("* * * * *", Some("Mars/Olympus"), "time zone"),
        ] {
            let error = Schedule::parse(expression, zone).unwrap_err();
            assert!(error.contains(said), "{expression}: {error}");
        }
        // A date that never comes: no next tick, and no endless search.
        let never = Schedule::parse("0 0 30 2 *", None).unwrap();
        assert_eq!(never.next_after(ts("2026-01-01T00:00:00Z")), None);
    }
}
