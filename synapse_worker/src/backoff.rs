//! The one capped exponential backoff every reconnect loop of the worker uses.
use std::time::Duration;

/// Pauses that double from 100 ms up to 5 s, back to the start after a success.
#[derive(Debug, Clone, Default)]
pub struct Backoff {
    last: Option<Duration>,
}

const FIRST: Duration = Duration::from_millis(100);
const LONGEST: Duration = Duration::from_secs(5);

impl Backoff {
    /// The pause before the next try: twice the previous one, capped.
    pub fn next_pause(&mut self) -> Duration {
        let pause = self.last.map_or(FIRST, |last| (last * 2).min(LONGEST));
        self.last = Some(pause);
        pause
    }

    /// Whether the last try failed (a pause is in progress).
    pub fn is_backing_off(&self) -> bool {
        self.last.is_some()
    }

    /// The thing answered: start from the shortest pause next time.
    pub fn reset(&mut self) {
        self.last = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_a_cap_and_reset() {
        let mut backoff = Backoff::default();
        let pauses: Vec<u64> = (0..8)
            .map(|_| backoff.next_pause().as_millis() as u64)
            .collect();
        assert_eq!(pauses, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert!(backoff.is_backing_off());
        backoff.reset();
        assert!(!backoff.is_backing_off());
        assert_eq!(backoff.next_pause(), Duration::from_millis(100));
    }
}
