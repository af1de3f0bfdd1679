//! The remus replication stream format.
//!
//! Everything the primary sends the backup (checkpoints, disk writes, configuration) and
//! everything the backup answers (acknowledgements) is a sequence of checksummed records.
//! The normative specification is `docs/stream-format.md`; this crate is its implementation.
