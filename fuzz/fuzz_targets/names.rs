//! libFuzzer target: veza_dr::fuzz::names must never panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| veza_dr::fuzz::names(data));
