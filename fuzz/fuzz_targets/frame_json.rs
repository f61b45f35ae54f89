//! A client frame in the JSON subprotocol: decoding never panics, an error's request
//! id is readable whenever decoding fails, and what decodes re-encodes to the same frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::Subprotocol;

fuzz_target!(|data: &[u8]| {
    let p = Subprotocol::Json;
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
});
