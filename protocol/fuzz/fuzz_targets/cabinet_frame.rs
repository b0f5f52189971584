//! Arbitrary bytes into the cabinet frame decoder; the checks are in `oracles.rs`.

#![no_main]

#[path = "../oracles.rs"]
mod oracles;

libfuzzer_sys::fuzz_target!(|data: &[u8]| oracles::cabinet_stream(data));
