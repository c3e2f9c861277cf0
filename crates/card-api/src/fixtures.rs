//! Fixtures of Toss Payments' documented answers, written from Toss's
//! reference with invented values (keys, ids, names, amounts, messages), fed
//! to the adapter's own decoding: [`error_from`] for error answers and
//! [`decode_ok`] for 2xx bodies. Each fixture names its source beside it.

use reqwest::StatusCode;

use crate::{
    toss::{decode_ok, error_from},
    CardApiError, CardPayment, CodeClass, Transaction, CODE_TABLE,
};

use CodeClass::{
    AlreadyProcessed, Decline, InProgress, InvalidRequest, NotFound, OwnCredentials, Transient,
};

/// `(HTTP status, code, invented message, expected class)`: every error code
/// Toss documents for the calls paygate makes.
const ERROR_FIXTURES: &[(u16, &str, &str, CodeClass)] = &[
    // Source: Toss Payments reference, 에러 코드, 결제 승인 (confirm) table.
    (
        400,
        "ALREADY_PROCESSED_PAYMENT",
        "already processed",
        AlreadyProcessed,
    ),
    (
        400,
        "PROVIDER_ERROR",
        "temporary error, try again shortly",
        Transient,
    ),
    (
        400,
        "EXCEED_MAX_CARD_INSTALLMENT_PLAN",
        "too many installment months",
        Decline,
    ),
    (400, "INVALID_REQUEST", "bad request", InvalidRequest),
    (
        400,
        "NOT_ALLOWED_POINT_USE",
        "this card cannot pay with points",
        Decline,
    ),
    (400, "INVALID_API_KEY", "wrong secret key", OwnCredentials),
    (
        400,
        "INVALID_REJECT_CARD",
        "card refused, ask the issuer",
        Decline,
    ),
    (
        400,
        "BELOW_MINIMUM_AMOUNT",
        "amount below the minimum",
        InvalidRequest,
    ),
    (
        400,
        "INVALID_CARD_EXPIRATION",
        "check the expiry date",
        Decline,
    ),
    (400, "INVALID_STOPPED_CARD", "card is stopped", Decline),
    (
        400,
        "EXCEED_MAX_DAILY_PAYMENT_COUNT",
        "daily payment count exceeded",
        Decline,
    ),
    (
        400,
        "NOT_SUPPORTED_INSTALLMENT_PLAN_CARD_OR_MERCHANT",
        "no installments",
        Decline,
    ),
    (
        400,
        "INVALID_CARD_INSTALLMENT_PLAN",
        "bad installment plan",
        Decline,
    ),
    (
        400,
        "NOT_SUPPORTED_MONTHLY_INSTALLMENT_PLAN",
        "no monthly installments",
        Decline,
    ),
    (
        400,
        "EXCEED_MAX_PAYMENT_AMOUNT",
        "daily amount exceeded",
        Decline,
    ),
    (
        400,
        "NOT_FOUND_TERMINAL_ID",
        "no terminal id",
        InvalidRequest,
    ),
    (
        400,
        "INVALID_AUTHORIZE_AUTH",
        "invalid authentication method",
        InvalidRequest,
    ),
    (
        400,
        "INVALID_CARD_LOST_OR_STOLEN",
        "lost or stolen card",
        Decline,
    ),
    (
        400,
        "RESTRICTED_TRANSFER_ACCOUNT",
        "account usable 12 h after registration",
        Decline,
    ),
    (400, "INVALID_CARD_NUMBER", "check the card number", Decline),
    (
        400,
        "INVALID_UNREGISTERED_SUBMALL",
        "sub-mall not registered",
        InvalidRequest,
    ),
    (
        400,
        "NOT_REGISTERED_BUSINESS",
        "business number not registered",
        InvalidRequest,
    ),
    (
        400,
        "EXCEED_MAX_ONE_DAY_WITHDRAW_AMOUNT",
        "daily withdrawal limit",
        Decline,
    ),
    (
        400,
        "EXCEED_MAX_ONE_TIME_WITHDRAW_AMOUNT",
        "single withdrawal limit",
        Decline,
    ),
    (
        400,
        "CARD_PROCESSING_ERROR",
        "error at the card company",
        Transient,
    ),
    (400, "EXCEED_MAX_AMOUNT", "amount limit exceeded", Decline),
    (
        400,
        "INVALID_ACCOUNT_INFO_RE_REGISTER",
        "invalid account, register again",
        Decline,
    ),
    (
        400,
        "NOT_AVAILABLE_PAYMENT",
        "payment not available at this hour",
        Decline,
    ),
    (
        400,
        "UNAPPROVED_ORDER_ID",
        "order not approved yet",
        InvalidRequest,
    ),
    (
        400,
        "EXCEED_MAX_MONTHLY_PAYMENT_AMOUNT",
        "monthly amount exceeded",
        Decline,
    ),
    (
        401,
        "UNAUTHORIZED_KEY",
        "unauthorized secret or client key",
        OwnCredentials,
    ),
    (
        403,
        "REJECT_ACCOUNT_PAYMENT",
        "insufficient balance",
        Decline,
    ),
    (
        403,
        "REJECT_CARD_PAYMENT",
        "limit exceeded or insufficient balance",
        Decline,
    ),
    (403, "REJECT_CARD_COMPANY", "card company refused", Decline),
    (
        403,
        "FORBIDDEN_REQUEST",
        "request not allowed",
        InvalidRequest,
    ),
    (
        403,
        "REJECT_TOSSPAY_INVALID_ACCOUNT",
        "withdrawal account not registered",
        Decline,
    ),
    (
        403,
        "EXCEED_MAX_AUTH_COUNT",
        "too many authentication attempts",
        Decline,
    ),
    (
        403,
        "EXCEED_MAX_ONE_DAY_AMOUNT",
        "daily limit exceeded",
        Decline,
    ),
    (
        403,
        "NOT_AVAILABLE_BANK",
        "outside bank service hours",
        Decline,
    ),
    (403, "INVALID_PASSWORD", "wrong payment password", Decline),
    (
        403,
        "INCORRECT_BASIC_AUTH_FORMAT",
        "encode the key with ':'",
        OwnCredentials,
    ),
    (403, "FDS_ERROR", "risky transaction detected", Decline),
    (404, "NOT_FOUND_PAYMENT", "no such payment", NotFound),
    (
        404,
        "NOT_FOUND_PAYMENT_SESSION",
        "payment session expired",
        NotFound,
    ),
    (
        500,
        "FAILED_PAYMENT_INTERNAL_SYSTEM_PROCESSING",
        "not completed, retry",
        Transient,
    ),
    (
        500,
        "FAILED_INTERNAL_SYSTEM_PROCESSING",
        "internal failure, retry",
        Transient,
    ),
    (500, "UNKNOWN_PAYMENT_ERROR", "payment failed", Transient),
    // Source: Toss Payments reference, 에러 코드, 결제 조회 (lookup) table.
    (404, "NOT_FOUND", "no such information", NotFound),
    // Source: Toss Payments guide, 멱등키 (idempotency key).
    (
        409,
        "IDEMPOTENT_REQUEST_PROCESSING",
        "first request still running",
        InProgress,
    ),
    // Source: Toss Payments reference, 에러 코드, 결제 취소 (cancel) table.
    (
        400,
        "ALREADY_CANCELED_PAYMENT",
        "already canceled",
        AlreadyProcessed,
    ),
    (
        400,
        "INVALID_REFUND_ACCOUNT_INFO",
        "refund account and holder differ",
        InvalidRequest,
    ),
    (
        400,
        "EXCEED_CANCEL_AMOUNT_DISCOUNT_AMOUNT",
        "below the discount",
        InvalidRequest,
    ),
    (
        400,
        "INVALID_REFUND_ACCOUNT_NUMBER",
        "wrong refund account",
        InvalidRequest,
    ),
    (400, "INVALID_BANK", "invalid bank", InvalidRequest),
    (
        400,
        "NOT_MATCHES_REFUNDABLE_AMOUNT",
        "balance does not match",
        InvalidRequest,
    ),
    (400, "REFUND_REJECTED", "refund refused", InvalidRequest),
    (
        400,
        "ALREADY_REFUND_PAYMENT",
        "already refunded",
        AlreadyProcessed,
    ),
    (
        400,
        "FORBIDDEN_BANK_REFUND_REQUEST",
        "account cannot take deposits",
        InvalidRequest,
    ),
    (
        403,
        "NOT_CANCELABLE_AMOUNT",
        "amount cannot be canceled",
        InvalidRequest,
    ),
    (
        403,
        "FORBIDDEN_CONSECUTIVE_REQUEST",
        "repeated request, try later",
        Transient,
    ),
    (
        403,
        "NOT_CANCELABLE_PAYMENT",
        "payment cannot be canceled",
        InvalidRequest,
    ),
    (
        403,
        "EXCEED_MAX_REFUND_DUE",
        "refund period over",
        InvalidRequest,
    ),
    (
        403,
        "NOT_ALLOWED_PARTIAL_REFUND_WAITING_DEPOSIT",
        "awaiting deposit",
        InvalidRequest,
    ),
    (
        403,
        "NOT_ALLOWED_PARTIAL_REFUND",
        "no partial refund",
        InvalidRequest,
    ),
    (
        403,
        "NOT_CANCELABLE_PAYMENT_FOR_DORMANT_USER",
        "dormant user",
        InvalidRequest,
    ),
    (
        500,
        "FAILED_REFUND_PROCESS",
        "bank delay, refund failed",
        Transient,
    ),
    (
        500,
        "FAILED_METHOD_HANDLING_CANCEL",
        "temporary error in the method",
        Transient,
    ),
    (
        500,
        "FAILED_PARTIAL_REFUND",
        "bank maintenance, partial refund failed",
        Transient,
    ),
    (500, "COMMON_ERROR", "temporary error", Transient),
];

fn answer(status: u16, body: &str) -> CardApiError {
    error_from(StatusCode::from_u16(status).unwrap(), body.as_bytes(), None)
}

#[test]
fn every_documented_error_code_lands_in_its_class() {
    for &(status, code, message, expected) in ERROR_FIXTURES {
        let body = serde_json::json!({ "code": code, "message": message }).to_string();
        let e = answer(status, &body);
        assert_eq!(e.code(), code);
        assert_eq!(e.status(), Some(status));
        assert_eq!(e.class(), expected, "{status} {code}");
        // The four predicates the saga reads follow the class.
        assert_eq!(e.is_decline(), expected == Decline, "{code}: is_decline");
        assert_eq!(
            e.is_auth_failure(),
            expected == OwnCredentials,
            "{code}: is_auth_failure"
        );
        assert_eq!(
            e.is_transient(),
            matches!(expected, Transient | InProgress),
            "{code}: is_transient"
        );
        assert_eq!(
            e.outcome_unknown(),
            matches!(expected, Transient | InProgress | AlreadyProcessed),
            "{code}: outcome_unknown"
        );
    }
}

#[test]
fn the_table_and_the_fixtures_cover_the_same_codes_and_statuses() {
    assert_eq!(CODE_TABLE.len(), ERROR_FIXTURES.len());
    for d in CODE_TABLE {
        let fixture = ERROR_FIXTURES.iter().find(|f| f.1 == d.code);
        assert_eq!(
            fixture.map(|f| (f.0, f.3)),
            Some((d.status, d.class)),
            "{}",
            d.code
        );
    }
}

#[test]
fn the_issue_s_misreadings_are_fixed() {
    // 400 PROVIDER_ERROR: transient, never a decline.
    let e = answer(
        400,
        r#"{"code":"PROVIDER_ERROR","message":"temporary error"}"#,
    );
    assert!(e.is_transient() && e.outcome_unknown() && !e.is_decline());
    // 400 INVALID_API_KEY: our key, not the customer's decline.
    let e = answer(400, r#"{"code":"INVALID_API_KEY","message":"wrong key"}"#);
    assert!(e.is_auth_failure() && !e.is_decline() && !e.is_transient());
    // An undocumented 4xx code: unknown, looked up, never a decline.
    let e = answer(403, r#"{"code":"SOMETHING_NEW","message":"?"}"#);
    assert_eq!(e.class(), CodeClass::Unknown);
    assert!(e.outcome_unknown() && !e.is_decline() && !e.is_transient());
    // A body that is not Toss's (a proxy's HTML page): read by status.
    let e = answer(502, "<html>bad gateway</html>");
    assert_eq!((e.code(), e.class()), ("HTTP_502", Transient));
    let e = answer(429, "");
    assert!(e.is_transient() && !e.is_decline());
    let e = answer(401, "");
    assert!(e.is_auth_failure());
}

// Source: Toss Payments reference, Payment 객체 (Payment object), and the
// 결제 승인 (confirm) answer: a card payment, DONE, KRW.
const CONFIRM_DONE_KRW: &str = r#"{
  "mId": "tpaygatesbx",
  "lastTransactionKey": "9C62B18EEF0DE3EB7F4422EB6D14BC6E",
  "paymentKey": "pk_5EnNZRJGvaBX7zk2yd8ydw26XvwXkLrx9POLqKQjmAw4b0e1",
  "orderId": "order-7Fq2xK",
  "orderName": "sandbox tee and 2 more",
  "taxExemptionAmount": 0,
  "status": "DONE",
  "requestedAt": "2026-11-23T10:15:02+09:00",
  "approvedAt": "2026-11-23T10:15:09+09:00",
  "useEscrow": false,
  "cultureExpense": false,
  "card": {
    "issuerCode": "61",
    "acquirerCode": "31",
    "number": "43301234****123*",
    "installmentPlanMonths": 0,
    "isInterestFree": false,
    "interestPayer": null,
    "approveNo": "00000001",
    "useCardPoint": false,
    "cardType": "신용",
    "ownerType": "개인",
    "acquireStatus": "READY",
    "amount": 15000
  },
  "virtualAccount": null,
  "transfer": null,
  "mobilePhone": null,
  "giftCertificate": null,
  "cashReceipt": null,
  "cashReceipts": null,
  "discount": null,
  "cancels": null,
  "secret": null,
  "type": "NORMAL",
  "easyPay": null,
  "country": "KR",
  "failure": null,
  "isPartialCancelable": true,
  "receipt": { "url": "https://receipt.example.invalid/r/9C62B18E" },
  "checkout": { "url": "https://checkout.example.invalid/c/9C62B18E" },
  "currency": "KRW",
  "totalAmount": 15000,
  "balanceAmount": 15000,
  "suppliedAmount": 13636,
  "vat": 1364,
  "taxFreeAmount": 0,
  "method": "카드",
  "version": "2022-11-16",
  "metadata": null
}"#;

// Source: Toss Payments reference, 에러 코드 (error codes), "the failure
// field of a Payment": an ABORTED payment as a lookup returns it.
const LOOKUP_ABORTED: &str = r#"{
  "mId": "tpaygatesbx",
  "version": "2022-11-16",
  "lastTransactionKey": "1D0A7C2B5E9F4A3C8B6D2E1F0A9B8C7D",
  "paymentKey": "pk_Lq9w8Ee7Rr6Tt5Yy4Uu3Ii2Oo1Pp0AaSsDdFfGgHhJjKk",
  "orderId": "order-Zr81Qp",
  "orderName": "sandbox mug",
  "currency": "KRW",
  "method": "카드",
  "status": "ABORTED",
  "requestedAt": "2026-11-23T11:00:00+09:00",
  "approvedAt": null,
  "discount": null,
  "cancels": null,
  "secret": null,
  "type": "NORMAL",
  "easyPay": null,
  "country": "KR",
  "failure": { "code": "COMMON_ERROR", "message": "temporary error" },
  "totalAmount": 8000,
  "balanceAmount": 8000,
  "suppliedAmount": 7273,
  "vat": 727,
  "taxFreeAmount": 0,
  "taxExemptionAmount": 0
}"#;

// Source: Toss Payments reference, Payment 객체 `cancels[]`, and the 결제
// 취소 (cancel) answer: a partial cancel of a KRW card payment.
const CANCEL_PARTIAL_KRW: &str = r#"{
  "mId": "tpaygatesbx",
  "lastTransactionKey": "6A1B2C3D4E5F60718293A4B5C6D7E8F9",
  "paymentKey": "pk_5EnNZRJGvaBX7zk2yd8ydw26XvwXkLrx9POLqKQjmAw4b0e1",
  "orderId": "order-7Fq2xK",
  "orderName": "sandbox tee and 2 more",
  "taxExemptionAmount": 0,
  "status": "PARTIAL_CANCELED",
  "requestedAt": "2026-11-23T10:15:02+09:00",
  "approvedAt": "2026-11-23T10:15:09+09:00",
  "useEscrow": false,
  "cultureExpense": false,
  "card": null,
  "cancels": [
    {
      "transactionKey": "6A1B2C3D4E5F60718293A4B5C6D7E8F9",
      "cancelReason": "one item out of stock",
      "taxExemptionAmount": 0,
      "canceledAt": "2026-11-24T09:01:44+09:00",
      "transferDiscountAmount": 0,
      "easyPayDiscountAmount": 0,
      "receiptKey": null,
      "cancelAmount": 5000,
      "taxFreeAmount": 0,
      "refundableAmount": 10000,
      "cancelStatus": "DONE",
      "cancelRequestId": null
    }
  ],
  "type": "NORMAL",
  "country": "KR",
  "failure": null,
  "isPartialCancelable": true,
  "currency": "KRW",
  "totalAmount": 15000,
  "balanceAmount": 10000,
  "suppliedAmount": 9091,
  "vat": 909,
  "taxFreeAmount": 0,
  "method": "카드",
  "version": "2022-11-16"
}"#;

// Source: Toss Payments reference, Payment 객체 (`currency`, `totalAmount`
// as a number in the currency's unit), as an overseas payment in USD with
// a partial cancel: decimal amounts.
const CANCEL_PARTIAL_USD: &str = r#"{
  "mId": "tpaygatesbx",
  "lastTransactionKey": "0F1E2D3C4B5A69788796A5B4C3D2E1F0",
  "paymentKey": "pk_usd_3vQ9mZk1LxR7",
  "orderId": "order-usd-0001",
  "orderName": "sandbox export",
  "status": "PARTIAL_CANCELED",
  "requestedAt": "2026-11-23T12:00:00+09:00",
  "approvedAt": "2026-11-23T12:00:05+09:00",
  "useEscrow": false,
  "card": null,
  "easyPay": { "provider": "PAYPAL", "amount": 726.24, "discountAmount": 0 },
  "cancels": [
    {
      "transactionKey": "0F1E2D3C4B5A69788796A5B4C3D2E1F0",
      "cancelReason": "partial refund",
      "canceledAt": "2026-11-24T08:00:00+09:00",
      "cancelAmount": 100.5,
      "taxFreeAmount": 0,
      "taxExemptionAmount": 0,
      "refundableAmount": 625.74,
      "easyPayDiscountAmount": 0,
      "receiptKey": null,
      "cancelStatus": "DONE"
    }
  ],
  "type": "NORMAL",
  "country": "US",
  "failure": null,
  "isPartialCancelable": true,
  "currency": "USD",
  "totalAmount": 726.24,
  "balanceAmount": 625.74,
  "suppliedAmount": 726.24,
  "vat": 0,
  "taxFreeAmount": 0,
  "taxExemptionAmount": 0,
  "method": "간편결제",
  "version": "2022-11-16"
}"#;

// Source: Toss Payments reference, 거래 조회 (`GET /v1/transactions`)
// answer: a list of Transaction objects, one in USD.
const TRANSACTIONS: &str = r#"[
  {
    "mId": "tpaygatesbx",
    "transactionKey": "9C62B18EEF0DE3EB7F4422EB6D14BC6E",
    "paymentKey": "pk_5EnNZRJGvaBX7zk2yd8ydw26XvwXkLrx9POLqKQjmAw4b0e1",
    "orderId": "order-7Fq2xK",
    "method": "카드",
    "customerKey": null,
    "useEscrow": false,
    "receiptUrl": "https://receipt.example.invalid/r/9C62B18E",
    "status": "DONE",
    "transactionAt": "2026-11-23T10:15:09+09:00",
    "currency": "KRW",
    "amount": 15000
  },
  {
    "mId": "tpaygatesbx",
    "transactionKey": "0F1E2D3C4B5A69788796A5B4C3D2E1F0",
    "paymentKey": "pk_usd_3vQ9mZk1LxR7",
    "orderId": "order-usd-0001",
    "method": "간편결제",
    "customerKey": "cust-01",
    "useEscrow": false,
    "receiptUrl": "https://receipt.example.invalid/r/0F1E2D3C",
    "status": "DONE",
    "transactionAt": "2026-11-23T12:00:05+09:00",
    "currency": "USD",
    "amount": 726.24
  }
]"#;

#[test]
fn documented_payments_decode_with_amounts_in_minor_units() {
    let p: CardPayment = decode_ok(CONFIRM_DONE_KRW.as_bytes()).unwrap();
    assert!(p.is_approved());
    assert_eq!(
        p.payment_key,
        "pk_5EnNZRJGvaBX7zk2yd8ydw26XvwXkLrx9POLqKQjmAw4b0e1"
    );
    assert_eq!((p.total_amount, p.balance_amount), (15_000, Some(15_000)));
    assert_eq!(p.approved_at.as_deref(), Some("2026-11-23T10:15:09+09:00"));
    assert_eq!(p.cancels, None);

    let p: CardPayment = decode_ok(LOOKUP_ABORTED.as_bytes()).unwrap();
    assert_eq!(p.status, "ABORTED");
    assert_eq!(p.approved_at, None);
    assert_eq!(p.failure.map(|f| f.code).as_deref(), Some("COMMON_ERROR"));

    let p: CardPayment = decode_ok(CANCEL_PARTIAL_KRW.as_bytes()).unwrap();
    assert_eq!(p.balance_amount, Some(10_000));
    let cancels = p.cancels.unwrap();
    assert_eq!(cancels.len(), 1);
    assert_eq!(cancels[0].cancel_amount, 5_000);
    assert_eq!(
        cancels[0].transaction_key.as_deref(),
        Some("6A1B2C3D4E5F60718293A4B5C6D7E8F9")
    );
}

#[test]
fn decimal_amounts_decode_in_cents_and_encode_back_as_toss_writes_them() {
    let p: CardPayment = decode_ok(CANCEL_PARTIAL_USD.as_bytes()).unwrap();
    assert_eq!(p.currency.as_deref(), Some("USD"));
    assert_eq!((p.total_amount, p.balance_amount), (72_624, Some(62_574)));
    assert_eq!(p.cancels.as_ref().unwrap()[0].cancel_amount, 10_050);
    // Written back in Toss's form, and read again to the same value.
    let json = serde_json::to_value(&p).unwrap();
    assert_eq!(json["totalAmount"], serde_json::json!(726.24));
    assert_eq!(json["cancels"][0]["cancelAmount"], serde_json::json!(100.5));
    let again: CardPayment = serde_json::from_value(json).unwrap();
    assert_eq!(again, p);

    let txs: Vec<Transaction> = decode_ok(TRANSACTIONS.as_bytes()).unwrap();
    assert_eq!(txs.len(), 2);
    assert_eq!((txs[0].amount, txs[1].amount), (15_000, 72_624));
    assert_eq!(txs[1].currency.as_deref(), Some("USD"));
}

#[test]
fn an_amount_finer_than_its_currency_is_a_decode_error_that_says_so() {
    let body = CONFIRM_DONE_KRW.replace("\"totalAmount\": 15000", "\"totalAmount\": 15000.5");
    let e = decode_ok::<CardPayment>(body.as_bytes()).unwrap_err();
    assert!(
        matches!(&e, CardApiError::Decode(m) if m.contains("more decimals than KRW")),
        "{e}"
    );
}
