//! The merchant API's OpenAPI 3.1 document, generated from the handlers'
//! `#[utoipa::path]` annotations and the body types' `ToSchema` derives, and
//! served at `GET /openapi.json`. A test checks that every route of
//! [`crate::routes_table`] is in it, so a new route cannot ship undocumented.
//!
//! `utoipa` generates the document at compile time from the code itself,
//! which is why it was chosen over a hand-kept YAML file.

use utoipa::{
    openapi::security::{Http, HttpAuthScheme, SecurityScheme},
    Modify, OpenApi,
};

use crate::{problem::ProblemDetails, routes};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "paygate merchant API",
        description = "Payment confirmation through paygate (DESIGN.md §5). Amounts are integers in minor units of the currency (KRW has none). Errors are RFC 9457 problem+json.",
    ),
    paths(
        routes::confirm,
        routes::get_payment,
        routes::get_by_order,
        crate::cancel::cancel,
        crate::holds::put_inventory,
        crate::holds::get_inventory,
        crate::holds::post_hold,
        crate::holds::get_hold,
        crate::holds::delete_hold,
        crate::card_webhooks::receive,
        crate::merchant_webhooks::put_endpoint,
        crate::merchant_webhooks::list_events,
        routes::healthz,
        routes::readyz,
        routes::metrics,
        routes::openapi_json,
    ),
    components(schemas(
        routes::ConfirmBody,
        crate::cancel::CancelBody,
        routes::PaymentView,
        routes::CancelView,
        ProblemDetails,
        crate::holds::StockBody,
        crate::holds::StockView,
        crate::holds::HoldBody,
        crate::holds::HoldLine,
        crate::holds::HoldView,
        crate::merchant_webhooks::EndpointBody,
        crate::merchant_webhooks::EndpointView,
        crate::merchant_webhooks::EventsPage
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "payments", description = "confirm, read and cancel payments"),
        (name = "inventory", description = "stock per SKU and holds on it while a buyer pays (the timestamp rule)"),
        (name = "webhooks", description = "what the card company tells paygate (never trusted: each is a reason to look the payment up), and a merchant's own webhook endpoint and events"),
        (name = "operations", description = "health, readiness, metrics, this document"),
    )
)]
struct ApiDoc;

/// `Authorization: Bearer <api key>`.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        if let Some(components) = doc.components.as_mut() {
            components.add_security_scheme(
                "bearer",
                SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
            );
        }
    }
}

/// The document (OpenAPI 3.1), with the crate's version.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    doc
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn every_route_is_documented_with_its_schemas() {
        let doc = serde_json::to_value(document()).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
        for (method, path, _, _) in crate::routes_table() {
            let op = &doc["paths"][path][method.to_ascii_lowercase()];
            assert!(
                op.is_object(),
                "{method} {path} is missing from the OpenAPI document"
            );
            assert!(
                op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                "{method} {path} has no responses"
            );
        }
        let confirm = &doc["paths"]["/v1/payments/confirm"]["post"];
        assert_eq!(
            confirm["requestBody"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/ConfirmBody"
        );
        assert_eq!(
            confirm["responses"]["200"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/PaymentView"
        );
        assert_eq!(
            confirm["responses"]["402"]["content"]["application/problem+json"]["schema"]["$ref"],
            "#/components/schemas/ProblemDetails"
        );
        let schemas = &doc["components"]["schemas"];
        for (schema, field) in [
            ("ConfirmBody", "orderId"),
            ("PaymentView", "paymentId"),
            ("ProblemDetails", "type"),
        ] {
            assert!(
                schemas[schema]["properties"][field].is_object(),
                "{schema}.{field}"
            );
        }
        assert_eq!(schemas["ConfirmBody"]["properties"]["amount"]["minimum"], 1);
        assert_eq!(
            schemas["ConfirmBody"]["additionalProperties"], false,
            "unknown members are refused"
        );
        assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    }

    /// Issue 15 point 8: each route lists the problem answers it gives.
    #[test]
    fn every_route_lists_its_problem_answers() {
        let doc = serde_json::to_value(document()).unwrap();
        let payments: &[u16] = &[400, 401, 404, 405, 429, 503];
        for (method, path, problems) in [
            (
                "post",
                "/v1/payments/confirm",
                &[400, 401, 402, 405, 409, 413, 415, 422, 429, 503][..],
            ),
            ("get", "/v1/payments/{payment_id}", payments),
            ("get", "/v1/payments/orders/{order_id}", payments),
            ("get", "/healthz", &[405]),
            ("get", "/readyz", &[405, 503]),
            ("get", "/metrics", &[405, 503]),
            ("get", "/openapi.json", &[405]),
        ] {
            let responses = &doc["paths"][path][method]["responses"];
            for status in problems {
                assert_eq!(
                    responses[status.to_string()]["content"]["application/problem+json"]["schema"]
                        ["$ref"],
                    "#/components/schemas/ProblemDetails",
                    "{method} {path} {status}"
                );
            }
        }
    }
}
