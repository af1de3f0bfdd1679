//! `remusctl stream …`: inspect saved replication streams offline.
//!
//! `dump` prints every record it can decode (offset, index, type, length, summary), checks
//! what a backup would check (CRCs, record order, epoch counts and digests, page batches
//! unpack), and on the first problem prints the byte offset and the reason and exits 1.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use remus_stream::{
    DecodeErrorKind, Decoder, DecoderConfig, DiskOpRef, EpochVerifier, Frame, Item, RecordRef,
    StreamHeader, PAGE_SIZE,
};
use serde_json::{json, Value};

use super::{EXIT_OK, EXIT_PROBLEMS};

/// `remusctl stream` subcommands.
#[derive(Debug, Subcommand)]
pub enum StreamCmd {
    /// List the records of a saved stream and verify it.
    Dump {
        /// The stream file.
        file: PathBuf,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        /// Largest record body accepted, in MiB.
        #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=4095))]
        max_record_mib: u32,
    },
}

impl StreamCmd {
    /// Runs the subcommand.
    pub fn run(self) -> ExitCode {
        match self {
            StreamCmd::Dump {
                file,
                json,
                max_record_mib,
            } => {
                let stdout = std::io::stdout();
                let mut out = BufWriter::new(stdout.lock());
                let code = dump(&file, json, max_record_mib << 20, &mut out);
                let _ = out.flush();
                ExitCode::from(code)
            }
        }
    }
}

/// Output style.
trait Sink {
    fn header(&mut self, h: &StreamHeader, len: u64);
    fn record(&mut self, f: &Frame<'_>, summary: Value);
    fn problem(&mut self, file: &Path, offset: Option<u64>, reason: &str);
    fn warning(&mut self, file: &Path, reason: &str);
    fn done(&mut self, file: &Path, records: u64, bytes: u64, epochs: u64);
}

struct Table<'w, W: Write>(&'w mut W);

impl<W: Write> Sink for Table<'_, W> {
    fn header(&mut self, h: &StreamHeader, len: u64) {
        let _ = writeln!(
            self.0,
            "{:>12}  {:>6}  {:<17} {:>9}  SUMMARY",
            "OFFSET", "INDEX", "TYPE", "LENGTH"
        );
        let _ = writeln!(
            self.0,
            "{:>12}  {:>6}  {:<17} {:>9}  version {}, {} stream, node {}, domain {}, session {:#018x}, page size {}",
            0,
            "-",
            "HEADER",
            len,
            remus_stream::VERSION,
            h.kind.as_str(),
            h.node,
            h.domain,
            h.session_id,
            PAGE_SIZE
        );
    }

    fn record(&mut self, f: &Frame<'_>, summary: Value) {
        let text = summary
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| match v {
                        Value::String(s) => format!("{k} {s}"),
                        other => format!("{k} {other}"),
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        let _ = writeln!(
            self.0,
            "{:>12}  {:>6}  {:<17} {:>9}  {text}",
            f.offset,
            f.index,
            f.record.record_type().to_string(),
            f.length
        );
    }

    fn problem(&mut self, file: &Path, offset: Option<u64>, reason: &str) {
        let _ = match offset {
            Some(o) => writeln!(self.0, "error: {}: at offset {o}: {reason}", file.display()),
            None => writeln!(self.0, "error: {}: {reason}", file.display()),
        };
    }

    fn warning(&mut self, file: &Path, reason: &str) {
        let _ = writeln!(self.0, "warning: {}: {reason}", file.display());
    }

    fn done(&mut self, file: &Path, records: u64, bytes: u64, epochs: u64) {
        let _ = writeln!(
            self.0,
            "{}: ok: {records} records, {bytes} bytes, {epochs} complete checkpoint(s), clean END",
            file.display()
        );
    }
}

struct JsonLines<'w, W: Write>(&'w mut W);

impl<W: Write> Sink for JsonLines<'_, W> {
    fn header(&mut self, h: &StreamHeader, len: u64) {
        let v = json!({
            "offset": 0, "type": "HEADER", "length": len, "version": remus_stream::VERSION,
            "kind": h.kind.as_str(), "node": h.node, "domain": h.domain,
            "session_id": h.session_id, "page_size": PAGE_SIZE,
        });
        let _ = writeln!(self.0, "{v}");
    }

    fn record(&mut self, f: &Frame<'_>, summary: Value) {
        let mut v = json!({
            "offset": f.offset, "index": f.index,
            "type": f.record.record_type().to_string(), "length": f.length,
        });
        if let (Some(o), Value::Object(s)) = (v.as_object_mut(), summary) {
            o.extend(s);
        }
        let _ = writeln!(self.0, "{v}");
    }

    fn problem(&mut self, file: &Path, offset: Option<u64>, reason: &str) {
        let v = json!({ "type": "ERROR", "file": file.display().to_string(), "offset": offset, "reason": reason });
        let _ = writeln!(self.0, "{v}");
    }

    fn warning(&mut self, file: &Path, reason: &str) {
        let v = json!({ "type": "WARNING", "file": file.display().to_string(), "reason": reason });
        let _ = writeln!(self.0, "{v}");
    }

    fn done(&mut self, file: &Path, records: u64, bytes: u64, epochs: u64) {
        let v = json!({ "type": "OK", "file": file.display().to_string(), "records": records, "bytes": bytes, "checkpoints": epochs });
        let _ = writeln!(self.0, "{v}");
    }
}

/// Fields describing one record (kept small: no payloads).
fn summarize(r: &RecordRef<'_>) -> Value {
    match r {
        RecordRef::End => json!({}),
        RecordRef::DomainConfig { epoch, json } => {
            json!({ "epoch": epoch, "json_bytes": json.len() })
        }
        RecordRef::CheckpointBegin { epoch }
        | RecordRef::CheckpointAck { epoch }
        | RecordRef::HandOff { epoch } => {
            json!({ "epoch": epoch })
        }
        RecordRef::PageData(p) => {
            let raw = p.count() * PAGE_SIZE;
            let first = p.pfn(0);
            let last = p.pfn(p.count() - 1);
            json!({
                "epoch": p.epoch,
                "pages": p.count(),
                "encoding": p.encoding.to_string(),
                "pfns": format!("{first:#x}..={last:#x}"),
                "payload_bytes": p.payload().len(),
                "payload_percent": format!("{:.1}", 100.0 * p.payload().len() as f64 / raw as f64),
            })
        }
        RecordRef::DeviceState(d) => json!({
            "epoch": d.epoch, "offset": d.offset, "bytes": d.data.len(), "total": d.total_len,
        }),
        RecordRef::DiskWrite(w) => {
            let kind = match w.op {
                DiskOpRef::Data(_) => "data",
                DiskOpRef::Zeroes(_) => "zeroes",
                DiskOpRef::Trim(_) => "trim",
            };
            json!({ "epoch": w.epoch, "disk": w.disk, "kind": kind, "disk_offset": w.offset, "bytes": w.op.len() })
        }
        RecordRef::DiskBarrier(b) => {
            json!({ "epoch": b.epoch, "writes": b.writes, "data_bytes": b.data_bytes })
        }
        RecordRef::DiskVerify(v) => json!({
            "epoch": v.epoch, "run": v.run, "disk": v.region.disk,
            "disk_offset": v.region.offset, "bytes": v.region.length,
        }),
        RecordRef::DiskVerifyResult(r) => json!({
            "epoch": r.epoch, "run": r.run, "disk": r.region.disk,
            "disk_offset": r.region.offset, "bytes": r.region.length,
            "verdict": r.verdict.to_string(),
        }),
        RecordRef::CheckpointEnd(e) => json!({
            "epoch": e.epoch, "pages": e.pages, "page_records": e.page_records,
            "device_state_bytes": e.device_state_bytes, "disk_writes": e.disk_writes,
            "digest": format!("{:#010x}", e.digest),
        }),
        RecordRef::Control(j) => json!({ "json_bytes": j.len() }),
        RecordRef::CheckpointNack {
            epoch,
            reason,
            message,
        } => json!({ "epoch": epoch, "reason": reason.to_string(), "message": message }),
        RecordRef::Unknown { .. } => json!({ "skipped": "optional record of unknown type" }),
    }
}

/// Dumps `file`; returns the exit code.
fn dump(file: &Path, as_json: bool, max_record_body: u32, out: &mut impl Write) -> u8 {
    let mut table;
    let mut lines;
    let sink: &mut dyn Sink = if as_json {
        lines = JsonLines(out);
        &mut lines
    } else {
        table = Table(out);
        &mut table
    };
    let mut f = match File::open(file) {
        Ok(f) => f,
        Err(e) => {
            sink.problem(file, None, &format!("cannot open: {e}"));
            return EXIT_PROBLEMS;
        }
    };
    let mut decoder = Decoder::new(DecoderConfig { max_record_body });
    let mut verifier = EpochVerifier::default();
    let mut scratch = Vec::new();
    let mut buf = vec![0u8; 256 << 10];
    let (mut records, mut checkpoints) = (0u64, 0u64);
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                sink.problem(file, Some(decoder.position()), &format!("read failed: {e}"));
                return EXIT_PROBLEMS;
            }
        };
        let mut input = &buf[..n];
        loop {
            let frame = match decoder.decode_frame(&mut input) {
                Ok(Some(Item::Header(h))) => {
                    let len = h.encoded_len() as u64;
                    sink.header(h, len);
                    continue;
                }
                Ok(Some(Item::Record(frame))) => frame,
                Ok(None) => break,
                Err(e) => {
                    sink.problem(file, Some(e.offset), &e.kind.to_string());
                    return EXIT_PROBLEMS;
                }
            };
            records += 1;
            sink.record(&frame, summarize(&frame.record));
            if let RecordRef::PageData(p) = frame.record {
                if let Err(e) = p.validate(&mut scratch) {
                    let e = frame.error(DecodeErrorKind::Pages(e));
                    sink.problem(file, Some(e.offset), &e.kind.to_string());
                    return EXIT_PROBLEMS;
                }
            }
            match verifier.observe(&frame.record, frame.crc) {
                Ok(Some(_)) => checkpoints += 1,
                Ok(None) => {}
                Err(e) => {
                    sink.problem(file, Some(frame.offset), &e.to_string());
                    return EXIT_PROBLEMS;
                }
            }
        }
    }
    if let Err(e) = decoder.finish() {
        sink.problem(file, Some(e.offset), &e.kind.to_string());
        return EXIT_PROBLEMS;
    }
    let open = verifier.open_epochs();
    if !open.is_empty() {
        sink.warning(
            file,
            &format!("records of epoch(s) {open:?} without CHECKPOINT_END: a backup discards them"),
        );
    }
    sink.done(file, records, decoder.position(), checkpoints);
    EXIT_OK
}
