//! A real, third-party Toss Payments client (`tosspayments-rs`, whose
//! structs require Toss's full objects: `version`, `mId`, `taxFreeAmount`,
//! `cancels[].refundableAmount`, transactions' `receiptUrl`, ...) drives the
//! card simulator: confirm, lookup by orderId, cancel and the transaction
//! list must all parse. The client also sends Basic auth without base64
//! padding and date-only list dates.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

use paygate_sandbox::{FaultProfile, SandboxServers};
use tosspayments::{
    api::{CancelPayment, CancelPaymentBody, ConfirmPayment, GetPayment, ListTransactions},
    data::{PaymentMethod, PaymentStatus, PaymentType},
    Client, Error,
};

/// `"test_sk_toss:"` is 13 bytes: its base64 form is padded, which this
/// client leaves out.
const SECRET: &str = "test_sk_toss";

fn today_kst() -> String {
    paygate_core::time::kst_local_from_ms(paygate_core::time::now_ms())[..10].to_owned()
}

fn tomorrow_kst() -> String {
    paygate_core::time::kst_local_from_ms(paygate_core::time::now_ms() + 86_400_000)[..10]
        .to_owned()
}

#[tokio::test]
async fn tosspayments_rs_parses_every_answer_of_the_simulator() {
    let sim = SandboxServers::start(FaultProfile::none(), SECRET)
        .await
        .unwrap();
    let client = Client::from_url(sim.card_url.clone(), SECRET);

    // Confirm.
    let confirmed = client
        .execute(&ConfirmPayment {
            payment_key: "pk_toss_client_1".into(),
            order_id: "order-toss-client-1".into(),
            amount: 15_000,
        })
        .await
        .unwrap();
    assert_eq!(confirmed.status, PaymentStatus::Done);
    assert_eq!(confirmed.r#type, PaymentType::Normal);
    assert_eq!(confirmed.method, Some(PaymentMethod::Card));
    assert_eq!(confirmed.version, "2022-11-16");
    assert_eq!(
        (confirmed.total_amount, confirmed.balance_amount),
        (15_000, 15_000)
    );
    assert_eq!((confirmed.supplied_amount, confirmed.vat), (13_636, 1_364));
    assert_eq!(confirmed.tax_free_amount, 0);
    assert_eq!(confirmed.country, "KR");
    assert!(confirmed.approved_at.is_some());
    assert!(confirmed.cancels.is_none() && confirmed.failure.is_none());
    assert!(confirmed.is_partial_cancelable);
    assert_eq!(confirmed.card.as_ref().map(|c| c.amount), Some(15_000));
    assert!(confirmed.last_transaction_key.is_some());

    // Lookup by orderId.
    let looked_up = client
        .execute(&GetPayment::OrderId("order-toss-client-1".into()))
        .await
        .unwrap();
    assert_eq!(looked_up.payment_key, "pk_toss_client_1");
    assert_eq!(looked_up.m_id, confirmed.m_id);

    // A partial cancel, then the rest.
    let partial = client
        .execute(&CancelPayment {
            payment_key: "pk_toss_client_1".into(),
            body: CancelPaymentBody {
                cancel_reason: "one item returned".into(),
                cancel_amount: Some(5_000),
                refund_receive_account: None,
                tax_free_amount: None,
            },
            idempotency_key: Some("cancel-toss-1".into()),
        })
        .await
        .unwrap();
    assert_eq!(partial.status, PaymentStatus::PartialCanceled);
    assert_eq!(partial.balance_amount, 10_000);
    let cancels = partial.cancels.as_ref().unwrap();
    assert_eq!(cancels.len(), 1);
    assert_eq!(
        (cancels[0].cancel_amount, cancels[0].refundable_amount),
        (5_000, 10_000)
    );
    assert_eq!(
        partial.last_transaction_key.as_deref(),
        Some(cancels[0].transaction_key.as_str())
    );
    let full = client
        .execute(&CancelPayment {
            payment_key: "pk_toss_client_1".into(),
            body: CancelPaymentBody {
                cancel_reason: "order canceled".into(),
                cancel_amount: None,
                refund_receive_account: None,
                tax_free_amount: None,
            },
            idempotency_key: Some("cancel-toss-2".into()),
        })
        .await
        .unwrap();
    assert_eq!(full.status, PaymentStatus::Canceled);
    assert_eq!(full.balance_amount, 0);
    assert_eq!(full.cancels.as_ref().map(Vec::len), Some(2));

    // The transaction list, with date-only dates: the approval and both
    // cancels.
    let txs = client
        .execute(&ListTransactions {
            start_date: today_kst(),
            end_date: tomorrow_kst(),
            starting_after: None,
            limit: Some(100),
        })
        .await
        .unwrap();
    let statuses: Vec<PaymentStatus> = txs.iter().map(|t| t.status).collect();
    assert_eq!(
        statuses,
        [
            PaymentStatus::Done,
            PaymentStatus::PartialCanceled,
            PaymentStatus::Canceled
        ]
    );
    assert!(txs.iter().all(|t| t.method == PaymentMethod::Card
        && t.currency == "KRW"
        && !t.receipt_url.is_empty()
        && t.m_id == confirmed.m_id));
    assert_eq!(
        txs.iter().map(|t| t.amount).collect::<Vec<_>>(),
        [15_000, 5_000, 10_000]
    );

    // An error answer parses as Toss's error too.
    let err = client
        .execute(&GetPayment::OrderId("order-nobody".into()))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Tosspayments(e) if e.http_status == 404),
        "{err}"
    );
}
