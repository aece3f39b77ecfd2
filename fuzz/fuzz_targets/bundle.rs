//! Any bytes as an audit bundle: verified or refused, never a panic.
#![no_main]

use job_executor::bundle::verify_bundle;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = verify_bundle(data, None);
});
