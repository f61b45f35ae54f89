//! What each fuzz target checks, in one place: the libFuzzer targets
//! (`fuzz_targets/`) call these, and the gateway's test suite replays the
//! committed corpus through the same functions on every CI run
//! (`gateway/tests/fuzz_corpus.rs` includes this file).

use protocol::Subprotocol;

/// Decoding never panics; a refused frame still yields its error code and request
/// id; a frame that decodes re-encodes to the same frame.
pub fn frame_round_trip(p: Subprotocol, data: &[u8]) {
    match p.decode_client(data) {
        Ok(frame) => {
            let again = p.decode_client(&p.encode_client(&frame)).expect("a decoded frame re-encodes");
            assert_eq!(again, frame);
        }
        Err(e) => {
            let _ = e.code();
            let _ = p.request_id(data);
        }
    }
}

/// An HTTP/1.1 request head: parsing never panics, and a head it accepts lies
/// within the bytes given and buffers a body no larger than the server takes (a
/// blob upload's body is streamed, never buffered).
pub fn http_head(data: &[u8]) {
    if let Ok(Some(h)) = gateway::shard::http1::parse_head(data) {
        assert!(h.head_len <= data.len());
        assert!(h.body_len <= 16 * 1024);
        if gateway::shard::http1::streamed(&h.request.method, &h.request.path) {
            assert_eq!(h.body_len, 0);
        }
        assert!(h.request.headers.len() <= 100);
    }
}

/// A config file: loading and validating never panic, and a config that
/// validates survives a round trip through TOML.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(cfg) = toml::from_str::<gateway::config::Config>(text) else { return };
    if cfg.validate().is_ok() {
        let back: gateway::config::Config =
            toml::from_str(&toml::to_string(&cfg).expect("a config serialises")).expect("and parses back");
        back.validate().expect("and still validates");
    }
}
