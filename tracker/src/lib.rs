//! Dirty-page tracking for guest RAM.
