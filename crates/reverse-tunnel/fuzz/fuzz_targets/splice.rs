//! Bytes from an operator's WebSocket through the relay's data path (`splice`): the first
//! byte sets the piece size, the rest is sent in such pieces and all at once. No panic, the
//! session ends, the device gets only valid WebSocket and never more than was sent, and a
//! cut changes at most how much is forwarded before the session ends (see
//! `bulwark_tunnel::fuzzing::check_splice`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = bulwark_tunnel::fuzzing::check_splice(data);
});
