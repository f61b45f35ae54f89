//! The fuzz targets' committed corpus (`fuzz/corpus/<target>/`), replayed through
//! the targets' own checks (`fuzz/src/lib.rs`, included here). libFuzzer runs
//! are `scripts/fuzz`; this keeps every seed and every fixed finding a
//! regression test on each run of the suite.

#[allow(dead_code)]
#[path = "../../fuzz/src/lib.rs"]
mod checks;

use std::path::Path;

/// Runs `check` over every file of one target's corpus, and names the file
/// that fails.
fn replay(target: &str, check: impl Fn(&[u8]) + std::panic::RefUnwindSafe) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a corpus entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} has seeds", dir.display());
    for file in files {
        let data = std::fs::read(&file).expect("a corpus file reads");
        if std::panic::catch_unwind(|| check(&data)).is_err() {
            panic!("{target}: {} fails its check", file.display());
        }
    }
}

#[test]
fn json_frames_in_the_corpus_decode_or_refuse_cleanly_and_round_trip() {
    replay("frame_json", |d| checks::frame_round_trip(protocol::Subprotocol::Json, d));
}

#[test]
fn flatbuffers_frames_in_the_corpus_decode_or_refuse_cleanly_and_round_trip() {
    replay("frame_fb", |d| checks::frame_round_trip(protocol::Subprotocol::FlatBuffers, d));
}

#[test]
fn http_heads_in_the_corpus_parse_within_their_bounds() {
    replay("http_head", checks::http_head);
}

#[test]
fn configs_in_the_corpus_load_and_round_trip() {
    replay("config", checks::config);
}
