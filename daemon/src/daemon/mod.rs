//! The daemon: the scheduler loop, job history, and the HTTP endpoints.

pub mod scheduler;
