//! `remusctl verify`: an online disk verify of a protected domain, asked of its primary.
//!
//! The supervisor only admits the request (the primary role with a protection session
//! running; a backup or a standalone node has nothing to compare with) and hands it to the
//! epoch loop (`remus_engine::verify`); a task of its own waits for the report, measures
//! the disk read floor beside it and answers, so the supervisor goes on meanwhile.

use super::*;
use crate::api::verify::{report_of, ReadFloor, VerifyLast, VerifyStatus};

/// Most bytes of the read floor's plain sequential read.
const READ_FLOOR_MAX: u64 = 256 << 20;

impl Supervisor {
    pub(super) fn verify(&mut self, resync: bool, reply: oneshot::Sender<Response>) {
        let name = self.d.name.clone();
        let refuse = |reply: oneshot::Sender<Response>, why: String| {
            let _ = reply.send(Response::Error {
                message: format!("domain {name}: verify: {why}"),
            });
        };
        let peer = self.shared.config.peer.name.clone();
        let role = self.role();
        let why_not = match &role {
            Role::Primary { .. } => None,
            Role::Backup { peer, .. } => Some(format!(
                "this node holds the replica; verify is asked of the primary ({peer})"
            )),
            Role::Standalone => Some(format!(
                "the VM runs here unprotected: there is no replica on {peer} to compare with"
            )),
            Role::Resyncing { .. } => Some(
                "the backup's replica is being resynchronised; verify once it is protected"
                    .to_string(),
            ),
            other => Some(format!(
                "this node is {}: verify is asked of a protecting primary",
                other.name()
            )),
        };
        if let Some(why) = why_not {
            return refuse(reply, why);
        }
        let Runtime::Vm(v) = &self.runtime else {
            return refuse(reply, "no VM runs here".into());
        };
        let Some(p) = &v.protection else {
            return refuse(reply, "no protection session runs now".into());
        };
        let req = remus_engine::verify::VerifyRequest {
            resync,
            ..crate::domain::primary::verify_request_of(&self.d)
        };
        let rx = p.handle.start_verify(req);
        let ids: Vec<String> = v.vm.disks.iter().map(|d| d.id.clone()).collect();
        let first = v.vm.disks.first().map(|d| d.primary.clone());
        tokio::spawn(async move {
            let answer = match rx.await {
                Ok(Ok(r)) => {
                    let mut report = report_of(&name, &r, &ids);
                    if let Some(disk) = first {
                        report.read_floor = read_floor(disk, r.bytes_hashed).await;
                    }
                    Response::Verified(Box::new(report))
                }
                Ok(Err(e)) => Response::Error {
                    message: format!("domain {name}: verify: {e}"),
                },
                Err(_) => Response::Error {
                    message: format!("domain {name}: verify: protection ended first"),
                },
            };
            let _ = reply.send(answer);
        });
    }

    /// The status of verifies: the run in progress (from the loop) and the last finished;
    /// counts a newly finished run once.
    pub(super) fn observe_verify(&mut self, st: &remus_engine::primary::PrimaryStatus) {
        if let Some(r) = &st.last_verify {
            let key = (self.seen_verify_session, r.run);
            if self.seen_verify != Some(key) {
                self.seen_verify = Some(key);
                self.counters.verify_runs += 1;
                self.counters.verify_differing_regions += r.differing_count;
                self.verify_last = Some(VerifyLast {
                    finished_at_ms: unix_millis(),
                    periodic: r.periodic,
                    regions_checked: r.regions_checked,
                    differing: r.differing_count,
                    not_compared: r.not_compared.len() as u64,
                    resynced: r.resynced.is_some(),
                });
                if r.differing_count > 0 && r.resynced.is_none() {
                    self.alarm(&format!(
                        "verify: {} disk regions differ from the backup's replica (remusctl verify --resync)",
                        r.differing_count
                    ));
                } else {
                    self.clear_alarms("verify:");
                }
            }
        }
        self.verify_running = st
            .verify
            .as_ref()
            .map(|p| crate::api::verify::VerifyRunning {
                run: p.run,
                phase: p.phase.clone(),
                regions_total: p.regions_total,
                regions_done: p.regions_done,
                differing: p.differing,
            });
    }

    pub(super) fn verify_status(&self) -> Option<VerifyStatus> {
        if self.verify_running.is_none() && self.verify_last.is_none() {
            return None;
        }
        Some(VerifyStatus {
            running: self.verify_running.clone(),
            last: self.verify_last.clone(),
        })
    }
}

/// Reads up to `hashed` bytes (at most [`READ_FLOOR_MAX`]) of `disk` sequentially.
async fn read_floor(disk: Arc<blk_remus::Primary>, hashed: u64) -> Option<ReadFloor> {
    use blk_remus::BlockBackend;
    let bytes = hashed.min(READ_FLOOR_MAX).min(disk.size());
    if bytes == 0 {
        return None;
    }
    let t = Instant::now();
    tokio::task::spawn_blocking(move || disk.read_only_pass(0, bytes))
        .await
        .ok()?
        .ok()?;
    Some(ReadFloor {
        bytes,
        ms: (t.elapsed().as_millis() as u64).max(1),
    })
}
