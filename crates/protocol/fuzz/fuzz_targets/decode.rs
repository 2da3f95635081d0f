//! Bytes from the network: decode packet after packet with a small size limit; every packet
//! that decodes must encode and decode back to itself (see `bulwark_protocol::fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    bulwark_protocol::fuzzing::check_decode(data);
});
