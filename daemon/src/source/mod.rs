//! Sources: what a snapshot is made from.

pub mod volume;
