-- Reconciliation joins the card company's transaction list to paygate's
-- records by orderId (across merchants: the card company knows paygate as one
-- merchant), and walks paid records by creation time to find payments paid
-- in paygate that the card company's list does not show.
CREATE INDEX realtime_payments_order_id ON realtime_payments (order_id);
CREATE INDEX completed_payments_order_id ON completed_payments (order_id);
CREATE INDEX unpaid_payments_order_id ON unpaid_payments (order_id);
CREATE INDEX realtime_payments_created ON realtime_payments (created_at, payment_id);
CREATE INDEX completed_payments_created ON completed_payments (created_at, payment_id);
CREATE INDEX unpaid_payments_created ON unpaid_payments (created_at, payment_id);
