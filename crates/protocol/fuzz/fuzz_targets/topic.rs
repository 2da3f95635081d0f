//! Topic strings (one per line): name and filter validation against the rules of §4.7, and
//! `TopicFilter::matches` against `SubscriptionTrie` (see `bulwark_protocol::fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    bulwark_protocol::fuzzing::check_topics(data);
});
