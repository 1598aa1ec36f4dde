//! The end-to-end tests, as one binary (one link of the library instead of one per file): the
//! real `veza-dr` binary against real PostgreSQL, S3 servers (moto, Garage) and plugins.

#[allow(dead_code)]
mod common;

mod campaign;
mod daemon;
mod deploy;
mod drill;
mod faults;
mod locks;
mod operator;
mod pages;
mod policies;
mod postgres;
mod region;
mod runbook;
mod safety;
mod security;
mod shape;
mod steps;
mod volume;
