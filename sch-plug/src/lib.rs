//! Network egress buffering for output commit.
