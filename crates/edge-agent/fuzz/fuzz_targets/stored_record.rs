//! Bytes from the queue's store (a damaged disk can hold anything): decode a stored record;
//! every record that decodes must encode and decode back to itself (see
//! `bulwark_agent::fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = bulwark_agent::fuzzing::check_stored_record(data);
});
