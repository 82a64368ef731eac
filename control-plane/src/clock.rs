//! This server's clock, as stamped into proposed commands and compared with
//! the deadlines in the state (token expiry, rollout and restart deadlines,
//! autoscaler windows).
//!
//! The wall clock alone is not good enough: when it jumps (a mistaken
//! `date -s`, a VM resumed with a stale clock, an NTP step) a leader
//! would stamp the jump into the state for good and every deadline
//! measured from it would fire early. So the clock moves by the monotonic
//! time that passed, and follows the wall clock only by slewing toward it
//! at [`MAX_SLEW`] of the elapsed time, as `adjtime` and chrony slew
//! rather than step: a jump of an hour is absorbed over 100 hours, a
//! deadline fires at most 1 % early or late, and the clock never runs
//! backwards. A server whose wall clock was wrong when it started cannot
//! be caught this way; a follower's proposals are capped at the leader's
//! time (`consensus::core::cap_forwarded_time`).

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How much faster or slower than monotonic time the clock may run while
/// it catches up with a wall clock that jumped: 1 %.
pub const MAX_SLEW: f64 = 0.01;

/// A clock that advances by elapsed monotonic time, slewed toward the wall
/// clock by at most [`MAX_SLEW`]. Pure: the readings are given to it.
#[derive(Debug, Clone, Copy)]
pub struct SlewedClock {
    /// The time it gave last, in nanoseconds since the epoch.
    last_ns: i128,
}

impl SlewedClock {
    /// A clock that starts at the wall clock's `wall_ns`.
    pub fn starting_at(wall_ns: i128) -> Self {
        SlewedClock { last_ns: wall_ns }
    }

    /// The time after `elapsed` (monotonic) since the last reading, when
    /// the wall clock reads `wall_ns`: as close to the wall clock as the
    /// slew allows.
    pub fn advance(&mut self, elapsed: Duration, wall_ns: i128) -> i128 {
        let elapsed = elapsed.as_nanos() as i128;
        let slew = (elapsed as f64 * MAX_SLEW) as i128;
        let slowest = self.last_ns + elapsed - slew;
        let fastest = self.last_ns + elapsed + slew;
        self.last_ns = wall_ns.clamp(slowest, fastest);
        self.last_ns
    }
}

/// Milliseconds since the epoch on this server's clock (see the module
/// doc): monotonic, slewed toward the wall clock.
pub fn now_ms() -> u64 {
    static CLOCK: Mutex<Option<(SlewedClock, Instant)>> = Mutex::new(None);
    let mut clock = CLOCK.lock().unwrap_or_else(|e| e.into_inner());
    // Read under the lock, so that readings reach the clock in order.
    let wall = wall_ns();
    let at = Instant::now();
    let now_ns = match clock.as_mut() {
        Some((slewed, last_at)) => {
            let now = slewed.advance(at.saturating_duration_since(*last_at), wall);
            *last_at = at;
            now
        }
        None => {
            *clock = Some((SlewedClock::starting_at(wall), at));
            wall
        }
    };
    u64::try_from(now_ns / 1_000_000).unwrap_or(0)
}

/// The wall clock in nanoseconds since the epoch, shifted by the test
/// hook's offset.
fn wall_ns() -> i128 {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128);
    wall + i128::from(offset_ms()) * 1_000_000
}

/// Fault injection for tests, as libfaketime would do (it cannot reach a
/// static binary): `SKIFF_CLOCK_OFFSET_MS` (signed milliseconds) shifts
/// this server's wall clock from the start; `SKIFF_CLOCK_OFFSET_FILE`
/// names a file holding such a number, read again at most every 100 ms,
/// so that a test can make the clock jump while the server runs. Never set
/// either in production.
fn offset_ms() -> i64 {
    static FIXED: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    let fixed = *FIXED.get_or_init(|| {
        std::env::var("SKIFF_CLOCK_OFFSET_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    });
    fixed.saturating_add(file_offset_ms())
}

fn file_offset_ms() -> i64 {
    static FILE: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    static READ: Mutex<Option<(Instant, i64)>> = Mutex::new(None);
    let Some(path) =
        FILE.get_or_init(|| std::env::var_os("SKIFF_CLOCK_OFFSET_FILE").map(Into::into))
    else {
        return 0;
    };
    let mut read = READ.lock().unwrap_or_else(|e| e.into_inner());
    match *read {
        Some((at, offset)) if at.elapsed() < Duration::from_millis(100) => offset,
        _ => {
            let offset = std::fs::read_to_string(path)
                .ok()
                .and_then(|text| text.trim().parse().ok())
                .unwrap_or(0);
            *read = Some((Instant::now(), offset));
            offset
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: i128 = 1_000_000_000;
    const HOUR: i128 = 3_600 * SECOND;

    #[test]
    fn a_steady_wall_clock_is_followed_exactly() {
        let mut clock = SlewedClock::starting_at(1_000 * SECOND);
        for step in 1..=10 {
            let now = clock.advance(Duration::from_secs(1), (1_000 + step) * SECOND);
            assert_eq!(now, (1_000 + step) * SECOND);
        }
    }

    #[test]
    fn a_jump_ahead_is_absorbed_at_one_percent_so_deadlines_fire_at_most_one_percent_early() {
        let start = 1_000 * SECOND;
        let mut clock = SlewedClock::starting_at(start);
        // The wall clock jumps an hour ahead; ten minutes pass.
        let mut now = start;
        for minute in 1..=10 {
            now = clock.advance(Duration::from_secs(60), start + HOUR + minute * 60 * SECOND);
        }
        assert_eq!(now, start + 600 * SECOND + 6 * SECOND, "600 s plus 1 %");
    }

    #[test]
    fn a_jump_back_never_runs_the_clock_backwards() {
        let start = 1_000 * SECOND;
        let mut clock = SlewedClock::starting_at(start);
        let mut last = start;
        for step in 1..=100 {
            let now = clock.advance(Duration::from_millis(10), start - HOUR);
            assert!(now > last, "step {step}: {now} after {last}");
            last = now;
        }
        assert_eq!(last, start + 990_000_000, "1 s at 99 %");
    }

    #[test]
    fn small_drift_is_caught_up_within_the_slew() {
        let start = 1_000 * SECOND;
        let mut clock = SlewedClock::starting_at(start);
        // NTP moved the wall clock 5 ms ahead during one second.
        let now = clock.advance(Duration::from_secs(1), start + SECOND + 5_000_000);
        assert_eq!(now, start + SECOND + 5_000_000);
    }
}
