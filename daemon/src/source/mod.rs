//! Sources: what a snapshot is made from.

pub mod postgres;
pub mod volume;
