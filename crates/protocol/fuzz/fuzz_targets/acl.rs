//! ACL files: arbitrary text parsed as an ACL file; a parse error names a real line, and a
//! file that parses answers every check for a few fixed principals, topics and filters
//! consistently and without panicking (see `bulwark_protocol::fuzzing::check_acl`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    bulwark_protocol::fuzzing::check_acl(data);
});
