//! Bytes through the relay: chunks of yamux (or anything) in both directions, fed to the
//! relay's `FrameFilter` with a limit of 4 streams; no panic, never more than 4 streams
//! open, the same result whatever the chunking (see `bulwark_tunnel::fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = bulwark_tunnel::fuzzing::check_frames(data);
});
