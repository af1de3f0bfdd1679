//! Reading a guest's serial console log (QEMU appends ttyS0 to a file).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// Every `counter=<n>` value printed so far, in order.
pub fn counters(log: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("counter="))
        .filter_map(|v| v.trim().parse().ok())
        .collect()
}

/// Every `check …` line printed so far.
pub fn checks(log: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("check ").map(str::to_string))
        .collect()
}

/// Waits until `pred` holds for the log's text, polling.
///
/// # Errors
/// Timeout, with the log's tail.
pub async fn wait_for(
    log: &Path,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&str) -> bool,
) -> Result<()> {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if pred(&text) {
            return Ok(());
        }
        if start.elapsed() > timeout {
            let tail: String = text
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            bail!(
                "{what}: not seen within {timeout:?} in {}; tail:\n{tail}",
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
