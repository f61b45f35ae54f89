//! A config file: loading and validating never panic, and a config that validates
//! survives a round trip through TOML.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(cfg) = toml::from_str::<gateway::config::Config>(text) else { return };
    if cfg.validate().is_ok() {
        let back: gateway::config::Config =
            toml::from_str(&toml::to_string(&cfg).expect("a config serialises")).expect("and parses back");
        back.validate().expect("and still validates");
    }
});
