//! libFuzzer target: veza_dr::fuzz::index must never panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| veza_dr::fuzz::index(data));
