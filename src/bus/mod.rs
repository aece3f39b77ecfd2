//! The message bus: plans in from a broker, evidence out to one.
//!
//! Two loops, each written once above any broker:
//!
//! - [`intake::Intake`] takes plans from a [`intake::MessageSource`] and
//!   submits them to a [`intake::JobSink`] (the store's job queue, which
//!   `worker` drains). A message is acknowledged only once its job is
//!   durably submitted, or known to be there already with the same plan; a
//!   message that cannot become a job goes to the dead letter with its
//!   reason, and is acknowledged only once the dead letter holds it.
//! - [`publish::Publisher`] publishes the evidence of every ended job, in
//!   the order the jobs ended, to an [`publish::EvidenceSink`], and moves
//!   its cursor (an [`publish::EvidenceOutbox`]'s) only once the broker
//!   has confirmed what was sent.
//!
//! The brokers are adapters: [`amqp`] (RabbitMQ, with `lapin`) and [`nats`]
//! (NATS JetStream, with `async-nats`). Each runs its client on a small
//! tokio runtime of its own and offers blocking calls, so the engine and
//! the rest of the crate stay synchronous. Their calls must not be made
//! from inside another async runtime's task.
//!
//! *This module knows nothing of how a job runs:* it submits plans and
//! reads ended jobs' logs, nothing else.

pub mod amqp;
mod backoff;
pub mod intake;
pub mod nats;
pub mod publish;
mod runtime;

use uuid::Uuid;

pub use backoff::Backoff;

use crate::projection::ReplayError;
use crate::store::StoreError;

/// The namespace under which a plan without a `job_id` takes its job id
/// from the message id: `UUIDv5(MESSAGE_ID_NAMESPACE, message id)`, the
/// message id as its UTF-8 bytes (AMQP `message_id`, NATS `Nats-Msg-Id`).
/// Fixed for ever: changing it would let a redelivered message make a
/// second job.
pub const MESSAGE_ID_NAMESPACE: Uuid = Uuid::from_u128(0x41141d45_53c1_4795_91b2_d1adeb964d4c);

/// Header of a dead-lettered message: why it was refused.
pub const HEADER_REASON: &str = "je-reason";
/// Header of an evidence message: the job's id.
pub const HEADER_JOB_ID: &str = "je-job-id";
/// Header of an evidence message: the job's final status (`COMPLETED`, …).
pub const HEADER_FINAL_STATUS: &str = "je-final-status";
/// Header of an evidence message: the job's head (`sha256:<hex>`).
pub const HEADER_HEAD: &str = "je-head";
/// Header of a message dead-lettered on NATS: the refused message's own
/// `Nats-Msg-Id`, which the dead letter cannot reuse (the stream would
/// take it for a duplicate of the original).
pub const HEADER_MESSAGE_ID: &str = "je-message-id";

/// The job id a plan without one takes from its message's id.
pub fn job_id_from_message_id(message_id: &str) -> Uuid {
    Uuid::new_v5(&MESSAGE_ID_NAMESPACE, message_id.as_bytes())
}

/// A failure of the bus: the broker, the store behind it, or a job's log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BusError {
    /// The broker cannot be reached, or dropped the connection. What was
    /// not acknowledged comes back; the loops reconnect, backing off.
    #[error("{broker}: disconnected: {detail}")]
    Disconnected {
        /// The broker, as given (without its password).
        broker: String,
        /// What failed.
        detail: String,
    },
    /// The broker refused an operation (a queue or stream it will not
    /// declare, a permission, a message it would not take).
    #[error("{broker}: {context}: {detail}")]
    Broker {
        /// The broker, as given (without its password).
        broker: String,
        /// What the bus was doing.
        context: String,
        /// What the broker said.
        detail: String,
    },
    /// The broker took a message but would not confirm it (a negative
    /// publisher confirm, an unroutable message, a failed publish ack).
    #[error("{broker}: not confirmed: {detail}")]
    NotConfirmed {
        /// The broker, as given (without its password).
        broker: String,
        /// Why.
        detail: String,
    },
    /// The options given cannot work (a name too long for the protocol, a
    /// dead letter no stream captures, …).
    #[error("{0}")]
    Config(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An ended job's log does not replay: its evidence cannot be built.
    /// The publisher stops there rather than skip a job (`verify` tells
    /// what is wrong with the log).
    #[error("job {job_id}: its evidence cannot be built: {source}")]
    Replay {
        /// The job.
        job_id: Uuid,
        /// Why.
        #[source]
        source: ReplayError,
    },
    /// The bus's runtime could not be started.
    #[error("cannot start the message bus runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

impl BusError {
    /// The connection to `broker` was lost (or never made): `detail` says how.
    pub(crate) fn disconnected(broker: &str, detail: &str) -> BusError {
        BusError::Disconnected {
            broker: broker.to_owned(),
            detail: detail.to_owned(),
        }
    }

    /// Whether the failure is passing: the connection was lost (reconnect)
    /// or the store was busy or unreachable (wait, try again).
    pub fn is_transient(&self) -> bool {
        match self {
            BusError::Disconnected { .. } | BusError::NotConfirmed { .. } => true,
            BusError::Store(e) => e.is_transient(),
            _ => false,
        }
    }

    /// Whether the broker connection must be made again.
    pub fn needs_reconnect(&self) -> bool {
        matches!(
            self,
            BusError::Disconnected { .. } | BusError::NotConfirmed { .. }
        )
    }
}

/// `url` with any password replaced by `***`, for messages.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest
        .split_once('/')
        .map_or((rest, None), |(a, p)| (a, Some(p)));
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_owned(),
    };
    match path {
        Some(path) => format!("{scheme}://{authority}/{path}"),
        None => format!("{scheme}://{authority}"),
    }
}

/// A header value that every broker accepts: one line, at most 1,000 bytes.
pub(crate) fn header_value(text: &str) -> String {
    let mut value: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if value.len() > 1000 {
        let mut end = 1000;
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        value.truncate(end);
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_only_the_password() {
        assert_eq!(
            redact("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(redact("nats://token@host"), "nats://token@host");
        assert_eq!(redact("not a url"), "not a url");
    }

    #[test]
    fn header_values_are_one_bounded_line() {
        assert_eq!(header_value("a\nb\r\tc"), "a b  c");
        let long = "é".repeat(600);
        let value = header_value(&long);
        assert!(value.len() <= 1000 && value.chars().all(|c| c == 'é'));
    }

    #[test]
    fn message_ids_map_to_fixed_job_ids() {
        // The namespace is part of the contract: the same message id gives
        // the same job id in every build (the value below is Python's
        // uuid.uuid5 under the documented namespace).
        assert_eq!(
            job_id_from_message_id("order-1").to_string(),
            "50536c7c-d354-5f40-bc7e-eb017fd55f4a"
        );
        assert_ne!(job_id_from_message_id("a"), job_id_from_message_id("b"));
        assert_eq!(job_id_from_message_id("a").get_version_num(), 5);
    }
}
