//! Offline audit bundles: one self-contained JSON document per job, checkable
//! and replayable with no database.
//!
//! A bundle holds the plan, every event exactly as stored (payload text
//! included, so digests can be recomputed), the head and the evidence. It is
//! written in one canonical form, and [`verify_bundle`] requires that form
//! byte for byte: any edited byte — in an event, the evidence, the head, or
//! the whitespace between them — makes verification fail.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::chain::{Digest, HeadKey};
use crate::events::{Event, EventRecord};
use crate::model::JobStep;
use crate::projection::{Projector, ReplayError, execution_result_to_evidence};
use crate::result::ExecutionResult;
use crate::store::{EventStore, StoreError};
use crate::verify::{VerifyOptions, verify_job};

/// The `format` of every bundle.
pub const BUNDLE_FORMAT: &str = "job-executor/audit-bundle";
/// The bundle format version this build writes and reads.
pub const BUNDLE_FORMAT_VERSION: u32 = 1;

/// The plan a bundle's job ran, as recorded in its `JobStarted`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundlePlan {
    /// The contract.
    pub contract_id: Uuid,
    /// The steps.
    pub steps: Vec<JobStep>,
}

/// One event as stored, with its digest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleEvent {
    /// Seq in the job's log.
    pub seq: u64,
    /// Event kind.
    pub kind: String,
    /// Payload schema version.
    pub schema_version: u32,
    /// Recorded time, as stored.
    pub recorded_at: String,
    /// The payload as stored: JSON text, byte for byte.
    pub payload: String,
    /// `sha256:<hex>` chain digest.
    pub digest: String,
    /// `hmac-sha256:<hex>`, when the event was written with a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// A self-contained audit record of one job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditBundle {
    /// Always [`BUNDLE_FORMAT`].
    pub format: String,
    /// The format version, [`BUNDLE_FORMAT_VERSION`].
    pub format_version: u32,
    /// The job.
    pub job_id: Uuid,
    /// The plan, as recorded in `JobStarted`.
    pub plan: BundlePlan,
    /// Every event of the job, in seq order.
    pub events: Vec<BundleEvent>,
    /// `sha256:<hex>` digest of the last event.
    pub head: String,
    /// `hmac-sha256:<hex>` of the head, when written with a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_mac: Option<String>,
    /// The evidence, as `run` printed it.
    pub evidence: Value,
}

/// Why a bundle cannot be made or does not verify.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// The log has no events for the job.
    #[error("unknown job {job_id}: the log has no events for it")]
    UnknownJob {
        /// The job.
        job_id: Uuid,
    },
    /// The stored log does not verify, so no bundle is made from it.
    #[error("job {job_id}'s log does not verify, no bundle written: {}", problems.join("; "))]
    LogDoesNotVerify {
        /// The job.
        job_id: Uuid,
        /// What `verify` found.
        problems: Vec<String>,
    },
    /// The file is not a bundle at all.
    #[error("not an audit bundle: {0}")]
    Malformed(String),
    /// The bundle was changed after it was exported.
    #[error("bundle does not verify: {}", problems.join("; "))]
    Broken {
        /// Each thing that broke.
        problems: Vec<String>,
    },
    /// The log could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The log could not be projected.
    #[error(transparent)]
    Replay(#[from] ReplayError),
}

/// The events of a verified job folded into its result.
fn project(job_id: Uuid, records: &[EventRecord]) -> Result<ExecutionResult, ReplayError> {
    let mut projector = Projector::new(job_id);
    for record in records {
        projector.apply_record(record)?;
    }
    projector
        .into_result()
        .ok_or(ReplayError::UnknownJob { job_id })
}

/// Makes the bundle of a stored job, after checking its log.
///
/// # Errors
/// [`BundleError::UnknownJob`]; [`BundleError::LogDoesNotVerify`] when the
/// chain, a MAC (given `key`) or an invariant is broken; store failures.
pub fn export(
    store: &dyn EventStore,
    job_id: Uuid,
    key: Option<&HeadKey>,
) -> Result<AuditBundle, BundleError> {
    let records = store.load_job(job_id)?;
    if records.is_empty() {
        return Err(BundleError::UnknownJob { job_id });
    }
    let options = VerifyOptions {
        key: key.cloned(),
        ..VerifyOptions::default()
    };
    let report = verify_job(job_id, &records, &options);
    if !report.is_ok() {
        return Err(BundleError::LogDoesNotVerify {
            job_id,
            problems: report.violations.iter().map(ToString::to_string).collect(),
        });
    }
    let result = project(job_id, &records)?;
    let plan = match records[0].decode().map(|r| r.event) {
        Ok(Event::JobStarted(started)) => BundlePlan {
            contract_id: started.contract_id,
            steps: started.plan,
        },
        // verify_job has just accepted the log, which begins with JobStarted.
        _ => unreachable!("a verified log begins with JobStarted"),
    };
    // Events from before the chain existed carry no stored digest; the
    // bundle carries the digests computed for them.
    let mut head = Digest::GENESIS;
    let events = records
        .iter()
        .map(|record| {
            head = crate::chain::chain(&head, record);
            BundleEvent {
                seq: record.seq,
                kind: record.kind.clone(),
                schema_version: record.schema_version,
                recorded_at: record.recorded_at.clone(),
                payload: record.payload.clone(),
                digest: head.to_string(),
                mac: record.mac.as_ref().map(|mac| format!("hmac-sha256:{mac}")),
            }
        })
        .collect();
    Ok(AuditBundle {
        format: BUNDLE_FORMAT.to_owned(),
        format_version: BUNDLE_FORMAT_VERSION,
        job_id,
        plan,
        events,
        head: result.head.to_string(),
        head_mac: result.head_mac.map(|mac| mac.to_string()),
        evidence: execution_result_to_evidence(&result),
    })
}

impl AuditBundle {
    /// Parses a bundle file, checking its format but not what it holds
    /// ([`verify_bundle`] does).
    ///
    /// # Errors
    /// [`BundleError::Malformed`] for a file that is not a bundle.
    pub fn from_bytes(bytes: &[u8]) -> Result<AuditBundle, BundleError> {
        parse(bytes)
    }

    /// The bundle's events in their stored form, as the log held them; a
    /// digest or MAC not in its written form is kept, to fail verification.
    pub fn event_records(&self) -> Vec<EventRecord> {
        self.records(&mut Vec::new())
    }

    /// The canonical bytes of the bundle: pretty JSON and a final newline.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes =
            serde_json::to_vec_pretty(self).expect("a bundle of plain data always serialises");
        bytes.push(b'\n');
        bytes
    }
}

/// Checks a bundle offline and returns the result its events replay to.
///
/// It checks, and reports every failure of: the format; each event's digest
/// against the chain recomputed from its bytes; each MAC under `key`; the
/// invariants; the head and its MAC; the plan against `JobStarted`; the
/// evidence against the one the events replay to; and that the file is
/// byte for byte the canonical form.
///
/// # Errors
/// [`BundleError::Malformed`] for a file that is not a bundle;
/// [`BundleError::Broken`] listing what was changed.
pub fn verify_bundle(bytes: &[u8], key: Option<&HeadKey>) -> Result<ExecutionResult, BundleError> {
    let bundle = parse(bytes)?;
    let mut problems = Vec::new();
    let records = bundle.records(&mut problems);
    let options = VerifyOptions::default().with_key(key.cloned());
    let report = verify_job(bundle.job_id, &records, &options);
    problems.extend(report.violations.iter().map(ToString::to_string));
    bundle.check_head(&mut problems);
    let result = if problems.is_empty() {
        project(bundle.job_id, &records)
            .map_err(|e| problems.push(e.to_string()))
            .ok()
    } else {
        None
    };
    if let Some(result) = &result {
        bundle.check_against(&records, result, &mut problems);
    }
    if problems.is_empty() && bundle.to_bytes() != bytes {
        problems.push(
            "the file is not byte for byte the bundle as exported (whitespace, key order or escaping changed)"
                .to_owned(),
        );
    }
    match result {
        Some(result) if problems.is_empty() => Ok(result),
        _ => Err(BundleError::Broken { problems }),
    }
}

/// Reads a bundle of this format and version.
fn parse(bytes: &[u8]) -> Result<AuditBundle, BundleError> {
    let bundle: AuditBundle =
        serde_json::from_slice(bytes).map_err(|e| BundleError::Malformed(e.to_string()))?;
    if bundle.format != BUNDLE_FORMAT || bundle.format_version != BUNDLE_FORMAT_VERSION {
        return Err(BundleError::Malformed(format!(
            "format {:?} version {}, expected {BUNDLE_FORMAT:?} version {BUNDLE_FORMAT_VERSION}",
            bundle.format, bundle.format_version
        )));
    }
    Ok(bundle)
}

impl AuditBundle {
    /// The bundle's events as stored records, noting any digest or MAC not
    /// in its written form.
    fn records(&self, problems: &mut Vec<String>) -> Vec<EventRecord> {
        self.events
            .iter()
            .enumerate()
            .map(|(index, event)| {
                let digest = event.digest.strip_prefix("sha256:");
                let mac = event.mac.as_deref().map(|m| m.strip_prefix("hmac-sha256:"));
                if digest.is_none() || mac == Some(None) {
                    problems.push(format!(
                        "event {index}: digest or MAC is not in its written form"
                    ));
                }
                EventRecord {
                    position: index as u64 + 1,
                    job_id: self.job_id,
                    seq: event.seq,
                    kind: event.kind.clone(),
                    schema_version: event.schema_version,
                    recorded_at: event.recorded_at.clone(),
                    payload: event.payload.clone(),
                    digest: Some(digest.unwrap_or(&event.digest).to_owned()),
                    mac: mac.map(|m| m.unwrap_or_default().to_owned()),
                }
            })
            .collect()
    }

    /// The head and its MAC are the last event's.
    fn check_head(&self, problems: &mut Vec<String>) {
        let Some(last) = self.events.last() else {
            problems.push("the bundle has no events".to_owned());
            return;
        };
        if last.digest != self.head {
            problems.push(format!(
                "head {} is not the digest of the last event",
                self.head
            ));
        }
        if last.mac != self.head_mac {
            problems.push("head_mac is not the MAC of the last event".to_owned());
        }
    }

    /// The plan is the one `JobStarted` recorded, and the evidence the one
    /// the events replay to.
    fn check_against(
        &self,
        records: &[EventRecord],
        result: &ExecutionResult,
        problems: &mut Vec<String>,
    ) {
        if let Some(Ok(Event::JobStarted(started))) =
            records.first().map(|r| r.decode().map(|r| r.event))
            && (started.contract_id != self.plan.contract_id || started.plan != self.plan.steps)
        {
            problems.push("plan does not match the one recorded in JobStarted".to_owned());
        }
        let evidence = execution_result_to_evidence(result);
        if evidence != self.evidence {
            let differing = differing_keys(&evidence, &self.evidence);
            problems.push(format!(
                "evidence does not match what the events replay to (differs at: {})",
                differing.join(", ")
            ));
        }
    }
}

/// Top-level keys whose values differ between two JSON objects.
fn differing_keys(a: &Value, b: &Value) -> Vec<String> {
    match (a.as_object(), b.as_object()) {
        (Some(a), Some(b)) => {
            let mut keys: Vec<String> = a
                .keys()
                .chain(b.keys())
                .filter(|k| a.get(*k) != b.get(*k))
                .cloned()
                .collect();
            keys.sort();
            keys.dedup();
            keys
        }
        _ => vec!["(not an object)".to_owned()],
    }
}
