-- Parking: an alert Discord refuses for good (a 4xx other than 404 and 429:
-- 400 bad payload, 401 invalid webhook token, ...) is parked instead of being
-- re-read by every flush, where it kept the flush spinning and starved newer
-- alerts. A parked row stays undelivered and visible to operators (with its
-- last_error) until it is un-parked for resend.
ALTER TABLE alert_outbox ADD COLUMN parked_at BIGINT;
