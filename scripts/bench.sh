#!/usr/bin/env bash
# Benchmarks, each printing a table of figures measured side by side in one run (ratios
# against a floor measured in the same run). The machine is shared and noisy: compare the
# ratios, not the absolute numbers. Run as root (QEMU, taps, namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash tests/images/build-guest.sh >/dev/null
cargo build --quiet -p remus-agent -p remus-ha -p remus-drill --bins

echo "== failover, pair drill at defaults (kill-primary, 10 trials; min / median / max, ms) =="
"${CARGO_TARGET_DIR:-target}/debug/remus-drill" --trials 10 --json |
    python3 -c 'import json,sys,statistics as st; r=json.load(sys.stdin); ts=r["trials"]
rows=[("detection",lambda t:(t.get("failover") or {}).get("detection_ms")),("fencing",lambda t:(t.get("failover") or {}).get("fencing_ms")),("activation",lambda t:(t.get("failover") or {}).get("activation_ms")),("failure -> VM running",lambda t:t.get("failure_to_running_ms")),("failure -> first client reply",lambda t:t.get("failure_to_first_reply_ms")),("  of which after the VM ran (client TCP retransmission wait)",lambda t:(t["failure_to_first_reply_ms"]-t["failure_to_running_ms"]) if t.get("failure_to_first_reply_ms") is not None and t.get("failure_to_running_ms") is not None else None),("client TCP retransmissions (count)",lambda t:(t.get("client") or {}).get("tcp_retransmits")),("survivor unprotected after failover",lambda t:t.get("unprotected_after_failure_ms")),("old primary re-protected",lambda t:t.get("reprotect_ms"))]
print("| | min | median | max |"); print("|---|---|---|---|")
for name,f in rows:
    v=sorted(x for x in (f(t) for t in ts) if x is not None)
    print("| %s | %s | %s | %s |" % ((name,)+((v[0],st.median(v),v[-1]) if v else ("-","-","-"))))
print("passed: %s; lost replies: %s" % (r["passed"], [ (t.get("client") or {}).get("lost_replies") for t in ts]))'
echo

echo "== checkpoint pause, 256 MiB TCG guest at 200 ms, beside the memory-scan floor =="
"${CARGO_TARGET_DIR:-target}/debug/remus-drill" --local --memory-mib 256 --checkpoints 50 --json |
    python3 -c 'import json,sys; r=json.load(sys.stdin); f=r["memory_scan_floor_us"]
print("| tracker | pause p50 | pause p99 | scan floor | p50 / floor |")
print("|---|---|---|---|---|")
print("| %s | %.1f ms | %.1f ms | %.1f ms | %.2f |" % (r["tracker"], r["pause_p50_us"]/1e3, r["pause_p99_us"]/1e3, f/1e3, r["pause_p50_us"]/max(f,1)))
print("| soft-dirty | n/a: this kernel lacks CONFIG_MEM_SOFT_DIRTY (its correctness runs in the kernel harness) | | | |")'

echo; echo "== bytes of page data written per dirty page, before and after one owner of the scan state and decoding into the staging slots =="
# "before" was measured at commit ab119a5 (counters added, page path unchanged) with the same
# command as "now" below; the table's rows are remus_engine::copies stages.
cat <<'TABLE'
command: cargo bench -p remus-engine --bench page_copies (40 checkpoints after the first, 8 MiB guest)
| side, encoding | before (ab119a5) | after |
|---|---|---|
| primary, xor-lz4 (default) | 16479 | 16479 |
| backup, xor-lz4 (default) | 20606 | 12383 |
| primary, lz4 | 8347 | 8339 |
| backup, lz4 | 20686 | 12435 |
| primary, none | 20508 | 20508 |
| backup, none | 36899 | 24604 |
backup stages gone: owned record (payload copied out of the decoder), decode scratch -> staged
copy (4096), staging-file buffer (4096). Primary unchanged: capture (RAM -> shadow, and the old
copy for XOR) and the gather into a contiguous batch (an LZ4 block needs one) remain.
TABLE
echo "now, by stage:"
cargo bench --quiet -p remus-engine --bench page_copies

echo; echo "== dirty-page tracker collect vs memory floors (cargo bench -p remus-tracker --bench collect) =="
cargo bench --quiet -p remus-tracker --bench collect

echo; echo "== PAGE_DATA encode/decode vs memcpy (remus-stream page_table) =="
BENCH_MS=400 cargo bench --quiet -p remus-stream --bench page_table

echo; echo "== relay throughput vs a plain socket-to-tap copy (sch-plug relay) =="
cargo bench --quiet -p sch-plug --bench relay

echo; echo "== replicated NBD writes vs qemu-img bench on the raw file (blk-remus) =="
bash blk-remus/bench.sh
