//! A client frame in the JSON subprotocol (see `switchboard_fuzz::frame_round_trip`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    switchboard_fuzz::frame_round_trip(protocol::Subprotocol::Json, data)
});
