//! Admission control at the QUIC endpoint: what the accept loop ([`crate::link::Link::run`]) does
//! with each incoming connection before any TLS work is spent on it, and how many enrollment
//! connections may be open at once. It keeps a restarted control plane from being buried by
//! 10 000 agents reconnecting at once: work is refused early and cheaply, and the agents' jittered
//! exponential back-off (`gaffer_agent::link::reconnect_delay`, 0.5 s growing to 30 s) spreads
//! their next attempts.
//!
//! In order, for every incoming connection:
//! 1. **Address validation** (`serve --quic-retry on|off`, default on; skipped for a connection
//!    step 2 would refuse anyway): a client whose address
//!    is not validated yet is sent a QUIC Retry (a stateless token round trip, RFC 9000 §8.1); it
//!    comes back with the token, which proves it receives packets at that address, before the
//!    endpoint keeps any state or does any cryptography for it. Costs one round trip per
//!    connection; protects against spoofed-source floods and amplification.
//! 2. **Handshakes in progress** (`serve --quic-handshakes-max`, default
//!    [`HANDSHAKES_MAX_DEFAULT`]): beyond the cap the connection is refused (QUIC
//!    `CONNECTION_REFUSED`, no TLS work); the agent counts it as a failed attempt and backs off.
//!    A handshake counts from being accepted until it completes or fails.
//! 3. After the handshake, an **enrollment** connection (ALPN `gaffer-enroll/1`) takes one of
//!    `serve --enroll-connections-max` (default [`ENROLL_CONNECTIONS_MAX_DEFAULT`]) places until
//!    its one exchange ends; without a free place it is closed at once with
//!    [`close_code::BUSY`] and the reason [`BUSY_REASON`], which `gaffer-agent enroll` prints
//!    ("control plane busy, retry"). Enrollment is the expensive path with no client certificate,
//!    so it is the one a stranger can open.
//!
//! Every decision is counted ([`crate::metrics::Metrics`]): `gaffer_quic_handshakes_in_progress`,
//! `gaffer_enroll_connections_open`, `gaffer_quic_retries_sent_total` and
//! `gaffer_admission_refused_total{reason="handshakes"|"enroll_connections"}`.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::Metrics;

/// Default cap on QUIC handshakes in progress at once (256).
pub const HANDSHAKES_MAX_DEFAULT: usize = 256;
/// Default cap on open enrollment connections (32).
pub const ENROLL_CONNECTIONS_MAX_DEFAULT: usize = 32;
/// Incoming connections quinn holds before the accept loop has seen them (its `max_incoming`);
/// beyond it new ones are dropped unanswered and the client retransmits. The accept loop answers
/// each at once (retry, refuse or accept), so this only bounds a burst.
pub const INCOMING_MAX: usize = 4096;
/// The reason an enrollment connection over the cap is closed with; `gaffer-agent enroll` shows it.
pub const BUSY_REASON: &str = "control plane busy, retry";

/// QUIC application close codes of admission control (they continue [`crate::link::close_code`]).
pub mod close_code {
    /// Too many enrollment connections are open: retry later.
    pub const BUSY: u32 = 8;
}

/// Admission settings of the QUIC endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionConfig {
    /// Send a QUIC Retry to clients whose address is not validated. Default true.
    pub quic_retry: bool,
    /// Most QUIC handshakes in progress at once; more are refused. Default
    /// [`HANDSHAKES_MAX_DEFAULT`] (256).
    pub handshakes_max: usize,
    /// Most enrollment connections open at once; more are closed with [`close_code::BUSY`].
    /// Default [`ENROLL_CONNECTIONS_MAX_DEFAULT`] (32).
    pub enroll_connections_max: usize,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            quic_retry: true,
            handshakes_max: HANDSHAKES_MAX_DEFAULT,
            enroll_connections_max: ENROLL_CONNECTIONS_MAX_DEFAULT,
        }
    }
}

/// What to do with an incoming connection ([`Admission::admit`]).
pub enum Admit {
    /// Answer with a QUIC Retry (`Incoming::retry`) and forget it; call
    /// [`Admission::retry_sent`] once it is sent.
    Retry,
    /// Refuse it (`Incoming::refuse`): too many handshakes are in progress. Already counted.
    Refuse,
    /// Accept it; hold the permit until the handshake has completed or failed.
    Accept(HandshakePermit),
}

/// One handshake in progress; dropping it ends it.
pub struct HandshakePermit {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Drop for HandshakePermit {
    fn drop(&mut self) {
        self.metrics.handshake_ended();
    }
}

/// One open enrollment connection; dropping it closes its place.
pub struct EnrollPermit {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Drop for EnrollPermit {
    fn drop(&mut self) {
        self.metrics.enroll_connection_ended();
    }
}

/// The endpoint's admission state: the two caps and the retry switch. One per endpoint.
pub struct Admission {
    cfg: AdmissionConfig,
    handshakes: Arc<Semaphore>,
    enrollments: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl Admission {
    /// Admission with `cfg`, counting into `metrics`. A cap of 0 is taken as 1 (a cap of zero
    /// would refuse everything).
    pub fn new(cfg: AdmissionConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            cfg,
            handshakes: Arc::new(Semaphore::new(cfg.handshakes_max.max(1))),
            enrollments: Arc::new(Semaphore::new(cfg.enroll_connections_max.max(1))),
            metrics,
        }
    }

    /// The settings in force.
    pub fn config(&self) -> AdmissionConfig {
        self.cfg
    }

    /// The decision for an incoming connection whose address is (`address_validated`: it came
    /// back with a Retry token) or is not validated. While every handshake place is taken it is
    /// refused at once, Retry or not: a Retry round trip for a connection that would be refused
    /// anyway doubles the packets of a reconnect storm (a refusal is smaller than the client's
    /// Initial, so refusing an unvalidated address amplifies nothing).
    pub fn admit(&self, address_validated: bool) -> Admit {
        if self.cfg.quic_retry && !address_validated {
            if self.handshakes.available_permits() == 0 {
                self.metrics.admission_refused("handshakes");
                return Admit::Refuse;
            }
            return Admit::Retry;
        }
        self.handshake()
    }

    /// A place for one more handshake, refusing (and counting) when the cap is reached; for a
    /// connection that must not be sent a Retry.
    pub fn handshake(&self) -> Admit {
        match self.handshakes.clone().try_acquire_owned() {
            Ok(permit) => {
                self.metrics.handshake_started();
                Admit::Accept(HandshakePermit { _permit: permit, metrics: self.metrics.clone() })
            }
            Err(_) => {
                self.metrics.admission_refused("handshakes");
                Admit::Refuse
            }
        }
    }

    /// A Retry was sent.
    pub fn retry_sent(&self) {
        self.metrics.quic_retry_sent();
    }

    /// A place for one enrollment connection, or None (counted) when all are taken: close the
    /// connection with [`close_code::BUSY`] and [`BUSY_REASON`].
    pub fn enroll_connection(&self) -> Option<EnrollPermit> {
        match self.enrollments.clone().try_acquire_owned() {
            Ok(permit) => {
                self.metrics.enroll_connection_started();
                Some(EnrollPermit { _permit: permit, metrics: self.metrics.clone() })
            }
            Err(_) => {
                self.metrics.admission_refused("enroll_connections");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, name: &str) -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
    }

    #[test]
    fn unvalidated_addresses_get_a_retry_and_caps_refuse_beyond_them() {
        let metrics = Arc::new(Metrics::new());
        let cfg = AdmissionConfig { quic_retry: true, handshakes_max: 2, enroll_connections_max: 1 };
        let a = Admission::new(cfg, metrics.clone());
        assert!(matches!(a.admit(false), Admit::Retry));
        let one = a.admit(true);
        let two = a.admit(true);
        assert!(matches!((&one, &two), (Admit::Accept(_), Admit::Accept(_))));
        assert!(matches!(a.admit(true), Admit::Refuse), "a third handshake over the cap of 2");
        assert!(matches!(a.admit(false), Admit::Refuse), "no Retry while every place is taken");
        let store = crate::store::mem_store::MemStore::new();
        let text = metrics.encode(&store);
        assert_eq!(sample(&text, "gaffer_quic_handshakes_in_progress "), Some(2.0), "{text}");
        assert_eq!(sample(&text, "gaffer_admission_refused_total{reason=\"handshakes\"} "), Some(2.0), "{text}");
        drop(one);
        assert!(matches!(a.admit(true), Admit::Accept(_)), "a finished handshake frees its place");
        let text = metrics.encode(&store);
        assert_eq!(sample(&text, "gaffer_quic_handshakes_in_progress "), Some(1.0), "{text}");

        let e = a.enroll_connection();
        assert!(e.is_some());
        assert!(a.enroll_connection().is_none(), "a second enrollment over the cap of 1");
        drop(e);
        assert!(a.enroll_connection().is_some());
        let text = metrics.encode(&store);
        assert_eq!(sample(&text, "gaffer_admission_refused_total{reason=\"enroll_connections\"} "), Some(1.0));
        assert_eq!(sample(&text, "gaffer_enroll_connections_open "), Some(0.0), "{text}");

        let off = Admission::new(AdmissionConfig { quic_retry: false, ..cfg }, metrics);
        assert!(matches!(off.admit(false), Admit::Accept(_)), "without Retry an unvalidated address is accepted");
    }
}
