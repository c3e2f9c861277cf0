//! The differential conformance test of the state machine: random records
//! driven through random transitions (payments, and the cancels of paid
//! ones), on every reachable backend, each step checked against the rules'
//! own reference semantics (`Rule::apply_if` on a copy held by the test).
//! The backends agree on whether each transition applied and on the record
//! it leaves, because they all compile the same rules; this test is what
//! shows a translator drifted.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

use paygate_core::{payment::failure_codes, MerchantId, OrderId, PaymentRecord};
use paygate_state_store::{
    cancels::apply_cancel_transition,
    testing::{fresh_state_store, state_backends},
    CancelClaim, CancelDraft, CancelRecord, CancelTransition, CreateOutcome, Transition,
};

/// A small deterministic generator (xorshift64*): the test draws the same
/// history on every backend and every run.
struct Draw(u64);

impl Draw {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// A version near `v`: the current one most of the time, else one off
    /// (a guard on a stale read).
    fn version_near(&mut self, v: i64) -> i64 {
        match self.below(4) {
            0 => v - 1,
            1 => v + 1,
            _ => v,
        }
    }

    fn maybe_version(&mut self, v: i64) -> Option<i64> {
        if self.below(3) == 0 {
            None
        } else {
            Some(self.version_near(v))
        }
    }

    fn code(&mut self) -> String {
        [
            failure_codes::NOT_SENT,
            failure_codes::CIRCUIT_OPEN,
            failure_codes::INVENTORY_UNAVAILABLE,
            "REJECT_CARD_COMPANY",
            "EXCEED_MAX_DAILY_PAYMENT_COUNT",
        ][self.below(5)]
        .to_owned()
    }

    fn transition(&mut self, r: &PaymentRecord) -> Transition {
        let error = format!("error {}", self.next() % 1000);
        match self.below(11) {
            0 => Transition::MarkPaid {
                approved_at: "2026-12-07T12:00:00+09:00".into(),
            },
            1 => Transition::MarkAborted {
                failure_code: self.code(),
                last_error: error,
                seen_version: self.maybe_version(r.version),
            },
            2 => Transition::MarkUnknown { last_error: error },
            3 => Transition::MarkSaved,
            4 => Transition::SaveFailed { last_error: error },
            5 => Transition::BatchSaveFailed { last_error: error },
            6 => Transition::Reopen {
                failure_code: r.failure_code.clone().unwrap_or_else(|| self.code()),
                seen_version: self.maybe_version(r.version),
            },
            7 => Transition::MarkSending {
                seen_version: self.version_near(r.version),
            },
            8 => Transition::CheckedUnknown {
                last_error: error,
                seen_version: self.version_near(r.version),
            },
            9 => Transition::MarkResending {
                seen_version: self.version_near(r.version),
            },
            _ => Transition::FileNotSent {
                seen_version: self.version_near(r.version),
                last_error: error,
            },
        }
    }

    fn cancel_transition(&mut self, c: &CancelRecord) -> CancelTransition {
        let error = format!("error {}", self.next() % 1000);
        match self.below(8) {
            0 => CancelTransition::MarkDone {
                canceled_at: "2026-12-07T12:01:00+09:00".into(),
            },
            1 => CancelTransition::MarkFailed {
                failure_code: self.code(),
                last_error: error,
                release_key: self.below(2) == 0,
                seen_version: self.maybe_version(c.version),
            },
            2 => CancelTransition::MarkSending {
                seen_version: self.version_near(c.version),
            },
            3 => CancelTransition::MarkUnknown { last_error: error },
            4 => CancelTransition::LookupFailed { last_error: error },
            5 => CancelTransition::MarkSaved,
            6 => CancelTransition::SaveFailed { last_error: error },
            _ => CancelTransition::BatchSaveFailed { last_error: error },
        }
    }
}

/// The record without the writer's clock (each store stamps its own now).
fn comparable(r: &PaymentRecord) -> PaymentRecord {
    let mut r = r.clone();
    r.updated_at = 0;
    r
}

fn comparable_cancel(c: &CancelRecord) -> CancelRecord {
    let mut c = c.clone();
    c.updated_at = 0;
    c
}

const RECORDS: usize = 8;
const STEPS: usize = 160;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_backend_applies_the_rules_as_the_reference_does() {
    for backend in state_backends() {
        let (store, cleanup) = fresh_state_store(&backend).await;
        let name = backend.name();
        let mut draw = Draw(0x9E37_79B9_7F4A_7C15);
        let m = MerchantId::generate();
        let mut model = Vec::new();
        for i in 0..RECORDS {
            let r = PaymentRecord::new_pending(
                m.clone(),
                OrderId::parse(&format!("diff-{i:04}")).unwrap(),
                format!("pk_diff_{i}"),
                10_000,
                "KRW".into(),
                format!("fp_{i}"),
                Some(format!("key-{i}")),
                paygate_core::time::now_ms(),
            );
            assert_eq!(
                store.create(&r).await.unwrap(),
                CreateOutcome::Created,
                "{name}"
            );
            model.push(r);
        }
        let mut cancels: Vec<CancelRecord> = Vec::new();
        let (mut applied, mut refused) = (0, 0);
        for step in 0..STEPS {
            // Mostly payments; a cancel of a paid payment now and then.
            let paid: Vec<usize> = (0..RECORDS).filter(|&i| model[i].is_paid).collect();
            if !paid.is_empty() && draw.below(4) == 0 {
                let i = paid[draw.below(paid.len())];
                let open = cancels
                    .iter()
                    .filter(|c| c.payment_id == model[i].payment_id)
                    .count();
                if open == 0 || draw.below(3) == 0 {
                    let draft = CancelDraft {
                        payment_id: model[i].payment_id.clone(),
                        merchant_id: m.clone(),
                        total_amount: model[i].amount,
                        amount: Some(1_000),
                        reason: "differential".into(),
                        idempotency_key: Some(format!("cancel-{step}")),
                        request_fingerprint: format!("cfp-{step}"),
                        now: paygate_core::time::now_ms(),
                    };
                    if let CancelClaim::Claimed(c) = store.claim_cancel(&draft).await.unwrap() {
                        cancels.push(c);
                    }
                    continue;
                }
            }
            if !cancels.is_empty() && draw.below(3) == 0 {
                let k = draw.below(cancels.len());
                let t = draw.cancel_transition(&cancels[k]);
                let want = apply_cancel_transition(&mut cancels[k], &t, 0);
                let c = &cancels[k];
                let got = store
                    .cancel_transition(&c.payment_id, c.n, &t)
                    .await
                    .unwrap();
                assert_eq!(got, want, "{name}, step {step}: {t:?} on cancel {c:?}");
                let stored = store.cancels_of(&c.payment_id).await.unwrap();
                let stored = stored
                    .iter()
                    .find(|s| s.n == c.n)
                    .expect("the cancel is stored");
                assert_eq!(
                    comparable_cancel(stored),
                    comparable_cancel(c),
                    "{name}, step {step}: {t:?}"
                );
                continue;
            }
            let i = draw.below(RECORDS);
            let t = draw.transition(&model[i]);
            let want = t.apply_if(&mut model[i], 0);
            let got = store.transition(&model[i].payment_id, &t).await.unwrap();
            assert_eq!(got, want, "{name}, step {step}: {t:?} on {:?}", model[i]);
            if want {
                applied += 1;
            } else {
                refused += 1;
            }
            let (_, stored) = store
                .get(&model[i].payment_id)
                .await
                .unwrap()
                .expect("stored");
            assert_eq!(
                comparable(&stored),
                comparable(&model[i]),
                "{name}, step {step}: {t:?}"
            );
        }
        // The history exercised both sides of the guards.
        assert!(
            applied > 10 && refused > 10,
            "{name}: {applied} applied, {refused} refused"
        );
        assert!(!cancels.is_empty(), "{name}: no cancel was claimed");
        eprintln!(
            "{name}: {applied} transitions applied, {refused} refused, {} cancels",
            cancels.len()
        );
        cleanup.run().await;
    }
}
