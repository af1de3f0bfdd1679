//! End to end with real QEMU (TCG) and the real guest: checkpoint a running guest every
//! ~200 ms, kill it, restore the last checkpoint in a second QEMU and see the guest's counter
//! continue exactly where the checkpoint left it, with memory and disk agreeing.
//!
//! Run with `--nocapture` to see the measured costs.

mod common;

use std::time::{Duration, Instant};

use common::*;
use remus_qemu::{DiskBackend, GuestRam, GuestRamMut, QemuProcess, RunState, VmControl, PAGE_SIZE};

/// Checkpoint cycles before the kill.
const CYCLES: usize = 32;
const EPOCH: Duration = Duration::from_millis(200);

/// Copies every page of `ram` that differs from `replica` into it; returns how many.
fn copy_changed_pages(ram: &GuestRam, replica: &mut GuestRamMut) -> usize {
    let mut changed = 0;
    let src = ram.as_slice().chunks_exact(PAGE_SIZE);
    let dst = replica.as_mut_slice().chunks_exact_mut(PAGE_SIZE);
    for (s, d) in src.zip(dst) {
        if s != d {
            d.copy_from_slice(s);
            changed += 1;
        }
    }
    changed
}

/// What the last checkpoint captured besides RAM.
struct Checkpoint {
    device_state: Vec<u8>,
    /// Console output up to the moment the VM was stopped.
    console: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_resumes_from_the_last_checkpoint_after_a_kill() {
    let images = guest_images();
    let scratch = Scratch::new("ckpt");
    let disk = scratch.path("disk.raw");
    raw_disk(&disk, 4 << 20);
    let params = "remus.mode=ticker remus.interval=50 remus.check_every=5";
    let spec = guest_spec(&images, &scratch, "primary", params, &disk);

    // --- primary: boot and checkpoint ---
    let boot_start = Instant::now();
    let mut primary = QemuProcess::spawn(&spec)
        .await
        .expect("spawning the primary");
    let vm = VmControl::new(primary.connect_qmp().await.expect("primary QMP"));
    vm.enable_checkpointing()
        .await
        .expect("enable checkpointing");
    wait_console(&spec, Duration::from_secs(120), "counter=3", |c| {
        counters(c).contains(&3)
    })
    .await;
    println!(
        "primary: guest ticking {:?} after spawn",
        boot_start.elapsed()
    );

    let ram = GuestRam::open(&spec.ram_path, spec.memory_bytes()).expect("mapping guest RAM");
    let mut replica = GuestRamMut::create(&scratch.shm("replica.ram"), spec.memory_bytes())
        .expect("creating the replica");
    let disk_at_checkpoint = scratch.path("disk-at-checkpoint.raw");

    let (mut t_stop, mut t_copy, mut t_save, mut t_cont, mut t_pause) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut dirty = vec![];
    let mut last: Option<Checkpoint> = None;
    for cycle in 0..CYCLES {
        tokio::time::sleep(EPOCH).await;
        let pause = Instant::now();
        t_stop.push(vm.stop().await.expect("stop"));
        let copy = Instant::now();
        dirty.push(copy_changed_pages(&ram, &mut replica));
        t_copy.push(copy.elapsed());
        let state = vm.save_device_state().await.expect("save device state");
        t_save.push(state.elapsed);
        // The replica disk as of this checkpoint (the product replicates writes instead).
        std::fs::copy(&disk, &disk_at_checkpoint).expect("snapshotting the disk");
        let console_now = console(&spec);
        assert_eq!(
            vm.query_status().await.expect("query-status"),
            RunState::postmigrate,
            "cycle {cycle}"
        );
        t_cont.push(vm.cont().await.expect("cont"));
        t_pause.push(pause.elapsed());
        last = Some(Checkpoint {
            device_state: state.bytes,
            console: console_now,
        });
    }
    let checkpoint = last.expect("at least one cycle");
    let at_checkpoint = counters(&checkpoint.console);
    let n = *at_checkpoint
        .last()
        .expect("a counter line before the checkpoint");

    // Let the primary run past the checkpoint, so a restore that continued from the
    // primary's latest state instead of the checkpoint would show.
    wait_console(
        &spec,
        Duration::from_secs(30),
        "progress past the checkpoint",
        |c| counters(c).last().is_some_and(|&v| v >= n + 3),
    )
    .await;
    primary.kill_and_wait().await.expect("killing the primary");
    let primary_last = *counters(&console(&spec)).last().unwrap();

    // --- backup: restore the last checkpoint into a fresh QEMU ---
    let restore_disk = scratch.path("disk-restore.raw");
    std::fs::copy(&disk_at_checkpoint, &restore_disk).expect("copying the replica disk");
    let mut bspec = guest_spec(&images, &scratch, "backup", params, &restore_disk);
    bspec.incoming = true;
    // The restored VM writes into its RAM file: give it a copy, keep the replica intact.
    let copy_start = Instant::now();
    {
        let mut activated = GuestRamMut::create(&bspec.ram_path, bspec.memory_bytes())
            .expect("creating the activation RAM file");
        activated.as_mut_slice().copy_from_slice(replica.as_slice());
    }
    let t_ram_copy = copy_start.elapsed();
    assert!(
        matches!(&bspec.disks[0].backend, DiskBackend::RawFile { path } if *path == restore_disk)
    );

    let restore_start = Instant::now();
    let mut backup = QemuProcess::spawn(&bspec)
        .await
        .expect("spawning the backup");
    let bvm = VmControl::new(backup.connect_qmp().await.expect("backup QMP"));
    let t_start = restore_start.elapsed();
    bvm.enable_checkpointing()
        .await
        .expect("backup capabilities");
    assert_eq!(bvm.query_status().await.unwrap(), RunState::inmigrate);
    let t_load = bvm
        .load_device_state(&checkpoint.device_state)
        .await
        .expect("loading the device state");
    assert_eq!(bvm.query_status().await.unwrap(), RunState::paused);
    let t_bcont = bvm.cont().await.expect("cont on the backup");
    let t_restore = restore_start.elapsed();
    assert_eq!(bvm.query_status().await.unwrap(), RunState::running);

    let restored = wait_console(
        &bspec,
        Duration::from_secs(60),
        "8 counters and a check",
        |c| counters(c).len() >= 8 && c.contains("check "),
    )
    .await;
    backup.kill_and_wait().await.expect("killing the backup");

    // The checkpoint's console followed by the restored VM's: one unbroken count. (A line
    // cut by the stop is completed by the restored guest, so join the texts, not lines.)
    let joined = format!("{}{}", checkpoint.console, restored);
    let all = counters(&joined);
    let after: Vec<u64> = counters(&joined)[at_checkpoint.len()..].to_vec();
    println!(
        "checkpoint at counter={n}; primary reached {primary_last} before the kill; \
         restored guest printed {:?}",
        after
    );
    assert_eq!(all.first(), Some(&1), "the count starts at 1");
    for w in all.windows(2) {
        assert_eq!(w[1], w[0] + 1, "count broken around {w:?}: {all:?}");
    }
    assert_eq!(
        after.first(),
        Some(&(n + 1)),
        "restored guest must continue at {}",
        n + 1
    );
    assert!(primary_last > n + 1, "the primary ran past the checkpoint");
    let checks: Vec<&str> = restored
        .lines()
        .filter_map(|l| l.strip_prefix("check "))
        .collect();
    assert!(!checks.is_empty());
    for c in &checks {
        assert!(
            c.starts_with("ok "),
            "disk and memory disagree after restore: {c}"
        );
    }

    println!(
        "\n{CYCLES} checkpoints of a {} MiB TCG guest, epoch {EPOCH:?}; device state {} bytes",
        spec.memory_mib,
        checkpoint.device_state.len()
    );
    // The first epoch fills an empty replica (every page differs): report it apart.
    println!(
        "first epoch: compare+copy {:?} for {} pages (replica filled from empty)",
        t_copy[0], dirty[0]
    );
    let (t_copy, dirty) = (t_copy[1..].to_vec(), dirty[1..].to_vec());
    let t_pause = t_pause[1..].to_vec();
    println!("step (epochs 2..)             min / median / max (ms)");
    println!("stop                      {}", stats(&t_stop));
    println!("compare+copy RAM          {}", stats(&t_copy));
    println!("save device state         {}", stats(&t_save));
    println!("cont                      {}", stats(&t_cont));
    println!("whole pause (stop..cont)  {}", stats(&t_pause));
    let mut dirty = dirty;
    dirty.sort_unstable();
    println!(
        "dirty pages per epoch     {} / {} / {}",
        dirty[0],
        dirty[dirty.len() / 2],
        dirty[dirty.len() - 1]
    );
    println!(
        "restore: RAM copy {t_ram_copy:?}, spawn+QMP {t_start:?}, load {t_load:?}, cont {t_bcont:?}, \
         spawn..running {t_restore:?}"
    );
}
