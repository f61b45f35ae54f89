//! What the frame targets share: one check, run on either subprotocol.

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
