//! A client frame in the FlatBuffers subprotocol, verified before it is read (see `switchboard_fuzz::frame_round_trip`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    switchboard_fuzz::frame_round_trip(protocol::Subprotocol::FlatBuffers, data)
});
