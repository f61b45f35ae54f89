//! Outbound WebSocket frames, encoded once and shared.
//!
//! Server frames are never masked (RFC 6455 §5.1), so one encoded frame can be
//! written to every recipient's socket as it is.

use bytes::Bytes;
use protocol::{CloseCode, ServerFrame, Subprotocol};
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};

fn frame(opcode: OpCode, payload: &[u8]) -> Bytes {
    let header = FrameHeader { opcode, ..FrameHeader::default() };
    let mut out = Vec::with_capacity(header.len(payload.len() as u64) + payload.len());
    header.format(payload.len() as u64, &mut out).expect("writing to a Vec cannot fail");
    out.extend_from_slice(payload);
    Bytes::from(out)
}

/// A complete data frame: text for JSON, binary for FlatBuffers.
pub fn ws_frame(proto: Subprotocol, payload: &[u8]) -> Bytes {
    let op = if proto.is_text() { Data::Text } else { Data::Binary };
    frame(OpCode::Data(op), payload)
}

/// Encodes a server message for one connection.
pub fn server_frame(proto: Subprotocol, f: &ServerFrame) -> Bytes {
    ws_frame(proto, &proto.encode_server(f))
}

/// A close frame with our code and reason.
pub fn close_frame(code: CloseCode) -> Bytes {
    let reason = code.reason().as_bytes();
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.code().to_be_bytes());
    payload.extend_from_slice(reason);
    frame(OpCode::Control(Control::Close), &payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_encodings() {
        for (len, header) in [(0usize, 2usize), (125, 2), (126, 4), (65535, 4), (65536, 10)] {
            let f = ws_frame(Subprotocol::FlatBuffers, &vec![7u8; len]);
            assert_eq!(f.len(), header + len, "payload {len}");
            assert_eq!(f[0], 0x82, "FIN + binary");
        }
        assert_eq!(ws_frame(Subprotocol::Json, b"{}")[0], 0x81, "FIN + text");
        let c = close_frame(CloseCode::SlowConsumer);
        assert_eq!(c[0], 0x88);
        assert_eq!(u16::from_be_bytes([c[2], c[3]]), 4008);
    }
}
