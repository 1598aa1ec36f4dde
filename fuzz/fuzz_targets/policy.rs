//! libFuzzer target: veza_dr::fuzz::policy must never panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| veza_dr::fuzz::policy(data));
