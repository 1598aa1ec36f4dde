//! libFuzzer target: veza_dr::fuzz::blob must never panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| veza_dr::fuzz::blob(data));
