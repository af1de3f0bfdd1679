//! The precopy policy of a live migration: after each pass over the guest's RAM, whether to
//! copy another pass, stop the VM and copy the rest, slow the guest down, or give up.
//!
//! This is Xen's precopy policy callback (`CONTINUE` / `STOP_AND_COPY` / `ABORT`) with
//! the two things Xen's default lacks: a downtime limit instead of a page count, and a
//! readable reason when the copy cannot converge. Every rule lives in [`decide`], a pure
//! function of one [`PassReport`] and the operator's [`PrecopyPolicy`], so every rule is
//! a row of the table test below; the migration's perform loop only measures and obeys.
//!
//! The rules, in the order they are applied, and why:
//! - **Nothing left to copy: stop and copy** (only the device state remains).
//! - **A link that carried nothing during the pass aborts**: the downtime cannot be
//!   estimated, and guessing could pause the VM for an unbounded time. The VM runs on at
//!   the source, which is always safe.
//! - **The estimated downtime is within the limit: stop and copy.** The estimate is the
//!   bytes still dirty divided by the link rate measured during the pass (the rate the
//!   stop-and-copy will see, with `--bandwidth` applied). Checked before the limits, so a
//!   copy that converged on its last allowed pass still finishes.
//! - **The pass or time limit is reached: abort**, never stop-and-copy over the downtime
//!   limit: the operator's limit is a promise to the guest's clients, and a migration that
//!   breaks it silently is worse than one that says why it stopped.
//! - **From the second pass on, a guest that dirties at least as fast as the link carries
//!   cannot converge**: abort (`on_no_progress = abort`, the default), or throttle the
//!   guest's vCPUs (`throttle`: first [`THROTTLE_INITIAL_PCT`], then
//!   [`THROTTLE_INCREMENT_PCT`] more per pass, QEMU's auto-converge steps) and abort once
//!   the throttle is at [`THROTTLE_MAX_PCT`] and the guest still outruns the link. The
//!   first pass copies all RAM, so its dirty rate includes whatever the guest did during
//!   the longest pass: it is not judged alone.
//! - **Otherwise, another pass.**
//!
//! Arithmetic is in `u128` (bytes × 1000 cannot overflow) and saturates into `u64`.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// CPU throttle applied the first time the guest outruns the link (percent of vCPU time
/// taken away), as QEMU's `cpu-throttle-initial`.
pub const THROTTLE_INITIAL_PCT: u8 = 20;
/// Added at each further pass the guest still outruns the link (`cpu-throttle-increment`).
pub const THROTTLE_INCREMENT_PCT: u8 = 10;
/// The most the throttle takes (`max-cpu-throttle`); beyond it the migration aborts.
pub const THROTTLE_MAX_PCT: u8 = 99;

/// What a guest that cannot converge gets (`on_no_progress`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnNoProgress {
    /// Stop the migration with the reason; the VM runs on at the source.
    #[default]
    Abort,
    /// Slow the guest's vCPUs down until it converges (or the throttle is at its maximum).
    Throttle,
}

impl OnNoProgress {
    /// The configuration and command-line spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            OnNoProgress::Abort => "abort",
            OnNoProgress::Throttle => "throttle",
        }
    }
}

/// How long the precopy may go on before it must have converged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    /// At most this many passes (the first, full one included).
    Passes(u32),
    /// At most this long from the start of the first pass.
    Timeout(Duration),
}

/// The operator's policy for one migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrecopyPolicy {
    /// The longest the VM may stay stopped for the last copy.
    pub max_downtime: Duration,
    /// When to give up converging.
    pub limit: Limit,
    /// What a guest that outruns the link gets.
    pub on_no_progress: OnNoProgress,
}

/// What the perform loop measured during the pass that just ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PassReport {
    /// Passes completed, this one included (1 after the first, full pass).
    pub pass: u32,
    /// Bytes dirty now: what a stop-and-copy would send (RAM; disk writes since the last
    /// pass count too).
    pub remaining_bytes: u64,
    /// Bytes per second the guest dirtied during the pass.
    pub dirty_rate: u64,
    /// Bytes per second the link carried during the pass (`--bandwidth` included).
    pub link_rate: u64,
    /// From the start of the first pass to now.
    pub elapsed: Duration,
    /// CPU throttle in force during the pass, percent (0 = none).
    pub throttle_pct: u8,
}

/// The policy's answer after a pass.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    /// Copy another pass.
    Continue,
    /// Stop the VM, copy what is dirty and the device state, and hand over.
    StopAndCopy {
        /// The downtime the estimate promises (ms).
        estimated_downtime_ms: u64,
    },
    /// Throttle the guest's vCPUs to `percent` and copy another pass.
    Throttle {
        /// The new throttle, percent of vCPU time taken away.
        percent: u8,
    },
    /// Give up: the VM runs on at the source.
    Abort(AbortReason),
}

/// Why a precopy gave up; its `Display` is the operator's message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum AbortReason {
    /// The link carried nothing during a pass.
    #[error("the link carried nothing during pass {pass}: the downtime cannot be estimated")]
    LinkStalled {
        /// The pass.
        pass: u32,
    },
    /// The guest dirties memory at least as fast as the link carries it.
    #[error(
        "guest dirties {}, link carries {}: the copy cannot converge",
        Rate(*dirty_rate),
        Rate(*link_rate)
    )]
    DirtiesFasterThanLink {
        /// Bytes per second dirtied.
        dirty_rate: u64,
        /// Bytes per second carried.
        link_rate: u64,
    },
    /// The same with the throttle at its maximum.
    #[error(
        "guest dirties {} even throttled at {throttle_pct} %, link carries {}",
        Rate(*dirty_rate),
        Rate(*link_rate)
    )]
    DirtiesFasterThrottled {
        /// Bytes per second dirtied.
        dirty_rate: u64,
        /// Bytes per second carried.
        link_rate: u64,
        /// The throttle in force.
        throttle_pct: u8,
    },
    /// The pass limit came before the downtime fell within the limit.
    #[error(
        "no convergence in {passes} passes: estimated downtime {estimated_downtime_ms} ms \
         over the {max_downtime_ms} ms limit (guest dirties {}, link carries {})",
        Rate(*dirty_rate),
        Rate(*link_rate)
    )]
    PassesExhausted {
        /// Passes made.
        passes: u32,
        /// The last estimate (ms).
        estimated_downtime_ms: u64,
        /// The limit (ms).
        max_downtime_ms: u64,
        /// Bytes per second dirtied during the last pass.
        dirty_rate: u64,
        /// Bytes per second carried during the last pass.
        link_rate: u64,
    },
    /// The time limit came first.
    #[error(
        "no convergence in {elapsed_s} s: estimated downtime {estimated_downtime_ms} ms \
         over the {max_downtime_ms} ms limit (guest dirties {}, link carries {})",
        Rate(*dirty_rate),
        Rate(*link_rate)
    )]
    TimedOut {
        /// Seconds since the first pass started.
        elapsed_s: u64,
        /// The last estimate (ms).
        estimated_downtime_ms: u64,
        /// The limit (ms).
        max_downtime_ms: u64,
        /// Bytes per second dirtied during the last pass.
        dirty_rate: u64,
        /// Bytes per second carried during the last pass.
        link_rate: u64,
    },
}

/// A byte rate as an operator reads it: MiB/s (one decimal below 10), KiB/s below 1 MiB/s.
struct Rate(u64);

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MIB: u64 = 1 << 20;
        let r = self.0;
        if r >= 10 * MIB {
            write!(f, "{} MiB/s", (r + MIB / 2) / MIB)
        } else if r >= MIB {
            write!(f, "{:.1} MiB/s", r as f64 / MIB as f64)
        } else {
            write!(f, "{} KiB/s", (r + 512) / 1024)
        }
    }
}

/// Milliseconds to send `bytes` at `rate` bytes per second, rounded up; `None` when the
/// rate is zero. Cannot overflow (u128), saturates at `u64::MAX`.
pub fn estimated_downtime_ms(bytes: u64, rate: u64) -> Option<u64> {
    if rate == 0 {
        return None;
    }
    let ms = (u128::from(bytes) * 1000).div_ceil(u128::from(rate));
    Some(u64::try_from(ms).unwrap_or(u64::MAX))
}

/// The policy: what to do after the pass `r` described (see the module's rules).
pub fn decide(policy: &PrecopyPolicy, r: &PassReport) -> Decision {
    if r.remaining_bytes == 0 {
        return Decision::StopAndCopy {
            estimated_downtime_ms: 0,
        };
    }
    let Some(estimate) = estimated_downtime_ms(r.remaining_bytes, r.link_rate) else {
        return Decision::Abort(AbortReason::LinkStalled { pass: r.pass });
    };
    let max_ms = u64::try_from(policy.max_downtime.as_millis()).unwrap_or(u64::MAX);
    if estimate <= max_ms {
        return Decision::StopAndCopy {
            estimated_downtime_ms: estimate,
        };
    }
    match policy.limit {
        Limit::Passes(n) if r.pass >= n => {
            return Decision::Abort(AbortReason::PassesExhausted {
                passes: r.pass,
                estimated_downtime_ms: estimate,
                max_downtime_ms: max_ms,
                dirty_rate: r.dirty_rate,
                link_rate: r.link_rate,
            })
        }
        Limit::Timeout(t) if r.elapsed >= t => {
            return Decision::Abort(AbortReason::TimedOut {
                elapsed_s: r.elapsed.as_secs(),
                estimated_downtime_ms: estimate,
                max_downtime_ms: max_ms,
                dirty_rate: r.dirty_rate,
                link_rate: r.link_rate,
            })
        }
        _ => {}
    }
    if r.pass >= 2 && r.dirty_rate >= r.link_rate {
        return match policy.on_no_progress {
            OnNoProgress::Abort => Decision::Abort(AbortReason::DirtiesFasterThanLink {
                dirty_rate: r.dirty_rate,
                link_rate: r.link_rate,
            }),
            OnNoProgress::Throttle if r.throttle_pct >= THROTTLE_MAX_PCT => {
                Decision::Abort(AbortReason::DirtiesFasterThrottled {
                    dirty_rate: r.dirty_rate,
                    link_rate: r.link_rate,
                    throttle_pct: r.throttle_pct,
                })
            }
            OnNoProgress::Throttle => Decision::Throttle {
                percent: next_throttle(r.throttle_pct),
            },
        };
    }
    Decision::Continue
}

/// The throttle after `current`: the initial step from none, then one increment, capped.
fn next_throttle(current: u8) -> u8 {
    if current == 0 {
        THROTTLE_INITIAL_PCT
    } else {
        current
            .saturating_add(THROTTLE_INCREMENT_PCT)
            .min(THROTTLE_MAX_PCT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn policy(limit: Limit, on: OnNoProgress) -> PrecopyPolicy {
        PrecopyPolicy {
            max_downtime: Duration::from_millis(300),
            limit,
            on_no_progress: on,
        }
    }

    /// Pass 3 of a guest that dirties 10 MiB/s over a 100 MiB/s link, 64 MiB still dirty
    /// (640 ms at that rate: over the 300 ms limit), 5 s in, unthrottled.
    fn base() -> PassReport {
        PassReport {
            pass: 3,
            remaining_bytes: 64 * MIB,
            dirty_rate: 10 * MIB,
            link_rate: 100 * MIB,
            elapsed: Duration::from_secs(5),
            throttle_pct: 0,
        }
    }

    fn stop(ms: u64) -> Decision {
        Decision::StopAndCopy {
            estimated_downtime_ms: ms,
        }
    }

    #[test]
    fn rule_table() {
        use OnNoProgress::{Abort, Throttle};
        let passes = Limit::Passes(30);
        let timeout = Limit::Timeout(Duration::from_secs(60));
        type Tweak = fn(&mut PassReport);
        // (case, limit, on no progress, tweak of `base`, decision)
        #[rustfmt::skip]
        let rows: Vec<(&str, Limit, OnNoProgress, Tweak, Decision)> = vec![
            // --- nothing left ---
            ("nothing dirty: stop and copy at once", passes, Abort,
             |r| r.remaining_bytes = 0, stop(0)),
            ("nothing dirty, link stalled: still stop (nothing to send)", passes, Abort,
             |r| { r.remaining_bytes = 0; r.link_rate = 0 }, stop(0)),
            // --- the link ---
            ("link carried nothing: abort, the downtime is unknowable", passes, Abort,
             |r| r.link_rate = 0, Decision::Abort(AbortReason::LinkStalled { pass: 3 })),
            ("link carried nothing, throttle policy: abort as well", passes, Throttle,
             |r| r.link_rate = 0, Decision::Abort(AbortReason::LinkStalled { pass: 3 })),
            // --- converged ---
            ("estimate under the limit: stop and copy", passes, Abort,
             |r| r.remaining_bytes = 20 * MIB, stop(200)),
            ("estimate exactly at the limit: stop and copy", passes, Abort,
             |r| r.remaining_bytes = 30 * MIB, stop(300)),
            ("one byte over the limit: another pass", passes, Abort,
             |r| r.remaining_bytes = 30 * MIB + 1, Decision::Continue),
            ("first pass already small enough: stop and copy", passes, Abort,
             |r| { r.pass = 1; r.remaining_bytes = MIB }, stop(10)),
            ("converged on the last allowed pass: stop, not abort", passes, Abort,
             |r| { r.pass = 30; r.remaining_bytes = 10 * MIB }, stop(100)),
            ("converged after the timeout: stop, not abort", timeout, Abort,
             |r| { r.elapsed = Duration::from_secs(61); r.remaining_bytes = 10 * MIB }, stop(100)),
            ("converged while the guest outruns the link: stop", passes, Abort,
             |r| { r.remaining_bytes = 10 * MIB; r.dirty_rate = 400 * MIB }, stop(100)),
            // --- converging ---
            ("converging, within limits: another pass", passes, Abort, |_| {}, Decision::Continue),
            ("converging, throttle policy: another pass, no throttle", passes, Throttle,
             |_| {}, Decision::Continue),
            ("throttled guest now slower than the link: another pass", passes, Throttle,
             |r| r.throttle_pct = 40, Decision::Continue),
            // --- limits ---
            ("pass limit reached over the limit: abort with the estimate", passes, Abort,
             |r| r.pass = 30, Decision::Abort(AbortReason::PassesExhausted {
                 passes: 30, estimated_downtime_ms: 640, max_downtime_ms: 300,
                 dirty_rate: 10 * MIB, link_rate: 100 * MIB })),
            ("pass limit beats throttling", passes, Throttle,
             |r| { r.pass = 30; r.dirty_rate = 200 * MIB },
             Decision::Abort(AbortReason::PassesExhausted {
                 passes: 30, estimated_downtime_ms: 640, max_downtime_ms: 300,
                 dirty_rate: 200 * MIB, link_rate: 100 * MIB })),
            ("timeout reached over the limit: abort", timeout, Abort,
             |r| r.elapsed = Duration::from_secs(60), Decision::Abort(AbortReason::TimedOut {
                 elapsed_s: 60, estimated_downtime_ms: 640, max_downtime_ms: 300,
                 dirty_rate: 10 * MIB, link_rate: 100 * MIB })),
            ("timeout not reached, pass count irrelevant: another pass", timeout, Abort,
             |r| r.pass = 500, Decision::Continue),
            // --- no progress ---
            ("guest outruns the link: abort with both rates", passes, Abort,
             |r| { r.dirty_rate = 410 * MIB; r.link_rate = 120 * MIB; r.remaining_bytes = 200 * MIB },
             Decision::Abort(AbortReason::DirtiesFasterThanLink {
                 dirty_rate: 410 * MIB, link_rate: 120 * MIB })),
            ("guest dirties exactly the link rate: no progress", passes, Abort,
             |r| r.dirty_rate = 100 * MIB,
             Decision::Abort(AbortReason::DirtiesFasterThanLink {
                 dirty_rate: 100 * MIB, link_rate: 100 * MIB })),
            ("first pass outrun: one more pass before judging", passes, Abort,
             |r| { r.pass = 1; r.dirty_rate = 400 * MIB }, Decision::Continue),
            ("outrun, throttle policy: initial throttle", passes, Throttle,
             |r| r.dirty_rate = 400 * MIB, Decision::Throttle { percent: THROTTLE_INITIAL_PCT }),
            ("outrun, already throttled: one increment more", passes, Throttle,
             |r| { r.dirty_rate = 400 * MIB; r.throttle_pct = 20 }, Decision::Throttle { percent: 30 }),
            ("outrun near the maximum: capped", passes, Throttle,
             |r| { r.dirty_rate = 400 * MIB; r.throttle_pct = 95 },
             Decision::Throttle { percent: THROTTLE_MAX_PCT }),
            ("outrun at the maximum throttle: abort saying so", passes, Throttle,
             |r| { r.dirty_rate = 400 * MIB; r.throttle_pct = THROTTLE_MAX_PCT },
             Decision::Abort(AbortReason::DirtiesFasterThrottled {
                 dirty_rate: 400 * MIB, link_rate: 100 * MIB, throttle_pct: THROTTLE_MAX_PCT })),
        ];
        for (case, limit, on, tweak, want) in rows {
            let mut r = base();
            tweak(&mut r);
            assert_eq!(decide(&policy(limit, on), &r), want, "{case}: {r:?}");
        }
    }

    #[test]
    fn downtime_estimate_is_overflow_free_and_rounds_up() {
        assert_eq!(estimated_downtime_ms(1, 1000), Some(1));
        assert_eq!(estimated_downtime_ms(1000, 1000), Some(1000));
        assert_eq!(estimated_downtime_ms(1001, 1000), Some(1001));
        assert_eq!(estimated_downtime_ms(10, 0), None);
        assert_eq!(estimated_downtime_ms(u64::MAX, u64::MAX), Some(1000));
        assert_eq!(estimated_downtime_ms(u64::MAX, 1), Some(u64::MAX));
        // Extreme inputs go through `decide` without a panic either.
        let p = PrecopyPolicy {
            max_downtime: Duration::MAX,
            limit: Limit::Passes(u32::MAX),
            on_no_progress: OnNoProgress::Throttle,
        };
        let r = PassReport {
            pass: u32::MAX,
            remaining_bytes: u64::MAX,
            dirty_rate: u64::MAX,
            link_rate: 1,
            elapsed: Duration::MAX,
            throttle_pct: u8::MAX,
        };
        assert_eq!(
            decide(&p, &r),
            Decision::StopAndCopy {
                estimated_downtime_ms: u64::MAX
            }
        );
    }

    #[test]
    fn reasons_read_as_an_operator_needs_them() {
        let cases = [
            (
                AbortReason::DirtiesFasterThanLink {
                    dirty_rate: 410 * MIB,
                    link_rate: 120 * MIB,
                },
                "guest dirties 410 MiB/s, link carries 120 MiB/s: the copy cannot converge",
            ),
            (
                AbortReason::DirtiesFasterThrottled {
                    dirty_rate: 3 * MIB / 2,
                    link_rate: 512 * 1024,
                    throttle_pct: 99,
                },
                "guest dirties 1.5 MiB/s even throttled at 99 %, link carries 512 KiB/s",
            ),
            (
                AbortReason::PassesExhausted {
                    passes: 30,
                    estimated_downtime_ms: 812,
                    max_downtime_ms: 300,
                    dirty_rate: 90 * MIB,
                    link_rate: 120 * MIB,
                },
                "no convergence in 30 passes: estimated downtime 812 ms over the 300 ms limit \
                 (guest dirties 90 MiB/s, link carries 120 MiB/s)",
            ),
            (
                AbortReason::LinkStalled { pass: 2 },
                "the link carried nothing during pass 2: the downtime cannot be estimated",
            ),
        ];
        for (reason, text) in cases {
            assert_eq!(reason.to_string(), text);
        }
    }

    #[test]
    fn decisions_serialise_with_their_reason() {
        let d = Decision::Abort(AbortReason::LinkStalled { pass: 2 });
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(
            json,
            r#"{"decision":"abort","reason":"link_stalled","pass":2}"#
        );
        assert_eq!(serde_json::from_str::<Decision>(&json).unwrap(), d);
    }
}
