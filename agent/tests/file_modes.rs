//! Every file and directory remusd's stores create is owner-only, whatever the umask.
//!
//! remusd sets umask 077 itself, which would hide a store that forgets its mode; so this
//! test (its own process) sets umask 000 and drives each store that writes to disk — role,
//! disk-copy record, domain directories, RAM replica and its metadata, WAL and spill
//! directory, dirty bitmap, guest RAM file, raw image — then walks everything they made.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use remus_agent::domain::disk_copy::{DiskCopy, DiskCopyStore};
use remus_agent::domain::DomainPaths;
use remus_ha::lineage::CopyStamp;
use remus_ha::role::{Event, RoleStore};

const MIB: u64 = 1 << 20;

fn walk(dir: &Path, out: &mut Vec<(String, u32, bool)>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let meta = e.metadata().unwrap();
        let mode = meta.permissions().mode() & 0o7777;
        out.push((e.path().display().to_string(), mode, meta.is_dir()));
        if meta.is_dir() {
            walk(&e.path(), out);
        }
    }
}

#[test]
fn stores_create_owner_only_files_under_umask_000() {
    // SAFETY: umask(2) only sets this process's file-creation mask; it cannot fail.
    unsafe { libc::umask(0) };
    let root = tempfile::tempdir().unwrap();
    let (run, state) = (root.path().join("run"), root.path().join("state"));

    let mut roles = RoleStore::open(&state, "web").unwrap();
    roles.apply(Event::StartUnprotected, "test").unwrap();

    let paths = DomainPaths::new(&run, &state, "web");
    paths.create().unwrap();
    let mut copy = DiskCopyStore::open("web", &paths.state).unwrap();
    copy.set(DiskCopy::Replica, CopyStamp::NONE, "test")
        .unwrap();

    let mut replica =
        remus_engine::replica::ReplicaStore::open("web", &paths.replica(), 4 * MIB).unwrap();
    let page = vec![0xa5u8; 4096];
    replica.begin_session(1).unwrap();
    replica.write_first_page(0, &page).unwrap();
    replica.commit_first(1, b"device state").unwrap();
    let mut staged = remus_engine::replica::StagedPages::default();
    staged.put(1, &page);
    replica
        .stage_and_apply(2, &staged, b"device state 2")
        .unwrap();
    replica.mark_committed(2).unwrap();

    let image = paths.state.join("root.img");
    blk_remus::FileBackend::create(&image, MIB).unwrap();
    let disk_state = paths.disk_state("root");
    let _backup =
        blk_remus::BackupStore::open(blk_remus::BackupConfig::new(&disk_state, &image)).unwrap();
    let mut bitmap =
        blk_remus::DirtyBitmap::open(&disk_state.join("dirty.bitmap"), MIB, 64 << 10).unwrap();
    bitmap.mark(0, 4096).unwrap();
    bitmap.persist([]).unwrap();
    let _ram = remus_qemu::GuestRamMut::create(&paths.guest_ram(), 4 * MIB).unwrap();

    let mut made = Vec::new();
    walk(root.path(), &mut made);
    let files = made.iter().filter(|(_, _, dir)| !dir).count();
    assert!(
        files >= 8,
        "the stores made too few files to judge: {made:#?}"
    );
    let loose: Vec<_> = made
        .iter()
        .filter(|(_, mode, _)| mode & 0o077 != 0)
        .map(|(p, mode, _)| format!("{p} {mode:04o}"))
        .collect();
    assert!(
        loose.is_empty(),
        "group/other bits under umask 000:\n{}",
        loose.join("\n")
    );
}
