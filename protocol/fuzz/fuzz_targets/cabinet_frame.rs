//! Arbitrary bytes into the cabinet frame decoder; the checks are in `oracles.rs`.

#![no_main]

#[path = "../oracles.rs"]
#[allow(dead_code)]
mod oracles;

libfuzzer_sys::fuzz_target!(|data: &[u8]| oracles::cabinet_stream(data));
