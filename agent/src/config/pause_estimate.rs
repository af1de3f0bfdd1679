//! Will a domain's checkpoint pause fit its interval on this host?
//!
//! The compare tracker reads all of guest RAM (and its shadow) in every pause, so its pause
//! grows with RAM: a 16 GiB guest cannot be protected at 200 ms with it. Rather than find
//! that out in production, `remusctl config check --files-exist` and remusd at startup
//! estimate each domain's pause from this host's measured scan floor
//! ([`remus_tracker::compare::read_floor`]) and warn when it would take more than
//! [`MAX_SHARE`] of the interval. Soft-dirty's pause does not grow with RAM: a domain that
//! will use it (the kernel supports it and the policy allows it) is not warned about.

use std::time::Duration;

/// The pause is modelled as `FIXED + PAUSE_OVER_FLOOR × floor`: stopping the vCPUs, the
/// disk barrier, saving device state and `cont` cost about the same whatever the RAM, the
/// scan grows with it. Fitted on this project's measurements on a 2-core TCG host: pause
/// p50 25.6 ms at 256 MiB (floor 14.2 ms on all cores, `remus-drill --local --memory-mib
/// 256`) and 83.8 ms at 1 GiB (issue 12's figure; floor ×4).
pub const PAUSE_OVER_FLOOR: f64 = 1.4;

/// The part of the pause that does not grow with RAM (see [`PAUSE_OVER_FLOOR`]).
pub const FIXED: Duration = Duration::from_millis(6);

/// Warn when the estimated pause exceeds this share of the checkpoint interval: the guest
/// would spend more time stopped than running.
pub const MAX_SHARE: f64 = 0.5;

/// RAM read to measure the floor; the estimate scales it linearly (a read at memory
/// bandwidth is linear in size once past the caches).
pub const SAMPLE_BYTES: u64 = 64 << 20;

/// The estimated compare pause for `memory_mib` of RAM, given the floor `sample` measured
/// over [`SAMPLE_BYTES`].
pub fn estimate(memory_mib: u64, sample: Duration) -> Duration {
    let scale = (memory_mib << 20) as f64 / SAMPLE_BYTES as f64;
    FIXED + sample.mul_f64(scale * PAUSE_OVER_FLOOR)
}

/// The warning for a domain of `memory_mib` at `interval`, if its estimated pause is too
/// long; `None` when it fits.
pub fn verdict(
    domain: &str,
    memory_mib: u64,
    interval: Duration,
    sample: Duration,
) -> Option<String> {
    let pause = estimate(memory_mib, sample);
    let share = pause.as_secs_f64() / interval.as_secs_f64().max(1e-9);
    (share > MAX_SHARE).then(|| {
        format!(
            "domain {domain}: with the compare tracker its pause would be about {} ms \
             ({memory_mib} MiB at this host's scan rate of {:.1} GB/s), \
             {:.0}% of its {} ms interval: the guest would be stopped more than it runs. \
             Use a kernel with soft-dirty (CONFIG_MEM_SOFT_DIRTY, tracker auto or soft-dirty), \
             or a longer checkpoint_interval_ms",
            pause.as_millis(),
            SAMPLE_BYTES as f64 / sample.as_secs_f64().max(1e-9) / 1e9,
            share * 100.0,
            interval.as_millis()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pause_estimate_scales_with_ram_and_warns_past_half_the_interval() {
        let ms = Duration::from_millis;
        // A host that reads 64 MiB in 4 ms (16.8 GB/s).
        let sample = ms(4);
        // (RAM MiB, interval ms, warned): pause = 6 ms + RAM/64 MiB × 4 ms × 1.4
        let rows = [
            (256, 200, false),    // 28.4 ms: 14%
            (1024, 200, false),   // 95.6 ms: 48%
            (1536, 200, true),    // 140.4 ms: 70%
            (4096, 200, true),    // 364 ms
            (16384, 200, true),   // 1440 ms
            (16384, 5000, false), // 29%
            (1024, 100, true),    // 96%
        ];
        for (mib, interval, warned) in rows {
            let v = verdict("web", mib, ms(interval), sample);
            assert_eq!(v.is_some(), warned, "{mib} MiB at {interval} ms: {v:?}");
        }
        assert_eq!(
            estimate(256, sample),
            FIXED + ms(4).mul_f64(4.0 * PAUSE_OVER_FLOOR)
        );
        let w = verdict("web", 16384, ms(200), sample).unwrap();
        assert!(
            w.starts_with("domain web: with the compare tracker its pause would be about 1439 ms"),
            "{w}"
        );
        assert!(
            w.contains("16.8 GB/s") && w.contains("720% of its 200 ms interval"),
            "{w}"
        );
    }
}
