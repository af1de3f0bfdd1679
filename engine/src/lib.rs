//! The checkpoint engine.
