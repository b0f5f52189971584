//! Replays the committed fuzz corpora and seeds through the fuzz targets' own checks, so an
//! input that once found new coverage keeps being tested by every run (and a crash input added
//! to `fuzz/regressions/` becomes a regression test).

#[path = "../fuzz/oracles.rs"]
#[allow(dead_code, unreachable_pub)]
mod oracles;

use std::path::Path;

fn replay(dirs: &[&str], check: fn(&[u8])) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut n = 0;
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else { continue };
        for entry in entries {
            let path = entry.expect("readable dir").path();
            let data = std::fs::read(&path).expect("readable file");
            check(&data);
            n += 1;
        }
    }
    n
}

#[test]
fn cabinet_corpus_replays() {
    let n =
        replay(&["seeds/cabinet_frame", "corpus/cabinet_frame", "regressions/cabinet_frame"], oracles::cabinet_stream);
    assert!(n >= 11, "expected the committed corpus, found {n} inputs");
}

#[test]
fn mqtt_corpus_replays() {
    let n = replay(&["seeds/mqtt_packet", "corpus/mqtt_packet", "regressions/mqtt_packet"], oracles::mqtt_stream);
    assert!(n >= 4, "expected the committed corpus, found {n} inputs");
}
