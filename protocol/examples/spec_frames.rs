//! Prints every example frame of SPEC.md (section 1.11) as hex, so a vendor can compare them
//! with their own encoder: `cargo run -p protocol --example spec_frames`.
//! `tests/vectors.rs` checks the same frames against the hex written in SPEC.md.

#![allow(clippy::print_stdout)]

#[path = "../tests/support/spec_examples.rs"]
mod spec_examples;

use bytes::BytesMut;
use protocol::cabinet;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for (name, frame) in spec_examples::frames()? {
        let mut buf = BytesMut::new();
        cabinet::encode(&frame, &mut buf)?;
        let hex: Vec<String> = buf.iter().map(|b| format!("{b:02X}")).collect();
        println!("{name}: {}", hex.join(" "));
    }
    Ok(())
}
