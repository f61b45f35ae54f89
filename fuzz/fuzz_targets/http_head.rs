//! An HTTP/1.1 request head (see `switchboard_fuzz::http_head`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| switchboard_fuzz::http_head(data));
