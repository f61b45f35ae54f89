//! The shared vocabulary every thread speaks: events and answers, commands,
//! the wall clock, and WebSocket frames. No threads live here, and nothing here
//! depends on the rooms that do (shards, sequencer, fleet, services).

pub mod clock;
pub mod command;
pub mod event;
pub mod frame;
