//! The card simulator's answers in the full shape of Toss Payments v1
//! objects (version `2022-11-16`): the `Payment` object with its `card` and
//! `cancels[]`, and the `Transaction` of `GET /v1/transactions`. Fields the
//! simulator has no value for are present with Toss's realistic `null`, so a
//! real Toss client (one that requires `version`, `mId`, `taxFreeAmount`,
//! ...) parses them. Amounts are whole KRW: the simulator is KRW-only.
//!
//! Source: Toss Payments reference, "Payment 객체" and "Transaction 객체".

use paygate_card_api::Failure;
use serde::Serialize;

/// `mId` of every object the simulator serves (an invented merchant id).
pub(crate) const MID: &str = "tpaygatesbx";
/// `version` of the Payment object (Toss's API version).
pub(crate) const VERSION: &str = "2022-11-16";
/// `method` of a card payment.
pub(crate) const CARD_METHOD: &str = "카드";
/// `currency` of every object: the simulator is KRW-only.
pub(crate) const CURRENCY: &str = "KRW";

/// `{url}` of `receipt` and `checkout`.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Url {
    pub url: String,
}

/// A receipt URL on a reserved (never resolvable) host.
pub(crate) fn receipt_url(payment_key: &str) -> String {
    format!("https://sandbox.paygate.invalid/receipt/{payment_key}")
}

/// The `card` object of a card payment.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Card {
    /// Amount paid by card, KRW.
    pub amount: i64,
    /// Issuer code (`61`: Hyundai Card).
    pub issuer_code: &'static str,
    /// Acquirer code.
    pub acquirer_code: Option<&'static str>,
    /// Masked card number.
    pub number: &'static str,
    pub installment_plan_months: u8,
    /// The card company's approval number.
    pub approve_no: String,
    pub use_card_point: bool,
    /// `신용` (credit).
    pub card_type: &'static str,
    /// `개인` (personal).
    pub owner_type: &'static str,
    /// `READY`, `CANCELED`, ...
    pub acquire_status: &'static str,
    pub is_interest_free: bool,
    pub interest_payer: Option<&'static str>,
}

/// One entry of `cancels[]`.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Cancel {
    pub transaction_key: String,
    pub cancel_reason: String,
    pub tax_exemption_amount: i64,
    pub canceled_at: String,
    pub transfer_discount_amount: i64,
    pub easy_pay_discount_amount: i64,
    pub receipt_key: Option<String>,
    pub cancel_amount: i64,
    pub tax_free_amount: i64,
    /// What is left to cancel after this one, KRW.
    pub refundable_amount: i64,
    /// `DONE`.
    pub cancel_status: &'static str,
    pub cancel_request_id: Option<String>,
}

/// The Payment object.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Payment {
    pub m_id: &'static str,
    pub last_transaction_key: Option<String>,
    pub payment_key: String,
    pub order_id: String,
    pub order_name: String,
    pub tax_exemption_amount: i64,
    pub status: String,
    pub requested_at: String,
    pub approved_at: Option<String>,
    pub use_escrow: bool,
    pub culture_expense: bool,
    pub card: Option<Card>,
    pub virtual_account: Option<()>,
    pub transfer: Option<()>,
    pub mobile_phone: Option<()>,
    pub gift_certificate: Option<()>,
    pub cash_receipt: Option<()>,
    pub cash_receipts: Option<()>,
    pub discount: Option<()>,
    pub cancels: Option<Vec<Cancel>>,
    pub secret: Option<String>,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub easy_pay: Option<()>,
    pub country: &'static str,
    pub failure: Option<Failure>,
    pub is_partial_cancelable: bool,
    pub receipt: Option<Url>,
    pub checkout: Option<Url>,
    pub currency: &'static str,
    pub total_amount: i64,
    pub balance_amount: i64,
    pub supplied_amount: i64,
    pub vat: i64,
    pub tax_free_amount: i64,
    pub method: &'static str,
    pub version: &'static str,
    pub metadata: Option<()>,
}

/// One entry of the transaction list.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Transaction {
    pub m_id: &'static str,
    pub transaction_key: String,
    pub payment_key: String,
    pub order_id: String,
    pub method: &'static str,
    pub customer_key: Option<String>,
    pub use_escrow: bool,
    pub receipt_url: String,
    pub status: String,
    pub transaction_at: String,
    pub currency: &'static str,
    pub amount: i64,
}

/// `(suppliedAmount, vat)` of a taxable KRW amount: VAT is a tenth of the
/// supplied value, so supplied = round(amount / 1.1).
pub(crate) fn supplied_and_vat(amount: i64) -> (i64, i64) {
    let supplied = (amount * 10 + 5).div_euclid(11);
    (supplied, amount - supplied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vat_is_a_tenth_of_the_supplied_value_rounded() {
        assert_eq!(supplied_and_vat(15_000), (13_636, 1_364));
        assert_eq!(supplied_and_vat(8_000), (7_273, 727));
        assert_eq!(supplied_and_vat(1_100), (1_000, 100));
        assert_eq!(supplied_and_vat(0), (0, 0));
    }
}
