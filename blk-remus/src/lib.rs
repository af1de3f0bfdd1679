//! Disk replication with per-epoch commit (the block-remus backend).
