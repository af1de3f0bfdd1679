//! Cost of a collect beside the memory-scan floor, measured side by side in one run.
//!
//! Guest RAM is a 256 MiB file in /dev/shm mapped read-only (as the engine maps it) and
//! written through a second, writable mapping (standing in for QEMU); the shadow is an
//! ordinary buffer. Each round dirties 1000–2500 random pages, then times one operation.
//! Prints a table of min / median per operation and the ratio of the median to the
//! single-thread read floor.
//!
//! Run: `cargo bench -p remus-tracker --bench collect` (env `REMUS_BENCH_MIB`, `REMUS_BENCH_ROUNDS`).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use remus_tracker::pagemap::Pagemap;
use remus_tracker::{
    sync_listed, AuditConfig, Capture, CompareTracker, DirtySet, DirtyTracker, Pfn, ReplicaAudit,
    ScanPool, VmStopped, PAGE_SIZE,
};

struct Row {
    name: String,
    times: Vec<Duration>,
    note: String,
}

fn stats(times: &[Duration]) -> (Duration, Duration) {
    let mut t = times.to_vec();
    t.sort();
    (t[0], t[t.len() / 2])
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Dirties 1000–2500 random pages of `ram` (through the writable mapping); returns them sorted.
fn dirty(ram: &mut [u8], rng: &mut Rng) -> Vec<Pfn> {
    let n = 1000 + (rng.next() % 1501) as usize;
    let pages = ram.len() / PAGE_SIZE;
    let mut out: Vec<Pfn> = (0..n)
        .map(|_| {
            let p = (rng.next() % pages as u64) as usize;
            let off = p * PAGE_SIZE + (rng.next() % PAGE_SIZE as u64) as usize;
            ram[off] = ram[off].wrapping_add(1);
            p as Pfn
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

fn read_sum(data: &[u8]) -> u64 {
    // SAFETY: every bit pattern is a valid u64; `align_to` only reinterprets the aligned middle.
    let (head, words, tail) = unsafe { data.align_to::<u64>() };
    // Independent lanes so the loop vectorises into wide loads bound by memory bandwidth.
    let mut acc = [0u64; 8];
    for line in words.chunks_exact(8) {
        for (a, w) in acc.iter_mut().zip(line) {
            *a = a.wrapping_add(*w);
        }
    }
    let rest = words.chunks_exact(8).remainder().iter();
    let bytes = head.iter().chain(tail).map(|&b| u64::from(b));
    acc.iter()
        .chain(rest)
        .copied()
        .chain(bytes)
        .fold(0, u64::wrapping_add)
}

/// Page equality by 64-byte blocks of XOR-ed words with an exit per block (the alternative
/// to `bcmp` that `page::sync_page` was measured against).
fn pages_equal_words(a: &[u8], b: &[u8]) -> bool {
    a.chunks_exact(64).zip(b.chunks_exact(64)).all(|(x, y)| {
        let mut d = 0u64;
        for (p, q) in x.chunks_exact(8).zip(y.chunks_exact(8)) {
            d |= u64::from_ne_bytes(p.try_into().unwrap())
                ^ u64::from_ne_bytes(q.try_into().unwrap());
        }
        d == 0
    })
}

fn main() {
    // `cargo bench` passes `--bench`; ignore arguments.
    let mib: usize = std::env::var("REMUS_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let rounds: usize = std::env::var("REMUS_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(9);
    let len = mib << 20;
    let pages = len / PAGE_SIZE;
    let path = format!("/dev/shm/remus-tracker-bench-{}.ram", std::process::id());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .expect("create RAM file");
    struct Rm(String);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _rm = Rm(path.clone());
    file.set_len(len as u64).unwrap();
    // SAFETY: the file is private to this benchmark.
    let mut guest = unsafe { memmap2::MmapMut::map_mut(&file) }.unwrap();
    // SAFETY: read-only view of the same file; reads happen only between the writes above.
    let live = unsafe { memmap2::Mmap::map(&file) }.unwrap();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for (i, b) in guest.iter_mut().enumerate().step_by(64) {
        *b = (i >> 6) as u8 ^ (rng.next() as u8);
    }
    let mut shadow = live.to_vec();
    let mut dst = vec![0u8; len];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pool1 = Arc::new(ScanPool::new(1).unwrap());
    let pooln = Arc::new(ScanPool::new(threads).unwrap());
    let stopped = VmStopped::caller_asserts_vm_stopped();
    let mut out = DirtySet::new(Capture::PfnsOnly);
    let mut out_x = DirtySet::new(Capture::XorDelta);
    let mut rows: Vec<Row> = Vec::new();

    let mut measure =
        |name: &str, note: &str, f: &mut dyn FnMut(&mut Rng, &mut [u8]) -> Duration| {
            let _ = f(&mut rng, &mut guest); // warm-up
            let times: Vec<Duration> = (0..rounds).map(|_| f(&mut rng, &mut guest)).collect();
            rows.push(Row {
                name: name.into(),
                times,
                note: note.into(),
            });
        };

    measure(
        "read 256 MiB, 1 thread (floor)",
        "sum of u64 words",
        &mut |_, _| {
            let t = Instant::now();
            black_box(read_sum(black_box(&live)));
            t.elapsed()
        },
    );
    measure(
        &format!("read 256 MiB, {threads} threads"),
        "pool, contiguous chunks",
        &mut |_, _| {
            let t = Instant::now();
            let chunks: Vec<&[u8]> = live.chunks(len / threads).collect();
            black_box(pooln.map(chunks, read_sum));
            t.elapsed()
        },
    );
    measure("memcpy 256 MiB, 1 thread", "live -> buffer", &mut |_, _| {
        let t = Instant::now();
        dst.copy_from_slice(black_box(&live));
        black_box(&dst);
        t.elapsed()
    });
    measure(
        "memcmp 256 MiB (equal), 1 thread",
        "live == shadow, one call",
        &mut |_, _| {
            let t = Instant::now();
            black_box(black_box(&live[..]) == black_box(&shadow[..]));
            t.elapsed()
        },
    );
    // Keep the shadow in sync for the word-compare row (no copy in it).
    measure(
        "page compare by words, 1 thread",
        "alternative to bcmp, no dirty pages",
        &mut |_, _| {
            let t = Instant::now();
            let n = live
                .chunks(PAGE_SIZE)
                .zip(shadow.chunks(PAGE_SIZE))
                .filter(|(a, b)| !pages_equal_words(a, b))
                .count();
            black_box(n);
            t.elapsed()
        },
    );
    measure(
        "page compare by bcmp, 1 thread",
        "what sync_page uses, no dirty pages",
        &mut |_, _| {
            let t = Instant::now();
            let n = live
                .chunks(PAGE_SIZE)
                .zip(shadow.chunks(PAGE_SIZE))
                .filter(|(a, b)| a != b)
                .count();
            black_box(n);
            t.elapsed()
        },
    );
    let mut dirty_counts = Vec::new();
    let mut t1 = CompareTracker::new(pool1.clone());
    measure(
        "compare collect, 1 thread",
        "1000-2500 dirty pages, pfns only",
        &mut |rng, g| {
            let n = dirty(g, rng).len();
            out.clear();
            let t = Instant::now();
            let s = t1.collect(&stopped, &live, &mut shadow, &mut out).unwrap();
            let e = t.elapsed();
            assert_eq!(s.pages_dirty as usize, n);
            dirty_counts.push(n);
            e
        },
    );
    let mut tn = CompareTracker::new(pooln.clone());
    measure(
        &format!("compare collect, {threads} threads"),
        "1000-2500 dirty pages, pfns only",
        &mut |rng, g| {
            let n = dirty(g, rng).len();
            out.clear();
            let t = Instant::now();
            let s = tn.collect(&stopped, &live, &mut shadow, &mut out).unwrap();
            let e = t.elapsed();
            assert_eq!(s.pages_dirty as usize, n);
            e
        },
    );
    measure(
        &format!("compare collect, {threads} threads, XOR delta"),
        "1000-2500 dirty pages",
        &mut |rng, g| {
            let n = dirty(g, rng).len();
            out_x.clear();
            let t = Instant::now();
            let s = tn
                .collect(&stopped, &live, &mut shadow, &mut out_x)
                .unwrap();
            let e = t.elapsed();
            assert_eq!(s.pages_dirty as usize, n);
            e
        },
    );
    measure(
        &format!("listed sync, {threads} threads, XOR delta"),
        "soft-dirty copy stage (list known)",
        &mut |rng, g| {
            let listed = dirty(g, rng);
            out_x.clear();
            let t = Instant::now();
            let s = sync_listed(&pooln, &listed, &live, &mut shadow, &mut out_x).unwrap();
            let e = t.elapsed();
            assert_eq!(s.dirty as usize, listed.len());
            e
        },
    );
    let pagemap = Pagemap::open(0).unwrap();
    let mut entries = vec![0u64; pages];
    let mut scratch = Vec::new();
    measure(
        "pagemap read, all pages",
        "soft-dirty scan stage (own mapping)",
        &mut |_, _| {
            let t = Instant::now();
            pagemap
                .read(live.as_ptr() as u64, &mut entries, &mut scratch)
                .unwrap();
            black_box(&entries);
            t.elapsed()
        },
    );
    let mut audit = ReplicaAudit::new(len, AuditConfig::default(), pooln.clone());
    measure(
        "audit slice (1/64 of RAM)",
        "per epoch, default cycle",
        &mut |_, _| {
            out.clear();
            let t = Instant::now();
            let r = audit.run(&stopped, &live, &mut shadow, &mut out).unwrap();
            let e = t.elapsed();
            assert!(r.mismatched.is_empty());
            e
        },
    );
    measure(
        &format!("pool dispatch, {threads} items"),
        "persistent threads, caller takes part",
        &mut |_, _| {
            let t = Instant::now();
            black_box(pooln.map((0..threads).collect(), |i| i + 1));
            t.elapsed()
        },
    );
    measure(
        &format!("thread::scope spawn, {threads} threads"),
        "spawn per call",
        &mut |_, _| {
            let t = Instant::now();
            std::thread::scope(|s| {
                for i in 0..threads {
                    s.spawn(move || black_box(i + 1));
                }
            });
            t.elapsed()
        },
    );

    let floor = stats(&rows[0].times).1.as_secs_f64();
    println!(
        "\nRAM {mib} MiB ({pages} pages), {threads} CPUs, {rounds} timed rounds (+1 warm-up); dirty pages per round {}..{}",
        dirty_counts.iter().min().unwrap_or(&0),
        dirty_counts.iter().max().unwrap_or(&0)
    );
    println!(
        "{:<44} {:>10} {:>10} {:>9}  note",
        "operation", "min ms", "median ms", "x floor"
    );
    for r in &rows {
        let (min, med) = stats(&r.times);
        println!(
            "{:<44} {:>10.3} {:>10.3} {:>9.2}  {}",
            r.name,
            min.as_secs_f64() * 1e3,
            med.as_secs_f64() * 1e3,
            med.as_secs_f64() / floor,
            r.note
        );
    }
}
