//! Any stored event — kind, schema version, time, payload, seq — decoded,
//! printed and verified as a job's log of one or two events.
#![no_main]

use job_executor::events::EventRecord;
use job_executor::verify::{VerifyOptions, verify_job};
use libfuzzer_sys::fuzz_target;
use uuid::Uuid;

fuzz_target!(|input: (String, u32, String, String, u64, Option<String>)| {
    let (kind, schema_version, recorded_at, payload, seq, digest) = input;
    let record = EventRecord {
        position: 1,
        job_id: Uuid::nil(),
        seq,
        kind,
        schema_version,
        recorded_at,
        payload,
        digest,
        mac: None,
    };
    let _ = record.decode();
    let _ = record.to_json_line();
    let mut next = record.clone();
    next.seq = record.seq.wrapping_add(1);
    let _ = verify_job(Uuid::nil(), &[record, next], &VerifyOptions::default());
});
