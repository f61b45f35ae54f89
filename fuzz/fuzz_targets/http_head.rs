//! An HTTP/1.1 request head: parsing never panics, and a head it accepts lies within
//! the bytes given and buffers a body no larger than the server takes (a blob
//! upload's body is streamed, never buffered).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(h)) = gateway::shard::http1::parse_head(data) {
        assert!(h.head_len <= data.len());
        assert!(h.body_len <= 16 * 1024);
        if gateway::shard::http1::streamed(&h.request.method, &h.request.path) {
            assert_eq!(h.body_len, 0);
        }
        assert!(h.request.headers.len() <= 100);
    }
});
